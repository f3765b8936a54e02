"""How soon `vae` answers, this working tree against a reference commit, side by side in one
invocation: `vae --version` to its exit, and `vae serve MODELS` from its start to the first 200
from /v2/health/ready. Each side also reports the CPU seconds its process used.

    python benchmarks/cli_startup.py [--ref HEAD] [--models models/] [--rounds 3]

The reference's pipeline/, vae/ and uv.lock are unpacked into a temporary folder and run with
the same interpreter and packages (PYTHONPATH), so only the project's code differs. The rounds
alternate the two sides, so the machine's drift falls on both. MODELS: the export stage's folder.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra" / "local"))
from stack import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = "import sys; from pipeline.cli import main; sys.argv[0] = 'vae'; sys.exit(main())"


def unpack(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", ref, "pipeline", "vae", "uv.lock"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def vae(tree: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, "-c", LAUNCH, *args], cwd=tree, env=env, **popen)


def version(tree: Path) -> tuple[float, float]:
    """(wall s, CPU s) of `vae --version`."""
    cpu, start = children_cpu(), time.perf_counter()
    process = vae(tree, "--version", stdout=subprocess.DEVNULL)
    if process.wait(timeout=120) != 0:
        raise RuntimeError(f"vae --version failed in {tree}")
    return time.perf_counter() - start, children_cpu() - cpu


def serve(tree: Path, models: Path) -> tuple[float, float]:
    """(wall s, CPU s) of `vae serve` from its start to its first ready answer (CPU: until it
    stops, right after)."""
    port, cpu, start = free_port(), children_cpu(), time.perf_counter()
    process = vae(tree, "serve", str(models), "--port", str(port), stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vae serve {models} exited ({process.returncode}) in {tree}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.02)
        ready = time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(timeout=30)
    return ready, children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="the reference commit (default: HEAD)")
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="the export stage's folder")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (args.models / "decoder.onnx").exists():
        parser.error(f"--models {args.models}: no decoder.onnx there (run `make repro`, or name another folder)")
    with tempfile.TemporaryDirectory() as tmp:
        sides = {f"ref {args.ref}": unpack(args.ref, Path(tmp)), "this tree": ROOT}
        figures = {(side, what): [] for side in sides for what in ("version", "serve")}
        for round_ in range(1, args.rounds + 1):
            for side, tree in sides.items():
                figures[side, "version"].append(version(tree))
                figures[side, "serve"].append(serve(tree, args.models.resolve()))
            print(f"round {round_} done", flush=True)
    print(f"\n{os.cpu_count()} cores; medians of {args.rounds} rounds, alternated\n")
    print("| command | side | wall s | CPU s | wall vs ref |\n| --- | --- | --- | --- | --- |")
    for what, command in (("version", "vae --version"), ("serve", "vae serve, to ready")):
        reference = statistics.median(wall for wall, _ in figures[f"ref {args.ref}", what])
        for side in sides:
            wall = statistics.median(w for w, _ in figures[side, what])
            cpu = statistics.median(c for _, c in figures[side, what])
            print(f"| {command} | {side} | {wall:.2f} | {cpu:.2f} | {wall / reference:.2f}x |")


if __name__ == "__main__":
    main()
