"""What Ray Train's worker polling costs each Train run: a trivial 2-worker `TorchTrainer` (three
reports, no model) on one local Ray instance per setting, at the default poll interval of Train's
controller (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s) and at the 0.25 s that tests/conftest.py sets.
The settings alternate (A B A B) so that drift of the machine falls on both; prints each run's
seconds and the ratio of the means.

    python benchmarks/bench_ray_poll.py [--runs 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
import json, sys, time
import ray
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

def train(config):
    import ray.train
    for i in range(3):
        ray.train.report({"i": i})

ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    TorchTrainer(train, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="Train runs per Ray instance (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2)")
    args = parser.parse_args()
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    found: dict[str, list[float]] = {"2.0": [], "0.25": []}
    for _ in range(args.rounds):
        for interval in found:
            subprocess.run([ray, "stop", "--force"], capture_output=True)
            env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval}
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.runs)], env=env, capture_output=True,
                                 text=True, check=True)
            times = [float(t) for t in out.stdout.strip().splitlines()[-1].strip("[]").split(",")]
            found[interval] += times
            print(f"poll every {interval:>4s} s: " + " ".join(f"{t:.1f}" for t in times) + " s per Train run")
    mean = {k: sum(v) / len(v) for k, v in found.items()}
    print(f"mean {mean['2.0']:.1f} s at 2 s (Ray's default), {mean['0.25']:.1f} s at 0.25 s: "
          f"{mean['2.0'] / mean['0.25']:.2f}x")


if __name__ == "__main__":
    main()
