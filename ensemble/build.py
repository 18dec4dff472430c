"""`gitseg ensemble`: select refit configurations, tune post-processing on OOF, evaluate on the holdout.

Order of decisions, each on data the next one never sees:
1. cross-validated (OOF) score of every refit configuration;
2. the latency front: each fold model's inference time measured on this machine's device, and
   the OOF score of candidate ensembles (ensemble/latency.py);
3. selection (top-k by OOF score, greedy forward selection on the OOF ensemble, or the best
   candidate of the front within --latency-budget);
4. thresholds, minimum component size and the empty-slice rule, tuned on the selected
   ensemble's OOF probabilities (and, for the ablation, on each reference model's own);
5. the holdout cases, touched only here, for the final numbers and the ablation (ensemble/evaluate.py).
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import time
from pathlib import Path

from ensemble.evaluate import (
    FINAL,
    TUNED_CONFIGURATION,
    TUNED_NO_TTA,
    TUNED_SINGLE,
    best_single_configuration,
    best_single_fold,
    holdout_ablation,
    write_holdout_files,
)
from ensemble.input_checks import training_data
from ensemble.latency import (
    Candidate,
    candidate_scores,
    candidates,
    choose_under_budget,
    configuration_sets,
    folds_by_score,
    measure_members,
    pareto_front,
)
from ensemble.members import load_refit, oof_score, oof_volumes, select_greedy, select_topk
from ensemble.model import EnsembleModel, member_from_checkpoint, sha256
from ensemble.postprocess import scores_with, tune
from gitseg import __version__, records
from gitseg.checkpoint import default_device
from gitseg.data.cache import Cache
from gitseg.data.uwmgi import CLASSES
from gitseg.files import folder_lock, staged_folder
from gitseg.infer import TIMED_SLICES, TTA_SETS, device_name
from gitseg.oof import NO_TTA, oof_tta_sets
from gitseg.progress import note, say
from gitseg.records import ENSEMBLE_MANIFEST, MANIFEST_FORMAT, EnsembleManifest, EnsembleScores, Selection

METHODS = ("topk", "greedy")


def build_ensemble(run_dir, topk: int = 5, out=None, tta: str | None = None, method: str = "topk",
                   cache_dir=None, latency_budget: float | None = None, log=say) -> EnsembleManifest:
    """Build the ensemble folder `out` (default `<run_dir>/ensemble`); returns its manifest.

    `latency_budget` (ms per slice on this machine's device) replaces `method`: the ensemble is
    the best candidate of the latency front within the budget (ensemble/latency.py). A second
    `gitseg ensemble` into the same folder while this one runs refuses, naming this one.
    """
    out = Path(out) if out is not None else Path(run_dir) / "ensemble"
    with folder_lock(out, "gitseg ensemble"):
        return _build(run_dir, topk, out, tta, method, cache_dir, latency_budget, log)


def _build(run_dir, topk: int, out: Path, tta: str | None, method: str, cache_dir, latency_budget: float | None,
           log) -> EnsembleManifest:
    started = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    if latency_budget is not None and not latency_budget > 0:
        raise ValueError(f"--latency-budget must be a positive number of ms per slice (got {latency_budget})")
    run_dir = Path(run_dir)
    run = load_refit(run_dir)
    configs, problems = run.configurations, run.problems
    for p in problems:
        log(f"ensemble: {p}")
    if not configs:
        raise ValueError(f"no refit configuration in {run_dir} has a model for every fold; see the problems above")
    asked_tta, tta = tta, tta or run.refit.tta
    if tta not in TTA_SETS:
        raise ValueError(f"unknown TTA {tta!r}; choose one of {', '.join(TTA_SETS)}")
    oof_ttas = oof_tta_sets(run.refit.tta)
    if tta not in oof_ttas:
        log(f"ensemble: note: OOF probabilities were made with TTA {run.refit.tta!r} (and without), the ensemble "
            f"uses {tta!r}; its post-processing is tuned on the {run.refit.tta!r} ones")
    cache_dir = cache_dir or run.search.base["data"]["cache"]
    cache = Cache(cache_dir)

    # 1. Cross-validated score of each configuration, from its pooled OOF probabilities.
    for conf in configs:
        conf.cv_score = oof_score([conf], [1.0], cache)
        log(f"ensemble: {conf.name} ({conf.trial_id}) OOF score {conf.cv_score:.4f} over "
            f"{len(cache.case_days())} case-days")

    phase = {"cv_scores_s": time.perf_counter() - started}  # seconds of each phase, in the manifest
    peaks = {"cv_scores": peak_memory_gib()}
    mark = time.perf_counter()
    # 2. The latency front: every member timed, every candidate scored on OOF.
    device = default_device()
    sets = configuration_sets(configs)
    timed = sorted({c.name: c for s in sets for c in s}.values(), key=lambda c: c.rank)
    latency = measure_members(timed, list(dict.fromkeys([*oof_ttas, tta])), cache, device, log)
    scored_ttas = [asked_tta] if latency_budget is not None and asked_tta in oof_ttas else list(oof_ttas)
    cands = candidates(sets, candidate_scores(sets, scored_ttas, cache), latency)
    front = pareto_front(cands)
    phase["latency_front_s"] = time.perf_counter() - mark
    peaks["latency_front"] = peak_memory_gib()
    mark = time.perf_counter()

    # 3. Selection.
    folds = {c.name: sorted(c.folds) for c in configs}
    if latency_budget is not None:
        pick = choose_under_budget(cands, latency_budget)
        by_name = {c.name: c for c in configs}
        chosen, weights, tta = [by_name[n] for n in pick.configurations], [1.0] * len(pick.configurations), pick.tta
        folds = {c.name: sorted(folds_by_score(c)[: pick.folds]) for c in chosen}
        method = "latency-budget"
        why = (f"the best candidate of the latency front within {latency_budget:g} ms per slice on "
               f"{device_name(device)}: {pick.label()}, {pick.ms_per_slice:.2f} ms per slice")
        selection_log = [f"front: {c.label()}: OOF {c.oof_score:.4f}, {c.ms_per_slice:.2f} ms per slice"
                         for c in front]
    elif method == "topk":
        chosen, weights, selection_log = select_topk(configs, topk)
        why = f"the {len(chosen)} configuration(s) with the best OOF score (--topk {topk})"
    else:
        chosen, weights, selection_log = select_greedy(configs, topk, lambda c, w: oof_score(c, w, cache))
        why = (f"greedy forward selection on the OOF ensemble score, at most {topk} additions with "
               f"replacement; weights are how often each configuration was added")
    for line in selection_log:
        log(f"ensemble: {line}")
    own_oof = tta if tta in oof_ttas else None  # the OOF the ensemble is tuned on (None: the refit's)
    oof_selected = oof_score(chosen, weights, cache, tta=own_oof)
    ms = {(r["configuration"], r["fold"], r["tta"]): r["ms_per_slice"] for r in latency}
    ensemble_ms = sum(ms[(c.name, f, tta)] for c in chosen for f in folds[c.name])
    log(f"ensemble: {sum(len(folds[c.name]) for c in chosen)} fold models, TTA {tta}: OOF score "
        f"{oof_selected:.4f} at threshold 0.5, {ensemble_ms:.2f} ms per slice on {device_name(device)}")

    phase["selection_s"] = time.perf_counter() - mark
    peaks["selection"] = peak_memory_gib()
    # 4. Post-processing, each variant of the holdout ablation tuned on its own OOF probabilities:
    # the ensemble with and without TTA, the best single fold model on its validation fold, and
    # the best single configuration.
    tuned: dict = {}  # one tuning per OOF source: e.g. a greedy ensemble of one configuration is also
                      # the best single configuration, and with a TTA-free refit both TTA views are one

    def tuned_on(confs, ws, oof_tta=None, folds=None, shown=False):
        total = float(sum(ws))
        key = (tuple(sorted((c.name, w / total) for c, w in zip(confs, ws))), tuple(folds or ()),
               run.refit.tta if oof_tta is None else oof_tta)
        if key not in tuned:
            tuned[key] = tune(oof_volumes(confs, ws, cache, folds=folds, tta=oof_tta), log=log if shown else note)
        return tuned[key]

    tune_start = time.perf_counter()
    ens_tta = own_oof if tta != NO_TTA else run.refit.tta
    post_none, steps_none = tuned_on(chosen, weights, NO_TTA, shown=tta == NO_TTA)
    post_tta, steps_tta = tuned_on(chosen, weights, ens_tta, shown=tta != NO_TTA)
    post, steps = (post_none, steps_none) if tta == NO_TTA else (post_tta, steps_tta)
    tune_seconds = time.perf_counter() - tune_start
    peaks["tuning"] = peak_memory_gib()
    single_conf, single_fold = best_single_fold(configs)
    single_post, single_steps = tuned_on([single_conf], [1.0], folds=[single_fold.fold])
    best_conf = best_single_configuration(configs)
    conf_post, conf_steps = tuned_on([best_conf], [1.0])
    posts = {TUNED_SINGLE: single_post, TUNED_CONFIGURATION: conf_post, TUNED_NO_TTA: post_none, FINAL: post_tta}
    # What tuning reached on the OOF data it was tuned on, per class: the holdout shows how much of
    # it was the optimism of selecting and tuning on the same predictions.
    oof_tuned = scores_with(oof_volumes(chosen, weights, cache, tta=own_oof), post)
    peaks["ablation_tuning"] = peak_memory_gib()  # the single model's and configuration's tunings

    # The folder is staged next to `out` and moved in only when complete.
    with staged_folder(out) as staging:
        (staging / "models").mkdir()
        members = []
        for conf, weight in zip(chosen, weights):
            for fold in folds[conf.name]:
                fm = conf.folds[fold]
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
            selection=Selection(method=method, topk=topk, why=why, log=selection_log, latency_budget=latency_budget,
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
                                           "tuning_steps": conf_steps},
                                       "ensemble_no_tta": {"postprocess": post_none.to_dict(),
                                                           "tuning_steps": steps_none},
                                       "ensemble_with_tta": {"tta": ens_tta or run.refit.tta,
                                                             "postprocess": post_tta.to_dict(),
                                                             "tuning_steps": steps_tta}}),
            latency={"device": device_name(device), "timed_slices": TIMED_SLICES, "members": latency,
                     # Its OOF score with tuned thresholds (tuning's first step), as the candidates are scored.
                     "ensemble_ms_per_slice": ensemble_ms, "ensemble_oof_score": steps[0]["after"],
                     "budget_ms_per_slice": latency_budget,
                     "candidates": [_candidate_row(c, c in front) for c in cands]},
            timings={**phase, "tuning_s": tune_seconds},
            peak_memory_gib=peaks,
            training_data=training_data(cache, cache.case_days()),
        )
        records.save(manifest, staging / ENSEMBLE_MANIFEST)

        # 4. Holdout: ablation from the best single model to the tuned ensemble.
        mark = time.perf_counter()
        if cache.case_days(holdout=True):
            holdout, evaluation = holdout_ablation(EnsembleModel.load(staging), cache, configs, run.refit.tta, posts,
                                                   log)
            manifest.scores.holdout = holdout
            write_holdout_files(staging, holdout, evaluation)
        else:
            log("ensemble: the cache has no holdout case-days; no holdout evaluation (prepare with --holdout > 0)")
        manifest.timings["holdout_s"] = time.perf_counter() - mark
        manifest.timings["total_s"] = time.perf_counter() - started
        manifest.peak_memory_gib["holdout"] = peak_memory_gib()
        manifest.machine = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count()}
        records.save(manifest, staging / ENSEMBLE_MANIFEST)
    log(f"ensemble: wrote {out} ({len(members)} models)")
    return manifest


def peak_memory_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _candidate_row(c: Candidate, on_front: bool) -> dict:
    return {"configurations": list(c.configurations), "tta": c.tta, "folds": c.folds, "oof_score": c.oof_score,
            "ms_per_slice": c.ms_per_slice, "on_front": on_front}
