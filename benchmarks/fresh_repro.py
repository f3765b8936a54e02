"""Where a fresh clone's `make repro` spends its time: the README's first command, run in
a new clone of this repository's HEAD with empty caches (uv's, pip's and the MNIST wheel's),
every output line timestamped as it arrives, then split into phases. The reference, from the
same run: the compute itself (the epochs' own seconds, as the workers report them, and the
evaluation's importance-weighted estimate); the rest is installing, starting processes and
libraries, and DVC.

    python benchmarks/fresh_repro.py [--warm-caches] [--keep]

Needs about 15 GB of free disk under $TMPDIR (the clone's .venv and uv's cache).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 180.0  # issue 22: install included
STAGE = re.compile(r"Running stage '(\w+)'")
EPOCH = re.compile(r"epoch\s+\d+/\d+\s.*?([\d.]+) s\s+\d+ img/s")
IWAE = re.compile(r"(\d+)/\1 \[(\d+):(\d+)<")  # tqdm's last update: elapsed mm:ss
EPOCHS, IWAE_S = "  epochs, their own seconds", "  IWAE estimate"  # the compute, in the table


def timestamped_run(cmd: list[str], cwd: Path, env: dict) -> tuple[list[tuple[float, str]], int]:
    """Run cmd, echoing its output; each line with the seconds since the start."""
    start, lines = time.perf_counter(), []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            print(f"{lines[-1][0]:7.1f}  {line[-160:]}", end="", flush=True)
    lines.append((time.perf_counter() - start, ""))
    return lines, proc.returncode


def phases(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds per phase: the install (up to DVC's first stage), then each stage, with the
    compute inside train (its start-up before the first epoch, the epochs' own seconds) and
    inside evaluate (the IWAE estimate, as its progress bar last showed it)."""
    starts = [(t, m.group(1)) for t, line in lines if (m := STAGE.search(line))]
    end = lines[-1][0]
    epochs = [(t, float(m.group(1))) for t, line in lines if (m := EPOCH.search(line))]
    iwae = [int(m.group(2)) * 60 + int(m.group(3)) for _, line in lines for m in IWAE.finditer(line)]
    out = {"install, then DVC's start": starts[0][0] if starts else end}
    for (t, name), (t_next, _) in zip(starts, [*starts[1:], (end, "")]):
        out[name] = t_next - t
        if name == "train" and epochs:
            out["  start-up, to the first epoch"] = epochs[0][0] - epochs[0][1] - t
            out[EPOCHS] = sum(s for _, s in epochs)
            out["  median epoch"] = statistics.median(s for _, s in epochs)
        if name == "evaluate" and iwae:
            out[IWAE_S] = float(iwae[-1])
    out["total"] = end
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-caches", action="store_true", help="keep your uv, pip and MNIST caches")
    parser.add_argument("--keep", action="store_true", help="leave the clone in place")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vae-fresh-repro-"))
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "MLFLOW_", "RAY_ADDRESS"))}
    if not args.warm_caches:
        env |= {"UV_CACHE_DIR": str(work / "uv-cache"), "PIP_NO_CACHE_DIR": "1",
                "VAE_CACHE_DIR": str(work / "vae-cache")}
    try:
        lines, rc = timestamped_run(["make", "repro"], clone, env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if rc:
        sys.exit(f"make repro failed (exit {rc})")
    times = phases(lines)
    caches = "warm caches" if args.warm_caches else "empty uv, pip and MNIST caches"
    print(f"\nfresh clone of {commit}, {caches}: make repro")
    for name, seconds in times.items():
        print(f"  {name:40}{seconds:8.1f} s")
    total = times["total"]
    compute = times.get(EPOCHS, 0) + times.get(IWAE_S, 0)
    if compute:
        print(f"  {'compute (epochs + IWAE)':40}{compute:8.1f} s   the rest {total - compute:.1f} s; "
              f"total / compute {total / compute:.2f}x")
    print(f"  target {TARGET_S:.0f} s: {'met' if total <= TARGET_S else f'over by {total - TARGET_S:.1f} s'}")


if __name__ == "__main__":
    main()
