"""A Tune experiment's progress on the terminal: a bar of trials done with the best score so far,
and one line per failed trial. Tune's own trial tables and the workers' output go to the run's log."""

from __future__ import annotations

import math
import os

from gitseg.progress import bar, say
from search.leaderboard import error_line

FINISHED = ("TERMINATED", "ERROR")


def trial_error(trial) -> str | None:
    """A failed trial's error text. Tune writes it on the driver's node before it calls
    on_trial_error and copies it to the experiment's storage later: read the local file first."""
    if trial.error_file and os.path.isfile(trial.error_file):
        with open(trial.error_file) as f:
            return f.read()
    return trial.get_error()


def tune_progress(label: str, total: int, metric: str | None = None):
    """A Tune callback drawing `label`'s progress over `total` trials; with `metric`, the best value so
    far. Trials restored as finished when a search resumes count as done from the start."""
    import ray.tune  # heavy: Tune's callback base class

    class TuneProgress(ray.tune.Callback):
        def __init__(self):
            self.bar = None
            self.failed: set[str] = set()

        def on_step_end(self, iteration, trials, **info):
            done = sum(t.status in FINISHED for t in trials)
            if self.bar is None:
                self.bar = bar(total, label, unit="trial", initial=done)
            if metric:
                scores = [t.metric_analysis.get(metric, {}).get("max", math.nan) for t in trials]
                best = max((s for s in scores if not math.isnan(s)), default=None)
                if best is not None:
                    self.bar.set_postfix_str(f"best {metric} {best:.4f}", refresh=False)
            if done != self.bar.n:
                self.bar.update(done - self.bar.n)

        def on_trial_error(self, iteration, trials, trial, **info):
            if trial.trial_id not in self.failed:
                self.failed.add(trial.trial_id)
                say(f"{label}: trial {trial.trial_id} failed: {error_line(trial_error(trial))}")

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.n = sum(t.status in FINISHED for t in trials)  # drawn once, by close
                self.bar.close()
    return TuneProgress()
