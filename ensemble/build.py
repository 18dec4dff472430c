"""`gitseg ensemble`: select refit configurations, tune post-processing on OOF, evaluate on the holdout.

Order of decisions, each on data the next one never sees:
1. cross-validated (OOF) score of every refit configuration;
2. selection (top-k by that score, or greedy forward selection on the OOF ensemble);
3. thresholds, minimum component size and the empty-slice rule, tuned on the selected
   ensemble's OOF probabilities;
4. the holdout cases, touched only here, for the final numbers and the ablation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from ensemble.members import load_refit, oof_score, oof_volumes, select_greedy, select_topk
from ensemble.model import MANIFEST, MANIFEST_FORMAT, EnsembleModel, Member, member_from_checkpoint, sha256
from ensemble.postprocess import PostProcess, row_sums, apply, tune
from gitseg import __version__
from gitseg.data.cache import Cache
from gitseg.data.uwmgi import CLASSES
from gitseg.files import staged_folder
from gitseg.infer import TTA_SETS
from gitseg.metrics import assd_mm, dice_3d, hd95_mm, score_from_sums
from gitseg.progress import say

METHODS = ("topk", "greedy")
ABLATION = (
    ("best single fold model", "the fold model with the best validation score; no TTA, threshold 0.5"),
    ("best single configuration", "its fold models averaged; no TTA, threshold 0.5"),
    ("ensemble, no TTA", "selected configurations x folds; threshold 0.5"),
    ("ensemble + TTA", "threshold 0.5"),
    ("ensemble + TTA + tuned post-processing", "thresholds, component size, empty-slice rule from OOF"),
)


def scores_from_rows(rows: list[dict]) -> dict:
    """Score, Dice, Hausdorff overall and per class from per-(case-day, class) row sums."""
    sums = {cls: np.zeros(4) for cls in CLASSES}
    for r in rows:
        sums[r["class"]] += np.asarray(r["sums"])
    out = score_from_sums(*sum(sums.values()))
    for cls in CLASSES:
        for name, value in score_from_sums(*sums[cls]).items():
            out[f"{name}/{cls}"] = value
    return out


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _finite_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def evaluate_holdout(model: EnsembleModel, cache: Cache, variants: dict, log=say) -> dict:
    """Per-volume statistics of every ablation variant on the holdout case-days.

    `variants` maps a name to (members, tta, post-processing). Each (member, TTA) pair is predicted
    once per volume and added to every variant that uses it, so the ablation costs no more
    forward passes than its distinct members. The last variant also gets the clinical figures
    (3D Dice, HD95 and ASSD in mm per class).
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
    for i, case_day in enumerate(case_days):
        entry = cache.entries[case_day]
        inputs, out_size = {cache.size: cache.image(case_day)}, (entry["height"], entry["width"])
        gt = cache.original_masks(case_day)
        sums: dict = {}
        for (member_key, tta), targets in uses.items():
            p = model.probs(inputs, out_size, tta=tta, members=[by_key[member_key]])
            for source, weight in targets:
                sums[source] = sums.get(source, 0.0) + weight * p
        for name, (members, tta, post) in variants.items():
            source = sources[name]
            masks = apply(sums[source] / sum(w for _, w in source[0]), post)
            for c, cls in enumerate(CLASSES):
                rows[name].append({"case_day": case_day, "case": entry["case"], "class": cls,
                                   "sums": row_sums(masks[c], gt[c]).tolist()})
                if name == final:
                    spacing = entry["spacing"]
                    clinical.append({"case_day": case_day, "case": entry["case"], "class": cls,
                                     "dice_3d": dice_3d(masks[c], gt[c]), "hd95_mm": hd95_mm(masks[c], gt[c], spacing),
                                     "assd_mm": assd_mm(masks[c], gt[c], spacing),
                                     "gt_voxels": int(gt[c].sum()), "pred_voxels": int(masks[c].sum())})
        log(f"ensemble: holdout {i + 1}/{len(case_days)} {case_day}")
    return {"rows": rows, "clinical": clinical}


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


def build_ensemble(run_dir, topk: int = 5, out=None, tta: str | None = None, method: str = "topk",
                   cache_dir=None, log=say) -> dict:
    """Build the ensemble folder `out` (default `<run_dir>/ensemble`); returns its manifest."""
    started = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "ensemble"
    search, configs, problems = load_refit(run_dir)
    for p in problems:
        log(f"ensemble: {p}")
    if not configs:
        raise ValueError(f"no refit configuration in {run_dir} has a model for every fold; see the problems above")
    refit = json.loads((run_dir / "refit.json").read_text())
    tta = tta or refit.get("tta", "hflip")
    if tta not in TTA_SETS:
        raise ValueError(f"unknown TTA {tta!r}; choose one of {', '.join(TTA_SETS)}")
    if tta != refit.get("tta"):
        log(f"ensemble: note: OOF probabilities were made with TTA {refit.get('tta')!r}, the ensemble uses {tta!r}")
    cache_dir = cache_dir or search["base"]["data"]["cache"]
    cache = Cache(cache_dir)

    # 1. Cross-validated score of each configuration, from its pooled OOF probabilities.
    for conf in configs:
        conf.cv_score = oof_score([conf], [1.0], cache)
        log(f"ensemble: {conf.name} ({conf.trial_id}) OOF score {conf.cv_score:.4f} over "
            f"{len(cache.case_days())} case-days")

    # 2. Selection.
    if method == "topk":
        chosen, weights, selection_log = select_topk(configs, topk)
        why = f"the {len(chosen)} configuration(s) with the best OOF score (--topk {topk})"
    else:
        chosen, weights, selection_log = select_greedy(configs, topk, lambda c, w: oof_score(c, w, cache))
        why = (f"greedy forward selection on the OOF ensemble score, at most {topk} additions with "
               f"replacement; weights are how often each configuration was added")
    for line in selection_log:
        log(f"ensemble: {line}")
    oof_selected = oof_score(chosen, weights, cache)

    # 3. Post-processing on the selected ensemble's OOF probabilities.
    tune_start = time.perf_counter()
    post, steps = tune(oof_volumes(chosen, weights, cache), log=log)
    tune_seconds = time.perf_counter() - tune_start

    # The folder is staged next to `out` and moved in only when complete.
    with staged_folder(out) as staging:
        (staging / "models").mkdir()
        members = []
        for conf, weight in zip(chosen, weights):
            for fold, fm in sorted(conf.folds.items()):
                file = f"models/{conf.name}_fold{fold}.pt"
                shutil.copy2(fm.checkpoint, staging / file)
                member = member_from_checkpoint(staging / file, file, weight, conf.name)
                member.sha256 = sha256(staging / file)
                members.append(member)
        manifest = {
            "format": MANIFEST_FORMAT, "gitseg_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": {"run": str(run_dir.resolve()), "cache": str(Path(cache_dir).resolve())},
            "members": [m.__dict__ for m in members],
            "tta": tta,
            "postprocess": post.to_dict(),
            "preprocessing": {"sizes": sorted({m.size for m in members}),
                              "normalisation": cache.manifest["normalisation"], "classes": list(CLASSES),
                              "windows": sorted({(m.channels, m.stride) for m in members})},
            "metric": {"convention": "kaggle", "score": "0.4 * Dice + 0.6 * (1 - Hausdorff)",
                       "dice": "per (slice, class) row, both-empty rows skipped",
                       "hausdorff": "per (case-day, class) volume, unit-cube coordinates / sqrt(3), symmetric"},
            "selection": {"method": method, "topk": topk, "why": why, "log": selection_log,
                          "configurations": [{"name": c.name, "trial_id": c.trial_id, "values": c.values,
                                              "oof_score": c.cv_score,
                                              "fold_scores": {f: m.score for f, m in sorted(c.folds.items())},
                                              "selected": c in chosen,
                                              "weight": weights[chosen.index(c)] if c in chosen else 0.0}
                                             for c in configs],
                          "problems": problems},
            "scores": {"oof": {"selected_at_0.5": oof_selected, "tuning_steps": steps,
                               "case_days": len(cache.case_days())}},
            "timings": {"tuning_s": tune_seconds},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))

        # 4. Holdout: ablation from the best single model to the tuned ensemble.
        holdout = cache.case_days(holdout=True)
        if holdout:
            model = EnsembleModel.load(staging)
            best_conf = max(configs, key=lambda c: c.cv_score)
            best_fold = max(((c, f) for c in configs for f in c.folds.values()), key=lambda cf: cf[1].score)

            def reference(conf, fold_model):  # a model outside the selection, read in place
                return member_from_checkpoint(fold_model.checkpoint, str(fold_model.checkpoint.resolve()), 1.0,
                                              conf.name)

            plain = PostProcess()
            variants = {
                ABLATION[0][0]: ([reference(*best_fold)], "none", plain),
                ABLATION[1][0]: ([reference(best_conf, fm) for fm in best_conf.folds.values()], "none", plain),
                ABLATION[2][0]: (model.members, "none", plain),
                ABLATION[3][0]: (model.members, tta, plain),
                ABLATION[4][0]: (model.members, tta, post),
            }
            log(f"ensemble: evaluating {len(variants)} variants on {len(holdout)} holdout case-days")
            ev = evaluate_holdout(model, cache, variants, log)
            ablation = []
            for (name, detail), (members_v, tta_v, _) in zip(ABLATION, variants.values()):
                s = scores_from_rows(ev["rows"][name])
                ablation.append({"variant": name, "detail": detail, "members": len(members_v), "tta": tta_v,
                                 "score": s["score"], "dice": s["dice"], "hausdorff": s["hausdorff"]})
            for i in range(1, len(ablation)):
                ablation[i]["gain"] = ablation[i]["score"] - ablation[i - 1]["score"]
            ablation[0]["gain"] = 0.0
            final = scores_from_rows(ev["rows"][ABLATION[-1][0]])
            per_class = []
            for cls in CLASSES:
                clin = [r for r in ev["clinical"] if r["class"] == cls]
                per_class.append({"class": cls, "score": final[f"score/{cls}"], "dice": final[f"dice/{cls}"],
                                  "hausdorff": final[f"hausdorff/{cls}"],
                                  "dice_3d": _finite_mean(r["dice_3d"] for r in clin),
                                  "hd95_mm": _finite_mean(r["hd95_mm"] for r in clin),
                                  "assd_mm": _finite_mean(r["assd_mm"] for r in clin),
                                  "missed_or_spurious_volumes": sum(1 for r in clin if r["hd95_mm"] == math.inf)})
            manifest["scores"]["holdout"] = {"case_days": holdout, "score": final["score"], "dice": final["dice"],
                                             "hausdorff": final["hausdorff"], "per_class": per_class,
                                             "ablation": ablation,
                                             "best_single_fold_model": f"{best_fold[0].name} fold {best_fold[1].fold}",
                                             "best_single_configuration": best_conf.name}
            (staging / "evaluation.json").write_text(json.dumps(ev, default=float))
            (staging / "ablation.csv").write_text(_csv(ablation))
            (staging / "holdout_per_class.csv").write_text(_csv(per_class))
            (staging / "holdout_per_case.csv").write_text(_csv(per_case_table(ev["rows"][ABLATION[-1][0]])))
        else:
            log("ensemble: the cache has no holdout case-days; no holdout evaluation (prepare with --holdout > 0)")
        manifest["timings"]["total_s"] = time.perf_counter() - started
        manifest["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                               "cpus": os.cpu_count()}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    log(f"ensemble: wrote {out} ({len(members)} models)")
    return manifest
