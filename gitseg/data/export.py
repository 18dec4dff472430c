"""`gitseg export --to nnunet`: a cache's case-days as an nnU-Net raw data set (gitseg/data/nnunet.py
has the layout), with gitseg's folds in `splits_final.json`, so that nnU-Net trains and is scored on
exactly gitseg's split.

Where organs overlap, `--overlap regions` (the default) writes value = 1 x large bowel + 2 x small
bowel + 4 x stomach and declares the three classes as regions over those values: nothing is lost.
`--overlap priority` writes one label per voxel, 1, 2, 3, the later class winning where masks
overlap (stomach over small bowel over large bowel); what that loses is counted in `export.json`
and printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gitseg.data.cache import Cache
from gitseg.data.nifti import write_volume
from gitseg.data.nnunet import CHANNEL, DATASET_JSON, OVERLAP_CHOICES, SPLITS, dataset_labels, encode_labels
from gitseg.data.sources import source_volumes
from gitseg.data.uwmgi import CLASSES, DataFormatError
from gitseg.files import staged_folder, write_text_atomic


def export_nnunet(cache_dir, out, overlap: str = "regions", name: str = "gitseg", overwrite: bool = False,
                  progress=None, log=print) -> dict:
    """Write the cache's case-days as an nnU-Net raw data set in `out`: its training case-days under
    imagesTr/labelsTr, its holdout under imagesTs/labelsTs, dataset.json, and splits_final.json with
    the cache's folds. Images come from the cache's source (the scans as they were read, in the
    standard display, with each entry's affine); masks from the cache at the original size. Written
    into a staging folder that replaces `out` only when complete. Returns what export.json records."""
    if overlap not in OVERLAP_CHOICES:
        raise ValueError(f"--overlap {overlap!r}: one of {', '.join(OVERLAP_CHOICES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    cache = Cache(cache_dir)
    entries = cache.manifest["entries"]
    lost = np.zeros(len(CLASSES), dtype=np.int64)
    overlapping = 0
    voxels = np.zeros(len(CLASSES), dtype=np.int64)
    with staged_folder(out) as stage:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (stage / sub).mkdir()
        for i, (e, image, affine) in enumerate(source_volumes(cache.manifest, entries)):
            masks = cache.original_masks(e["case_day"])
            if masks.shape[1:] != image.shape:
                raise DataFormatError(f"{e['case_day']}: the source scan is {image.shape}, the cache's masks "
                                      f"{masks.shape[1:]}; run `gitseg prepare` again on the source")
            value, lost_here = encode_labels(masks, overlap)
            lost += lost_here
            voxels += masks.reshape(len(CLASSES), -1).sum(axis=1)
            overlapping += int((masks.sum(axis=0) > 1).sum())
            split = "Ts" if e["holdout"] else "Tr"
            stored = image if np.issubdtype(image.dtype, np.integer) else image.astype(np.float32)
            write_volume(stage / f"images{split}" / f"{e['case_day']}{CHANNEL}.nii.gz", stored, affine)
            write_volume(stage / f"labels{split}" / f"{e['case_day']}.nii.gz", value, affine)
            if progress:
                progress(i + 1, len(entries))
        labels, extra = dataset_labels(overlap)
        training = [e for e in entries if not e["holdout"]]
        spec = {"name": name, "description": f"gitseg cache {cache.root.resolve()} (overlap: {overlap})",
                "channel_names": {"0": "MRI"}, "labels": labels, **extra,
                "numTraining": len(training), "file_ending": ".nii.gz"}
        write_text_atomic(stage / DATASET_JSON, json.dumps(spec, indent=1))
        folds = sorted({e["fold"] for e in training})
        splits = [{"train": [e["case_day"] for e in training if e["fold"] != f],
                   "val": [e["case_day"] for e in training if e["fold"] == f]} for f in folds]
        write_text_atomic(stage / SPLITS, json.dumps(splits, indent=1))
        record = {"cache": str(cache.root.resolve()), "overlap": overlap, "training_case_days": len(training),
                  "holdout_case_days": len(entries) - len(training), "folds": len(folds),
                  "voxels": dict(zip(CLASSES, voxels.tolist())), "overlapping_voxels": overlapping,
                  "lost_voxels": dict(zip(CLASSES, lost.tolist()))}
        write_text_atomic(stage / "export.json", json.dumps(record, indent=1))
    share = lost.sum() / max(int(voxels.sum()), 1)
    log(f"export: {len(training)} training and {record['holdout_case_days']} holdout case-days as an nnU-Net data set "
        f"in {out} ({len(folds)} folds in {SPLITS}); overlap as {overlap}: {overlapping} voxels in two organs, "
        + ("none lost" if overlap == "regions" else
           f"{int(lost.sum())} organ voxels lost ({share:.2%}: " +
           ", ".join(f"{c} {n}" for c, n in zip(CLASSES, lost.tolist())) + ")"))
    return record
