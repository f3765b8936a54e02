"""vae/rng.py: randomness named by seed and position, never by process state."""
import pytest
import torch

from vae import rng


def draw(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(64, generator=generator)


def test_evaluation_streams_are_distinct_within_and_across_seeds():
    streams = {(seed, purpose): draw(rng.eval_generator(seed, purpose))
               for seed in (0, 1, 2) for purpose in rng.EVAL_PURPOSES}
    keys = list(streams)
    for i, a in enumerate(keys):
        assert torch.equal(streams[a], draw(rng.eval_generator(*a)))  # the same name, the same draws
        for b in keys[i + 1:]:
            assert not torch.equal(streams[a], streams[b]), (a, b)
    with pytest.raises(ValueError, match="unknown evaluation stream 'prior'"):
        rng.eval_generator(0, "prior")


def test_batch_noise_depends_on_position_not_on_global_state():
    first = rng.batch_noise(3, epoch=1, step=2, batch=4, noise_dim=5, samples=2)
    torch.manual_seed(123)
    assert torch.equal(first, rng.batch_noise(3, epoch=1, step=2, batch=4, noise_dim=5, samples=2))
    assert first.shape == (4, 2, 5)
    assert not torch.equal(first, rng.batch_noise(3, epoch=1, step=3, batch=4, noise_dim=5, samples=2))
