"""Replay Ray's asynchronous successive halving on the learning curves of a search without early stopping.

`bench_asha.py --save FILE` records every epoch of every trial of its FIFO arm (each trial runs all
its epochs). Trials there run one at a time, in a fixed order, and training is seeded, so what ASHA
would have done with the same configurations is fully determined by those curves: this script
feeds them, in trial order, to Ray's own bracket (`ray.tune.schedulers.async_hyperband._Bracket`,
the object `ASHAScheduler` consults) and stops a trial where the bracket says STOP. It answers "which
rung rule keeps the best configuration, and at what cost" in seconds instead of a 7-minute ASHA run
per rule; `--check` first replays the rule the recorded ASHA arm used and compares with what that
arm really did, so the replay is only trusted where it reproduces a real run.

    gitseg replay FILE [--check] [--metric score] [--grace 1 2] [--rf 3 4] [--max-t 8]

FILE can also be the `search.json` of your own search run with `asha.enabled: false` (every trial
runs all its epochs), to choose ASHA's grace period and reduction factor for your data: trials are
replayed in the order they started, which is exactly what ASHA sees when they run one at a time
and an approximation when several run at once.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from gitseg import records
from gitseg.records import SearchRecord


def load_curves(path: str) -> dict:
    """bench_asha.py --save output as is; a search's search.json turned into the same shape."""
    data = json.load(open(path))
    if "fifo" in data:
        return data
    if "leaderboard" not in data:
        raise ValueError(f"{path} is neither a bench_asha.py --save file nor a search.json")
    search = records.load(SearchRecord, path)
    if search.settings["asha"]["enabled"]:
        raise ValueError(f"{path} is a search with ASHA on: its stopped trials have no curves to replay; "
                         f"run the search with --set asha.enabled=false")
    rows = sorted((r for r in search.leaderboard if r.status == "finished"), key=lambda r: r.started or 0)
    if not rows:
        raise ValueError(f"{path}: no finished trial to replay")
    trials = [{"index": i + 1, "history": [{**h, "epochs_done": h["epoch"]} for h in r.history]}
              for i, r in enumerate(rows)]
    epochs = min(len(t["history"]) for t in trials)
    return {"args": {"epochs": epochs}, "fifo": {"trials": trials}}


def replay(trials: list[dict], metric: str, grace: int, rf: int, max_t: int, brackets: int = 1,
           rng=None) -> list[dict]:
    """Per trial (in run order): the epochs ASHA lets it run and the best score it reaches in them.
    With several brackets each trial is put in one the way Ray's AsyncHyperBandScheduler.on_trial_add
    draws it (weights e^(rungs - most rungs)), from `rng` (numpy Generator; needed then)."""
    # Ray's own bracket, imported here: the rest of the replay (and `gitseg --help`) does not need Ray
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    pool = [_Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=s) for s in range(brackets)]
    sizes = np.array([len(b._rungs) for b in pool])
    weights = np.e ** (sizes - sizes.max())
    out = []
    for trial in sorted(trials, key=lambda t: t["index"]):
        bracket = pool[0] if brackets == 1 else pool[rng.choice(brackets, p=weights / weights.sum())]
        handle = SimpleNamespace(trial_id=str(trial["index"]))
        ran = []
        for row in trial["history"][:max_t]:
            ran.append(row)
            if row["epochs_done"] >= max_t:
                break  # ASHAScheduler stops a trial at max_t without asking the bracket
            if bracket.on_result(handle, row["epochs_done"], row[metric]) == TrialScheduler.STOP:
                break
        out.append({"index": trial["index"], "epochs": len(ran), "best": max(r["score"] for r in ran)})
    return out


def brackets_table(trials: list[dict], grace: int, rf: int, max_t: int, most: int, draws: int = 400) -> list[dict]:
    """For 1..most brackets: the mean share of the epochs, the mean best score (as a share of the
    search without early stopping's) and how often the configuration that ends best is run to the
    end, over `draws` seeded draws of the trials' brackets."""
    full_epochs, full_best, full_index = without_early_stopping(trials, max_t)
    out = []
    for b in range(1, most + 1):
        rng = np.random.default_rng(0)
        runs = [replay(trials, "score", grace, rf, max_t, brackets=b, rng=rng) for _ in range(draws if b > 1 else 1)]
        out.append({"brackets": b,
                    "epochs": float(np.mean([sum(t["epochs"] for t in r) / full_epochs for r in runs])),
                    "best": float(np.mean([max(t["best"] for t in r) / full_best for r in runs])),
                    "kept": float(np.mean([next(t["epochs"] for t in r if t["index"] == full_index) == max_t
                                           for r in runs]))})
    return out


def best_after(result: list[dict], trials: list[dict], spend: int) -> float:
    """The best score seen once `spend` trial-epochs are spent, trials run one at a time in the
    order of `result` (replay's output: the epochs each got)."""
    curves = {t["index"]: t["history"] for t in trials}
    scores = [row["score"] for run in result for row in curves[run["index"]][:run["epochs"]]]
    return max(scores[:spend], default=0.0)


def anytime_pair(trials: list[dict], grace: int, rf: int, max_t: int, spend: int) -> tuple[float, float]:
    """(ASHA's, no early stopping's) best score once `spend` trial-epochs are spent, the trials run
    one at a time in index order."""
    ordered = sorted(trials, key=lambda t: t["index"])
    return (best_after(replay(ordered, "score", grace, rf, max_t), ordered, spend),
            best_after([{"index": t["index"], "epochs": max_t} for t in ordered], ordered, spend))


def anytime_orders(trials: list[dict], grace: int, rf: int, max_t: int, share: float, draws: int = 2000) -> dict:
    """How much the anytime result (the best score once `share` of the full search's trial-epochs are
    spent, as a share of its best) depends on the order the configurations come in: over `draws`
    seeded random orders of the recorded trials (the first kept first, as a search runs its base
    configuration first), the mean and the share of orders reaching 0.99, with ASHA (this rule)
    and without early stopping (every trial to the end) in the same orders."""
    full_epochs, full_best, _ = without_early_stopping(trials, max_t)
    spend = int(share * full_epochs)
    rng = np.random.default_rng(0)
    first, *rest = sorted(trials, key=lambda t: t["index"])
    ratios = []
    for _ in range(draws):
        order = [first] + [rest[i] for i in rng.permutation(len(rest))]
        pair = anytime_pair([{**t, "index": i + 1} for i, t in enumerate(order)], grace, rf, max_t, spend)
        ratios.append([b / full_best for b in pair])
    ratios = np.array(ratios)
    return {"spend": spend, "asha_mean": float(ratios[:, 0].mean()), "fifo_mean": float(ratios[:, 1].mean()),
            "asha_met": float((ratios[:, 0] >= 0.99).mean()), "fifo_met": float((ratios[:, 1] >= 0.99).mean())}


def rank_table(trials: list[dict], metric: str, max_t: int) -> list[tuple[int, float, int]]:
    """Per epoch k: Spearman correlation between the metric after k epochs and the best score in
    max_t epochs, over trials, and the rank after k epochs of the configuration that ends best."""
    from scipy.stats import spearmanr  # scipy.stats takes a second to import; only this table needs it

    final = [best_within(t, max_t) for t in trials]
    top = max(range(len(trials)), key=lambda i: final[i])
    rows = []
    for k in range(max_t):
        now = [t["history"][k][metric] for t in trials]
        rank = 1 + sum(v > now[top] for v in now)
        rows.append((k + 1, float(spearmanr(now, final).statistic), rank))
    return rows


def best_within(trial: dict, max_t: int) -> float:
    """The best score a trial reaches in its first max_t epochs."""
    return max(r["score"] for r in trial["history"][:max_t])


def summary(trials: list[dict]) -> tuple[int, float, int]:
    best = max(trials, key=lambda t: t["best"])
    return sum(t["epochs"] for t in trials), best["best"], best["index"]


def without_early_stopping(trials: list[dict], max_t: int) -> tuple[int, float, int]:
    """(trial-epochs, best score, its configuration) of the recorded search cut at max_t."""
    return summary([{"index": t["index"], "epochs": min(len(t["history"]), max_t), "best": best_within(t, max_t)}
                    for t in trials])


def replay_report(path, metric: str | None = None, grace=(1, 2), rf=(3, 4), max_t: int | None = None,
                  check: bool = False, brackets: int | None = None, anytime: float | None = None, show=print) -> None:
    """`gitseg replay`: what ASHA's rules would have done on the learning curves in `path` (a
    `bench_asha.py --save` file or a search.json without early stopping), printed with `show`.
    `check` first reproduces a recorded ASHA arm; `brackets` and `anytime` add their tables."""
    if anytime is not None and not 0 < anytime <= 1:
        raise ValueError(f"--anytime {anytime}: give the share of the trial-epochs as a number in (0, 1], e.g. 0.4")
    data = load_curves(path)
    fifo = data["fifo"]["trials"]
    max_t = max_t or data["args"]["epochs"]
    # the search without early stopping, cut at max_t (a search.json's trials carry only their curves)
    full_epochs, full_best, full_index = without_early_stopping(fifo, max_t)
    show(f"{len(fifo)} trials x {max_t} epochs without early stopping: {full_epochs} trial-epochs, best "
         f"{full_best:.4f} (configuration {full_index})")
    if check:
        if "asha" not in data:
            raise ValueError("--check needs a bench_asha.py --save file (it holds the real ASHA arm)")
        used = data["args"]
        replayed = replay(fifo, "score", used["grace_period"], used["reduction_factor"], used["epochs"])
        # a --budget arm also ran further configurations, which the search without early stopping has no curves of
        ran = {t["index"] for t in fifo}
        real = {t["index"]: (t["epochs"], round(t["best"], 6)) for t in data["asha"]["trials"] if t["index"] in ran}
        again = {t["index"]: (t["epochs"], round(t["best"], 6)) for t in replayed}
        if real != again:
            diff = {i: (real.get(i), again.get(i)) for i in sorted(set(real) | set(again))
                    if real.get(i) != again.get(i)}
            raise RuntimeError(f"the replay does not reproduce the recorded ASHA arm (trial: real, replayed): {diff}")
        show(f"check: the replay reproduces the recorded ASHA arm trial by trial "
             f"({sum(e for e, _ in real.values())} trial-epochs, best {max(b for _, b in real.values()):.4f})")
    rank_metric = metric or "score"
    show(f"how well the {rank_metric} after k epochs predicts the best score in {max_t} (Spearman over "
         f"{len(fifo)} trials), and where configuration {full_index} stands after k epochs:")
    for k, rho, rank in rank_table(fifo, rank_metric, max_t):
        show(f"  epoch {k}: rho {rho:+.2f}, configuration {full_index} ranks {rank} of {len(fifo)}")
    not_ranks = ("epoch", "epochs_done", "epoch_time", "train_loss", "hausdorff")
    metrics = [metric] if metric else [k for k in fifo[0]["history"][0] if k not in not_ranks]
    show(f"{'rung metric':22s} {'grace':>5s} {'rf':>3s} {'epochs':>7s} {'ratio':>6s} {'best':>7s} {'ratio':>6s}  "
         f"epochs given to configuration {full_index}")
    for name in metrics:
        for g in grace:
            for r in rf:
                result = replay(fifo, name, g, r, max_t)
                epochs, best, _ = summary(result)
                kept = next(t["epochs"] for t in result if t["index"] == full_index)
                show(f"{name:22s} {g:5d} {r:3d} {epochs:7d} {epochs / full_epochs:6.2f} {best:7.4f} "
                     f"{best / full_best:6.3f}  {kept}")
    if brackets:
        show(f"brackets (grace {grace[0]}, rf {rf[0]}; bracket b's first rung at grace x rf^b): mean share "
             f"of the epochs, mean best score / without early stopping's, share of draws that run configuration "
             f"{full_index} to the end")
        for row in brackets_table(fifo, grace[0], rf[0], max_t, brackets):
            show(f"  {row['brackets']} bracket(s): epochs {row['epochs']:.2f}, best {row['best']:.3f}, "
                 f"kept {row['kept']:.2f}")
    if anytime:
        spend = int(anytime * full_epochs)
        here, plain = (b / full_best for b in anytime_pair(fifo, grace[0], rf[0], max_t, spend))
        show(f"anytime: best after {spend} trial-epochs ({anytime:.0%}) / best without early stopping, "
             f"in the recorded order: ASHA (grace {grace[0]}, rf {rf[0]}) {here:.3f}, no early stopping {plain:.3f}")
        row = anytime_orders(fifo, grace[0], rf[0], max_t, anytime)
        show(f"  over 2,000 random orders (first configuration first): ASHA mean {row['asha_mean']:.3f}, "
             f">= 0.99 in {row['asha_met']:.0%}; no early stopping mean {row['fifo_mean']:.3f}, "
             f">= 0.99 in {row['fifo_met']:.0%}")
