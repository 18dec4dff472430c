"""The run records one stage writes and a later one reads, as dataclasses with one load/save each.

    <run>/search.json          SearchRecord    the search's settings, base config and leaderboard
    <run>/refit.json           RefitRecord     per (configuration, fold): checkpoint and OOF folder
    <ensemble>/ensemble.json   EnsembleManifest members, TTA, post-processing, selection, scores
    <ensemble>/evaluation.json Evaluation      per-volume score sums of every holdout variant

Writing goes through `to_json` and reading through `from_json`, so both sides share one
definition; reading is strict (an unknown or mistyped field is an error naming the file).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

from gitseg.config import ConfigError, from_dict, to_dict
from gitseg.files import write_text_atomic

SEARCH_RECORD, REFIT_RECORD = "search.json", "refit.json"
ENSEMBLE_MANIFEST, EVALUATION = "ensemble.json", "evaluation.json"
MANIFEST_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# search.json


@dataclasses.dataclass
class TrialRow:
    """One leaderboard row: a search trial's configuration and its best validation epoch."""

    trial_id: str
    config: str                  # the searched values as one line of key=value
    best_score: float            # NaN when the trial never scored
    best_epoch: int | None       # 1-based
    epochs_run: int
    status: str                  # finished, stopped early, failed
    checkpoint: str              # <trial's latest checkpoint>/best.pt, "" when none
    error: str
    values: dict                 # dotted key -> value of each searched parameter
    history: list[dict]          # {epoch (from 1), score, dice, hausdorff} for every epoch trained
    time_s: float
    started: float | None = None  # Unix time the trial started (Tune's record)
    latency_ms: float | None = None  # inference ms per slice (multi-objective searches only)
    pareto: bool = False         # on the front of best score against latency (multi-objective searches)


@dataclasses.dataclass
class SearchRecord:
    settings: dict               # the resolved search config
    base: dict                   # the resolved experiment config every trial started from
    cache: str                   # the data the cache was prepared from
    leaderboard: list[TrialRow]  # best first
    # per epoch before the last: Spearman of the trials' scores then with their best scores, over the
    # trials that trained all their epochs (search.leaderboard.rung_correlations)
    rung_spearman: list[dict] = dataclasses.field(default_factory=list)
    # the anytime curve: {trial_epochs, best_score} after each epoch of the search (leaderboard.anytime)
    anytime: list[dict] = dataclasses.field(default_factory=list)
    # trial_epochs spent over all trials, and the budget's trial_epochs and wall_s (None: no budget)
    compute: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# refit.json


@dataclasses.dataclass
class RefitModel:
    """One (configuration, fold) Train run of the refit."""

    rank: int                    # the configuration's place on the leaderboard (0 = best)
    trial_id: str
    fold: int
    values: dict
    score: float | None          # validation score of the fold at its best epoch
    best_epoch: int | None       # 1-based
    error: str | None
    checkpoint: str | None = None  # .../best.pt
    oof: str | None = None         # folder of the fold's out-of-fold probabilities (gitseg.oof)


@dataclasses.dataclass
class RefitRecord:
    folds: list[int]
    tta: str                     # TTA of the out-of-fold probabilities
    models: list[RefitModel]


# ---------------------------------------------------------------------------------------------
# ensemble.json and evaluation.json


@dataclasses.dataclass
class Member:
    file: str            # checkpoint, relative to the ensemble folder
    weight: float
    size: int            # network input size (cache size it was trained at)
    channels: int        # 2.5D window
    stride: int
    configuration: str   # e.g. rank0: the refit configuration it belongs to
    fold: int
    sha256: str = ""


@dataclasses.dataclass
class ConfigurationRow:
    """One refit configuration as the selection saw it."""

    name: str                    # rank0, rank1, ...
    oof_score: float             # pooled out-of-fold score at threshold 0.5
    fold_scores: dict[str, float | None]  # fold (as JSON writes it) -> validation score
    selected: bool
    trial_id: str = ""
    values: dict = dataclasses.field(default_factory=dict)  # dotted key -> searched value
    weight: float = 0.0


@dataclasses.dataclass
class Selection:
    method: str                  # topk, greedy, latency-budget or distilled
    topk: int
    why: str
    log: list[str]
    configurations: list[ConfigurationRow]
    problems: list[str]
    latency_budget: float | None = None  # ms per slice, when the selection was the latency front's


@dataclasses.dataclass
class Gain:
    """What one variant adds over another on the holdout, with a paired bootstrap over cases
    (ensemble.selection.evaluate.paired_gain)."""

    gain: float
    ci95: list[float]            # [low, high]
    cases: int
    resamples: int
    p_gain_not_positive: float   # the share of resamples with no gain
    over: str = ""               # the reference variant


@dataclasses.dataclass
class AblationRow:
    """One variant of the holdout ablation."""

    variant: str
    detail: str
    members: int
    tta: str
    score: float
    dice: float
    hausdorff: float
    gain_over: str               # the variant this row's gain is over ("" for the first)
    gain: float = 0.0


@dataclasses.dataclass
class ClassScores:
    """The ensemble as built on the holdout, one organ: competition terms and clinical distances."""

    organ: str = dataclasses.field(metadata={"key": "class"})
    score: float
    dice: float
    hausdorff: float
    dice_3d: float
    hd95_mm: float
    assd_mm: float
    missed_or_spurious_volumes: int


@dataclasses.dataclass
class HoldoutScores:
    case_days: list[str]
    score: float
    dice: float
    hausdorff: float
    per_class: list[ClassScores]
    ablation: list[AblationRow]
    best_single_fold_model: str
    best_single_configuration: str
    final: str = "ensemble + TTA + tuned post-processing"  # the ablation row that is the ensemble as built
    ensemble_gain: Gain | None = None  # over the best single configuration
    # How far the members' disagreement finds the errors (ensemble/predict/review.py review_scores);
    # None for a one-network ensemble.
    review: dict | None = None

    def ablation_score(self, variant: str) -> float:
        return next(r.score for r in self.ablation if r.variant == variant)


@dataclasses.dataclass
class Tuned:
    """Post-processing tuned on one model's (or ensemble's) own out-of-fold predictions."""

    postprocess: dict            # ensemble.selection.postprocess.PostProcess as a dict
    tuning_steps: list[dict]     # tune's steps: step, values, before, after, kept, ...
    model: str = ""              # which model, where it is not the ensemble
    tta: str = ""


@dataclasses.dataclass
class OofScores:
    """The selected ensemble's out-of-fold figures, and the tunings of the holdout ablation's variants."""

    selected_at_half: float = dataclasses.field(metadata={"key": "selected_at_0.5"})  # threshold 0.5
    tuning_steps: list[dict]     # the ensemble's own tuning
    case_days: int
    tuned: dict[str, float] | None = None  # score, dice, hausdorff overall and per class, as tuned
    best_single_fold_model: Tuned | None = None
    best_single_configuration: Tuned | None = None
    ensemble_no_tta: Tuned | None = None
    ensemble_with_tta: Tuned | None = None


@dataclasses.dataclass
class EnsembleScores:
    oof: OofScores
    holdout: HoldoutScores | None = None


@dataclasses.dataclass
class MemberLatency:
    configuration: str
    fold: int
    tta: str
    ms_per_slice: float


@dataclasses.dataclass
class CandidateRow:
    """One candidate ensemble of the latency front (ensemble/selection/latency.py)."""

    configurations: list[str]
    tta: str
    folds: int                   # the best-scoring folds of each configuration it keeps
    oof_score: float
    ms_per_slice: float
    on_front: bool


@dataclasses.dataclass
class Latency:
    """Inference time measured on the machine that built the ensemble."""

    device: str
    timed_slices: int
    members: list[MemberLatency]
    ensemble_ms_per_slice: float
    ensemble_oof_score: float    # with tuned thresholds (tuning's first step), as the candidates are scored
    budget_ms_per_slice: float | None = None
    candidates: list[CandidateRow] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Source:
    run: str                     # the search folder (or distill's work folder)
    cache: str
    teacher_ensemble: str | None = None  # a distilled student's teacher


@dataclasses.dataclass
class Preprocessing:
    sizes: list[int]             # the members' network input sizes
    normalisation: str
    classes: list[str]
    windows: list[list[int]]     # the members' 2.5D windows: [channels, stride]


@dataclasses.dataclass
class MetricConvention:
    """How every score in the file is computed (docs/DATA.md)."""

    convention: str
    score: str
    dice: str
    hausdorff: str


KAGGLE_METRIC = MetricConvention(
    convention="kaggle", score="0.4 * Dice + 0.6 * (1 - Hausdorff)",
    dice="per (slice, class) row, both-empty rows skipped",
    hausdorff="per (case-day, class) volume, unit-cube coordinates / sqrt(3), symmetric")


@dataclasses.dataclass
class Machine:
    python: str
    platform: str
    cpus: int | None


@dataclasses.dataclass
class TrainingData:
    """The range of the scans an ensemble's members trained on (the non-holdout case-days of its
    cache): what `gitseg predict` checks its input against (ensemble/predict/input_checks.py)."""

    case_days: int
    slices: list[int]            # [min, max] slices per scan
    slice_mm: list[float]        # [min, max] spacing between slices
    pixel_mm: list[float]        # [min, max] in-plane pixel spacing
    fov_mm: list[float]          # [min, max] of either in-plane side of the field of view
    extent_mm: list[float]       # [min, max] head-to-feet extent: slices x slice spacing
    organ_share: list[float]     # per class: the share of case-days in which the organ is present


@dataclasses.dataclass
class EnsembleManifest:
    format: int
    gitseg_version: str
    created: str
    source: Source
    members: list[Member]
    tta: str
    postprocess: dict            # ensemble.selection.postprocess.PostProcess as a dict
    preprocessing: Preprocessing
    metric: MetricConvention     # the convention of every score in the file
    selection: Selection
    scores: EnsembleScores
    timings: dict[str, float]    # seconds of each phase (`<phase>_s`) and in all (`total_s`)
    machine: Machine | None = None
    latency: Latency | None = None  # None for a distilled student (its table is in distill.json)
    # The process's peak resident memory (GiB, the kernel's maximum so far) at the end of each phase
    # named in `timings`: which phase makes the peak (issue 12's rehearsal reads it).
    peak_memory_gib: dict[str, float] = dataclasses.field(default_factory=dict)
    # None in ensembles built before predict checked its input: then only the 2.5D window is checked.
    training_data: TrainingData | None = None


@dataclasses.dataclass
class Evaluation:
    rows: dict                   # variant -> [{case_day, case, class, sums (metrics.ScoreSums)}]
    clinical: list[dict]         # the final variant per (case_day, class): dice_3d, hd95_mm, assd_mm, voxels
    # The final variant per case-day: the members' review figures (case_day_review) with, per slice,
    # the voxels its masks get wrong (`slice_errors`) and the area they cover (`slice_area_mm2`).
    review: list[dict] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------

Record = TypeVar("Record")


def _plain(value):
    """numpy scalars as their Python value; anything else JSON cannot hold as text."""
    return value.item() if hasattr(value, "item") else str(value)


def to_json(record, indent: int | None = 1) -> str:
    return json.dumps(to_dict(record), indent=indent, default=_plain)


def from_json(cls: type[Record], text: str, source="", advice: str = "") -> Record:
    """Parse `text` as `cls`; a damaged text (truncated, edited) raises ValueError naming `source`,
    what is wrong and `advice` (what to do about it)."""
    try:
        return from_dict(cls, json.loads(text))
    except (ConfigError, json.JSONDecodeError) as exc:
        advice = advice or "restore it from a copy, or run again the command that wrote it"
        raise ValueError(f"{source or cls.__name__} is damaged or is not a valid {cls.__name__} ({exc}); "
                         f"{advice}") from None


def save(record, path, indent: int | None = 1) -> None:
    write_text_atomic(path, to_json(record, indent))


def load(cls: type[Record], path, advice: str = "") -> Record:
    """Read `path` as `cls`; `advice` is what the error says to do when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}" + (f"; {advice}" if advice else ""))
    return from_json(cls, path.read_text(), path, advice)
