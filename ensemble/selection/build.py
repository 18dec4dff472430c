"""`gitseg ensemble`: select refit configurations, tune post-processing on OOF, evaluate on the holdout.

The phases, each deciding on data the next one never sees (`_build` runs them in this order and
the manifest keeps each one's seconds and peak memory):
1. `cv_scores`: the cross-validated (OOF) score of every refit configuration;
2. `latency_front`: each fold model's inference time measured on this machine's device, and the
   OOF score of candidate ensembles (latency.py);
3. `selection`: top-k by OOF score, greedy forward selection on the OOF ensemble, or the best
   candidate of the front within --latency-budget;
4. `tuning`: thresholds, minimum component size and the empty-slice rule, tuned on the selected
   ensemble's OOF probabilities, with and without TTA; `ablation_tuning`: the same for each
   reference model of the holdout ablation, on its own OOF;
5. the folder, staged and moved in only when complete; `holdout`: the holdout cases, touched
   only here, for the final numbers and the ablation (evaluate.py).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time
from pathlib import Path

from ensemble.model import EnsembleModel, member_from_checkpoint, sha256
from ensemble.predict.input_checks import training_data
from ensemble.selection.evaluate import (
    FINAL,
    TUNED_CONFIGURATION,
    TUNED_NO_TTA,
    TUNED_SINGLE,
    best_single_configuration,
    best_single_fold,
    holdout_ablation,
    write_holdout_files,
)
from ensemble.selection.latency import (
    Candidate,
    candidate_scores,
    candidates,
    choose_under_budget,
    configuration_sets,
    folds_by_score,
    measure_members,
    member_ms,
    pareto_front,
    stop_where_oof_stops_rising,
)
from ensemble.selection.members import (
    Configuration,
    RefitRun,
    load_refit,
    oof_score,
    oof_volumes,
    select_greedy,
    select_topk,
)
from ensemble.selection.postprocess import PostProcess, scores_with, tune
from gitseg import __version__, records
from gitseg.checkpoint import default_device
from gitseg.data.cache import Cache
from gitseg.data.uwmgi import CLASSES
from gitseg.files import folder_lock, staged_folder
from gitseg.infer import TIMED_SLICES, TTA_SETS, device_name
from gitseg.oof import NO_TTA, oof_tta_sets
from gitseg.phases import Phases
from gitseg.progress import note, say
from gitseg.records import (
    ENSEMBLE_MANIFEST,
    KAGGLE_METRIC,
    MANIFEST_FORMAT,
    ConfigurationRow,
    EnsembleManifest,
    EnsembleScores,
    Latency,
    Machine,
    MemberLatency,
    OofScores,
    Preprocessing,
    Selection,
    Source,
    Tuned,
)
from gitseg.tracking import ensemble_figures, log_stage

METHODS = ("topk", "greedy")


def build_ensemble(run_dir, topk: int = 5, out=None, tta: str | None = None, method: str = "topk",
                   cache_dir=None, latency_budget: float | None = None, log=say) -> EnsembleManifest:
    """Build the ensemble folder `out` (default `<run_dir>/ensemble`); returns its manifest.

    `latency_budget` (ms per slice on this machine's device) replaces `method`: the ensemble is
    the best candidate of the latency front within the budget (ensemble/selection/latency.py). A second
    `gitseg ensemble` into the same folder while this one runs refuses, naming this one.
    """
    out = Path(out) if out is not None else Path(run_dir) / "ensemble"
    with folder_lock(out, "gitseg ensemble"):
        manifest = _build(run_dir, topk, out, tta, method, cache_dir, latency_budget, log)
    log_stage(run_dir, "ensemble", {"method": method if latency_budget is None else "latency budget", "topk": topk,
                                    "tta": manifest.tta, "folder": str(out)},
              ensemble_figures(manifest), [out / ENSEMBLE_MANIFEST, out / "evaluation.json"], log)
    return manifest


def _build(run_dir, topk: int, out: Path, tta: str | None, method: str, cache_dir, latency_budget: float | None,
           log) -> EnsembleManifest:
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    if latency_budget is not None and not latency_budget > 0:
        raise ValueError(f"--latency-budget must be a positive number of ms per slice (got {latency_budget})")
    phases = Phases()
    with phases("cv_scores"):
        run = load_refit(Path(run_dir))
        asked_tta, tta = tta, _ensemble_tta(tta, run, log)
        cache = Cache(cache_dir or run.search.base["data"]["cache"])
        score_configurations(run.configurations, cache, log)
    device = default_device()
    with phases("latency_front"):
        front = latency_front(run, cache, tta, asked_tta, latency_budget, device, log)
    with phases("selection"):
        choice = select(run.configurations, front, cache, topk, method, tta, run.refit.tta, latency_budget, device,
                        log)
    tunings = OofTunings(cache, run.refit.tta)
    with phases("tuning"):
        ensemble_oof = tune_ensemble(tunings, choice, run.refit.tta, log)
    with phases("ablation_tuning"):
        oof, posts = tune_references(tunings, run.configurations, choice, ensemble_oof)

    with staged_folder(out) as staging:  # moved to `out` only when complete
        manifest = write_folder(staging, run, cache, choice, front, oof, ensemble_oof.chosen(choice.tta)[0], topk,
                                latency_budget, device)
        with phases("holdout"):
            if cache.case_days(holdout=True):
                holdout, evaluation = holdout_ablation(EnsembleModel.load(staging), cache, run.configurations,
                                                       run.refit.tta, posts, log)
                manifest.scores.holdout = holdout
                write_holdout_files(staging, holdout, evaluation)
            else:
                log("ensemble: the cache has no holdout case-days; no holdout evaluation (prepare with --holdout > 0)")
        manifest.timings = phases.timings()
        manifest.peak_memory_gib = phases.peak_gib
        manifest.machine = Machine(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count())
        records.save(manifest, staging / ENSEMBLE_MANIFEST)
    log(f"ensemble: wrote {out} ({len(manifest.members)} models)")
    return manifest


def _ensemble_tta(tta: str | None, run: RefitRun, log) -> str:
    """The ensemble's TTA: the one asked for, or the refit's. First says the refit's problems and
    refuses a run with no configuration that has every fold."""
    for p in run.problems:
        log(f"ensemble: {p}")
    if not run.configurations:
        raise ValueError(f"no refit configuration in {run.root} has a model for every fold; see the problems above")
    tta = tta or run.refit.tta
    if tta not in TTA_SETS:
        raise ValueError(f"unknown TTA {tta!r}; choose one of {', '.join(TTA_SETS)}")
    if tta not in oof_tta_sets(run.refit.tta):
        log(f"ensemble: note: OOF probabilities were made with TTA {run.refit.tta!r} (and without), the ensemble "
            f"uses {tta!r}; its post-processing is tuned on the {run.refit.tta!r} ones")
    return tta


def score_configurations(configs: list[Configuration], cache: Cache, log) -> None:
    """Phase 1: each configuration's cross-validated score, from its pooled OOF probabilities."""
    for conf in configs:
        conf.cv_score = oof_score([conf], [1.0], cache)
        log(f"ensemble: {conf.name} ({conf.trial_id}) OOF score {conf.cv_score:.4f} over "
            f"{len(cache.case_days())} case-days")


@dataclasses.dataclass
class Front:
    """Phase 2's result: every member's measured time and every candidate ensemble's OOF score."""

    latency: list[MemberLatency]
    candidates: list[Candidate]
    front: list[Candidate]


def latency_front(run: RefitRun, cache: Cache, tta: str, asked_tta: str | None, latency_budget: float | None,
                  device, log) -> Front:
    """Phase 2: every member timed, every candidate ensemble scored on OOF."""
    oof_ttas = oof_tta_sets(run.refit.tta)
    sets = configuration_sets(run.configurations)
    timed = sorted({c.name: c for s in sets for c in s}.values(), key=lambda c: c.rank)
    latency = measure_members(timed, list(dict.fromkeys([*oof_ttas, tta])), cache, device, log)
    scored_ttas = [asked_tta] if latency_budget is not None and asked_tta in oof_ttas else list(oof_ttas)
    cands = candidates(sets, candidate_scores(sets, scored_ttas, cache), latency)
    return Front(latency, cands, pareto_front(cands))


@dataclasses.dataclass
class Choice:
    """Phase 3's result: the configurations, their weights and fold models, the TTA, and why."""

    configurations: list[Configuration]
    weights: list[float]
    folds: dict[str, list[int]]  # configuration -> the folds whose models are members
    tta: str
    method: str
    why: str
    log: list[str]
    oof_score: float = float("nan")  # at threshold 0.5, on the OOF the ensemble is tuned on
    ms_per_slice: float = float("nan")

    @property
    def members(self) -> int:
        return sum(len(self.folds[c.name]) for c in self.configurations)


def select(configs: list[Configuration], front: Front, cache: Cache, topk: int, method: str, tta: str, refit_tta: str,
           latency_budget: float | None, device, log) -> Choice:
    """Phase 3: top-k, greedy, or the best candidate of the front within the latency budget."""
    folds = {c.name: sorted(c.folds) for c in configs}
    if latency_budget is not None:
        pick = choose_under_budget(front.candidates, latency_budget)
        by_name = {c.name: c for c in configs}
        chosen = [by_name[n] for n in pick.configurations]
        choice = Choice(chosen, [1.0] * len(chosen), {c.name: sorted(folds_by_score(c)[: pick.folds]) for c in chosen},
                        pick.tta, "latency-budget",
                        f"the best candidate of the latency front within {latency_budget:g} ms per slice on "
                        f"{device_name(device)}: {pick.label()}, {pick.ms_per_slice:.2f} ms per slice",
                        [f"front: {c.label()}: OOF {c.oof_score:.4f}, {c.ms_per_slice:.2f} ms per slice"
                         for c in front.front])
    elif method == "topk":
        chosen, weights, lines = select_topk(configs, topk)
        why = f"the {len(chosen)} configuration(s) with the best OOF score (--topk {topk})"
        # Never more configurations than the OOF says help: the top k stop where the score stops rising.
        keep, path = stop_where_oof_stops_rising(chosen, front.candidates, tta if tta in {
            c.tta for c in front.candidates} else refit_tta)
        if keep < len(chosen):
            shown = ", ".join(f"top {n} {score:.4f}" for n, score in path)
            lines.append(f"the top {len(chosen)} score lower on OOF than the top {keep} (thresholds tuned: {shown}): "
                         f"the ensemble keeps {keep} configuration(s)")
            why = (f"the {keep} configuration(s) with the best OOF score: --topk {topk} asked for {len(chosen)}, "
                   f"but adding configurations past {keep} lowered the OOF score ({shown})")
            chosen, weights = chosen[:keep], weights[:keep]
        choice = Choice(chosen, weights, folds, tta, method, why, lines)
    else:
        chosen, weights, lines = select_greedy(configs, topk, lambda c, w: oof_score(c, w, cache))
        choice = Choice(chosen, weights, folds, tta, method,
                        f"greedy forward selection on the OOF ensemble score, at most {topk} additions with "
                        f"replacement; weights are how often each configuration was added", lines)
    for line in choice.log:
        log(f"ensemble: {line}")
    own = choice.tta if choice.tta in oof_tta_sets(refit_tta) else None  # the OOF it is tuned on (None: the refit's)
    choice.oof_score = oof_score(choice.configurations, choice.weights, cache, tta=own)
    ms = member_ms(front.latency)
    choice.ms_per_slice = sum(ms[(c.name, f, choice.tta)] for c in choice.configurations for f in choice.folds[c.name])
    log(f"ensemble: {choice.members} fold models, TTA {choice.tta}: OOF score {choice.oof_score:.4f} at threshold "
        f"0.5, {choice.ms_per_slice:.2f} ms per slice on {device_name(device)}")
    return choice


class OofTunings:
    """Post-processing tuned once per OOF source: a greedy ensemble of one configuration is also the
    best single configuration, and with a TTA-free refit both TTA views of the ensemble are one."""

    def __init__(self, cache: Cache, refit_tta: str):
        self.cache, self.refit_tta = cache, refit_tta
        self.done: dict[tuple, tuple[PostProcess, list[dict]]] = {}

    def tuned(self, configs, weights, oof_tta=None, folds=None, log=note) -> tuple[PostProcess, list[dict]]:
        total = float(sum(weights))
        key = (tuple(sorted((c.name, w / total) for c, w in zip(configs, weights))), tuple(folds or ()),
               self.refit_tta if oof_tta is None else oof_tta)
        if key not in self.done:
            self.done[key] = tune(oof_volumes(configs, weights, self.cache, folds=folds, tta=oof_tta), log=log)
        return self.done[key]


@dataclasses.dataclass
class EnsembleOof:
    """Phase 4's result: the ensemble's post-processing with and without TTA, tuned on its OOF."""

    no_tta: tuple[PostProcess, list[dict]]
    with_tta: tuple[PostProcess, list[dict]]
    with_tta_source: str         # the OOF the "with TTA" tuning read
    own: str | None              # the OOF of the ensemble's own TTA (None: the refit's)

    def chosen(self, tta: str) -> tuple[PostProcess, list[dict]]:
        return self.no_tta if tta == NO_TTA else self.with_tta


def tune_ensemble(tunings: OofTunings, choice: Choice, refit_tta: str, log) -> EnsembleOof:
    """Phase 4: thresholds, minimum sizes and the empty-slice rule on the selected ensemble's OOF,
    without TTA and with it (the ablation's two ensemble rows); the ensemble's own TTA is shown."""
    own = choice.tta if choice.tta in oof_tta_sets(refit_tta) else None
    with_tta_source = own if choice.tta != NO_TTA else refit_tta
    shown = {True: log, False: note}
    no_tta = tunings.tuned(choice.configurations, choice.weights, NO_TTA, log=shown[choice.tta == NO_TTA])
    with_tta = tunings.tuned(choice.configurations, choice.weights, with_tta_source, log=shown[choice.tta != NO_TTA])
    return EnsembleOof(no_tta, with_tta, with_tta_source or refit_tta, own)


def tune_references(tunings: OofTunings, configs: list[Configuration], choice: Choice,
                    ensemble: EnsembleOof) -> tuple[OofScores, dict[str, PostProcess]]:
    """The ablation's reference models (the best single fold model on its validation fold, the
    best single configuration), each tuned on its own OOF; returns the manifest's OOF figures and
    the post-processing of each tuned variant of the holdout ablation."""
    single_conf, single_fold = best_single_fold(configs)
    single_post, single_steps = tunings.tuned([single_conf], [1.0], folds=[single_fold.fold])
    best_conf = best_single_configuration(configs)
    conf_post, conf_steps = tunings.tuned([best_conf], [1.0])
    post, steps = ensemble.chosen(choice.tta)
    # What tuning reached on the OOF data it was tuned on, per class: the holdout shows how much of
    # it was the optimism of selecting and tuning on the same predictions.
    oof_tuned = scores_with(oof_volumes(choice.configurations, choice.weights, tunings.cache, tta=ensemble.own), post)
    oof = OofScores(
        selected_at_half=choice.oof_score, tuning_steps=steps, case_days=len(tunings.cache.case_days()),
        tuned=oof_tuned,
        best_single_fold_model=Tuned(single_post.to_dict(), single_steps, model=f"{single_conf.name} fold "
                                                                               f"{single_fold.fold}"),
        best_single_configuration=Tuned(conf_post.to_dict(), conf_steps, model=best_conf.name),
        ensemble_no_tta=Tuned(ensemble.no_tta[0].to_dict(), ensemble.no_tta[1]),
        ensemble_with_tta=Tuned(ensemble.with_tta[0].to_dict(), ensemble.with_tta[1], tta=ensemble.with_tta_source))
    posts = {TUNED_SINGLE: single_post, TUNED_CONFIGURATION: conf_post, TUNED_NO_TTA: ensemble.no_tta[0],
             FINAL: ensemble.with_tta[0]}
    return oof, posts


def write_folder(staging: Path, run: RefitRun, cache: Cache, choice: Choice, front: Front, oof: OofScores,
                 post: PostProcess, topk: int, latency_budget: float | None, device) -> EnsembleManifest:
    """Phase 5: the members' checkpoints and the manifest (with `post`, the ensemble's own
    post-processing), into the staged folder."""
    (staging / "models").mkdir()
    members = []
    for conf, weight in zip(choice.configurations, choice.weights):
        for fold in choice.folds[conf.name]:
            file = f"models/{conf.name}_fold{fold}.pt"
            shutil.copy2(conf.folds[fold].checkpoint, staging / file)
            member = member_from_checkpoint(staging / file, file, weight, conf.name)
            member.sha256 = sha256(staging / file)
            members.append(member)
    chosen = {c.name: w for c, w in zip(choice.configurations, choice.weights)}
    manifest = EnsembleManifest(
        format=MANIFEST_FORMAT, gitseg_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        source=Source(run=str(run.root.resolve()), cache=str(cache.root.resolve())),
        members=members,
        tta=choice.tta,
        postprocess=post.to_dict(),
        preprocessing=Preprocessing(sizes=sorted({m.size for m in members}),
                                    normalisation=cache.manifest["normalisation"], classes=list(CLASSES),
                                    windows=[list(w) for w in sorted({(m.channels, m.stride) for m in members})]),
        metric=KAGGLE_METRIC,
        selection=Selection(method=choice.method, topk=topk, why=choice.why, log=choice.log,
                            latency_budget=latency_budget, problems=run.problems,
                            configurations=[ConfigurationRow(
                                name=c.name, trial_id=c.trial_id, values=c.values, oof_score=c.cv_score,
                                fold_scores={str(f): m.score for f, m in sorted(c.folds.items())},
                                selected=c.name in chosen, weight=chosen.get(c.name, 0.0))
                                for c in run.configurations]),
        scores=EnsembleScores(oof=oof),
        latency=Latency(device=device_name(device), timed_slices=TIMED_SLICES, members=front.latency,
                        ensemble_ms_per_slice=choice.ms_per_slice,
                        ensemble_oof_score=oof.tuning_steps[0]["after"], budget_ms_per_slice=latency_budget,
                        candidates=[c.row(c in front.front) for c in front.candidates]),
        timings={},
        training_data=training_data(cache, cache.case_days()),
    )
    records.save(manifest, staging / ENSEMBLE_MANIFEST)
    return manifest
