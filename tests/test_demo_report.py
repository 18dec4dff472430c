"""A shortened demo end to end (real local Ray), and the report it leaves behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from test_search_ray import ENV, RAY

pytestmark = pytest.mark.slow
SECTIONS = ("Data", "Search", "Cross-validation of the refit configurations", "Ensemble", "Holdout evaluation",
            "Overlays", "Reproducibility")
SCRIPT = """
from gitseg.demo import run_demo
run_demo(out={out!r}, trials=2, epochs=1, folds=2, data=dict(cases=4, days=2, slices=24, size=64))
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=ENV)
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(out=str(out))], env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, done.stdout


def test_shortened_demo_runs_every_stage(demo):
    out, stdout = demo
    for stage in ("synth", "prepare", "search + refit", "ensemble", "report"):
        assert f"demo: {stage} done" in stdout
    run = out / "search" / "demo"
    headline = json.loads((run / "demo.json").read_text())
    assert 0 <= headline["holdout_score"] <= 1 and headline["holdout_case_days"] > 0
    assert "holdout score (kaggle convention" in stdout and str(run / "report" / "index.html") in stdout
    assert (run / "ensemble" / "ensemble.json").is_file()


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
