"""Stage `export`: the decoder (z -> image), the encoder (x -> mu, logvar) and the score graph
(x, noise -> -L_k per image) to ONNX, each checked against PyTorch.

Exported with the dynamo-based exporter (torch.export + onnxscript) and a dynamic batch
dimension. onnxruntime must reproduce PyTorch's outputs on random inputs at every batch size
in `export.parity_batches` within `export.tolerance` (the score relative to its size), or the
stage fails and writes nothing. The three are registered in MLflow as one model version (see
pipeline/registry.py), written for `vae serve models/` and into the Triton repository.
"""
from __future__ import annotations

import base64
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from filelock import FileLock

from pipeline import registry, tracking
from pipeline.files import Layout, atomic_dir, atomic_path, read_json, write_json
from pipeline.params import ExportParams, ParamsError, load_params
from pipeline.serve.session import LATENT_MAP, LATENT_ORDER, LATENT_SPREAD, PRIOR_MIXTURE, UNREADABLE, BySize
from pipeline.summary import summary
from vae.model import INPUT_DIM, VAE, ImageDecoder, ImageEncoder, ImageScore

INPUT, OUTPUT = "z", "image"


# torch.onnx's warning for a second axis of the same dimension, here only where both names match.
SAME_AXIS_NAME = (r"# The axis name: (\w+) will not be used, "
                  r"since it shares the same shape constraints with another axis: \1\.")


class ExportError(RuntimeError):
    """A graph the stage cannot vouch for: not at export.opset, or one onnxruntime cannot open."""


class ParityError(ExportError):
    """onnxruntime and PyTorch disagree beyond the tolerance."""


def export_onnx(module: torch.nn.Module, examples: dict[str, torch.Tensor], batch_axes: dict[str, int],
                outputs: list[str], path: Path, opset: int) -> None:
    """module to ONNX with the dynamo exporter, its inputs named as `examples` and the batch
    axis of each (batch_axes) dynamic; traced with a batch of 2 (torch.export specialises 0 and 1)."""
    if opset > onnx.defs.onnx_opset_version():  # the exporter would warn, and write its own opset instead
        raise ParamsError(f"export.opset: {opset}: onnx {onnx.__version__} writes opsets up to "
                          f"{onnx.defs.onnx_opset_version()}")
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        # Inputs that share the batch axis (the score graph's x and eps) share its name too;
        # torch warns that the second's name "will not be used", though it is the same name.
        warnings.filterwarnings("ignore", SAME_AXIS_NAME, UserWarning)
        program = torch.onnx.export(module.eval(), tuple(examples.values()), dynamo=True, opset_version=opset,
                                    input_names=list(examples), output_names=outputs,
                                    dynamic_shapes={name: {axis: batch} for name, axis in batch_axes.items()},
                                    verbose=False)
    written = program.model.opset_imports.get("")  # the program's, not the saved file read back
    if written != opset:
        raise ExportError(f"export.opset: {opset} asked, but the exporter wrote opset {written}")
    program.save(str(path))


def export_decoder(decoder: ImageDecoder, latent_dim: int, path: Path, opset: int) -> None:
    export_onnx(decoder, {INPUT: torch.zeros(2, latent_dim)}, {INPUT: 0}, [OUTPUT], path, opset)


def export_encoder(model: VAE, path: Path, opset: int) -> None:
    """x (N, 784) in [0, 1] -> mu, logvar (N, latent_dim): ImageEncoder."""
    export_onnx(ImageEncoder(model), {"x": torch.full((2, INPUT_DIM), 0.5)}, {"x": 0}, ["mu", "logvar"], path, opset)


def export_score(model: VAE, k: int, path: Path, opset: int) -> None:
    """x (N, 784) and noise eps (N, k, noise_dim) -> score (N,), -L_k in nats: ImageScore, k fixed."""
    examples = {"x": torch.full((2, INPUT_DIM), 0.5), "eps": torch.zeros(2, k, model.config.noise_dim)}
    export_onnx(ImageScore(model), examples, {"x": 0, "eps": 0}, ["score"], path, opset)


def latent_metadata(layout: Layout) -> dict[str, str]:
    """What the decoder records of its latent space for `vae serve`'s page: the evaluate
    stage's per-dimension spread (most used first) and latent map, where they exist."""
    recorded = {}
    if layout.latent_stats.exists():
        stats = read_json(layout.latent_stats, "order", "spread")
        recorded |= {LATENT_ORDER: json.dumps(stats["order"]), LATENT_SPREAD: json.dumps(stats["spread"])}
    if layout.latent_plot.exists():
        recorded[LATENT_MAP] = base64.b64encode(layout.latent_plot.read_bytes()).decode()
    return recorded


def prior_metadata(model: VAE) -> dict[str, str]:
    """A VampPrior's mixture (q(z|u_k)'s mean and log-variance at each pseudo-input), so that
    `vae serve` and `vae sample` draw z from the model's own prior; nothing for N(0, I)."""
    if model.config.prior != "vamp":
        return {}
    with torch.no_grad():
        means, logvars = model.encoder(model.pseudo_inputs)
    return {PRIOR_MIXTURE: json.dumps({"means": means.tolist(), "logvars": logvars.tolist()})}


def record_metadata(path: Path, recorded: dict[str, str]) -> None:
    """Add key-value pairs to an ONNX model's metadata_props (onnxruntime reads them back as
    the session's custom metadata)."""
    model = onnx.load(str(path))
    for key, value in recorded.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def parity(sessions: list[ort.InferenceSession], reference, feed, params: ExportParams, name: str,
           relative: bool = False) -> dict:
    """onnxruntime against torch, on each of the sessions of one model, at every batch size of
    export.parity_batches: reference(**inputs) gives torch's outputs for feed(batch, generator)'s
    inputs. relative: the difference over max(1, |torch's value|), for outputs of hundreds of
    nats, where float32 itself carries more than export.tolerance. Raises ParityError naming
    `name` and the provider."""
    generator = torch.Generator().manual_seed(0)
    report = {"providers": [session.get_providers()[0] for session in sessions], "max_abs_diff": {}}
    for batch in params.parity_batches:
        inputs = feed(batch, generator)
        with torch.no_grad():
            expected = [t.numpy() for t in reference(**inputs)]
        for session in sessions:
            worst = _difference(session, inputs, expected, relative, f"{name}, batch {batch}")
            if worst > params.tolerance:
                raise ParityError(f"{name} on {session.get_providers()[0]}: onnxruntime differs from torch by "
                                  f"{worst:.3g}{' (relative)' * relative} at batch {batch} "
                                  f"(> export.tolerance {params.tolerance:g})")
            report["max_abs_diff"][str(batch)] = max(worst, report["max_abs_diff"].get(str(batch), 0.0))
    worst = max(report["max_abs_diff"].values())
    # A relative check says so in the report: its "abs" figures are then over max(1, |value|).
    return {**report, "worst_abs_diff": worst, **({"relative_to_size": True} if relative else {})}


def _difference(session: ort.InferenceSession, inputs: dict[str, torch.Tensor], expected: list[np.ndarray],
                relative: bool, what: str) -> float:
    """The largest |onnxruntime - torch| of the session's outputs (over max(1, |torch|) if relative)."""
    actual = session.run(None, {key: value.numpy() for key, value in inputs.items()})
    worst = 0.0
    for got, want in zip(actual, expected):
        if got.shape != want.shape:
            raise ParityError(f"{what}: onnxruntime output shape {got.shape}, torch {want.shape}")
        scale = np.maximum(1.0, np.abs(want)) if relative else 1.0
        worst = max(worst, float((np.abs(got - want) / scale).max()))
    return worst


def served_sessions(path: Path, name: str = "the graph") -> list[ort.InferenceSession]:
    """The sessions `vae serve` opens on the model: where a GPU is usable, the CUDA provider's
    (large batches) and the CPU's (small ones), each checked; elsewhere the CPU's."""
    try:
        return BySize.open(path).distinct()
    except UNREADABLE as e:  # a newer opset than it runs, say: its words say which
        raise ExportError(f"onnxruntime {ort.__version__} cannot open {name} as exported: "
                          f"{' '.join(str(e).split())}") from None


def check_parity(decoder: ImageDecoder, latent_dim: int, path: Path, params: ExportParams) -> dict:
    return parity(served_sessions(path, "the decoder"), lambda z: [decoder(z)],
                  lambda n, g: {INPUT: torch.randn(n, latent_dim, generator=g)}, params, "the decoder")


def check_encoder_and_score(model: VAE, encoder_path: Path, score_path: Path, params: ExportParams) -> dict:
    """Both graphs against torch, on random grey images and (for the score) noise."""
    def images(n, g):
        return {"x": torch.rand(n, INPUT_DIM, generator=g)}

    def images_and_noise(n, g):
        return {**images(n, g), "eps": torch.randn(n, params.score_k, model.config.noise_dim, generator=g)}

    encoder, score = ImageEncoder(model).eval(), ImageScore(model).eval()
    return {"encoder": parity(served_sessions(encoder_path, "the encoder"), lambda x: list(encoder(x)), images,
                              params, "the encoder"),
            "score": parity(served_sessions(score_path, "the score"), lambda x, eps: [score(x, eps)],
                            images_and_noise, params, "the score", relative=True)}


# Triton's dims leave out the batch dimension, which max_batch_size makes dynamic.
TRITON_CONFIG = """name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [ {inputs} ]
output [ {outputs} ]
dynamic_batching {{ }}
"""


def triton_tensors(tensors: dict[str, list[int]]) -> str:
    """Triton's tensor list; a per-image scalar is [1] reshaped to []."""
    return ", ".join(f'{{ name: "{name}", data_type: TYPE_FP32, dims: [ {", ".join(map(str, dims or [1]))} ]'
                     f'{" reshape: { shape: [ ] }" if not dims else ""} }}' for name, dims in tensors.items())


def write_triton_repo(repo: Path, models: dict[str, tuple[Path, dict, dict]], max_batch: int) -> None:
    """A Triton / KServe model repository: <repo>/<name>/{config.pbtxt, 1/model.onnx} for each
    name: (ONNX file, {input: dims}, {output: dims}), dims without the batch."""
    with atomic_dir(repo) as tmp:
        for name, (onnx_path, inputs, outputs) in models.items():
            version = tmp / name / "1"
            version.mkdir(parents=True)
            shutil.copyfile(onnx_path, version / "model.onnx")
            (tmp / name / "config.pbtxt").write_text(TRITON_CONFIG.format(
                name=name, max_batch=max_batch, inputs=triton_tensors(inputs), outputs=triton_tensors(outputs)))


def export_encoder_and_score(model: VAE, layout: Layout, params: ExportParams) -> dict:
    """models/encoder.onnx and models/score.onnx, each written only if it matches torch."""
    with atomic_path(layout.encoder_onnx) as encoder_tmp, atomic_path(layout.score_onnx) as score_tmp:
        export_encoder(model, encoder_tmp, params.opset)
        export_score(model, params.score_k, score_tmp, params.opset)
        return check_encoder_and_score(model, encoder_tmp, score_tmp, params)


def main() -> None:
    layout, params = Layout(), load_params()
    client, run_id = tracking.open_run(layout)
    with tracking.failing_marks(client, run_id):
        model = VAE.load(layout.model)
        # Read first: what decides the champion must be there before any graph is written.
        neg_elbo = read_json(layout.eval_metrics, "neg_elbo")["neg_elbo"]
        decoder, latent_dim = ImageDecoder(model), model.config.latent_dim
        with atomic_path(layout.decoder_onnx) as tmp:
            export_decoder(decoder, latent_dim, tmp, params.export.opset)
            record_metadata(tmp, latent_metadata(layout) | prior_metadata(model))
            report = check_parity(decoder, latent_dim, tmp, params.export)
            # Inside: should either graph fail its check, the new decoder is not written either.
            graphs = export_encoder_and_score(model, layout, params.export)
        noise, latent = [params.export.score_k, model.config.noise_dim], [latent_dim]
        write_triton_repo(layout.triton_repo, {
            registry.MODEL_NAME: (layout.decoder_onnx, {INPUT: latent}, {OUTPUT: [1, 28, 28]}),
            registry.ENCODER_NAME: (layout.encoder_onnx, {"x": [INPUT_DIM]}, {"mu": latent, "logvar": latent}),
            registry.SCORE_NAME: (layout.score_onnx, {"x": [INPUT_DIM], "eps": noise}, {"score": []}),
        }, params.export.triton_max_batch)
        report.update(opset=params.export.opset, latent_dim=latent_dim, score_k=params.export.score_k, **graphs)
        write_json(layout.export_metrics, report)
        tracking.log_metrics(client, run_id, {"export_worst_abs_diff": report["worst_abs_diff"]})
        z = np.zeros((1, latent_dim), dtype=np.float32)
        with torch.no_grad():
            images = decoder(torch.from_numpy(z)).numpy()
        # Experiments exporting at once: each compares with the champion and moves it in turn.
        with FileLock(layout.registry_lock):
            version = registry.log_graphs(layout, run_id, z, images)
            champion = registry.promote(client, version, neg_elbo)
        for path in (layout.export_metrics, layout.root / "params.yaml", layout.root / "dvc.lock"):
            if path.is_file():  # dvc.lock is absent when the stage runs outside DVC
                client.log_artifact(run_id, str(path), "pipeline")
    print(f"export: {layout.decoder_onnx} (opset {params.export.opset}, dynamic batch); onnxruntime "
          f"{' and '.join(report['providers'])} matches torch within {report['worst_abs_diff']:.2g}; registered "
          f"{registry.MODEL_NAME} version {version}"
          f"{' as champion' if champion else ' (champion unchanged)'}", flush=True)
    print(summary(layout), flush=True)  # the last stage: tell the user where everything is
