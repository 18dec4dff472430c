"""gitseg: search and ensemble segmentation models for the UW-Madison GI Tract MRI data."""

__version__ = "0.1.0"
