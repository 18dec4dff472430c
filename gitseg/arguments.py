"""Command-line arguments that several commands share, for the entry points of every stage."""

from __future__ import annotations

import argparse
from pathlib import Path

# gitseg.infer.TTA_SETS' names, written out so that `--help` does not import torch (a test keeps them equal).
TTA_CHOICES = ("none", "hflip", "flips")


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="print Ray's, Tune's and the workers' output here instead of to the run's log file")


def log_in(folder, command: str) -> Path:
    """A command's log file: `<folder>/<command>.log`, in the folder the command writes (never in
    one it only reads)."""
    return Path(folder, f"{command}.log").resolve()
