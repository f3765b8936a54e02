"""benchmarks/gpu_check.py, the script for a GPU machine, run here on the CPU for a few steps:
it trains, evaluates and exports with vae/ alone, and its checks pass."""
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.integration  # starts the script
def test_gpu_check_runs_on_the_cpu_with_vae_alone(mnist_dir):
    command = [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--data", str(mnist_dir), "--device", "cpu",
               "--epochs", "2", "--steps", "3", "--compare-steps", "2", "--iwae-k", "2", "--test-images", "100"]
    # Nothing of the pipeline's frameworks may be needed: a GPU machine has none of them.
    blocker = "import sys; [sys.modules.__setitem__(m, None) for m in ('ray', 'mlflow', 'dvc', 'pipeline')]"
    result = subprocess.run([sys.executable, "-c", f"{blocker}; import runpy, sys; sys.argv = {command[1:]!r}; "
                             f"runpy.run_path({command[1]!r}, run_name='__main__')"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout
    assert "| first steps, CPU vs device (max rel. diff) | 0.00e+00 | ok |" in table  # CPU against itself
    assert "train fp32: s/epoch (best of 2)" in table and "train bf16 autocast" in table
    assert "IWAE k=2 on 100 test images" in table
    assert "| ok |" in table.split("ONNX decoder vs torch")[1].splitlines()[0]
