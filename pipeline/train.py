"""Stage `train`: the VAE under Ray Train (TorchTrainer, V2), on GPU workers when the cluster has them.

The driver loads MNIST once into Ray's object store, creates the MLflow run, and fits a
TorchTrainer. Every worker walks the same global batches (order and noise drawn from the
seed, epoch and step: see vae/rng.py) and trains on its slice of each; DDP averages the
gradients, scaled so the result is the global-batch mean whatever the worker count.
Rank 0 logs each epoch to MLflow and reports a checkpoint; a rerun of the same params and
code resumes from the last one. The driver writes the outputs from the final checkpoint.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import tracking
from pipeline.ray_connect import connect_ray, torch_trainer
from pipeline.files import Layout, atomic_path, write_bytes, write_json
from pipeline.params import Params, load_params
from vae import rng
from vae.data import load_split, to_float
from vae.model import VAE, VAEConfig
from vae.objectives import elbo_terms, iwae_terms

TERMS = ("neg_elbo", "recon", "kl")
# The files whose change makes a different model: part of the Ray run name, so a rerun
# after a code change starts fresh instead of resuming a stale run.
CODE = [Path(__file__), *(Path(__file__).parents[1] / "vae").glob("*.py")]


# --- on each worker ---------------------------------------------------------------------

def _batch_sums(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """[sum of each term, number of images] of one batch, kept on the device (no host sync)."""
    count = terms[TERMS[0]].new_tensor(float(len(terms[TERMS[0]])))
    return torch.stack([*(terms[k].detach().sum() for k in TERMS), count]).double()


def _global_means(sums: torch.Tensor) -> dict[str, float]:
    """Each term's mean over the images of all workers."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    sums = sums.cpu()
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(TERMS)}


def _slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.tensor_split(world)[rank]


def train_epoch(model, optimizer, schedule, images, cfg: dict, epoch: int, rank: int, world: int, device) -> dict:
    """One pass over the training images; returns the mean terms over all workers."""
    model.train()
    sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64, device=device)
    order = rng.epoch_order(cfg["seed"], epoch, len(images))
    for step, batch in enumerate(order.split(cfg["batch_size"])):
        eps = rng.batch_noise(cfg["seed"], epoch, step, len(batch), cfg["noise_dim"], cfg["iwae_k"])
        eps = _slice(eps, rank, world).to(device).transpose(0, 1)  # (k, images, noise_dim)
        # index_select: the same rows as images[...], without advanced indexing's overhead.
        x = to_float(images.index_select(0, _slice(batch, rank, world).to(device)))
        if cfg["binarize"] == "dynamic":  # drawn for the global batch, then sliced, like eps
            uniform = rng.batch_uniform(cfg["seed"], epoch, step, len(batch), x.shape[1])
            x = rng.binarize(x, _slice(uniform, rank, world).to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["bf16"] and device.type == "cuda"):
            terms = iwae_terms(model, x, eps, dreg=cfg["grad_estimator"] == "dreg")
        # DDP averages over workers: scaling by world/len(batch) makes that the global mean.
        loss = terms["loss"].sum() * world / len(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        sums += _batch_sums(terms)
    return _global_means(sums)


def validation_set(images: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images as model inputs (binarised once, if so) and their noise, both
    fixed for the whole run."""
    generator = rng.eval_generator(cfg["seed"])
    x = to_float(images)
    eps = torch.randn((len(x), cfg["noise_dim"]), generator=generator)
    if cfg["binarize"] == "dynamic":
        x = rng.binarize(x, torch.rand(x.shape, generator=generator))
    return x, eps


@torch.no_grad()
def validate(model, x, eps, rank: int, world: int, device) -> dict:
    """Mean terms on this worker's slice of the validation set, over all workers."""
    model.eval()
    idx = _slice(torch.arange(len(x)), rank, world)
    terms = elbo_terms(model, x[idx].to(device), eps[idx].to(device))
    return _global_means(_batch_sums(terms))


def compile_model(model, device):
    """The model whose forward (the per-sample log-densities, see VAE.forward) runs as
    torch.compile's fused kernels. Checks for the C++ compiler that CPU kernels need first,
    so a missing one is named before training starts, not deep inside the first step."""
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler as e:
            raise RuntimeError(f"train.compile: true needs a C++ compiler (g++ or clang++) on CPU "
                               f"workers; install one or set train.compile: false ({e})") from None
    # Quiet: "No CUDA runtime is found" on CPU-only nodes; Ray's profiler spans it skips.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    torch._logging.set_logs(dynamo=logging.ERROR)
    # The shapes are fixed but for each epoch's last batch: one more compile, not a dynamic graph.
    return torch.compile(model, dynamic=False)


def learning_rate_schedule(optimizer, cfg: dict, train_images: int):
    """Per global step, so the same on every worker: one-cycle (warm up to train.lr over the
    first 10% of steps, then anneal) or constant. A smoke run too short to warm up and
    anneal gets the constant rate."""
    steps = cfg["epochs"] * math.ceil(train_images / cfg["batch_size"])
    if cfg["lr_schedule"] == "constant" or steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # At least two warm-up steps: OneCycleLR divides by the warm-up length minus one.
    warmup = max(0.1, 2 / steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=steps, pct_start=warmup)


def _restore(model, optimizer, schedule) -> dict:
    """Training state from Ray's latest checkpoint (a restarted worker group, or a rerun)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": 0, "history": [], "best": None, "run_id": None}
    with checkpoint.as_directory() as path:
        state = torch.load(Path(path) / "state.pt", weights_only=True)
    model.load_state_dict(state.pop("model"))
    optimizer.load_state_dict(state.pop("optimizer"))
    schedule.load_state_dict(state.pop("schedule"))
    return state


def _report(model, optimizer, schedule, state: dict, metrics: dict, rank: int) -> None:
    """Report the epoch to Ray; rank 0 attaches the checkpoint (every rank must call report)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict()},
                   Path(tmp) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _mlflow_logger(cfg: dict):
    """Rank 0's link to the run the driver created: log(metrics, epoch)."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg["tracking_uri"])
    return lambda metrics, epoch: tracking.best_effort(
        f"epoch {epoch}'s metrics", tracking.log_metrics, client, cfg["run_id"], metrics, step=epoch)


def _node_ids(world: int) -> list[str]:
    """The distinct Ray nodes this worker group runs on."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    nodes = [mine] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(nodes, mine)
    return sorted(set(nodes))


def _quiet_reports() -> None:
    """Ray Train logs every report() at INFO through a logger named by its file path, which
    escapes its own log-level setting; mute it so the console shows our epoch lines."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(cfg: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    _quiet_reports()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"])  # same initial weights on every rank
    model = VAE(VAEConfig(**cfg["model"]))
    # Fused: one kernel for every parameter, instead of a dozen ops each (a third of a CPU step).
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=True)
    with warnings.catch_warnings():  # zero-copy, read-only views of the object store: never written
        warnings.simplefilter("ignore", UserWarning)
        train_images, val_images = (torch.from_numpy(ray.get(ref)) for ref in cfg["data"])
    schedule = learning_rate_schedule(optimizer, cfg, len(train_images))
    state = _restore(model, optimizer, schedule)
    ddp_model = ray.train.torch.prepare_model(model)
    if cfg["compile"]:  # DDP first, then compile: the order PyTorch documents for the pair
        ddp_model = compile_model(ddp_model, device)
    train_images = train_images.to(device)
    val_x, val_eps = validation_set(val_images, cfg)
    state["nodes"] = _node_ids(world)
    log = _mlflow_logger(cfg) if rank == 0 else None
    if log and state["run_id"] != cfg["run_id"]:
        for row in state["history"]:  # resumed a run logged elsewhere: give this run the history
            log({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    for epoch in range(state["epoch"], cfg["epochs"]):
        start = time.perf_counter()
        train = train_epoch(ddp_model, optimizer, schedule, train_images, cfg, epoch, rank, world, device)
        val = validate(model, val_x, val_eps, rank, world, device)
        seconds = time.perf_counter() - start
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()},
               **{f"val_{k}": v for k, v in val.items()},
               "epoch_seconds": seconds, "samples_per_second": len(train_images) / seconds}
        if state["best"] is None or val["neg_elbo"] < state["best"]["val_neg_elbo"]:
            state["best"] = {"epoch": epoch + 1, "val_neg_elbo": val["neg_elbo"],
                             "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        state.update(epoch=epoch + 1, history=[*state["history"], row], run_id=cfg["run_id"])
        if log:
            log({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
            print(f"epoch {epoch + 1:>3}/{cfg['epochs']}  train {train['neg_elbo']:8.3f}  "
                  f"val {val['neg_elbo']:8.3f}  {seconds:6.1f} s  {row['samples_per_second']:8.0f} img/s",
                  flush=True)
        _report(model, optimizer, schedule, state, row, rank)


# --- on the driver ----------------------------------------------------------------------

def gpu_workers(use_gpu, cluster_gpus: float) -> bool:
    if use_gpu == "auto":
        return cluster_gpus >= 1
    if use_gpu and cluster_gpus < 1:
        raise RuntimeError("train.use_gpu is true but the Ray cluster has no GPU")
    return bool(use_gpu)


def share_cpus(node_cpus: list[float], num_workers: int) -> int:
    """The most CPUs per worker with which all the workers still fit on the nodes."""
    for cpus in range(int(max(node_cpus, default=1)), 1, -1):
        if sum(int(n) // cpus for n in node_cpus) >= num_workers:
            return cpus
    return 1


def cpus_per_worker(setting: int | str, num_workers: int) -> int:
    """CPUs a worker reserves. Ray sets OMP_NUM_THREADS, hence torch's threads, from it: with
    Ray's default of 1, a lone worker would use one core of many."""
    if setting != "auto":
        return int(setting)
    import ray

    return share_cpus([node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]], num_workers)


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


def fit(layout: Layout, params: Params, run_id: str) -> dict:
    """Run the TorchTrainer; return the final training state from its last checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    connect_ray(params.train.num_workers, params.train.ray_address)
    trainer_class = torch_trainer()
    use_gpu = gpu_workers(params.train.use_gpu, ray.cluster_resources().get("GPU", 0))
    model_config = params.model.vae_config()
    cfg = {**params.train.model_dump(), "model": model_config.__dict__, "noise_dim": model_config.noise_dim,
           "binarize": params.data.binarize, "run_id": run_id,
           "tracking_uri": tracking.tracking_uri(layout),
           "data": [ray.put(a) for a in load_training_data(layout, params)]}
    storage = params.train.storage_path or str(layout.ray_results)
    cpus = cpus_per_worker(params.train.cpus_per_worker, params.train.num_workers)
    print(f"train: {params.train.num_workers} Ray workers on {'GPU (NCCL)' if use_gpu else 'CPU (Gloo)'}, "
          f"{cpus} CPU{'s' * (cpus > 1)} each, checkpoints in {storage}", flush=True)
    trainer = trainer_class(
        train_loop_per_worker, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=params.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=run_name(params), storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=params.train.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")))
    result = trainer.fit()
    with result.checkpoint.as_directory() as path:
        state = torch.load(Path(path) / "state.pt", weights_only=True)
    state["device"] = "cuda" if use_gpu else "cpu"
    return state


def write_outputs(layout: Layout, params: Params, state: dict) -> dict:
    best = state["best"]
    config = params.model.vae_config()
    with atomic_path(layout.model) as tmp:
        torch.save({"state_dict": best["model"], "config": config.__dict__}, tmp)
    last = state["history"][-1]
    metrics = {"best_epoch": best["epoch"], "epochs": state["epoch"], "best_val_neg_elbo": best["val_neg_elbo"],
               "ray_nodes": len(state["nodes"]), "device": state["device"],
               **{k: v for k, v in last.items() if k != "epoch"}}
    write_json(layout.train_metrics, metrics)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(last), lineterminator="\n")
    writer.writeheader()
    writer.writerows(state["history"])
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
    best_effort("the device tag", client.set_tag, run_id, "device", state["device"])
    best_effort("the best epoch", tracking.log_metrics, client, run_id, {"best_epoch": metrics["best_epoch"]})
    best_effort("the model checkpoint", client.log_artifact, run_id, str(layout.model), "model")
    for path in (layout.train_metrics, layout.train_plot):
        best_effort(f"{path.name}", client.log_artifact, run_id, str(path), "training")
    # Training is the run's long part; evaluate and export add to it after it is FINISHED.
    best_effort("the run's FINISHED status", client.set_terminated, run_id, status="FINISHED")
    print(f"train: best epoch {metrics['best_epoch']} (validation -ELBO {metrics['best_val_neg_elbo']:.2f} nats) "
          f"-> {layout.model}", flush=True)
