"""A long command's phases: the seconds each took and the process's peak memory at its end."""

from __future__ import annotations

import contextlib
import resource
import time


def peak_memory_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


class Phases:
    """`with phases("tuning"): ...` records the phase's seconds and the peak memory at its end."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        mark = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - mark
        self.peak_gib[name] = peak_memory_gib()

    def timings(self) -> dict[str, float]:
        """`<phase>_s` for each phase so far and `total_s` since the start, as run records keep them."""
        return {**{f"{name}_s": s for name, s in self.seconds.items()}, "total_s": time.perf_counter() - self.started}
