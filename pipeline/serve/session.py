"""The decoder's onnxruntime sessions, on the best provider that actually works here.

onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU is present, and on a
machine without one it falls back to CPU with only an error line in the log. So CUDA is
requested only when the provider is built in *and* the NVIDIA driver library loads; the
providers the sessions really use are what callers report.

With a GPU, small batches still go to a CPU session: a batch of one decoded in 0.034 ms on
the CPU provider and 0.081 ms on CUDA (H200, 16 cores), while 1,024 went 3.7x faster on CUDA.
Both costs grow about linearly with the batch, and the lines cross near 32 images.
"""
from __future__ import annotations

import base64
import ctypes
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.registry import MODEL_NAME

# The smallest batch sent to the CUDA session; below it, the CPU's (see the module's note).
CUDA_FROM_BATCH = 32
MODEL_VERSION = "1"  # the version the protocol reports: one model per server
# What the export stage records in the decoder's ONNX metadata about its latent space, for
# the page `vae serve` shows: the dimensions most used first and the spread of each (JSON
# lists), and the evaluate stage's latent map (a base64 PNG). A decoder without them works.
LATENT_ORDER, LATENT_SPREAD, LATENT_MAP = "vae.latent_order", "vae.latent_spread", "vae.latent_map_png"


def cuda_usable() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")  # the driver: present only where a GPU can be used
    except OSError:
        return False
    return True


def preferred_providers() -> list[str]:
    return (["CUDAExecutionProvider"] if cuda_usable() else []) + ["CPUExecutionProvider"]


def open_session(model: Path | str | bytes, providers: list[str] | None = None) -> ort.InferenceSession:
    """A session on a model file, or on the model's bytes (a replica on another node)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node placement warnings
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers or preferred_providers())


class BySize:
    """A session for small batches and one for large: the CPU's below `from_batch` when the
    other runs on CUDA (the CPU answers a few images faster), else the one session for all."""

    def __init__(self, large: ort.InferenceSession, small: ort.InferenceSession | None, from_batch: int):
        self.large, self.small, self.from_batch = large, small or large, from_batch

    def __call__(self, batch: int) -> ort.InferenceSession:
        return self.large if batch >= self.from_batch else self.small

    @classmethod
    def open(cls, model: Path | str | bytes, from_batch: int = CUDA_FROM_BATCH) -> "BySize":
        large = open_session(model)
        on_cuda = large.get_providers()[0] == "CUDAExecutionProvider"
        return cls(large, open_session(model, ["CPUExecutionProvider"]) if on_cuda else None, from_batch)

    def describe(self) -> dict:
        return {"providers": self.large.get_providers(),
                "cpu_below_batch": self.from_batch if self.small is not self.large else None}


class DecoderModel:
    """The onnxruntime sessions every request shares (see BySize), and what clients need to know of them."""

    def __init__(self, model: Path | str | bytes, max_batch: int, cuda_from_batch: int = CUDA_FROM_BATCH):
        self.sessions = BySize.open(model, cuda_from_batch)
        session = self.sessions.large  # both sessions hold the same graph: its names and metadata
        (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
        self.input, self.output = model_input.name, model_output.name
        self.latent_dim, self.max_batch = model_input.shape[1], max_batch
        recorded = session.get_modelmeta().custom_metadata_map
        self.latent_order, self.latent_spread = latent_order(recorded, self.latent_dim)
        self.latent_map = base64.b64decode(recorded[LATENT_MAP]) if LATENT_MAP in recorded else None

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Images (N, 1, 28, 28) for z (N, latent_dim) FP32, checked by the caller (protocol.check_z)."""
        (images,) = self.sessions(len(z)).run([self.output], {self.input: z})
        return images

    def metadata(self) -> dict:
        return {"name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
                "inputs": [{"name": self.input, "datatype": "FP32", "shape": [-1, self.latent_dim]}],
                "outputs": [{"name": self.output, "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                "parameters": {"latent_dim": self.latent_dim, "max_batch": self.max_batch,
                               **self.sessions.describe(), "latent_order": self.latent_order,
                               "latent_spread": self.latent_spread, "latent_map": self.latent_map is not None}}


def latent_order(recorded: dict[str, str], latent_dim: int) -> tuple[list[int], list[float] | None]:
    """The dimensions most used first and each one's spread, as export recorded them; index
    order and no spread for a decoder exported without them (or with a record that does
    not fit this decoder, which is warned about)."""
    if LATENT_ORDER not in recorded:
        return list(range(latent_dim)), None
    try:
        order, spread = json.loads(recorded[LATENT_ORDER]), [float(s) for s in json.loads(recorded[LATENT_SPREAD])]
        if sorted(order) != list(range(latent_dim)) or len(spread) != latent_dim:
            raise ValueError(f"not an order of {latent_dim} dimensions with a spread each")
    except (KeyError, TypeError, ValueError) as e:
        warnings.warn(f"the decoder's recorded latent order is unusable ({e}): index order instead", stacklevel=2)
        return list(range(latent_dim)), None
    return order, spread
