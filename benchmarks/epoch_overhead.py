"""What `vae train` spends on an epoch besides training it, where epochs are fast (a GPU's), side
by side in one invocation: a checkpoint after every epoch (train.checkpoint_seconds: 0) against
the default (a checkpoint once train.checkpoint_seconds have passed, and after the last epoch).

Each fit() is pipeline/train.py's (Ray Train, one CPU worker, a local Ray, checkpoints in a local
folder) on a few hundred images, so that an epoch takes milliseconds, as a GPU's CUDA-graph
epoch of the default model does (0.22 s on an H200, 60,000 images). Ray takes one report per poll of
its controller (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 0.5 s here), and a report waits for the one
before it to be taken. The figure: the seconds between the first and the last epoch's metrics in
MLflow (rank 0 logs each as its epoch ends: Ray's start-up is outside), per epoch, less the
epochs' own seconds.

    python benchmarks/epoch_overhead.py [--epochs 41] [--images 256] [--data DIR]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from checkpoint_storage import fit_in_folder, mnist  # the same fit() in a fresh folder, the same data


def seconds_per_epoch(root: Path, data: Path, images: int, epochs: int, checkpoint_seconds: float | None):
    """(wall seconds, the training's own seconds) per epoch after the first, of one fit() in a
    fresh project folder: the wall from the epochs' MLflow timestamps."""
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.files import Layout

    train = {"epochs": epochs, "num_workers": 1, "storage_path": str(root / "ray_results")}
    if checkpoint_seconds is not None:
        train["checkpoint_seconds"] = checkpoint_seconds
    _, state, run_id = fit_in_folder(root, data, data={"max_train_images": images, "val_size": images}, train=train)
    logged = MlflowClient(tracking.tracking_uri(Layout(root))).get_metric_history(run_id, "epoch_seconds")
    stamps = sorted(m.timestamp for m in logged)
    wall = (stamps[-1] - stamps[0]) / 1000 / (epochs - 1)
    return wall, sum(row["epoch_seconds"] for row in state.history[1:]) / (epochs - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=41)
    parser.add_argument("--images", type=int, default=256, help="training (and validation) images")
    parser.add_argument("--data", type=Path, help="the MNIST IDX files (default: fetched into a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vae-epoch-overhead-"))
    args.data = mnist(args.data, work)
    rows = {name: seconds_per_epoch(work / name.replace(" ", "-"), args.data, args.images, args.epochs, seconds)
            for name, seconds in (("every epoch", 0.0), ("default", None))}
    print(f"per epoch after the first, {args.images} images, 1 CPU worker, {args.epochs} epochs:")
    for name, (wall, inside) in rows.items():
        print(f"  checkpoints {name:<12} {wall * 1000:7.1f} ms, of which training {inside * 1000:6.1f} ms, "
              f"the rest {(wall - inside) * 1000:7.1f} ms")
    every, default = (wall - inside for wall, inside in rows.values())
    print(f"  the rest, every epoch against the default: {every / default:.1f}x")


if __name__ == "__main__":
    main()
