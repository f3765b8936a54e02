"""benchmarks/gpu_check.py, the GPU table, run here on the CPU for a few steps: it trains both
presets on the one-worker path (vae/cuda_graph.py, each replay eager on a CPU), evaluates and
exports with vae/ alone, and its checks pass."""
import math
import re
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.integration  # starts the script
def test_gpu_check_runs_on_the_cpu_with_vae_alone(mnist_dir):
    command = [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--data", str(mnist_dir), "--device", "cpu",
               "--quick"]
    # Nothing of the pipeline's frameworks may be needed: a GPU machine has none of them.
    blocker = "import sys; [sys.modules.__setitem__(m, None) for m in ('ray', 'mlflow', 'dvc', 'pipeline')]"
    result = subprocess.run([sys.executable, "-c", f"{blocker}; import runpy, sys; sys.argv = {command[1:]!r}; "
                             f"runpy.run_path({command[1]!r}, run_name='__main__')"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {cells[0]: cells[1:] for line in result.stdout.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert not any(name.startswith("first steps") for name in rows)  # the CPU against itself says nothing
    for preset in ("default", "paper"):
        value, ratio = rows[f"{preset}: pipeline epoch (eager on a CPU, + validation), s"]
        floor = float(rows[f"{preset}: floor, the captured step alone, s/epoch"][0])
        # The ratio of the unrounded seconds, which are printed to the millisecond.
        low, high = (float(value) - 5e-4) / (floor + 5e-4), (float(value) + 5e-4) / max(floor - 5e-4, 1e-9)
        assert low - 0.005 <= float(ratio.removesuffix("x the floor")) <= high + 0.005
        assert f"{preset}: eager bf16 step (+ validation), s/epoch" in rows
        assert rows[f"{preset}: graph vs eager, validation -ELBO after the same epochs"][1] == "ok"
    # The default recipe's two epochs trained: below 784 ln 2 = 543.4 nats, what an untrained model scores.
    trained = rows["default recipe, 2 epochs: training s (+ set-up and capture)"][1]
    assert float(re.search(r"-ELBO ([\d.]+)", trained)[1]) < 784 * math.log(2) - 100
    assert rows["L_2 on 100 test images (noise in blocks of images)"][0].endswith(" s")
    assert rows["decoder on CPU vs torch (max abs diff, at most 1e-05)"][1] == "ok"
    assert {f"decode on CPU, batch {n}, host I/O" for n in (1, 64)} <= set(rows)


def test_a_failing_section_costs_its_own_rows_not_the_table(capsys):
    """A GPU node's minutes are few: a capture that fails, say, leaves a FAIL row naming it, and
    the sections after it still run; each row prints as it comes, should the run be cut short."""
    import runpy

    guarded = runpy.run_path(str(ROOT / "benchmarks/gpu_check.py"))["guarded"]  # not run as __main__
    rows = []
    guarded(rows, "default: training", lambda: [][0])
    guarded(rows, "decoding", lambda: [("decode on CPU, batch 1, host I/O", "0.027 ms", "37,289 img/s")])
    assert rows == [("default: training", "error", "FAIL: IndexError: list index out of range"),
                    ("decode on CPU, batch 1, host I/O", "0.027 ms", "37,289 img/s")]
    assert "decode on CPU, batch 1, host I/O | 0.027 ms | 37,289 img/s" in capsys.readouterr().out


@pytest.mark.integration  # starts the script
def test_only_the_sections_asked_for_run(mnist_dir):
    """--only: a section again on its own (the decoding rows once onnxruntime-gpu is there, say),
    with an untrained model where the recipe's is not trained; an unknown section is named."""
    script = [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--data", str(mnist_dir), "--device", "cpu",
              "--quick"]
    result = subprocess.run([*script, "--only", "evaluation,decoding"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    assert table[0].startswith("| L_2 on 100 test images") and "(an untrained model)" in table[0]
    assert all(" decod" in row or "CUDA provider" in row for row in table[1:]) and len(table) >= 4
    wrong = subprocess.run([*script, "--only", "decode"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "--only: no section decode" in wrong.stderr
