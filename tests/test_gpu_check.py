"""benchmarks/gpu_check.py, the GPU table, run here on the CPU for a few steps: it trains both
presets on the one-worker path (vae/cuda_graph.py, each replay eager on a CPU), evaluates and
exports with vae/ alone, and its checks pass."""
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile

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


@pytest.mark.integration  # builds a kit (pydantic's wheels from the index) and runs the node's script
def test_a_gpu_kit_travels_in_checked_parts_and_runs_the_table(mnist_dir, tmp_path):
    """`make gpu-kit`'s folder through benchmarks/gpu_node.sh, as on a bare GPU node (here the
    CPU, this Python): the parts are checked and joined, what they hold and the wheels land on
    the node's PYTHONPATH, and the table runs. A part not yet copied leaves it out, named; a
    damaged part stops the script, named, with nothing of it installed; the pipeline without
    its wheelhouse is refused, named."""
    probe = tmp_path / "gpu_kit_probe-1.0-py3-none-any.whl"  # a stand-in for onnxruntime-gpu's 244 MiB
    blob = os.urandom(3000)  # random: several parts of 1 KiB even compressed
    with zipfile.ZipFile(probe, "w") as wheel:
        wheel.writestr("gpu_kit_probe/blob.bin", blob)
        wheel.writestr("gpu_kit_probe-1.0.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: gpu-kit-probe\nVersion: 1.0\n")
    kit, out, node = tmp_path / "kit", tmp_path / "out", tmp_path / "node"
    # The Python this venv was made from has pip (uv's venvs have none), as the Makefile's PYTHON.
    subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_kit.py"), str(kit), "--mnist", str(mnist_dir),
                    "--python", f"{sys.version_info.major}.{sys.version_info.minor}", "--pip", sys._base_executable,
                    "--ort-wheel", str(probe), "--part-size", "1K"], check=True, timeout=300)
    parts = sorted(kit.glob("ort-*/onnxruntime-gpu.tar.zst.part-*"))
    assert len(parts) >= 3 and len((kit / "first/onnxruntime-gpu.parts").read_text().splitlines()) == len(parts)

    def on_the_node(*what: str, check_args: str = "--device cpu --quick --only evaluation"):
        env = {**os.environ, "PY": sys.executable, "GPU_NODE_DIR": str(node), "CHECK_ARGS": check_args}
        return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_node.sh"), str(kit), str(out), *what], env=env,
                              capture_output=True, text=True, timeout=300)

    last = parts[-1].rename(tmp_path / parts[-1].name)  # not copied yet
    missing = on_the_node("tests")
    assert missing.returncode == 0, missing.stdout + missing.stderr
    assert f"missing: {last.name}" in missing.stdout and not (node / "site/gpu_kit_probe").exists()
    assert "3 skipped" in (out / "pytest_gpu.txt").read_text()  # the GPU tests, collected with the kit's wheels

    last.rename(parts[-1])
    done = on_the_node("table")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (node / "site/gpu_kit_probe/blob.bin").read_bytes() == blob
    assert {"pydantic", "pydantic_core"} <= {p.name for p in (node / "site").iterdir()}
    assert "gpu-kit-probe==1.0" in (out / "node.txt").read_text().splitlines()
    assert "| L_2 on 100 test images" in (out / "gpu_check.txt").read_text()
    no_wheelhouse = on_the_node("pipeline")  # a kit made without --pipeline
    assert no_wheelhouse.returncode == 2 and f"no wheelhouse in {kit}" in no_wheelhouse.stdout

    shutil.rmtree(node)
    with parts[1].open("r+b") as part:  # one byte flipped in transit
        first = part.read(1)
        part.seek(0)
        part.write(bytes([first[0] ^ 1]))
    damaged = on_the_node("table")
    assert damaged.returncode == 2
    assert f"{parts[1]}: sha256 does not match" in damaged.stdout and not (node / "site/gpu_kit_probe").exists()
