"""`gitseg distill`: teacher targets from an ensemble, the student's Ray Train runs, and the
student's one-member ensemble folder."""
