"""Training speed, side by side in one invocation, on the same model and data:

  (a) the reference: PyTorch's official VAE example loop (torchvision MNIST + ToTensor
      through a DataLoader, BCE + KL), written out below;
  (b) our training step without Ray (vae/ maths, tensors held in memory, seed-derived noise);
  (c) our training under Ray Train with 1 and 2 CPU workers (pipeline/train.fit);
  (d) a floor for any autograd + Adam training step of this model: the same four Linear
      layers' forward and backward and the fused Adam step, with no loss, activation or data
      (where the step's time would go if everything else were free).

(b) and (c) run both eager and with train.compile (torch.compile of the forward and loss).
The contenders take turns, round after round; each one's best epoch counts, so compiling,
in the first, is left out.

Model 784-400-20 MLP, batch 128, Adam lr 1e-3. Prints seconds per 60,000-image epoch, the
ratio to (a), Ray's overhead against (b), and the FLOP lower bound from a measured matmul
rate on this machine.

    python benchmarks/train_speed.py --data data/mnist [--rounds 2] [--profile]
"""
from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train_worker import compile_model
from vae import rng
from vae.data import MNIST_FILES, load_split, to_float
from vae.model import VAE, VAEConfig
from vae.objectives import elbo_terms

EPOCH_IMAGES, BATCH, LATENT, HIDDEN = 60_000, 128, 20, 400


# (a) PyTorch's examples/vae/main.py, the model and loop as written there.
class ReferenceVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x):
        h1 = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def mnist_root(data_dir: Path, root: Path) -> Path:
    """root laid out as torchvision's MNIST wants it (<root>/MNIST/raw/<files>), by symlinks."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).symlink_to(data_dir.resolve() / name)
    return root


# Each trainer below is set up once and returns epoch(): train one epoch, return its seconds.
def reference_trainer(root: Path):
    from torchvision import datasets, transforms

    loader = torch.utils.data.DataLoader(
        datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor()),
        batch_size=BATCH, shuffle=True)
    model = ReferenceVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch() -> float:
        start = time.perf_counter()
        for x, _ in loader:
            recon, mu, logvar = model(x)
            bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
            loss = bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start
    return epoch


# (b) our step, no Ray.
def model_and_optimizer():
    """(b) and (d)'s model, seeded alike, and its fused Adam, as pipeline/train.py makes them."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(HIDDEN,)))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)


def ours_trainer(images: torch.Tensor, compile: bool = False, steps: int | None = None):
    model, optimizer = model_and_optimizer()
    step_model = compile_model(model, torch.device("cpu")) if compile else model  # as train.compile does
    epochs = itertools.count()

    def epoch() -> float:
        number, start = next(epochs), time.perf_counter()
        for step, batch in enumerate(rng.epoch_order(0, number, len(images)).split(BATCH)[:steps]):
            x = to_float(images.index_select(0, batch))
            eps = rng.batch_noise(0, number, step, len(batch), LATENT)[:, 0]
            loss = elbo_terms(step_model, x, eps)["neg_elbo"].sum() / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start
    return epoch


# (d) the floor: the step's matrix products as autograd runs them (forward, both backward
# products, the bias gradients) and the fused Adam update; everything else left out.
def floor_trainer():
    model, optimizer = model_and_optimizer()
    enc_hidden, enc_head, dec_hidden, dec_out = [m for m in model.modules() if isinstance(m, nn.Linear)]
    x, eps = torch.rand(BATCH, 784), torch.randn(BATCH, LATENT)

    def epoch() -> float:
        start = time.perf_counter()
        for _ in range(math.ceil(EPOCH_IMAGES / BATCH)):
            mu, logvar = enc_head(enc_hidden(x)).chunk(2, dim=-1)
            loss = dec_out(dec_hidden(mu + logvar * eps)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start
    return epoch


# (c) our training under Ray Train, per-epoch seconds as the workers measured them.
def ray_epochs(data_dir: Path, workers: int, epochs: int, compile: bool = False) -> list[float]:
    from pipeline import tracking
    from pipeline.files import Layout
    from pipeline.params import Params
    from pipeline.train import fit

    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "data").mkdir()
        (Path(root) / "data" / "mnist").symlink_to(data_dir.resolve())
        layout = Layout(root)
        params = Params.model_validate({"data": {"val_size": 1000},
                                        "model": {"arch": "mlp", "latent_dim": LATENT, "hidden_dims": [HIDDEN]},
                                        "train": {"epochs": epochs, "batch_size": BATCH, "num_workers": workers,
                                                  "lr": 1e-3, "lr_schedule": "constant", "max_failures": 0,
                                                  "compile": compile}})
        state = fit(layout, params, tracking.start_run(layout, params.flat(), {}))
    # Scale the epoch (59,000 images here) to 60,000; validation on 1,000 is included.
    return [row["epoch_seconds"] * EPOCH_IMAGES / (EPOCH_IMAGES - 1000) for row in state.history]


# Where (b)'s time goes, by the kind of work each ATen op does (self time, no double counting).
KINDS = {"aten::addmm": "matmul", "aten::mm": "matmul", "aten::_fused_adam_": "optimizer (fused Adam)"}


def profile_ours(images: torch.Tensor, steps: int = 100) -> None:
    from torch.profiler import ProfilerActivity, profile

    epoch = ours_trainer(images, steps=steps)
    epoch()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = epoch()
    by_kind: dict[str, float] = {}
    for event in prof.key_averages():
        kind = KINDS.get(event.key, "other ops")
        by_kind[kind] = by_kind.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    by_kind["outside ops (Python, dispatch)"] = max(0.0, wall - sum(by_kind.values()))
    scale = EPOCH_IMAGES / (steps * BATCH)
    print(f"\n(b) profiled over {steps} steps, seconds per 60,000-image epoch (the profiler adds its own overhead):")
    for kind, seconds in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:34}{seconds * scale:7.2f}")


def flop_bound_seconds() -> float:
    """Matmul FLOPs of one epoch (forward + backward = 3x forward) at this machine's measured rate."""
    a, b = torch.randn(BATCH, 784), torch.randn(784, HIDDEN)
    for _ in range(20):
        a @ b
    best = math.inf  # the fastest of several timings: a bound wants the best rate seen
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(100):
            a @ b
        best = min(best, (time.perf_counter() - start) / 100)
    rate = 2 * BATCH * 784 * HIDDEN / best
    macs_per_image = 784 * HIDDEN + HIDDEN * 2 * LATENT + LATENT * HIDDEN + HIDDEN * 784
    return 3 * 2 * macs_per_image * EPOCH_IMAGES / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/mnist"))
    parser.add_argument("--rounds", type=int, default=2, help="turns per contender (at least 2); the best epoch counts")
    parser.add_argument("--profile", action="store_true", help="only (b), its time split by kind of op")
    args = parser.parse_args()
    images, _ = load_split(args.data, "train")
    if args.profile:
        profile_ours(images)
        return

    floor = "(d) floor: Linear layers + fused Adam only"
    ray_runs = {f"(c) ours, Ray Train, {workers} worker{'s' * (workers > 1)}{', compiled' * compile}":
                (workers, compile)
                for compile in (False, True) for workers in (1, 2)}
    with tempfile.TemporaryDirectory() as root:
        trainers = {"(a) reference loop (DataLoader + ToTensor)": reference_trainer(mnist_root(args.data, Path(root))),
                    "(b) ours, no Ray": ours_trainer(images),
                    "(b) ours, no Ray, compiled": ours_trainer(images, compile=True),
                    floor: floor_trainer()}
        # Rounds: every contender gets a turn in each, so a slow spell of this shared machine
        # slows them all alike instead of whichever ran during it. A Ray turn is a whole run
        # of 2 epochs (the first warms up): Ray Train runs cannot be paused between epochs.
        times, bounds = {name: [] for name in [*trainers, *ray_runs]}, []
        for _ in range(args.rounds):
            for name, epoch in trainers.items():
                times[name].append(epoch())
            bounds.append(flop_bound_seconds())
            for name, (workers, compile) in ray_runs.items():
                times[name] += ray_epochs(args.data, workers, 2, compile)
    rows = {name: min(seconds) for name, seconds in times.items()}
    rows[floor] = rows.pop(floor)  # printed last
    bound = min(bounds)
    reference = rows["(a) reference loop (DataLoader + ToTensor)"]

    print(f"\nseconds per 60,000-image epoch, batch {BATCH}, 784-{HIDDEN}-{LATENT} MLP, "
          f"torch threads {torch.get_num_threads()}; 'vs (b)' compares with (b) compiled alike")
    print(f"{'':46}{'s/epoch':>9}{'vs (a)':>9}{'vs (b)':>9}{'vs bound':>10}")
    for name, seconds in rows.items():
        ours = rows["(b) ours, no Ray" + ", compiled" * name.endswith("compiled")]
        print(f"{name:46}{seconds:9.2f}{reference / seconds:8.2f}x{seconds / ours:8.2f}x{seconds / bound:9.2f}x")
    print(f"{'FLOP lower bound (measured matmul rate)':46}{bound:9.2f}")


if __name__ == "__main__":
    main()
