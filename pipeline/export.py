"""Stage `export`: the decoder alone (z -> image) to ONNX, checked against PyTorch.

Exported with the dynamo-based exporter (torch.export + onnxscript) and a dynamic batch
dimension. onnxruntime must reproduce PyTorch's output on random z at every batch size in
`export.parity_batches` within `export.tolerance`, or the stage fails and writes nothing.
"""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from filelock import FileLock

from pipeline import registry, tracking
from pipeline.files import Layout, atomic_dir, atomic_path, write_json
from pipeline.params import ExportParams, load_params
from pipeline.serve.session import LATENT_MAP, LATENT_ORDER, LATENT_SPREAD, open_session
from pipeline.summary import summary
from vae.model import INPUT_DIM, VAE, ImageDecoder, ImageEncoder, ImageScore

INPUT, OUTPUT = "z", "image"


class ParityError(RuntimeError):
    """onnxruntime and PyTorch disagree beyond the tolerance."""


def export_onnx(module: torch.nn.Module, examples: dict[str, torch.Tensor], batch_axes: dict[str, int],
                outputs: list[str], path: Path, opset: int) -> None:
    """module to ONNX with the dynamo exporter, its inputs named as `examples` and the batch
    axis of each (batch_axes) dynamic; traced with a batch of 2 (torch.export specialises 0 and 1)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(module.eval(), tuple(examples.values()), dynamo=True, opset_version=opset,
                                input_names=list(examples), output_names=outputs,
                                dynamic_shapes={name: {axis: batch} for name, axis in batch_axes.items()},
                                verbose=False)
    program.save(str(path))


def export_decoder(decoder: ImageDecoder, latent_dim: int, path: Path, opset: int) -> None:
    export_onnx(decoder, {INPUT: torch.zeros(2, latent_dim)}, {INPUT: 0}, [OUTPUT], path, opset)


def export_encoder(model: VAE, path: Path, opset: int) -> None:
    """x (N, 784) in [0, 1] -> mu, logvar (N, latent_dim): ImageEncoder."""
    export_onnx(ImageEncoder(model), {"x": torch.full((2, INPUT_DIM), 0.5)}, {"x": 0}, ["mu", "logvar"], path, opset)


def export_score(model: VAE, k: int, path: Path, opset: int) -> None:
    """x (N, 784) and noise eps (k, N, noise_dim) -> score (N,), -L_k in nats: ImageScore, k fixed."""
    examples = {"x": torch.full((2, INPUT_DIM), 0.5), "eps": torch.zeros(k, 2, model.config.noise_dim)}
    export_onnx(ImageScore(model), examples, {"x": 0, "eps": 1}, ["score"], path, opset)


def latent_metadata(layout: Layout) -> dict[str, str]:
    """What the decoder records of its latent space for `vae serve`'s page: the evaluate
    stage's per-dimension spread (most used first) and latent map, where they exist."""
    recorded = {}
    if layout.latent_stats.exists():
        stats = json.loads(layout.latent_stats.read_text())
        recorded |= {LATENT_ORDER: json.dumps(stats["order"]), LATENT_SPREAD: json.dumps(stats["spread"])}
    if layout.latent_plot.exists():
        recorded[LATENT_MAP] = base64.b64encode(layout.latent_plot.read_bytes()).decode()
    return recorded


def record_metadata(path: Path, recorded: dict[str, str]) -> None:
    """Add key-value pairs to an ONNX model's metadata_props (onnxruntime reads them back as
    the session's custom metadata)."""
    model = onnx.load(str(path))
    for key, value in recorded.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def check_parity(decoder: ImageDecoder, latent_dim: int, path: Path, params: ExportParams) -> dict:
    session = open_session(path)
    generator = torch.Generator().manual_seed(0)
    report = {"providers": session.get_providers(), "max_abs_diff": {}}
    for batch in params.parity_batches:
        z = torch.randn(batch, latent_dim, generator=generator)
        with torch.no_grad():
            expected = decoder(z).numpy()
        (actual,) = session.run([OUTPUT], {INPUT: z.numpy()})
        if actual.shape != expected.shape:
            raise ParityError(f"batch {batch}: onnxruntime output shape {actual.shape}, torch {expected.shape}")
        report["max_abs_diff"][str(batch)] = float(np.abs(actual - expected).max())
    worst = max(report["max_abs_diff"].values())
    if worst > params.tolerance:
        raise ParityError(f"onnxruntime differs from torch by {worst:.3g} (> export.tolerance "
                          f"{params.tolerance:g}): {report['max_abs_diff']}")
    return {**report, "worst_abs_diff": worst}


TRITON_CONFIG = """name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [ {{ name: "{input}", data_type: TYPE_FP32, dims: [ {latent_dim} ] }} ]
output [ {{ name: "{output}", data_type: TYPE_FP32, dims: [ 1, 28, 28 ] }} ]
dynamic_batching {{ }}
"""


def write_triton_repo(repo: Path, onnx_path: Path, latent_dim: int, max_batch: int) -> None:
    """A Triton / KServe model repository: <repo>/vae-decoder/{config.pbtxt, 1/model.onnx}.
    Triton's dims leave out the batch dimension, which max_batch_size makes dynamic."""
    with atomic_dir(repo) as tmp:
        version = tmp / registry.MODEL_NAME / "1"
        version.mkdir(parents=True)
        shutil.copyfile(onnx_path, version / "model.onnx")
        (tmp / registry.MODEL_NAME / "config.pbtxt").write_text(TRITON_CONFIG.format(
            name=registry.MODEL_NAME, max_batch=max_batch, input=INPUT, output=OUTPUT, latent_dim=latent_dim))


def main() -> None:
    layout, params = Layout(), load_params()
    client, run_id = tracking.open_run(layout)
    with tracking.failing_marks(client, run_id):
        model = VAE.load(layout.model)
        decoder, latent_dim = ImageDecoder(model), model.config.latent_dim
        with atomic_path(layout.decoder_onnx) as tmp:
            export_decoder(decoder, latent_dim, tmp, params.export.opset)
            record_metadata(tmp, latent_metadata(layout))
            report = check_parity(decoder, latent_dim, tmp, params.export)
        write_triton_repo(layout.triton_repo, layout.decoder_onnx, latent_dim, params.export.triton_max_batch)
        report.update(opset=params.export.opset, latent_dim=latent_dim)
        write_json(layout.export_metrics, report)
        tracking.log_metrics(client, run_id, {"export_worst_abs_diff": report["worst_abs_diff"]})
        z = np.zeros((1, latent_dim), dtype=np.float32)
        with torch.no_grad():
            images = decoder(torch.from_numpy(z)).numpy()
        neg_elbo = json.loads(layout.eval_metrics.read_text())["neg_elbo"]
        # Experiments exporting at once: each compares with the champion and moves it in turn.
        with FileLock(layout.registry_lock):
            version = registry.log_decoder(layout, run_id, layout.decoder_onnx, z, images)
            champion = registry.promote(client, version, neg_elbo)
        for path in (layout.export_metrics, layout.root / "params.yaml", layout.root / "dvc.lock"):
            if path.is_file():  # dvc.lock is absent when the stage runs outside DVC
                client.log_artifact(run_id, str(path), "pipeline")
    print(f"export: {layout.decoder_onnx} (opset {params.export.opset}, dynamic batch); onnxruntime "
          f"{report['providers'][0]} matches torch within {report['worst_abs_diff']:.2g}; registered "
          f"{registry.MODEL_NAME} version {version}"
          f"{' as champion' if champion else ' (champion unchanged)'}", flush=True)
    print(summary(layout), flush=True)  # the last stage: tell the user where everything is
