"""What the terminal shows: stage lines, progress bars, results and errors.

A command's libraries print a lot that is not for its user: Ray's and Tune's messages, every
training worker's epochs, warnings. While `captured(log_file)` is active, the process's standard
output and error (file descriptors 1 and 2, so C++ code and child processes too) go to that log
file, and only what is written through `say`, `bar` and `error` reaches the terminal the command
started from. Without it (`--verbose`, tests, library use) everything prints where it always did.

`say`: a line the user should see. `note`: a detail, in the log (on the terminal with --verbose).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

# The terminal's stdout and stderr, saved while output is captured; None: not captured.
_terminal: tuple[TextIO, TextIO] | None = None
_echoed = 0  # bytes that `error` wrote into the current capture's log (also shown on the terminal)


def terminal() -> TextIO:
    return _terminal[0] if _terminal else sys.stdout


def say(message: str) -> None:
    # tqdm.write keeps an active progress bar intact below the line.
    tqdm.write(message, file=terminal())
    terminal().flush()


def note(message: str) -> None:
    print(message, flush=True)


def error(message: str) -> None:
    """An error on the terminal's stderr; while output is captured, in the log too."""
    global _echoed
    if _terminal:
        print(message, file=_terminal[1], flush=True)
        _echoed += len(message.encode()) + 1
    print(message, file=sys.stderr, flush=True)


def bar(total: int, label: str, unit: str = "", initial: int = 0) -> tqdm:
    """A progress bar on the terminal. On a terminal it redraws at most twice a second; written to a
    file or a CI log it redraws at most every 30 s (carriage returns, one line per bar)."""
    stream = terminal()
    tty = stream.isatty()
    return tqdm(total=total, initial=initial, desc=label, unit=unit, file=stream, mininterval=0.5 if tty else 30,
                dynamic_ncols=tty, ncols=None if tty else 100, leave=True)


def counter(label: str, unit: str = ""):
    """A progress callback `(done, total)` for library functions, drawn as a `bar`."""
    state: dict = {}

    def report(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = bar(total, label, unit)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()
    return report


class Capture:
    """Where a captured command's output went: `path`, final once `captured` has exited (None: the
    log held nothing worth keeping and was removed). Set `keep = False` before the end to drop a
    log that never reached its folder (a command refused before it did anything)."""

    def __init__(self, path: Path, header: int):
        self.path: Path | None = path
        self.keep = True
        self.header = header  # bytes of the log's first line


@contextlib.contextmanager
def captured(log_file: Path | str | None):
    """Send everything written to stdout and stderr to `log_file` (appended) while active; `say`,
    `bar` and `error` still reach the terminal. Yields a `Capture`; None, or already captured:
    change nothing and yield None.

    The output first goes to a temporary file, appended to `log_file` at the end if its folder
    exists by then. A command that fails before it makes its folder leaves no folder behind; its
    log is removed when it holds nothing but the errors already shown on the terminal (or
    `Capture.keep` was cleared), and otherwise stays in the temporary folder (`Capture.path`).
    """
    global _terminal, _echoed
    if log_file is None or _terminal is not None:
        yield None
        return
    log_file = Path(log_file)
    fd, temporary = tempfile.mkstemp(prefix=f"gitseg-{log_file.stem}-", suffix=".log")
    header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n".encode()
    capture = Capture(Path(temporary), len(header))
    os.write(fd, header)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _echoed = 0
    _terminal = (open(os.dup(saved[0]), "w", buffering=1), open(os.dup(saved[1]), "w", buffering=1))
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Python's own streams too: where sys.stdout had been replaced (pytest does), print would miss fd 1.
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (open(n, "w", buffering=1, closefd=False) for n in (1, 2))
    try:
        yield capture
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.close()  # flushes; leaves fds 1 and 2 open (closefd=False)
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for stream in _terminal:
            stream.close()
        _terminal = None
        if log_file.parent.is_dir():  # appended: a resumed run keeps the earlier runs' output
            with open(log_file, "ab") as target, open(temporary, "rb") as source:
                shutil.copyfileobj(source, target)
            os.unlink(temporary)
            capture.path = log_file
        elif not capture.keep or os.path.getsize(temporary) <= capture.header + _echoed:
            os.unlink(temporary)
            capture.path = None
