"""The search's early-stopping scheduler, driven without a Ray cluster: Ray's ASHA objects are
plain Python, so trials can be fed to them directly, as Tune does (Ray internals: `_trial_info`
maps a trial to its bracket)."""

from types import SimpleNamespace

import numpy as np
import pytest

from gitseg.config import ConfigError
from search.run import check_asha, make_scheduler, max_brackets
from search.settings import AshaConfig, SearchConfig


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
