"""Restoring a Ray Train checkpoint into a worker's run folder (search/trial.py), without a Ray instance.

Two DDP workers of a node restore the same checkpoint at nearly the same moment. Ray's
`Checkpoint.as_directory` shares one temporary folder between them, and a worker entering it as the
other leaves found it deleted or half-deleted; here both sides read it, staggered by a few ms.
"""

import multiprocessing
import os
import pickle
import random
import tempfile
import time
from pathlib import Path

from search.storage import filesystem
from search.trial import RESTORED_FILES, continue_from, copy_checkpoint_files


def checkpoint_on_storage(folder: Path, files: dict[str, bytes]):
    import ray.train

    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    fs, path = filesystem(str(folder))  # the search's storage filesystem, as Ray Train restores it
    return ray.train.Checkpoint(path=path, filesystem=fs)


def test_copies_the_run_files_whole_and_nothing_else(tmp_path):
    files = {"last.pt": os.urandom(300_000), "best.pt": os.urandom(1000), "metrics.jsonl": b'{"epoch": 0}\n',
             "config.yaml": b"out: x\n", "oof.npy": b"not a run file"}
    checkpoint = checkpoint_on_storage(tmp_path / "checkpoint_1", files)
    out = tmp_path / "run"
    out.mkdir()
    assert sorted(copy_checkpoint_files(checkpoint, out)) == sorted(RESTORED_FILES)
    assert sorted(p.name for p in out.iterdir()) == sorted(RESTORED_FILES)
    assert all((out / name).read_bytes() == files[name] for name in RESTORED_FILES)


def test_reads_the_storage_directly_not_through_a_shared_temporary_folder(tmp_path, monkeypatch):
    # Ray's as_directory downloads into <temp>/checkpoint_tmp_<id>, one folder for every process
    # of the node; with the temporary folder unusable, only a direct copy still works.
    checkpoint = checkpoint_on_storage(tmp_path / "checkpoint_1", {name: b"x" for name in RESTORED_FILES})
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "not-a-folder"))
    out = tmp_path / "run"
    out.mkdir()
    assert sorted(copy_checkpoint_files(checkpoint, out)) == sorted(RESTORED_FILES)


def test_a_checkpoint_without_last_pt_copies_what_it_has(tmp_path):
    # The refit's final checkpoint holds best.pt and out-of-fold probabilities, no last.pt.
    checkpoint = checkpoint_on_storage(tmp_path / "checkpoint_oof", {"best.pt": b"b", "config.yaml": b"c"})
    out = tmp_path / "run"
    out.mkdir()
    assert sorted(copy_checkpoint_files(checkpoint, out)) == ["best.pt", "config.yaml"]


def _restore_repeatedly(blob, folder, rounds, seed, together, results):
    checkpoint = pickle.loads(blob)
    rng = random.Random(seed)
    incomplete = errors = 0
    for i in range(rounds):
        together.wait()  # both workers start each round at once...
        time.sleep(rng.uniform(0, 0.006))  # ...then drift apart by a few ms: one enters as the other leaves
        out = Path(folder) / str(i)
        out.mkdir()
        try:
            copy_checkpoint_files(checkpoint, out)
            incomplete += sorted(p.name for p in out.iterdir()) != sorted(RESTORED_FILES)
        except Exception:
            errors += 1
    results.put((incomplete, errors))


def test_two_workers_restoring_at_once_both_get_every_file(tmp_path, rounds=150):
    files = {name: os.urandom(500_000) for name in RESTORED_FILES}
    blob = pickle.dumps(checkpoint_on_storage(tmp_path / "checkpoint_1", files))  # the same checkpoint, as Ray sends it
    ctx = multiprocessing.get_context("spawn")
    together, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_restore_repeatedly,
                           args=(blob, str(tmp_path / f"rank{r}"), rounds, r, together, results))
               for r in range(2)]
    for r, worker in enumerate(workers):
        (tmp_path / f"rank{r}").mkdir()
        worker.start()
    outcome = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert outcome == [(0, 0), (0, 0)], f"(incomplete folders, errors) per worker: {outcome}"


def test_the_refit_continues_only_a_run_of_its_own_configuration(tmp_path):
    import torch

    from gitseg.checkpoint import CHECKPOINT_FORMAT
    from gitseg.config import load_config, to_dict

    cfg = load_config(None, ["train.lr=0.003", f"out={tmp_path / 'trial'}"])
    other = load_config(None, ["train.lr=0.001"])
    for name, run_cfg in (("same", cfg), ("other", other)):
        folder = tmp_path / name
        folder.mkdir()
        torch.save({"format": CHECKPOINT_FORMAT, "config": to_dict(run_cfg)}, folder / "last.pt")
        (folder / "metrics.jsonl").write_text('{"epoch": 0}\n')
    cfg.out = str(tmp_path / "refit")  # the out folder differs between trial and refit: still the same run
    for name, expected in (("same", ["last.pt", "metrics.jsonl"]), ("other", [])):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        assert continue_from(str(tmp_path / name), out, cfg) == bool(expected)
        assert sorted(p.name for p in out.iterdir()) == expected
