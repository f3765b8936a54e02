"""Randomness drawn from the seed and the position in training, never from process state.

Each epoch's data order and each global batch's reparameterisation noise and binarisation
draws come from a generator seeded by (seed, epoch[, step]). Every worker computes the same global values
and takes its own slice, so the model does not depend on how many workers there are.

Training draws on its own device: on CUDA the same keys seed CUDA generators, so a GPU step
never waits for numbers made on the host. A GPU model therefore equals itself across worker
counts, not the CPU model bit for bit (the two devices' generators make different numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_EPOCH_STREAM, _NOISE_STREAM, _EVAL_STREAM, _BINARIZE_STREAM, _IMAGE_STREAM, _BLOCK_STREAM = 1, 2, 3, 4, 5, 6


def _generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    # Mix the key into one 63-bit seed; distinct keys give unrelated streams.
    seed = 0
    for part in key:
        seed = (seed * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def epoch_order(seed: int, epoch: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The permutation of the n training images for this epoch, made on `device`."""
    generator = _generator(seed, _EPOCH_STREAM, epoch, device=device)
    return torch.randperm(n, generator=generator, device=generator.device)


def batch_noise(seed: int, epoch: int, step: int, batch: int, noise_dim: int, samples: int = 1,
                device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal noise for every image of one global batch: (batch, samples, noise_dim),
    `samples` importance samples per image, drawn on `device` (into `out` when given)."""
    generator = _generator(seed, _NOISE_STREAM, epoch, step, device=device)
    return torch.randn((batch, samples, noise_dim), generator=generator, device=generator.device, out=out)


def batch_uniform(seed: int, epoch: int, step: int, batch: int, pixels: int, device: torch.device | str = "cpu",
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform draws in [0, 1) for every pixel of one global batch (dynamic binarisation)."""
    generator = _generator(seed, _BINARIZE_STREAM, epoch, step, device=device)
    return torch.rand((batch, pixels), generator=generator, device=generator.device, out=out)


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


# On a GPU, one generator per image costs a kernel launch per image and chunk of samples (L_5000
# on 10,000 test images: 24.1 s on an H200, against 1.9 s from one generator). Blocks of this
# many consecutive images share a generator instead; each image still has draws of its own.
IMAGE_BLOCK = 100


@dataclass
class ImageBlocks:
    """Noise for test images start..start+count-1, drawn for whole blocks of IMAGE_BLOCK images
    (one generator per block, keyed by the block's index) and then sliced: an image's draws are
    the same whatever batch or shard scores it, as with a generator per image, in a few large
    draws. Each draw advances every block's generator by the same amount, whichever images
    of the block are wanted."""
    generators: list[torch.Generator]
    offset: int  # the first image's row in the first block
    count: int

    def draw(self, samples: int, dim: int) -> torch.Tensor:
        """(samples, count, dim) standard normal, on the generators' device."""
        blocks = [torch.randn((samples, IMAGE_BLOCK, dim), generator=g, device=g.device) for g in self.generators]
        return torch.cat(blocks, 1)[:, self.offset:self.offset + self.count]


def image_blocks(seed: int, purpose: str, start: int, count: int, device: torch.device | str) -> ImageBlocks:
    """The blocks of images start..start+count-1 for `purpose` (see IMAGE_PURPOSES), on `device`."""
    first, last = start // IMAGE_BLOCK, (start + count - 1) // IMAGE_BLOCK
    generators = [_generator(seed, _BLOCK_STREAM, IMAGE_PURPOSES[purpose], block, device=device)
                  for block in range(first, last + 1)]
    return ImageBlocks(generators, start - first * IMAGE_BLOCK, count)
