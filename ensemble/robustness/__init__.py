"""`gitseg robustness`: an ensemble's holdout scored under MRI corruptions."""
