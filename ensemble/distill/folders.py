"""Where `gitseg distill` writes: light, so that the CLI finds its log file without importing torch."""

from __future__ import annotations

from pathlib import Path


def student_folder(ensemble_dir, out=None) -> Path:
    """The student's ensemble folder: `out`, or `<ensemble>-student` beside the teacher ensemble."""
    ensemble = Path(ensemble_dir)
    return Path(out) if out is not None else ensemble.parent / f"{ensemble.name}-student"


def work_folder(student: Path) -> Path:
    """The teacher targets and the student's Train runs: `<student>.work` beside the student's folder."""
    return student.with_name(f"{student.name}.work")
