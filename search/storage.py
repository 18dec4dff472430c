"""Where a search writes: a local (or NFS) folder, or an object-store URI, as a pyarrow filesystem.

Why not pyarrow's own LocalFileSystem for a folder: Ray writes its state files in place (Tune's
experiment_state-*.json, tuner.pkl and searcher state, copied from the driver by a background
thread; Ray Train's checkpoint_manager_snapshot.json), so a driver killed mid-copy leaves a
truncated file. Tune then logs "Failed to restore the run state" and silently starts the search
over (seen here: a rerun after `kill -9` trained one new trial instead of resuming two). Through
`AtomicLocalFiles` every file written appears whole or not at all: it is written beside its target
under a hidden temporary name and renamed over it when closed (rename is atomic on POSIX
filesystems, NFS included). Object stores need nothing: an upload becomes visible only when done.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow
import pyarrow.fs

from gitseg.files import temporary_beside


def filesystem(path: str):
    """(pyarrow filesystem, path in it) for a storage folder or URI, as Ray's `storage_filesystem`."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:  # s3://, gs://, abfs://, ...
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.PyFileSystem(AtomicLocalFiles()), str(Path(path).resolve())


class _ReplacedOnClose:
    """A binary file written under a hidden temporary name and renamed over `path` on close.
    A writer that dies first leaves only the hidden file, which no reader looks for."""

    def __init__(self, path: str):
        self.path = path
        self.temporary = str(temporary_beside(path))
        self.file = open(self.temporary, "wb")

    def write(self, data) -> int:
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def tell(self) -> int:
        return self.file.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self.file.closed

    def close(self) -> None:
        if self.file.closed:
            return
        # No fsync: this guards against a killed process (the page cache survives it), not a
        # power cut, and an fsync per checkpoint file would cost more than the write.
        self.file.close()
        os.replace(self.temporary, self.path)


class AtomicLocalFiles(pyarrow.fs.FileSystemHandler):
    """pyarrow's LocalFileSystem, except that every file written is replaced whole on close."""

    def __init__(self):
        self.local = pyarrow.fs.LocalFileSystem()

    def __reduce__(self):  # Ray sends the filesystem to its Train controllers and workers
        return AtomicLocalFiles, ()

    def __eq__(self, other):
        return isinstance(other, AtomicLocalFiles)

    def get_type_name(self) -> str:
        return "gitseg-atomic-local"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the root folder")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        with self.local.open_input_stream(src) as source:
            target = _ReplacedOnClose(dest)
            try:
                while chunk := source.read(1 << 24):
                    target.write(chunk)
            except BaseException:
                target.file.close()
                os.unlink(target.temporary)
                raise
            target.close()

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_ReplacedOnClose(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path)


def experiment_root(storage_path: str, name: str) -> str:
    """`<storage_path>/<name>`: the folder (or URI) of one search, an absolute path when local."""
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    return f"{storage_path.rstrip('/')}/{name}"


def write_text(uri_or_path: str, text: str) -> None:
    """Write a whole file to a storage folder or URI (replaced whole, see AtomicLocalFiles)."""
    fs, path = filesystem(uri_or_path)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
