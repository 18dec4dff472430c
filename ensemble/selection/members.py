"""The refit's fold models as ensemble candidates: loading, out-of-fold assembly, selection.

A *configuration* is one refit search configuration with one model per fold. Its out-of-fold
(OOF) probabilities for a case-day come from the one fold model that did not train on it: the
model of the fold the cache manifest assigns to the case. Nothing here reads another fold's
files, and holdout case-days have no OOF at all.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np

from ensemble.selection.postprocess import threshold_sums
from gitseg import records
from gitseg.data.cache import Cache
from gitseg.data.uwmgi import CLASSES
from gitseg.metrics import class_scores, sum_rows
from gitseg.oof import load_gate, load_oof
from gitseg.records import REFIT_RECORD, SEARCH_RECORD, RefitRecord, SearchRecord


@dataclasses.dataclass
class FoldModel:
    fold: int
    checkpoint: Path
    oof: Path                 # folder of <case_day>.npy, the fold's validation case-days
    score: float              # the fold's validation score at its best epoch


@dataclasses.dataclass
class Configuration:
    rank: int                 # position on the search leaderboard (0 = best search trial)
    trial_id: str
    values: dict              # the searched values of this configuration
    folds: dict[int, FoldModel]
    cv_score: float = math.nan  # competition score of its pooled OOF probabilities at threshold 0.5
    tta: str | None = None      # the refit's TTA (its OOF also has "none"; gitseg.oof)

    @property
    def name(self) -> str:
        return f"rank{self.rank}"


def _local(path: str) -> Path:
    if "://" in str(path):
        raise ValueError(f"{path} is on remote storage; copy the search folder to this machine (e.g. "
                         f"`aws s3 sync`) and point --run at the copy")
    return Path(path)


@dataclasses.dataclass
class RefitRun:
    """A finished search folder as the ensemble sees it."""

    search: SearchRecord
    refit: RefitRecord
    configurations: list[Configuration]  # those with a model for every fold
    problems: list[str]                  # failed refits, and configurations left out for them
    root: Path                           # the search folder


def load_refit(run_dir) -> RefitRun:
    """The search and refit records of `run_dir` and its refit configurations with every fold."""
    run_dir = Path(run_dir)
    advice = ("point --run at the folder of a finished search with its refit (<storage_path>/<name>, holding "
              f"{SEARCH_RECORD} and {REFIT_RECORD}; run `gitseg search --config ...` with refit.topk > 0)")
    search = records.load(SearchRecord, run_dir / SEARCH_RECORD, advice)
    refit = records.load(RefitRecord, run_dir / REFIT_RECORD, advice)
    configurations, problems = configurations_of(refit)
    return RefitRun(search, refit, configurations, problems, run_dir)


def configurations_of(refit: RefitRecord) -> tuple[list[Configuration], list[str]]:
    """The configurations of a refit record with a model for every fold, and the problems found.

    A configuration missing a fold (its refit failed) cannot give OOF for every case, so it is left
    out and named among the problems.
    """
    by_rank: dict[int, Configuration] = {}
    problems = []
    for entry in refit.models:
        conf = by_rank.setdefault(entry.rank, Configuration(entry.rank, entry.trial_id, entry.values, {},
                                                            tta=refit.tta))
        if entry.error or not entry.checkpoint:
            problems.append(f"rank{entry.rank} fold {entry.fold}: refit failed ({entry.error})")
            continue
        conf.folds[entry.fold] = FoldModel(entry.fold, _local(entry.checkpoint), _local(entry.oof),
                                           float(entry.score))
    configurations = []
    for conf in sorted(by_rank.values(), key=lambda c: c.rank):
        missing = [f for f in refit.folds if f not in conf.folds]
        if missing:
            problems.append(f"{conf.name} ({conf.trial_id}) left out: no model for fold(s) {missing}")
        else:
            configurations.append(conf)
    return configurations, problems


def oof_probs(configs: list[Configuration], weights: list[float], case_day: str, cache: Cache,
              tta: str | None = None) -> np.ndarray:
    """Weighted mean OOF probabilities float32 `(3, D, H, W)` of one non-holdout case-day, with the
    refit's TTA (`tta` None) or "none"."""
    entry = cache.entries[case_day]
    if entry["holdout"]:
        raise ValueError(f"{case_day} is a holdout case-day: it has no out-of-fold probabilities")
    fold = entry["fold"]  # the manifest's split, never recomputed
    total = None
    for conf, weight in zip(configs, weights):
        try:
            probs = load_oof(conf.folds[fold].oof, case_day, tta, conf.tta) * weight
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{conf.name} fold {fold}: {exc}") from None
        total = probs if total is None else total + probs
    return total / float(sum(weights))


def oof_gate(configs: list[Configuration], weights: list[float], case_day: str, cache: Cache,
             tta: str | None = None) -> np.ndarray | None:
    """Weighted mean OOF gate probabilities float32 `(3, D)` of one case-day, averaged like the masks;
    None unless every configuration's models have a gate head."""
    fold = cache.entries[case_day]["fold"]
    gates = [load_gate(conf.folds[fold].oof, case_day, tta, conf.tta) for conf in configs]
    if any(g is None for g in gates):
        return None
    return sum(w * g for w, g in zip(weights, gates)) / float(sum(weights))


def oof_volumes(configs, weights, cache: Cache, folds: list[int] | None = None, tta: str | None = None) -> Callable:
    """A loader for `postprocess.tune`: yields (OOF probabilities, ground truth, gate probabilities or
    None) per case-day of `folds` (default: every fold), with the refit's TTA (`tta` None) or "none"."""
    def load():
        for case_day in cache.case_days(folds=folds):
            yield (oof_probs(configs, weights, case_day, cache, tta), cache.original_masks(case_day),
                   oof_gate(configs, weights, case_day, cache, tta))
    return load


def oof_score(configs, weights, cache: Cache, threshold: float = 0.5, tta: str | None = None) -> float:
    """Competition score of the weighted OOF ensemble at one threshold (the selection criterion)."""
    rows = ((cls, threshold_sums(probs[c], gt[c], (threshold,))[0])
            for probs, gt, _ in oof_volumes(configs, weights, cache, tta=tta)() for c, cls in enumerate(CLASSES))
    return class_scores(sum_rows(rows, CLASSES))["score"]


# ---------------------------------------------------------------------------------------------
# Selection


def select_topk(configs: list[Configuration], k: int) -> tuple[list[Configuration], list[float], list[str]]:
    """The k configurations with the best cross-validated (OOF) score, equal weights."""
    if k < 1:
        raise ValueError(f"--topk must be at least 1 (got {k})")
    ranked = sorted(configs, key=lambda c: -c.cv_score if not math.isnan(c.cv_score) else math.inf)
    chosen = ranked[:k]
    log = [f"{c.name} ({c.trial_id}): OOF score {c.cv_score:.4f}" + (" selected" if c in chosen else "")
           for c in ranked]
    return chosen, [1.0] * len(chosen), log


def select_greedy(configs: list[Configuration], k: int, score_of: Callable) -> tuple[list, list[float], list[str]]:
    """Caruana's forward selection with replacement: k additions, each the configuration that gives
    the best OOF ensemble score (even when that score is lower: a later addition may recover it),
    then the best prefix of that path. Weights are the integer counts. Ties go to fewer additions,
    and at each step to the configuration already in the ensemble, then to the better ranked one.

    `score_of(configs, weights)` scores a candidate ensemble (the OOF competition score).
    """
    if k < 1:
        raise ValueError(f"--topk must be at least 1 (got {k})")
    by_name = {c.name: c for c in configs}
    counts: dict[str, int] = {}
    path, log = [], []
    for step in range(k):
        trials = []
        for order, conf in enumerate(configs):
            trial = dict(counts)
            trial[conf.name] = trial.get(conf.name, 0) + 1
            members = [by_name[n] for n in trial]
            score = score_of(members, [float(trial[n]) for n in trial])
            trials.append((score, conf.name in counts, -order, conf.name, trial))
        score, _, _, name, counts = max(trials, key=lambda t: t[:3])
        path.append((score, dict(counts)))
        log.append(f"step {step + 1}: add {name} -> OOF score {score:.4f} "
                   f"(candidates: {', '.join(f'{t[3]} {t[0]:.4f}' for t in trials)})")
    best = max(range(len(path)), key=lambda i: (path[i][0], -i))  # the earliest of the best scores
    score, counts = path[best]
    log.append(f"kept the first {best + 1} of {len(path)} additions: OOF score {score:.4f}")
    chosen = [by_name[n] for n in counts]
    return chosen, [float(counts[c.name]) for c in chosen], log
