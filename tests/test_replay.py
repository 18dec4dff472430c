"""`gitseg replay` (search/replay.py) feeds recorded learning curves to Ray's own ASHA bracket."""

import math

import numpy as np
import pytest

from gitseg import records
from gitseg.cli import main
from gitseg.records import SearchRecord, TrialRow
from search.replay import anytime_orders, best_after, brackets_table, load_curves, replay


def curves(*scores):
    return [{"index": i + 1, "history": [{"epochs_done": e + 1, "score": s} for e, s in enumerate(row)]}
            for i, row in enumerate(scores)]


def test_replay_stops_where_asha_would():
    # grace 1, reduction factor 2, 4 epochs: rungs after epochs 1 and 2 (and 4, where every trial ends).
    # Trial 1 is the first at every rung, so it runs to the end; trial 2 is below the median of the
    # rung-1 scores recorded before it (only trial 1's) and stops after one epoch; trial 3 passes
    # rung 1 but is below trial 1 at rung 2; trial 4 beats both at every rung.
    trials = curves([0.5, 0.6, 0.7, 0.8], [0.2, 0.9, 0.9, 0.9], [0.6, 0.55, 0.9, 0.95], [0.7, 0.8, 0.85, 0.99])
    out = replay(trials, "score", grace=1, rf=2, max_t=4)
    assert [t["epochs"] for t in out] == [4, 1, 2, 4]
    # the best of a stopped trial counts only the epochs it ran
    assert [t["best"] for t in out] == [0.8, 0.2, 0.6, 0.99]


def test_a_trial_in_the_last_bracket_runs_to_the_end_and_brackets_are_drawn_as_ray_weights_them():
    # grace 1, rf 2, 4 epochs: bracket 0 decides after epochs 1 and 2, bracket 1 after 2, bracket 2
    # only at 4 (never early). Trial 2 is stopped after one epoch in bracket 0 (first test), not in 2.
    trials = curves([0.5, 0.6, 0.7, 0.8], [0.2, 0.9, 0.9, 0.9], [0.6, 0.55, 0.9, 0.95], [0.7, 0.8, 0.85, 0.99])

    class Last:
        p = None

        def choice(self, n, p):
            Last.p = p
            return n - 1

    out = replay(trials, "score", grace=1, rf=2, max_t=4, brackets=3, rng=Last())
    assert [t["epochs"] for t in out] == [4, 4, 4, 4] and out[1]["best"] == 0.9
    # Ray's weights: e^(rungs - most rungs) for brackets of 2, 1 and 0 rungs before the end
    assert Last.p == pytest.approx(np.exp([0, -1, -2]) / np.exp([0, -1, -2]).sum())
    rows = brackets_table(trials, grace=1, rf=2, max_t=4, most=3, draws=50)
    assert rows[0] == {"brackets": 1, "epochs": 11 / 16, "best": 1.0, "kept": 1.0}
    assert rows[0]["epochs"] < rows[1]["epochs"] < rows[2]["epochs"] < 1


def test_replay_never_runs_past_max_t():
    out = replay(curves([0.1] * 8), "score", grace=1, rf=4, max_t=3)
    assert out[0]["epochs"] == 3


def test_a_search_without_early_stopping_is_replayed_in_start_order(tmp_path, capsys):
    def row(started, scores, status="finished"):
        history = [{"epoch": e + 1, "score": s, "dice": s} for e, s in enumerate(scores)]
        return TrialRow(trial_id=f"t{started:g}", config="", best_score=max(scores, default=math.nan),
                        best_epoch=None, epochs_run=len(scores), status=status, checkpoint="", error="", values={},
                        history=history, time_s=1.0, started=started)
    search = SearchRecord(settings={"asha": {"enabled": False}}, base={}, cache="",
                          leaderboard=[row(30.0, [0.6, 0.55, 0.9, 0.95]), row(10.0, [0.5, 0.6, 0.7, 0.8]),
                                       row(20.0, [0.2, 0.9, 0.9, 0.9]), row(40.0, [], status="failed")])
    path = tmp_path / "search.json"
    records.save(search, path)
    data = load_curves(str(path))
    assert data["args"]["epochs"] == 4
    out = replay(data["fifo"]["trials"], "score", grace=1, rf=2, max_t=4)
    assert [t["epochs"] for t in out] == [4, 1, 2]  # as in the first test: started 10 s, 20 s, 30 s

    # the command itself on a search.json (its trials carry only their curves)
    assert main(["replay", str(path), "--metric", "score", "--grace", "1", "--rf", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 trials x 4 epochs without early stopping: 12 trial-epochs, best 0.9500" in printed
    assert "score" in printed.splitlines()[-1] and printed.splitlines()[-1].split()[3] == "7"  # 4 + 1 + 2 epochs

    search.settings["asha"]["enabled"] = True
    records.save(search, path)
    with pytest.raises(ValueError, match="asha.enabled=false"):
        load_curves(str(path))
    assert main(["replay", str(path)]) == 2
    assert "run the search with --set asha.enabled=false" in capsys.readouterr().err


def test_anytime_is_the_best_seen_once_the_share_is_spent_in_every_order():
    trials = curves([0.5, 0.6, 0.7, 0.8], [0.2, 0.9, 0.9, 0.9], [0.6, 0.55, 0.9, 0.95], [0.7, 0.8, 0.85, 0.99])
    asha = replay(trials, "score", grace=1, rf=2, max_t=4)  # epochs 4, 1, 2, 4 (first test)
    # one at a time: trial 1's 4 epochs, trial 2's 1, trial 3's 2 (0.6, 0.55), then trial 4's
    assert [best_after(asha, trials, n) for n in (6, 8, 10, 11)] == [0.8, 0.8, 0.85, 0.99]
    fifo = [{"index": t["index"], "epochs": 4} for t in trials]
    assert best_after(fifo, trials, 6) == 0.9  # trial 2's second epoch
    # Half of the 16 trial-epochs, trial 1 first, trials 2-4 in random orders. Without early stopping
    # one more trial runs whole: 0.99 is reached when trial 4 comes second. With ASHA too (it passes
    # every rung), but in the other orders ASHA spends its epochs on the stopped trials and on trial
    # 4's start, and sees 0.8 or 0.85 where the full second trial reached 0.9 or 0.95.
    row = anytime_orders(trials, grace=1, rf=2, max_t=4, share=0.5, draws=60)
    assert row["spend"] == 8 and row["asha_met"] == row["fifo_met"] and 0 < row["fifo_met"] < 1
    assert row["asha_mean"] < row["fifo_mean"]


def test_an_anytime_share_outside_0_1_is_refused(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "unread.json"), "--anytime", "40"]) == 2
    assert "gitseg replay: error: --anytime 40.0: give the share" in capsys.readouterr().err
