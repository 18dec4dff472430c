"""`gitseg predict`: the entry point over `predict_tree` (a Kaggle tree) and `predict_series` (one
DICOM series or NIfTI volume).

Part of the CLI layer (docs/ARCHITECTURE.md): the stage is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

from gitseg.arguments import add_verbose, log_in
from gitseg.progress import error


def predict_command(args) -> int:
    sources = [name for name in ("data", "dicom", "nifti_in") if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError("give exactly one of --data (a UWMGI tree), --dicom (one series folder) or --nifti-in "
                         "(one NIfTI volume)")
    if args.dicom or args.nifti_in:
        if args.ray or args.nifti or args.split != "test":
            raise ValueError("--ray, --nifti and --split apply to a UWMGI tree (--data); one series is predicted "
                             "in this process and its NIfTI labels are written to --out")
        from ensemble.predict.clinical import predict_nifti_folder, predict_series

        if args.nifti_in and Path(args.nifti_in).is_dir():
            result = predict_nifti_folder(args.ensemble, args.nifti_in, args.out, device=args.device, force=args.force,
                                          runtime=args.runtime)
            return 1 if result["failed"] else 0
        predict_series(args.ensemble, args.out, dicom=args.dicom, nifti_in=args.nifti_in, device=args.device,
                       force=args.force, runtime=args.runtime)
        return 0
    from ensemble.predict.tree import predict_tree

    result = predict_tree(args.ensemble, args.data, args.out, nifti=args.nifti, split=args.split,
                          device=args.device, ray_address=args.ray, force=args.force, runtime=args.runtime)
    if result["failed"]:
        error(f"gitseg predict: {len(result['failed'])} case-day(s) failed (listed above); the others are in "
              f"{result['submission']}")
        return 1
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("predict", help="predict a UWMGI tree (submission.csv, NIfTI masks), or one DICOM series "
                                       "(DICOM-SEG, RT Structure Set, NIfTI) or NIfTI volume")
    p.add_argument("--ensemble", required=True, help="ensemble folder made by `gitseg ensemble` or `gitseg distill`")
    p.add_argument("--data", default=None, help="UWMGI root holding test/ (or train/ with --split train)")
    p.add_argument("--dicom", default=None, metavar="SERIES_DIR",
                   help="a folder holding one MR series (files in any order, any names): writes seg.dcm, "
                        "rtstruct.dcm and labels.nii.gz to --out")
    p.add_argument("--nifti-in", default=None, metavar="PATH",
                   help="one NIfTI volume (writes labels.nii.gz to --out), or a folder of them such as an nnU-Net "
                        "imagesTs/ (writes <CASE>.nii.gz per volume, on each volume's own grid)")
    p.add_argument("--out", required=True, help="folder for the outputs")
    p.add_argument("--nifti", default=None, help="folder for one NIfTI label volume (+ scan) per case-day")
    p.add_argument("--split", default="test", choices=("test", "train"), help="which tree to read (default test)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx"),
                   help="torch (PyTorch), onnx (ONNX Runtime, for a folder of `gitseg export --onnx`), or auto "
                        "(the default: onnx for such a folder, else torch)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="spread volumes over a Ray cluster: auto (the running cluster), an address, or local")
    p.add_argument("--force", action="store_true",
                   help="predict a scan unlike the ensemble's training scans (too few slices, not axial, field of "
                        "view or spacing far off) instead of refusing it; the warnings are recorded in the outputs")
    add_verbose(p)
    p.set_defaults(func=predict_command, log=lambda args: log_in(args.out, "predict"))
