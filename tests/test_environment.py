"""pipeline/environment.py and the Makefile's install: the environment is exactly uv.lock."""
import hashlib
import importlib.metadata
import subprocess

import pytest

from pipeline import environment

from helpers import BIN, ROOT

UV = ROOT / ".tools" / "bin" / "uv"  # bootstrapped by `make`

# A universal lock in miniature: an edge for Windows only, one per Python version, an extra
# that pulls in a package with an extra of its own.
TINY_LOCK = """
version = 1
[[package]]
name = "vae-mnist"
version = "0.1.0"
source = { editable = "." }
dependencies = [
    { name = "colorama", marker = "sys_platform == 'win32'" },
    { name = "numpy", version = "1.0", marker = "python_full_version < '3.0'" },
    { name = "numpy", version = "2.0", marker = "python_full_version >= '3.0'" },
]
[package.optional-dependencies]
dev = [{ name = "tritonclient", extra = ["http"] }]
[[package]]
name = "colorama"
version = "0.4"
[[package]]
name = "numpy"
version = "1.0"
[[package]]
name = "numpy"
version = "2.0"
[[package]]
name = "tritonclient"
version = "2.5"
dependencies = [{ name = "numpy", version = "2.0" }]
[package.optional-dependencies]
http = [{ name = "geventhttpclient" }]
grpc = [{ name = "grpcio" }]
[[package]]
name = "geventhttpclient"
version = "2.3"
[[package]]
name = "grpcio"
version = "1.6"
"""


def test_lock_agrees_with_pyproject():
    assert UV.is_file(), "run `make install` first: it bootstraps uv into .tools/"
    result = subprocess.run([str(UV), "lock", "--check", "--offline"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"uv.lock does not match pyproject.toml (run `make lock`): {result.stderr}"


def test_installed_environment_is_exactly_the_lock():
    # Every package uv.lock installs here (the dev extra too) at its locked version, and no other.
    assert environment.differences(("dev",)) == []
    locked = environment.locked_packages(("dev",))
    assert locked["torch"] == "2.14.1" and "pytest" in locked and "pytest" not in environment.locked_packages()


def test_the_lock_is_walked_by_markers_and_extras(tmp_path):
    lock = tmp_path / "uv.lock"
    lock.write_text(TINY_LOCK)
    assert environment.locked_packages(lock=lock) == {"vae-mnist": "0.1.0", "numpy": "2.0"}
    assert environment.locked_packages(("dev",), lock) == {
        "vae-mnist": "0.1.0", "numpy": "2.0", "tritonclient": "2.5", "geventhttpclient": "2.3"}
    assert environment.pinned(("numpy",), lock) == ["numpy==2.0"]
    with pytest.raises(LookupError, match="no locked version of colorama"):
        environment.pinned(("numpy", "colorama"), lock)


@pytest.mark.integration  # starts `vae`
def test_vae_version_and_env_name_the_lock():
    digest = hashlib.sha256((ROOT / "uv.lock").read_bytes()).hexdigest()
    version = subprocess.run([str(BIN / "vae"), "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"vae-mnist 0.1.0 (uv.lock sha256 {digest})"
    env = subprocess.run([str(BIN / "vae"), "env"], capture_output=True, text=True, check=True).stdout
    assert f"uv.lock sha256 {digest}" in env
    assert "all installed at their locked versions" in env, env
    import onnxruntime
    import torch

    from pipeline.serve.session import cuda_usable

    devices = env.splitlines()[-1]  # what would compute here
    assert devices.startswith(f"devices: torch {torch.__version__} sees {torch.cuda.device_count() or 'no'} CUDA GPU")
    assert devices.endswith(f"; onnxruntime {onnxruntime.__version__} serves on "
                            f"{'CUDA' if cuda_usable() else 'CPU'}ExecutionProvider"), devices


def test_env_on_a_node_with_its_own_torch_and_no_install_reports_instead_of_failing(monkeypatch):
    """A GPU node: the project run from a checkout, not installed, beside the image's own torch."""
    real = environment.installed_packages()
    monkeypatch.setattr(environment, "installed_packages", lambda: {**real, "torch": "2.11.0+cu130"})
    monkeypatch.setattr(environment.importlib.metadata, "version", _not_installed)
    described = environment.describe()
    assert described.splitlines()[0] == "vae-mnist (not installed: run from a checkout)"
    assert "torch: locked 2.14.1, installed 2.11.0+cu130" in described and "1 differ" in described


def _not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)
