"""Install `make wheelhouse`'s folder on a node that reaches no package index, over the node's
own Python and its CUDA torch. Run it there, with that Python, in a checkout with the
wheelhouse copied in:

    python3 infra/node_install.py wheelhouse .venv
    .venv/bin/vae env                  # names the node's torch (and what else it brings) as differences

It makes a venv that imports its own packages first and the node's after them: a .pth file
in the venv names this Python's site-packages. (`venv --system-site-packages` would show the
base interpreter's packages only: where the node's torch lives in a venv of its own, as on
many GPU images, it would be gone.) Then pip (this Python's, or else ensurepip's) installs the
wheelhouse's requirements and the project (--no-deps) into it, from the folder alone. The
standard library only: the node may have nothing else.
"""
from __future__ import annotations

import argparse
import importlib.util
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE_PTH = "_node_packages.pth"  # the file naming the node's site-packages, in the venv's own


def layered_venv(path: Path) -> Path:
    """A venv at `path` that sees this Python's packages behind its own; its interpreter. Made
    without pip: ensurepip is often missing from a system Python (Debian's python3-venv)."""
    venv.create(path)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    # site.py appends a .pth file's folders after the venv's own site-packages: the venv's
    # onnxruntime-gpu is found before a node's onnxruntime, the node's torch still found.
    (Path(own) / NODE_PTH).write_text("".join(f"{folder}\n" for folder in site.getsitepackages()))
    return python


def pip_for(python: Path) -> list[str]:
    """A pip that installs into `python`'s environment: this Python's own, told to (pip >= 22.3's
    --python), or else one the venv gets from ensurepip."""
    if importlib.util.find_spec("pip"):
        return [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run([str(python), "-m", "ensurepip", "--default-pip"], check=True)
    return [str(python), "-m", "pip"]


def install(wheelhouse: Path, python: Path) -> None:
    """The wheelhouse's requirements, then the project (its requirements are those), offline."""
    pip = [*pip_for(python), "install", "--no-index", "--find-links", str(wheelhouse), "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(wheelhouse / "requirements.txt")], check=True)
    # No build isolation: the project's build backend came with the requirements.
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheelhouse", type=Path, help="the folder `make wheelhouse` wrote, copied to this node")
    p.add_argument("venv", type=Path, help="the venv to make (or add to)")
    args = p.parse_args()
    if not (args.wheelhouse / "requirements.txt").is_file():
        sys.exit(f"node_install: {args.wheelhouse} holds no requirements.txt: not a folder `make wheelhouse` wrote")
    try:
        install(args.wheelhouse, layered_venv(args.venv))
    except subprocess.CalledProcessError as e:
        sys.exit(f"node_install: {' '.join(map(str, e.cmd[:5]))}... failed (exit {e.returncode})")
    print(f"node_install: {args.venv} holds the project over {sys.executable}'s packages; "
          f"`{args.venv}/bin/vae env` lists what differs from uv.lock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
