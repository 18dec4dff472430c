"""Writing outputs so that a failure never leaves a half-written folder behind, nor a killed process
its scratch folder, nor two commands the same folder at once."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np


def temporary_beside(path, suffix: str = "") -> Path:
    """A hidden name in `path`'s folder, unique per process and call, for writing `path` whole.

    `suffix` keeps an extension a writer needs (nibabel picks the format from `.nii.gz`).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside `path`; it replaces `path` only when the block succeeds.

    Readers see the old file or the new one, never a half-written one (rename is atomic on
    POSIX filesystems, NFS included); a failure removes the temporary file.
    """
    tmp = temporary_beside(path, suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


class CorruptFileError(ValueError):
    """A file that is truncated or altered: detected before its contents are used."""


def corrupt(path, problem: str, advice: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is truncated or altered ({problem}); {advice}")


def load_array(path, advice: str, mmap: bool = False):
    """np.load of a `.npy` file (memory-mapped with `mmap`); a truncated or damaged file raises
    CorruptFileError naming it with `advice`, a missing one FileNotFoundError."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise
    except (ValueError, EOFError, OSError) as exc:
        raise corrupt(path, f"numpy cannot read it: {exc}", advice) from None


def save_array(path, array) -> None:
    """np.save a whole `.npy` file or none: a failed write (a full disk) leaves no truncated file and
    raises `write_failed`'s clear error."""
    try:
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, array)
    except OSError as exc:
        raise write_failed(path, exc) from exc


def save_compressed(path, **arrays) -> None:
    """np.savez_compressed `arrays` into `path` (`.npz`, deflate) whole or not at all, like `save_array`.

    Zip members carry a CRC-32, so a truncated or altered file is detected when read.
    """
    try:
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **arrays)
    except OSError as exc:
        raise write_failed(path, exc) from exc


def load_compressed(path, advice: str, names=None) -> dict[str, np.ndarray]:
    """The arrays `names` (default: all) of a `save_compressed` file that holds them, decompressed and
    checked; a damaged file raises CorruptFileError naming it with `advice`, a missing one
    FileNotFoundError. Arrays not asked for are not decompressed."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files if names is None or name in names}
    except FileNotFoundError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise corrupt(path, f"numpy cannot read it: {exc}", advice) from None


def write_failed(path, exc: OSError) -> OSError:
    """A clear error for a failed write (the previous file, if any, is left as it was)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(exc.errno, f"no space left on the device writing {path}; the previous version, if any, is "
                                  f"intact: free some space and run the command again")
    return OSError(exc.errno, f"writing {path} failed ({exc.strerror or exc}); the previous version, if any, is "
                              f"intact")


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def staged_folder(out):
    """Yield a staging folder beside `out`; it replaces `out` only when the block succeeds."""
    out = Path(out)
    staging = temporary_beside(out)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


# Ray kills the workers of a stopped trial (ASHA, a failed or cancelled run, a killed driver)
# without running Python's cleanup, so a plain TemporaryDirectory stays behind each time: a day of
# searches on the dev machine left 546 of them in /tmp, 11 GB, and CI then failed for want of
# disk. Scratch folders therefore carry their host and process id, and each new one first
# removes those of this host whose process is gone.
SCRATCH = re.compile(r"^gitseg-[a-z]+\d*-h([0-9a-f]{8})-p(\d+)-")


def _host_tag() -> str:
    # /tmp may be shared by containers with their own process ids; they have their own host names.
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphan_scratch(tmp=None) -> list[Path]:
    """Remove this host's scratch folders whose process has ended; return them."""
    tmp = Path(tmp or tempfile.gettempdir())
    host, removed = _host_tag(), []
    for path in tmp.glob("gitseg-*"):
        match = SCRATCH.match(path.name)
        if match and match.group(1) == host and path.is_dir() and not _alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def scratch_folder(kind: str, tmp=None):
    """A node-local temporary folder, removed on exit, and by the next one if this process is killed."""
    if not re.fullmatch(r"[a-z]+\d*", kind):  # any other name would never match SCRATCH, never be swept
        raise ValueError(f"scratch folder kind must be lower-case letters and an optional number (got {kind!r})")
    tmp = Path(tmp or tempfile.gettempdir())
    remove_orphan_scratch(tmp)
    folder = Path(tempfile.mkdtemp(prefix=f"gitseg-{kind}-h{_host_tag()}-p{os.getpid()}-", dir=tmp))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class FolderInUse(FileExistsError):
    """Another live gitseg command holds the folder's lock."""


def lock_file(folder) -> Path:
    """`<folder>.lock`, beside the folder: a folder replaced whole (staged_folder) keeps its lock."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".lock")


@contextlib.contextmanager
def folder_lock(folder, command: str):
    """Hold the lock of `folder` while `command` writes it; refuse if another command holds it.

    The lock is an exclusive `flock` on `<folder>.lock`, a file that says who holds it (host, pid,
    command, since when). The kernel releases the flock when its process ends however it ends, so
    a lock left by a killed process is stale by construction: the next command takes it over. A
    lock held by a live process (on this host, or on another through a shared filesystem that
    supports locks, as NFSv4 does) refuses with the holder's details. Removed on release.
    """
    path = lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_owner(fd)
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by {owner}; wait for it to finish or stop it (a lock whose "
                              f"process has ended is taken over by the next command)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder removed it as we opened it: ours is an orphan inode
            same = False
        if same:
            break
        os.close(fd)  # locked an inode that was unlinked meanwhile: try the file now at `path`
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiter that opened it retries (inode check)
        os.close(fd)


def _lock_owner(fd: int) -> str:
    """Who holds the lock, from its file; the holder writes it just after taking the lock, so an
    empty file is read again for a moment."""
    for _ in range(20):
        try:
            owner = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (OSError, ValueError):
            owner = None
        if isinstance(owner, dict) and {"command", "pid", "host", "since"} <= owner.keys():
            return f"{owner['command']} (pid {owner['pid']} on host {owner['host']}, since {owner['since']})"
        time.sleep(0.05)
    return "another gitseg command (its lock file is being written)"
