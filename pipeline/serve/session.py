"""The decoder's onnxruntime session, on the best provider that actually works here.

onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU is present, and on a
machine without one it falls back to CPU with only an error line in the log. So CUDA is
requested only when the provider is built in *and* the NVIDIA driver library loads; the
providers the session really uses are what callers report.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.registry import MODEL_NAME

MODEL_VERSION = "1"  # the version the protocol reports: one model per server


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


def open_session(model: Path | str | bytes) -> ort.InferenceSession:
    """A session on a model file, or on the model's bytes (a replica on another node)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node placement warnings
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=preferred_providers())


class DecoderModel:
    """The one onnxruntime session every request shares, and what clients need to know of it."""

    def __init__(self, model: Path | str | bytes, max_batch: int):
        self.session = open_session(model)
        (model_input,), (model_output,) = self.session.get_inputs(), self.session.get_outputs()
        self.input, self.output = model_input.name, model_output.name
        self.latent_dim, self.max_batch = model_input.shape[1], max_batch

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Images (N, 1, 28, 28) for z (N, latent_dim) FP32, checked by the caller (protocol.check_z)."""
        (images,) = self.session.run([self.output], {self.input: z})
        return images

    def metadata(self) -> dict:
        return {"name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
                "inputs": [{"name": self.input, "datatype": "FP32", "shape": [-1, self.latent_dim]}],
                "outputs": [{"name": self.output, "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                "parameters": {"latent_dim": self.latent_dim, "max_batch": self.max_batch,
                               "providers": self.session.get_providers()}}
