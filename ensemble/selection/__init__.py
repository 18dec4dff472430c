"""`gitseg ensemble`: members from the refit, selection and tuning on out-of-fold predictions, the
ensemble folder and its holdout evaluation."""
