"""The search leaderboard: one TrialRow per Tune trial, best first, as CSV and as a terminal table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gitseg.pareto import pareto
from gitseg.records import TrialRow
from gitseg.tables import csv_text, format_table, label
from search.space import decode
from search.trial import LATENCY_METRIC

HISTORY_KEYS = ("score", "dice", "hausdorff")
LEADERBOARD_COLUMNS = ("trial_id", "status", "best_score", "best_epoch", "epochs_run", "latency_ms", "pareto",
                       "epoch_scores", "config", "checkpoint", "error")


def leaderboard(results, params, base: dict, fs) -> list[TrialRow]:
    """One row per trial, best first: configuration, best score and epoch, epochs run, status.

    The scores come from each trial's per-epoch record (`trial_history`), the epochs before a
    resume included.
    """
    rows = []
    for result in results:
        values = decode(params, {k: v for k, v in (result.config or {}).items() if not k.startswith("__")})
        epochs_planned = int(values.get("train.epochs", base["train"]["epochs"]))
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        scored = frame.dropna(subset=["score"]) if frame is not None and "score" in frame else None
        # Per-epoch scores (also the report's learning curves and ASHA's stops).
        history = trial_history(fs, metrics.get("checkpoint_path"), scored)
        row = TrialRow(trial_id=metrics.get("trial_id") or Path(result.path).name,
                       config=" ".join(f"{k}={label(v)}" for k, v in values.items()),
                       best_score=math.nan, best_epoch=None, epochs_run=0, status="failed", checkpoint="",
                       error="", values=values, history=history, time_s=math.nan)
        scores = [h for h in history if not math.isnan(h["score"])]
        if scores:
            best = max(scores, key=lambda h: h["score"])
            row.best_score, row.best_epoch, row.epochs_run = best["score"], best["epoch"], history[-1]["epoch"]
        if scored is not None and len(scored):
            if "time_total_s" in scored:
                row.time_s = float(scored["time_total_s"].max())
            if "timestamp" in scored:
                row.started = float(scored["timestamp"].min() - scored["time_total_s"].min())
        if metrics.get("checkpoint_path"):
            row.checkpoint = f"{metrics['checkpoint_path']}/best.pt"
        if metrics.get(LATENCY_METRIC) is not None:
            row.latency_ms = float(metrics[LATENCY_METRIC])
        if result.error is not None:
            row.error = error_line(result.error)
        elif row.epochs_run >= epochs_planned:
            row.status = "finished"
        else:
            row.status = "stopped early"
        rows.append(row)
    rows.sort(key=lambda r: (-r.best_score if not math.isnan(r.best_score) else math.inf))
    mark_pareto(rows)
    return rows


def mark_pareto(rows: list[TrialRow]) -> None:
    """Flag the trials on the front of best score against latency: no other trial scores at least
    as well at a lower or equal latency (trials without both figures are never on it)."""
    measured = [r for r in rows if r.latency_ms is not None and not math.isnan(r.best_score)]
    front = {id(r) for r in pareto(measured, quality=lambda r: r.best_score, cost=lambda r: r.latency_ms)}
    for r in rows:
        r.pareto = id(r) in front


def error_line(error) -> str:
    """The last line of a trial's error: for a training failure, the exception and its message."""
    lines = str(error or "").strip().splitlines()
    return lines[-1][:300] if lines else "(no error text)"


def trial_history(fs, checkpoint_path: str | None, scored) -> list[dict]:
    """Every epoch a trial trained: {epoch (from 1), score, dice, hausdorff}, in order.

    Read from the metrics.jsonl of the trial's latest checkpoint: Tune keeps only what a trial
    reported since it last started, so a trial restarted by a resumed search (its Train run
    continuing from its checkpoint) has lost the epochs before the restart from Tune's record.
    Tune's record (`scored`, its rows with a score) when there is no checkpoint to read.
    """
    def epoch(m) -> dict:
        return {"epoch": int(m["epoch"]) + 1, **{k: float(m[k]) for k in HISTORY_KEYS},
                "epoch_time": float(m.get("epoch_time", math.nan))}

    def timed(history: list[dict]) -> list[dict]:
        """time_s: seconds from the trial's start to the end of each epoch (training and validation)."""
        elapsed = 0.0
        for h in history:
            elapsed += h.pop("epoch_time")
            h["time_s"] = elapsed
        return history

    if checkpoint_path:
        try:
            with fs.open_input_stream(f"{checkpoint_path}/metrics.jsonl") as f:
                return timed([epoch(json.loads(line)) for line in f.read().decode().splitlines() if line.strip()])
        except (OSError, ValueError, KeyError):  # gone, unreadable: Tune's record is next best
            pass
    return [] if scored is None else timed([epoch(r) for _, r in scored.iterrows()])


def anytime(rows: list[TrialRow]) -> list[dict]:
    """The anytime curve of a search: (trial-epochs spent, best validation score so far) after each
    epoch of every trial, in the order the epochs ended (each trial's start plus its epochs' times;
    by trial start and epoch where a record has no times). It is the search's result as a function
    of the compute it spent, the figure on which early stopping and running every trial to the end
    compare at equal compute."""
    events = []
    for r in rows:
        for h in r.history:
            when = (r.started or 0.0) + h.get("time_s", math.nan)
            events.append((when if not math.isnan(when) else math.inf, r.started or 0.0, h["epoch"], h["score"]))
    events.sort(key=lambda e: e[:3])
    best, out = -math.inf, []
    for spent, (*_, score) in enumerate(events, start=1):
        best = max(best, score) if not math.isnan(score) else best
        out.append({"trial_epochs": spent, "best_score": best})
    return out


def leaderboard_csv(rows: list[TrialRow]) -> str:
    """The leaderboard as CSV; `epoch_scores` is every epoch's validation score (the rung scores
    early stopping acted on), space-separated."""
    return csv_text([{**vars(r), "epoch_scores": " ".join(f"{h['score']:.4f}" for h in r.history)} for r in rows],
                    LEADERBOARD_COLUMNS)


def rung_correlations(rows: list[TrialRow]) -> list[dict]:
    """How well the score after each epoch predicts where a trial ends: for every epoch k before
    the last, the Spearman correlation, over the trials that trained all their epochs, between their
    score after k epochs and their best score (what the leaderboard ranks by). Trials stopped early
    have no final score and are left out, so the figure is about the rule's input, not its outcome.
    {epoch, trials, spearman}: spearman is None with fewer than 3 such trials or constant scores."""
    from scipy.stats import spearmanr  # heavy: only here

    finished = [r for r in rows if r.status == "finished" and r.history]
    if not finished:
        return []
    last = min(len(r.history) for r in finished)
    out = []
    for k in range(1, last):
        now = [r.history[k - 1]["score"] for r in finished]
        final = [r.best_score for r in finished]
        rho = None
        if len(finished) >= 3 and len(set(now)) > 1 and len(set(final)) > 1:
            rho = float(spearmanr(now, final).statistic)
        out.append({"epoch": k, "trials": len(finished), "spearman": rho})
    return out


def format_leaderboard(rows: list[TrialRow]) -> str:
    latency = any(r.latency_ms is not None for r in rows)
    shown = [{"trial": r.trial_id, "status": r.status, "score": r.best_score,
              "best epoch": "" if r.best_epoch is None else r.best_epoch, "epochs": r.epochs_run,
              **({"ms/slice": "" if r.latency_ms is None else f"{r.latency_ms:.2f}",
                  "front": "*" if r.pareto else ""} if latency else {}),
              "configuration": r.config[:90]} for r in rows]
    return format_table(shown, floats="{:.4f}")
