"""gitseg: search and ensemble segmentation models for the UW-Madison GI Tract MRI data."""

__version__ = "0.1.0"
# Where a clinician meets an output (README, the SEG's and RTSTRUCT's descriptions, predict's terminal).
RESEARCH_USE = "Research use only; not for clinical use."
