"""The search leaderboard from Tune's results, without Ray: a trial restarted by a resumed search."""

import json
import math
import types

import pandas as pd
import pytest

from gitseg.records import TrialRow
from search.leaderboard import (
    anytime,
    format_leaderboard,
    leaderboard,
    leaderboard_csv,
    mark_pareto,
    rung_correlations,
)
from search.space import encode, parse_space
from search.storage import filesystem

SPACE = parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}})
BASE = {"train": {"epochs": 3, "lr": 1e-3}}


def epoch(i, score):
    return {"epoch": i, "score": score, "dice": score / 2, "hausdorff": 0.5, "epochs_done": i + 1,
            "best_score": score, "best_epoch": i}


def result(tmp_path, name, tune_rows, checkpoint_epochs=None, error=None):
    """A stand-in for a Tune Result: its reported rows, and the metrics.jsonl of its latest checkpoint."""
    checkpoint = tmp_path / name / "checkpoint_000002"
    metrics = {**tune_rows[-1], "trial_id": name} if tune_rows else {"trial_id": name}
    if checkpoint_epochs is not None:
        checkpoint.mkdir(parents=True)
        (checkpoint / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in checkpoint_epochs))
        metrics["checkpoint_path"] = str(checkpoint)
    return types.SimpleNamespace(config=encode(SPACE, {"train.lr": 1e-3}), metrics=metrics,
                                 metrics_dataframe=pd.DataFrame(tune_rows), error=error, path=str(tmp_path / name))


def test_a_restarted_trial_keeps_the_epochs_before_its_restart(tmp_path):
    # Tune's record of a restarted trial holds only what it reported after the restart (epoch 3);
    # its best epoch (the first) is in the checkpoint's metrics, written before the restart.
    trained = [epoch(0, 0.9), epoch(1, 0.5), epoch(2, 0.6)]
    restarted = result(tmp_path, "restarted", tune_rows=trained[2:], checkpoint_epochs=trained)
    straight = result(tmp_path, "straight", tune_rows=[epoch(0, 0.7), epoch(1, 0.8), epoch(2, 0.75)],
                      checkpoint_epochs=[epoch(0, 0.7), epoch(1, 0.8), epoch(2, 0.75)])
    fs, _ = filesystem(str(tmp_path))
    rows = leaderboard([straight, restarted], SPACE, BASE, fs)
    assert [r.trial_id for r in rows] == ["restarted", "straight"]
    assert rows[0].best_score == 0.9 and rows[0].best_epoch == 1
    assert [h["epoch"] for h in rows[0].history] == [1, 2, 3] and rows[0].status == "finished"
    assert rows[1].best_score == 0.8 and rows[1].best_epoch == 2


def test_without_a_readable_checkpoint_tunes_record_is_used(tmp_path):
    fs, _ = filesystem(str(tmp_path))
    stopped = result(tmp_path, "stopped", tune_rows=[epoch(0, 0.4)])  # no checkpoint_path
    gone = result(tmp_path, "gone", tune_rows=[epoch(0, 0.3), epoch(1, 0.35)], checkpoint_epochs=[])
    (tmp_path / "gone" / "checkpoint_000002" / "metrics.jsonl").unlink()
    failed = result(tmp_path, "failed", tune_rows=[], error=RuntimeError("loss is nan at epoch 0 step 1"))
    rows = {r.trial_id: r for r in leaderboard([stopped, gone, failed], SPACE, BASE, fs)}
    assert rows["stopped"].best_score == 0.4 and rows["stopped"].status == "stopped early"
    assert rows["gone"].best_score == 0.35 and rows["gone"].epochs_run == 2
    assert rows["failed"].status == "failed" and math.isnan(rows["failed"].best_score)
    assert "loss is nan" in rows["failed"].error


def test_the_score_latency_front_is_marked():
    def row(name, score, latency):
        return types.SimpleNamespace(trial_id=name, best_score=score, latency_ms=latency, pareto=None)

    rows = [row("a", 0.80, 5.0), row("b", 0.70, 2.0), row("c", 0.75, 6.0), row("d", 0.60, 2.5),
            row("e", math.nan, 1.0), row("f", 0.90, None), row("g", 0.70, 2.0)]
    mark_pareto(rows)
    assert [r.trial_id for r in rows if r.pareto] == ["a", "b"]  # g ties b and comes later; f has no latency


def test_leaderboard_records_latency_and_shows_the_front(tmp_path):
    fast = [{**epoch(0, 0.5), "latency_ms": 1.5}, {**epoch(1, 0.6), "latency_ms": 1.5}]
    slow = [{**epoch(0, 0.7), "latency_ms": 4.0}]
    rows = leaderboard([result(tmp_path, "fast", fast), result(tmp_path, "slow", slow)], SPACE, BASE,
                       filesystem(str(tmp_path))[0])
    assert [(r.trial_id, r.latency_ms, r.pareto) for r in rows] == [("slow", 4.0, True), ("fast", 1.5, True)]
    text = format_leaderboard(rows)
    assert "ms/slice" in text and "front" in text and "4.00" in text


def test_rung_correlations_over_the_trials_that_ran_to_the_end(tmp_path):
    fs, _ = filesystem(str(tmp_path))
    curves = {"a": [0.1, 0.5, 0.9], "b": [0.2, 0.4, 0.5], "c": [0.3, 0.3, 0.4], "d": [0.4, 0.2, 0.3]}
    results = [result(tmp_path, n, tune_rows=[epoch(i, s) for i, s in enumerate(c)]) for n, c in curves.items()]
    results.append(result(tmp_path, "cut", tune_rows=[epoch(0, 0.9)]))  # stopped early: no final score
    rows = leaderboard(results, SPACE, BASE, fs)
    # best scores a .9 b .5 c .4 d .4: after epoch 1 the order is reversed, after epoch 2 it is right
    table = rung_correlations(rows)
    assert [(r["epoch"], r["trials"]) for r in table] == [(1, 4), (2, 4)]
    assert table[0]["spearman"] == pytest.approx(-0.9486833) and table[1]["spearman"] == pytest.approx(0.9486833)
    two = [r for r in rows if r.trial_id in ("a", "b")]
    assert rung_correlations(two) == [{"epoch": 1, "trials": 2, "spearman": None},
                                           {"epoch": 2, "trials": 2, "spearman": None}]
    csv = leaderboard_csv(rows)
    assert "epoch_scores" in csv.splitlines()[0] and "0.1000 0.5000 0.9000" in csv


def test_anytime_curve_follows_the_order_in_which_epochs_ended(tmp_path):
    # Tune's rows carry each epoch's time; the history turns them into seconds since the trial began
    fs, _ = filesystem(str(tmp_path))
    timed = [{**epoch(i, s), "epoch_time": 3.0} for i, s in enumerate([0.5, 0.4, 0.6])]
    (row,) = leaderboard([result(tmp_path, "b", tune_rows=timed)], SPACE, BASE, fs)
    assert [h["time_s"] for h in row.history] == [3.0, 6.0, 9.0]

    def trial(name, started, scores, seconds):
        history = [{"epoch": i + 1, "score": s, "time_s": seconds * (i + 1)} for i, s in enumerate(scores)]
        return TrialRow(trial_id=name, config="", best_score=max(scores), best_epoch=None, epochs_run=len(scores),
                        status="finished", checkpoint="", error="", values={}, history=history, time_s=0.0,
                        started=started)

    # a: epochs end at 10, 20, 30 s; b, started at 5 s: at 8, 11, 14 s
    rows = [trial("a", 0.0, [0.1, 0.2, 0.3], 10.0), trial("b", 5.0, [0.5, 0.4, 0.6], 3.0)]
    curve = lambda: [(p["trial_epochs"], p["best_score"]) for p in anytime(rows)]  # noqa: E731
    assert curve() == [(1, 0.5), (2, 0.5), (3, 0.5), (4, 0.6), (5, 0.6), (6, 0.6)]
    # without times (records written before them): trial start, then epoch
    for r in rows:
        for h in r.history:
            del h["time_s"]
    assert curve() == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.5), (5, 0.5), (6, 0.6)]
