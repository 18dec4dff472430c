"""`gitseg predict`: an ensemble folder + a UWMGI tree → submission.csv and NIfTI masks.

The submission is written volume by volume and flushed, so a failure in a later volume never
loses what is already written; bad files are reported per file and their case-day is skipped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ensemble.deploy.runtime import load_engine
from ensemble.predict.input_checks import InputRefused, empty_organs, output_description, refuse_or_warn, scan_problems
from ensemble.predict.review import Votes, case_day_review, review_order, slice_rows, top_slices, votes_for
from gitseg import RESEARCH_USE
from gitseg.data.geometry import axial_affine
from gitseg.data.nifti import SLICER_TABLE, label_volume, write_label_table, write_volume
from gitseg.data.uwmgi import CLASSES, DataFormatError, index_root, problems_by_case_day, rle_encode, volume_from_rows
from gitseg.files import scratch_folder, write_text_atomic
from gitseg.progress import bar, say
from gitseg.tables import csv_text

SUBMISSION_COLUMNS = ("id", "class", "predicted")
REVIEW_SLICE_COLUMNS = ("case_day", "slice", "id", "organ", "agreement", "disputed_mm2")


def predict_case_day(model, image: np.ndarray, with_labels: bool) -> tuple[np.ndarray, np.ndarray | None, Votes | None]:
    """Masks bool `(3, D, H, W)`, if asked the NIfTI label volume, and the members' votes (None for a
    one-network ensemble) of one raw scan (`model`: an `EnsembleModel` or an `OnnxEnsemble`)."""
    votes = votes_for(model, image.shape)
    probs, masks = model.predict_scan(image, votes=votes)
    return masks, (label_volume(probs, masks) if with_labels else None), votes


def predict_tree(ensemble_dir, data_root, out, nifti=None, split: str = "test", device=None, ray_address=None,
                 force: bool = False, log=say, runtime: str = "auto") -> dict:
    """Predict every case-day of `data_root/<split>`; returns {written: [...], failed: {case_day: [problems]},
    warnings, empty_organs, submission, review}, also saved as OUT/predict.json.

    An ensemble of two or more networks also writes the review list (ensemble/predict/review.py):
    OUT/review.csv, the case-days by the members' disagreement (most first), and
    OUT/review_slices.csv, every (slice, organ) a member marks with the members' agreement and the
    disputed area.

    A case-day unlike the ensemble's training scans (ensemble/predict/input_checks.py) fails with the reason,
    unless `force`: then it is predicted and its warnings are recorded. `ray_address` ("auto" for a
    running cluster, "local" for a local instance) spreads the volumes over the cluster's workers, one
    GPU each where the cluster has GPUs; None predicts in-process. `runtime`: torch, onnx (an export of
    `gitseg export --onnx`) or auto (onnx for such an export).
    """
    # The ensemble is checked (files, checksums) before anything is read or written.
    model = load_engine(ensemble_dir, device, runtime)
    training = model.manifest.training_data
    slices, problems = index_root(data_root, split)
    bad, loose = problems_by_case_day(problems)
    failed: dict[str, list[str]] = {cd: msgs for cd, msgs in bad.items()}
    if loose:
        failed["(tree)"] = loose
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    nifti = Path(nifti) if nifti else None
    if nifti:
        nifti.mkdir(parents=True, exist_ok=True)
        write_label_table(nifti)
    submission = out / "submission.csv"
    case_days = [cd for cd in dict.fromkeys(slices["case_day"]) if cd not in failed]
    warnings: dict[str, list[str]] = {}

    def volumes():
        for case_day in case_days:
            try:
                volume = volume_from_rows(slices[slices["case_day"] == case_day])
                found = scan_problems(volume.image.shape, volume.spacing, model.members, training)
                warnings[case_day] = refuse_or_warn(found, case_day, force, log)
                yield case_day, volume
            except (DataFormatError, OSError, ValueError) as exc:  # InputRefused too
                yield case_day, exc

    if ray_address:
        results = _predict_on_ray(ensemble_dir, volumes(), ray_address, nifti is not None, log, runtime)
    else:
        if case_days:
            log(f"predict: loading {len(model.members)} network(s) of {ensemble_dir} ...")
            model.load_networks()
        results = ((cd, v, v if isinstance(v, Exception)
                    else _guard(predict_case_day, model, v.image, nifti is not None))
                   for cd, v in volumes())
    written, empty, reviews = [], {}, {}
    review_slices = out / "review_slices.csv"
    reviewing = len(model.members) >= 2
    if not reviewing:
        for stale in (review_slices, out / "review.csv"):  # a folder used before by a larger ensemble
            stale.unlink(missing_ok=True)
    # Streamed row by row, not through tables.csv_text: the whole submission of the real test set
    # never sits in memory, and a later failure keeps the volumes already written. The review's slice
    # rows likewise (for a one-network ensemble there are none: its writer goes to os.devnull).
    with open(submission, "w", newline="") as f, \
            (open(review_slices, "w", newline="") if reviewing else open(os.devnull, "w")) as r:
        writer, review_writer = csv.writer(f), csv.DictWriter(r, REVIEW_SLICE_COLUMNS)
        writer.writerow(SUBMISSION_COLUMNS)
        review_writer.writeheader()
        f.flush()
        progress = bar(len(case_days), "predict", unit="case-day")
        for case_day, volume, result in results:
            progress.update()
            if isinstance(result, Exception):
                failed[case_day] = [str(result), *getattr(result, "problems", [])]
                if not isinstance(result, InputRefused):  # said once, with the problems below
                    log(f"predict: {case_day} failed: {result}")
                continue
            masks, labels, votes = result
            writer.writerows((sid, cls, rle_encode(masks[c, z]))
                             for z, sid in enumerate(volume.slice_ids) for c, cls in enumerate(CLASSES))
            f.flush()
            if votes is not None:
                reviews[case_day] = case_day_review(votes.counts, votes.members, volume.spacing)
                review_writer.writerows(slice_rows(case_day, reviews[case_day], votes.counts, votes.members,
                                                   volume.slice_ids))
                r.flush()
            if nifti:
                affine = axial_affine(volume.spacing)
                description = output_description(bool(warnings.get(case_day)))
                write_volume(nifti / f"{case_day}.nii.gz", labels, affine, description)
                write_volume(nifti / f"{case_day}_scan.nii.gz", volume.image, affine)
            empty[case_day] = empty_organs(masks, volume.spacing, training)
            for line in empty[case_day]:
                log(f"predict: {case_day}: {line}")
            written.append(case_day)
        progress.close()
    for case_day, msgs in failed.items():
        for msg in msgs:
            log(f"predict: problem in {case_day}: {msg}")
    log(f"predict: {submission}: {len(written)} case-day(s)" + (f"; {len(failed)} failed" if failed else "")
        + (f"; NIfTI in {nifti} (label names in {SLICER_TABLE})" if nifti else ""))
    if reviewing:
        write_text_atomic(out / "review.csv", csv_text(review_table(reviews)))
        if reviews:
            first = review_order(reviews)[0]
            log(f"predict: review list in {out / 'review.csv'} (case-days by the members' disagreement; most: "
                f"{first}, {reviews[first]['disagreement']:.3f}) and {review_slices}")
    result = {"written": written, "failed": failed, "submission": str(submission),
              "warnings": {cd: w for cd, w in warnings.items() if w},
              "empty_organs": {cd: e for cd, e in empty.items() if e},
              "review": {cd: reviews[cd]["disagreement"] for cd in review_order(reviews)} if reviewing else None,
              "notice": RESEARCH_USE}
    write_text_atomic(out / "predict.json", json.dumps(result, indent=1))
    return result


def review_table(reviews: dict[str, dict], slices: int = 5) -> list[dict]:
    """review.csv: one row per case-day, most disagreement first, with its organs' agreement and its
    most disputed slices (numbered from 1, largest disputed area first)."""
    return [{"rank": i + 1, "case_day": cd, "disagreement": round(reviews[cd]["disagreement"], 4),
             **{f"agreement/{cls}": round(v, 4) for cls, v in reviews[cd]["agreement"].items()},
             "disputed_mm2": round(float(sum(reviews[cd]["slice_disputed_mm2"])), 1),
             "slices_to_review": " ".join(str(z + 1) for z in top_slices(reviews[cd], slices))}
            for i, cd in enumerate(review_order(reviews))]


def _guard(fn, *args):
    try:
        return fn(*args)
    except (DataFormatError, OSError, ValueError) as exc:
        return exc


# ---------------------------------------------------------------------------------------------
# On a Ray cluster: the driver reads the scans (so workers need no access to the data), each
# worker rebuilds the ensemble once from its files in the object store and predicts whole volumes.

_WORKER_MODELS: dict[str, object] = {}


def _ensemble_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and (p.name in ("ensemble.json", "onnx.json") or p.parent.name == "models")}


def _worker_predict(files: dict, image: np.ndarray, with_labels: bool, runtime: str = "auto"):
    key = hashlib.sha256(files["ensemble.json"]).hexdigest()
    if key not in _WORKER_MODELS:  # once per worker process
        with scratch_folder("ensemble") as folder:
            for rel, data in files.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(data)
            model = load_engine(folder, runtime=runtime)
            model.load_networks()  # every network in memory, so the files can go
        _WORKER_MODELS[key] = model
    return predict_case_day(_WORKER_MODELS[key], image, with_labels)


def _predict_on_ray(ensemble_dir, volumes, address: str, with_labels: bool, log, runtime: str = "auto"):
    """Yield (case_day, volume, result) in input order, predicting up to 2 volumes per slot at once."""
    import ray  # heavy: only prediction spread over a cluster loads it

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    slots = int(gpus) if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=1)(_worker_predict)
    files = ray.put(_ensemble_files(Path(ensemble_dir)))
    log(f"predict: on Ray, {slots} {'GPU' if gpus else 'CPU'} slot(s)")
    pending = []  # (case_day, volume, ref) in input order

    def result_of(item):
        case_day, volume, ref = item
        if isinstance(volume, Exception):
            return case_day, volume, volume
        try:
            return case_day, volume, ray.get(ref)
        except ray.exceptions.RayError as exc:  # the task raised, or its worker died twice
            return case_day, volume, RuntimeError(str(exc).strip().splitlines()[-1])

    for case_day, volume in volumes:
        ref = None if isinstance(volume, Exception) else task.remote(files, volume.image, with_labels, runtime)
        pending.append((case_day, volume, ref))
        if len(pending) >= 2 * slots:
            yield result_of(pending.pop(0))
    for item in pending:
        yield result_of(item)
