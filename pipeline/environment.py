"""The locked environment: what uv.lock says is installed, and whether it is.

`make` installs exactly uv.lock (`uv sync --frozen`); this module reads the same file so
that every MLflow run can name the environment it ran in (the lock's sha256), the logged
decoder can pin the exact locked versions it loads with, and `vae env` can say whether the
installed packages are the locked ones. The lock read is the one beside the installed
project (an editable install, as `make` and the image make), not the current directory's:
a DVC experiment's temporary copy runs in the environment of the repository it came from.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import tomllib
from functools import cache
from pathlib import Path

from packaging.markers import Marker, default_environment
from packaging.utils import canonicalize_name

PROJECT = "vae-mnist"
LOCK = Path(__file__).resolve().parents[1] / "uv.lock"


@cache
def lock_sha256(lock: Path = LOCK) -> str:
    """The lock's identity, tagged on every MLflow run ("absent" outside a checkout)."""
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "absent"


def _applies(marker: str | None) -> bool:
    return marker is None or Marker(marker).evaluate({**default_environment(), "extra": ""})


def locked_packages(extras: tuple[str, ...] = (), lock: Path = LOCK) -> dict[str, str]:
    """{name: version} of every package uv.lock installs on this interpreter and platform
    for the project with `extras`: its dependency graph walked from the project, following
    only the edges whose markers hold here (the lock is universal: it also lists Windows-,
    macOS- and other-Python-only packages)."""
    packages = tomllib.loads(lock.read_text())["package"]
    by_name: dict[str, list[dict]] = {}
    for package in packages:
        by_name.setdefault(package["name"], []).append(package)

    def resolve(dep: dict) -> dict:
        candidates = by_name[dep["name"]]
        return next(p for p in candidates if p["version"] == dep["version"]) if "version" in dep else candidates[0]

    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(by_name[PROJECT][0], ("",) + extras)]  # "" stands for the unconditional dependencies
    while todo:
        package, wanted = todo.pop()
        found[package["name"]] = package["version"]
        optional = package.get("optional-dependencies", {})
        for extra in wanted:
            if (package["name"], extra) in seen:
                continue
            seen.add((package["name"], extra))
            deps = package.get("dependencies", []) if extra == "" else optional.get(extra, [])
            todo += [(resolve(d), ("", *d.get("extra", []))) for d in deps if _applies(d.get("marker"))]
    return found


def installed_packages() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def differences(extras: tuple[str, ...] = ("dev",), lock: Path = LOCK) -> list[str]:
    """How this environment departs from the lock: missing, other versions, unlocked extras."""
    locked, installed = locked_packages(extras, lock), installed_packages()
    problems = [f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
                for name, version in sorted(locked.items()) if installed.get(name) != version]
    return problems + [f"{name}: installed {installed[name]}, not in the lock" for name in sorted(installed)
                       if name not in locked]


def pinned(names: tuple[str, ...], lock: Path = LOCK) -> list[str]:
    """`name==version` at the lock's versions for this interpreter, for MLflow's requirements."""
    locked = locked_packages(lock=lock)
    missing = [name for name in names if name not in locked]
    if missing:
        raise LookupError(f"{lock}: no locked version of {', '.join(missing)} for this platform")
    return [f"{name}=={locked[name]}" for name in names]


def project_version() -> str:
    """The installed project's version; a checkout run without installing it (a GPU node's own
    Python, `python -m pipeline.cli`) says so instead of failing."""
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a checkout)"


def devices() -> str:
    """What would compute here: the CUDA GPUs torch sees (training and evaluation take them)
    and the provider `vae serve` would open its sessions on."""
    import onnxruntime
    import torch

    from pipeline.serve.session import cuda_usable  # here: serving imports this module

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    gpus = f"{count} CUDA GPU{'s' * (count > 1)} ({', '.join(names)}; CUDA {torch.version.cuda})" if count else \
        "no CUDA GPU"
    provider = "CUDAExecutionProvider" if cuda_usable() else "CPUExecutionProvider"
    return f"devices: torch {torch.__version__} sees {gpus}; onnxruntime {onnxruntime.__version__} serves on {provider}"


def describe() -> str:
    """`vae env`: the project version, the lock, the interpreter, and whether they agree: a
    node's own torch (a GPU image's) is listed as a difference, not refused. Then the devices."""
    lines = [f"{PROJECT} {project_version()}",
             f"uv.lock sha256 {lock_sha256()} ({LOCK})",
             f"python {platform.python_version()} on {platform.system().lower()} {platform.machine()}"]
    if LOCK.is_file():
        base = locked_packages()
        # The dev extra (tests) is optional: an image installs without it.
        problems = [p for p in differences() if p.split(":")[0] in base or "not in the lock" in p]
        lines.append(f"environment: {len(base)} locked packages, " + (
            "all installed at their locked versions" if not problems else
            f"{len(problems)} differ (run `make install`):\n  " + "\n  ".join(problems)))
    return "\n".join([*lines, devices()])
