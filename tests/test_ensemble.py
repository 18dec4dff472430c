"""Ensemble stage: selection, OOF assembly, the manifest, prediction (submission + NIfTI)."""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

from ensemble.model import EnsembleModel
from ensemble.predict.review import Votes, case_day_review, slice_rows
from ensemble.predict.tree import predict_tree
from ensemble.selection.build import build_ensemble
from ensemble.selection.evaluate import FINAL, GATE_OFF, NO_TTA, TUNED_NO_TTA, TUNED_SINGLE, VARIANTS, scores_from_rows
from ensemble.selection.latency import Candidate, choose_under_budget, pareto_front
from ensemble.selection.members import (
    Configuration,
    FoldModel,
    load_refit,
    oof_gate,
    oof_probs,
    select_greedy,
    select_topk,
)
from ensemble.selection.postprocess import PostProcess, apply
from gitseg import records
from gitseg.checkpoint import load_checkpoint, model_from_checkpoint
from gitseg.data.cache import Cache, preprocess_volume
from gitseg.data.uwmgi import CLASSES, index_root, load_volume, rle_decode
from gitseg.files import CorruptFileError, FolderInUse, folder_lock, save_compressed
from gitseg.infer import predict_volume
from gitseg.metrics import ScoreSums
from gitseg.oof import dequantise, load_oof, oof_file, quantise, write_oof
from gitseg.records import (
    ENSEMBLE_MANIFEST,
    REFIT_RECORD,
    SEARCH_RECORD,
    EnsembleManifest,
    Evaluation,
    RefitModel,
    RefitRecord,
    SearchRecord,
)
from gitseg.train import fit

QUIET = dict(log=lambda *_: None)
# Two refit configurations; the second uses a 1-slice window so members differ in their input.
CONFIGS = ({"train.lr": 0.003}, {"train.lr": 0.002, "data.channels": 1})


def write_refit_run(cache_dir, root, configs=CONFIGS, failed=(), tta="hflip"):
    """A search folder as `gitseg search` leaves it: search.json, refit.json, fold models with OOF.

    The fold models are real (one short epoch each); `failed` names (rank, fold) refits that failed;
    `tta` is the refit's (its OOF's, and so the ensemble's by default).
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
                if k.startswith(("data.", "model.")):
                    section, key = k.split(".", 1)
                    setattr(getattr(cfg, section), key, v)
            cfg.data.fold = fold
            best = fit(cfg, **QUIET)
            model = model_from_checkpoint(load_checkpoint(out / "best.pt"))
            write_oof(model, cache, cache.case_days(folds=[fold]), out / "oof", cfg.data.channels, cfg.data.stride,
                      tta)
            models.append(RefitModel(rank=rank, trial_id=f"t{rank}", fold=fold, values=values, score=best["score"],
                                     best_epoch=1, error=None, checkpoint=str(out / "best.pt"), oof=str(out / "oof")))
    write_records(root, cache_dir, list(range(cache.manifest["folds"])), models, tta)
    return root


def write_records(root, cache_dir, folds, models, tta="hflip"):
    """search.json and refit.json as the search writes them (only what the ensemble reads is filled in)."""
    records.save(SearchRecord(settings={}, base={"data": {"cache": str(cache_dir)}}, cache="", leaderboard=[]),
                 root / SEARCH_RECORD)
    records.save(RefitRecord(folds=folds, tta=tta, models=models), root / REFIT_RECORD)


@pytest.fixture(scope="module")
def refit_run(train_cache, tmp_path_factory):
    return write_refit_run(train_cache, tmp_path_factory.mktemp("search") / "demo")


def keep_what_is_asked(mp):
    """The tests of a two-configuration ensemble's contents read one; whether the OOF says the second
    configuration helps is up to one-epoch models, so there the top-k stopping rule (tested on its own
    below, and through the CLI) keeps the k asked for."""
    import ensemble.selection.build as build

    mp.setattr(build, "stop_where_oof_stops_rising", lambda ranked, *_: (len(ranked), []))


@pytest.fixture(scope="module")
def built(refit_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "ensemble"
    with pytest.MonkeyPatch.context() as mp:
        keep_what_is_asked(mp)
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


def test_topk_stops_where_the_oof_score_stops_rising():
    """--topk 3 over a ranking whose second configuration lowers the OOF score and whose third brings
    it back only to a tie: one configuration is kept (ties go to fewer). Where more help, all stay."""
    from ensemble.selection.latency import Candidate, stop_where_oof_stops_rising

    ranked = [fake_config(0, 0.86), fake_config(1, 0.84), fake_config(2, 0.80)]

    def front(scores, tta="hflip"):
        return [Candidate(tuple(f"rank{i}" for i in range(n)), tta, 2, score, 1.0) for n, score in scores.items()]

    keep, path = stop_where_oof_stops_rising(ranked, front({1: 0.8642, 2: 0.8603, 3: 0.8642}), "hflip")
    assert keep == 1 and path == [(1, 0.8642), (2, 0.8603), (3, 0.8642)]
    assert stop_where_oof_stops_rising(ranked, front({1: 0.80, 2: 0.81, 3: 0.82}), "hflip")[0] == 3
    assert stop_where_oof_stops_rising(ranked, front({1: 0.80, 2: 0.83, 3: 0.82}), "hflip")[0] == 2
    # Scores of another TTA say nothing about this one: the k asked for stay.
    assert stop_where_oof_stops_rising(ranked, front({1: 0.9, 2: 0.5, 3: 0.5}, "none"), "hflip")[0] == 3


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
                save_compressed(oof_file(oof, cd), probs=quantise(np.full((3, e["slices"], 2, 2), (fold + 1) / 10)))
            folds[fold] = FoldModel(fold, oof / "best.pt", oof, 0.0)
        configs.append(Configuration(rank, f"t{rank}", {}, folds))
    for case_day in cache.case_days():
        probs = oof_probs(configs, [1.0, 3.0], case_day, cache)
        assert np.allclose(probs, (cache.entries[case_day]["fold"] + 1) / 10, atol=0.5 / 255)
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
    assert on_disk.postprocess and on_disk.preprocessing.classes == list(CLASSES)
    assert on_disk.metric.convention == "kaggle"
    holdout = on_disk.scores.holdout
    assert set(holdout.case_days) == set(Cache(train_cache).case_days(holdout=True))
    assert [r.variant for r in holdout.ablation] == VARIANTS and holdout.final == FINAL
    assert all(0 <= r.score <= 1 for r in holdout.ablation)
    # Every model at threshold 0.5 and tuned: a tuned row's gain is over its own untuned row.
    for row, over in ((holdout.ablation[1], 0), (holdout.ablation[3], 2), (holdout.ablation[5], 4),
                      (holdout.ablation[7], 6)):
        assert row.gain_over == holdout.ablation[over].variant and row.tta == holdout.ablation[over].tta
        assert row.gain == pytest.approx(row.score - holdout.ablation[over].score)
    assert [r.tta for r in holdout.ablation] == [manifest.tta] * 4 + ["none"] * 2 + [manifest.tta] * 2
    assert manifest.scores.oof.best_single_fold_model.model == holdout.best_single_fold_model
    assert manifest.scores.oof.best_single_configuration.model == holdout.best_single_configuration
    # What tuning reached on the OOF it was tuned on: the last kept step's score, per class too.
    tuned, last = manifest.scores.oof.tuned, manifest.scores.oof.tuning_steps[-1]
    assert tuned["score"] == pytest.approx(last["after"] if last["kept"] else last["before"])
    assert all(0 <= tuned[f"score/{cls}"] <= 1 for cls in CLASSES)
    assert [r.organ for r in holdout.per_class] == list(CLASSES)
    for name in ("ablation.csv", "holdout_per_class.csv", "holdout_per_case.csv", "evaluation.json"):
        assert (out / name).is_file()
    # The review list's figures: every holdout case-day, each slice's errors and disputed area.
    review, ev = holdout.review, records.load(Evaluation, out / "evaluation.json")
    assert review["case_days"] == len(holdout.case_days) and review["members"] == 4
    assert all(0 <= review[k] <= 1 for k in ("auroc_worst_quarter", "error_share_flagged",
                                             "error_share_by_predicted_area", "error_share_at_random"))
    assert [r["case_day"] for r in ev.review] == holdout.case_days
    entries = Cache(train_cache).entries
    assert all(len(r["slice_errors"]) == len(r["slice_disputed_mm2"]) == entries[r["case_day"]]["slices"]
               for r in ev.review)
    assert review["slices"] == sum(len(r["slice_errors"]) for r in ev.review)
    # Each case-day's error voxels and predicted area agree with its clinical rows (voxel counts, 3D Dice).
    for r in ev.review:
        rows = [c for c in ev.clinical if c["case_day"] == r["case_day"]]
        both = [(c["pred_voxels"], c["gt_voxels"], c["dice_3d"]) for c in rows]
        wrong = sum(p + g - (0 if p + g == 0 else round(d * (p + g))) for p, g, d in both)
        spacing = entries[r["case_day"]]["spacing"]
        assert sum(r["slice_errors"]) == wrong
        assert sum(r["slice_area_mm2"]) == pytest.approx(sum(p for p, _, _ in both) * spacing[1] * spacing[2])
    steps = on_disk.scores.oof.tuning_steps
    assert [s["step"] for s in steps] == ["thresholds", "min_size", "min_pixels"]
    assert not list(out.parent.glob(".ensemble.tmp-*"))
    # The process's peak memory at the end of each phase: a running maximum, so it never falls.
    peaks = on_disk.peak_memory_gib
    assert list(peaks) == ["cv_scores", "latency_front", "selection", "tuning", "ablation_tuning", "holdout"]
    assert list(on_disk.timings) == [f"{p}_s" for p in peaks] + ["total_s"]
    assert 0 < peaks["cv_scores"] and list(peaks.values()) == sorted(peaks.values())


def holdout_score(model, cache, members, tta, post) -> float:
    """The holdout score of `members` (weighted mean of each member's probabilities, as the ablation
    averages them) with `tta` and `post`."""
    rows = []
    for case_day in cache.case_days(holdout=True):
        entry = cache.entries[case_day]
        size = {cache.size: cache.image(case_day)}, (entry["height"], entry["width"])
        each = [model.predict(*size, tta=tta, members=[m]) for m in members]
        total = sum(m.weight for m in members)
        probs = sum(m.weight * p for m, (p, _) in zip(members, each)) / total
        gate = None if each[0][1] is None else sum(m.weight * g for m, (_, g) in zip(members, each)) / total
        masks = apply(probs, post, gate)
        gt = cache.original_masks(case_day)
        rows += [{"class": cls, "sums": list(ScoreSums.of_volume(masks[c], gt[c]))} for c, cls in enumerate(CLASSES)]
    return scores_from_rows(rows)["score"]


def test_each_ablation_variant_is_tuned_on_its_own_oof(refit_run, train_cache, tmp_path, monkeypatch):
    """Each tuned row of the ablation uses the post-processing tuned on that model's own OOF (the
    single fold model: its validation fold; the ensemble without TTA: its TTA-free OOF) and scores
    the holdout with it. Tuning is replaced by a stand-in that gives every OOF source its own
    threshold (a quantile of the probability values it holds, so that the masks differ)."""
    import ensemble.selection.build as build

    real_volumes, tuned = build.oof_volumes, {}

    def tagged_volumes(configs, weights, cache, folds=None, tta=None):
        load = real_volumes(configs, weights, cache, folds=folds, tta=tta)
        load.source = (tuple(c.name for c in configs), tuple(folds) if folds else None, tta)
        return load

    def stand_in_tune(load, log=None):
        probs = np.concatenate([volume[0].ravel() for volume in load()])
        post = PostProcess(thresholds=[float(np.quantile(np.unique(probs), 0.5 + 0.1 * len(tuned)))] * len(CLASSES))
        tuned[load.source] = post
        return post, [{"step": "thresholds", "values": post.thresholds, "before": 0.0, "after": 0.0, "kept": True}]

    monkeypatch.setattr(build, "oof_volumes", tagged_volumes)
    monkeypatch.setattr(build, "tune", stand_in_tune)
    keep_what_is_asked(monkeypatch)
    manifest = build_ensemble(refit_run, topk=2, out=tmp_path / "ens", **QUIET)
    cache, oof = Cache(train_cache), manifest.scores.oof
    chosen = tuple(c.name for c in manifest.selection.configurations if c.selected)
    conf_name, fold = oof.best_single_fold_model.model.split(" fold ")
    own = {"ensemble_no_tta": (chosen, None, "none"), "ensemble_with_tta": (chosen, None, manifest.tta),
           "best_single_fold_model": ((conf_name,), (int(fold),), None),
           "best_single_configuration": ((oof.best_single_configuration.model,), None, None)}
    assert len(tuned) == 4 and len({str(p) for p in tuned.values()}) == 4
    for key, source in own.items():
        assert getattr(oof, key).postprocess == tuned[source].to_dict(), key
    assert manifest.postprocess == tuned[own["ensemble_with_tta"]].to_dict()
    model, rows = EnsembleModel.load(tmp_path / "ens"), {r.variant: r for r in manifest.scores.holdout.ablation}
    single = [m for m in model.members if m.configuration == conf_name and m.fold == int(fold)]
    for variant, members, tta, post in ((TUNED_NO_TTA, model.members, "none", tuned[own["ensemble_no_tta"]]),
                                        (NO_TTA, model.members, "none", PostProcess()),
                                        (FINAL, model.members, manifest.tta, tuned[own["ensemble_with_tta"]]),
                                        (TUNED_SINGLE, single, manifest.tta, tuned[own["best_single_fold_model"]])):
        assert rows[variant].score == pytest.approx(holdout_score(model, cache, members, tta, post), abs=1e-12)
    assert len({rows[v].score for v in (TUNED_NO_TTA, NO_TTA, FINAL)}) == 3  # the posts made a difference


def test_refit_oof_without_tta_is_the_untransformed_view(built, refit_run, train_cache):
    conf = load_refit(refit_run).configurations[0]
    cache = Cache(train_cache)
    case_day = cache.case_days(folds=[0])[0]
    state = load_checkpoint(conf.folds[0].checkpoint)
    pre, entry = state["preprocessing"], cache.entries[case_day]
    expected = predict_volume(model_from_checkpoint(state), cache.image(case_day), pre["channels"], pre["stride"],
                              out_size=(entry["height"], entry["width"]), tta="none")
    stored = dequantise(quantise(expected))
    assert np.array_equal(load_oof(conf.folds[0].oof, case_day, "none", "hflip"), stored)
    assert not np.array_equal(load_oof(conf.folds[0].oof, case_day, "hflip", "hflip"), stored)
    with pytest.raises(ValueError, match="not with 'flips'"):
        load_oof(conf.folds[0].oof, case_day, "flips", "hflip")


def test_gate_probabilities_join_the_oof_contract_and_the_ensemble(train_cache, tmp_path, refit_run, built,
                                                                   monkeypatch):
    """Models with a gate head leave per-slice gate probabilities beside their OOF (with and without
    TTA); the ensemble averages them, tunes the gate rule on them, and shows what it adds."""
    run = write_refit_run(train_cache, tmp_path / "gated", configs=({"train.lr": 0.003, "model.gate": True},))
    cache = Cache(train_cache)
    conf = load_refit(run).configurations[0]
    case_day = cache.case_days(folds=[1])[0]
    depth = len(cache.image(case_day))
    for tta in ("hflip", "none"):
        gate = oof_gate([conf], [1.0], case_day, cache, tta)
        assert gate.shape == (3, depth) and 0 <= gate.min() and gate.max() <= 1
    manifest = build_ensemble(run, topk=1, out=tmp_path / "ens", **QUIET)
    assert [s["step"] for s in manifest.scores.oof.tuning_steps][-1] == "gate"
    model = EnsembleModel.load(tmp_path / "ens")
    entry = cache.entries[case_day]
    probs, gate = model.predict({cache.size: cache.image(case_day)}, (entry["height"], entry["width"]))
    assert gate.shape == (3, depth) and probs.shape[:2] == (3, depth)
    variants = [r.variant for r in manifest.scores.holdout.ablation]
    assert (GATE_OFF[0] in variants) == any(manifest.postprocess["gate"])
    # With the gate rule on (a stand-in tuning turns it on), the ablation shows the ensemble without it.
    import ensemble.selection.build as build

    on = PostProcess(gate=[0.5] * 3)
    monkeypatch.setattr(build, "tune", lambda load, log=None: (on, [{"step": "gate", "values": on.gate,
                                                                     "before": 0.0, "after": 0.0, "kept": True}]))
    manifest = build_ensemble(run, topk=1, out=tmp_path / "gated_on", **QUIET)
    rows = {r.variant: r for r in manifest.scores.holdout.ablation}
    model = EnsembleModel.load(tmp_path / "gated_on")
    assert rows[GATE_OFF[0]].gain_over == FINAL and manifest.scores.holdout.final == FINAL
    assert rows[FINAL].score == pytest.approx(holdout_score(model, cache, model.members, "hflip", on), abs=1e-12)
    assert rows[GATE_OFF[0]].score == pytest.approx(
        holdout_score(model, cache, model.members, "hflip", PostProcess()), abs=1e-12)
    # Without a gate head (the shared run): no gate probabilities, no gate step, the rule off.
    plain = load_refit(refit_run).configurations[0]
    assert oof_gate([plain], [1.0], case_day, cache) is None
    assert built[1].postprocess["gate"] == [0.0] * 3


def test_a_truncated_oof_file_is_named_and_a_full_disk_leaves_none(refit_run, train_cache, tmp_path, monkeypatch):
    conf = load_refit(refit_run).configurations[0]
    cache = Cache(train_cache)
    case_day = cache.case_days(folds=[0])[0]
    copy = tmp_path / "oof"
    shutil.copytree(conf.folds[0].oof, copy)
    path = oof_file(copy, case_day)
    whole = path.read_bytes()
    path.write_bytes(whole[:-64])
    with pytest.raises(CorruptFileError, match=rf"{case_day}.npz is truncated or altered .*re-run the refit"):
        load_oof(copy, case_day)
    # One byte altered inside the compressed probabilities: the zip member's CRC catches it.
    middle = len(whole) // 2
    path.write_bytes(whole[:middle] + bytes([whole[middle] ^ 0xFF]) + whole[middle + 1:])
    with pytest.raises(CorruptFileError, match=rf"{case_day}.npz is truncated or altered"):
        load_oof(copy, case_day)

    def full_disk(file, **arrays):
        Path(file).write_bytes(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    model = model_from_checkpoint(load_checkpoint(conf.folds[0].checkpoint))
    with pytest.raises(OSError, match="no space left on the device writing"):
        write_oof(model, cache, [case_day], tmp_path / "full", 3, 1, "hflip")
    assert not [p for p in (tmp_path / "full").rglob("*") if p.is_file()]  # nothing half-written


# ---------------------------------------------------------------------------------------------
# Latency: the front, the budget


def cand(name, score, ms, folds=1, tta="none"):
    return Candidate((name,), tta, folds, score, ms)


def test_pareto_front_of_hand_made_candidates():
    a, b, c, d = cand("a", 0.70, 1.0), cand("b", 0.75, 2.0), cand("c", 0.72, 3.0), cand("d", 0.80, 4.0)
    e = cand("e", 0.70, 1.0)                         # ties a on cost and quality: the first one is kept
    b2 = cand("b", 0.75, 3.5, folds=2)               # b's score with more members, dearer: on the front
    f = cand("f", 0.80, 5.0)                         # d is as good and cheaper
    assert pareto_front([a, b, c, d, e, b2, f]) == [a, b, b2, d]
    assert pareto_front([f, b2, e, d, c, b, a]) == [e, b, b2, d]
    assert choose_under_budget([a, b, c, d, b2, f], 3.0) == b
    assert choose_under_budget([a, b, c, d, b2, f], 3.5) == b2  # b's score, more members
    assert choose_under_budget([a, b, c, d, b2, f], 100) == d   # f scores the same and costs more
    assert choose_under_budget([a, b, c, d, b2, f], 1.0) == a
    with pytest.raises(ValueError, match="no candidate ensemble fits 0.5 ms per slice.*1.00 ms"):
        choose_under_budget([a, b, c], 0.5)


def test_latency_budget_chooses_the_best_candidate_that_fits(built, refit_run, tmp_path, monkeypatch):
    _, manifest = built
    lat = manifest.latency
    assert lat.device and {r.tta for r in lat.members} == {"none", "hflip"}
    assert len(lat.members) == 2 * 2 * 2 and all(r.ms_per_slice > 0 for r in lat.members)
    assert lat.ensemble_ms_per_slice == pytest.approx(sum(r.ms_per_slice for r in lat.members
                                                          if r.tta == manifest.tta))
    cands = lat.candidates  # 3 configuration sets x 2 TTA x 1-2 folds
    assert len(cands) == 12 and any(c.on_front for c in cands)
    # The first build's timings again (measured times vary from run to run), and a budget that only
    # one-fold candidates fit: which fold model is kept is then part of the choice.
    import ensemble.selection.build as build

    monkeypatch.setattr(build, "measure_members", lambda *args, **kwargs: lat.members)
    budget = min(c.ms_per_slice for c in cands if c.folds == 2) * 0.99
    assert any(c.ms_per_slice <= budget for c in cands)
    # The same run with fold 1 the better fold of every configuration (the test models tie at 0).
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy2(refit_run / SEARCH_RECORD, run / SEARCH_RECORD)
    refit = records.load(RefitRecord, refit_run / REFIT_RECORD)
    for m in refit.models:
        m.score = 0.5 + 0.1 * m.fold
    records.save(refit, run / REFIT_RECORD)
    refit_run = run
    out = build_ensemble(run, out=tmp_path / "fast", latency_budget=budget, **QUIET)
    fits = [c for c in out.latency.candidates if c.ms_per_slice <= budget]
    best = max(fits, key=lambda c: (c.oof_score, len(c.configurations) * c.folds, -c.ms_per_slice))
    assert out.selection.method == "latency-budget" and out.tta == best.tta
    assert sorted({m.configuration for m in out.members}) == sorted(best.configurations)
    assert len(out.members) == len(best.configurations) * best.folds and best.folds == 1
    assert {m.fold for m in out.members} == {1}
    confs = {c.name: c for c in load_refit(refit_run).configurations}
    for name in best.configurations:  # the fold models with the best validation scores
        ranked = sorted(confs[name].folds.values(), key=lambda fm: (-fm.score, fm.fold))
        assert sorted(m.fold for m in out.members if m.configuration == name) == sorted(
            fm.fold for fm in ranked[: best.folds])
    assert out.latency.ensemble_ms_per_slice <= budget
    assert out.scores.holdout.final == (TUNED_NO_TTA if out.tta == "none" else FINAL)


def test_a_second_ensemble_into_one_folder_refuses(refit_run, tmp_path):
    out = tmp_path / "ens"
    with folder_lock(out, "gitseg ensemble"):
        with pytest.raises(FolderInUse, match=r"ens is in use by gitseg ensemble \(pid \d+ on host"):
            build_ensemble(refit_run, out=out, **QUIET)
    assert not out.exists()


@pytest.mark.parametrize("name", ["../outside.pt", "/etc/passwd", "models/../../outside.pt", "models/link.pt"])
def test_a_manifest_naming_files_outside_its_folder_is_refused(built, tmp_path, name):
    out, _ = built
    copy = tmp_path / "ens"
    shutil.copytree(out, copy)
    (tmp_path / "outside.pt").write_bytes((copy / "models" / "rank0_fold0.pt").read_bytes())
    (copy / "models" / "link.pt").symlink_to(tmp_path / "outside.pt")
    manifest = json.loads((copy / ENSEMBLE_MANIFEST).read_text())
    manifest["members"][0]["file"], manifest["members"][0]["sha256"] = name, ""
    (copy / ENSEMBLE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"member file {re.escape(repr(name))} is outside the ensemble folder"):
        EnsembleModel.load(copy)


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

    assert main(["ensemble", "--run", str(refit_run), "--topk", "2", "--out", str(tmp_path / "ens"),
                 "--tta", "none"]) == 0
    # On the terminal: the results, and where the rest of the output went (the run's log file).
    text = capfd.readouterr().out
    assert "best single fold model" in text and "holdout score" in text
    log = tmp_path / "ens" / "ensemble.log"  # in the folder the command wrote, not in the search it read
    assert f"is in {log}; --verbose" in text and log.is_file() and not (refit_run / "ensemble.log").exists()
    manifest = records.load(EnsembleManifest, tmp_path / "ens" / ENSEMBLE_MANIFEST)
    assert manifest.selection.method == "topk" and manifest.tta == "none"
    # --topk 2 keeps the prefix of the OOF ranking that scores best (thresholds tuned: the latency
    # front's candidates), the fewer configurations on a tie, and says why when that is one.
    ranked = [c.name for c in sorted(manifest.selection.configurations, key=lambda c: -c.oof_score)]
    prefix = {tuple(c.configurations): c.oof_score for c in manifest.latency.candidates if c.tta == "none"}
    scores = [prefix[tuple(ranked[:n])] for n in (1, 2)]
    keep = 1 if scores[0] >= scores[1] else 2
    assert sorted({m.configuration for m in manifest.members}) == sorted(ranked[:keep])
    assert ("lowered the OOF score" in manifest.selection.why) == (keep == 1)
    assert main(["predict", "--ensemble", str(tmp_path / "ens"), "--data", str(synth_root),
                 "--out", str(tmp_path / "p")]) == 0
    # Not a search folder: the error, and nothing written into that folder nor left in the temporary one.
    temporary = set(Path(tempfile.gettempdir()).glob("gitseg-ensemble-*.log"))
    assert main(["ensemble", "--run", str(tmp_path / "p"), "--topk", "1"]) == 2
    _, err = capfd.readouterr()
    assert "refit.json" in err and "is in" not in err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["predict.json", "predict.log", "review.csv",
                                                                   "review_slices.csv", "submission.csv"]
    assert set(Path(tempfile.gettempdir()).glob("gitseg-ensemble-*.log")) == temporary
    # A folder that is not an ensemble: a clear error, and nothing is written.
    assert main(["predict", "--ensemble", str(tmp_path / "nope"), "--data", str(synth_root),
                 "--out", str(tmp_path / "p2")]) == 2
    assert "gitseg ensemble" in capfd.readouterr().err and not (tmp_path / "p2").exists()


# ---------------------------------------------------------------------------------------------
# Distillation without Ray: the teacher targets and the student's folder (the Train runs of
# `gitseg distill` are tested in test_search_ray.py)


def test_distill_teacher_targets_and_student_folder(built, refit_run, train_cache, synth_root, tmp_path):
    """The teacher folder holds the ensemble's OOF probabilities (quantised, at the cache size) and
    pseudo-labels of test/; the student folder, built here from the refit's two configurations standing
    in for the distilled and labels-only students, has one network, a four-row holdout table with
    latency, and predicts."""
    from ensemble.distill.distill import build_student, plan, teacher_members, write_teacher
    from gitseg.data.cache import resize_probs
    from gitseg.teacher import Teacher

    folder, manifest = built
    (tmp_path / "student.yaml").write_text("model: {encoder: tu-test_resnet}\n")
    p = plan(folder, tmp_path / "student.yaml", out=tmp_path / "student")
    assert p.student.data.cache == str(Cache(train_cache).root) and p.work == tmp_path / "student.work"
    source = write_teacher(p, pseudo_root=synth_root, **QUIET)
    teacher = Teacher(p.teacher)
    cache = Cache(train_cache)
    assert sorted(cd for cd, e in teacher.entries.items() if not e["pseudo"]) == sorted(cache.case_days())
    assert sorted(teacher.pseudo) == sorted(set(index_root(synth_root, "test")[0]["case_day"]))
    configs, weights, tta = teacher_members(p)
    assert {c.name for c in configs} == {m.configuration for m in manifest.members} and tta == "hflip"
    case_day = cache.case_days(folds=[1])[0]
    expected = quantise(resize_probs(oof_probs(configs, weights, case_day, cache, tta), cache.size))
    assert np.array_equal(np.stack([teacher.probs(case_day, z) for z in range(expected.shape[1])], axis=1), expected)
    assert write_teacher(p, pseudo_root=synth_root, **QUIET) == source  # kept, not rewritten

    record = records.load(RefitRecord, refit_run / REFIT_RECORD)
    result = build_student(p, record, source, **QUIET)
    student = EnsembleModel.load(p.out)
    assert len(student.members) == 1 and student.tta == "none"
    assert [r["model"] for r in result["models"]] == ["student", "student, labels only", "best single model",
                                                      "ensemble"]
    rows = {r["model"]: r for r in result["models"]}
    assert rows["ensemble"]["score"] == pytest.approx(manifest.scores.holdout.score)
    assert rows["best single model"]["score"] == pytest.approx(
        manifest.scores.holdout.ablation_score(TUNED_SINGLE))
    assert all(r["ms_per_slice"] > 0 for r in result["models"])
    assert rows["ensemble"]["latency_vs_ensemble"] == 1.0 and result["teacher_adds"]["cases"] > 0
    assert (p.out / "distill_holdout.csv").is_file()
    done = predict_tree(p.out, synth_root, tmp_path / "pred", **QUIET)
    assert done["written"] and not done["failed"]

    # Without the labels-only reference (--no-reference): the table has the other three rows.
    only = RefitRecord(folds=record.folds, tta=record.tta, models=[m for m in record.models if m.rank == 0])
    p.out = tmp_path / "student2"
    result = build_student(p, only, source, **QUIET)
    assert [r["model"] for r in result["models"]] == ["student", "best single model", "ensemble"]
    assert result["teacher_adds"] is None


# ---------------------------------------------------------------------------------------------
# The clinical path: a DICOM series (written by `gitseg synth --dicom`) or a NIfTI volume in


@pytest.fixture(scope="module")
def clinical(built, tmp_path_factory):
    """A synthetic tree (`gitseg synth --dicom`: its unlabelled case-day also as a DICOM series, and
    here its labelled one too) and a copy of the test ensemble whose thresholds keep each class's top
    5% of voxels on that scan: its one-epoch models draw nothing at their tuned thresholds, and every
    output needs shapes to carry."""
    from gitseg.cli import main
    from gitseg.data.dicom import write_dicom_tree

    tmp = tmp_path_factory.mktemp("clinical")
    root = tmp / "uwmgi"
    assert main(["synth", "--out", str(root), "--dicom", "--cases", "1", "--days", "1",
                 "--slices", "12", "--size", "64", "--test-cases", "1", "--seed", "4"]) == 0
    write_dicom_tree(root, "train", seed=4)
    series_dir = root / "dicom" / index_root(root, "test")[0]["case_day"].iloc[0]
    scan = load_volume(root, series_dir.name, "test")
    folder = tmp / "ensemble"
    shutil.copytree(built[0], folder)
    probs, _ = EnsembleModel.load(folder).predict_scan(scan.image)
    manifest = json.loads((folder / ENSEMBLE_MANIFEST).read_text())
    manifest["postprocess"] = {**manifest["postprocess"],
                               "thresholds": [float(np.quantile(p.astype(np.float32), 0.95)) for p in probs]}
    (folder / ENSEMBLE_MANIFEST).write_text(json.dumps(manifest))
    return root, series_dir, scan, folder


def test_predict_a_dicom_series_and_a_nifti_volume(clinical, tmp_path):
    """`gitseg synth --dicom` then `gitseg predict --dicom`: SEG, RTSTRUCT, NIfTI and label tables beside
    each other, the SEG holding exactly the masks the ensemble predicts for the same scan from the PNG
    tree; the same scan as NIfTI gives the same labels with its own affine."""
    import nibabel as nib

    from ensemble.predict.clinical import rtstruct_masks, seg_masks
    from gitseg.cli import main
    from gitseg.data.dicom import read_series

    root, series_dir, scan, folder = clinical
    assert main(["predict", "--ensemble", str(folder), "--dicom", str(series_dir), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"seg.dcm", "rtstruct.dcm", "labels.nii.gz", "labels.ctbl",
                                               "labels.itksnap.txt", "timings.json"}
    timings = json.loads((out / "timings.json").read_text())
    assert all(timings[k] > 0 for k in ("read_s", "models_s", "inference_s", "write_s"))
    assert timings["warnings"] == [] and timings["axes"] == "LPI" and timings["notice"].startswith("Research use only")

    series = read_series(series_dir)
    assert np.array_equal(series.image, scan.image.astype(np.float32))
    _, masks = EnsembleModel.load(folder).predict_scan(scan.image)
    assert all(m.any() for m in masks)
    assert np.array_equal(seg_masks(out / "seg.dcm", series), masks)
    assert (rtstruct_masks(out / "rtstruct.dcm", series) == masks).mean() > 0.98
    # The review list beside the RT Structure Set: the most disputed slices with their table positions.
    review = (out / "review.txt").read_text()
    assert timings["review"]["members"] == 4 and "slices to review first" in review
    first = re.search(r"slice (\d+) of 12, z = (-?[\d.]+) mm", review)
    z = int(first.group(1)) - 1
    assert float(first.group(2)) == pytest.approx(float(series.datasets[z].ImagePositionPatient[2]))
    labels = nib.load(out / "labels.nii.gz")
    assert labels.header["descrip"].tobytes().rstrip(b"\0").decode() == "Research use only; not for clinical use."

    scan_xyz = np.transpose(scan.image, (2, 1, 0)).astype(np.float32)
    nib.save(nib.Nifti1Image(scan_xyz, labels.affine), tmp_path / "in.nii.gz")
    assert main(["predict", "--ensemble", str(folder), "--nifti-in", str(tmp_path / "in.nii.gz"),
                 "--out", str(tmp_path / "nifti")]) == 0
    again = nib.load(tmp_path / "nifti" / "labels.nii.gz")
    assert np.array_equal(np.asarray(again.dataobj), np.asarray(labels.dataobj))
    assert np.allclose(again.affine, labels.affine)
    assert (tmp_path / "nifti" / "labels.ctbl").is_file()
    assert main(["predict", "--ensemble", str(folder), "--dicom", str(series_dir), "--data", str(root),
                 "--out", str(tmp_path / "x")]) == 2


def test_members_vote_in_the_ensembles_own_passes_and_predict_writes_the_review_list(clinical, tmp_path):
    """The votes come from the passes that make the ensemble's masks (which they leave unchanged), each
    member's own masks at the ensemble's thresholds; predict's review tables hold them; a one-network
    ensemble writes none."""
    root, series_dir, scan, folder = clinical
    model = EnsembleModel.load(folder)
    _, plain = model.predict_scan(scan.image)
    votes = Votes(model.post.thresholds, scan.image.shape)
    _, masks = model.predict_scan(scan.image, votes=votes)
    assert np.array_equal(masks, plain) and votes.members == len(model.members) == 4
    inputs = {size: preprocess_volume(scan.image, size) for size in model.sizes}
    thresholds = np.asarray(model.post.thresholds, np.float32).reshape(3, 1, 1, 1)
    # Each member alone: its votes add up to the group's, and they are its own probabilities at the
    # thresholds (which, alone, are rounded to float16 first: voxels within that rounding may differ).
    own, alone_votes = np.zeros_like(votes.counts), np.zeros_like(votes.counts)
    near = np.zeros(votes.counts.shape, bool)
    for m in model.members:
        single = Votes(model.post.thresholds, scan.image.shape)
        p = model.probs(inputs, scan.image.shape[1:], members=[m], votes=single)
        alone_votes += single.counts
        own += p >= thresholds
        near |= np.abs(p - thresholds) <= 3e-4
    assert np.array_equal(alone_votes, votes.counts)
    assert np.array_equal(own[~near], votes.counts[~near]) and (~near).mean() > 0.5
    assert ((votes.counts > 0) & (votes.counts < 4)).any() and (votes.counts == 4).any()

    result = predict_tree(folder, root, tmp_path / "pred", **QUIET)
    case_day = series_dir.name
    assert list(result["review"]) == result["written"] == [case_day]
    review = case_day_review(votes.counts, 4, scan.spacing)
    assert result["review"][case_day] == pytest.approx(review["disagreement"])
    table = pd.read_csv(tmp_path / "pred" / "review.csv")
    assert list(table["case_day"]) == [case_day] and table["rank"].tolist() == [1]
    slices = pd.read_csv(tmp_path / "pred" / "review_slices.csv", keep_default_na=False)
    expected = pd.DataFrame(slice_rows(case_day, review, votes.counts, 4, scan.slice_ids))
    assert slices[["slice", "id", "organ"]].values.tolist() == expected[["slice", "id", "organ"]].values.tolist()
    assert np.allclose(slices["disputed_mm2"], expected["disputed_mm2"])
    top = [int(z) for z in str(table["slices_to_review"][0]).split()]
    assert top[0] == int(np.argmax(review["slice_disputed_mm2"])) + 1

    one = tmp_path / "one"
    shutil.copytree(folder, one)
    manifest = json.loads((one / ENSEMBLE_MANIFEST).read_text())
    manifest["members"] = manifest["members"][:1]
    (one / ENSEMBLE_MANIFEST).write_text(json.dumps(manifest))
    alone_result = predict_tree(one, root, tmp_path / "pred", **QUIET)  # into the same folder
    assert alone_result["review"] is None and alone_result["written"] == [case_day]
    assert not (tmp_path / "pred" / "review.csv").exists() and not (tmp_path / "pred" / "review_slices.csv").exists()


def test_a_folder_of_nifti_volumes_in_any_axis_order_predicts_on_each_volumes_own_grid(clinical, tmp_path):
    """`gitseg predict --nifti-in FOLDER` (an nnU-Net imagesTs/): `<CASE>_0000.nii.gz` gives `<CASE>.nii.gz`
    with the input's shape and affine; the same scan stored in another axis order (columns and slices
    swapped, rows flipped) gives the same labels at the same patient coordinates."""
    import nibabel as nib

    from gitseg.cli import main
    from gitseg.data.geometry import axial_affine
    from gitseg.data.nifti import write_volume

    _, _, scan, folder = clinical
    images = tmp_path / "imagesTs"
    images.mkdir()
    affine = axial_affine(scan.spacing)
    write_volume(images / "plain_0000.nii.gz", scan.image, affine)
    stored = np.ascontiguousarray(np.transpose(np.flip(scan.image, 1), (2, 1, 0)))  # (W, H flipped, D) as (D, H, W)
    to_standard = np.zeros((4, 4))  # stored voxel (i, j, k) -> standard (column k, row H-1-j, slice i)
    to_standard[0, 2] = to_standard[2, 0] = 1.0
    to_standard[1, 1], to_standard[1, 3], to_standard[3, 3] = -1.0, scan.image.shape[1] - 1, 1.0
    write_volume(images / "turned_0000.nii.gz", stored, affine @ to_standard)
    assert main(["predict", "--ensemble", str(folder), "--nifti-in", str(images), "--out", str(tmp_path / "out")]) == 0
    plain, turned = nib.load(tmp_path / "out" / "plain.nii.gz"), nib.load(tmp_path / "out" / "turned.nii.gz")
    for name, out in (("plain", plain), ("turned", turned)):
        source = nib.load(images / f"{name}_0000.nii.gz")
        assert out.shape == source.shape and np.allclose(out.affine, source.affine)
    labels = np.asarray(plain.dataobj)
    assert labels.any()
    # Voxel (x, y, z) of `turned` is voxel (z, H-1-y, x) of `plain`, in nibabel's (column, row, slice) order.
    back = np.flip(np.transpose(np.asarray(turned.dataobj), (2, 1, 0)), 1)
    assert np.array_equal(back, labels)
    record = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert sorted(record["volumes"]) == ["plain", "turned"] and record["failed"] == {}


def test_both_predict_paths_put_every_organ_on_the_same_side_of_the_patient(clinical, tmp_path):
    """One synthetic case-day predicted from the Kaggle tree (`--data --nifti`) and as a DICOM series
    (`--dicom`): the two label volumes hold the same voxels at the same patient coordinates, the SEG's
    own geometry and the RTSTRUCT's contours put them there too, and the phantom's stomach lies on
    the patient's left (as DICOM's standard axial display shows it, on the image's right)."""
    import highdicom as hd
    import nibabel as nib
    import pydicom

    from ensemble.predict.clinical import predict_series
    from gitseg.data.dicom import read_series
    from gitseg.data.geometry import LPS_TO_RAS, axial_affine, axis_codes

    root, series_dir, scan, folder = clinical
    case_day = series_dir.name
    predict_tree(folder, root, tmp_path / "tree", nifti=tmp_path / "tree-nii", **QUIET)
    predict_series_out = tmp_path / "series"
    predict_series(folder, predict_series_out, dicom=series_dir, **QUIET)
    tree = nib.load(tmp_path / "tree-nii" / f"{case_day}.nii.gz")
    dicom = nib.load(predict_series_out / "labels.nii.gz")
    assert nib.aff2axcodes(tree.affine) == nib.aff2axcodes(dicom.affine) == ("L", "P", "I")
    assert np.allclose(tree.affine, dicom.affine)
    tree_labels, dicom_labels = np.asarray(tree.dataobj), np.asarray(dicom.dataobj)
    assert np.array_equal(tree_labels, dicom_labels) and (tree_labels > 0).any()

    def ras_points(image, where) -> np.ndarray:
        ijk = np.argwhere(where)  # (N, 3): column, row, slice
        return (image.affine @ np.column_stack([ijk, np.ones(len(ijk))]).T).T[:, :3]

    # The SEG's own geometry (highdicom's volume of it, not the series'): the same voxels in LPS.
    seg = hd.seg.segread(predict_series_out / "seg.dcm").get_volume(combine_segments=False)
    for c in range(3):
        kji = np.argwhere(seg.array[..., c] > 0)  # (N, 3): slice, row, column
        lps = (seg.affine @ np.column_stack([kji, np.ones(len(kji))]).T).T[:, :3]
        from_nifti = ras_points(dicom, dicom_labels == c + 1) * [-1, -1, 1]
        seg_set = {tuple(p) for p in np.round(lps, 3)}
        assert {tuple(p) for p in np.round(from_nifti, 3)} <= seg_set  # overlaps go to the likelier class
        # RTSTRUCT: each slice's contours span exactly the SEG's pixels of that slice, in patient mm.
        rt = pydicom.dcmread(predict_series_out / "rtstruct.dcm")
        roi = next(r for r in rt.ROIContourSequence if r.ReferencedROINumber == c + 1)
        by_z: dict[float, list] = {}
        for item in roi.ContourSequence:
            points = np.asarray(item.ContourData, float).reshape(-1, 3)
            by_z.setdefault(round(float(points[0, 2]), 3), []).append(points)
        seg_by_z: dict[float, list] = {}
        for p in lps:
            seg_by_z.setdefault(round(float(p[2]), 3), []).append(p)
        assert set(by_z) == set(seg_by_z)
        for z, parts in by_z.items():
            contour, pixels = np.concatenate(parts), np.asarray(seg_by_z[z])
            assert contour.min(0) == pytest.approx(pixels.min(0), abs=1e-3)
            assert contour.max(0) == pytest.approx(pixels.max(0), abs=1e-3)

    # Ground truth of the labelled case-day: the stomach on the patient's left, on both paths' geometry.
    (train_day,) = index_root(root, "train")[0]["case_day"].unique()
    truth = load_volume(root, train_day, "train")
    train_series = read_series(root / "dicom" / train_day)
    assert np.allclose(train_series.affine, axial_affine(truth.spacing))
    assert axis_codes(train_series.affine) == ("L", "P", "I")
    kji = np.argwhere(truth.masks[2])
    ras = (LPS_TO_RAS @ train_series.affine @ np.column_stack([kji[:, ::-1], np.ones(len(kji))]).T).T[:, :3]
    d, h, w = truth.image.shape
    centre = (LPS_TO_RAS @ train_series.affine @ [(w - 1) / 2, (h - 1) / 2, (d - 1) / 2, 1])[:3]
    assert ras[:, 0].mean() < centre[0] - 20  # RAS: x grows toward the patient's right


def test_implausible_input_is_refused_before_anything_is_written_and_force_records_why(clinical, tmp_path, capfd):
    """pydicom's MR_small (one 64 x 64 slice at 0.31 mm: a 20 mm field of view) beside an export's
    README.TXT: refused with every reason, nothing written; with --force predicted, and the warnings
    are in timings.json, the SEG, the RTSTRUCT and the NIfTI header."""
    import nibabel as nib
    import pydicom
    from pydicom.data import get_testdata_file

    from gitseg.cli import main

    folder = clinical[3]
    series = tmp_path / "mr_small"
    series.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), series / "IM1")
    (series / "README.TXT").write_text("exported by a PACS\n")
    command = ["predict", "--ensemble", str(folder), "--dicom", str(series), "--out", str(tmp_path / "out")]
    assert main(command) == 2
    out, err = capfd.readouterr()
    assert "Research use only; not for clinical use." in out
    for reason in ("the scan has 1 slice, fewer than the 5 its 2.5D input reads around each slice (1 slice, 3 slices "
                   "2 apart)", "trained on scans of 40 slices",
                   "the field of view is 20 x 20 mm", "the pixel spacing is 0.31 x 0.31 mm", "Pass --force"):
        assert reason in err, err
    assert not (tmp_path / "out").exists()

    assert main([*command, "--force"]) == 0
    out, _ = capfd.readouterr()
    assert "skipped 1 file(s)" in out and "README.TXT" in out and out.count("warning (--force)") == 3
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert len(timings["warnings"]) == 3 and "field of view is 20 x 20 mm" in timings["warnings"][1]
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm")
    assert seg.ContentDescription == "Input checks forced; Research use only; not for clinical use."
    rtstruct = pydicom.dcmread(tmp_path / "out" / "rtstruct.dcm")
    for text in (seg.ImageComments, rtstruct.StructureSetDescription):
        assert text.startswith("Research use only") and all(w in text for w in timings["warnings"])
    descrip = nib.load(tmp_path / "out" / "labels.nii.gz").header["descrip"].tobytes().rstrip(b"\0").decode()
    assert descrip.startswith("Input checks forced")


@pytest.mark.parametrize("kind,expected", [
    ("sagittal", "the slices are sagittal"),
    ("mirrored", "columns run toward the patient's right"),
    ("two slices", "the scan has 2 slices, fewer than the 5"),
])
def test_a_series_that_is_not_axial_or_too_short_is_refused(clinical, tmp_path, kind, expected):
    from ensemble.predict.clinical import predict_series
    from ensemble.predict.input_checks import InputRefused
    from gitseg.data.dicom import write_series

    _, _, scan, folder = clinical
    orientation = {"sagittal": (0, 1, 0, 0, 0, -1), "mirrored": (-1, 0, 0, 0, 1, 0)}.get(kind, (1, 0, 0, 0, 1, 0))
    image = scan.image[:2] if kind == "two slices" else scan.image
    write_series(tmp_path / "series", image, scan.spacing, "case1_day1", orientation=orientation)
    with pytest.raises(InputRefused, match=re.escape(expected)):
        predict_series(folder, tmp_path / "out", dicom=tmp_path / "series", **QUIET)
    assert not (tmp_path / "out").exists()


def test_the_tree_path_refuses_case_days_unlike_the_training_scans_unless_forced(clinical, tmp_path):
    root, _, _, folder = clinical
    strict = tmp_path / "ensemble"
    shutil.copytree(folder, strict)
    manifest = json.loads((strict / ENSEMBLE_MANIFEST).read_text())
    manifest["training_data"]["pixel_mm"] = [0.5, 0.6]  # as if trained on high-resolution scans
    (strict / ENSEMBLE_MANIFEST).write_text(json.dumps(manifest))
    result = predict_tree(strict, root, tmp_path / "refused", nifti=tmp_path / "nii", **QUIET)
    (case_day,) = result["failed"]
    assert result["written"] == [] and "the pixel spacing is" in result["failed"][case_day][0]
    assert "Pass --force" in result["failed"][case_day][0] and not list((tmp_path / "nii").glob("*.nii.gz"))
    result = predict_tree(strict, root, tmp_path / "forced", nifti=tmp_path / "nii", force=True, **QUIET)
    assert result["written"] == [case_day] and "pixel spacing" in result["warnings"][case_day][0]
    assert json.loads((tmp_path / "forced" / "predict.json").read_text())["warnings"] == result["warnings"]


def test_an_empty_organ_the_scan_should_hold_is_said(built, synth_root, tmp_path):
    """A copy of the test ensemble that draws large bowel and stomach everywhere (threshold 0) and
    small bowel nowhere (threshold above 1): each full-length case-day gets one line, for the small
    bowel, on the terminal and in predict.json."""
    folder = tmp_path / "ensemble"
    shutil.copytree(built[0], folder)
    manifest = json.loads((folder / ENSEMBLE_MANIFEST).read_text())
    manifest["postprocess"] = {**manifest["postprocess"], "thresholds": [0.0, 1.01, 0.0]}
    (folder / ENSEMBLE_MANIFEST).write_text(json.dumps(manifest))
    said = []
    result = predict_tree(folder, synth_root, tmp_path / "pred", log=said.append)
    assert result["written"]
    lines = [line for line in said if " found" in line]
    assert len(lines) == len(result["written"]) and all(
        line.startswith(f"predict: {cd}: no small bowel found, although the scan covers 120 mm head to feet and "
                        f"100% of the training scans (120 mm) held one") for cd, line in zip(result["written"], lines))
    assert result["empty_organs"] == {cd: [line.split(": ", 2)[2]] for cd, line in zip(result["written"], lines)}


def test_robustness_scores_the_holdout_under_corruptions_and_the_report_shows_it(built, refit_run, tmp_path):
    from ensemble.report.report import build_report
    from ensemble.robustness.robustness import CLEAN, SEVERITIES, corrupt, run_robustness

    folder = tmp_path / "ensemble"
    shutil.copytree(built[0], folder)
    result = run_robustness(folder, corruptions=["gaussian_noise", "blur", "rician_noise"], severities=[1, 3],
                            **QUIET)
    table = result["table"]
    assert [(r["corruption"], r["severity"]) for r in table] == [
        (CLEAN, 0), ("gaussian_noise", 1), ("gaussian_noise", 3), ("blur", 1), ("blur", 3), ("rician_noise", 1),
        ("rician_noise", 3)]
    clean = table[0]["score"]
    for r in table[1:]:
        assert r["drop"] == pytest.approx(r["score"] - clean) and r["drop_ci95_low"] <= r["drop"] + 1e-9
        assert r["worst_class"] in CLASSES and r["amount"] == SEVERITIES[r["corruption"]][r["severity"] - 1]
        assert any(k.startswith("score [") for k in r)
    assert (folder / "robustness" / "figures" / "robustness.png").is_file()
    assert (folder / "robustness" / "robustness.csv").is_file()
    # Corruptions are seeded: the same inputs give the same volume; a stronger one changes it more.
    scan = np.random.default_rng(0).integers(0, 1000, (4, 32, 32)).astype(np.uint16)
    a, b = corrupt(scan, (3.0, 1.5, 1.5), "motion", 2, seed=1), corrupt(scan, (3.0, 1.5, 1.5), "motion", 2, seed=1)
    assert np.array_equal(a, b)
    base = scan / np.percentile(scan[:, ::2, ::2], 99.5)
    mild, strong = (np.abs(corrupt(scan, (3.0, 1.5, 1.5), "gaussian_noise", s, seed=1) - base).mean() for s in (1, 3))
    assert 0 < mild < strong
    page = build_report(refit_run, ensemble_dir=folder, out=tmp_path / "report", **QUIET).read_text()
    assert ">Robustness</h2>" in page and "figures/robustness.png" in page
    assert (tmp_path / "report" / "figures" / "robustness.png").is_file()
