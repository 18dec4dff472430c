"""`gitseg report`: a static, offline report of a search run and its ensemble.

One `index.html` with its figures beside it (`figures/*.png`), the same tables as Markdown
(`report.md`) and CSV (`tables/*.csv`). No script, font or style is fetched from anywhere: the
HTML only references files in its own folder.
"""

from __future__ import annotations

import csv
import html
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path

import numpy as np

from gitseg.data.cache import split_summary
from gitseg.data.cache import Cache
from gitseg.data.uwmgi import CLASSES
from gitseg.files import staged_folder
from gitseg.metrics import score_from_sums
from gitseg.progress import say

COLOURS = {"large_bowel": "#e6194b", "small_bowel": "#3cb44b", "stomach": "#4363d8"}
PACKAGES = ("gitseg", "torch", "torchvision", "segmentation-models-pytorch", "ray", "optuna", "numpy", "scipy",
            "albumentations", "nibabel")
BOOTSTRAP = 1000


# ---------------------------------------------------------------------------------------------
# Tables: one list of dict rows → CSV, Markdown and HTML


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4f}")
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")).replace("|", "\\|") for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>(none)</em></p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Report:
    """Collects sections; writes HTML, Markdown and CSV together."""

    def __init__(self, out: Path, title: str):
        self.out, self.title = out, title
        self.parts: list[tuple[str, str, object]] = []  # (kind, heading or name, payload)
        (out / "figures").mkdir(parents=True, exist_ok=True)
        (out / "tables").mkdir(parents=True, exist_ok=True)

    def section(self, heading: str) -> None:
        self.parts.append(("section", heading, None))

    def text(self, text: str) -> None:
        self.parts.append(("text", "", text))

    def table(self, name: str, rows: list[dict], caption: str = "") -> None:
        with open(self.out / "tables" / f"{name}.csv", "w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
        self.parts.append(("table", caption or name, rows))

    def figure(self, fig, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        fig.savefig(self.out / "figures" / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.parts.append(("figure", caption, f"figures/{name}.png"))

    def write(self) -> None:
        md = [f"# {self.title}\n"]
        body = [f"<h1>{html.escape(self.title)}</h1>", "<nav>"]
        body += [f'<a href="#s{i}">{html.escape(h)}</a>' for i, (k, h, _) in enumerate(self.parts) if k == "section"]
        body.append("</nav>")
        for i, (kind, heading, payload) in enumerate(self.parts):
            if kind == "section":
                md.append(f"\n## {heading}\n")
                body.append(f'<h2 id="s{i}">{html.escape(heading)}</h2>')
            elif kind == "text":
                md.append(f"{payload}\n")
                body.append(f"<p>{html.escape(payload)}</p>")
            elif kind == "table":
                md.append(f"**{heading}**\n\n{markdown_table(payload)}")
                body.append(f"<h3>{html.escape(heading)}</h3>{html_table(payload)}")
            else:
                md.append(f"![{heading}]({payload})\n")
                body.append(f'<figure><img src="{payload}" alt="{html.escape(heading)}">'
                            f"<figcaption>{html.escape(heading)}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "font-size:13px;text-align:right}th{background:#f0f0f0}nav a{margin-right:1em}"
                 "img{max-width:100%}figcaption{font-size:13px;color:#555}h2{border-bottom:1px solid #ddd}")
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
        (self.out / "index.html").write_text(page)
        (self.out / "report.md").write_text("\n".join(md))


# ---------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(rows: list[dict]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        h = r.get("history") or []
        if not h:
            continue
        epochs, scores = [p["epoch"] for p in h], [p["score"] for p in h]
        line, = ax.plot(epochs, scores, marker="o", ms=3, label=f"{r['trial_id']} ({r['status']})")
        if r["status"] == "stopped early":
            ax.plot(epochs[-1], scores[-1], "x", color=line.get_color(), ms=10, mew=2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("validation score")
    ax.set_title("Score per epoch (x: stopped by ASHA)")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def best_so_far(rows: list[dict]):
    plt = _plt()
    done = sorted([r for r in rows if r.get("history")], key=lambda r: r.get("started", 0.0))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    best = np.maximum.accumulate([r["best_score"] for r in done]) if done else []
    ax.step(range(1, len(done) + 1), best, where="post")
    ax.scatter(range(1, len(done) + 1), [r["best_score"] for r in done], s=12, color="grey")
    ax.set_xlabel("trial (in start order)")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("best validation score so far")
    ax.set_title("Best-so-far")
    return fig


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def parameter_effects(rows: list[dict]):
    """One panel per searched parameter: score by value (categorical) or against it (numeric)."""
    plt = _plt()
    ok = [r for r in rows if not math.isnan(r["best_score"])]
    params = sorted({k for r in ok for k in r.get("values", {})})
    if not params:
        return None, []
    cols = min(4, len(params))
    nrows = -(-len(params) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(params):]:
        ax.axis("off")
    table = []
    for ax, p in zip(axes.flat, params):
        pairs = [(r["values"][p], r["best_score"]) for r in ok if p in r["values"]]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in pairs)
        if numeric and len({v for v, _ in pairs}) > 3:
            ax.scatter([v for v, _ in pairs], [s for _, s in pairs], s=15)
            if all(v > 0 for v, _ in pairs) and max(v for v, _ in pairs) / min(v for v, _ in pairs) > 20:
                ax.set_xscale("log")
        else:
            groups: dict[str, list[float]] = {}
            for v, s in pairs:
                groups.setdefault(_label(v), []).append(s)
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


def _label(value) -> str:
    if isinstance(value, list):
        return "+".join(v["name"] if isinstance(v, dict) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, title: str):
    """Scan slice with ground-truth (solid) and predicted (dashed) contours per class."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image, cmap="gray")
    for c, cls in enumerate(CLASSES):
        if gt[c].any():
            ax.contour(gt[c], levels=[0.5], colors=COLOURS[cls], linewidths=1.5)
        if pred[c].any():
            ax.contour(pred[c], levels=[0.5], colors=COLOURS[cls], linewidths=1.2, linestyles="dashed")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return fig


# ---------------------------------------------------------------------------------------------
# Statistics


def bootstrap_by_case(rows: list[dict], clinical: list[dict], n: int = BOOTSTRAP, seed: int = 0) -> list[dict]:
    """Per class and overall: score, Dice, Hausdorff and HD95 with 95% intervals, resampling cases."""
    rng = np.random.default_rng(seed)
    cases = sorted({r["case"] for r in rows})
    sums = {(case, cls): np.zeros(4) for case in cases for cls in CLASSES}
    for r in rows:
        sums[(r["case"], r["class"])] += np.asarray(r["sums"])
    hd95 = {(case, cls): [] for case in cases for cls in CLASSES}
    for r in clinical:
        if r["hd95_mm"] is not None and math.isfinite(r["hd95_mm"]):
            hd95[(r["case"], r["class"])].append(r["hd95_mm"])

    def stats(sample):
        out = {}
        for cls in (*CLASSES, "all"):
            classes = CLASSES if cls == "all" else (cls,)
            total = sum(sums[(c, k)] for c in sample for k in classes)
            s = score_from_sums(*total)
            values = [v for c in sample for k in classes for v in hd95[(c, k)]]
            out[cls] = (s["score"], s["dice"], s["hausdorff"], float(np.mean(values)) if values else math.nan)
        return out

    point = stats(cases)
    draws = [stats(list(rng.choice(cases, size=len(cases), replace=True))) for _ in range(n)]
    table = []
    for cls in (*CLASSES, "all"):
        row = {"class": cls, "cases": len(cases)}
        for i, name in enumerate(("score", "dice", "hausdorff", "hd95_mm")):
            values = np.array([d[cls][i] for d in draws], dtype=float)
            values = values[~np.isnan(values)]
            lo, hi = np.percentile(values, [2.5, 97.5]) if len(values) else (math.nan, math.nan)
            row[name] = point[cls][i]
            row[f"{name} 95% CI"] = f"[{lo:.3f}, {hi:.3f}]"
        table.append(row)
    return table


# ---------------------------------------------------------------------------------------------
# The report


def versions() -> list[dict]:
    rows = []
    for name in PACKAGES:
        try:
            rows.append({"package": name, "version": importlib.metadata.version(name)})
        except importlib.metadata.PackageNotFoundError:
            rows.append({"package": name, "version": "not installed"})
    return rows


def build_report(run_dir, ensemble_dir=None, out=None, log=say) -> Path:
    """Write the report of search folder `run_dir` (and its ensemble) to `out`; returns index.html."""
    run_dir = Path(run_dir)
    search_path = run_dir / "search.json"
    if not search_path.is_file():
        raise FileNotFoundError(f"no search.json in {run_dir}; point --run at a finished search folder "
                                f"(<storage_path>/<name>)")
    if ensemble_dir is None and (run_dir / "ensemble" / "ensemble.json").is_file():
        ensemble_dir = run_dir / "ensemble"
    out = Path(out) if out is not None else run_dir / "report"
    with staged_folder(out) as staging:
        _write(run_dir, Path(ensemble_dir) if ensemble_dir else None, staging, log)
    log(f"report: {out / 'index.html'}")
    return out / "index.html"


def _write(run_dir: Path, ensemble_dir: Path | None, out: Path, log) -> None:
    search = json.loads((run_dir / "search.json").read_text())
    manifest = json.loads((ensemble_dir / "ensemble.json").read_text()) if ensemble_dir else None
    cache_dir = manifest["source"]["cache"] if manifest else search["base"]["data"]["cache"]
    cache = Cache(cache_dir)
    rep = Report(out, f"gitseg report: {search.get('settings', {}).get('name', run_dir.name)}")
    rep.text(f"Search folder {run_dir.resolve()}" + (f"; ensemble {ensemble_dir.resolve()}" if ensemble_dir else "")
             + ". Scores use the competition metric, kaggle convention: 0.4 x Dice (per slice and class, "
               "both-empty rows skipped) + 0.6 x (1 - Hausdorff) (per case-day and class, unit-cube "
               "coordinates divided by sqrt(3)).")

    log("report: data")
    rep.section("Data")
    rep.text(f"Cache {cache.root.resolve()} ({cache.size} px network input), source {cache.manifest['source']}, "
             f"{cache.manifest['folds']} folds grouped by case; holdout cases are used by the ensemble's final "
             f"evaluation only.")
    rep.table("data_splits", split_summary(cache.manifest), "Case-days, slices, image sizes, empty-slice fraction "
              "and the fraction of slices showing each organ, per split")

    log("report: search")
    rows = search.get("leaderboard", [])
    rep.section("Search")
    settings = search.get("settings", {})
    rep.text(f"{len(rows)} trials; ASHA {'on' if settings.get('asha', {}).get('enabled') else 'off'} "
             f"({settings.get('asha')}); {settings.get('workers', {}).get('num_workers')} DDP workers per trial; "
             f"validation fold {settings.get('fold')}.")
    rep.table("leaderboard", [{"trial": r["trial_id"], "status": r["status"], "best score": r["best_score"],
                               "best epoch": r["best_epoch"] or "", "epochs": r["epochs_run"],
                               "time s": r.get("time_s", math.nan), "configuration": r["config"]} for r in rows],
              "Leaderboard")
    if any(r.get("history") for r in rows):
        rep.figure(learning_curves(rows), "learning_curves", "Validation score of every trial per epoch; "
                   "x marks a trial ASHA stopped early")
        rep.figure(best_so_far(rows), "best_so_far", "Best score found so far, trials in start order")
    fig, effects = parameter_effects(rows)
    if fig is not None:
        rep.figure(fig, "parameter_effects", "Score by hyperparameter (bars: best, dots: mean; numeric "
                   "parameters as scatter)")
        rep.table("parameter_effects", effects, "Score by value of each categorical hyperparameter")
    failed = [{"trial": r["trial_id"], "configuration": r["config"], "error": r["error"]}
              for r in rows if r["status"] == "failed"]
    rep.table("failed_trials", failed, "Failed trials and why")

    refit_path = run_dir / "refit.json"
    if refit_path.is_file():
        log("report: cross-validation")
        refit = json.loads(refit_path.read_text())
        rep.section("Cross-validation of the refit configurations")
        oof = {c["name"]: c["oof_score"] for c in manifest["selection"]["configurations"]} if manifest else {}
        table = []
        for rank in sorted({m["rank"] for m in refit["models"]}):
            ms = [m for m in refit["models"] if m["rank"] == rank]
            row = {"configuration": f"rank{rank}", "trial": ms[0]["trial_id"]}
            for m in sorted(ms, key=lambda m: m["fold"]):
                row[f"fold {m['fold']}"] = m["score"] if m["score"] is not None else f"failed: {m['error']}"
            scores = [m["score"] for m in ms if m["score"] is not None]
            row["mean of folds"] = float(np.mean(scores)) if scores else math.nan
            row["pooled OOF score"] = oof.get(f"rank{rank}", math.nan)
            row["values"] = " ".join(f"{k}={_label(v)}" for k, v in ms[0]["values"].items())
            table.append(row)
        rep.table("cross_validation", table, "Validation score per fold (best epoch) and the score of the "
                  "pooled out-of-fold probabilities at threshold 0.5")

    if manifest:
        _ensemble_sections(rep, manifest, ensemble_dir, cache, log)

    rep.section("Reproducibility")
    rep.table("versions", versions(), "Versions")
    machine = manifest.get("machine", {}) if manifest else {}
    rep.table("machine", [{"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), **{f"ensemble {k}": v for k, v in machine.items()}}], "Machine")
    timings = []
    for r in rows:
        if not math.isnan(r.get("time_s", math.nan)):
            timings.append({"stage": f"trial {r['trial_id']}", "seconds": r["time_s"]})
    if manifest:
        timings += [{"stage": f"ensemble {k}", "seconds": v} for k, v in manifest.get("timings", {}).items()]
    demo_timings = run_dir / "timings.json"
    if demo_timings.is_file():
        timings += [{"stage": k, "seconds": v} for k, v in json.loads(demo_timings.read_text()).items()]
    rep.table("timings", timings, "Timings")
    rep.text("Search settings: " + json.dumps(settings, default=str))
    rep.text("Base configuration: " + json.dumps(search.get("base", {}), default=str))
    rep.write()


def _ensemble_sections(rep: Report, manifest: dict, ensemble_dir: Path, cache: Cache, log) -> None:
    from ensemble.build import per_case_table

    log("report: ensemble")
    rep.section("Ensemble")
    sel = manifest["selection"]
    rep.text(f"Selection: {sel['method']}: {sel['why']}. TTA: {manifest['tta']}.")
    rep.table("selection", [{"configuration": c["name"], "trial": c["trial_id"], "OOF score": c["oof_score"],
                             "selected": c["selected"], "weight": c["weight"],
                             "values": " ".join(f"{k}={_label(v)}" for k, v in c["values"].items())}
                            for c in sel["configurations"]], "Refit configurations and the selection")
    rep.text("Selection log: " + " | ".join(sel["log"]))
    post = manifest["postprocess"]
    rep.table("postprocess", [{"class": cls, "threshold": post["thresholds"][c], "min component voxels":
                               post["min_size"][c], "min pixels per slice": post["min_pixels"][c]}
                              for c, cls in enumerate(CLASSES)], "Post-processing tuned on out-of-fold predictions")
    rep.table("tuning_steps", [{"step": s["step"], "OOF before": s["before"], "OOF after": s["after"],
                                "kept": s["kept"], "values": str(s["values"])}
                               for s in manifest["scores"]["oof"]["tuning_steps"]],
              "Tuning steps (a step is kept only if it raises the OOF score)")
    holdout = manifest["scores"].get("holdout")
    if not holdout:
        rep.text("No holdout evaluation (the cache has no holdout cases).")
        return
    rep.section("Holdout evaluation")
    rep.text(f"{len(holdout['case_days'])} holdout case-days from {len({cache.entries[cd]['case'] for cd in holdout['case_days']})} "
             f"cases, never used for training, selection or tuning. Best single fold model: "
             f"{holdout['best_single_fold_model']}; best single configuration: {holdout['best_single_configuration']}.")
    rep.table("ablation", [{k: r[k] for k in ("variant", "detail", "members", "tta", "score", "dice", "hausdorff",
                                              "gain")} for r in holdout["ablation"]],
              "Ablation on the holdout (gain: over the row above)")
    evaluation = json.loads((ensemble_dir / "evaluation.json").read_text())
    final_rows = evaluation["rows"][holdout["ablation"][-1]["variant"]]
    rep.table("holdout_per_class", holdout["per_class"], "Per class: competition terms, 3D Dice, HD95 and ASSD in mm "
              "(volumes where both masks are non-empty; missed_or_spurious: one of them empty)")
    rep.table("holdout_bootstrap", bootstrap_by_case(final_rows, evaluation["clinical"]),
              f"95% bootstrap intervals over holdout cases ({BOOTSTRAP} resamples)")
    per_case = per_case_table(final_rows)
    rep.table("holdout_per_case", per_case, "Per case-day, worst first")
    _overlays(rep, manifest, ensemble_dir, cache, per_case)


def _overlays(rep: Report, manifest: dict, ensemble_dir: Path, cache: Cache, per_case: list[dict]) -> None:
    """Best and worst slices of the best and worst holdout case-days, predicted again by the ensemble."""
    import cv2

    from ensemble.model import EnsembleModel
    from ensemble.postprocess import apply
    from gitseg.metrics import dice_per_slice

    if not per_case:
        return
    model = EnsembleModel.load(ensemble_dir)
    picks = [("worst", per_case[0]["case_day"]), ("best", per_case[-1]["case_day"])]
    rep.section("Overlays")
    rep.text("Scan with ground truth (solid) and prediction (dashed) contours; red large bowel, green small "
             "bowel, blue stomach.")
    for which, case_day in picks:
        entry = cache.entries[case_day]
        out_size = (entry["height"], entry["width"])
        probs = model.probs({cache.size: cache.image(case_day)}, out_size)
        pred = apply(probs, model.post)
        gt = cache.original_masks(case_day)
        per_class = np.stack([dice_per_slice(pred[c], gt[c]) for c in range(3)])  # (3, D), NaN: both empty
        counted = (~np.isnan(per_class)).sum(axis=0)
        dice = np.where(counted > 0, np.nansum(per_class, axis=0) / np.maximum(counted, 1), np.nan)
        scored = np.flatnonzero(counted > 0)
        if not len(scored):
            continue
        area = gt.sum(axis=(0, 2, 3))
        z = int(scored[np.argmin(dice[scored])]) if which == "worst" else int(scored[np.argmax(dice[scored] + 1e-6 * area[scored])])
        image = cv2.resize(np.asarray(cache.image(case_day)[z], np.float32), (out_size[1], out_size[0]))
        rep.figure(overlay(image, gt[:, z], pred[:, z], f"{which} case-day {case_day}, slice {z + 1}, Dice {dice[z]:.3f}"),
                   f"overlay_{which}", f"{which.capitalize()} holdout case-day {case_day}: its "
                   f"{'worst' if which == 'worst' else 'best'} slice ({z + 1}), mean Dice over classes {dice[z]:.3f}")
