"""The GPU table: the model's training, evaluation and decoding on one GPU, side by side in one
run, with nothing but torch, onnx and onnxruntime (a GPU node has no Ray, MLflow or DVC).

    python benchmarks/gpu_check.py --data data/mnist                 # on a CUDA machine
    python benchmarks/gpu_check.py --data data/mnist --device cpu --quick   # every row, small, on a CPU
    python benchmarks/gpu_check.py --data data/mnist --only decoding       # one section (see --help)

It imports only vae/ (the maths of training lives there) and measures:
 1. the first steps on the CPU and on the device from the same weights, data and noise (their
    losses agree within --tolerance; a GPU only: on a CPU that is the CPU against itself);
 2. for the default model and the paper preset: the pipeline's epoch (training, as one Ray
    worker runs it: on a GPU vae/cuda_graph.py's draws, replays and schedule; then validation)
    against the floor, the captured step replayed alone on unchanged buffers (on a GPU also
    with torch's single-tensor Adam, which vae/graph_adam.py replaces), and the eager step in
    fp32 and with bf16 autocast; the graph's model against the eager fp32 one (their
    validation -ELBO within 0.1%: the same draws and recipe, launched differently);
 3. the default recipe's 30 epochs, in seconds of training;
 4. the importance-weighted estimate L_k (k=5000) on the test images, in seconds, with the
    evaluate stage's noise on a GPU (each image's from its block of images: vae/rng.py);
 5. the exported decoder on each onnxruntime provider: its parity with torch and decode
    throughput at each batch size, with inputs and outputs in host memory and, on CUDA, bound
    on the device (I/O binding); CUDA with TF32 off, as `vae serve` runs it, and on.
Prints each row as it comes, then one table, and exits non-zero when a check fails. A section
that raises (a capture that fails, say) becomes one FAIL row naming the error; the rest still run.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vae import rng  # noqa: E402
from vae.cuda_graph import GraphedTrainer  # noqa: E402
from vae.data import DataError, load_split, to_float  # noqa: E402
from vae.graph_adam import GraphAdam  # noqa: E402
from vae.model import VAE, ImageDecoder, VAEConfig  # noqa: E402
from vae.objectives import iwae_log_lik  # noqa: E402
from vae.training import TrainConfig, Trainer, learning_rate_schedule, validate, validation_set  # noqa: E402

# params.yaml's model and train section, and the README's paper preset (784-512-256-50 SiLU,
# dynamically binarised, IWAE k=5 with DReG, 250 epochs).
DEFAULT = (VAEConfig(), TrainConfig(seed=0, epochs=30, batch_size=128, lr=2e-3, lr_schedule="onecycle", iwae_k=1,
                                    dreg=False, binarize=False, bf16=False, kl_warmup_epochs=0))
PAPER = (VAEConfig(latent_dim=50, activation="silu"),
         replace(DEFAULT[1], epochs=250, iwae_k=5, dreg=True, binarize=True))
VAL_SIZE = 10_000  # params.yaml's data.val_size: the last 10,000 of the 60,000 are validation
# What --only picks from, in the order they run.
SECTIONS = ("first-steps", "training", "recipe", "evaluation", "decoding")
# onnxruntime's CUDA provider multiplies in TF32 by default (10-bit mantissas): 7.8e-5 from torch
# on an H200, where the CPU provider is within 1e-7. `vae serve` turns TF32 off, which must hold
# export.tolerance itself; TF32's rows show what that costs.
TF32_TOLERANCE = 1e-3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class TorchsAdam(GraphAdam):
    """What GraphAdam replaces, for the floor's comparison: torch's own capturable update (its
    single-tensor one: the foreach one cannot be captured with beta1 in a tensor). torch runs it
    on accelerators only."""

    def step(self, closure=None):
        return torch.optim.Adam.step(self, closure)


class Run:
    """One preset's model and trainer on the device, eager or as vae/cuda_graph.py runs it."""

    def __init__(self, preset, images: torch.Tensor, val: torch.Tensor, device: torch.device, epochs: int,
                 graphed: bool, bf16: bool = False, adam: type[GraphAdam] = GraphAdam):
        model_config, config = preset
        self.config = replace(config, epochs=epochs, bf16=bf16)
        torch.manual_seed(self.config.seed)  # the same initial weights on every device
        self.model = VAE(model_config).to(device)
        self.trainer = Trainer.create(self.model, self.config, len(images), capturable=graphed, device=device)
        if adam is not GraphAdam:
            self.trainer.optimizer = adam(self.model.parameters(), lr=self.config.lr)
            self.trainer.schedule = learning_rate_schedule(self.trainer.optimizer, self.config, len(images))
        self.images, self.device = images.to(device), device
        self.graphed = GraphedTrainer(self.trainer, self.images) if graphed else None
        x, eps = validation_set(val, self.config.seed, model_config.noise_dim, self.config.binarize)
        self.validation = (x.to(device), eps.to(device))

    def epoch(self, epoch: int) -> dict:
        """As pipeline/train_worker.py's run_epoch: train, then validate."""
        train = self.graphed.epoch(epoch) if self.graphed else self.trainer.epoch(self.images, epoch)
        return {**train, "val": validate(self.model, *self.validation, self.device)["neg_elbo"]}

    def epoch_seconds(self) -> list[float]:
        """Each epoch's seconds; self.last, the last epoch's figures."""
        seconds = []
        for epoch in range(self.config.epochs):
            seconds.append(timed(lambda e=epoch: setattr(self, "last", self.epoch(e)), self.device))
        return seconds

    def floor_seconds(self) -> float:
        """An epoch's worth of full-batch steps, each the captured step replayed alone."""
        step = self.graphed.steps[min(self.config.batch_size, len(self.images))]
        steps = math.ceil(len(self.images) / self.config.batch_size)

        def replays():
            for _ in range(steps):
                step.replay()
        return min(timed(replays, self.device) for _ in range(2))


def attempted(section: str, make_rows) -> list[tuple[str, str, str]]:
    """make_rows(), or one FAIL row naming its error: a GPU node's time is dear, so an error
    costs these rows only."""
    try:
        return make_rows()
    except Exception as e:
        traceback.print_exc()
        return [(section, "error", f"FAIL: {type(e).__name__}: {e}"[:300])]


def guarded(rows: list, section: str, make_rows) -> None:
    """rows += attempted(section, make_rows), each printed as it comes (a run cut short still
    shows them)."""
    made = attempted(section, make_rows)
    for row in made:
        print(" | ".join(row), flush=True)
    rows += made


def first_steps_row(train: torch.Tensor, device: torch.device, args) -> tuple[str, str, str]:
    drift = max(abs(a - b) / abs(a) for a, b in first_steps(train, device, args.compare_steps))
    return "first steps, CPU vs device (max rel. diff)", f"{drift:.2e}", "ok" if drift <= args.tolerance else "FAIL"


def recipe_row(train, val, device: torch.device, epochs: int, trained: list) -> tuple[str, str, str]:
    """The default recipe's whole run, graphed on a GPU; its model appended to `trained`."""
    start = time.perf_counter()
    full = Run(DEFAULT, train, val, device, epochs, graphed=True)  # on a GPU, captures
    setup = time.perf_counter() - start
    seconds = full.epoch_seconds()
    trained.append(full.model)
    return (f"default recipe, {epochs} epochs: training s (+ set-up and capture)",
            f"{sum(seconds):.1f} (+ {setup:.1f})", f"validation -ELBO {full.last['val']:.2f}")


def first_steps(train: torch.Tensor, device: torch.device, steps: int) -> list[tuple[float, float]]:
    """(CPU loss, device loss) of the first `steps` steps, from the same weights, data and noise."""
    model_config, config = DEFAULT
    losses = []
    for where in (torch.device("cpu"), device):
        torch.manual_seed(config.seed)
        trainer = Trainer.create(VAE(model_config).to(where), config, len(train), device=where)
        step_losses = []
        for step in range(steps):
            x = to_float(train[step * config.batch_size:(step + 1) * config.batch_size]).to(where)
            eps = torch.randn((1, len(x), model_config.noise_dim), generator=torch.Generator().manual_seed(step))
            step_losses.append(trainer.step(x, eps.to(where), len(x))["loss"].mean().item())
        losses.append(step_losses)
    return list(zip(*losses))


def training_rows(name: str, preset, train, val, device, epochs: int) -> list[tuple[str, str, str]]:
    """The pipeline's epoch against the floor and the eager step, for one preset."""
    best = {}
    pipeline = Run(preset, train, val, device, epochs, graphed=True)
    best["pipeline"] = min(pipeline.epoch_seconds()[1:] or [math.inf])
    best["floor"] = pipeline.floor_seconds()
    for bf16 in (False, True):
        eager = Run(preset, train, val, device, epochs, graphed=False, bf16=bf16)
        best["eager bf16" if bf16 else "eager"] = min(eager.epoch_seconds()[1:] or [math.inf])
        if not bf16:  # the same draws and recipe: only the launching (and Adam's kernels) differ
            ours, theirs = pipeline.last["val"], eager.last["val"]
            agree = (f"{name}: graph vs eager, validation -ELBO after the same epochs", f"{ours:.3f} vs {theirs:.3f}",
                     "ok" if abs(ours - theirs) <= 1e-3 * abs(theirs) else "FAIL")
    images = len(train)
    what = "CUDA graph" if device.type == "cuda" else "eager on a CPU"
    rows = [agree, (f"{name}: pipeline epoch ({what}, + validation), s", f"{best['pipeline']:.3f}",
             f"{best['pipeline'] / best['floor']:.2f}x the floor"),
            (f"{name}: floor, the captured step alone, s/epoch", f"{best['floor']:.3f}",
             f"{images / best['floor']:,.0f} img/s")]
    if device.type == "cuda":  # GraphAdam's few kernels against torch's one update per parameter
        label = f"{name}: floor with torch's single-tensor Adam, s/epoch"

        def torchs_floor():  # never run before the GPU session: its failure costs its row only
            torchs = Run(preset, train, val, device, epochs, graphed=True, adam=TorchsAdam).floor_seconds()
            return [(label, f"{torchs:.3f}", f"{torchs / best['floor']:.2f}x the floor")]
        rows += attempted(label, torchs_floor)
    for kind in ("eager", "eager bf16"):
        rows.append((f"{name}: {kind} step (+ validation), s/epoch", f"{best[kind]:.3f}",
                     f"{best[kind] / best['pipeline']:.2f}x the pipeline's"))
    return rows


def evaluation_row(model: VAE, test: torch.Tensor, device: torch.device, k: int,
                   note: str = "") -> tuple[str, str, str]:
    """L_k as the evaluate stage draws it on a GPU: each image's noise from its block of images
    (vae/rng.py's ImageBlocks), in batches of eval.batch_size's 1,000 and chunks of 64."""
    model.eval()
    x, nll = to_float(test).to(device), []

    def estimate():
        for start in range(0, len(x), 1000):
            batch = x[start:start + 1000]
            nll.append(iwae_log_lik(model, batch, k, rng.image_blocks(0, "iwae", start, len(batch), device)))
    seconds = timed(estimate, device)
    return (f"L_{k} on {len(test)} test images (noise in blocks of images)", f"{seconds:.2f} s",
            f"NLL {-torch.cat(nll).mean().item():.2f} nats{note}")


def export_decoder(model: VAE, path: Path, latent_dim: int) -> ImageDecoder:
    decoder = ImageDecoder(model.cpu().float()).eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(decoder, (torch.zeros(2, latent_dim),), dynamo=True, opset_version=18, input_names=["z"],
                      output_names=["image"], dynamic_shapes={"z": {0: batch}}, verbose=False).save(str(path))
    return decoder


def decode_rows(model: VAE, batches: list[int], tolerance: float) -> list[tuple[str, str, str]]:
    import onnxruntime as ort

    latent = model.config.latent_dim
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decoder.onnx"
        decoder = export_decoder(model, path, latent)
        # (label, provider, its options, the parity it must hold)
        providers = [("CPU", "CPUExecutionProvider", {}, tolerance)]
        if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
            providers += [("CUDA, TF32 off (as served)", "CUDAExecutionProvider", {"use_tf32": "0"}, tolerance),
                          ("CUDA, TF32", "CUDAExecutionProvider", {}, TF32_TOLERANCE)]
        else:
            rows.append(("onnxruntime CUDA provider", "absent", f"onnxruntime {ort.__version__}"))
        for label, provider, options, bound in providers:
            session = ort.InferenceSession(str(path), providers=[(provider, options)])
            worst = 0.0
            for n in (1, 256):
                z = torch.randn(n, latent, generator=torch.Generator().manual_seed(n))
                with torch.no_grad():
                    expected = decoder(z).numpy()
                worst = max(worst, float(np.abs(session.run(None, {"z": z.numpy()})[0] - expected).max()))
            rows.append((f"decoder on {label} vs torch (max abs diff, at most {bound:.0e})", f"{worst:.1e}",
                         "ok" if worst <= bound else "FAIL"))
            for n in batches:
                rows += throughput_rows(session, label, n, latent, device_io=provider == "CUDAExecutionProvider")
    return rows


def throughput_rows(session, label: str, n: int, latent: int, device_io: bool) -> list[tuple[str, str, str]]:
    """Decode images per second at batch n, host I/O, and on CUDA device-resident I/O too."""
    import onnxruntime as ort

    z = np.random.default_rng(n).standard_normal((n, latent), dtype=np.float32)
    runs = {"host I/O": lambda: session.run(None, {"z": z})}
    if device_io:
        binding = session.io_binding()
        binding.bind_ortvalue_input("z", ort.OrtValue.ortvalue_from_numpy(z, "cuda", 0))
        binding.bind_ortvalue_output("image", ort.OrtValue.ortvalue_from_shape_and_type(
            [n, 1, 28, 28], np.float32, "cuda", 0))
        runs["device I/O"] = lambda: session.run_with_iobinding(binding)
    rows = []
    for io, run in runs.items():
        run()  # the first call allocates
        repeats = max(3, int(0.2 / max(timed_call(run), 1e-6)))
        seconds = min(timed_call(run, repeats) for _ in range(3))
        rows.append((f"decode on {label}, batch {n}, {io}", f"{seconds * 1e3:.3f} ms", f"{n / seconds:,.0f} img/s"))
    return rows


def timed_call(run, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "mnist", help="the four MNIST IDX files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per training row (the first warms up)")
    p.add_argument("--full-epochs", type=int, default=30, help="the default recipe's run, timed whole")
    p.add_argument("--images", type=int, default=None, help="training images (default: all 50,000)")
    p.add_argument("--compare-steps", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=1e-3, help="relative, CPU against device losses")
    p.add_argument("--iwae-k", type=int, default=5000)
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--batches", default="1,64,1024,65536", help="decode batch sizes")
    p.add_argument("--parity", type=float, default=1e-5, help="max |onnxruntime - torch| (export.tolerance)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"the sections to run, comma-separated (default: all of {', '.join(SECTIONS)})")
    p.add_argument("--quick", action="store_true", help="a CPU's smoke run: 640 images, 2 epochs, k=2, "
                                                        "100 test images, batches 1 and 64")
    args = p.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        p.error(f"--only: no section {', '.join(sorted(only - set(SECTIONS)))} (there are {', '.join(SECTIONS)})")
    if args.quick:
        args.images, args.epochs, args.full_epochs, args.iwae_k, args.test_images, args.batches = \
            640, 2, 2, 2, 100, "1,64"
    device = torch.device(args.device)
    try:
        images = load_split(args.data, "train")[0]
        test = load_split(args.data, "test")[0][: args.test_images]
    except DataError as e:
        sys.exit(f"gpu_check: {e} (`vae fetch` or `dvc repro fetch` writes data/mnist)")
    train, val = images[:-VAL_SIZE][: args.images], images[-VAL_SIZE:]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, {len(train)} training images", flush=True)

    rows, trained = [], []
    if device.type == "cuda" and "first-steps" in only:
        guarded(rows, "first steps, CPU vs device", lambda: [first_steps_row(train, device, args)])
    if "training" in only:
        for preset_name, preset in (("default", DEFAULT), ("paper", PAPER)):
            guarded(rows, f"{preset_name}: training", lambda n=preset_name, p=preset: training_rows(
                n, p, train, val, device, args.epochs))
    if "recipe" in only:
        guarded(rows, "default recipe", lambda: [recipe_row(train, val, device, args.full_epochs, trained)])
    # Without the recipe's model (not run, or its run failed), an untrained one: the timings still hold.
    model = trained[0] if trained else VAE(DEFAULT[0]).to(device)
    if "evaluation" in only:
        note = "" if trained else " (an untrained model)"
        guarded(rows, f"L_{args.iwae_k}", lambda: [evaluation_row(model, test, device, args.iwae_k, note)])
    if "decoding" in only:
        guarded(rows, "decoding", lambda: decode_rows(model, [int(b) for b in args.batches.split(",")], args.parity))
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'check'.ljust(width)} | value | result |\n| {'-' * width} | --- | --- |")
    for row in rows:
        print(f"| {row[0].ljust(width)} | {row[1]} | {row[2]} |")
    return 1 if any(r[2] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
