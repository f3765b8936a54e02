"""pipeline/ray_connect.py: how training workers are placed on a Ray cluster (pure functions)."""
import os
import secrets
import subprocess
import sys
import tempfile

import psutil
import pytest

from pipeline.params import ParamsError
from pipeline.ray_connect import (
    PlacementError,
    gpu_workers,
    require_answer,
    require_room,
    share_cpus,
    workers_fit,
    workers_for,
)

# A client that Ray refuses retries for ~20 s by default; 3 tries tell as much.
QUICK_GIVE_UP = {"RAY_gcs_server_port_wait_time_s": "3"}


def nodes(*cpus: float, gpus: tuple[float, ...] = ()) -> list[dict[str, float]]:
    """Nodes' resources as Ray lists them: these CPUs, and GPUs on the first nodes."""
    return [{"CPU": c, **({"GPU": gpus[i]} if i < len(gpus) else {})} for i, c in enumerate(cpus)]


def test_gpu_choice():
    assert gpu_workers("auto", 0) is False and gpu_workers("auto", 2) is True
    assert gpu_workers(False, 2) is False
    with pytest.raises(ParamsError, match="train.use_gpu is true but the Ray cluster has no GPU"):
        gpu_workers(True, 0)


def test_workers_share_the_cpus_within_a_node():
    """A lone worker on a 2-core machine gets both cores (Ray's default would give it one
    thread); every worker still fits on some node, and none asks for less than one CPU."""
    assert share_cpus(nodes(2), 1) == 2 and share_cpus(nodes(16), 4) == 4 and share_cpus(nodes(16, 16), 2) == 16
    assert share_cpus(nodes(1, 1), 1) == 1 and share_cpus(nodes(8, 2), 2) == 4 and share_cpus(nodes(8, 2), 3) == 2
    assert share_cpus(nodes(2), 3) == 1


def test_gpu_workers_share_the_cpus_of_the_nodes_with_gpus():
    """Two GPU workers on a 8-core node with 2 GPUs, beside a 16-core node without: 4 CPUs
    each, not 8 (counting the other node's CPUs, only one of them would fit: Ray would wait)."""
    cluster = nodes(8, 16, gpus=(2,))
    assert share_cpus(cluster, 2, gpu=True) == 4 and workers_fit(cluster, 2, 4, gpus=1)
    assert share_cpus(cluster, 2) == 8 and not workers_fit(cluster, 2, 8, gpus=1)
    assert not workers_fit(cluster, 3, 1, gpus=1)  # a GPU each: two at most
    assert share_cpus(nodes(0, 4, 4, gpus=(0, 1, 1)), 2, gpu=True) == 4  # infra/'s layouts: a head without CPUs


def test_workers_that_cannot_fit_are_refused_on_a_local_ray_and_awaited_on_a_cluster(monkeypatch, capsys):
    """Ray Train retries an infeasible worker group every minute for ever: on the Ray a stage
    starts itself, which nothing will grow, that is an error naming the settings; a cluster
    may autoscale."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    asked = "train.num_workers, train.cpus_per_worker"
    require_room(nodes(2), 2, 1, 0, None, "worker", asked)  # fits: nothing said
    with pytest.raises(PlacementError, match=r"train.num_workers, train.cpus_per_worker: 1 worker of 8 CPUs do not "
                                             r"fit on this machine's Ray \(2 CPUs and 0 GPUs\)"):
        require_room(nodes(2), 1, 8, 0, None, "worker", asked)
    require_room(nodes(2, gpus=(1,)), 3, 1, 1, "10.0.0.1:6379", "worker", asked)
    assert f"{asked}: 3 workers of 1 CPU and 1 GPU each do not fit on the Ray cluster's nodes (2 CPUs and 1 GPUs)" \
           in capsys.readouterr().out


def test_auto_workers_are_one_per_gpu_else_one_per_node():
    assert workers_for("auto", nodes(2), 0) == 1  # this machine: one worker holding both cores
    assert share_cpus(nodes(2), workers_for("auto", nodes(2), 0)) == 2
    assert workers_for("auto", nodes(1, 1), 0) == 2 and share_cpus(nodes(1, 1), 2) == 1  # the test cluster's two nodes
    assert workers_for("auto", nodes(16, 16, 0), 0) == 2  # a node without CPUs holds no worker
    assert workers_for("auto", nodes(16, 16), 4) == 4  # GPUs: one worker each
    assert workers_for(3, nodes(2), 0) == 3


def test_an_address_where_no_ray_answers_is_named_in_seconds(monkeypatch, ray_address):
    """ray.init retried such an address for minutes. Named with where it was set."""
    from helpers import free_port

    silent = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", silent)
    with pytest.raises(ConnectionError, match=f"^no Ray cluster answers at {silent} \\(RAY_ADDRESS\\): .*unset "
                                              f"RAY_ADDRESS to start a Ray of this machine's own$"):
        require_answer(None)
    with pytest.raises(ConnectionError, match=f"at ray://{silent} \\(train.ray_address\\)"):
        require_answer(f"ray://{silent}")
    for answered in (ray_address, "auto"):
        require_answer(answered)  # a cluster that listens; an address Ray resolves itself


def test_a_client_without_the_clusters_token_or_with_a_wrong_one_is_refused(ray_address):
    """The test cluster runs with token authentication, as `make up`'s and KubeRay's do."""
    probe = f"import ray; ray.init(address={ray_address!r}, logging_level='ERROR'); print('connected')"
    plain = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}, **QUICK_GIVE_UP}
    clients = {"right": {**plain, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]},
               "wrong": {**plain, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},
               "none": plain}
    running = {name: subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for name, env in clients.items()}
    outputs = {name: process.communicate(timeout=180)[0] for name, process in running.items()}
    assert running["right"].returncode == 0 and "connected" in outputs["right"], outputs["right"]
    for name in ("wrong", "none"):
        assert running[name].returncode != 0 and "connected" not in outputs[name].splitlines(), outputs[name]
        assert "token-auth" in outputs[name], outputs[name]  # refused for its token, not for another reason


def test_our_jobs_ray_workers_keep_ray_trains_resource_request_warning_quiet(ray_address):
    """On a loaded machine the first Ray Train run of a cluster waited over 5 s for Ray's
    autoscaling coordinator to start, and its controller printed a warning with a traceback into
    `dvc repro`'s output (seen in the suite). Every worker process of a job we start runs
    pipeline.compat's hook, the controller among them; errors still pass."""
    import logging.config
    import logging.handlers

    import ray

    from pipeline.compat import RESOURCE_REQUEST_LOGGER

    @ray.remote(num_cpus=0, max_calls=1)  # its process then exits: no later task meets its logging
    def passed_on() -> list[str]:
        # As Ray Train's controller does once started: "ray.train" to DEBUG, with a handler.
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "loggers": {"ray.train": {"level": "DEBUG", "propagate": False}}})
        kept = logging.handlers.BufferingHandler(10)
        logging.getLogger("ray.train").addHandler(kept)
        quieted, other = logging.getLogger(RESOURCE_REQUEST_LOGGER), logging.getLogger("ray.train.other")
        for log in (quieted.warning, quieted.error, other.warning):
            log(log.__name__)
        return [f"{record.name.rsplit('.', 1)[1]} {record.getMessage()}" for record in kept.buffer]

    assert ray.get(passed_on.remote(), timeout=120) == ["autoscaling_coordinator_client error", "other warning"]


LOCAL_RAY = """
import os, subprocess, sys
from pipeline.ray_connect import connect_ray
import ray
connect_ray()  # no address: a local Ray of this process's own
address = ray.get_runtime_context().gcs_address
stranger = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}, **%r}
probe = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print('connected')"
client = subprocess.run([sys.executable, "-c", probe], env=stranger, capture_output=True, text=True, timeout=120)
print(os.environ["RAY_AUTH_MODE"], client.returncode, "token-auth" in client.stdout + client.stderr)
"""


@pytest.mark.integration  # starts a local Ray in a subprocess
def test_the_local_ray_a_stage_starts_asks_for_a_token_of_its_own():
    """Ray 2.60 listens on every interface (README: which ports, and why): the local Ray that
    `vae train` starts refuses a client from elsewhere, which cannot know its run's token."""
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    result = subprocess.run([sys.executable, "-c", LOCAL_RAY % QUICK_GIVE_UP], env=plain, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[-3:] == ["token", "1", "True"], result.stdout + result.stderr


@pytest.mark.integration  # `vae train` starts a local Ray
def test_vae_train_refuses_workers_this_machines_ray_cannot_hold(tmp_path):
    """Before this check, `vae train` waited for ever (Ray Train retrying every minute)."""
    from helpers import BIN, copy_project, git_env, run, set_params

    repo = copy_project(tmp_path / "project")
    set_params(repo, {"train": {"num_workers": 1, "cpus_per_worker": 64}})
    env = {k: v for k, v in git_env().items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    failed = run([str(BIN / "vae"), "train"], repo, env=env, check=False, timeout=180)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "vae train: error: train.num_workers, train.cpus_per_worker: 1 worker of 64 CPUs do not fit on this " \
           "machine's Ray" in failed.stderr
    # The run it had opened is FAILED, and says why.
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.files import Layout

    client = MlflowClient(tracking.tracking_uri(Layout(repo)))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("PlacementError: train.num_workers, train.cpus_per_worker: 1 worker")


@pytest.mark.integration  # starts a local Ray
def test_ctrl_c_while_a_local_ray_starts_waits_for_it_and_leaves_nothing_running(signals_kept):
    """Ctrl-C in the midst of ray.init left the local Ray's dashboard and runtime-env agents
    running, orphaned, after `vae train` had said it was interrupted. The interrupt now waits
    for ray.init, then acts: Ray, fully started, stops all it started as the process exits."""
    script = """
import signal, threading, time
import ray
from pipeline.ray_connect import connect_ray
threading.Timer(0.5, signal.raise_signal, [signal.SIGINT]).start()  # ray.init takes seconds
try:
    connect_ray(1)
    time.sleep(5)
except KeyboardInterrupt:
    print("interrupted; Ray started:", ray.is_initialized(), flush=True)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    with tempfile.TemporaryDirectory(prefix="ray-") as temp:  # short: Ray's sockets live there
        env["RAY_TMPDIR"] = temp  # in every one of its processes' command lines
        started = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert started.stdout == "interrupted; Ray started: True\n", started.stdout + started.stderr
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])
                and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running: {left}"


SPACED_RAY = """
import os
import ray
from pipeline.ray_connect import connect_ray
connect_ray(1)  # a local Ray of this process's own
probe = ray.remote(runtime_env={"env_vars": {"PROBE": "started"}})(lambda: os.environ["PROBE"])
print(ray.get(probe.remote(), timeout=60))
"""


@pytest.mark.integration  # starts a local Ray
def test_a_local_ray_starts_workers_with_a_runtime_env_from_a_path_with_a_space(tmp_path):
    """Every Ray Train actor has a runtime env; Ray starts such a worker through a shell, which
    split the Python's path at the space: the worker died at once and `make repro` in a project
    cloned into "~/My Projects" failed after 6 minutes of retries (RESULTS.md)."""
    from helpers import spaced_project

    python = spaced_project(tmp_path) / ".venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([str(python), "-c", SPACED_RAY], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stdout.splitlines()[-1:] == ["started"], result.stdout + result.stderr
