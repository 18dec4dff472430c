"""`gitseg demo`: the whole pipeline on the embedded default, each stage a library call.

synth → prepare → search (local Ray, ASHA, 2-worker DDP) + refit → ensemble → report.
Part of the CLI layer (docs/ARCHITECTURE.md): with `gitseg.cli`, the one place that knows every stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from gitseg.config import to_dict
from gitseg.data.cache import prepare
from gitseg.data.synth import write_dataset
from gitseg.phases import Phases
from gitseg.progress import say

# The embedded default data set: 10 cases x 3 days, 64 slices, 128 px; a 64 px network input.
# Sized so the whole demo (4 trials, 2 configurations x 2 folds refit) fits 10 minutes on 2 cores:
# with 3 folds it took 11-13 minutes (BENCHMARKS.md, "The first run").
DATA = dict(cases=10, days=3, slices=64, size=128, seed=0, test_cases=1)
CACHE_SIZE = 64
FOLDS = 2


def run_demo(out="runs/demo", config="configs/search_demo.yaml", trials: int | None = None,
             epochs: int | None = None, data: dict | None = None, folds: int | None = None, topk: int = 2,
             holdout: float | None = None, overrides: list[str] | None = None, log=say) -> dict:
    """Run every stage into `out`; returns the headline numbers. `trials`, `epochs`, `data`, `folds` and
    `holdout` (the share of cases held out) change its size (the test suite runs a small one, a
    benchmark a larger holdout), `config` is the search config and `overrides` its `key=value` changes."""
    # The stages are imported here, as in gitseg.cli: the core never imports them at module level.
    from ensemble.report.report import build_report
    from ensemble.selection.build import build_ensemble
    from ensemble.selection.evaluate import SINGLE, TUNED_CONFIGURATION, TUNED_SINGLE
    from search.run import run_search
    from search.settings import load_search_config
    from search.storage import experiment_root

    out = Path(out)
    phases = Phases()

    def stage(name, fn):
        log(f"demo: {name} ...")
        with phases(name):
            result = fn()
        log(f"demo: {name} done in {phases.seconds[name]:.0f} s")
        return result

    stage("synth", lambda: write_dataset(out / "data", **{**DATA, **(data or {})}, overwrite=True))
    split = {"holdout": holdout} if holdout is not None else {}
    stage("prepare", lambda: prepare(out / "data", out / "cache", size=CACHE_SIZE, folds=folds or FOLDS, log=log,
                                     **split))
    settings = load_search_config(config, overrides)
    settings.storage_path = str(out / "search")
    settings.set = [*settings.set, f"data.cache={out / 'cache'}", f"out={out / 'train'}"]
    if epochs:
        settings.set.append(f"train.epochs={epochs}")
    if trials:
        settings.num_samples = trials
    run_dir = Path(experiment_root(settings.storage_path, settings.name))
    stage("search + refit", lambda: run_search(settings, log))
    manifest = stage("ensemble", lambda: build_ensemble(run_dir, topk=topk, log=log))
    (run_dir / "timings.json").write_text(json.dumps({f"demo {k}": v for k, v in phases.seconds.items()}, indent=1))
    index = stage("report", lambda: build_report(run_dir, log=log))
    holdout = manifest.scores.holdout
    headline = {"report": str(index), "ensemble": str(run_dir / "ensemble"), "elapsed_s": phases.timings()["total_s"],
                "holdout_score": holdout.score, "best_single_fold_model": holdout.ablation_score(TUNED_SINGLE),
                "best_single_fold_model_at_0.5": holdout.ablation_score(SINGLE),
                "best_single_configuration": holdout.ablation_score(TUNED_CONFIGURATION),
                "ensemble_gain": to_dict(holdout.ensemble_gain) if holdout.ensemble_gain else None,
                "ensemble_ms_per_slice": manifest.latency.ensemble_ms_per_slice if manifest.latency else None,
                "holdout_case_days": len(holdout.case_days)}
    log(f"demo: finished in {headline['elapsed_s'] / 60:.1f} min")
    # Both with TTA and post-processing tuned on their own out-of-fold predictions.
    log(f"demo: holdout score (kaggle convention, {headline['holdout_case_days']} case-days, both post-processed "
        f"as tuned on their OOF): ensemble {headline['holdout_score']:.4f} vs best single fold model "
        f"{headline['best_single_fold_model']:.4f}, best single configuration "
        f"{headline['best_single_configuration']:.4f}")
    log(f"demo: report {index}")
    (run_dir / "demo.json").write_text(json.dumps(headline, indent=1))
    return headline

