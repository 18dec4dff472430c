"""Ensemble stage: selection, OOF assembly, the manifest, prediction (submission + NIfTI)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

from ensemble.build import build_ensemble
from ensemble.members import Configuration, FoldModel, load_refit, oof_probs, select_greedy, select_topk
from ensemble.model import EnsembleModel
from ensemble.predict import predict_tree
from gitseg import records
from gitseg.checkpoint import load_checkpoint, model_from_checkpoint
from gitseg.data.cache import Cache
from gitseg.data.uwmgi import CLASSES, index_root, load_volume, rle_decode
from gitseg.oof import write_oof
from gitseg.records import (
    ENSEMBLE_MANIFEST,
    REFIT_RECORD,
    SEARCH_RECORD,
    EnsembleManifest,
    RefitModel,
    RefitRecord,
    SearchRecord,
)
from gitseg.train import fit

QUIET = dict(log=lambda *_: None)
# Two refit configurations; the second uses a 1-slice window so members differ in their input.
CONFIGS = ({"train.lr": 0.003}, {"train.lr": 0.002, "data.channels": 1})


def write_refit_run(cache_dir, root, configs=CONFIGS, failed=()):
    """A search folder as `gitseg search` leaves it: search.json, refit.json, fold models with OOF.

    The fold models are real (one short epoch each); `failed` names (rank, fold) refits that failed.
    """
    cache = Cache(cache_dir)
    models = []
    for rank, values in enumerate(configs):
        for fold in range(cache.manifest["folds"]):
            if (rank, fold) in failed:
                models.append(RefitModel(rank=rank, trial_id=f"t{rank}", fold=fold, values=values, score=None,
                                         best_epoch=None, error="RuntimeError: worker died"))
                continue
            out = root / "refit_runs" / f"refit-{rank}-fold{fold}"
            train = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("train.")}
            cfg = tiny_config(cache_dir, out, **train)
            for k, v in values.items():
                if k.startswith("data."):
                    setattr(cfg.data, k.split(".", 1)[1], v)
            cfg.data.fold = fold
            best = fit(cfg, **QUIET)
            model = model_from_checkpoint(load_checkpoint(out / "best.pt"))
            write_oof(model, cache, cache.case_days(folds=[fold]), out / "oof", cfg.data.channels, cfg.data.stride,
                      "hflip")
            models.append(RefitModel(rank=rank, trial_id=f"t{rank}", fold=fold, values=values, score=best["score"],
                                     best_epoch=1, error=None, checkpoint=str(out / "best.pt"), oof=str(out / "oof")))
    write_records(root, cache_dir, list(range(cache.manifest["folds"])), models)
    return root


def write_records(root, cache_dir, folds, models):
    """search.json and refit.json as the search writes them (only what the ensemble reads is filled in)."""
    records.save(SearchRecord(settings={}, base={"data": {"cache": str(cache_dir)}}, cache="", leaderboard=[]),
                 root / SEARCH_RECORD)
    records.save(RefitRecord(folds=folds, tta="hflip", models=models), root / REFIT_RECORD)


@pytest.fixture(scope="module")
def refit_run(train_cache, tmp_path_factory):
    return write_refit_run(train_cache, tmp_path_factory.mktemp("search") / "demo")


@pytest.fixture(scope="module")
def built(refit_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "ensemble"
    manifest = build_ensemble(refit_run, topk=2, out=out, **QUIET)
    return out, manifest


# ---------------------------------------------------------------------------------------------
# Selection and OOF assembly (fabricated inputs with known answers)


def fake_config(rank, score, folds=(0, 1), root=None):
    return Configuration(rank, f"t{rank}", {}, {f: FoldModel(f, root, root, 0.0) for f in folds}, cv_score=score)


def test_topk_picks_the_best_cross_validated_configurations():
    configs = [fake_config(0, 0.80), fake_config(1, 0.86), fake_config(2, math.nan), fake_config(3, 0.83)]
    chosen, weights, log = select_topk(configs, 2)
    assert [c.rank for c in chosen] == [1, 3] and weights == [1.0, 1.0]
    assert sum("selected" in line for line in log) == 2
    with pytest.raises(ValueError, match="at least 1"):
        select_topk(configs, 0)


def test_greedy_selection_follows_caruana_and_keeps_the_best_prefix():
    configs = [fake_config(0, 0.8), fake_config(1, 0.7), fake_config(2, 0.6)]
    # rank0 alone is best; then every addition scores lower (0.79) until rank0 x2 + rank2 x1 (0.83).
    # A selection that stopped at the first drop would keep rank0 alone; Caruana's path goes on.
    table = {(("rank0", 1.0),): 0.80, (("rank1", 1.0),): 0.70, (("rank2", 1.0),): 0.60,
             (("rank0", 2.0),): 0.79, (("rank0", 1.0), ("rank1", 1.0)): 0.78, (("rank0", 1.0), ("rank2", 1.0)): 0.78,
             (("rank0", 2.0), ("rank2", 1.0)): 0.83, (("rank0", 3.0),): 0.78}

    def score_of(members, weights):
        return table.get(tuple(sorted((m.name, w) for m, w in zip(members, weights))), 0.5)

    chosen, weights, log = select_greedy(configs, 5, score_of)
    assert {c.name: w for c, w in zip(chosen, weights)} == {"rank0": 2.0, "rank2": 1.0}
    assert log[-1] == "kept the first 3 of 5 additions: OOF score 0.8300"
    # Ties: an equal score later on the path does not replace the shorter prefix, and between equal
    # candidates the one already in the ensemble is added (fewer distinct members).
    flat = lambda members, weights: 0.8  # noqa: E731
    chosen, weights, log = select_greedy(configs, 3, flat)
    assert [c.name for c in chosen] == ["rank0"] and weights == [1.0]
    assert log[1].startswith("step 2: add rank0")


def test_oof_assembly_never_uses_a_model_on_cases_it_trained_on(train_cache, tmp_path):
    cache = Cache(train_cache)
    # Each fold model's folder holds files for *every* case-day, each filled with (fold + 1) / 10:
    # reading any file but the one of the case's own fold shows in the value.
    configs = []
    for rank in range(2):
        folds = {}
        for fold in range(cache.manifest["folds"]):
            oof = tmp_path / f"r{rank}f{fold}"
            oof.mkdir()
            for cd, e in cache.entries.items():
                np.save(oof / f"{cd}.npy", np.full((3, e["slices"], 2, 2), (fold + 1) / 10, np.float16))
            folds[fold] = FoldModel(fold, oof / "best.pt", oof, 0.0)
        configs.append(Configuration(rank, f"t{rank}", {}, folds))
    for case_day in cache.case_days():
        probs = oof_probs(configs, [1.0, 3.0], case_day, cache)
        assert np.allclose(probs, (cache.entries[case_day]["fold"] + 1) / 10, atol=1e-3)
    holdout = cache.case_days(holdout=True)[0]
    with pytest.raises(ValueError, match="holdout"):
        oof_probs(configs, [1.0, 1.0], holdout, cache)


def test_a_configuration_with_a_failed_fold_is_left_out(train_cache, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    models = [RefitModel(rank=r, trial_id=f"t{r}", fold=f, values={}, score=0.5, best_epoch=1, error=None,
                         checkpoint=str(tmp_path / "x.pt"), oof=str(tmp_path)) for r in range(2) for f in range(2)]
    models[3].error, models[3].checkpoint = "OutOfMemoryError: boom", None
    write_records(root, train_cache, [0, 1], models)
    run = load_refit(root)
    assert [c.rank for c in run.configurations] == [0]
    assert any("rank1" in p and "fold(s) [1]" in p for p in run.problems)
    with pytest.raises(FileNotFoundError, match="refit.json"):
        load_refit(tmp_path)


# ---------------------------------------------------------------------------------------------
# The built ensemble: manifest, holdout evaluation, portability, prediction


def test_ensemble_manifest_holds_everything_and_evaluates_the_holdout(built, train_cache):
    out, manifest = built
    on_disk = records.load(EnsembleManifest, out / ENSEMBLE_MANIFEST)
    text = (out / ENSEMBLE_MANIFEST).read_text()
    assert text == records.to_json(manifest) == records.to_json(on_disk)  # returned = saved = read back
    assert len(on_disk.members) == 4 and {m.channels for m in on_disk.members} == {1, 3}
    assert on_disk.postprocess and on_disk.preprocessing["classes"] == list(CLASSES)
    assert on_disk.metric["convention"] == "kaggle"
    holdout = on_disk.scores.holdout
    assert set(holdout.case_days) == set(Cache(train_cache).case_days(holdout=True))
    assert [r["variant"] for r in holdout.ablation][0] == "best single fold model"
    assert len(holdout.ablation) == 7 and all(0 <= r["score"] <= 1 for r in holdout.ablation)
    # The honest references: TTA and post-processing tuned on their own OOF, as the ensemble's are.
    for row, over in ((holdout.ablation[1], 0), (holdout.ablation[3], 2)):
        assert row["gain_over"] == holdout.ablation[over]["variant"] and row["tta"] == manifest.tta
        assert row["gain"] == pytest.approx(row["score"] - holdout.ablation[over]["score"])
    assert manifest.scores.oof["best_single_fold_model"]["model"] == holdout.best_single_fold_model
    assert manifest.scores.oof["best_single_configuration"]["model"] == holdout.best_single_configuration
    # What tuning reached on the OOF it was tuned on: the last kept step's score, per class too.
    tuned = manifest.scores.oof["tuned"]
    assert tuned["score"] == pytest.approx(manifest.scores.oof["tuning_steps"][-1]["after"]
                                           if manifest.scores.oof["tuning_steps"][-1]["kept"]
                                           else manifest.scores.oof["tuning_steps"][-1]["before"])
    assert all(0 <= tuned[f"score/{cls}"] <= 1 for cls in CLASSES)
    assert [r["class"] for r in holdout.per_class] == list(CLASSES)
    for name in ("ablation.csv", "holdout_per_class.csv", "holdout_per_case.csv", "evaluation.json"):
        assert (out / name).is_file()
    steps = on_disk.scores.oof["tuning_steps"]
    assert [s["step"] for s in steps] == ["thresholds", "min_size", "min_pixels"]
    assert not list(out.parent.glob(".ensemble.tmp-*"))


def test_copied_ensemble_predicts_the_same_probabilities(built, synth_root, tmp_path):
    out, _ = built
    copy = tmp_path / "elsewhere" / "ens"
    shutil.copytree(out, copy)
    shutil.rmtree(out.parent / "nothing", ignore_errors=True)
    volume = load_volume(synth_root, index_root(synth_root, "test")[0]["case_day"].iloc[0], split="test")
    a_probs, a_masks = EnsembleModel.load(out).predict_scan(volume.image)
    b_probs, b_masks = EnsembleModel.load(copy).predict_scan(volume.image)
    assert a_probs.shape == (3, *volume.image.shape) and a_probs.dtype == np.float16
    assert np.array_equal(a_probs, b_probs) and np.array_equal(a_masks, b_masks)
    # A damaged copy is refused rather than silently predicting something else.
    member = records.load(EnsembleManifest, copy / ENSEMBLE_MANIFEST).members[0].file
    with open(copy / member, "ab") as f:
        f.write(b"0")
    with pytest.raises(ValueError, match="checksum"):
        EnsembleModel.load(copy)


def test_predict_writes_a_submission_and_nifti_matching_the_tree(built, synth_root, tmp_path):
    import nibabel as nib

    out, _ = built
    result = predict_tree(out, synth_root, tmp_path / "pred", nifti=tmp_path / "nii", **QUIET)
    slices, _ = index_root(synth_root, "test")
    sub = pd.read_csv(tmp_path / "pred" / "submission.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["id", "class", "predicted"]
    assert list(sub["id"]) == [i for i in slices["id"] for _ in CLASSES]
    assert list(sub["class"]) == list(CLASSES) * len(slices)
    model = EnsembleModel.load(out)
    for case_day in result["written"]:
        volume = load_volume(synth_root, case_day, split="test")
        probs, masks = model.predict_scan(volume.image)
        rows = sub[sub["id"].str.startswith(case_day + "_")]
        shape = volume.image.shape[1:]
        decoded = np.stack([np.stack([rle_decode(r, shape) for r in rows[rows["class"] == cls]["predicted"]])
                            for cls in CLASSES])
        assert np.array_equal(decoded, masks)
        nii = nib.load(tmp_path / "nii" / f"{case_day}.nii.gz")
        assert nii.shape == (shape[1], shape[0], len(volume.slice_ids))
        assert np.allclose(nii.header.get_zooms(), (volume.spacing[2], volume.spacing[1], 3.0))
        labels = np.transpose(np.asarray(nii.dataobj), (2, 1, 0))
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        assert np.array_equal(labels > 0, masks.any(axis=0))
        for c in range(3):
            only = masks[c] & (masks.sum(axis=0) == 1)
            assert np.all(labels[only] == c + 1)
        scan = nib.load(tmp_path / "nii" / f"{case_day}_scan.nii.gz")
        assert np.array_equal(scan.affine, nii.affine)


def test_predict_reports_bad_files_and_keeps_the_rest(built, synth_copy, tmp_path):
    out, _ = built
    test_dir = synth_copy / "test"
    # A second test case-day: copy the first, then damage one slice of the copy.
    days = sorted(test_dir.glob("case*/case*_day*"))
    first = days[0]
    case = first.parent.name
    twin = first.parent / f"{case}_day99"
    shutil.copytree(first, twin)
    bad = sorted((twin / "scans").glob("*.png"))[3]
    bad.write_bytes(b"not a png")
    result = predict_tree(out, synth_copy, tmp_path / "pred", **QUIET)
    assert sorted(result["written"]) == sorted(d.name for d in days)
    assert list(result["failed"]) == [twin.name] and bad.name in " ".join(result["failed"][twin.name])
    sub = pd.read_csv(tmp_path / "pred" / "submission.csv", dtype=str, keep_default_na=False)
    assert set(sub["id"].str.rsplit("_", n=2).str[0]) == {d.name for d in days}


def test_cli_ensemble_and_predict(refit_run, synth_root, tmp_path, capfd):
    from gitseg.cli import main

    assert main(["ensemble", "--run", str(refit_run), "--topk", "1", "--method", "greedy",
                 "--out", str(tmp_path / "ens"), "--tta", "none"]) == 0
    # On the terminal: the results, and where the rest of the output went (the run's log file).
    text = capfd.readouterr().out
    assert "best single fold model" in text and "holdout score" in text
    assert f"is in {refit_run / 'ensemble.log'}; --verbose" in text and (refit_run / "ensemble.log").is_file()
    manifest = records.load(EnsembleManifest, tmp_path / "ens" / ENSEMBLE_MANIFEST)
    assert manifest.selection.method == "greedy" and manifest.tta == "none"
    assert main(["predict", "--ensemble", str(tmp_path / "ens"), "--data", str(synth_root),
                 "--out", str(tmp_path / "p")]) == 0
    assert main(["ensemble", "--run", str(tmp_path), "--topk", "1"]) == 2
    assert "refit.json" in capfd.readouterr().err
    # A folder that is not an ensemble: a clear error, and nothing is written.
    assert main(["predict", "--ensemble", str(tmp_path / "nope"), "--data", str(synth_root),
                 "--out", str(tmp_path / "p2")]) == 2
    assert "gitseg ensemble" in capfd.readouterr().err and not (tmp_path / "p2").exists()
