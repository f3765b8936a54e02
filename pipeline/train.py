"""Stage `train`: the VAE under Ray Train (TorchTrainer, V2), on GPU workers when the cluster has them.

The driver loads MNIST once into Ray's object store, creates the MLflow run, and fits a
TorchTrainer whose workers run pipeline/train_worker.py (each on its slice of every global
batch, so the model does not depend on the worker count). It writes the outputs from the
final checkpoint.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from filelock import FileLock, Timeout

from pipeline import tracking, train_worker
from pipeline.files import Layout, atomic_path, write_bytes, write_json, write_serialised
from pipeline.params import Params, load_params
from pipeline.ray_connect import (
    connect_ray,
    cpus_per_worker,
    gpu_workers,
    node_resources,
    require_room,
    torch_trainer,
    workers_for,
)
from pipeline.train_worker import CheckpointError, TrainState, WorkerContext, train_loop_per_worker
from vae.data import load_split
from vae.model import VAE, gist

# The files whose change makes a different model: part of the Ray run name, so a rerun
# after a code change starts fresh instead of resuming a stale run.
CODE = [Path(__file__), Path(train_worker.__file__), *(Path(__file__).parents[1] / "vae").glob("*.py")]


# --- on the driver ----------------------------------------------------------------------

def run_name(params: Params) -> str:
    """Same model-defining params and code, same name: a rerun resumes that Ray run. The
    worker count is left out on purpose: the model does not depend on it."""
    defining = {"data": params.data.model_dump(exclude={"source", "mirror_timeout_s"}),
                "model": params.model.model_dump(),
                "train": params.train.model_dump(exclude=params.train.PLACEMENT)}
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode())
    for path in sorted(CODE):
        digest.update(path.read_bytes())
    return f"vae-{digest.hexdigest()[:12]}"


def load_training_data(layout: Layout, params: Params):
    """(train, validation) uint8 images: the last val_size of the 60k are held out."""
    images, _ = load_split(layout.data_dir, "train")
    train, val = images[: -params.data.val_size], images[-params.data.val_size:]
    if params.data.max_train_images:
        train = train[: params.data.max_train_images]
    return train.numpy(), val.numpy()


def require_storage(storage: str) -> None:
    """Fail before Ray starts, naming train.storage_path, when its object store does not answer
    (Ray's controller would die of it, in a traceback, after Ray started). Resolved as Ray
    resolves it (pyarrow.fs, which reads AWS_ENDPOINT_URL and the keys from the environment)."""
    if "://" not in storage:
        return
    import pyarrow
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(storage)
        filesystem.get_file_info(path)
    except (OSError, pyarrow.ArrowException) as e:
        raise ConnectionError(f"train.storage_path: {storage} cannot be reached ({gist(e)}); an S3-compatible "
                              f"server needs AWS_ENDPOINT_URL and its keys in the environment") from None


@contextmanager
def run_lock(layout: Layout, name: str) -> Iterator[None]:
    """Held by the driver of Ray run `name` while it trains. Two drivers of one run (the same
    params and code: two terminals, or a sweep over train.num_workers with -j 2) resumed from,
    and deleted, each other's checkpoints; the second now waits, then resumes from the
    first's last checkpoint, with nothing left to train. One machine's drivers: a file lock."""
    layout.train_locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(layout.train_locks / f"{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"train: waiting for the other `vae train` of this run (same params and code), which holds "
              f"{lock.lock_file}", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def fit(layout: Layout, params: Params, run_id: str) -> TrainState:
    """Run the TorchTrainer, one driver at a time per Ray run; return the final training state
    from its last checkpoint."""
    storage = params.train.storage_path or str(layout.ray_results)
    require_storage(storage)
    name = run_name(params)
    with run_lock(layout, name):
        return train_on_ray(layout, params, run_id, storage, name)


def train_on_ray(layout: Layout, params: Params, run_id: str, storage: str, name: str) -> TrainState:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    connect_ray(params.train.num_workers, params.train.ray_address)
    trainer_class = torch_trainer()
    nodes = node_resources()
    cluster_gpus = sum(n.get("GPU", 0) for n in nodes)
    use_gpu = gpu_workers(params.train.use_gpu, cluster_gpus)
    workers = workers_for(params.train.num_workers, nodes, cluster_gpus if use_gpu else 0)
    cpus = cpus_per_worker(params.train.cpus_per_worker, nodes, workers, use_gpu)
    require_room(nodes, workers, cpus, float(use_gpu), params.train.ray_address, "worker",
                 "train.num_workers, train.cpus_per_worker")
    context = WorkerContext(run_id=run_id, tracking_uri=tracking.tracking_uri(layout),
                            data=tuple(ray.put(a) for a in load_training_data(layout, params)), storage=storage)
    graphed = train_worker.uses_cuda_graph(params, torch.device("cuda"), workers)  # the workers' own rule
    where = ("GPU, each step a CUDA graph" if graphed else "GPU (NCCL)") if use_gpu else "CPU (Gloo)"
    print(f"train: {workers} Ray worker{'s' * (workers > 1)} on {where}, "
          f"{cpus} CPU{'s' * (cpus > 1)} each, checkpoints in {storage}", flush=True)
    trainer = trainer_class(
        train_loop_per_worker, train_loop_config={"params": params, "context": context},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=params.train.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")))
    try:
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C meets Ray Train's own handler, which aborts the run and then exits from inside
        # ray.get with status 1 and no word of why; SIGTERM and SIGHUP meet the CLI's (KeyboardInterrupt).
        raise KeyboardInterrupt(f"run it again to resume from the last checkpoint in "
                                f"{storage}/{name}") from None
    except ray.train.WorkerGroupError as e:
        # A checkpoint no rerun can resume from, or none written: the workers' own words, not Ray's tracebacks.
        named = [error for error in e.worker_failures.values() if isinstance(error, CheckpointError)]
        if named:
            raise named[0] from None
        raise
    state = TrainState.from_checkpoint(train_worker.read_checkpoint(result.checkpoint))
    state.device, state.workers = "cuda" if use_gpu else "cpu", workers
    return state


def write_outputs(layout: Layout, params: Params, state: TrainState) -> dict:
    best = state.best
    config = params.model.vae_config()
    with atomic_path(layout.model) as tmp:
        write_serialised(tmp, lambda f: torch.save({"state_dict": best["model"], "config": asdict(config)}, f))
    last = state.history[-1]
    metrics = {"best_epoch": best["epoch"], "epochs": state.epoch, "best_val_neg_elbo": best["val_neg_elbo"],
               "ray_nodes": len(state.nodes), "ray_workers": state.workers, "device": state.device,
               **{k: v for k, v in last.items() if k != "epoch"}}
    write_json(layout.train_metrics, metrics)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(last), lineterminator="\n")
    writer.writeheader()
    writer.writerows(state.history)
    write_bytes(layout.train_plot, buffer.getvalue().encode())
    return metrics


def main() -> None:
    from mlflow import MlflowClient

    layout, params = Layout(), load_params()
    VAE(params.model.vae_config())  # fail on a bad architecture before starting anything
    tracking.require_reachable(tracking.tracking_uri(layout))
    run_id = tracking.start_run(layout, params.flat(), {"ray.num_workers": str(params.train.num_workers)})
    client = MlflowClient(tracking.tracking_uri(layout))
    with tracking.failing_marks(client, run_id):
        with tracking.system_metrics(run_id, layout):
            state = fit(layout, params, run_id)
        metrics = write_outputs(layout, params, state)
    # The outputs are written: from here on, a tracking server gone away costs a warning only.
    best_effort = tracking.best_effort
    best_effort("the device tag", client.set_tag, run_id, "device", state.device)
    best_effort("the worker count", client.set_tag, run_id, "ray.num_workers", str(state.workers))
    best_effort("the best epoch", tracking.log_metrics, client, run_id, {"best_epoch": metrics["best_epoch"]})
    best_effort("the model checkpoint", client.log_artifact, run_id, str(layout.model), "model")
    for path in (layout.train_metrics, layout.train_plot):
        best_effort(f"{path.name}", client.log_artifact, run_id, str(path), "training")
    # Training is the run's long part; evaluate and export add to it after it is FINISHED.
    best_effort("the run's FINISHED status", client.set_terminated, run_id, status="FINISHED")
    print(f"train: best epoch {metrics['best_epoch']} (validation -ELBO {metrics['best_val_neg_elbo']:.2f} nats) "
          f"-> {layout.model}", flush=True)
