"""What Ray Train's datasets callback costs a run that has no Ray datasets, side by side in one
invocation: a trivial Ray Train run (one worker that reports once) on one local Ray, with
TorchTrainer's default callbacks less the placement-group cleaner (as the pipeline ran before)
and with pipeline.ray_connect.torch_trainer's (less the datasets callback too, which starts a
DatasetManager actor every run). Wall seconds of fit() and CPU seconds of every process of the
Ray (sampled every 0.2 s), median of the rounds; the two alternate, so the machine's drift
falls on both. The first round of each warms Ray's worker pool and is left out.

    python benchmarks/ray_train_callbacks.py [--rounds 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import psutil


def report_once(config):
    import ray.train

    ray.train.report({"ok": 1})


class CpuOfDescendants:
    """CPU seconds of this process's descendants (the local Ray's), each process's last sample."""

    def __init__(self):
        self.seen: dict[tuple[int, float], float] = {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            for p in psutil.Process().children(recursive=True):
                try:
                    times = p.cpu_times()
                    self.seen[(p.pid, p.create_time())] = times.user + times.system
                except psutil.Error:
                    pass
            time.sleep(0.2)

    def total(self) -> float:
        return sum(self.seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    from ray.train import RunConfig, ScalingConfig

    from pipeline import compat
    from pipeline.ray_connect import connect_ray, torch_trainer

    cpu = CpuOfDescendants()
    os.environ.pop("RAY_ADDRESS", None)
    connect_ray(2)  # a local Ray, as a stage starts it
    trainers = {"cleaner dropped": compat.lean_torch_trainer(True, drop_unused_datasets=False),
                "lean": torch_trainer()}
    runs = {name: [] for name in trainers}
    for round_ in range(args.rounds + 1):
        for name, trainer in trainers.items():
            before, start = cpu.total(), time.perf_counter()
            trainer(report_once, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                    run_config=RunConfig(name=f"r{round_}-{name.split()[0]}", storage_path=tempfile.mkdtemp())).fit()
            wall = time.perf_counter() - start
            time.sleep(3)  # the run's actors end after fit() returns: their CPU counts to it
            if round_:
                runs[name].append((wall, cpu.total() - before))
    print(f"{'a trivial Ray Train run (median of ' + str(args.rounds) + ')':40}{'wall s':>8}{'CPU s':>8}")
    medians = {name: [statistics.median(run[i] for run in measured) for i in (0, 1)] for name, measured in runs.items()}
    for name, (wall, cpu_s) in medians.items():
        print(f"{name:40}{wall:8.2f}{cpu_s:8.2f}")
    (w0, c0), (w1, c1) = medians.values()
    print(f"{'ratio lean / cleaner dropped':40}{w1 / w0:7.2f}x{c1 / c0:7.2f}x")


if __name__ == "__main__":
    main()
