"""The report's figures: matplotlib figures from leaderboard rows and volumes, nothing written here."""

from __future__ import annotations

import math

import numpy as np

from gitseg.data.uwmgi import CLASSES
from gitseg.records import CandidateRow, TrialRow
from gitseg.tables import label

COLOURS = {"large_bowel": "#e6194b", "small_bowel": "#3cb44b", "stomach": "#4363d8"}


def _plt():
    import matplotlib  # heavy: only a report loads it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the headless backend is chosen

    return plt


def learning_curves(rows: list[TrialRow]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if not r.history:
            continue
        epochs, scores = [p["epoch"] for p in r.history], [p["score"] for p in r.history]
        line, = ax.plot(epochs, scores, marker="o", ms=3, label=f"{r.trial_id} ({r.status})")
        if r.status == "stopped early":
            ax.plot(epochs[-1], scores[-1], "x", color=line.get_color(), ms=10, mew=2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("validation score")
    ax.set_title("Score per epoch (x: stopped by ASHA)")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def best_so_far(rows: list[TrialRow]):
    plt = _plt()
    done = sorted([r for r in rows if r.history], key=lambda r: r.started or 0.0)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    best = np.maximum.accumulate([r.best_score for r in done]) if done else []
    ax.step(range(1, len(done) + 1), best, where="post")
    ax.scatter(range(1, len(done) + 1), [r.best_score for r in done], s=12, color="grey")
    ax.set_xlabel("trial (in start order)")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("best validation score so far")
    ax.set_title("Best-so-far")
    return fig


def anytime_curve(points: list[dict], budget: int | None = None):
    """Best score so far against trial-epochs spent (SearchRecord.anytime)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    spent, best = [p["trial_epochs"] for p in points], [p["best_score"] for p in points]
    ax.step(spent, best, where="post")
    if budget:
        ax.axvline(budget, color="red", lw=0.8, ls="--", label=f"budget {budget}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("trial-epochs spent (all trials, in the order their epochs ended)")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("best validation score so far")
    ax.set_title("Anytime curve")
    return fig


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator  # heavy, as above

    return MaxNLocator(integer=True)


def parameter_effects(rows: list[TrialRow]):
    """One panel per searched parameter: score by value (categorical) or against it (numeric)."""
    plt = _plt()
    ok = [r for r in rows if not math.isnan(r.best_score)]
    params = sorted({k for r in ok for k in r.values})
    if not params:
        return None, []
    cols = min(4, len(params))
    nrows = -(-len(params) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(params):]:
        ax.axis("off")
    table = []
    for ax, p in zip(axes.flat, params):
        pairs = [(r.values[p], r.best_score) for r in ok if p in r.values]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in pairs)
        if numeric and len({v for v, _ in pairs}) > 3:
            ax.scatter([v for v, _ in pairs], [s for _, s in pairs], s=15)
            if all(v > 0 for v, _ in pairs) and max(v for v, _ in pairs) / min(v for v, _ in pairs) > 20:
                ax.set_xscale("log")
        else:
            groups: dict[str, list[float]] = {}
            for v, s in pairs:
                groups.setdefault(label(v), []).append(s)
            names = sorted(groups)
            ax.bar(names, [max(groups[n]) for n in names], color="#bbb", label="best")
            ax.scatter(names, [np.mean(groups[n]) for n in names], color="k", zorder=3, s=12, label="mean")
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
            table += [{"parameter": p, "value": n, "trials": len(groups[n]), "mean score": float(np.mean(groups[n])),
                       "best score": float(max(groups[n]))} for n in names]
        ax.set_title(p, fontsize=9)
    for row in axes:
        row[0].set_ylabel("best score of the trial")
    fig.tight_layout()
    return fig, table


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, title: str, shade: np.ndarray | None = None):
    """Scan slice with ground-truth (solid) and predicted (dashed) contours per class; `shade` (bool
    `(H, W)`), if given, drawn in translucent yellow (where the members disagree)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image, cmap="gray")
    if shade is not None and shade.any():
        yellow = plt.matplotlib.colors.ListedColormap(["#ffe119"])
        ax.imshow(np.ma.masked_where(~shade, shade.astype(np.float32)), cmap=yellow, alpha=0.5, vmin=0, vmax=1)
    for c, cls in enumerate(CLASSES):
        if gt[c].any():
            ax.contour(gt[c], levels=[0.5], colors=COLOURS[cls], linewidths=1.5)
        if pred[c].any():
            ax.contour(pred[c], levels=[0.5], colors=COLOURS[cls], linewidths=1.2, linestyles="dashed")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return fig


def latency_front(candidates: list[CandidateRow], chosen: tuple[float, float], budget: float | None, device: str):
    """OOF score against measured ms per slice: every candidate ensemble, the front, the chosen one."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter([c.ms_per_slice for c in candidates], [c.oof_score for c in candidates], s=14, color="#bbb",
               label="candidates")
    front = sorted((c for c in candidates if c.on_front), key=lambda c: c.ms_per_slice)
    ax.step([c.ms_per_slice for c in front], [c.oof_score for c in front], where="post", color="k",
            marker="o", ms=4, label="Pareto front")
    ax.scatter([chosen[0]], [chosen[1]], marker="*", s=220, color="#e6194b", zorder=4, label="the ensemble built")
    if budget is not None:
        ax.axvline(budget, color="#e6194b", ls="--", lw=1, label=f"budget {budget:g} ms")
    ax.set_xlabel(f"ms per slice ({device})", fontsize=8)
    ax.set_ylabel("OOF score, thresholds tuned")
    ax.set_title("Latency front: score against measured inference time")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def search_front(rows: list[TrialRow]):
    """A multi-objective search's trials: best score against measured latency, the front marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    measured = [r for r in rows if r.latency_ms is not None and not math.isnan(r.best_score)]
    ax.scatter([r.latency_ms for r in measured], [r.best_score for r in measured], s=16, color="#bbb", label="trials")
    front = sorted((r for r in measured if r.pareto), key=lambda r: r.latency_ms)
    ax.step([r.latency_ms for r in front], [r.best_score for r in front], where="post", color="k", marker="o", ms=5,
            label="Pareto front")
    for r in front:
        ax.annotate(r.trial_id[-5:], (r.latency_ms, r.best_score), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("inference ms per slice (each trial's device)")
    ax.set_ylabel("best validation score")
    ax.set_title("Multi-objective search: score against latency")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def robustness(table: list[dict], clean: float):
    """Holdout score against severity, one line per corruption, the clean score dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = list(dict.fromkeys(r["corruption"] for r in table if r["corruption"] != "clean"))
    for name in names:
        points = sorted((r["severity"], r["score"]) for r in table if r["corruption"] == name)
        ax.plot([0] + [p[0] for p in points], [clean] + [p[1] for p in points], marker="o", ms=3, label=name)
    ax.axhline(clean, color="k", ls="--", lw=1, label="clean")
    ax.set_xticks([0, 1, 2, 3])
    ax.set_xlabel("severity (0: clean)")
    ax.set_ylabel("holdout score")
    ax.set_title("Robustness: score under MRI corruptions")
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    return fig


def review_scatter(disagreement: list[float], scores: list[float], worst: list[bool], auroc: float):
    """Each holdout case-day's disagreement of the members against its true score; the worst quarter
    (by true score) marked: a useful review list puts them at the right."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    d, s, w = np.asarray(disagreement), np.asarray(scores), np.asarray(worst, dtype=bool)
    ax.scatter(d[~w], s[~w], s=22, color="#4363d8", label="other case-days")
    ax.scatter(d[w], s[w], s=30, color="#e6194b", marker="s", label="worst quarter (true score)")
    ax.set_xlabel("members' disagreement (1 - pooled pairwise Dice)")
    ax.set_ylabel("holdout score of the case-day")
    ax.set_title(f"Disagreement against the true score (AUROC for the worst quarter {auroc:.2f})", fontsize=9)
    ax.legend(fontsize=7)
    return fig
