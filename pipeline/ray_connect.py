"""Joining Ray: the cluster at $RAY_ADDRESS (or a given address), else a quiet local Ray; and
how training workers and serving replicas are placed on it."""
from __future__ import annotations

import logging
import math
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import urllib.parse
from contextlib import contextmanager
from typing import Iterator

from pipeline import compat

# Ray Train V2 re-routes print() in workers through logging and echoes it, printing every
# epoch line twice; plain print is what we want. The preemption watcher only matters on
# preemptible cloud nodes and warns at start-up everywhere else. Ray Train passes both on
# from the driver to its workers. Its controller polls the workers every 2 s by default, so
# a finished run idled ~5 s before returning; a poll is one cheap actor call.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def connect_ray(num_workers: int | str = 1, address: str | None = None) -> None:
    """Join `address` or $RAY_ADDRESS when set, else start a quiet local Ray sized to this machine."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)
    local = local_ray(address)
    if local and "ray" not in sys.modules:  # Ray reads its auth mode once, when imported
        # Ray 2.60's GCS, raylet and worker servers listen on every interface, whatever node
        # address they are given (ray.init turns 127.0.0.1 into the machine's own address),
        # so a Ray that serves this machine alone still asks every client for a token: one
        # of this run's, which its workers inherit and nothing else knows.
        if os.environ.setdefault("RAY_AUTH_MODE", "token") == "token":
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray

    if ray.is_initialized():
        return
    # Without the dashboard Ray's state API is absent, and Ray Train's placement-group
    # cleaner warns about it every few seconds: keep Ray's own loggers at ERROR in workers.
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True,
             "logging_config": ray.LoggingConfig(log_level="ERROR")}
    runtime_env = {"worker_process_setup_hook": "pipeline.compat.quiet_ray_train_resource_requests"}
    if local:
        # "local": a new Ray of our own, not whatever `ray start` last left on this machine.
        cpus = max(os.cpu_count() or 1, num_workers if isinstance(num_workers, int) else 1)
        where = {"address": "local", "num_cpus": cpus, "include_dashboard": False}
        runtime_env.update(python_command())
    else:
        require_answer(address)
        where = {"address": address}
    with deferred_signals():
        ray.init(**where, **quiet, runtime_env=runtime_env)


def python_command() -> dict:
    """The runtime_env entry for a Python whose path a shell would split (the project's path
    has a space): Ray 2.60 starts each worker that has a runtime env (every Ray Train actor
    has one) through `bash -c "exec <python> ..."`, the path unquoted (exec_worker in
    ray/_private/runtime_env/context.py); the worker dies at once, and Ray Train retries it for
    minutes. py_executable is a shell command by design: the path goes in quoted. Only for the
    local Ray: a cluster's nodes run their own Python."""
    quoted = shlex.quote(sys.executable)
    return {"py_executable": quoted} if quoted != sys.executable else {}


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait for the block's end, then act as they would have, under
    the handlers the caller had before it. Ctrl-C in the midst of ray.init left a local Ray's
    dashboard and runtime-env agents running, orphaned (once ray.init returns, Ray stops all it
    started at exit); and ray.init installs its own SIGTERM handler, which exits from inside
    whatever the driver waits on with status 1 and no word of why. Only handlers set from
    Python are deferred: a signal left to its default or ignored stays so."""
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield
        return
    caught = []

    def defer(signum: int, frame) -> None:
        caught.append(signum)

    previous = {signum: signal.signal(signum, defer)
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if callable(signal.getsignal(signum))}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:
        signal.raise_signal(caught[0])


def require_answer(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address and where it was set, when nothing listens at the
    Ray cluster's address: ray.init would retry for minutes. "auto" and other addresses
    without a port are left to Ray."""
    target = address or os.environ.get("RAY_ADDRESS", "")
    parts = urllib.parse.urlsplit(target if "://" in target else f"//{target}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number: Ray's own error says so
        return
    if not (host and port):
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        where = "train.ray_address" if address else "RAY_ADDRESS"
        raise ConnectionError(f"no Ray cluster answers at {target} ({where}): {e}. Start it (`ray start --head`, "
                              f"or `make up`), or unset {where} to start a Ray of this machine's own") from None


def local_ray(address: str | None = None) -> bool:
    """Whether connect_ray starts a Ray of its own: no address, here or in $RAY_ADDRESS."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def torch_trainer():
    """Ray Train's TorchTrainer less what a run without Ray datasets does not use; on a Ray
    without a dashboard, less its placement-group cleaner too. The cleaner asks the state API,
    which the dashboard serves, whether the controller lives; without one it cannot tell, and
    only prints tracebacks at every run's start and end."""
    return compat.lean_torch_trainer(drop_placement_group_cleaner=not compat.ray_dashboard_url())


def gpu_workers(use_gpu, cluster_gpus: float) -> bool:
    if use_gpu == "auto":
        return cluster_gpus >= 1
    if use_gpu and cluster_gpus < 1:
        from pipeline.params import ParamsError  # here: `vae serve --ray` imports this module, and torch is slow

        raise ParamsError("train.use_gpu is true but the Ray cluster has no GPU")
    return bool(use_gpu)


def node_resources() -> list[dict[str, float]]:
    """Each live node's resources (CPU, GPU, ...)."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def workers_for(setting: int | str, nodes: list[dict[str, float]], cluster_gpus: float) -> int:
    """train.num_workers: as set, or auto: one per GPU when the cluster has GPUs, else one per
    node with CPUs (cpus_per_worker: auto then gives each worker all of its node's CPUs)."""
    if setting != "auto":
        return int(setting)
    return int(cluster_gpus) if cluster_gpus >= 1 else max(1, sum(1 for n in nodes if n.get("CPU", 0) >= 1))


def workers_fit(nodes: list[dict[str, float]], count: int, cpus: float, gpus: float) -> bool:
    """Whether `count` workers (or replicas) of `cpus` CPUs and `gpus` GPUs each fit on the nodes."""
    def room(have: float, each: float) -> float:
        return int(have / each + 1e-9) if each else math.inf  # 1e-9: a third of a GPU, three times
    return sum(min(room(n.get("CPU", 0), cpus), room(n.get("GPU", 0), gpus)) for n in nodes) >= count


def share_cpus(nodes: list[dict[str, float]], num_workers: int, gpu: bool = False) -> int:
    """The most CPUs per worker with which all the workers still fit on the nodes: GPU workers
    on the nodes with GPUs only, whatever CPUs the others have."""
    for cpus in range(int(max((n.get("CPU", 0) for n in nodes), default=1)), 1, -1):
        if workers_fit(nodes, num_workers, cpus, float(gpu)):
            return cpus
    return 1


def cpus_per_worker(setting: int | str, nodes: list[dict[str, float]], num_workers: int, gpu: bool) -> int:
    """CPUs a worker reserves. Ray sets OMP_NUM_THREADS, hence torch's threads, from it: with
    Ray's default of 1, a lone worker would use one core of many."""
    if setting != "auto":
        return int(setting)
    return share_cpus(nodes, num_workers, gpu)


class PlacementError(ValueError):
    """What was asked of the Ray this process started cannot all be placed on it."""


def require_room(nodes: list[dict[str, float]], count: int, cpus: float, gpus: float, address: str | None,
                 what: str, asked: str) -> None:
    """Refuse `count` workers or replicas (`what`) of `cpus` CPUs and `gpus` GPUs each, which
    the settings `asked` ask for, that cannot all be placed on the Ray this process started:
    Ray would wait for nodes for ever. A cluster's autoscaler may add nodes: there, say so and
    wait."""
    if workers_fit(nodes, count, cpus, gpus):
        return
    need = (f"{count} {what}{'s' * (count > 1)} of {cpus:g} CPU{'s' * (cpus != 1)}"
            + (f" and {gpus:g} GPU" if gpus else "") + (" each" if count > 1 else ""))
    have = "; ".join(f"{n.get('CPU', 0):g} CPUs and {n.get('GPU', 0):g} GPUs" for n in nodes)
    if local_ray(address):
        raise PlacementError(f"{asked}: {need} do not fit on this machine's Ray ({have})")
    print(f"{asked}: {need} do not fit on the Ray cluster's nodes ({have}): waiting for more to join", flush=True)
