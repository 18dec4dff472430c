"""gitseg/files.py: scratch folders that a killed process does not leave behind, folder locks."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gitseg.files import FolderInUse, _host_tag, folder_lock, lock_file, remove_orphan_scratch, scratch_folder

# Makes a scratch folder, says where, then waits to be killed: what Ray does to a stopped trial's workers.
HOLDER = """
import sys, time
from gitseg.files import scratch_folder
with scratch_folder("rank0", tmp=sys.argv[1]) as folder:
    (folder / "last.pt").write_bytes(b"x" * 100_000)
    print(folder, flush=True)
    time.sleep(600)
"""


def hold_scratch(tmp):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_process_scratch_folder_is_removed_by_the_next_one(tmp_path):
    killed, killed_folder = hold_scratch(tmp_path)
    alive, alive_folder = hold_scratch(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert (killed_folder / "last.pt").is_file()  # no cleanup ran in the killed process
        with scratch_folder("oof1", tmp=tmp_path) as mine:
            assert mine.is_dir() and mine.name.startswith(f"gitseg-oof1-h{_host_tag()}-p{os.getpid()}-")
            assert not killed_folder.exists()
            assert (alive_folder / "last.pt").is_file()  # its process still runs
        assert not mine.exists()
    finally:
        alive.kill()
        alive.wait()


def test_only_this_hosts_scratch_folders_of_ended_processes_are_touched(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = _host_tag()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    names = {
        f"gitseg-rank1-h{host}-p{pid}-abc": False,       # this host, process ended: removed
        f"gitseg-rank1-h{other_host}-p{pid}-abc": True,  # another container's process ids
        f"gitseg-rank1-h{host}-p{os.getpid()}-abc": True,  # alive
        "gitseg-ensemble-19m697pi": True,               # not a scratch folder's name
        "gitseg-rank0-xf1lv1v0": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
    removed = remove_orphan_scratch(tmp_path)
    assert [p.name for p in removed] == [f"gitseg-rank1-h{host}-p{pid}-abc"]
    assert {name: (tmp_path / name).exists() for name in names} == names


def test_the_folder_goes_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with scratch_folder("rank0", tmp=tmp_path) as folder:
            (folder / "partial.pt").write_bytes(b"x")
            raise RuntimeError("training failed")
    assert list(tmp_path.iterdir()) == []


def test_a_kind_the_sweep_would_not_recognise_is_refused(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        with scratch_folder("rank-0", tmp=tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []


# --- Folder locks ---------------------------------------------------------------------------------

LOCKER = """
import sys, time
from gitseg.files import folder_lock
with folder_lock(sys.argv[1], "gitseg prepare"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_held_lock_refuses_naming_its_holder_and_is_removed_on_release(tmp_path):
    folder = tmp_path / "cache"
    with folder_lock(folder, "gitseg prepare") as path:
        assert path == lock_file(folder) and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(FolderInUse, match=rf"cache is in use by gitseg prepare \(pid {os.getpid()} on host "):
            with folder_lock(folder, "gitseg prepare"):
                pass
    assert not lock_file(folder).exists()
    with folder_lock(folder, "gitseg ensemble"):  # free again
        pass


def test_a_killed_holders_lock_is_stale_and_taken_over(tmp_path):
    folder = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse, match=rf"pid {holder.pid} "):
            with folder_lock(folder, "gitseg prepare"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads(lock_file(folder).read_text())["pid"] == holder.pid  # left behind by the killed process
    with folder_lock(folder, "gitseg prepare") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
