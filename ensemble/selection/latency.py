"""Latency-aware ensembles: each refit member's measured inference time, and the Pareto front of
out-of-fold score against latency over candidate ensembles, from the OOF predictions alone.

A candidate is a set of configurations (equal weights), a TTA choice the refit wrote OOF for, and
the number of fold models per configuration (those with the best validation scores, as the
ablation's best single fold model is chosen: `folds_by_score`). Its cost is the sum of its
members' measured milliseconds per slice with that TTA. Its score is the competition score of its
OOF probabilities with per-class thresholds tuned on them (`candidate_scores`): compared at a
fixed 0.5, flip TTA can look worse than no TTA when the tuned ensemble says the opposite (the
demo's 3-epoch models, BENCHMARKS.md).

What the OOF score cannot see: every out-of-fold prediction comes from the one fold model per
configuration that did not train on the case-day, so a candidate's OOF score is the same for any
number of folds. Averaging more fold models of a configuration helps on new data (the holdout
ablation measures it: best single configuration against best single fold model), so at an equal
score the candidate with more members ranks higher; the front keeps both and a budget buys folds
only with what is left after the best configurations and TTA.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from ensemble.selection.members import Configuration, oof_probs
from ensemble.selection.postprocess import THRESHOLDS, best_thresholds, threshold_sums
from gitseg.checkpoint import load_checkpoint, model_from_checkpoint
from gitseg.data.cache import Cache
from gitseg.data.uwmgi import CLASSES
from gitseg.infer import ms_per_slice, prepare_for_inference
from gitseg.pareto import pareto
from gitseg.records import CandidateRow, MemberLatency

ALL_SUBSETS_UP_TO = 4  # with more refit configurations, candidates are the OOF ranking's prefixes and singletons


@dataclasses.dataclass
class Candidate:
    configurations: tuple[str, ...]
    tta: str
    folds: int             # fold models per configuration
    oof_score: float       # thresholds tuned on its OOF; the same for every `folds` (module docstring)
    ms_per_slice: float    # sum of the members' measured times with this TTA

    @property
    def members(self) -> int:
        return len(self.configurations) * self.folds

    def quality(self) -> tuple:
        """What a candidate is ranked by: its OOF score, then its number of members."""
        return self.oof_score, self.members

    def label(self) -> str:
        return f"{'+'.join(self.configurations)} x{self.folds} fold(s), TTA {self.tta}"

    def row(self, on_front: bool) -> CandidateRow:
        """As the manifest keeps it."""
        return CandidateRow(list(self.configurations), self.tta, self.folds, self.oof_score, self.ms_per_slice,
                            on_front)


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats on quality at an equal or lower cost, cheapest first."""
    return pareto(candidates, quality=Candidate.quality, cost=lambda c: c.ms_per_slice)


def choose_under_budget(candidates: list[Candidate], budget_ms: float) -> Candidate:
    """The best candidate (quality, then lower cost) whose cost is within `budget_ms` per slice."""
    fits = [c for c in candidates if c.ms_per_slice <= budget_ms]
    if not fits:
        cheapest = min(candidates, key=lambda c: c.ms_per_slice)
        raise ValueError(f"no candidate ensemble fits {budget_ms:g} ms per slice: the cheapest "
                         f"({cheapest.label()}) takes {cheapest.ms_per_slice:.2f} ms per slice on this device; "
                         f"raise --latency-budget")
    return max(fits, key=lambda c: (c.quality(), -c.ms_per_slice))


# ---------------------------------------------------------------------------------------------
# Measuring


def checkpoint_ms(checkpoint, ttas, volume, out_size, device) -> dict[str, float]:
    """ms per slice of one checkpoint's network with each TTA in `ttas`, on `volume` (`ms_per_slice`)."""
    state = load_checkpoint(checkpoint)
    pre = state["preprocessing"]
    network = prepare_for_inference(model_from_checkpoint(state, device))
    return {tta: ms_per_slice(network, volume, int(pre["channels"]), int(pre["stride"]), out_size, tta, device)
            for tta in ttas}


def measure_members(configs: list[Configuration], ttas, cache: Cache, device, log=print) -> list[MemberLatency]:
    """ms per slice of every fold model of `configs` with each TTA in `ttas`, on one cached volume."""
    case_day = (cache.case_days(holdout=True) or cache.case_days())[0]
    entry = cache.entries[case_day]
    volume, out_size = cache.image(case_day), (entry["height"], entry["width"])
    rows = []
    for conf in configs:
        for fold, fm in sorted(conf.folds.items()):
            for tta, ms in checkpoint_ms(fm.checkpoint, ttas, volume, out_size, device).items():
                rows.append(MemberLatency(conf.name, fold, tta, ms))
        mean = {t: np.mean([r.ms_per_slice for r in rows if r.configuration == conf.name and r.tta == t])
                for t in ttas}
        log(f"ensemble: {conf.name} inference " + ", ".join(f"TTA {t} {ms:.2f}" for t, ms in mean.items())
            + " ms per slice per fold model")
    return rows


# ---------------------------------------------------------------------------------------------
# Candidates


def configuration_sets(configs: list[Configuration]) -> list[tuple[Configuration, ...]]:
    """Every non-empty subset up to ALL_SUBSETS_UP_TO configurations; beyond, the prefixes of the
    OOF ranking and each configuration alone (the subsets grow as 2^n, each scored at every
    threshold on every OOF case-day)."""
    ranked = sorted(configs, key=lambda c: -c.cv_score)
    if len(ranked) <= ALL_SUBSETS_UP_TO:
        return [s for n in range(1, len(ranked) + 1) for s in itertools.combinations(ranked, n)]
    return [tuple(ranked[:n]) for n in range(1, len(ranked) + 1)] + [(c,) for c in ranked[1:]]


def candidate_scores(sets: list[tuple[Configuration, ...]], ttas, cache: Cache) -> dict[tuple, float]:
    """OOF score of every (configuration set, TTA) with per-class thresholds tuned on its own OOF
    (the first step of post-processing, which moves the score most; the later steps are left out:
    each would cost a pass per candidate). One pass over the case-days: each configuration's OOF
    file is read once per case-day and TTA."""
    sums = {(tuple(c.name for c in s), t): np.zeros((len(CLASSES), len(THRESHOLDS), 4)) for s in sets for t in ttas}
    configs = {c.name: c for s in sets for c in s}
    for case_day in cache.case_days():
        gt = cache.original_masks(case_day)
        for tta in ttas:
            probs = {name: oof_probs([c], [1.0], case_day, cache, tta) for name, c in configs.items()}
            for s in sets:
                names = tuple(c.name for c in s)
                mean = sum(probs[n] for n in names) / len(names)
                for k in range(len(CLASSES)):
                    sums[(names, tta)][k] += threshold_sums(mean[k], gt[k])
    return {key: best_thresholds(total)[1] for key, total in sums.items()}


def stop_where_oof_stops_rising(ranked: list[Configuration], candidates: list[Candidate],
                                tta: str) -> tuple[int, list[tuple[int, float]]]:
    """How many of the OOF ranking's first configurations to keep: the fewest whose ensemble (every
    fold, TTA `tta`, thresholds tuned on its OOF) scores best among the prefixes, so that a larger
    ensemble is kept only where the OOF says it is better. Returns that count and each prefix's score."""
    scores = {c.configurations: c.oof_score for c in candidates if c.tta == tta}
    path = []
    for n in range(1, len(ranked) + 1):
        key = tuple(c.name for c in ranked[:n])
        if key not in scores:  # not scored (another TTA than the OOF's): keep what was asked
            return len(ranked), path
        path.append((n, scores[key]))
    best = max(path, key=lambda p: (p[1], -p[0]))  # the best score; of equal ones, the fewest configurations
    return best[0], path


def folds_by_score(conf: Configuration) -> list[int]:
    """The configuration's folds, best validation score first (ties: lower fold first)."""
    return sorted(conf.folds, key=lambda f: (-conf.folds[f].score, f))


def member_ms(latency: list[MemberLatency]) -> dict[tuple[str, int, str], float]:
    """(configuration, fold, TTA) -> measured ms per slice."""
    return {(r.configuration, r.fold, r.tta): r.ms_per_slice for r in latency}


def candidates(sets, scores: dict[tuple, float], latency: list[MemberLatency]) -> list[Candidate]:
    """Every (configuration set, TTA, folds per configuration) with its OOF score and cost."""
    ms = member_ms(latency)
    out = []
    for s in sets:
        names = tuple(c.name for c in s)
        folds = min(len(c.folds) for c in s)
        for tta in sorted({t for n, t in scores if n == names}):
            for n in range(1, folds + 1):
                cost = sum(ms[(c.name, f, tta)] for c in s for f in folds_by_score(c)[:n])
                out.append(Candidate(names, tta, n, scores[(names, tta)], cost))
    return out
