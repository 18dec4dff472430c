"""Progress output for long work: flushed lines, so logs written to files stay current."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    print(message, flush=True)


def counter(label: str):
    """A progress callback `(done, total)`: one updating line on a terminal, about ten lines in a log."""
    tty = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        if tty:
            print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)
    return report
