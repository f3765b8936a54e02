"""Randomness drawn from the seed and the position in training, never from process state.

Each epoch's data order and each global batch's reparameterisation noise and binarisation
draws come from a generator seeded by (seed, epoch[, step]). Every worker computes the same global values
and takes its own slice, so the model does not depend on how many workers there are.
"""
from __future__ import annotations

import torch

_EPOCH_STREAM, _NOISE_STREAM, _EVAL_STREAM, _BINARIZE_STREAM, _IMAGE_STREAM = 1, 2, 3, 4, 5


def _generator(*key: int) -> torch.Generator:
    # Mix the key into one 63-bit seed; distinct keys give unrelated streams.
    seed = 0
    for part in key:
        seed = (seed * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of the n training images for this epoch."""
    return torch.randperm(n, generator=_generator(seed, _EPOCH_STREAM, epoch))


def batch_noise(seed: int, epoch: int, step: int, batch: int, noise_dim: int, samples: int = 1) -> torch.Tensor:
    """Standard normal noise for every image of one global batch: (batch, samples, noise_dim),
    `samples` importance samples per image."""
    return torch.randn((batch, samples, noise_dim), generator=_generator(seed, _NOISE_STREAM, epoch, step))


def batch_uniform(seed: int, epoch: int, step: int, batch: int, pixels: int) -> torch.Tensor:
    """Uniform draws in [0, 1) for every pixel of one global batch (dynamic binarisation)."""
    return torch.rand((batch, pixels), generator=_generator(seed, _BINARIZE_STREAM, epoch, step))


def binarize(x: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Each pixel 1 with probability its grey level: Bernoulli(x), from the given draws."""
    return (uniform < x).to(x.dtype)


# Evaluation's streams, by name: distinct for one seed, and unrelated across seeds (no
# `seed + 1`, under which seed 1's scoring noise would be seed 0's samples).
EVAL_PURPOSES = {"score": (), "samples": (1,), "binarize": (2,)}


def eval_generator(seed: int, purpose: str = "score") -> torch.Generator:
    """A generator for evaluation draws: "score", the noise of the validation or test ELBO
    and IWAE estimates; "samples", the prior samples drawn for pictures; "binarize", the test
    set's one binarisation."""
    if purpose not in EVAL_PURPOSES:
        raise ValueError(f"unknown evaluation stream {purpose!r} (known: {', '.join(EVAL_PURPOSES)})")
    return _generator(seed, _EVAL_STREAM, *EVAL_PURPOSES[purpose])


# The test metrics' noise, per image: the ELBO's one sample and the IWAE estimate's k.
IMAGE_PURPOSES = {"elbo": 0, "iwae": 1}


def image_generators(seed: int, purpose: str, start: int, count: int) -> list[torch.Generator]:
    """One generator per test image start..start+count-1, keyed by the image's global index:
    its noise is the same whatever the batch, the shard or the worker that scores it."""
    return [_generator(seed, _IMAGE_STREAM, IMAGE_PURPOSES[purpose], index) for index in range(start, start + count)]
