"""pipeline/ray_connect.py: how training workers are placed on a Ray cluster (pure functions)."""
import pytest

from pipeline.ray_connect import gpu_workers, share_cpus


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
