"""`gitseg report`: what the static, offline report of a search run and its ensemble says.

Sections, tables and figures are chosen here from the run records (gitseg.records); how they
become `index.html`, `report.md` and CSV is ensemble/report/render.py's job, the figures ensemble/report/figures.py's.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path

import numpy as np

from ensemble.model import EnsembleModel
from ensemble.predict.review import Votes, disputed, review_order, review_summary, top_slices
from ensemble.report.figures import (
    anytime_curve,
    best_so_far,
    latency_front,
    learning_curves,
    overlay,
    parameter_effects,
    review_scatter,
    search_front,
)
from ensemble.report.render import Report
from ensemble.selection.evaluate import (
    CONFIGURATION,
    FEW_CASES,
    GATE_OFF,
    TUNED_CONFIGURATION,
    TUNED_SINGLE,
    WITH_TTA,
    per_case_table,
)
from ensemble.selection.postprocess import apply
from gitseg import records
from gitseg.config import to_dict
from gitseg.data.cache import Cache, split_summary
from gitseg.data.uwmgi import CLASSES
from gitseg.files import staged_folder
from gitseg.metrics import ScoreSums, dice_per_slice
from gitseg.progress import note, say
from gitseg.records import (
    ENSEMBLE_MANIFEST,
    EVALUATION,
    REFIT_RECORD,
    SEARCH_RECORD,
    EnsembleManifest,
    Evaluation,
    Gain,
    RefitRecord,
    SearchRecord,
)
from gitseg.tables import label
from gitseg.tracking import log_stage

PACKAGES = ("gitseg", "torch", "torchvision", "segmentation-models-pytorch", "ray", "optuna", "numpy", "scipy",
            "albumentations", "nibabel")
BOOTSTRAP = 1000


# ---------------------------------------------------------------------------------------------
# Statistics


def bootstrap_by_case(rows: list[dict], clinical: list[dict], n: int = BOOTSTRAP, seed: int = 0) -> list[dict]:
    """Per class and overall: score, Dice, Hausdorff and HD95 with 95% intervals, resampling cases."""
    rng = np.random.default_rng(seed)
    cases = sorted({r["case"] for r in rows})
    sums = {(case, cls): ScoreSums() for case in cases for cls in CLASSES}
    for r in rows:
        sums[(r["case"], r["class"])] = sums[(r["case"], r["class"])] + ScoreSums(*r["sums"])
    hd95 = {(case, cls): [] for case in cases for cls in CLASSES}
    for r in clinical:
        if r["hd95_mm"] is not None and math.isfinite(r["hd95_mm"]):
            hd95[(r["case"], r["class"])].append(r["hd95_mm"])

    def stats(sample):
        out = {}
        for cls in (*CLASSES, "all"):
            classes = CLASSES if cls == "all" else (cls,)
            s = sum((sums[(c, k)] for c in sample for k in classes), ScoreSums()).terms()
            values = [v for c in sample for k in classes for v in hd95[(c, k)]]
            out[cls] = (s["score"], s["dice"], s["hausdorff"], float(np.mean(values)) if values else math.nan)
        return out

    point = stats(cases)
    draws = [stats(list(rng.choice(cases, size=len(cases), replace=True))) for _ in range(n)]
    table = []
    for cls in (*CLASSES, "all"):
        row = {"class": cls, "cases": len(cases)}
        for i, name in enumerate(("score", "dice", "hausdorff", "hd95_mm")):
            values = np.array([d[cls][i] for d in draws], dtype=float)
            values = values[~np.isnan(values)]
            lo, hi = np.percentile(values, [2.5, 97.5]) if len(values) else (math.nan, math.nan)
            row[name] = point[cls][i]
            row[f"{name} 95% CI"] = f"[{lo:.3f}, {hi:.3f}]"
        table.append(row)
    return table


# ---------------------------------------------------------------------------------------------
# The report


def versions() -> list[dict]:
    rows = []
    for name in PACKAGES:
        try:
            rows.append({"package": name, "version": importlib.metadata.version(name)})
        except importlib.metadata.PackageNotFoundError:
            rows.append({"package": name, "version": "not installed"})
    return rows


def build_report(run_dir, ensemble_dir=None, out=None, log=say) -> Path:
    """Write the report of search folder `run_dir` (and its ensemble) to `out`; returns index.html."""
    run_dir = Path(run_dir)
    search = records.load(SearchRecord, run_dir / SEARCH_RECORD,
                          "point --run at a finished search folder (<storage_path>/<name>)")
    if ensemble_dir is None and (run_dir / "ensemble" / ENSEMBLE_MANIFEST).is_file():
        ensemble_dir = run_dir / "ensemble"
    out = Path(out) if out is not None else run_dir / "report"
    with staged_folder(out) as staging:
        _write(run_dir, search, Path(ensemble_dir) if ensemble_dir else None, staging, log)
    log(f"report: {out / 'index.html'}")
    log_stage(run_dir, "report", {"folder": str(out)}, {}, [out], log)
    return out / "index.html"


def _write(run_dir: Path, search: SearchRecord, ensemble_dir: Path | None, out: Path, log) -> None:
    manifest = records.load(EnsembleManifest, ensemble_dir / ENSEMBLE_MANIFEST) if ensemble_dir else None
    cache = Cache(manifest.source.cache if manifest else search.base["data"]["cache"])
    rep = Report(out, f"gitseg report: {search.settings.get('name', run_dir.name)}")
    rep.text(f"Search folder {run_dir.resolve()}" + (f"; ensemble {ensemble_dir.resolve()}" if ensemble_dir else "")
             + ". Scores use the competition metric, kaggle convention: 0.4 x Dice (per slice and class, "
               "both-empty rows skipped) + 0.6 x (1 - Hausdorff) (per case-day and class, unit-cube "
               "coordinates divided by sqrt(3)).")

    note("report: data")
    rep.section("Data")
    rep.text(f"Cache {cache.root.resolve()} ({cache.size} px network input), source {cache.manifest['source']}, "
             f"{cache.manifest['folds']} folds grouped by case; holdout cases are used by the ensemble's final "
             f"evaluation only.")
    rep.table("data_splits", split_summary(cache.manifest), "Case-days, slices, image sizes, empty-slice fraction "
              "and the fraction of slices showing each organ, per split")

    note("report: search")
    rows = search.leaderboard
    rep.section("Search")
    settings = search.settings
    rep.text(f"{len(rows)} trials; ASHA {'on' if settings.get('asha', {}).get('enabled') else 'off'} "
             f"({settings.get('asha')}); {settings.get('workers', {}).get('num_workers')} DDP workers per trial; "
             f"validation fold {settings.get('fold')}.")
    latency = any(r.latency_ms is not None for r in rows)
    rep.table("leaderboard", [{"trial": r.trial_id, "status": r.status, "best score": r.best_score,
                               "best epoch": r.best_epoch or "", "epochs": r.epochs_run,
                               **({"ms/slice": r.latency_ms if r.latency_ms is not None else "",
                                   "Pareto": r.pareto} if latency else {}),
                               "time s": r.time_s, "configuration": r.config} for r in rows],
              "Leaderboard")
    if any(r.history for r in rows):
        rep.figure(learning_curves(rows), "learning_curves", "Validation score of every trial per epoch; "
                   "x marks a trial ASHA stopped early")
        rep.figure(best_so_far(rows), "best_so_far", "Best score found so far, trials in start order")
    if search.anytime:
        budget = search.compute.get("budget_trial_epochs")
        rep.figure(anytime_curve(search.anytime, budget), "anytime", "Best score found so far against the trial-epochs "
                   "spent, epochs in the order they ended: the search's result as a function of its compute"
                   + (f"; the dashed line is the budget ({budget} trial-epochs)" if budget else ""))
    if any(r["spearman"] is not None for r in search.rung_spearman):
        rep.table("rung_spearman", [{"after epoch": r["epoch"], "trials": r["trials"],
                                     "Spearman": "" if r["spearman"] is None else r["spearman"]}
                                    for r in search.rung_spearman],
                  "How well the score after each epoch predicts a trial's best score (Spearman over the trials "
                  "that trained all their epochs): what early stopping's rungs can rely on; near 0, a rung cuts "
                  "trials almost at random")
    if any(r.latency_ms is not None for r in rows):
        rep.text(f"Multi-objective search (objectives {settings.get('objectives')}): each trial measured its "
                 f"network's inference time (ms per slice, TTA {settings.get('refit', {}).get('tta')}, the fused "
                 f"engine on the trial's device); Optuna's multi-objective TPE saw each finished trial's last score "
                 f"and its latency, while early stopping (ASHA) used the score alone. "
                 f"{sum(r.pareto for r in rows)} trial(s) are on the front; the refit took "
                 f"{'the front' if settings.get('refit', {}).get('select') == 'pareto' else 'the top-k by score'}.")
        rep.figure(search_front(rows), "search_front", "Best validation score against measured inference latency; "
                   "the line joins the Pareto-optimal trials")
    fig, effects = parameter_effects(rows)
    if fig is not None:
        rep.figure(fig, "parameter_effects", "Score by hyperparameter (bars: best, dots: mean; numeric "
                   "parameters as scatter)")
        rep.table("parameter_effects", effects, "Score by value of each categorical hyperparameter")
    failed = [{"trial": r.trial_id, "configuration": r.config, "error": r.error}
              for r in rows if r.status == "failed"]
    rep.table("failed_trials", failed, "Failed trials and why")

    refit_path = run_dir / REFIT_RECORD
    if refit_path.is_file():
        note("report: cross-validation")
        refit = records.load(RefitRecord, refit_path)
        rep.section("Cross-validation of the refit configurations")
        oof = {c.name: c.oof_score for c in manifest.selection.configurations} if manifest else {}
        table = []
        for rank in sorted({m.rank for m in refit.models}):
            ms = [m for m in refit.models if m.rank == rank]
            row = {"configuration": f"rank{rank}", "trial": ms[0].trial_id}
            for m in sorted(ms, key=lambda m: m.fold):
                row[f"fold {m.fold}"] = m.score if m.score is not None else f"failed: {m.error}"
            scores = [m.score for m in ms if m.score is not None]
            row["mean of folds"] = float(np.mean(scores)) if scores else math.nan
            row["pooled OOF score"] = oof.get(f"rank{rank}", math.nan)
            row["values"] = " ".join(f"{k}={label(v)}" for k, v in ms[0].values.items())
            table.append(row)
        rep.table("cross_validation", table, "Validation score per fold (best epoch) and the score of the "
                  "pooled out-of-fold probabilities at threshold 0.5")

    if manifest:
        _ensemble_sections(rep, manifest, ensemble_dir, cache, log)

    rep.section("Reproducibility")
    rep.table("versions", versions(), "Versions")
    machine = to_dict(manifest.machine) if manifest and manifest.machine else {}
    rep.table("machine", [{"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), **{f"ensemble {k}": v for k, v in machine.items()}}], "Machine")
    timings = []
    for r in rows:
        if not math.isnan(r.time_s):
            timings.append({"stage": f"trial {r.trial_id}", "seconds": r.time_s})
    if manifest:
        timings += [{"stage": f"ensemble {k}", "seconds": v} for k, v in manifest.timings.items()]
    demo_timings = run_dir / "timings.json"
    if demo_timings.is_file():
        timings += [{"stage": k, "seconds": v} for k, v in json.loads(demo_timings.read_text()).items()]
    rep.table("timings", timings, "Timings")
    rep.text("Search settings: " + json.dumps(settings, default=str))
    rep.text("Base configuration: " + json.dumps(search.base, default=str))
    rep.write()


def _ensemble_sections(rep: Report, manifest: EnsembleManifest, ensemble_dir: Path, cache: Cache, log) -> None:
    note("report: ensemble")
    rep.section("Ensemble")
    sel = manifest.selection
    rep.text(f"Selection: {sel.method}: {sel.why}. TTA: {manifest.tta}.")
    rep.table("selection", [{"configuration": c.name, "trial": c.trial_id, "OOF score": c.oof_score,
                             "selected": c.selected, "weight": c.weight,
                             "values": " ".join(f"{k}={label(v)}" for k, v in c.values.items())}
                            for c in sel.configurations], "Refit configurations and the selection")
    rep.text("Selection log: " + " | ".join(sel.log))
    _latency_section(rep, manifest)
    post = manifest.postprocess
    rep.table("postprocess", [{"class": cls, "threshold": post["thresholds"][c], "min component voxels":
                               post["min_size"][c], "min pixels per slice": post["min_pixels"][c],
                               "gate threshold": post.get("gate", [0.0] * len(CLASSES))[c]}
                              for c, cls in enumerate(CLASSES)], "Post-processing tuned on out-of-fold predictions "
              "(0: the step is off; the gate needs models with a gate head)")
    rep.table("tuning_steps", [{"step": s["step"], "OOF before": s["before"], "OOF after": s["after"],
                                "kept": s["kept"], "values": str(s["values"])}
                               for s in manifest.scores.oof.tuning_steps],
              "Tuning steps (a step is kept only if it raises the OOF score and lowers no class's by more "
              "than 0.001)")
    holdout = manifest.scores.holdout
    if not holdout:
        rep.text("No holdout evaluation (the cache has no holdout cases).")
        return
    rep.section("Holdout evaluation")
    cases = {cache.entries[cd]["case"] for cd in holdout.case_days}
    rep.text(f"{len(holdout.case_days)} holdout case-days from {len(cases)} "
             f"cases, never used for training, selection or tuning. Best single fold model: "
             f"{holdout.best_single_fold_model}; best single configuration: {holdout.best_single_configuration}.")
    rep.table("ablation", [to_dict(r) for r in holdout.ablation], "Ablation on the holdout (gain: over the variant in "
              "gain_over)")
    score = {r.variant: r.score for r in holdout.ablation}
    final = holdout.final
    if TUNED_CONFIGURATION in score:
        rep.text(f"What the ensemble adds: {score[final] - score[TUNED_CONFIGURATION]:+.4f}, the ensemble as built "
                 f"({score[final]:.4f}, post-processing tuned on its out-of-fold predictions) against the best single "
                 f"configuration with TTA and post-processing tuned on its own out-of-fold predictions "
                 f"({score[TUNED_CONFIGURATION]:.4f})" + _interval(holdout.ensemble_gain) + "; against the best "
                 f"single fold model tuned the same way: "
                 f"{score[final] - score[TUNED_SINGLE]:+.4f}. At threshold 0.5 with the same TTA, the ensemble against "
                 f"the best single configuration: {score[WITH_TTA] - score[CONFIGURATION]:+.4f}.")
    if GATE_OFF[0] in score:
        rep.text(f"What the empty-slice gate adds: {score[final] - score[GATE_OFF[0]]:+.4f} (the ensemble as built "
                 f"against the same post-processing with the gate rule off).")
    tuned = manifest.scores.oof.tuned
    if tuned:
        per_class = {r.organ: r.score for r in holdout.per_class}
        rep.table("optimism", [{"class": cls, "oof_tuned_on": tuned[f"score/{cls}"], "holdout": per_class[cls],
                                "holdout_minus_oof": per_class[cls] - tuned[f"score/{cls}"]}
                               for cls in per_class] + [{"class": "all", "oof_tuned_on": tuned["score"],
                                                     "holdout": holdout.score,
                                                     "holdout_minus_oof": holdout.score - tuned["score"]}],
                  "Optimism of selection and tuning: the ensemble's score on the out-of-fold predictions it was "
                  "selected and tuned on, against the holdout")
    evaluation = records.load(Evaluation, ensemble_dir / EVALUATION)
    final_rows = evaluation.rows[holdout.final]
    rep.table("holdout_per_class", [to_dict(r) for r in holdout.per_class], "Per class: competition terms, 3D Dice, "
              "HD95 and ASSD in mm "
              "(volumes where both masks are non-empty; missed_or_spurious: one of them empty)")
    rep.table("holdout_bootstrap", bootstrap_by_case(final_rows, evaluation.clinical),
              f"95% bootstrap intervals over holdout cases ({BOOTSTRAP} resamples)")
    per_case = per_case_table(final_rows)
    rep.table("holdout_per_case", per_case, "Per case-day, worst first")
    _overlays(rep, manifest, ensemble_dir, cache, per_case)
    _review_section(rep, holdout.review, evaluation, per_case, ensemble_dir, cache)
    _robustness_section(rep, ensemble_dir)


def _review_section(rep: Report, review: dict | None, evaluation: Evaluation, per_case: list[dict],
                    ensemble_dir: Path, cache: Cache) -> None:
    """The review list on the holdout: how well the members' disagreement finds the errors, the
    case-days and slices it would send a reviewer to first, and the most disputed slice drawn."""
    import cv2  # heavy: loaded where an image is resized

    if not review or not evaluation.review:
        return
    rep.section("Review list")
    rep.text("Where the ensemble's members disagree is where `gitseg predict` sends a reviewer first (review.csv "
             "and review_slices.csv beside the submission, review.txt beside rtstruct.dcm): each member votes at "
             "the ensemble's thresholds; a case-day's disagreement is 1 - the members' pooled pairwise Dice, "
             "a slice's the area some members mark and others do not. On this holdout, "
             + review_summary(review) + ".")
    reviews = {r["case_day"]: r for r in evaluation.review}
    true = {r["case_day"]: r["score"] for r in per_case}
    worst = set(review["worst_case_days"])
    order = review_order(reviews)
    by_score = sorted(true, key=lambda cd: (true[cd], cd))
    rep.table("review", [{"review rank": i + 1, "case_day": cd, "disagreement": reviews[cd]["disagreement"],
                          "holdout score": true[cd], "score rank (worst 1)": by_score.index(cd) + 1,
                          "worst quarter": cd in worst,
                          "slices to review": " ".join(str(z + 1) for z in top_slices(reviews[cd], 5))}
                         for i, cd in enumerate(order)], "Holdout case-days in the order the review list gives them "
              "(most disagreement first), with their true score")
    rep.figure(review_scatter([reviews[cd]["disagreement"] for cd in order], [true[cd] for cd in order],
                              [cd in worst for cd in order], review["auroc_worst_quarter"]),
               "review_scatter", "Disagreement against the true score per holdout case-day")
    case_day = order[0]
    z = (top_slices(reviews[case_day], 1) or [0])[0]
    model = EnsembleModel.load(ensemble_dir)
    entry = cache.entries[case_day]
    out_size = (entry["height"], entry["width"])
    votes = Votes(model.post.thresholds, (entry["slices"], *out_size))
    probs, gate = model.predict({cache.size: cache.image(case_day)}, out_size, votes=votes)
    pred, gt = apply(probs, model.post, gate), cache.original_masks(case_day)
    image = cv2.resize(np.asarray(cache.image(case_day)[z], np.float32), (out_size[1], out_size[0]))
    shade = disputed(votes.counts[:, z], votes.members).any(axis=0)
    rep.figure(overlay(image, gt[:, z], pred[:, z], f"{case_day}, slice {z + 1}: the most disputed", shade),
               "review_overlay", f"The first slice the review list names: {case_day} (the most disagreement), slice "
               f"{z + 1} ({reviews[case_day]['slice_disputed_mm2'][z]:.0f} mm2 disputed, yellow); truth solid, "
               f"prediction dashed")


def _robustness_section(rep: Report, ensemble_dir: Path) -> None:
    """The holdout under MRI corruptions, when `gitseg robustness` has run on this ensemble."""
    path = ensemble_dir / "robustness" / "robustness.json"
    if not path.is_file():
        return
    result = json.loads(path.read_text())
    rep.section("Robustness")
    rep.text(f"The holdout ({len(result['holdout_case_days'])} case-days, {result['cases']} cases) under MRI "
             f"corruptions from TorchIO, 3 severities each (seed {result['seed']}); clean score "
             f"{result['clean_score']:.4f}. Drop: the corrupted score minus the clean one, with a 95% paired bootstrap "
             f"interval over cases. Scores per image size and spacing group stand in for scanners.")
    rep.table("robustness", result["table"], "Score per corruption and severity")
    figure = ensemble_dir / "robustness" / "figures" / "robustness.png"
    if figure.is_file():
        rep.image(figure, "robustness", "Holdout score against severity, per corruption")


def _interval(gain: Gain | None) -> str:
    if not gain:
        return ""
    lo, hi = gain.ci95
    return (f", 95% interval [{lo:+.4f}, {hi:+.4f}] from a paired bootstrap over the {gain.cases} holdout cases "
            f"({gain.resamples} resamples; share of resamples with no gain: {gain.p_gain_not_positive:.2f}"
            + (f"; with only {gain.cases} cases the interval says little: hold out more cases"
               if gain.cases < FEW_CASES else "") + ")")


def _latency_section(rep: Report, manifest: EnsembleManifest) -> None:
    lat = manifest.latency
    if not lat:
        return
    rep.text(f"Latency: each fold model timed on {lat.device} ({lat.timed_slices} slices, the fused "
             f"inference engine, back to the original size; median of 3 runs). The ensemble built: "
             f"{lat.ensemble_ms_per_slice:.2f} ms per slice, OOF score {lat.ensemble_oof_score:.4f} with "
             f"per-class thresholds tuned on it, as every candidate is scored"
             + (f"; chosen within a budget of {lat.budget_ms_per_slice:g} ms per slice"
                if lat.budget_ms_per_slice else "") + ".")
    rep.figure(latency_front(lat.candidates, (lat.ensemble_ms_per_slice, lat.ensemble_oof_score),
                             lat.budget_ms_per_slice, lat.device),
               "latency_front", "Candidate ensembles (configurations, fold models per configuration, TTA): OOF score "
               "against measured latency. A candidate's OOF score does not depend on its number of folds (each OOF "
               "prediction comes from one fold model), so the front climbs in steps of equal score as folds are added")
    rep.table("latency_front", [{"configurations": "+".join(c.configurations), "folds": c.folds, "tta": c.tta,
                                 "OOF score": c.oof_score, "ms per slice": c.ms_per_slice}
                                for c in sorted(lat.candidates, key=lambda c: c.ms_per_slice) if c.on_front],
              "The latency front, cheapest first")


def _overlays(rep: Report, manifest: EnsembleManifest, ensemble_dir: Path, cache: Cache, per_case: list[dict]) -> None:
    """Best and worst slices of the best and worst holdout case-days, predicted again by the ensemble."""
    import cv2  # heavy: loaded where an image is resized

    if not per_case:
        return
    model = EnsembleModel.load(ensemble_dir)
    picks = [("worst", per_case[0]["case_day"]), ("best", per_case[-1]["case_day"])]
    rep.section("Overlays")
    rep.text("Scan with ground truth (solid) and prediction (dashed) contours; red large bowel, green small "
             "bowel, blue stomach.")
    for which, case_day in picks:
        entry = cache.entries[case_day]
        out_size = (entry["height"], entry["width"])
        probs, gate = model.predict({cache.size: cache.image(case_day)}, out_size)
        pred = apply(probs, model.post, gate)
        gt = cache.original_masks(case_day)
        per_class = np.stack([dice_per_slice(pred[c], gt[c]) for c in range(3)])  # (3, D), NaN: both empty
        counted = (~np.isnan(per_class)).sum(axis=0)
        dice = np.where(counted > 0, np.nansum(per_class, axis=0) / np.maximum(counted, 1), np.nan)
        scored = np.flatnonzero(counted > 0)
        if not len(scored):
            continue
        area = gt.sum(axis=(0, 2, 3))
        if which == "worst":
            z = int(scored[np.argmin(dice[scored])])
        else:
            z = int(scored[np.argmax(dice[scored] + 1e-6 * area[scored])])
        image = cv2.resize(np.asarray(cache.image(case_day)[z], np.float32), (out_size[1], out_size[0]))
        title = f"{which} case-day {case_day}, slice {z + 1}, Dice {dice[z]:.3f}"
        rep.figure(overlay(image, gt[:, z], pred[:, z], title),
                   f"overlay_{which}", f"{which.capitalize()} holdout case-day {case_day}: its "
                   f"{'worst' if which == 'worst' else 'best'} slice ({z + 1}), mean Dice over classes {dice[z]:.3f}")
