"""Wall time of one tiny 4-experiment sweep run one at a time and two at a time, against
`make up`'s stack (PostgreSQL, MLflow with its password, a 2-node Ray cluster), side by side.

    python benchmarks/sweep_speed.py [--experiments 4]

Both sweeps queue the same grid from a copy of this project (different seeds, so DVC's
run-cache restores nothing), then `vae sweep -j 1` or `-j 2` runs it; the stack comes up
once and goes down at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["vae", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"]
TINY = {"data": {"source": "pypi", "val_size": 200, "max_train_images": 300},
        "model": {"latent_dim": 8, "hidden_dims": [128]},
        "train": {"epochs": 1, "num_workers": 1, "batch_size": 64},
        "eval": {"max_test_images": 100, "iwae_k": 2, "grid_images": 8}}


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        sys.exit(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def project(where: Path, env: dict) -> Path:
    for name in PROJECT_FILES:
        source, target = ROOT / name, where / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    params = yaml.safe_load((where / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (where / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        sh(cmd, where, env)
    sh(["dvc", "repro", "fetch"], where, env)  # the data, once, outside the timing
    sh(["git", "add", "-A"], where, env)
    sh(["git", "commit", "-qm", "data"], where, env)
    return where


def sweep(repo: Path, env: dict, jobs: int, seeds: list[int]) -> float:
    sh(["dvc", "exp", "run", "--queue", "-S", f"train.seed={','.join(map(str, seeds))}"], repo, env)
    start = time.perf_counter()
    sh(["vae", "sweep", "-j", str(jobs)], repo, env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep-speed-"))
    state = work / "stack"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GIT_AUTHOR_NAME": "bench",
           "GIT_AUTHOR_EMAIL": "bench@example.invalid", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@example.invalid"}
    start = time.perf_counter()
    sh([sys.executable, str(ROOT / "infra/local/stack.py"), "up", str(state)], ROOT, env)
    print(f"make up's stack started in {time.perf_counter() - start:.1f} s", flush=True)
    try:
        stack_env = dict(line.removeprefix("export ").split("=", 1)
                         for line in (state / "env").read_text().splitlines() if line)
        env |= stack_env
        repo = project(work / "project", env)
        n = args.experiments
        one = sweep(repo, env, 1, list(range(1, n + 1)))
        two = sweep(repo, env, 2, list(range(n + 1, 2 * n + 1)))
    finally:
        sh([sys.executable, str(ROOT / "infra/local/stack.py"), "down", str(state)], ROOT, env, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n| sweep of {n} tiny experiments | wall time | vs -j 1 |\n| --- | --- | --- |")
    print(f"| `vae sweep -j 1` | {one:.1f} s | 1.00x |\n| `vae sweep -j 2` | {two:.1f} s | {one / two:.2f}x |")


if __name__ == "__main__":
    main()
