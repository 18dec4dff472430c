"""Writing outputs so that a failure never leaves a half-written folder behind, nor a killed process
its scratch folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path


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
