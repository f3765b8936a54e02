"""The model on a GPU, with nothing but torch, onnx and onnxruntime (no Ray, MLflow or DVC).

    python benchmarks/gpu_check.py --data data/mnist              # on a CUDA machine
    python benchmarks/gpu_check.py --data data/mnist --device cpu --epochs 1 --steps 5 --iwae-k 2 --test-images 100

It imports only vae/ (the maths of training lives there) and, in order:
 1. trains the same initial model for a few steps on the CPU and on the device, from the
    same data and noise, and checks that the losses agree within --tolerance (relative);
 2. trains the default model (params.yaml's: 784-512-256-32) for --epochs epochs on the
    device in fp32, then with bf16 autocast, timing each epoch;
 3. runs the importance-weighted estimate of log p(x) on the test images on the device;
 4. exports the decoder to ONNX and checks onnxruntime (CPU) against torch;
and prints one table: seconds per epoch, images per second, evaluation time, the checks.
Exits non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vae.data import DataError, load_split, to_float  # noqa: E402
from vae.model import VAE, ImageDecoder, VAEConfig  # noqa: E402
from vae.objectives import iwae_log_lik  # noqa: E402
from vae.training import TrainConfig, Trainer  # noqa: E402

MODEL = VAEConfig()  # params.yaml's model
# params.yaml's train section, the default model's recipe.
RECIPE = TrainConfig(seed=0, epochs=30, batch_size=128, lr=2e-3, lr_schedule="onecycle", iwae_k=1, dreg=False,
                     binarize=False, bf16=False)


def make_trainer(device: torch.device, images: int, config: TrainConfig) -> Trainer:
    torch.manual_seed(config.seed)  # the same initial weights on every device
    model = VAE(MODEL).to(device)
    return Trainer.create(model, config, train_images=images, device=device)


def first_steps(train: torch.Tensor, device: torch.device, steps: int) -> list[tuple[float, float]]:
    """(CPU loss, device loss) of the first `steps` steps, from the same weights, data and noise."""
    losses = []
    for where in (torch.device("cpu"), device):
        trainer = make_trainer(where, len(train), RECIPE)
        images = train[: steps * RECIPE.batch_size].to(where)
        step_losses = []
        for step in range(steps):
            x = to_float(images[step * RECIPE.batch_size:(step + 1) * RECIPE.batch_size])
            eps = torch.randn((1, len(x), MODEL.noise_dim), generator=torch.Generator().manual_seed(step)).to(where)
            step_losses.append(trainer.step(x, eps, len(x))["loss"].mean().item())
        losses.append(step_losses)
    return list(zip(*losses))


def timed_epochs(train: torch.Tensor, device: torch.device, epochs: int, steps: int | None,
                 bf16: bool) -> tuple[VAE, list[float]]:
    images = train[: steps * RECIPE.batch_size] if steps else train
    trainer = make_trainer(device, len(images), replace(RECIPE, epochs=epochs, bf16=bf16))
    images, seconds = images.to(device), []
    for epoch in range(epochs):
        synchronize(device)
        start = time.perf_counter()
        trainer.epoch(images, epoch)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return trainer.model, seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def evaluate(model: VAE, test: torch.Tensor, device: torch.device, k: int) -> tuple[float, float]:
    """(mean -log p(x) in nats, seconds) of the importance-weighted estimate with k samples."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    x = to_float(test).to(device)
    synchronize(device)
    start = time.perf_counter()
    nll = -torch.cat([iwae_log_lik(model, batch, k, generator, chunk=256) for batch in x.split(1000)]).mean().item()
    synchronize(device)
    return nll, time.perf_counter() - start


def onnx_parity(model: VAE) -> float:
    """max |onnxruntime - torch| of the exported decoder on random z, batches 1 and 256."""
    import onnxruntime as ort

    decoder = ImageDecoder(model.cpu().float()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decoder.onnx"
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(decoder, (torch.zeros(2, MODEL.latent_dim),), dynamo=True, opset_version=18,
                          input_names=["z"], output_names=["image"], dynamic_shapes={"z": {0: batch}},
                          verbose=False).save(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst = 0.0
        for n in (1, 256):
            z = torch.randn(n, MODEL.latent_dim, generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                expected = decoder(z).numpy()
            worst = max(worst, float(np.abs(session.run(None, {"z": z.numpy()})[0] - expected).max()))
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "mnist", help="the four MNIST IDX files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (default: whole epochs)")
    p.add_argument("--compare-steps", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=1e-3, help="relative, CPU against device losses")
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=10_000)
    args = p.parse_args()
    device = torch.device(args.device)
    try:
        train, _ = load_split(args.data, "train")
        test = load_split(args.data, "test")[0][: args.test_images]
    except DataError as e:
        sys.exit(f"gpu_check: {e} (`vae fetch` or `dvc repro fetch` writes data/mnist)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, {len(train)} training images")

    pairs = first_steps(train, device, args.compare_steps)
    drift = max(abs(a - b) / abs(a) for a, b in pairs)
    rows = [("first steps, CPU vs device (max rel. diff)", f"{drift:.2e}", "ok" if drift <= args.tolerance else "FAIL")]
    model = None
    for bf16 in (False, True):
        model, seconds = timed_epochs(train, device, args.epochs, args.steps, bf16)
        images = (args.steps * RECIPE.batch_size) if args.steps else len(train)
        best = min(seconds[1:] or seconds)  # the first epoch warms up
        rows.append((f"train {'bf16 autocast' if bf16 else 'fp32'}: s/epoch (best of {len(seconds)})",
                     f"{best:.3f}", f"{images / best:,.0f} img/s"))
    nll, seconds = evaluate(model, test, device, args.iwae_k)
    rows.append((f"IWAE k={args.iwae_k} on {len(test)} test images", f"{seconds:.2f} s", f"NLL {nll:.2f} nats"))
    worst = onnx_parity(model)
    rows.append(("ONNX decoder vs torch (max abs diff)", f"{worst:.2e}", "ok" if worst <= 1e-5 else "FAIL"))
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'check'.ljust(width)} | value | result |\n| {'-' * width} | --- | --- |")
    for row in rows:
        print(f"| {row[0].ljust(width)} | {row[1]} | {row[2]} |")
    return 1 if any(r[2] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
