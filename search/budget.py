"""A compute budget for the search: trial-epochs (and optionally wall time) after which no new
trial starts and the running ones stop at their next rung.

Users of a cluster think in "200 GPU-epochs"; early stopping and running every trial to the end
only compare at equal compute. Two Tune objects enforce it, each counting the epochs from the
results it sees, and each saved with the experiment so that a resumed search carries its count on:

- `BudgetSearcher` wraps the searcher (Optuna's TPE) and answers FINISHED once the budget is
  spent, so no new trial starts (Tune saves it with `get_state`, as it does its own wrappers);
- `BudgetStopper` (Tune's `stop`) stops a running trial at its next rung once the budget is
  spent: the epochs at which the scheduler decides (every ASHA bracket's milestones) and the last
  one. Tune saves it with its own state.

A trial that starts before the budget is spent can still run up to its next rung, so the spent
total can pass the budget by at most (running trials x the longest gap between rungs).
"""

from __future__ import annotations

import copy
import math
import time

from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from search.settings import SearchConfig


class BudgetCount:
    """Trial-epochs and driver seconds seen so far; the seconds carry across a resume (the time
    the driver was down does not count)."""

    def __init__(self, trial_epochs: int | None, wall_s: float | None):
        self.trial_epochs, self.wall_s = trial_epochs, wall_s
        self.epochs: dict[str, int] = {}   # trial id -> epochs it reported
        self.elapsed = 0.0                 # driver seconds before the current run of the driver
        self._since: float | None = None   # monotonic time this driver started counting

    def seen(self, trial_id: str, result: dict) -> None:
        if "epochs_done" in result:
            self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), int(result["epochs_done"]))

    def used(self) -> int:
        return sum(self.epochs.values())

    def seconds(self) -> float:
        if self._since is None:
            self._since = time.monotonic()
        return self.elapsed + time.monotonic() - self._since

    def spent(self) -> bool:
        return ((self.trial_epochs is not None and self.used() >= self.trial_epochs)
                or (self.wall_s is not None and self.seconds() >= self.wall_s))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["elapsed"], state["_since"] = self.seconds() if self._since is not None else self.elapsed, None
        return state


class BudgetSearcher(Searcher):
    """The searcher, stopped when the budget is spent (see the module)."""

    def __init__(self, searcher: Searcher, count: BudgetCount):
        self.searcher = searcher
        self.count = count
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str):
        if self.count.spent():
            return Searcher.FINISHED
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.count.seen(trial_id, result)
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result:
            self.count.seen(trial_id, result)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args, **kwargs):
        return self.searcher.add_evaluated_point(*args, **kwargs)

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


class BudgetStopper(Stopper):
    """Stops a running trial at its next rung once the budget is spent (see the module)."""

    def __init__(self, count: BudgetCount, rungs: set[int]):
        self.count = count
        self.rungs = set(rungs)

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.count.seen(trial_id, result)
        return self.count.spent() and int(result.get("epochs_done", 0)) in self.rungs

    def stop_all(self) -> bool:
        return False


def bracket_milestones(epochs: int, grace_period: int, reduction_factor: int, bracket: int) -> list[int]:
    """The epochs at which ASHA bracket `bracket` decides about a trial, as Ray's _Bracket places
    them: grace x rf^(k + bracket) for k below int(log_rf(epochs / grace) - bracket + 1)."""
    count = int(math.log(epochs / grace_period) / math.log(reduction_factor) - bracket + 1)
    return [int(grace_period * reduction_factor ** (k + bracket)) for k in range(max(count, 0))]


def rungs(settings: SearchConfig, epochs: int) -> set[int]:
    """The epochs at which the scheduler decides about a trial: every ASHA bracket's milestones, and
    the last epoch."""
    out = {epochs}
    if settings.asha.enabled:
        asha = settings.asha
        for s in range(asha.brackets):
            out |= {m for m in bracket_milestones(epochs, asha.grace_period, asha.reduction_factor, s) if m <= epochs}
    return out


def budget_objects(settings: SearchConfig, epochs: int, searcher: Searcher) -> tuple[Searcher, Stopper | None]:
    """The searcher wrapped, and the stopper, when `budget` is set; the searcher as is and None if not."""
    budget = settings.budget
    if budget.trial_epochs is None and budget.wall_s is None:
        return searcher, None
    return (BudgetSearcher(searcher, BudgetCount(budget.trial_epochs, budget.wall_s)),
            BudgetStopper(BudgetCount(budget.trial_epochs, budget.wall_s), rungs(settings, epochs)))
