"""gitseg/records.py: a run record is read back as written, and a damaged one is refused by name."""

import json
import math
from pathlib import Path

import pytest

from gitseg import records
from gitseg.records import EnsembleManifest, RefitModel, RefitRecord, SearchRecord, TrialRow


def row(trial_id, score):
    return TrialRow(trial_id=trial_id, config="train.lr=0.003", best_score=score, best_epoch=None, epochs_run=0,
                    status="failed", checkpoint="", error="boom", values={"train.lr": 0.003},
                    history=[], time_s=math.nan)


def test_a_record_reads_back_as_written(tmp_path):
    search = SearchRecord(settings={"name": "s"}, base={"data": {"cache": "c"}}, cache="src",
                          leaderboard=[row("a", 0.5), row("b", math.nan)])
    records.save(search, tmp_path / "search.json")
    again = records.load(SearchRecord, tmp_path / "search.json")
    assert records.to_json(again) == (tmp_path / "search.json").read_text()
    assert again.leaderboard[0].best_score == 0.5 and math.isnan(again.leaderboard[1].best_score)
    refit = RefitRecord(folds=[0, 1], tta="hflip", models=[RefitModel(rank=0, trial_id="a", fold=0, values={},
                                                                      score=None, best_epoch=None, error="x")])
    records.save(refit, tmp_path / "refit.json")
    assert records.load(RefitRecord, tmp_path / "refit.json") == refit


def test_a_damaged_or_missing_record_is_refused_by_name(tmp_path):
    path = tmp_path / "refit.json"
    data = {"folds": [0], "tta": "hflip", "models": [], "extra": 1}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"refit.json is damaged or is not a valid RefitRecord.*extra"):
        records.load(RefitRecord, path)
    path.write_text('{"folds": [0], "tta": "hflip", "mod')  # truncated
    with pytest.raises(ValueError, match="refit.json is damaged or is not a valid RefitRecord"):
        records.load(RefitRecord, path)
    with pytest.raises(FileNotFoundError, match="no search.json in .*; run the search first"):
        records.load(SearchRecord, tmp_path / "search.json", "run the search first")


def test_an_ensemble_manifest_written_before_the_typed_records_still_reads():
    # tests/data/ensemble_format1.json: the demo's ensemble.json as gitseg wrote it when the manifest's
    # scores, latency, source and selection rows were plain mappings (same keys, same format number).
    path = Path(__file__).parent / "data" / "ensemble_format1.json"
    old = json.loads(path.read_text())
    manifest = records.load(EnsembleManifest, path)
    assert manifest.source.cache == old["source"]["cache"]
    assert manifest.scores.oof.selected_at_half == old["scores"]["oof"]["selected_at_0.5"]
    holdout = manifest.scores.holdout
    assert [r.organ for r in holdout.per_class] == [r["class"] for r in old["scores"]["holdout"]["per_class"]]
    assert holdout.ensemble_gain.gain == old["scores"]["holdout"]["ensemble_gain"]["gain"]
    assert holdout.ablation_score(holdout.final) == holdout.score
    assert manifest.latency.ensemble_ms_per_slice == old["latency"]["ensemble_ms_per_slice"]
    assert [c.on_front for c in manifest.latency.candidates] == [c["on_front"] for c in old["latency"]["candidates"]]
    # Written again, every key it had keeps its value (the file's keys, not the fields' names), and the
    # fields added since (the review list's figures) are empty.
    again = json.loads(records.to_json(manifest))
    holdout_again = again["scores"]["holdout"]
    assert {k: holdout_again[k] for k in old["scores"]["holdout"]} == old["scores"]["holdout"]
    assert set(holdout_again) - set(old["scores"]["holdout"]) == {"review"} and holdout_again["review"] is None
    assert again["latency"] == old["latency"]
    assert again["selection"] == old["selection"] and again["scores"]["oof"]["selected_at_0.5"] == old["scores"][
        "oof"]["selected_at_0.5"]
    # A distilled student's manifest held {} where it had no latency table and no machine.
    student = {**old, "latency": {}, "machine": {}}
    assert records.from_json(EnsembleManifest, json.dumps(student)).latency is None
