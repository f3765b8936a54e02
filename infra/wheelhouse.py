"""`make wheelhouse`: the locked environment as a folder of wheels, for a node that reaches no
package index and brings its own CUDA build of torch (a GPU image, an air-gapped cluster).

    make wheelhouse                          # wheelhouse/, for CPython 3.12 on Linux x86-64
    make wheelhouse WHEEL_PYTHON=3.11

It writes wheelhouse/requirements.txt, uv.lock's runtime packages at their locked versions
(`uv export`) less torch, torchvision and what only they need (triton, the CUDA libraries),
plus the project's build backend, and downloads those wheels for the target (a source archive
where the lock has no wheel: antlr4-python3-runtime, pure Python, built on the node). On the node, in a
checkout with the wheelhouse copied beside it:

    python3 -m venv --system-site-packages .venv   # the node's own torch stays importable
    .venv/bin/pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
    .venv/bin/pip install --no-index --find-links wheelhouse --no-deps --no-build-isolation -e .
    .venv/bin/vae env                              # names the node's torch as the one difference

A GPU image often brings much more than torch (numpy, pyarrow, scipy...). `--node-has FILE`
(`pip list --format=freeze` run on the node, or one name a line) leaves those out too, at
whatever version the node has, and what only they need: a smaller folder to carry, and `vae
env` names each version the node's own. Where the node is reached only by copies of limited
size, in parts:

    tar -cf - wheelhouse | zstd -19 --long=27 -T0 | split -b 60M - kit.part.   # here
    cat kit.part.* | zstd -d --long=27 | tar -xf -                           # there
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "vae-mnist"
NODE_OWN = ("torch", "torchvision")  # what the node brings, CUDA build and all
# manylinux tags a current Linux x86-64 node accepts (glibc 2.17 to 2.39).
PLATFORMS = ["manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)), "linux_x86_64"]


def needed_without(node_own: tuple[str, ...], lock: Path = ROOT / "uv.lock") -> set[str]:
    """The locked packages the project reaches without going through node_own: what a node
    that has those still needs (markers aside: uv export and pip apply them for the target)."""
    packages = {p["name"]: p for p in tomllib.loads(lock.read_text())["package"]}
    seen, todo = set(), [PROJECT]
    while todo:
        name = todo.pop()
        if name in seen or name in node_own:
            continue
        seen.add(name)
        package = packages[name]
        edges = [*package.get("dependencies", []),
                 *(d for deps in package.get("optional-dependencies", {}).values() for d in deps)]
        todo += [d["name"] for d in edges]
    return seen - {PROJECT}


def node_packages(listing: str) -> tuple[str, ...]:
    """The package names in a `pip list --format=freeze` (or `pip freeze`, or one name a line)
    of the node, normalised as uv.lock writes them."""
    lines = (line.split("#")[0].strip() for line in listing.splitlines())
    return tuple(canonicalize_name(line.split("==")[0].split(" @ ")[0].strip()) for line in lines if line)


def target_environment(python: str) -> dict[str, str]:
    """The marker environment of CPython `python` on Linux x86-64. pip download applies its
    --python-version to wheel tags only and evaluates markers for the interpreter it runs on:
    on 3.11 it would fetch 3.11's numpy for a 3.12 node."""
    return {"implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "python_version": python, "python_full_version": f"{python}.0", "extra": ""}


def requirements(python: str, node_own: tuple[str, ...] = NODE_OWN) -> list[str]:
    """`name==version` at uv.lock's versions for the target, of the packages the node still
    needs, and the project's build requirements, so that it installs from the wheelhouse too."""
    exported = subprocess.run([str(ROOT / ".tools/bin/uv"), "export", "--frozen", "--no-hashes", "--no-header",
                               "--no-annotate", "--no-emit-project"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.splitlines()
    keep, environment = needed_without(node_own), target_environment(python)
    pins = []
    for line in filter(None, exported):
        pin, _, marker = (part.strip() for part in line.partition(";"))
        if pin.split("==")[0] in keep and (not marker or Marker(marker).evaluate(environment)):
            pins.append(pin)
    # The project's build backend, and wheel, which pip's build of a setup.py archive asks for.
    build = [*tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"], "wheel"]
    # Even where the node has them: pip and uv build the source archive in an isolated
    # environment, which installs them from the wheelhouse, not from the node.
    return pins + [r for r in build if canonicalize_name(r.split(">")[0].split("=")[0].strip()) not in keep]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="the wheelhouse folder")
    p.add_argument("--python", default="3.12", help="the node's CPython version (default: 3.12)")
    p.add_argument("--pip", default=sys.executable, help="an interpreter with pip (default: this one)")
    p.add_argument("--node-has", type=Path, metavar="FILE",
                   help="the node's `pip list --format=freeze`: leave out what it already has")
    args = p.parse_args()
    node_own = NODE_OWN + (node_packages(args.node_has.read_text()) if args.node_has else ())
    args.target.mkdir(parents=True, exist_ok=True)
    listed = args.target / "requirements.txt"
    listed.write_text("\n".join(requirements(args.python, node_own)) + "\n")
    abi = "cp" + args.python.replace(".", "")
    command = [args.pip, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--prefer-binary", "--implementation", "cp", "--python-version", args.python,
               *(f"--abi={a}" for a in (abi, "abi3", "none")), *(f"--platform={p}" for p in PLATFORMS),
               "-r", str(listed), "-d", str(args.target)]
    result = subprocess.run(command)
    if result.returncode:
        print(f"wheelhouse: pip download failed (exit {result.returncode}); {listed} lists what it fetches",
              file=sys.stderr)
        return result.returncode
    wheels = sorted(args.target.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    own = f"torch, torchvision and what {args.node_has} lists" if args.node_has else "torch and torchvision"
    print(f"wheelhouse: {len(wheels)} wheels, {size:.0f} MiB, in {args.target} (for CPython {args.python}, "
          f"Linux x86-64; {own}: the node's own)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
