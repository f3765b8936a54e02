"""The served graphs' onnxruntime sessions, on the best provider that actually works here.

onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU is present, and on a
machine without one it falls back to CPU with only an error line in the log. So CUDA is
requested only when the provider is built in *and* the NVIDIA driver sees a GPU; the
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
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

from pipeline.registry import ENCODER_NAME, MODEL_NAME, SCORE_NAME, GraphError, ModelFiles

# The smallest batch sent to the CUDA session; below it, the CPU's (see the module's note).
CUDA_FROM_BATCH = 32
MODEL_VERSION = "1"  # the version the protocol reports: one version of each model per server
IMAGE_PIXELS = 784  # what the encoder and the score graph take per image (28 x 28 grey levels)
# What the export stage records in the decoder's ONNX metadata about its latent space, for
# the page `vae serve` shows: the dimensions most used first and the spread of each (JSON
# lists), and the evaluate stage's latent map (a base64 PNG). A decoder without them works.
LATENT_ORDER, LATENT_SPREAD, LATENT_MAP = "vae.latent_order", "vae.latent_spread", "vae.latent_map_png"
# A VampPrior's mixture, for drawing z from the model's own prior: the mean and log-variance
# of q(z|u_k) at each pseudo-input u_k (JSON {"means": K x d, "logvars": K x d}). Without it,
# the prior is N(0, I).
PRIOR_MIXTURE = "vae.prior_mixture"


def cuda_usable() -> bool:
    """Whether the CUDA provider can run here: built in, and the NVIDIA driver sees a GPU. Its
    library alone is not enough: CUDA_VISIBLE_DEVICES may hide every GPU, and a container may
    have the library and no device."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)  # cuInit: 0 is CUDA_SUCCESS, 100 CUDA_ERROR_NO_DEVICE
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


# onnxruntime's names and options of the providers to try, best first.
Providers = list[str | tuple[str, dict[str, str]]]
# The CUDA provider in full float32. Its default multiplies in TF32 (10-bit mantissas): the
# decoder's images were 7.8e-5 from torch's on an H200, beyond export.tolerance (1e-5), which
# the CPU provider holds. Without TF32 every served graph computes what `vae export` checked
# against torch (benchmarks/gpu_check.py times the CUDA provider both ways).
CUDA_OPTIONS = {"use_tf32": "0"}
# What a GPU machine asks for: CUDA so, then the CPU (for what CUDA cannot run).
GPU_PROVIDERS: Providers = [("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]


def preferred_providers() -> Providers:
    if not cuda_usable():
        return ["CPUExecutionProvider"]
    # The CUDA provider's library links cuBLAS and the CUDA runtime by name, with no path to
    # where pip installs them (nvidia/cu13/lib): without them it falls back to the CPU. Importing
    # torch loads its own copies, of the same CUDA major (ONNX Runtime's docs: "Compatibility
    # with PyTorch"), found wherever torch is installed. Only where a GPU is usable: elsewhere
    # serving starts without torch.
    import torch  # noqa: F401

    return list(GPU_PROVIDERS)


def open_session(model: Path | str | bytes, providers: Providers | None = None) -> ort.InferenceSession:
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

    def distinct(self) -> list[ort.InferenceSession]:
        """Each session once: the one, or the large batches' and the CPU's."""
        return [self.large] if self.small is self.large else [self.large, self.small]

    def where(self) -> str:
        """The providers in use, in words for a log line."""
        if self.small is self.large:
            return self.large.get_providers()[0]
        return f"{self.large.get_providers()[0]} (batches under {self.from_batch} on CPUExecutionProvider)"

    def describe(self) -> dict:
        return {"providers": self.large.get_providers(),
                "cpu_below_batch": self.from_batch if self.small is not self.large else None}


class OnnxModel:
    """One served ONNX graph: its sessions (see BySize), shared by every request, and the
    Open Inference Protocol's view of it (`name`, one input `input` of `width` numbers an
    image or latent vector, its outputs by name)."""
    name = ""
    platform = "onnxruntime_onnx"
    images = False  # whether the input is images, grey levels in [0, 1] (else latent vectors)
    cost = 1  # the work of one image or latent vector, in passes through the decoder (or encoder)

    def __init__(self, model: Path | str | bytes, max_batch: int, cuda_from_batch: int = CUDA_FROM_BATCH):
        self.sessions, self.max_batch = BySize.open(model, cuda_from_batch), max_batch
        session = self.sessions.large  # both sessions hold the same graph: its names and metadata
        first = session.get_inputs()[0]
        self.input, self.width = first.name, first.shape[1]
        self.outputs = {o.name: [-1, *o.shape[1:]] for o in session.get_outputs()}
        self.recorded = session.get_modelmeta().custom_metadata_map

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for a checked feed (protocol.check_batch), on the session for its size."""
        batch = len(next(iter(feed.values())))
        return dict(zip(self.outputs, self.sessions(batch).run(list(self.outputs), feed)))

    def infer(self, batch: np.ndarray, parameters: dict) -> dict[str, np.ndarray]:
        return self.run({self.input: batch})

    def parameters(self) -> dict:
        return {"max_batch": self.max_batch, **self.sessions.describe()}

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": self.platform,
                "inputs": [{"name": self.input, "datatype": "FP32", "shape": [-1, self.width]}],
                "outputs": [{"name": name, "datatype": "FP32", "shape": shape} for name, shape in self.outputs.items()],
                "parameters": self.parameters()}


class DecoderModel(OnnxModel):
    """z (N, latent_dim) -> images (N, 1, 28, 28), and what the latent-space page needs to know."""
    name = MODEL_NAME

    def __init__(self, model: Path | str | bytes, max_batch: int, cuda_from_batch: int = CUDA_FROM_BATCH):
        super().__init__(model, max_batch, cuda_from_batch)
        (self.output,), self.latent_dim = self.outputs, self.width
        self.latent_order, self.latent_spread = latent_order(self.recorded, self.latent_dim)
        self.latent_map = base64.b64decode(self.recorded[LATENT_MAP]) if LATENT_MAP in self.recorded else None
        self.mixture = prior_mixture(self.recorded, self.latent_dim)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Images (N, 1, 28, 28) for z (N, latent_dim) FP32, checked by the caller (protocol.check_batch)."""
        return self.run({self.input: z})[self.output]

    def prior_samples(self, n: int, seed: int) -> np.ndarray:
        """n latent vectors from the model's prior, as /v1/samples.png and `vae sample` draw them
        from a seed: N(0, I), or under a VampPrior a component picked uniformly, then its Gaussian."""
        rng = np.random.default_rng(seed)
        if self.mixture is None:
            return rng.standard_normal((n, self.latent_dim), dtype=np.float32)
        means, stds = self.mixture
        pick = rng.integers(len(means), size=n)
        return means[pick] + stds[pick] * rng.standard_normal((n, self.latent_dim), dtype=np.float32)

    def parameters(self) -> dict:
        prior = "standard normal" if self.mixture is None else f"VampPrior of {len(self.mixture[0])} components"
        return {"latent_dim": self.latent_dim, "prior": prior, **super().parameters(),
                "latent_order": self.latent_order, "latent_spread": self.latent_spread,
                "latent_map": self.latent_map is not None}


class EncoderModel(OnnxModel):
    """Images x (N, 784) in [0, 1] -> mu and logvar (N, latent_dim) of q(z|x)."""
    name, images = ENCODER_NAME, True

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.run({self.input: x})
        return outputs["mu"], outputs["logvar"]

    def parameters(self) -> dict:
        return {"latent_dim": self.outputs["mu"][1], **super().parameters()}


class ScoreModel(OnnxModel):
    """Images x (N, 784) in [0, 1] -> score (N,): -L_k in nats, the importance-weighted bound
    with the graph's k samples. Its second input, the noise eps (N, k, noise_dim), is drawn
    here from a seed (score_noise), so clients send images only and a seed gives the same score."""
    name, images = SCORE_NAME, True

    def __init__(self, model: Path | str | bytes, max_batch: int, cuda_from_batch: int = CUDA_FROM_BATCH):
        super().__init__(model, max_batch, cuda_from_batch)
        (_, self.k, self.noise_dim) = self.sessions.large.get_inputs()[1].shape
        self.cost = self.k  # k decoder passes an image

    def score(self, x: np.ndarray, noise: np.random.Generator) -> np.ndarray:
        """The scores of x, with the next len(x) images' noise from `noise` (see score_noise)."""
        eps = noise.standard_normal((len(x), self.k, self.noise_dim), dtype=np.float32)
        return self.run({self.input: x, "eps": eps})["score"]

    def infer(self, batch: np.ndarray, parameters: dict) -> dict[str, np.ndarray]:
        return {"score": self.score(batch, score_noise(parameters.get("seed", 0)))}

    def parameters(self) -> dict:
        return {"k": self.k, "noise": "numpy.random.default_rng(seed).standard_normal((N, k, noise_dim)), "
                                      "seed a request parameter (default 0)", **super().parameters()}


def score_noise(seed: int) -> np.random.Generator:
    """Where a score's noise comes from: image i of a request (or of `vae encode`'s input) gets
    the i-th (k, noise_dim) block of this generator's draws, the same whatever the batch."""
    return np.random.default_rng(seed)


# What onnxruntime raises when it cannot open a graph: a file cut short, corrupted or not ONNX (or, for
# Fail, anything else it fails at); each derives from Exception alone.
UNREADABLE = (InvalidProtobuf, InvalidGraph, Fail)


def _open(kind: type[OnnxModel], graph: Path | bytes, max_batch: int) -> OnnxModel:
    """kind's model on the graph; a file onnxruntime cannot open is a GraphError naming it."""
    try:
        return kind(graph, max_batch)
    except UNREADABLE as e:
        where = graph if isinstance(graph, Path) else f"{kind.name}'s graph"
        raise GraphError(f"{where}: onnxruntime cannot open it ({e})") from None  # ORT names the cause


def open_models(files: ModelFiles, max_batch: int) -> dict[str, OnnxModel]:
    """The served models by their protocol names; an encoder or score graph whose latent or
    image size does not fit the decoder's is a LookupError (`vae serve` reports it) naming both."""
    models = {MODEL_NAME: _open(DecoderModel, files.decoder, max_batch)}
    if files.encoder is not None:
        models[ENCODER_NAME] = _open(EncoderModel, files.encoder, max_batch)
    if files.score is not None:
        models[SCORE_NAME] = _open(ScoreModel, files.score, max_batch)
    latent = models[MODEL_NAME].latent_dim
    if ENCODER_NAME in models and models[ENCODER_NAME].outputs["mu"][1] != latent:
        raise LookupError(f"the encoder's latent size {models[ENCODER_NAME].outputs['mu'][1]} is not the decoder's "
                          f"{latent}: they come from different models")
    for model in models.values():
        if model is not models[MODEL_NAME] and model.width != IMAGE_PIXELS:
            raise LookupError(f"{model.name} takes {model.width} numbers an image, not {IMAGE_PIXELS}")
    return models


def prior_mixture(recorded: dict[str, str], latent_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A VampPrior's component means and standard deviations (K, latent_dim) as export recorded
    them; None for the standard normal (or a record that does not fit this decoder, warned about)."""
    if PRIOR_MIXTURE not in recorded:
        return None
    try:
        mixture = json.loads(recorded[PRIOR_MIXTURE])
        means, logvars = (np.asarray(mixture[key], dtype=np.float32) for key in ("means", "logvars"))
        if means.ndim != 2 or means.shape[1:] != (latent_dim,) or logvars.shape != means.shape or not len(means):
            raise ValueError(f"means {means.shape} and log-variances {logvars.shape}, not (K, {latent_dim}) each")
    except (KeyError, TypeError, ValueError) as e:
        warnings.warn(f"the decoder's recorded prior mixture is unusable ({e}): N(0, I) instead", stacklevel=2)
        return None
    return means, np.exp(0.5 * logvars)


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
