"""benchmarks/gpu_check.py, the GPU table, run here on the CPU for a few steps: it trains both
presets on the one-worker path (vae/cuda_graph.py, each replay eager on a CPU), evaluates and
exports with vae/ alone, and its checks pass."""
import base64
import hashlib
import math
import os
import re
import runpy
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

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


def test_a_default_part_and_the_working_tree_fit_one_device_call():
    """The session carries one part a call, beside the working tree: a tree grown past the
    room a 60 MiB part leaves would have the device tool refuse the calls mid-session."""
    gpu_kit = runpy.run_path(str(ROOT / "benchmarks/gpu_kit.py"))
    tree, part = gpu_kit["working_tree_bytes"](), gpu_kit["parse_size"]("60M")
    assert 2**20 < tree and tree + part + 2**16 <= gpu_kit["CALL_LIMIT"], tree  # 64 KiB: a first part's listing


@pytest.fixture(scope="module")
def built_kit(mnist_dir, tmp_path_factory) -> tuple[Path, bytes]:
    """`make gpu-kit`'s folder, with a stand-in for onnxruntime-gpu's 244 MiB in parts of 1 KiB,
    and the stand-in's payload; each test copies the kit before changing it."""
    where = tmp_path_factory.mktemp("gpu_kit")
    probe = where / "gpu_kit_probe-1.0-py3-none-any.whl"
    blob = os.urandom(3000)  # random: several parts of 1 KiB even compressed
    with zipfile.ZipFile(probe, "w") as wheel:
        wheel.writestr("gpu_kit_probe/blob.bin", blob)
        wheel.writestr("gpu_kit_probe-1.0.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: gpu-kit-probe\nVersion: 1.0\n")
    # The Python this venv was made from has pip (uv's venvs have none), as the Makefile's PYTHON.
    subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_kit.py"), str(where / "kit"), "--mnist",
                    str(mnist_dir), "--python", f"{sys.version_info.major}.{sys.version_info.minor}", "--pip",
                    sys._base_executable, "--ort-wheel", str(probe), "--part-size", "1K"], check=True, timeout=300)
    return where / "kit", blob


def node_env(node: Path, **more: str) -> dict[str, str]:
    """gpu_node.sh's settings for a "node" that is this Python, a CPU and a quick table."""
    return {**os.environ, "PY": sys.executable, "GPU_NODE_DIR": str(node),
            "CHECK_ARGS": "--device cpu --quick --only evaluation", **more}


@pytest.mark.integration  # builds a kit (pydantic's wheels from the index) and runs the node's script
def test_a_gpu_kit_travels_in_checked_parts_and_runs_the_table(built_kit, tmp_path):
    """`make gpu-kit`'s folder through benchmarks/gpu_node.sh, as on a bare GPU node (here the
    CPU, this Python): the parts are checked and joined, what they hold and the wheels land on
    the node's PYTHONPATH, and the table runs. A part not yet copied leaves it out, named; a
    damaged part stops the script, named, with nothing of it installed; the pipeline without
    its wheelhouse is refused, named."""
    kit, out, node = tmp_path / "kit", tmp_path / "out", tmp_path / "node"
    shutil.copytree(built_kit[0], kit)
    parts = sorted(kit.glob("ort-*/onnxruntime-gpu.tar.zst.part-*"))
    assert len(parts) >= 3 and len((kit / "ort-1/onnxruntime-gpu.parts").read_text().splitlines()) == len(parts)

    def on_the_node(*what: str, **env: str):
        return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_node.sh"), str(kit), str(out), *what],
                              env=node_env(node, **env), capture_output=True, text=True, timeout=300)

    last = parts[-1].rename(tmp_path / parts[-1].name)  # not copied yet
    missing = on_the_node("tests", "table")
    assert missing.returncode == 0, missing.stdout + missing.stderr
    assert f"missing from {kit}: {last.name}" in missing.stdout and not (node / "site/gpu_kit_probe").exists()
    # The GPU tests, collected with the kit's wheels and each skipped here (no CUDA): no error.
    summary = (out / "pytest_gpu.txt").read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"=+ \d+ skipped, \d+ deselected in .*", summary), summary
    assert "| L_2 on 100 test images" in (out / "gpu_check.txt").read_text()  # the rest of the table ran

    last.rename(parts[-1])
    done = on_the_node("table", ZSTD="no-zstd-here")  # the GPU image has no zstd program: pyarrow decodes
    assert done.returncode == 0, done.stdout + done.stderr
    assert (node / "site/gpu_kit_probe/blob.bin").read_bytes() == built_kit[1]
    assert {"pydantic", "pydantic_core"} <= {p.name for p in (node / "site").iterdir()}
    assert any(line.startswith("pydantic==") for line in (out / "node.txt").read_text().splitlines())
    no_wheelhouse = on_the_node("pipeline")  # a kit made without --pipeline
    assert no_wheelhouse.returncode == 2 and f"missing from {kit}: wheelhouse.parts" in no_wheelhouse.stdout

    shutil.rmtree(node)
    with parts[1].open("r+b") as part:  # one byte flipped in transit
        first = part.read(1)
        part.seek(0)
        part.write(bytes([first[0] ^ 1]))
    damaged = on_the_node("table")
    assert damaged.returncode == 2
    assert f"{parts[1]}: sha256 does not match" in damaged.stdout and not (node / "site/gpu_kit_probe").exists()


@pytest.mark.integration  # runs the node's script in the background
def test_a_gpu_session_runs_on_while_later_calls_bring_the_parts(built_kit, tmp_path):
    """benchmarks/gpu_session.sh as the device tool's calls run it: the first starts gpu_node.sh
    in a process session of its own and returns once the node's package list is written; the
    table waits for the parts a later call brings; the last call waits for the end and brings
    back every output as one archive. A second start while it runs, and a call on a machine
    where nothing started, are refused."""
    kit, node = built_kit[0], tmp_path / "node"
    carried = {name: tmp_path / "calls" / name for name in ("first", "second", "none")}
    ort = sorted(kit.glob("ort-*"))
    for folder in (kit / "first", ort[-1]):
        shutil.copytree(folder, carried["first"] / folder.name)
    for folder in ort[:-1]:
        shutil.copytree(folder, carried["second"] / folder.name)
    carried["none"].mkdir()

    def call(name: str, *args: str, machine: Path = node):
        env = node_env(machine, GPU_KIT=str(carried[name]), WAIT_S="120")
        return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_session.sh"), str(tmp_path / "out" / name), *args],
                              env=env, capture_output=True, text=True, timeout=300)

    started = call("first", "start", "table")
    assert started.returncode == 0, started.stdout + started.stderr
    with tarfile.open(tmp_path / "out/first/gpu_node.tar.gz") as archive:
        assert "out/node.txt" in archive.getnames()
    assert not (node / "exit").exists()  # the table waits for ort-1's listing
    again = call("none", "start", "table")
    assert again.returncode == 2 and "already runs" in again.stderr
    assert call("second").returncode == 0
    done = call("none", "wait", "240")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| L_2 on 100 test images" in done.stdout  # the table, printed by the last call
    with tarfile.open(tmp_path / "out/none/gpu_node.tar.gz") as archive:
        # The safe filter where this Python has it: 3.11 before 3.11.4 (Debian 12's 3.11.2) does not.
        archive.extractall(tmp_path / "back", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    notes = (tmp_path / "back/out/gpu_node.txt").read_text()
    assert notes.index("onnxruntime-gpu: waiting up to") < notes.index("onnxruntime-gpu unpacked")
    assert "| L_2 on 100 test images" in (tmp_path / "back/out/gpu_check.txt").read_text()
    assert (node / "site/gpu_kit_probe/blob.bin").read_bytes() == built_kit[1]
    fresh = call("none", machine=tmp_path / "fresh")
    assert fresh.returncode == 2 and "nothing started on this machine" in fresh.stderr


@pytest.mark.integration  # pip installs the wheel
def test_the_pipelines_wheels_travel_uncompressed_and_still_install(tmp_path):
    """gpu_kit's wheelhouse wheels, rewritten uncompressed (zstd compresses their contents better
    together: a part less), hold the same files with the same modes, and pip installs them: a
    script stays executable."""
    stored = runpy.run_path(str(ROOT / "benchmarks/gpu_kit.py"))["stored"]
    files = {"probe/__init__.py": b"VALUE = 42\n" * 200, "probe-1.0.data/scripts/probe-tool": b"#!/bin/sh\necho ok\n",
             "probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: probe\nVersion: 1.0\n",
             "probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          b"Tag: py3-none-any\n"}
    digest = {name: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
              for name, data in files.items()}
    files["probe-1.0.dist-info/RECORD"] = "".join(
        f"{name},sha256={digest[name]},{len(data)}\n" for name, data in files.items()).encode() + \
        b"probe-1.0.dist-info/RECORD,,\n"
    wheel = tmp_path / "probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, (2026, 12, 5, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | (0o755 if "scripts" in name else 0o644)) << 16
            archive.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    before = {i.filename: (i.external_attr, i.date_time) for i in zipfile.ZipFile(wheel).infolist()}
    stored(wheel)
    with zipfile.ZipFile(wheel) as archive:
        assert {i.filename: (i.external_attr, i.date_time) for i in archive.infolist()} == before
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
        assert all(archive.read(name) == data for name, data in files.items())
    target = tmp_path / "installed"
    subprocess.run([sys._base_executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True, timeout=120)
    assert (target / "probe/__init__.py").read_bytes() == files["probe/__init__.py"]
    assert os.access(target / "bin/probe-tool", os.X_OK)
