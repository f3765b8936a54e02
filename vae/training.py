"""One training step and one epoch over in-memory tensors, on any device: the maths of
training, with nothing but torch.

Every worker of a data-parallel run walks the same global batches (order and noise drawn
from the seed, epoch and step: see vae/rng.py) and trains on its slice of each (`Shard`);
the loss is scaled so that averaging the workers' gradients (DDP) gives the global-batch
mean, whatever the worker count. With one worker and no reduction this is plain training:

    model = VAE(VAEConfig())
    trainer = Trainer.create(model, config, train_images=len(images))
    for epoch in range(config.epochs):
        print(trainer.epoch(images, epoch))
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vae import rng
from vae.data import to_float
from vae.graph_adam import GraphAdam
from vae.model import VAE
from vae.objectives import elbo_terms, iwae_terms

TERMS = ("neg_elbo", "recon", "kl")


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained: no defaults here, pipeline/params.py fills it from params.yaml."""
    seed: int
    epochs: int
    batch_size: int  # global: split across the workers
    lr: float  # the peak, under the one-cycle schedule
    lr_schedule: str  # onecycle | constant
    iwae_k: int  # importance samples per image in the bound (1: the ELBO)
    dreg: bool  # doubly reparameterised encoder gradients (see VAE.forward)
    binarize: bool  # each batch resampled as Bernoulli(pixel)
    bf16: bool  # bf16 autocast, on CUDA only
    kl_warmup_epochs: int  # KL warm-up: the KL weight rises linearly to 1 over these epochs (0: none)

    def kl_weight(self, epoch: int) -> float | None:
        """KL warm-up's weight in epoch `epoch` (from 0): (epoch + 1) / kl_warmup_epochs up to 1,
        Tomczak & Welling's linear ramp; None without warm-up."""
        return min(1.0, (epoch + 1) / self.kl_warmup_epochs) if self.kl_warmup_epochs else None


@dataclass(frozen=True)
class Shard:
    """This worker's part of every global batch: slice `rank` of `world`."""
    rank: int = 0
    world: int = 1

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t.tensor_split(self.world)[self.rank]


def batch_sums(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """[sum of each term, number of images] of one batch, kept on the device (no host sync)."""
    # new_full, not new_tensor: a fill, with no copy from the host that a CUDA graph could not capture.
    count = terms[TERMS[0]].new_full((), float(len(terms[TERMS[0]])))
    return torch.stack([*(terms[k].detach().sum() for k in TERMS), count]).double()


def means(sums: torch.Tensor, reduce: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
    """Each term's mean over the images; `reduce` sums `sums` in place across workers first."""
    if reduce:
        reduce(sums)
    sums = sums.cpu()
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(TERMS)}


def learning_rate_schedule(optimizer, config: TrainConfig, train_images: int):
    """Per global step, so the same on every worker: one-cycle (warm up to config.lr over the
    first 10% of steps, then anneal) or constant. A smoke run too short to warm up and
    anneal gets the constant rate."""
    steps = config.epochs * math.ceil(train_images / config.batch_size)
    if config.lr_schedule == "constant" or steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # At least two warm-up steps: OneCycleLR divides by the warm-up length minus one.
    warmup = max(0.1, 2 / steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=warmup)


@dataclass
class Trainer:
    """The model, its optimiser and schedule, and where this worker trains."""
    model: nn.Module  # what computes the loss: the VAE, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    noise_dim: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    shard: Shard = Shard()
    reduce: Callable[[torch.Tensor], None] | None = None  # in-place sum across workers
    # KL warm-up's weight (TrainConfig.kl_weight) as a device tensor, filled in place each
    # epoch (a CUDA graph reads it); None without warm-up.
    kl_weight: torch.Tensor | None = None

    def __post_init__(self):
        if self.config.kl_warmup_epochs and self.kl_weight is None:
            self.kl_weight = torch.ones((), device=self.device)

    def start_epoch(self, epoch: int) -> None:
        """What changes per epoch and not per step: the KL weight under warm-up."""
        if self.kl_weight is not None:
            self.kl_weight.fill_(self.config.kl_weight(epoch))

    @classmethod
    def create(cls, model: VAE, config: TrainConfig, train_images: int, capturable: bool = False,
               **where) -> "Trainer":
        """capturable: the Adam vae/cuda_graph.py captures, which reads its learning rate and
        beta1 from tensors (vae/graph_adam.py)."""
        if capturable:
            optimizer = GraphAdam(model.parameters(), lr=config.lr)
        else:
            # Fused: one kernel for every parameter, instead of a dozen ops each (a third of a CPU step).
            optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
        return cls(model, optimizer, learning_rate_schedule(optimizer, config, train_images), config,
                   model.config.noise_dim, **where)

    def step(self, x: torch.Tensor, eps: torch.Tensor, global_batch: int) -> dict[str, torch.Tensor]:
        """One optimiser step on this worker's images x and noise eps (k, images, noise_dim)."""
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.update(x, eps, global_batch)
        self.schedule.step()
        return terms

    def update(self, x: torch.Tensor, eps: torch.Tensor, global_batch: int) -> dict[str, torch.Tensor]:
        """Forward, backward and the optimiser's update, the part of a step a CUDA graph captures:
        no host sync, gradients assigned (not accumulated) only if they were set to None before."""
        with self._autocast():
            terms = iwae_terms(self.model, x, eps, dreg=self.config.dreg, kl_weight=self.kl_weight)
        # DDP averages over workers: scaling by world/global_batch makes that the global mean.
        loss = terms["loss"].sum() * self.shard.world / global_batch
        loss.backward()
        self.optimizer.step()
        return terms

    def _autocast(self):
        """bf16 autocast on CUDA when asked for, else nothing (on any device, `meta` included,
        where the tests run the captured step). No autocast cache: a CUDA graph must not keep
        casts made outside it (and one forward casts each weight once anyway)."""
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        """The optimiser and schedule as host tensors and numbers: a checkpoint made on a GPU
        loads on a machine without one, and resumes on either path of any device."""
        optimizer = to_host(self.optimizer.state_dict())
        for group in optimizer["param_groups"]:
            group["lr"] = float(group["lr"])
            group["betas"] = tuple(float(b) for b in group["betas"])
        return {"optimizer": optimizer, "schedule": to_host(self.schedule.state_dict())}

    def load_state_dict(self, saved: dict) -> None:
        # A saved group also carries how its Adam ran (fused, foreach, capturable): keep this one's.
        flags = [{k: group[k] for k in _ADAM_IMPLEMENTATION} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved["optimizer"])
        for group, own in zip(self.optimizer.param_groups, flags):
            group.update(own)
        self.schedule.load_state_dict(saved["schedule"])

    def epoch(self, images: torch.Tensor, epoch: int) -> dict[str, float]:
        """One pass over the uint8 training images (on self.device); the mean terms over all workers."""
        self.model.train()
        self.start_epoch(epoch)
        config, shard, device = self.config, self.shard, self.device
        sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64, device=device)
        order = rng.epoch_order(config.seed, epoch, len(images), device)
        for step, batch in enumerate(order.split(config.batch_size)):
            eps = rng.batch_noise(config.seed, epoch, step, len(batch), self.noise_dim, config.iwae_k, device)
            eps = shard.take(eps).transpose(0, 1)  # (k, images, noise_dim)
            # index_select: the same rows as images[...], without advanced indexing's overhead.
            x = to_float(images.index_select(0, shard.take(batch)))
            if config.binarize:  # drawn for the global batch, then sliced, like eps
                uniform = rng.batch_uniform(config.seed, epoch, step, len(batch), x.shape[1], device)
                x = rng.binarize(x, shard.take(uniform))
            sums += batch_sums(self.step(x, eps, len(batch)))
        return means(sums, self.reduce)


# What Adam.load_state_dict would otherwise take from the checkpoint's param groups.
_ADAM_IMPLEMENTATION = ("fused", "foreach", "capturable")


def to_host(value):
    """value with every tensor in it (in dicts, lists, tuples) on the CPU: no copy of those already there."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


def validation_set(images: torch.Tensor, seed: int, noise_dim: int, binarize: bool):
    """The validation images as model inputs (binarised once, if so) and their noise, both
    fixed for the whole run."""
    generator = rng.eval_generator(seed)
    x = to_float(images)
    eps = torch.randn((len(x), noise_dim), generator=generator)
    if binarize:
        x = rng.binarize(x, torch.rand(x.shape, generator=generator))
    return x, eps


@torch.no_grad()
def validate(model: VAE, x: torch.Tensor, eps: torch.Tensor, device: torch.device | None = None,
             shard: Shard = Shard(), reduce: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
    """Mean terms on the validation set: this worker's slice, then over all workers."""
    model.eval()
    idx = shard.take(torch.arange(len(x), device=x.device))
    terms = elbo_terms(model, x[idx].to(device), eps[idx].to(device))
    return means(batch_sums(terms), reduce)
