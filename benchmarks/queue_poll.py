"""CPU and wall time of one look at DVC's experiment queue, as `vae sweep` polls it while the
experiments run: the `dvc queue status` command against pipeline/sweep.queue() (DVC's Python
API in this process), side by side, alternated, on a fresh git + DVC repository with one
queued experiment and no worker.

    python benchmarks/queue_poll.py [--polls 6]

CPU counts this process's and its children's: what the poll takes from the experiments.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import sweep  # noqa: E402


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(look) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    look()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def repository(where: Path) -> None:
    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=where, check=True, capture_output=True)

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    (where / "params.yaml").write_text("seed: 0\n")
    (where / "dvc.yaml").write_text("stages:\n  noop:\n    cmd: echo ${seed}\n    params: [seed]\n")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "noop")
    sh("dvc", "exp", "run", "--queue", "-S", "seed=1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--polls", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        repository(Path(tmp))
        sweep.queue()  # DVC imported once, as the sweep's first look does
        ways = {"`dvc queue status` (a process)": lambda: sweep.dvc("queue", "status"),
                "sweep.queue() (in this process)": sweep.queue}
        figures = {name: [] for name in ways}
        for _ in range(args.polls):
            for name, look in ways.items():
                figures[name].append(measure(look))
    reference = sum(cpu for _, cpu in figures[next(iter(ways))]) / args.polls
    print(f"one look at the queue, mean of {args.polls}, alternated")
    print("| how | wall s | CPU s | CPU vs the command |\n| --- | --- | --- | --- |")
    for name, runs in figures.items():
        wall, cpu = (sum(values) / len(runs) for values in zip(*runs))
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {cpu / reference:.3f}x |")


if __name__ == "__main__":
    main()
