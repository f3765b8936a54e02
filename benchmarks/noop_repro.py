"""How long `dvc repro` takes when everything is up to date, side by side with what merely
starting DVC costs (`dvc version`), in one invocation. Run where `make repro` has run:

    python benchmarks/noop_repro.py [--repeats 5]

The first call of each warms the OS file cache (the "first import"); the figures are the
median of the rest.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

DVC = str(Path(sys.executable).parent / "dvc")


def seconds(cmd: list[str], repeats: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeats + 1):
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - start)
        out = result.stdout
    return statistics.median(times[1:]), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    start_up, _ = seconds([DVC, "version"], args.repeats)
    noop, out = seconds([DVC, "repro"], args.repeats)
    if "Running stage" in out:
        sys.exit("dvc repro ran a stage: run `make repro` first, so that everything is up to date")
    print(f"{'dvc version (start-up only)':32}{start_up:8.2f} s")
    print(f"{'dvc repro, nothing to run':32}{noop:8.2f} s   ({noop / start_up:.1f}x start-up; target <= 3 s)")


if __name__ == "__main__":
    main()
