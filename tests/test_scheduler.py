"""The search's early-stopping scheduler and its compute budget, driven without a Ray cluster: Ray's
ASHA objects, Tune's searchers and stoppers are plain Python, so trials can be fed to them directly,
as Tune does (Ray internals: `_trial_info` maps a trial to its bracket)."""

import pickle
import time
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.search import Searcher

from gitseg.config import ConfigError
from search.budget import BudgetCount, BudgetSearcher, budget_objects, rungs
from search.run import check_asha, make_scheduler, max_brackets
from search.settings import AshaConfig, BudgetConfig, SearchConfig, load_search_config


def test_the_last_bracket_runs_its_trials_to_the_end():
    settings = SearchConfig(asha=AshaConfig(grace_period=1, reduction_factor=2, brackets=3))
    assert max_brackets(4, 1, 2) == 3
    # 30 epochs, grace 3, rf 3: rungs at 3, 9, 27 | 9, 27 | 27 | none: the fourth bracket runs to the end
    assert max_brackets(30, 3, 3) == 4 and max_brackets(3, 1, 2) == 3
    check_asha(settings, 4)
    scheduler = make_scheduler(settings, epochs=4)
    scheduler.set_search_properties("score", "max")
    np.random.seed(0)  # Ray draws each trial's bracket from numpy's global generator
    trials = [SimpleNamespace(trial_id=str(i)) for i in range(60)]
    bracket_of = {}
    for t in trials:
        scheduler.on_trial_add(None, t)
        bracket_of[t.trial_id] = scheduler._brackets.index(scheduler._trial_info[t.trial_id])
    ran = {}
    for i, t in enumerate(trials):  # one at a time, each worse than all before it: rungs cut them
        for epoch in range(1, 5):
            action = scheduler.on_trial_result(None, t, {"epochs_done": epoch, "score": 1 - i / 100})
            if action == "STOP":
                break
        ran[t.trial_id] = epoch
    by_bracket = {b: [ran[t] for t, tb in bracket_of.items() if tb == b] for b in range(3)}
    assert all(by_bracket[b] for b in range(3)), "every bracket got trials"
    assert set(by_bracket[2]) == {4}, "the last bracket never stops a trial early"
    assert min(by_bracket[0]) == 1 and min(by_bracket[1]) == 2  # their first rungs: grace x rf^bracket
    # one bracket (the default) stops every one of these trials after the first early
    single = make_scheduler(SearchConfig(asha=AshaConfig(grace_period=1, reduction_factor=2)), epochs=4)
    single.set_search_properties("score", "max")
    for t in trials[:2]:
        single.on_trial_add(None, t)
    assert single.on_trial_result(None, trials[0], {"epochs_done": 1, "score": 0.9}) == "CONTINUE"
    assert single.on_trial_result(None, trials[1], {"epochs_done": 1, "score": 0.1}) == "STOP"


@pytest.mark.parametrize("asha, message", [
    (dict(brackets=4), r"asha.brackets must be between 1 and 3 for 4 epochs"),
    (dict(brackets=0), r"asha.brackets must be between 1 and 3"),
    (dict(grace_period=5), r"asha.grace_period must be between 1 and the epochs, 4"),
    (dict(reduction_factor=1), r"asha.reduction_factor must be at least 2"),
])
def test_impossible_asha_settings_are_refused(asha, message):
    settings = SearchConfig(asha=AshaConfig(**{"grace_period": 1, "reduction_factor": 2, **asha}))
    with pytest.raises(ConfigError, match=message):
        check_asha(settings, 4)
    check_asha(SearchConfig(asha=AshaConfig(enabled=False, **asha)), 4)  # off: nothing to check


class Suggests(Searcher):
    """A stand-in for Optuna's searcher: a configuration for every request."""

    def suggest(self, trial_id):
        return {"trial": trial_id}


def test_the_budget_stops_new_trials_and_running_ones_at_their_next_rung():
    settings = SearchConfig(asha=AshaConfig(grace_period=1, reduction_factor=2), budget=BudgetConfig(trial_epochs=5))
    assert rungs(settings, 4) == {1, 2, 4}
    assert rungs(SearchConfig(asha=AshaConfig(grace_period=3, reduction_factor=3, brackets=2)), 30) == {3, 9, 27, 30}
    searcher, stopper = budget_objects(settings, 4, Suggests(metric="score", mode="max"))

    def result(trial, epochs):  # what Tune does with each result: the searcher hears it, the stopper judges it
        searcher.on_trial_result(trial, {"epochs_done": epochs, "score": 0.5})
        return stopper(trial, {"epochs_done": epochs, "score": 0.5})

    assert searcher.suggest("a") == {"trial": "a"}
    assert not result("a", 1) and not result("a", 2)
    assert searcher.suggest("b") == {"trial": "b"}                 # 2 of 5 spent
    assert not result("b", 1) and not result("b", 2)              # 4 spent
    assert not result("a", 3)                                     # 5: spent, but 3 is no rung: a goes on
    assert result("a", 4)                                         # to its next one (here its last epoch)
    assert not result("b", 3) and result("b", 4)                  # the same for b
    assert searcher.suggest("c") is Searcher.FINISHED             # and no new trial starts
    # Both counts survive a resumed search: Tune saves the searcher's state and pickles the stopper.
    again = BudgetSearcher(Suggests(metric="score", mode="max"), BudgetCount(5, None))
    again.set_state(searcher.get_state())
    assert again.count.used() == 8 and again.suggest("d") is Searcher.FINISHED
    assert pickle.loads(pickle.dumps(stopper)).count.used() == 8
    # No budget: the searcher as it was, no stopper.
    plain = Suggests(metric="score", mode="max")
    assert budget_objects(SearchConfig(), 4, plain) == (plain, None)
    # Without ASHA the only rung is the last epoch: running trials finish.
    assert rungs(SearchConfig(asha=AshaConfig(enabled=False)), 4) == {4}


def test_a_wall_time_budget_counts_the_drivers_time_across_a_resume():
    count = BudgetCount(None, 0.2)
    assert not count.spent()
    time.sleep(0.25)
    assert count.spent()
    restored = pickle.loads(pickle.dumps(count))  # as Tune saves the stopper and the searcher's state
    assert restored.elapsed >= 0.25 and restored.spent()


@pytest.mark.parametrize("budget, message", [
    ("{trial_epochs: 0}", "budget.trial_epochs must be at least 1"),
    ("{wall_s: -1}", "budget.wall_s must be positive"),
])
def test_impossible_budgets_are_refused(tmp_path, budget, message):
    path = tmp_path / "search.yaml"
    path.write_text(f"name: x\nbudget: {budget}\n")
    with pytest.raises(ConfigError, match=message):
        load_search_config(path)
