"""A shortened demo end to end (real local Ray), and the report it leaves behind."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.slow
SECTIONS = ("Data", "Search", "Cross-validation of the refit configurations", "Ensemble", "Holdout evaluation",
            "Overlays", "Reproducibility")


@pytest.fixture(scope="module")
def demo(small_demo):
    out, stdout, _ = small_demo
    return out, stdout


def test_shortened_demo_runs_every_stage(demo):
    out, stdout = demo
    for stage in ("synth", "prepare", "search + refit", "ensemble", "report"):
        assert f"demo: {stage} done" in stdout
    run = out / "search" / "demo"
    headline = json.loads((run / "demo.json").read_text())
    assert 0 <= headline["holdout_score"] <= 1 and headline["holdout_case_days"] > 0
    assert "holdout score (kaggle convention" in stdout and str(run / "report" / "index.html") in stdout
    assert (run / "ensemble" / "ensemble.json").is_file()


def test_the_console_reads_like_a_tool_and_the_rest_is_in_the_log(small_demo):
    out, stdout, stderr = small_demo
    terminal = stdout + stderr
    # Stage lines, progress bars (carriage-return updates of one line each), the leaderboard, the
    # failed trial's reason and the results; the demo itself prints 38 lines at full size.
    assert len(terminal.splitlines()) <= 60, terminal
    assert len(re.findall(r"^\s*trial\s+status\s+score", stdout, re.M)) == 1, stdout  # the leaderboard, once
    assert re.search(r"search: trial \w+ failed: .*loss is", terminal)
    for noise in ("RayTrainWorker", "TrainController", "metrics={", "Trial status", "INFO", "WARNING"):
        assert noise not in terminal, noise
    log = out / "demo.log"
    assert f"is in {log}; --verbose" in stdout
    text = log.read_text()
    assert "RayTrainWorker" in text and "fit: fold 0 epoch 1/3" in text and "Trial status" in text


def test_report_has_every_section_and_no_network_reference(demo):
    out, _ = demo
    report = out / "search" / "demo" / "report"
    page = (report / "index.html").read_text()
    for heading in SECTIONS:
        assert f">{heading}</h2>" in page, heading
    for table in ("Leaderboard", "Ablation on the holdout", "95% bootstrap intervals", "Per case-day, worst first",
                  "Versions", "Timings", "Failed trials", "Post-processing tuned"):
        assert table in page, table
    assert "kaggle convention" in page
    # Every src/href is a file in the report folder: nothing is fetched from a network.
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(not re.match(r"^[a-z]+:|^//", r) for r in refs)
    for ref in refs:
        if not ref.startswith("#"):
            assert (report / ref).is_file(), ref
    assert not re.search(r"https?://|@import|<script", page)
    for fig in ("learning_curves", "best_so_far", "parameter_effects", "overlay_worst", "overlay_best"):
        assert (report / "figures" / f"{fig}.png").is_file(), fig
    md = (report / "report.md").read_text()
    assert all(f"## {heading}" in md for heading in SECTIONS)
    assert (report / "tables" / "ablation.csv").is_file() and (report / "tables" / "leaderboard.csv").is_file()
