"""The holdout evaluation: the ensemble and its ablation on case-days no earlier step has seen.

The ablation runs from the best single fold model to the tuned ensemble, one change per row, all
scored with the competition metric on the same holdout case-days; the final variant also gets
the clinical figures (3D Dice, HD95 and ASSD in mm per class).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ensemble.model import EnsembleModel, Member, member_from_checkpoint
from ensemble.predict.review import case_day_review, pixel_mm2, review_scores, review_summary
from ensemble.selection.members import Configuration
from ensemble.selection.postprocess import PostProcess, apply
from gitseg import records
from gitseg.config import to_dict
from gitseg.data.cache import Cache
from gitseg.data.geometry import Reorientation
from gitseg.data.nifti import read_volume
from gitseg.data.nnunet import decode_labels
from gitseg.data.uwmgi import CLASSES
from gitseg.files import write_text_atomic
from gitseg.metrics import ScoreSums, assd_mm, class_scores, dice_3d, hd95_mm, sum_rows
from gitseg.progress import bar, say
from gitseg.records import EVALUATION, AblationRow, ClassScores, Evaluation, Gain, HoldoutScores
from gitseg.tables import csv_text, format_table

# (variant, what it is, the variant its gain is measured over: the one row that differs by one step).
# Every model is shown at threshold 0.5 and with post-processing tuned on its own out-of-fold
# predictions (a fold model's are its validation fold's), so that what the ensemble adds (tuned
# ensemble against tuned best configuration) is not what tuning adds. "+ TTA" rows use the
# ensemble's TTA, or the refit's when the ensemble has none.
ABLATION = (
    ("best single fold model + TTA", "the fold model with the best validation score; threshold 0.5", None),
    ("best single fold model + TTA + tuned post-processing",
     "the same model; post-processing tuned on its own validation fold's OOF", "best single fold model + TTA"),
    ("best single configuration + TTA", "its fold models averaged; threshold 0.5", "best single fold model + TTA"),
    ("best single configuration + TTA + tuned post-processing",
     "the same models; post-processing tuned on its own OOF (every fold)", "best single configuration + TTA"),
    ("ensemble, no TTA", "selected configurations x folds; threshold 0.5", None),
    ("ensemble, no TTA + tuned post-processing", "post-processing tuned on its own OOF without TTA",
     "ensemble, no TTA"),
    ("ensemble + TTA", "threshold 0.5", "ensemble, no TTA"),
    ("ensemble + TTA + tuned post-processing", "thresholds, component size, empty-slice rule from OOF",
     "ensemble + TTA"),
)
VARIANTS = [name for name, _, _ in ABLATION]
(SINGLE, TUNED_SINGLE, CONFIGURATION, TUNED_CONFIGURATION, NO_TTA, TUNED_NO_TTA, WITH_TTA, FINAL) = VARIANTS
# Shown when the ensemble's post-processing uses the empty-slice gate: the same post-processing with
# the gate rule off (the gate is tuned last, so this is exactly the post-processing before its step).
GATE_OFF = ("ensemble as built, gate off", "its tuned post-processing without the empty-slice gate rule")


def final_variant(tta: str) -> str:
    """The ablation row that is the ensemble as built: with its TTA, post-processing tuned."""
    return TUNED_NO_TTA if tta == "none" else FINAL


def best_single_fold(configs: list[Configuration]):
    """(configuration, fold model) of the refit fold model with the best validation score."""
    return max(((c, f) for c in configs for f in c.folds.values()), key=lambda cf: cf[1].score)


def best_single_configuration(configs: list[Configuration]) -> Configuration:
    """The refit configuration with the best cross-validated (OOF) score."""
    return max(configs, key=lambda c: c.cv_score)


def scores_from_rows(rows: list[dict]) -> dict:
    """Score, Dice, Hausdorff overall and per class from per-(case-day, class) evaluation rows."""
    return class_scores(sum_rows(((r["class"], r["sums"]) for r in rows), CLASSES))


def score_label_volumes(cache: Cache, folder, overlap: str = "regions") -> tuple[dict, list[dict]]:
    """Another system's holdout predictions scored by gitseg's metric: `folder/<case_day>.nii.gz` label
    maps in the labels of `gitseg export --to nnunet --overlap OVERLAP` (as nnU-Net writes them after
    training on that export), each on its scan's grid. Returns the scores (as `scores_from_rows`) and
    the per-(case-day, class) rows, to pair with gitseg's own. A missing or misshapen file is an error
    that names it: a peer is never scored on fewer case-days than gitseg."""
    folder = Path(folder)
    rows = []
    for case_day in cache.case_days(holdout=True):
        path = folder / f"{case_day}.nii.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no prediction for holdout case-day {case_day}")
        value, affine = read_volume(path)
        reorient = Reorientation(affine, value.shape)
        masks = decode_labels(reorient.forward(value), overlap)
        gt = cache.original_masks(case_day)
        if masks.shape != gt.shape:
            raise ValueError(f"{path}: shape {masks.shape[1:]} in the axial display, the scan's is {gt.shape[1:]}")
        e = cache.entries[case_day]
        rows += [{"case_day": case_day, "case": e["case"], "class": cls,
                  "sums": list(ScoreSums.of_volume(masks[c], gt[c]))} for c, cls in enumerate(CLASSES)]
    return scores_from_rows(rows), rows


def _finite_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def evaluate_holdout(model: EnsembleModel, cache: Cache, variants: dict, log=say) -> Evaluation:
    """Per-volume score sums of every ablation variant on the holdout case-days.

    `variants` maps a name to (members, tta, post-processing). Each (member, TTA) pair is predicted
    once per volume and added to every variant that uses it, so the ablation costs no more
    forward passes than its distinct members. The last variant also gets the clinical figures.
    """
    case_days = cache.case_days(holdout=True)
    rows = {name: [] for name in variants}
    clinical = []
    final = list(variants)[-1]

    def key(m: Member) -> tuple:
        return (m.configuration, m.fold)

    # Variants with the same members and TTA (e.g. with and without post-processing) share probabilities.
    sources = {name: (tuple(sorted((key(m), m.weight) for m in members)), tta)
               for name, (members, tta, _) in variants.items()}
    uses: dict[tuple, list] = {}  # (member key, tta) -> [(source, weight)]
    by_key = {}
    for (members, tta, _), source in zip(variants.values(), sources.values()):
        for m in members:
            by_key[key(m)] = m
            if (source, m.weight) not in uses.setdefault((key(m), tta), []):
                uses[(key(m), tta)].append((source, m.weight))
    # The final variant's members also vote, each at its thresholds, for the review list's figures.
    final_members, final_tta, final_post = variants[final]
    voters = {key(m) for m in final_members} if len(final_members) >= 2 else set()
    thresholds = np.asarray(final_post.thresholds, dtype=np.float32).reshape(-1, 1, 1, 1)
    reviews = []
    progress = bar(len(case_days), "ensemble: holdout", unit="case-day")
    for case_day in case_days:
        entry = cache.entries[case_day]
        inputs, out_size = {cache.size: cache.image(case_day)}, (entry["height"], entry["width"])
        gt = cache.original_masks(case_day)
        sums: dict = {}
        gates: dict = {}  # source -> summed gate probabilities; None once a member has no gate head
        votes = np.zeros(gt.shape, dtype=np.uint8) if voters else None
        for (member_key, tta), targets in uses.items():
            p, g = model.predict(inputs, out_size, tta=tta, members=[by_key[member_key]])
            if member_key in voters and tta == final_tta:
                votes += p >= thresholds
            for source, weight in targets:
                sums[source] = sums.get(source, 0.0) + weight * p
                before = gates.get(source, 0.0)
                gates[source] = None if g is None or before is None else before + weight * g
        for name, (members, tta, post) in variants.items():
            source = sources[name]
            total = sum(w for _, w in source[0])
            masks = apply(sums[source] / total, post, None if gates[source] is None else gates[source] / total)
            for c, cls in enumerate(CLASSES):
                rows[name].append({"case_day": case_day, "case": entry["case"], "class": cls,
                                   "sums": list(ScoreSums.of_volume(masks[c], gt[c]))})
                if name == final:
                    spacing = entry["spacing"]
                    clinical.append({"case_day": case_day, "case": entry["case"], "class": cls,
                                     "dice_3d": dice_3d(masks[c], gt[c]), "hd95_mm": hd95_mm(masks[c], gt[c], spacing),
                                     "assd_mm": assd_mm(masks[c], gt[c], spacing),
                                     "gt_voxels": int(gt[c].sum()), "pred_voxels": int(masks[c].sum())})
            if name == final and voters:
                spacing = entry["spacing"]
                reviews.append({"case_day": case_day, **case_day_review(votes, len(voters), spacing),
                                "slice_errors": (masks != gt).sum(axis=(0, 2, 3)).tolist(),
                                "slice_area_mm2": (masks.sum(axis=(0, 2, 3)) * pixel_mm2(spacing)).tolist()})
        progress.update()
    progress.close()
    return Evaluation(rows=rows, clinical=clinical, review=reviews)


GAIN_RESAMPLES = 1000
# Below this many holdout cases a bootstrap over cases has too few distinct resamples to mean much
# (2 cases: 3 distinct resamples); the interval is still given, with that warning.
FEW_CASES = 5


def paired_gain(rows: list[dict], reference: list[dict], n: int = GAIN_RESAMPLES, seed: int = 0,
                over: str = "") -> Gain:
    """Score of `rows` minus score of `reference` (two variants' per-volume rows on the same holdout)
    with a 95% interval from a paired bootstrap over cases: each resample draws cases with
    replacement and scores both variants on the same draw."""
    cases = sorted({r["case"] for r in rows})
    by_case = {}
    for key, table in (("a", rows), ("b", reference)):
        for r in table:
            by_case.setdefault((key, r["case"], r["class"]), []).append(np.asarray(r["sums"], dtype=np.float64))
    sums = {k: np.sum(v, axis=0) for k, v in by_case.items()}

    def score(key, sample) -> float:
        per_class = {cls: sum((sums.get((key, c, cls), np.zeros(4)) for c in sample), np.zeros(4)) for cls in CLASSES}
        return class_scores({cls: ScoreSums(*v) for cls, v in per_class.items()})["score"]

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        sample = list(rng.choice(cases, size=len(cases), replace=True))
        draws.append(score("a", sample) - score("b", sample))
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return Gain(gain=score("a", cases) - score("b", cases), ci95=[float(lo), float(hi)], cases=len(cases), resamples=n,
                p_gain_not_positive=float(np.mean(np.asarray(draws) <= 0)), over=over)


def per_case_table(rows: list[dict]) -> list[dict]:
    """Competition score per case-day (worst first)."""
    by_cd: dict[str, list] = {}
    for r in rows:
        by_cd.setdefault(r["case_day"], []).append(r)
    table = []
    for case_day, items in by_cd.items():
        s = scores_from_rows(items)
        table.append({"case_day": case_day, "score": s["score"], "dice": s["dice"], "hausdorff": s["hausdorff"],
                      **{f"score/{c}": s[f"score/{c}"] for c in CLASSES}})
    return sorted(table, key=lambda r: r["score"])


def holdout_ablation(model: EnsembleModel, cache: Cache, configs: list[Configuration], refit_tta: str,
                     posts: dict[str, PostProcess], log=say) -> tuple[HoldoutScores, Evaluation]:
    """Evaluate the ABLATION variants of `model` on the holdout; `configs` are every refit configuration,
    `posts` the post-processing of each tuned variant, tuned on that variant's own OOF."""
    holdout = cache.case_days(holdout=True)
    best_conf = best_single_configuration(configs)
    best_fold = best_single_fold(configs)
    tta = model.tta if model.tta != "none" else refit_tta  # the "+ TTA" rows

    def reference(conf, fold_model):  # a model outside the selection, read in place
        return member_from_checkpoint(fold_model.checkpoint, str(fold_model.checkpoint.resolve()), 1.0, conf.name)

    single = [reference(*best_fold)]
    configuration = [reference(best_conf, fm) for fm in best_conf.folds.values()]
    members = {SINGLE: single, TUNED_SINGLE: single, CONFIGURATION: configuration, TUNED_CONFIGURATION: configuration}
    variants = {name: (members.get(name, model.members), "none" if name in (NO_TTA, TUNED_NO_TTA) else tta,
                       posts.get(name, PostProcess())) for name in VARIANTS}
    final = final_variant(model.tta)
    rows_of = [(name, detail, over) for name, detail, over in ABLATION]
    if any(model.post.gate):
        members_f, tta_f, post_f = variants[final]
        variants[GATE_OFF[0]] = (members_f, tta_f, dataclasses.replace(post_f, gate=[0.0] * len(CLASSES)))
        rows_of.append((*GATE_OFF, final))
    variants[final] = variants.pop(final)  # evaluate_holdout gives the clinical figures to the last variant
    log(f"ensemble: evaluating {len(variants)} variants on {len(holdout)} holdout case-days")
    ev = evaluate_holdout(model, cache, variants, log)
    ablation = []
    for name, detail, over in rows_of:
        members_v, tta_v, _ = variants[name]
        s = scores_from_rows(ev.rows[name])
        ablation.append(AblationRow(variant=name, detail=detail, members=len(members_v), tta=tta_v, score=s["score"],
                                    dice=s["dice"], hausdorff=s["hausdorff"], gain_over=over or ""))
    score = {r.variant: r.score for r in ablation}
    for row in ablation:
        row.gain = row.score - score[row.gain_over] if row.gain_over else 0.0
    scores = scores_from_rows(ev.rows[final])
    per_class = []
    for cls in CLASSES:
        clin = [r for r in ev.clinical if r["class"] == cls]
        per_class.append(ClassScores(organ=cls, score=scores[f"score/{cls}"], dice=scores[f"dice/{cls}"],
                                     hausdorff=scores[f"hausdorff/{cls}"],
                                     dice_3d=_finite_mean(r["dice_3d"] for r in clin),
                                     hd95_mm=_finite_mean(r["hd95_mm"] for r in clin),
                                     assd_mm=_finite_mean(r["assd_mm"] for r in clin),
                                     missed_or_spurious_volumes=sum(1 for r in clin if r["hd95_mm"] == math.inf)))
    result = HoldoutScores(case_days=holdout, score=scores["score"], dice=scores["dice"], hausdorff=scores["hausdorff"],
                           per_class=per_class, ablation=ablation,
                           best_single_fold_model=f"{best_fold[0].name} fold {best_fold[1].fold}",
                           best_single_configuration=best_conf.name, final=final,
                           ensemble_gain=paired_gain(ev.rows[final], ev.rows[TUNED_CONFIGURATION],
                                                     over=TUNED_CONFIGURATION),
                           review=holdout_review(ev, final))
    return result, ev


def holdout_review(ev: Evaluation, final: str) -> dict | None:
    """The review list's figures on the holdout (review_scores), or None for a one-network ensemble."""
    if not ev.review:
        return None
    true = {r["case_day"]: r["score"] for r in per_case_table(ev.rows[final])}
    reviews = {r["case_day"]: r for r in ev.review}
    return review_scores(reviews, true, {cd: r["slice_errors"] for cd, r in reviews.items()},
                         {cd: r["slice_area_mm2"] for cd, r in reviews.items()}) or None


def write_holdout_files(folder: Path, scores: HoldoutScores, ev: Evaluation) -> None:
    """evaluation.json and the ablation, per-class and per-case tables as CSV."""
    records.save(ev, folder / EVALUATION, indent=None)
    write_text_atomic(folder / "ablation.csv", csv_text([to_dict(r) for r in scores.ablation]))
    write_text_atomic(folder / "holdout_per_class.csv", csv_text([to_dict(r) for r in scores.per_class]))
    write_text_atomic(folder / "holdout_per_case.csv", csv_text(per_case_table(ev.rows[scores.final])))


def holdout_lines(holdout: HoldoutScores) -> list[str]:
    """The holdout ablation, per-class table and the ensemble's gain, as the terminal shows them."""
    lines = [format_table([{"variant": r.variant, "members": r.members, "tta": r.tta, "score": r.score, "dice": r.dice,
                            "hausdorff": r.hausdorff, "gain": r.gain, "gain_over": r.gain_over}
                           for r in holdout.ablation], floats="{:.4f}"),
             format_table([to_dict(r) for r in holdout.per_class], floats="{:.4f}"),
             f"ensemble: holdout score {holdout.score:.4f} on {len(holdout.case_days)} case-days (kaggle convention)"]
    gain = holdout.ensemble_gain
    if gain:
        lines.append(f"ensemble: what the ensemble adds over the {gain.over}: {gain.gain:+.4f}, 95% interval "
                     f"[{gain.ci95[0]:+.4f}, {gain.ci95[1]:+.4f}] (paired bootstrap over {gain.cases} "
                     f"holdout cases" + (": too few to mean much" if gain.cases < FEW_CASES else "") + ")")
    if holdout.review:
        lines.append(f"ensemble: review list: {review_summary(holdout.review)}")
    return lines
