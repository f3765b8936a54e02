"""One Ray Train worker of stage `train`: vae/training.py's Trainer on this worker's slice
of every global batch, DDP averaging the gradients. Rank 0 logs each epoch into the MLflow
run the driver created and attaches the checkpoint it reports; a restarted worker group, or
a rerun of the same params and code, resumes from the last one.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pipeline import compat, tracking
from pipeline.files import no_room, write_serialised
from pipeline.params import Params
from vae.cuda_graph import GraphedTrainer
from vae.data import to_float
from vae.model import VAE, gist
from vae.training import Shard, Trainer, to_host, validate, validation_set


@dataclass(frozen=True)
class WorkerContext:
    """What the driver hands every worker besides the params."""
    run_id: str  # the MLflow run rank 0 logs each epoch into
    tracking_uri: str
    data: tuple  # Ray object refs of the (train, validation) uint8 images
    storage: str  # where Ray keeps the run's checkpoints (train.storage_path, or the project's)


@dataclass
class TrainState:
    """Training's progress: what each epoch's checkpoint holds besides the optimiser and the
    schedule, resumed by a restarted worker group or a rerun of the same params."""
    epoch: int = 0  # epochs done
    history: list[dict] = field(default_factory=list)  # one row of metrics per epoch
    best: dict | None = None  # the best validation epoch: {"epoch", "val_neg_elbo", "model"}
    run_id: str | None = None  # the MLflow run the history was logged into
    nodes: list[str] = field(default_factory=list)  # the Ray nodes the workers ran on
    model: dict | None = None  # the last epoch's weights
    device: str = "cpu"  # set by the driver
    workers: int = 1  # set by the driver

    def record(self, row: dict, weights: dict, run_id: str) -> None:
        weights = to_host(weights)  # host copies: a GPU run's checkpoint loads where there is no GPU
        if self.best is None or row["val_neg_elbo"] < self.best["val_neg_elbo"]:
            self.best = {"epoch": row["epoch"], "val_neg_elbo": row["val_neg_elbo"],
                         "model": {k: v.detach().clone() for k, v in weights.items()}}
        self.epoch, self.run_id, self.model = row["epoch"], run_id, weights
        self.history = [*self.history, row]

    def to_checkpoint(self, trainer: Trainer) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, **trainer.state_dict()}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "TrainState":
        return cls(**{f.name: checkpoint[f.name] for f in fields(cls) if f.name in checkpoint})


def compile_model(model, device, dreg: bool = False):
    """The model whose forward (the per-sample log-densities, see VAE.forward) runs as
    torch.compile's fused kernels. Checks for what it needs first (a C++ compiler on CPUs; a
    torch that compiles DReG), so a lack is named before training starts, not inside a step."""
    if dreg and not compat.compiles_dreg():
        needed = ".".join(map(str, compat.COMPILES_DREG_FROM))
        raise RuntimeError(f"train.compile: true with train.grad_estimator: dreg needs torch >= {needed}, this "
                           f"worker has {torch.__version__}, whose torch.compile fails on DReG's gradient hook; "
                           f"set train.compile: false")
    if device.type == "cpu":
        try:
            compat.require_cxx_compiler()
        except RuntimeError as e:
            raise RuntimeError(f"train.compile: true needs a C++ compiler (g++ or clang++) on CPU "
                               f"workers; install one or set train.compile: false ({e})") from None
    # Quiet: "No CUDA runtime is found" on CPU-only nodes; Ray's profiler spans it skips.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    compat.quiet_dynamo()
    # The shapes are fixed but for each epoch's last batch: one more compile, not a dynamic graph.
    return torch.compile(model, dynamic=False)


def pseudo_inputs(train_images: torch.Tensor, params: Params) -> torch.Tensor:
    """The training images a VampPrior's pseudo-inputs start as: model.pseudo_inputs of them,
    drawn from train.seed alone (the same on every worker), as grey levels."""
    if params.model.prior != "vamp":
        return train_images[:0]
    generator = torch.Generator().manual_seed(params.train.seed)
    chosen = torch.randperm(len(train_images), generator=generator)[:params.model.pseudo_inputs]
    return to_float(train_images[chosen])


def uses_cuda_graph(params: Params, device: torch.device, world: int) -> bool:
    """Whether a worker replays its step as a CUDA graph (vae/cuda_graph.py): alone on a GPU,
    unless train.cuda_graph is false. Several GPU workers train eagerly: DDP's all-reduce is not
    captured."""
    return params.train.cuda_graph and device.type == "cuda" and world == 1


def graphed_epoch(trainer: Trainer, images: torch.Tensor) -> Callable[[int], dict]:
    """The epoch of GraphedTrainer, whose steps are warmed up and captured here. A failure says
    how to train without the graph."""
    try:
        return GraphedTrainer(trainer, images).epoch
    except RuntimeError as e:
        raise RuntimeError(f"preparing the training step's CUDA graph failed: {e}\n"
                           f"(train.cuda_graph: false trains this worker eagerly)") from e


def _all_reduce(sums: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)


def _node_ids(world: int) -> list[str]:
    """The distinct Ray nodes this worker group runs on."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    nodes = [mine] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(nodes, mine)
    return sorted(set(nodes))


@dataclass
class Worker:
    """One Ray Train worker, set up: its model, trainer, data and progress."""
    params: Params
    context: WorkerContext
    model: VAE
    trainer: Trainer
    train_epoch: Callable[[int], dict]  # epoch -> the mean training terms
    train_size: int  # training images
    validation: tuple[torch.Tensor, torch.Tensor]  # (inputs, noise), on the worker's device
    state: TrainState
    log: Callable[[dict, int], None] | None  # rank 0's MLflow logger
    last_checkpoint: float = field(default_factory=time.monotonic)  # when training started, at first

    @classmethod
    def setup(cls, params: Params, context: WorkerContext) -> "Worker":
        import ray
        import ray.train
        import ray.train.torch

        compat.quiet_ray_train_reports()
        ray_context = ray.train.get_context()
        shard = Shard(ray_context.get_world_rank(), ray_context.get_world_size())
        device = ray.train.torch.get_device()
        graphed = uses_cuda_graph(params, device, shard.world)
        torch.manual_seed(params.train.seed)  # same initial weights on every rank
        with warnings.catch_warnings():  # zero-copy, read-only views of the object store: never written
            warnings.simplefilter("ignore", UserWarning)
            train_images, val_images = (torch.from_numpy(ray.get(ref)) for ref in context.data)
        model = VAE(params.model.vae_config())
        model.init_pseudo_inputs(pseudo_inputs(train_images, params))
        # On the device before the optimiser exists: a restored Adam state then lands there too.
        model = model.to(device)
        trainer = Trainer.create(model, params.train_config(), len(train_images), capturable=graphed, device=device,
                                 shard=shard, reduce=_all_reduce)
        state = _restore(trainer)
        trainer.model = ray.train.torch.prepare_model(model)
        # CPU workers only: on an H200 the compiled step took 2.3 ms, the CUDA graph's 0.47 ms, and
        # torch 2.11 (a GPU node's own) fails to compile DReG. DDP first: PyTorch's order for the pair.
        if params.train.compile and device.type == "cpu":
            trainer.model = compile_model(trainer.model, device, params.train.grad_estimator == "dreg")
        state.nodes = _node_ids(shard.world)
        validation = tuple(t.to(device) for t in validation_set(
            val_images, params.train.seed, model.config.noise_dim, params.data.binarize == "dynamic"))
        train_images = train_images.to(device)
        if graphed:
            train_epoch = graphed_epoch(trainer, train_images)
        else:
            def train_epoch(epoch: int) -> dict:
                return trainer.epoch(train_images, epoch)
        log = _mlflow_logger(context) if shard.rank == 0 else None
        return cls(params, context, model, trainer, train_epoch, len(train_images), validation, state, log)

    def replay_history(self) -> None:
        """Resumed from a run logged elsewhere (a rerun's new MLflow run): give this run the history."""
        if self.log and self.state.run_id != self.context.run_id:
            for row in self.state.history:
                self.log({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    def run_epoch(self, epoch: int) -> None:
        start = time.perf_counter()
        train = self.train_epoch(epoch)
        val = validate(self.model, *self.validation, self.trainer.device, self.trainer.shard, _all_reduce)
        seconds = time.perf_counter() - start
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()},
               **{f"val_{k}": v for k, v in val.items()},
               "epoch_seconds": seconds, "samples_per_second": self.train_size / seconds}
        self.state.record(row, self.model.state_dict(), self.context.run_id)
        if self.log:
            self.log({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
            print(f"epoch {epoch + 1:>3}/{self.params.train.epochs}  train {train['neg_elbo']:8.3f}  "
                  f"val {val['neg_elbo']:8.3f}  {seconds:6.1f} s  {row['samples_per_second']:8.0f} img/s",
                  flush=True)
        if self.checkpoint_due(epoch):
            _report(self.state, self.trainer, row, self.context.storage)
            self.last_checkpoint = time.monotonic()

    def checkpoint_due(self, epoch: int) -> bool:
        """After the last epoch, and after another once train.checkpoint_seconds have passed since
        the last checkpoint: by rank 0's clock, since every rank must report to Ray together."""
        if epoch + 1 == self.params.train.epochs:
            return True
        return _agreed(time.monotonic() - self.last_checkpoint >= self.params.train.checkpoint_seconds,
                       self.trainer.device)


def _agreed(flag: bool, device: torch.device) -> bool:
    """Rank 0's flag, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)  # on the device: NCCL sends only those
    dist.broadcast(value, src=0)
    return bool(value.item())


def _restore(trainer: Trainer) -> TrainState:
    """Training state from Ray's latest checkpoint (a restarted worker group, or a rerun)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    saved = read_checkpoint(checkpoint)
    trainer.model.load_state_dict(saved["model"])
    trainer.load_state_dict(saved)
    return TrainState.from_checkpoint(saved)


class CheckpointError(RuntimeError):
    """A checkpoint of the Ray run that cannot be read, which every rerun would resume from, or
    cannot be written."""


def read_checkpoint(checkpoint) -> dict:
    """What a Ray checkpoint holds, read from a local copy (Ray downloads one from remote storage)."""
    try:
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder), checkpoint.path)
    except OSError as e:
        # Ray locks each download in <RAY_TMPDIR, else TMPDIR, else /tmp>/_ray_lockfiles, a folder that
        # the machine's first Ray user makes and alone may write (ray-project/ray#32776, Ray 2.60).
        if "_ray_lockfiles" not in str(e.filename):
            raise
        raise CheckpointError(f"{e.filename}: Ray's lock files for a checkpoint in remote storage cannot be made "
                              f"there ({e.strerror}); on a machine shared by several users of Ray, set RAY_TMPDIR "
                              f"to a folder of your own before Ray starts") from None


def load_checkpoint(folder: Path, where: str) -> dict:
    """What _report saved in a checkpoint's folder (a local copy of the checkpoint at `where`)."""
    try:
        return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"Ray's checkpoint {where} cannot be read ({gist(e) or type(e).__name__}). A rerun "
                              f"resumes from the run's latest checkpoint: delete the run's folder, "
                              f"{os.path.dirname(where)}, to train from the start") from None


def _report(state: TrainState, trainer: Trainer, metrics: dict, storage: str) -> None:
    """Report the epoch to Ray; rank 0 attaches the checkpoint (every rank must call report).
    A full disk or quota, here or where Ray copies the checkpoint, is named in a line."""
    import ray.train

    if trainer.shard.rank != 0:
        ray.train.report(metrics)
        return
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_serialised(Path(tmp) / "state.pt", lambda f: torch.save(state.to_checkpoint(trainer), f))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    except OSError as e:  # pyarrow's, when Ray copies it into the storage, carries the errno too
        room = no_room(e, *([storage] if "://" not in storage else []), tempfile.gettempdir())
        if room is None:
            raise
        raise CheckpointError(f"epoch {metrics['epoch']}'s checkpoint was not written into {storage}: {room}, or "
                              f"set train.storage_path to a place with room") from None


def _mlflow_logger(context: WorkerContext):
    """Rank 0's link to the run the driver created: log(metrics, epoch)."""
    from mlflow import MlflowClient

    client = MlflowClient(context.tracking_uri)
    return lambda metrics, epoch: tracking.best_effort(
        f"epoch {epoch}'s metrics", tracking.log_metrics, client, context.run_id, metrics, step=epoch)


def train_loop_per_worker(config: dict) -> None:
    worker = Worker.setup(config["params"], config["context"])
    worker.replay_history()
    for epoch in range(worker.state.epoch, worker.params.train.epochs):
        worker.run_epoch(epoch)
