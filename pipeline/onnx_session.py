"""An onnxruntime session on the best provider that actually works here.

onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU is present, and on a
machine without one it falls back to CPU with only an error line in the log. So CUDA is
requested only when the provider is built in *and* the NVIDIA driver library loads; the
providers the session really uses are what callers report.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import onnxruntime as ort


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
