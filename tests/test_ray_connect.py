"""pipeline/ray_connect.py: how training workers are placed on a Ray cluster (pure functions)."""
import os
import secrets
import subprocess
import sys

import pytest

from pipeline.ray_connect import gpu_workers, share_cpus, workers_for

# A client that Ray refuses retries for ~20 s by default; 3 tries tell as much.
QUICK_GIVE_UP = {"RAY_gcs_server_port_wait_time_s": "3"}


def test_gpu_choice():
    assert gpu_workers("auto", 0) is False and gpu_workers("auto", 2) is True
    assert gpu_workers(False, 2) is False
    with pytest.raises(RuntimeError, match="train.use_gpu is true but the Ray cluster has no GPU"):
        gpu_workers(True, 0)


def test_workers_share_the_cpus_within_a_node():
    """A lone worker on a 2-core machine gets both cores (Ray's default would give it one
    thread); every worker still fits on some node, and none asks for less than one CPU."""
    assert share_cpus([2], 1) == 2 and share_cpus([16], 4) == 4 and share_cpus([16, 16], 2) == 16
    assert share_cpus([1, 1], 1) == 1 and share_cpus([8, 2], 2) == 4 and share_cpus([8, 2], 3) == 2
    assert share_cpus([2], 3) == 1


def test_auto_workers_are_one_per_gpu_else_one_per_node():
    assert workers_for("auto", [2], 0) == 1  # this machine: one worker holding both cores
    assert share_cpus([2], workers_for("auto", [2], 0)) == 2
    assert workers_for("auto", [1, 1], 0) == 2 and share_cpus([1, 1], 2) == 1  # the test cluster's two nodes
    assert workers_for("auto", [16, 16, 0], 0) == 2  # a node without CPUs holds no worker
    assert workers_for("auto", [16, 16], 4) == 4  # GPUs: one worker each
    assert workers_for(3, [2], 0) == 3


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
