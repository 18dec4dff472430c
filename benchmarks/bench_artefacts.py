"""Does training with MRI artefacts narrow the drop under them, at equal compute? (issue 17)

Trains one configuration (configs/demo.yaml, the demo's 3 epochs) twice on every fold of a cache,
with the same seed, steps and epochs: on plain samples, and with `data.artefacts` (all nine of
gitseg.data.artefacts, each with probability `--prob` per sample, amounts up to severity 2). Each
becomes a one-configuration ensemble (`gitseg ensemble --topk 1`: its fold models, flip TTA,
post-processing tuned on its OOF), and `gitseg robustness` scores its holdout clean and under
each artefact. Printed: per corruption and severity, each model's drop from its own clean score
and the difference of the two drops with a 95% paired bootstrap interval over holdout cases.
Training runs in this process (fit(), no Ray). Protocol and results: BENCHMARKS.md.

    python benchmarks/bench_artefacts.py [--cache runs/bench_gain/cache] [--out runs/bench_artefacts]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from ensemble.robustness.robustness import run_robustness
from ensemble.selection.build import build_ensemble
from ensemble.selection.evaluate import scores_from_rows
from gitseg import records
from gitseg.checkpoint import load_checkpoint, model_from_checkpoint
from gitseg.config import load_config
from gitseg.data.artefacts import ARTEFACTS
from gitseg.data.cache import Cache
from gitseg.infer import cpu_has_native_bf16
from gitseg.oof import write_oof
from gitseg.records import REFIT_RECORD, SEARCH_RECORD, RefitModel, RefitRecord, SearchRecord
from gitseg.train import fit

QUIET = dict(log=lambda *_: None)


def train_arm(name: str, artefacts: list[str], args, cache: Cache) -> Path:
    """Both folds of the configuration into `<out>/<name>` as a search folder with its refit."""
    root = Path(args.out) / name
    models = []
    for fold in range(cache.manifest["folds"]):
        out = root / "refit_runs" / f"fold{fold}"
        cfg = load_config(args.config, [f"data.cache={cache.root}", f"out={out}", f"data.fold={fold}",
                                        f"train.epochs={args.epochs}", f"data.artefact_prob={args.prob}"])
        cfg.data.artefacts = list(artefacts)
        started = time.perf_counter()
        best = fit(cfg, **QUIET)
        model = model_from_checkpoint(load_checkpoint(out / "best.pt"))
        write_oof(model, cache, cache.case_days(folds=[fold]), out / "oof", cfg.data.channels, cfg.data.stride, "hflip")
        print(f"{name}: fold {fold} best score {best['score']:.4f} (epoch {best['epoch'] + 1}), "
              f"{time.perf_counter() - started:.0f} s")
        models.append(RefitModel(rank=0, trial_id=name, fold=fold, values={"data.artefacts": artefacts},
                                 score=best["score"], best_epoch=best["epoch"] + 1, error=None,
                                 checkpoint=str(out / "best.pt"), oof=str(out / "oof")))
    records.save(SearchRecord(settings={}, base={"data": {"cache": str(cache.root)}}, cache="", leaderboard=[]),
                 root / SEARCH_RECORD)
    records.save(RefitRecord(folds=list(range(cache.manifest["folds"])), tta="hflip", models=models),
                 root / REFIT_RECORD)
    return root


def drop_difference(a: dict, b: dict, key: str, n: int = 1000, seed: int = 0) -> dict:
    """(b's drop at `key`) - (a's drop), each from its own clean score, with a 95% interval from a
    paired bootstrap over cases (the same resample for the four score sets)."""
    sets = [a["rows"]["clean/0"], a["rows"][key], b["rows"]["clean/0"], b["rows"][key]]
    cases = sorted({r["case"] for r in sets[0]})

    def diff(sample) -> float:
        s = [scores_from_rows([r for c in sample for r in rows if r["case"] == c])["score"] for rows in sets]
        return (s[3] - s[2]) - (s[1] - s[0])

    rng = np.random.default_rng(seed)
    draws = [diff(list(rng.choice(cases, len(cases)))) for _ in range(n)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"difference": diff(cases), "ci95": [float(lo), float(hi)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/bench_gain/cache")
    parser.add_argument("--out", default="runs/bench_artefacts")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--prob", type=float, default=0.1)
    parser.add_argument("--severities", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--resamples", type=int, default=300, help="bootstrap resamples of the drop differences")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; {platform.processor() or platform.machine()}; native bf16: {cpu_has_native_bf16()}")
    cache = Cache(args.cache)
    results = {}
    for name, artefacts in (("plain", []), ("artefacts", list(ARTEFACTS))):
        started = time.perf_counter()
        root = train_arm(name, artefacts, args, cache)
        build_ensemble(root, topk=1, **QUIET)
        print(f"{name}: trained and ensembled in {(time.perf_counter() - started) / 60:.1f} min")
        results[name] = run_robustness(root / "ensemble", severities=args.severities, **QUIET)
    plain, trained = results["plain"], results["artefacts"]
    print(f"\nclean holdout score: plain {plain['clean_score']:.4f}, with artefacts {trained['clean_score']:.4f} "
          f"({len(plain['holdout_case_days'])} case-days, {plain['cases']} cases)")
    print(f"{'corruption':<18} sev  plain drop  artefacts drop  difference [95%]")
    summary = []
    for row_a, row_b in zip(plain["table"][1:], trained["table"][1:]):
        key = f"{row_a['corruption']}/{row_a['severity']}"
        d = drop_difference(plain, trained, key, n=args.resamples)
        summary.append({"corruption": row_a["corruption"], "severity": row_a["severity"], "plain_drop": row_a["drop"],
                        "artefacts_drop": row_b["drop"], **d})
        print(f"{row_a['corruption']:<18} {row_a['severity']:>3}  {row_a['drop']:+.4f}     {row_b['drop']:+.4f}"
              f"        {d['difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
    (Path(args.out) / "bench_artefacts.json").write_text(json.dumps(
        {"commit": commit, "clean": {"plain": plain["clean_score"], "artefacts": trained["clean_score"]},
         "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
