"""Test modules run as `make test` runs them, in one pytest process and in two (pytest-xdist,
whole modules dealt to the first free process), side by side, alternated: wall time, how much
of the machine was busy (all processes, from /proc/stat: servers and Ray nodes included), and
the ratio against the first variant.

    python benchmarks/suite_workers.py [--rounds 1] [--workers 1,2] [--threads split,1] [MODULE ...]

--threads: variants of torch's threads per process (OMP_NUM_THREADS), comma-separated: `split`
leaves it unset, so that conftest.py gives each of N processes cores // N (one process: every
core); a number sets it.

With no MODULE, a mix of the suite's mid-sized modules (servers, Ray, subprocesses, browser
tests): about seven minutes in one process here. CI=1, as CI runs them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIX = ["tests/test_serve.py", "tests/test_gpu_check.py", "tests/test_tracking.py", "tests/test_export.py",
       "tests/test_ray_connect.py", "tests/test_infra.py"]


def cpu_jiffies() -> tuple[int, int]:
    """(all, idle) jiffies of every core since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields), fields[3] + fields[4]  # idle and iowait


def run(modules: list[str], workers: int, threads: str) -> tuple[float, float, str]:
    """(wall s, cores busy, pytest's last line) of the modules in `workers` processes."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules]
    if workers > 1:
        command += ["-n", str(workers), "--dist", "loadfile", "--no-loadscope-reorder"]
    env = {**os.environ, "CI": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("OMP_NUM_THREADS", None)
    if threads != "split":
        env["OMP_NUM_THREADS"] = threads
    (total0, idle0), wall = cpu_jiffies(), time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, (total1, idle1) = time.perf_counter() - wall, cpu_jiffies()
    busy = (1 - (idle1 - idle0) / (total1 - total0)) * os.cpu_count()
    return wall, busy, result.stdout.strip().rsplit("\n", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=MIX)
    # Comma-separated: a list after the MODULEs would take them in.
    parser.add_argument("--workers", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2])
    parser.add_argument("--threads", type=lambda text: text.split(","), default=["split"],
                        help="comma-separated: `split` or a number, per variant")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"{len(args.modules)} modules, {os.cpu_count()} cores, {args.rounds} round(s), alternated")
    variants = [(n, threads) for n in args.workers for threads in args.threads]
    walls: dict[tuple[int, str], list[float]] = {v: [] for v in variants}
    for round_ in range(1, args.rounds + 1):
        for n, threads in variants:
            wall, busy, last = run(args.modules, n, threads)
            walls[n, threads].append(wall)
            print(f"round {round_}, {n} process(es), threads {threads}: {wall:7.1f} s, {busy:.2f} cores busy: "
                  f"{last}", flush=True)
    reference = sum(walls[variants[0]]) / args.rounds
    print("\n| processes | threads | wall s (mean) | vs the first |\n| --- | --- | --- | --- |")
    for (n, threads), times in walls.items():
        mean = sum(times) / len(times)
        print(f"| {n} | {threads} | {mean:.1f} | {mean / reference:.3f}x |")


if __name__ == "__main__":
    main()
