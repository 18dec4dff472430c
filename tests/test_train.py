"""fit(): learning, checkpoints, determinism, resume, DDP on CPU (gloo), config errors."""

import errno
import json
import math
import os
import re
import signal
import socket
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config

from gitseg.checkpoint import BEST, LAST, load_checkpoint, model_from_checkpoint, save_checkpoint
from gitseg.config import ConfigError
from gitseg.data.cache import Cache
from gitseg.data.dataset import SliceDataset
from gitseg.files import CorruptFileError
from gitseg.losses import LossMix
from gitseg.metrics import soft_dice
from gitseg.models import build_model
from gitseg.train import Preempted, fit, lr_at, precise_bn, score_fold, seed_everything

QUIET = dict(log=lambda *_: None)


def fixed_batch_loss(model, cfg):
    cache = Cache(cfg.data.cache)
    ds = SliceDataset(cache, cache.case_days(folds=[1]), cfg.data.channels, cfg.data.stride)
    idx = [i for i in range(0, len(ds), 5)][:32]
    x = torch.stack([ds[i][0] for i in idx])
    y = torch.stack([ds[i][1] for i in idx])
    model.eval()
    with torch.no_grad():
        return LossMix(cfg.train.loss)(model(x), y)[0].item()


def test_one_epoch_lowers_the_loss_and_checkpoint_rebuilds(train_cache, tmp_path):
    cfg = tiny_config(train_cache, tmp_path / "run", max_steps_per_epoch=12)
    seed_everything(cfg.train.seed)
    before = fixed_batch_loss(build_model(cfg.model, cfg.data.channels), cfg)
    reports = []
    best = fit(cfg, report=lambda m, d: reports.append((m, d)), **QUIET)
    assert len(reports) == 1 and reports[0][1] == str(tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / BEST)  # weights_only=True inside
    for key in ("model", "config", "fold", "epoch", "metrics", "preprocessing"):
        assert key in state
    model = model_from_checkpoint(state)
    after = fixed_batch_loss(model, cfg)
    assert after < before
    # the rebuilt model reproduces the validation numbers fit reported
    cache = Cache(train_cache)
    again = score_fold(model, cache, cache.case_days(folds=[0]), cfg, "cpu")
    assert again["score"] == pytest.approx(best["score"], abs=1e-12)
    assert (tmp_path / "run" / "config.yaml").is_file()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("train_loss", "score", "dice", "hausdorff", "dice/stomach", "hausdorff/small_bowel",
                "epoch_time", "samples_per_s", "soft_dice"):
        assert key in line
    assert 0 < line["soft_dice"] < 1  # probabilities above 0 on the truth, below 1 elsewhere


def test_same_seed_same_metrics_and_resume_continues_exactly(train_cache, tmp_path):
    cfg = tiny_config(train_cache, tmp_path / "straight", epochs=2)
    straight = [m for m in _run(cfg)]

    class Interrupt(Exception):
        pass

    def stop_after_first(metrics, _):
        raise Interrupt

    broken = tiny_config(train_cache, tmp_path / "broken", epochs=2)
    with pytest.raises(Interrupt):
        fit(broken, report=stop_after_first, **QUIET)
    assert load_checkpoint(tmp_path / "broken" / LAST)["epoch"] == 0
    logs = []
    resumed = []
    fit(broken, report=lambda m, d: resumed.append(m), log=logs.append)
    assert any("resuming" in line for line in logs)
    assert [m["epoch"] for m in resumed] == [1]  # epoch 0 was not trained again
    for key in ("train_loss", "score", "dice", "hausdorff"):
        assert resumed[0][key] == straight[1][key]
    again = _run(tiny_config(train_cache, tmp_path / "again", epochs=2))
    assert [m["score"] for m in again] == [m["score"] for m in straight]


def test_sigterm_stops_between_steps_and_the_run_resumes_from_that_step(train_cache, tmp_path, monkeypatch):
    straight = _run(tiny_config(train_cache, tmp_path / "straight", epochs=2))
    cfg = tiny_config(train_cache, tmp_path / "stopped", epochs=2)
    # SIGTERM to this process during epoch 2's third step, as a spot instance's notice arrives: the
    # step finishes, the loop stops before the next one and saves it
    calls, forward = [], LossMix.forward

    def loss_then_signal(self, *args):
        calls.append(1)
        if len(calls) == 6 + 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(LossMix, "forward", loss_then_signal)
    with pytest.raises(Preempted, match=r"in epoch 2 before step 4; .*last.pt holds that step"):
        fit(cfg, **QUIET)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only while training
    state = load_checkpoint(tmp_path / "stopped" / LAST)
    assert state["epoch"] == 0 and state["partial"]["epoch"] == 1 and state["partial"]["steps"] == 3
    logs, resumed = [], []
    fit(cfg, report=lambda m, d: resumed.append(m), log=logs.append)
    assert any("in epoch 2 after step 3" in line for line in logs)
    assert [m["epoch"] for m in resumed] == [1]
    for key in ("train_loss", "score", "dice", "hausdorff"):
        assert resumed[0][key] == straight[1][key]
    done, again = (load_checkpoint(tmp_path / name / LAST) for name in ("straight", "stopped"))
    assert all(torch.equal(done["model"][k], again["model"][k]) for k in done["model"])
    assert "partial" not in again


def test_restarted_after_its_last_epoch_it_reports_that_epoch_again(train_cache, tmp_path):
    # A search driver killed after a run's last checkpoint was recorded restarts the run; it has
    # nothing left to train, and must still report its final state (Tune keeps only what it hears).
    cfg = tiny_config(train_cache, tmp_path / "done", epochs=2)
    first = _run(cfg)
    logs, again = [], []
    best = fit(cfg, report=lambda m, d: again.append((m, d)), log=logs.append)
    assert [m for m, _ in again] == [first[-1]] and again[0][1] == str(tmp_path / "done")
    assert any("already trained all 2 epochs" in line for line in logs)
    assert best == max(first, key=lambda m: m["score"])
    assert load_checkpoint(tmp_path / "done" / LAST)["epoch"] == 1  # nothing retrained, nothing rewritten
    assert len((tmp_path / "done" / "metrics.jsonl").read_text().splitlines()) == 2


def _run(cfg):
    out = []
    fit(cfg, report=lambda m, d: out.append(m), **QUIET)
    return out


def test_resume_refuses_a_different_config(train_cache, tmp_path):
    fit(tiny_config(train_cache, tmp_path / "r"), **QUIET)
    with pytest.raises(ConfigError, match="different configuration"):
        fit(tiny_config(train_cache, tmp_path / "r", lr=0.01), **QUIET)


def test_a_damaged_checkpoint_is_caught_before_use_and_resume_names_it(train_cache, tmp_path):
    cfg = tiny_config(train_cache, tmp_path / "r")
    fit(cfg, **QUIET)
    last = tmp_path / "r" / LAST
    good = last.read_bytes()
    # One altered byte inside the weights: torch would load it silently; the digest does not match.
    with zipfile.ZipFile(last) as archive:  # torch's format: one zip record per tensor storage
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    altered = bytearray(good)
    name_len, extra_len = struct.unpack("<HH", altered[record.header_offset + 26:record.header_offset + 30])
    altered[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0xFF
    last.write_bytes(bytes(altered))
    assert torch.load(last, weights_only=True)["epoch"] == 0  # torch itself notices nothing
    with pytest.raises(CorruptFileError, match=r"last.pt is truncated or altered \(its weights do not match"):
        load_checkpoint(last)
    # Resuming stops with the file's name rather than training from damaged weights.
    with pytest.raises(CorruptFileError, match="last.pt"):
        fit(tiny_config(train_cache, tmp_path / "r", epochs=2), **QUIET)
    last.write_bytes(good[: len(good) // 2])  # truncated: torch's own error, turned into the same one
    with pytest.raises(CorruptFileError, match="torch cannot read it"):
        load_checkpoint(last)
    last.write_bytes(good)
    assert load_checkpoint(last)["epoch"] == 0


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = build_model(tiny_config(tmp_path, tmp_path).model, 3)
    path = tmp_path / BEST
    save_checkpoint(path, {"format": 1, "model": model.state_dict(), "epoch": 0})

    def full_disk(obj, f):
        Path(f).write_bytes(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"no space left on the device writing .*best.pt; the previous version"):
        save_checkpoint(path, {"format": 1, "model": model.state_dict(), "epoch": 1})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 0 and sorted(p.name for p in tmp_path.iterdir()) == [BEST]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit_reported(cfg) -> list[tuple]:
    """fit(cfg) in this process; (score, dice, hausdorff, checkpoint dir) of each reported epoch."""
    reported = []
    fit(cfg, report=lambda m, d: reported.append((m, d)), log=lambda *_: None)
    return [(m["score"], m["dice"], m["hausdorff"], d) for m, d in reported]


def _ddp_worker(rank, world, port, cfgs, results):
    """One DDP rank fitting `cfgs` in turn in one process group (one spawn for all: a spawn costs
    seconds here); results[(i, rank)] is configuration i's _fit_reported."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for i, cfg in enumerate(cfgs):
            results[(i, rank)] = _fit_reported(cfg)
    finally:
        dist.destroy_process_group()


def _ddp_preempted_worker(rank, world, port, cfgs, straight, cfg, results, signalled_rank):
    """A DDP rank that fits `cfgs` in turn (results[(i, rank)], as _ddp_worker), then trains
    `straight` to the end (the unbroken reference, results[("straight", rank)]), then `cfg` with its
    process (only `signalled_rank`'s) getting SIGTERM during epoch 2's third step (results[rank])."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for i, c in enumerate(cfgs):
            results[(i, rank)] = _fit_reported(c)
        results[("straight", rank)] = _fit_reported(straight)
        calls, forward = [], LossMix.forward

        def loss_then_signal(self, *args):
            calls.append(1)
            if rank == signalled_rank and len(calls) == 6 + 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return forward(self, *args)

        LossMix.forward = loss_then_signal
        try:
            fit(cfg, log=lambda *_: None)
            results[rank] = "finished"
        except Preempted as exc:
            results[rank] = str(exc)
        finally:
            LossMix.forward = forward
    finally:
        dist.destroy_process_group()


# with precise_bn each rank recomputes BatchNorm statistics on its own batches; averaged over the
# ranks, the model rank 0 saves is the one both ranks validated. With ema, that model is the moving
# average (precise BN applied to it), the same on both ranks (lr 0.01: a score above 0, which the
# optimiser's own weights do not share).
DDP_CASES = [(0, 0.0, 0.003), (4, 0.0, 0.003), (4, 0.9, 0.01)]  # (precise_bn, ema, lr)


@pytest.fixture(scope="module")
def ddp_runs(train_cache, tmp_path_factory):
    """One 2-process spawn for both DDP tests below (a spawn costs seconds here): the DDP_CASES,
    then an unbroken 2-epoch run, then the same run with rank 1 preempted. Returns (folder, the
    cases' configs, the preempted run's config, results)."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfgs = [tiny_config(train_cache, tmp / f"ddp{i}", epochs=1, precise_bn=pbn, ema=ema, lr=lr)
            for i, (pbn, ema, lr) in enumerate(DDP_CASES)]
    straight = tiny_config(train_cache, tmp / "straight", epochs=2)
    cfg = tiny_config(train_cache, tmp / "stopped", epochs=2)
    results = mp.Manager().dict()
    mp.spawn(_ddp_preempted_worker, args=(2, _free_port(), cfgs, straight, cfg, results, 1), nprocs=2, join=True)
    return tmp, cfgs, cfg, dict(results)


def test_two_process_ddp_matches_one_process_validation(train_cache, ddp_runs):
    tmp, cfgs, _, results = ddp_runs
    cache = Cache(train_cache)
    for i, (case, cfg) in enumerate(zip(DDP_CASES, cfgs)):
        (s0, d0, h0, dir0), = results[(i, 0)]
        (s1, d1, h1, dir1), = results[(i, 1)]
        assert (s0, d0, h0) == (s1, d1, h1), f"every rank must see the same validation metrics: {case}"
        assert dir0 == str(tmp / f"ddp{i}") and dir1 is None  # checkpoints from rank 0 only
        # one process, same weights, same volumes: the same numbers
        model = model_from_checkpoint(load_checkpoint(tmp / f"ddp{i}" / LAST))
        single = score_fold(model, cache, cache.case_days(folds=[0]), cfg, "cpu")
        assert single["score"] == pytest.approx(s0, abs=1e-12), case
        assert single["hausdorff"] == pytest.approx(h0, abs=1e-12), case


def test_sigterm_to_one_ddp_rank_stops_every_rank_at_one_step_and_resumes(ddp_runs):
    # A spot node's notice reaches only its own processes: rank 1 is told, rank 0 is not. Both must
    # stop after the same step (or rank 0 would wait forever in the next all-reduce), one last.pt
    # holds that step, and the same 2-process command resumes to the unbroken run's result.
    tmp_path, _, cfg, stopped = ddp_runs
    unbroken = stopped[("straight", 0)]
    assert all(re.search(r"in epoch 2 before step 4", stopped[r]) for r in (0, 1)), dict(stopped)
    state = load_checkpoint(tmp_path / "stopped" / LAST)
    assert state["epoch"] == 0 and state["partial"]["epoch"] == 1 and state["partial"]["steps"] == 3
    resumed = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), [cfg], resumed), nprocs=2, join=True)
    # The resumed run reports epoch 2 only; both runs end with the same weights and scores (DDP
    # broadcasts rank 0's BatchNorm statistics at every forward, so taking rank 0's at the resume
    # changes nothing here).
    assert len(resumed[(0, 0)]) == 1 and resumed[(0, 0)][0][:3] == unbroken[1][:3]
    done, again = (load_checkpoint(tmp_path / name / LAST) for name in ("straight", "stopped"))
    assert all(torch.equal(done["model"][k], again["model"][k]) for k in done["model"])
    lines = (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]  # each epoch once


@pytest.mark.parametrize("override, message", [
    (dict(epochs=0), "train.epochs must be at least 1"),
    (dict(lr=-1.0), "train.lr must be positive"),
    (dict(precise_bn=-1), "train.precise_bn must be at least 0"),
    (dict(schedule="step"), "train.schedule must be one of cosine, wsd"),
    (dict(decay_fraction=0), r"train.decay_fraction must be in \(0, 1\]"),
    (dict(ema=1.0), r"train.ema must be in \[0, 1\)"),
])
def test_bad_train_settings(train_cache, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        fit(tiny_config(train_cache, tmp_path / "x", **override), **QUIET)


def test_impossible_window_and_fold(train_cache, tmp_path):
    cfg = tiny_config(train_cache, tmp_path / "x")
    cfg.data.channels = 4
    with pytest.raises(ConfigError, match="channels must be odd"):
        fit(cfg, **QUIET)
    cfg.data.channels, cfg.data.stride = 3, 0
    with pytest.raises(ConfigError, match="stride must be at least 1"):
        fit(cfg, **QUIET)
    cfg.data.stride, cfg.data.fold = 1, 7
    with pytest.raises(ConfigError, match="not a fold"):
        fit(cfg, **QUIET)
    assert not (tmp_path / "x").exists()


def test_nan_loss_is_a_clear_error(train_cache, tmp_path):
    cfg = tiny_config(train_cache, tmp_path / "nan", lr=1e30, grad_clip=0)
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        fit(cfg, **QUIET)


def test_lr_schedule():
    lrs = [lr_at(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)
    assert math.isclose(lr_at(100, 100, 10, 1.0, 0.01), 0.01)


def test_wsd_schedule_warms_up_holds_then_decays_over_its_last_fraction():
    lrs = [lr_at(s, 100, 10, 1.0, 0.01, schedule="wsd", decay_fraction=0.3) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:71])  # stable until the last 30 steps
    decay = lrs[70:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert all(math.isclose(a - b, 0.99 / 30) for a, b in zip(decay, decay[1:]))  # a straight line
    assert lrs[100] == pytest.approx(0.01) and lrs[85] == pytest.approx(1 - 0.99 * 15 / 30)


def test_soft_dice_pools_the_volumes_then_averages_the_classes():
    # Items are (sum p g, sum p, sum g). Two volumes of one class pooled: 2 (0.5 + 0) / ((0.75 + 0) +
    # (1 + 1)); a class with neither probability nor truth counts 1; the mean is over classes.
    assert soft_dice([("a", (0.5, 0.75, 1)), ("a", (0.0, 0.0, 1))]) == pytest.approx(1.0 / 2.75)
    assert soft_dice([("a", (0.5, 0.75, 1)), ("b", (0.0, 0.0, 0))]) == pytest.approx((1 / 1.75 + 1) / 2)


def test_ema_is_what_is_validated_and_saved_and_resumes_bit_exactly(train_cache, tmp_path):
    # lr 0.01: after 12 steps both weights score above 0 and differently (0.44 and 0.59 when written)
    cfg = tiny_config(train_cache, tmp_path / "straight", epochs=2, ema=0.9, lr=0.01)
    straight = _run(cfg)
    saved = load_checkpoint(tmp_path / "straight" / LAST)
    # the moving average is "model" (what every reader predicts with), the optimiser's weights apart;
    # the score reported for the epoch is the average's
    cache, val = Cache(train_cache), Cache(train_cache).case_days(folds=[0])
    ema_score = score_fold(model_from_checkpoint(saved), cache, val, cfg, "cpu")["score"]
    live = model_from_checkpoint({**saved, "model": saved["train_model"]})
    assert ema_score == straight[-1]["score"] != score_fold(live, cache, val, cfg, "cpu")["score"]
    assert "train_model" not in load_checkpoint(tmp_path / "straight" / BEST)

    class Interrupt(Exception):
        pass

    def stop(metrics, _):
        raise Interrupt

    broken = tiny_config(train_cache, tmp_path / "broken", epochs=2, ema=0.9, lr=0.01)
    with pytest.raises(Interrupt):
        fit(broken, report=stop, **QUIET)
    resumed = _run(broken)
    assert resumed[0]["score"] == straight[1]["score"]
    again = load_checkpoint(tmp_path / "broken" / LAST)
    for weights in ("model", "train_model"):
        assert all(torch.equal(saved[weights][k], again[weights][k]) for k in saved[weights]), weights


def test_precise_bn_averages_the_statistics_of_its_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    batches = [(torch.randn(4, 2, 5, 5) * (1 + i), None) for i in range(5)]
    model[1].running_mean.fill_(7.0)  # stale statistics, as left by training
    precise_bn(model, batches, 3, "cpu", channels_last=False)
    with torch.no_grad():
        features = [model[0](x) for x, _ in batches[:3]]  # only the first 3 batches count
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-6)
    assert torch.allclose(model[1].running_var, var, atol=1e-5)
    assert model[1].momentum == 0.1  # restored for training
