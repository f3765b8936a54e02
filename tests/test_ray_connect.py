"""pipeline/ray_connect.py: how training workers are placed on a Ray cluster (pure functions)."""
import pytest

from pipeline.ray_connect import gpu_workers, share_cpus, workers_for


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
