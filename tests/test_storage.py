"""search/storage.py: files Ray writes under a local storage_path appear whole or not at all."""

import pickle
import signal
import subprocess
import sys
import time

import pyarrow.fs
import pytest

from search.storage import AtomicLocalFiles, filesystem

# Writes a first version of state.json, then a second one slowly; the test kills it mid-write.
WRITER = """
import sys, time
from search.storage import filesystem
fs, path = filesystem(sys.argv[1])
with fs.open_output_stream(path + "/state.json") as f:
    f.write(b'{"version": 1}')
print("first written", flush=True)
with fs.open_output_stream(path + "/state.json") as f:
    f.write(b'{"version": 2, "padding": "')
    print("second started", flush=True)
    while True:
        f.write(b"x" * 1000)
        f.flush()
        time.sleep(0.001)
"""


def test_a_writer_killed_mid_write_leaves_the_previous_file_whole(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first written"
    assert proc.stdout.readline().strip() == "second started"
    # Kill once the second version is on disk in part: its hidden temporary file holds 10 kB.
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".state.json.tmp-") and p.stat().st_size > 10_000 for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, "the writer never wrote 10 kB"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "state.json").read_text() == '{"version": 1}'
    leftovers = [p for p in tmp_path.iterdir() if p.name != "state.json"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".state.json.tmp-")
    assert leftovers[0].stat().st_size > 10_000


def test_copies_and_listings_look_like_a_plain_folder(tmp_path):
    source = tmp_path / "checkpoint"
    (source / "oof").mkdir(parents=True)
    (source / "last.pt").write_bytes(bytes(range(256)) * 40_000)
    (source / "oof" / "case1_day1.npy").write_bytes(b"probabilities")
    fs, root = filesystem(str(tmp_path / "storage"))
    pyarrow.fs.copy_files(str(source), f"{root}/run/checkpoint_1", destination_filesystem=fs)
    target = tmp_path / "storage" / "run" / "checkpoint_1"
    assert (target / "last.pt").read_bytes() == (source / "last.pt").read_bytes()
    assert (target / "oof" / "case1_day1.npy").read_bytes() == b"probabilities"
    listed = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/run", recursive=True))
    assert sorted(i.base_name for i in listed) == ["case1_day1.npy", "checkpoint_1", "last.pt", "oof"]
    fs.copy_file(f"{target}/last.pt", f"{target}/copy.pt")
    assert (target / "copy.pt").read_bytes() == (source / "last.pt").read_bytes()
    fs.delete_dir(f"{root}/run")
    assert not (tmp_path / "storage" / "run").exists()
    with pytest.raises(OSError):
        fs.delete_dir_contents("/", accept_root_dir=True)


def test_travels_to_ray_workers_and_leaves_object_stores_alone(tmp_path):
    fs, _ = filesystem(str(tmp_path))
    again = pickle.loads(pickle.dumps(fs))  # how Ray ships RunConfig.storage_filesystem
    assert again == fs and again.type_name == "py::gitseg-atomic-local"
    fs, path = filesystem(f"file://{tmp_path}")
    assert isinstance(fs.handler, AtomicLocalFiles) and path == str(tmp_path)
    fs, path = filesystem("mock://bucket/searches")  # an object store: pyarrow's own filesystem
    expected_fs, expected_path = pyarrow.fs.FileSystem.from_uri("mock://bucket/searches")
    assert type(fs) is type(expected_fs) and path == expected_path
