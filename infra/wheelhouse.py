"""`make wheelhouse`: the locked environment as a folder of wheels, for a node that reaches no
package index and brings its own CUDA build of torch (a GPU image, an air-gapped cluster).

    make wheelhouse                          # wheelhouse/, for CPython 3.12 on Linux x86-64
    make wheelhouse WHEEL_PYTHON=3.11
    make wheelhouse WHEEL_EXTRAS=dev         # with the test suite's packages

It writes wheelhouse/requirements.txt, uv.lock's runtime packages at their locked versions
(`uv export`) less torch, torchvision and what only they need (triton, the CUDA libraries),
plus the project's build backend, and downloads those wheels for the target (a source archive
where the lock has no wheel: antlr4-python3-runtime, pure Python, built on the node). On the node, in a
checkout with the wheelhouse copied in, with the Python that has the node's torch:

    python3 infra/node_install.py wheelhouse .venv   # a venv over that Python's packages, filled offline
    .venv/bin/vae env                                # names the node's torch as a difference

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
import email
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "vae-mnist"
NODE_OWN = ("torch", "torchvision")  # what the node brings, CUDA build and all
# manylinux tags a current Linux x86-64 node accepts (glibc 2.17 to 2.39).
PLATFORMS = ["manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)), "linux_x86_64"]


def needed_without(node_own: tuple[str, ...], lock: Path = ROOT / "uv.lock", roots: tuple[str, ...] = (PROJECT,),
                   extras: tuple[str, ...] = ()) -> set[str]:
    """The locked packages `roots` (the project, or some of its packages) reach without going
    through node_own: what a node that has those still needs (markers aside: uv export and pip
    apply them for the target). Of the project's own extras, only `extras` count; a locked
    package's extras all do (the lock holds only those something asks for)."""
    packages = {p["name"]: p for p in tomllib.loads(lock.read_text())["package"]}
    if absent := [root for root in roots if root not in packages]:
        raise ValueError(f"{', '.join(absent)} is not in {lock.name}")
    unknown = set(extras) - set(packages[PROJECT].get("optional-dependencies", {}))
    if unknown:
        raise ValueError(f"{PROJECT} has no extra {', '.join(sorted(unknown))}")
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in node_own:
            continue
        seen.add(name)
        package = packages[name]
        optional = package.get("optional-dependencies", {})
        asked = extras if name == PROJECT else tuple(optional)
        todo += [d["name"] for d in [*package.get("dependencies", []), *(d for e in asked for d in optional[e])]]
    return seen - {PROJECT}


def node_packages(listing: str) -> tuple[str, ...]:
    """The package names in a `pip list --format=freeze` (or `pip freeze`, or one name a line)
    of the node, normalised as uv.lock writes them."""
    lines = (line.split("#")[0].strip() for line in listing.splitlines())
    return tuple(canonicalize_name(line.split("==")[0].split(" @ ")[0].strip()) for line in lines if line)


def node_versions(listing: str) -> dict[str, str]:
    """The versions in such a listing, by normalised name (of the `name==version` lines)."""
    lines = (line.split("#")[0].strip() for line in listing.splitlines())
    return {canonicalize_name(name): version.strip() for name, _, version in
            (line.partition("==") for line in lines) if version}


def requested_extras(lock: Path = ROOT / "uv.lock") -> dict[str, set[str]]:
    """Each locked package's extras that some locked package asks for (ray's `train`, say)."""
    extras: dict[str, set[str]] = {}
    for package in tomllib.loads(lock.read_text())["package"]:
        for dependency in package.get("dependencies", []):
            extras.setdefault(dependency["name"], set()).update(dependency.get("extra", []))
    return extras


def requires_dist(wheel: Path) -> list[Requirement]:
    """What a wheel requires (its METADATA's Requires-Dist), markers and extras included."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return [Requirement(r) for r in email.message_from_bytes(archive.read(metadata)).get_all("Requires-Dist") or []]


def refused(wheels: list[Path], node: dict[str, str], python: str) -> dict[str, str]:
    """The node's packages whose version a wheel here does not accept (its Requires-Dist for the
    target, with the extras the lock asks of it): name -> the requirement that refuses it."""
    extras, found = requested_extras(), {}
    for wheel in wheels:
        name = canonicalize_name(wheel.name.split("-")[0])
        environments = [{**target_environment(python), "extra": e} for e in {"", *extras.get(name, ())}]
        for requirement in requires_dist(wheel):
            dependency = canonicalize_name(requirement.name)
            applies = not requirement.marker or any(requirement.marker.evaluate(e) for e in environments)
            if dependency in node and applies and not requirement.specifier.contains(node[dependency], True):
                found[dependency] = f"{name}'s {requirement.name}{requirement.specifier}"
    return found


def target_environment(python: str) -> dict[str, str]:
    """The marker environment of CPython `python` on Linux x86-64. pip download applies its
    --python-version to wheel tags only and evaluates markers for the interpreter it runs on:
    on 3.11 it would fetch 3.11's numpy for a 3.12 node."""
    return {"implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "python_version": python, "python_full_version": f"{python}.0", "extra": ""}


def locked_pins(python: str, keep: set[str]) -> list[str]:
    """`name==version` at uv.lock's versions for CPython `python` on Linux x86-64, of the
    packages in keep (which may reach into the project's extras: all are exported)."""
    exported = subprocess.run([str(ROOT / ".tools/bin/uv"), "export", "--frozen", "--no-hashes", "--no-header",
                               "--no-annotate", "--no-emit-project", "--all-extras"],
                              cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines()
    environment, pins = target_environment(python), []
    for line in filter(None, exported):
        pin, _, marker = (part.strip() for part in line.partition(";"))
        if pin.split("==")[0] in keep and (not marker or Marker(marker).evaluate(environment)):
            pins.append(pin)
    return pins


def requirements(python: str, node_own: tuple[str, ...] = NODE_OWN, extras: tuple[str, ...] = (),
                 also: tuple[str, ...] = ()) -> list[str]:
    """The locked pins of the packages the node still needs (with the project's `extras`, and
    the locked packages `also` names, e.g. the tests' httpx), and the project's build
    requirements, so that it installs from the wheelhouse too."""
    keep = needed_without(node_own, roots=(PROJECT, *also), extras=extras)
    pins = locked_pins(python, keep)
    return pins + [r for r in build_requirements() if canonicalize_name(re.split("[<>=!~ ]", r)[0]) not in keep]


def build_requirements() -> list[str]:
    """The project's build backend, and wheel, which pip's build of a setup.py archive asks for.
    They travel even where the node has them: pip builds a source archive (and the project)
    in an isolated environment, which installs them, and what they need, from the wheelhouse."""
    return [*tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"], "wheel"]


def download(pip: str, python: str, listed: Path, target: Path, deps: bool = False) -> int:
    """pip download of what `listed` names (with what they need, as wheels, if deps) into
    `target`, for CPython `python` on Linux x86-64."""
    abi = "cp" + python.replace(".", "")
    command = [pip, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:" if deps else "--no-deps",
               "--prefer-binary", "--implementation", "cp", "--python-version", python,
               *(f"--abi={a}" for a in (abi, "abi3", "none")), *(f"--platform={p}" for p in PLATFORMS),
               "-r", str(listed), "-d", str(target)]
    result = subprocess.run(command)
    if result.returncode:
        print(f"wheelhouse: pip download failed (exit {result.returncode}); {listed} lists what it fetches",
              file=sys.stderr)
    return result.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="the wheelhouse folder")
    p.add_argument("--python", default="3.12", help="the node's CPython version (default: 3.12)")
    p.add_argument("--pip", default=sys.executable, help="an interpreter with pip (default: this one)")
    p.add_argument("--node-has", type=Path, metavar="FILE",
                   help="the node's `pip list --format=freeze`: leave out what it already has")
    p.add_argument("--extra", action="append", default=[], metavar="NAME",
                   help="the project's optional dependencies too (dev: to run the tests there)")
    p.add_argument("--with", dest="also", action="append", default=[], metavar="NAME",
                   help="a locked package outside those, with what it needs (httpx: some tests' client)")
    args = p.parse_args()
    listing = args.node_has.read_text() if args.node_has else ""
    node_own, versions = NODE_OWN + node_packages(listing), node_versions(listing)
    extras, also = tuple(args.extra), tuple(args.also)
    try:
        pins = requirements(args.python, node_own, extras, also)
    except ValueError as e:  # an extra or a package the lock does not have
        p.error(str(e))
    args.target.mkdir(parents=True, exist_ok=True)
    listed = args.target / "requirements.txt"
    while True:  # until every package the node keeps is at a version the wheels accept
        listed.write_text("\n".join(pins) + "\n")
        if code := download(args.pip, args.python, listed, args.target):
            return code
        wheels = sorted(args.target.glob("*.whl"))
        # The node's version of a package the wheels refuse is shadowed by the lock's, which travels;
        # never its torch and torchvision, which are what the wheelhouse is for.
        refusing = {name: why for name, why in refused(wheels, versions, args.python).items()
                    if name in node_own and name not in NODE_OWN}
        if not refusing:
            break
        for name, why in refusing.items():
            print(f"wheelhouse: the node's {name} {versions[name]} is not {why}: the lock's travels")
        node_own = tuple(name for name in node_own if name not in refusing)
        pins = requirements(args.python, node_own, extras, also)
    # What the build tools need (wheel: packaging), which an isolated build cannot take from the node.
    build = args.target / "build-requirements.txt"
    build.write_text("\n".join(build_requirements()) + "\n")
    if code := download(args.pip, args.python, build, args.target, deps=True):
        return code
    wheels = sorted(args.target.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    own = f"torch, torchvision and what {args.node_has} lists" if args.node_has else "torch and torchvision"
    print(f"wheelhouse: {len(wheels)} wheels, {size:.0f} MiB, in {args.target} (for CPython {args.python}, "
          f"Linux x86-64; {own}: the node's own)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
