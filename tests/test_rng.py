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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU on this machine")])])
def test_block_noise_of_an_image_is_the_same_whatever_the_batch(device):
    """Images 0..249 span three blocks: drawn at once or in batches cut mid-block, each image
    gets the same draws, chunk after chunk; other purposes and seeds get others."""
    def chunks(start, count, purpose="iwae", seed=0):
        blocks = rng.image_blocks(seed, purpose, start, count, device)
        return torch.cat([blocks.draw(samples, 3) for samples in (4, 4, 2)])  # k=10 in chunks of 4

    whole = chunks(0, 250)
    assert whole.shape == (10, 250, 3) and whole.device.type == device
    pieces = torch.cat([chunks(0, 7), chunks(7, 174), chunks(181, 69)], 1)
    assert torch.equal(whole, pieces)
    assert not torch.equal(whole, chunks(0, 250, "elbo")) and not torch.equal(whole, chunks(0, 250, seed=1))
    assert not torch.equal(whole[:, :100], whole[:, 100:200])  # each block its own stream


def test_the_streams_give_the_draws_every_recorded_cpu_figure_came_from():
    """Seeds and draws as they were when the CPU figures in the README and benchmarks/RESULTS.md
    were measured. Any change to how keys become seeds (or to torch's CPU generators, at a lock
    bump) changes every CPU model and figure: it must be a decision, with this test updated."""
    assert rng.eval_generator(0).initial_seed() == 1000007
    assert rng.image_generators(0, "iwae", 5, 1)[0].initial_seed() == 1000015000065000093
    assert rng.epoch_order(0, 0, 10).tolist() == [3, 8, 9, 0, 2, 5, 4, 6, 1, 7]
    noise = [-0.2409071, -0.2221792, -0.8711038, -0.6765707, 0.0179432, -0.3601879]
    torch.testing.assert_close(rng.batch_noise(0, 0, 0, batch=2, noise_dim=3).flatten(), torch.tensor(noise),
                               rtol=1e-5, atol=1e-7)
    uniform = [0.0340671, 0.7412300, 0.6133807, 0.2996730]
    torch.testing.assert_close(rng.batch_uniform(0, 0, 0, batch=1, pixels=4).flatten(), torch.tensor(uniform),
                               rtol=1e-5, atol=1e-7)
