"""`gitseg predict`: a Kaggle tree (submission.csv, NIfTI) or one series (DICOM-SEG, RT Structure
Set, NIfTI), after checking the input against the ensemble's training scans."""
