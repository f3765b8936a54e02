"""The whole training step (forward, backward, Adam) captured once as a CUDA graph and replayed.

A model this small is bound on a GPU by launching its few hundred small kernels per step, not
by their arithmetic; a replay launches them all at once (PyTorch's CUDA-graph notes,
"Whole-network capture"). With one GPU:

    torch.manual_seed(config.seed)
    model = VAE(VAEConfig()).cuda()
    trainer = Trainer.create(model, config, len(images), capturable=True, device=torch.device("cuda"))
    graphed = GraphedTrainer(trainer, images.cuda())
    for epoch in range(config.epochs):
        print(graphed.epoch(epoch))

It walks the epoch as Trainer.epoch does, with the same order, noise and binarisation draws
(vae/rng.py, made on the GPU), loss, optimiser and schedule; only the launching differs. Each
step the host draws the batch's numbers into the graph's static buffers, replays the graph, and
steps the schedule, which writes the learning rate and Adam's beta1 into the device tensors the
graph reads. Two graphs: the full batch's and the epoch's last, smaller batch's. On a CPU, which
has no graphs, each "replay" runs the same step eagerly: the tests check the walk that way.

One worker only: capturing DDP's all-reduce too needs NCCL on a side stream and uniform capture
on every rank (PyTorch issue 89546), so several GPU workers train eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vae import rng
from vae.data import to_float
from vae.graph_adam import GraphAdam
from vae.model import INPUT_DIM
from vae.training import TERMS, Trainer, batch_sums, means

# Eager steps before capture, as PyTorch's example does: the first steps create Adam's state
# and let cuBLAS pick its kernels, neither of which a capture may do. Undone after.
WARMUP_STEPS = 3


@dataclass
class _Step:
    """One step for a batch size: its static buffers (refilled, never reallocated) and how it runs."""
    index: torch.Tensor  # (b,) int64: the batch's rows of the training images
    eps: torch.Tensor  # (b, k, noise_dim): drawn as rng.batch_noise draws it
    uniform: torch.Tensor | None  # (b, 784): the binarisation draws, under dynamic binarisation
    replay: Callable[[], None] = lambda: None


class GraphedTrainer:
    """A one-worker Trainer (created with capturable=True) whose steps replay CUDA graphs."""

    def __init__(self, trainer: Trainer, images: torch.Tensor):
        if trainer.shard.world != 1:
            raise ValueError(f"CUDA-graph training runs one worker, not {trainer.shard.world}")
        if not isinstance(trainer.optimizer, GraphAdam):
            raise ValueError("CUDA-graph training needs Trainer.create(..., capturable=True): its GraphAdam")
        self.trainer, self.images = trainer, images  # images: uint8, on the device, read by the graphs
        self.sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64, device=trainer.device)
        self.beta1 = _hyperparameters_as_tensors(trainer.optimizer, trainer.device)
        size, last = trainer.config.batch_size, len(images) % trainer.config.batch_size
        self.steps = {b: self._prepare(b) for b in sorted({min(size, len(images)), last}) if b}

    def epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training images: the mean terms, as Trainer.epoch returns them."""
        trainer, config = self.trainer, self.trainer.config
        trainer.model.train()
        trainer.start_epoch(epoch)
        self.sums.zero_()
        order = rng.epoch_order(config.seed, epoch, len(self.images), trainer.device)
        for step, batch in enumerate(order.split(config.batch_size)):
            captured = self.steps[len(batch)]
            captured.index.copy_(batch)
            rng.batch_noise(config.seed, epoch, step, len(batch), trainer.noise_dim, config.iwae_k,
                            trainer.device, out=captured.eps)
            if captured.uniform is not None:
                rng.batch_uniform(config.seed, epoch, step, len(batch), INPUT_DIM, trainer.device,
                                  out=captured.uniform)
            captured.replay()
            trainer.schedule.step()
            self._beta1_as_tensor()
        return means(self.sums.clone())

    def _body(self, step: _Step) -> None:
        """What is captured: Trainer.step less zeroing the gradients and stepping the schedule."""
        x = to_float(self.images.index_select(0, step.index))
        if step.uniform is not None:
            x = rng.binarize(x, step.uniform)
        terms = self.trainer.update(x, step.eps.transpose(0, 1), len(step.index))
        self.sums += batch_sums(terms)

    def _eager(self, step: _Step) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self._body(step)

    def _prepare(self, batch: int) -> _Step:
        """The step for this batch size, warmed up and, on CUDA, captured."""
        trainer, config, device = self.trainer, self.trainer.config, self.trainer.device
        step = _Step(index=torch.arange(batch, device=device),  # real images for the warm-up
                     eps=torch.randn((batch, config.iwae_k, trainer.noise_dim), device=device),
                     uniform=torch.rand((batch, INPUT_DIM), device=device) if config.binarize else None)
        before = _snapshot(trainer.optimizer)
        if device.type != "cuda":
            for _ in range(WARMUP_STEPS):
                self._eager(step)
            _restore(trainer.optimizer, before)
            step.replay = lambda: self._eager(step)
            return step
        side = torch.cuda.Stream(device)  # warm-up off the default stream, as PyTorch's notes say
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._eager(step)
        torch.cuda.current_stream(device).wait_stream(side)
        _restore(trainer.optimizer, before)
        # Gradients None before capture: the graph's backward then assigns them at each replay.
        trainer.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body(step)
        step.replay = graph.replay
        return step

    def _beta1_as_tensor(self) -> None:
        """OneCycleLR sets beta1 as a number each step; a graph reads only the tensor it captured."""
        for group, beta1 in zip(self.trainer.optimizer.param_groups, self.beta1):
            if group["betas"][0] is not beta1:
                beta1.fill_(group["betas"][0])
                group["betas"] = (beta1, *group["betas"][1:])


def _hyperparameters_as_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> list[torch.Tensor]:
    """Each group's learning rate and beta1 as tensors on the device, which GraphAdam reads at
    every step (the schedule fills the learning rate's in place); returns the beta1 tensors.
    beta2, which no schedule changes, stays a number: its update passes 1 - beta2 where only a
    number goes (addcmul_'s value), and a tensor there would be read back to the host."""
    beta1 = []
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["betas"] = (torch.tensor(float(group["betas"][0]), device=device), float(group["betas"][1]))
        beta1.append(group["betas"][0])
    return beta1


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _snapshot(optimizer: torch.optim.Optimizer) -> dict:
    params = _params(optimizer)
    return {"params": [p.detach().clone() for p in params],
            "state": {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params
                      if p in optimizer.state}}


@torch.no_grad()
def _restore(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The parameters and Adam's state as they were, in place (a graph holds their addresses);
    state the warm-up created is zeroed, as a fresh Adam's is."""
    params = _params(optimizer)
    for p, value in zip(params, saved["params"]):
        p.copy_(value)
    for p in params:
        for name, tensor in optimizer.state[p].items():
            if p in saved["state"]:
                tensor.copy_(saved["state"][p][name])
            else:
                tensor.zero_()
