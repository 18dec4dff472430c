"""`gitseg ensemble`: select refit configurations, tune post-processing on OOF, evaluate on the holdout.

Order of decisions, each on data the next one never sees:
1. cross-validated (OOF) score of every refit configuration;
2. selection (top-k by that score, or greedy forward selection on the OOF ensemble);
3. thresholds, minimum component size and the empty-slice rule, tuned on the selected
   ensemble's OOF probabilities;
4. the holdout cases, touched only here, for the final numbers and the ablation (ensemble/evaluate.py).
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path

from ensemble.evaluate import best_single_configuration, best_single_fold, holdout_ablation, write_holdout_files
from ensemble.members import load_refit, oof_score, oof_volumes, select_greedy, select_topk
from ensemble.model import EnsembleModel, member_from_checkpoint, sha256
from ensemble.postprocess import scores_with, tune
from gitseg import __version__, records
from gitseg.data.cache import Cache
from gitseg.data.uwmgi import CLASSES
from gitseg.files import staged_folder
from gitseg.infer import TTA_SETS
from gitseg.progress import note, say
from gitseg.records import ENSEMBLE_MANIFEST, MANIFEST_FORMAT, EnsembleManifest, EnsembleScores, Selection

METHODS = ("topk", "greedy")


def build_ensemble(run_dir, topk: int = 5, out=None, tta: str | None = None, method: str = "topk",
                   cache_dir=None, log=say) -> EnsembleManifest:
    """Build the ensemble folder `out` (default `<run_dir>/ensemble`); returns its manifest."""
    started = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "ensemble"
    run = load_refit(run_dir)
    configs, problems = run.configurations, run.problems
    for p in problems:
        log(f"ensemble: {p}")
    if not configs:
        raise ValueError(f"no refit configuration in {run_dir} has a model for every fold; see the problems above")
    tta = tta or run.refit.tta
    if tta not in TTA_SETS:
        raise ValueError(f"unknown TTA {tta!r}; choose one of {', '.join(TTA_SETS)}")
    if tta != run.refit.tta:
        log(f"ensemble: note: OOF probabilities were made with TTA {run.refit.tta!r}, the ensemble uses {tta!r}")
    cache_dir = cache_dir or run.search.base["data"]["cache"]
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
    # The same tuning for the best single fold model on its own OOF (its validation fold): the
    # reference the ensemble must beat post-processed the same way.
    single_conf, single_fold = best_single_fold(configs)
    single_post, single_steps = tune(oof_volumes([single_conf], [1.0], cache, folds=[single_fold.fold]), log=note)
    best_conf = best_single_configuration(configs)
    conf_post, conf_steps = tune(oof_volumes([best_conf], [1.0], cache), log=note)
    # What tuning reached on the OOF data it was tuned on, per class: the holdout shows how much of
    # it was the optimism of selecting and tuning on the same predictions.
    oof_tuned = scores_with(oof_volumes(chosen, weights, cache), post)

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
        manifest = EnsembleManifest(
            format=MANIFEST_FORMAT, gitseg_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            source={"run": str(run_dir.resolve()), "cache": str(Path(cache_dir).resolve())},
            members=members,
            tta=tta,
            postprocess=post.to_dict(),
            preprocessing={"sizes": sorted({m.size for m in members}),
                           "normalisation": cache.manifest["normalisation"], "classes": list(CLASSES),
                           "windows": sorted({(m.channels, m.stride) for m in members})},
            metric={"convention": "kaggle", "score": "0.4 * Dice + 0.6 * (1 - Hausdorff)",
                    "dice": "per (slice, class) row, both-empty rows skipped",
                    "hausdorff": "per (case-day, class) volume, unit-cube coordinates / sqrt(3), symmetric"},
            selection=Selection(method=method, topk=topk, why=why, log=selection_log,
                                configurations=[{"name": c.name, "trial_id": c.trial_id, "values": c.values,
                                                 "oof_score": c.cv_score,
                                                 "fold_scores": {f: m.score for f, m in sorted(c.folds.items())},
                                                 "selected": c in chosen,
                                                 "weight": weights[chosen.index(c)] if c in chosen else 0.0}
                                                for c in configs],
                                problems=problems),
            scores=EnsembleScores(oof={"selected_at_0.5": oof_selected, "tuning_steps": steps,
                                       "case_days": len(cache.case_days()),
                                       "tuned": oof_tuned,
                                       "best_single_fold_model": {
                                           "model": f"{single_conf.name} fold {single_fold.fold}",
                                           "postprocess": single_post.to_dict(), "tuning_steps": single_steps},
                                       "best_single_configuration": {
                                           "model": best_conf.name, "postprocess": conf_post.to_dict(),
                                           "tuning_steps": conf_steps}}),
            timings={"tuning_s": tune_seconds},
        )
        records.save(manifest, staging / ENSEMBLE_MANIFEST)

        # 4. Holdout: ablation from the best single model to the tuned ensemble.
        if cache.case_days(holdout=True):
            holdout, evaluation = holdout_ablation(EnsembleModel.load(staging), cache, configs, tta, post, single_post,
                                                   conf_post, log)
            manifest.scores.holdout = holdout
            write_holdout_files(staging, holdout, evaluation)
        else:
            log("ensemble: the cache has no holdout case-days; no holdout evaluation (prepare with --holdout > 0)")
        manifest.timings["total_s"] = time.perf_counter() - started
        manifest.machine = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count()}
        records.save(manifest, staging / ENSEMBLE_MANIFEST)
    log(f"ensemble: wrote {out} ({len(members)} models)")
    return manifest
