"""MNIST in its canonical form: the four official IDX files, read, written and checked.

IDX layout (big-endian): int32 magic 0x00000803 (images) or 0x00000801 (labels), then one
int32 per dimension, then the uint8 payload. The checksums below are the identity of the
data set: whatever the source, the files must end up with exactly these bytes.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801
IMAGE_SIDE = 28


@dataclass(frozen=True)
class IdxFile:
    name: str
    size: int
    md5: str
    sha256: str


MNIST_FILES = {
    f.name: f
    for f in [
        IdxFile("train-images-idx3-ubyte", 47040016, "6bbc9ace898e44ae57da46a324031adb",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        IdxFile("train-labels-idx1-ubyte", 60008, "a25bea736e30d166cdddb491f175f624",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        IdxFile("t10k-images-idx3-ubyte", 7840016, "2646ac647ad5339dbf082846283269ea",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        IdxFile("t10k-labels-idx1-ubyte", 10008, "27ae3e4e09519cfbb04c329615203637",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ]
}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DataError(ValueError):
    """A data file is missing, malformed or not the bytes it should be."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_file(path: Path, expected: IdxFile | None = None) -> None:
    """Raise DataError unless `path` holds exactly the official bytes of its file."""
    path = Path(path)
    expected = expected or MNIST_FILES[path.name]
    if not path.is_file():
        raise DataError(f"{path}: missing (expected {expected.name}, sha256 {expected.sha256})")
    actual = sha256_file(path)
    if actual != expected.sha256:
        raise DataError(f"{path}: checksum mismatch for {expected.name}: "
                        f"expected sha256 {expected.sha256}, got {actual} "
                        f"({path.stat().st_size} bytes, expected {expected.size})")


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array: 1-D labels or (N, 28, 28) images."""
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise DataError(f"IDX holds uint8 labels (N,) or images (N, H, W), got {array.dtype} {array.shape}")
    magic = LABEL_MAGIC if array.ndim == 1 else IMAGE_MAGIC
    header = struct.pack(f">{1 + array.ndim}i", magic, *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def decode_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes, checking the magic number and that the payload matches the header."""
    if len(raw) < 8:
        raise DataError(f"{name}: truncated: {len(raw)} bytes is shorter than an IDX header")
    magic, n = struct.unpack(">2i", raw[:8])
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise DataError(f"{name}: not an MNIST IDX file: magic number {magic:#010x}, "
                        f"expected {IMAGE_MAGIC:#010x} (images) or {LABEL_MAGIC:#010x} (labels)")
    shape = (n,)
    if magic == IMAGE_MAGIC:
        if len(raw) < 16:
            raise DataError(f"{name}: truncated: {len(raw)} bytes is shorter than an image header")
        shape = (n, *struct.unpack(">2i", raw[8:16]))
    offset = 4 * (1 + len(shape))
    expected = offset + int(np.prod(shape))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{name}: {kind}: {len(raw)} bytes, header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    path = Path(path)
    return decode_idx(path.read_bytes(), str(path))


def load_split(data_dir: Path, split: str, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the 'train' or 'test' split."""
    image_name, label_name = SPLIT_FILES[split]
    paths = [Path(data_dir) / image_name, Path(data_dir) / label_name]
    if verify:
        for path in paths:
            verify_file(path)
    images, labels = (read_idx(p) for p in paths)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(images) != len(labels):
        raise DataError(f"{data_dir}: {split} images {images.shape} do not match labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 784) in [0, 1], the model's input and target."""
    return images.reshape(len(images), -1).float().div_(255.0)
