"""What Python's bytecode cache is worth to the pipeline's start-up, side by side in one
invocation: importing torch, MLflow and Ray Train, then a trivial Ray Train run (a local
Ray, one worker that reports once), with and without cached bytecode. And what `vae`'s
gc.freeze() at exit is worth: the seconds from a stage's last line to its exit.

    python benchmarks/startup.py [--rounds 2]

"no cache" is what PYTHONDONTWRITEBYTECODE=1 gives a fresh environment: every process
(driver, Ray's actors and workers) compiles every module it imports from source. Both sides
point PYTHONPYCACHEPREFIX at a directory of their own (an empty one that is never written,
and one warmed by a first run), so .venv's own __pycache__ is neither read nor changed.
The rounds alternate the two, so the machine's drift falls on both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a child process: the timings of one cold start.
PROBE = r"""
import json, tempfile, time
start = time.perf_counter()
laps = {}
import torch; laps["import torch"] = time.perf_counter() - start
import mlflow; laps["+ import mlflow"] = time.perf_counter() - start
import ray.train.torch; laps["+ import ray.train.torch"] = time.perf_counter() - start
from pipeline.ray_connect import connect_ray, torch_trainer
connect_ray("auto"); laps["+ local Ray started"] = time.perf_counter() - start
from ray.train import RunConfig, ScalingConfig

def report_once(config):
    import ray.train
    ray.train.report({"ok": 1})

torch_trainer()(report_once, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name="startup", storage_path=tempfile.mkdtemp())).fit()
laps["+ trivial Ray Train run"] = time.perf_counter() - start
print("LAPS" + json.dumps(laps))
"""


# A stage's imports, then its exit, with or without vae's atexit gc.freeze (pipeline/cli.py).
EXIT_PROBE = r"""
import atexit, gc, sys, time
import matplotlib.pyplot, mlflow, torch, torch.onnx, ray.train.torch
if sys.argv[1] == "freeze":
    atexit.register(gc.freeze)
print(time.time(), flush=True)
"""


def exit_seconds(freeze: bool) -> float:
    """From the probe's last line to its exit."""
    out = subprocess.run([sys.executable, "-c", EXIT_PROBE, "freeze" if freeze else "plain"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return time.time() - float(out.stdout.split()[-1])


def cold_start(pycache: Path, write: bool) -> dict[str, float]:
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    if write:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("LAPS")), None)
    if out.returncode or line is None:
        sys.exit(f"the probe failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line[4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty, warm = Path(tmp) / "empty", Path(tmp) / "warm"
        empty.mkdir()
        cold_start(warm, write=True)  # fills the warm cache (and the OS file cache)
        runs = {"no cache": [], "cache": []}
        for _ in range(args.rounds):
            runs["no cache"].append(cold_start(empty, write=False))
            runs["cache"].append(cold_start(warm, write=True))
        assert not any(empty.iterdir()), "the no-cache side wrote bytecode"
    title = f"seconds from process start (median of {args.rounds})"
    print(f"{title:44}{'no cache':>10}{'cache':>10}{'ratio':>8}")
    for lap in runs["cache"][0]:
        cold = statistics.median(r[lap] for r in runs["no cache"])
        cached = statistics.median(r[lap] for r in runs["cache"])
        print(f"{lap:44}{cold:10.2f}{cached:10.2f}{cold / cached:7.2f}x")
    exits = {"plain": [], "freeze": []}
    for _ in range(args.rounds):
        exits["plain"].append(exit_seconds(freeze=False))
        exits["freeze"].append(exit_seconds(freeze=True))
    plain, frozen = statistics.median(exits["plain"]), statistics.median(exits["freeze"])
    print(f"\n{'seconds from the last line to exit':44}{'plain':>10}{'freeze':>10}{'ratio':>8}")
    print(f"{'torch, MLflow, Ray Train, matplotlib imported':44}{plain:10.2f}{frozen:10.2f}{plain / frozen:7.2f}x")


if __name__ == "__main__":
    main()
