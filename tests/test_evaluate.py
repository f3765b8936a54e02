"""pipeline/evaluate.py on a small model trained here on real MNIST: the importance-weighted
bound's properties, active units, binarisation, and the pictures."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.evaluate import (
    ACTIVE_UNIT_VARIANCE,
    latent_stats,
    posterior_means,
    save_grids,
    save_latent_map,
    save_traversal,
    score,
    score_shard,
)
from pipeline.evaluate import test_set as load_test_set  # renamed: pytest would collect test_set
from pipeline.files import Layout
from pipeline.params import Params
from vae import rng
from vae.data import load_split, to_float
from vae.model import VAE, VAEConfig
from vae.objectives import elbo_terms, iwae_log_lik

LATENT = 8


@pytest.fixture(scope="module")
def trained(mnist_dir):
    """A small MLP VAE after 300 Adam steps on 3,000 training images, and 200 test images."""
    torch.manual_seed(0)
    train_images, _ = load_split(mnist_dir, "train")
    test_images, labels = load_split(mnist_dir, "test")
    x = to_float(train_images[:3000])
    model = VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(128,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):
        batch = x[torch.randint(len(x), (100,))]
        loss = elbo_terms(model, batch, torch.randn(len(batch), LATENT))["neg_elbo"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), to_float(test_images[:200]), labels[:200]


def params(**eval_params) -> Params:
    return Params.model_validate({"eval": eval_params})


def test_importance_weighted_bound_tightens_as_k_grows(trained):
    model, x, _ = trained
    bounds = [iwae_log_lik(model, x, k, torch.Generator().manual_seed(k)).mean().item() for k in (1, 10, 100)]
    assert bounds[0] < bounds[1] < bounds[2], bounds
    assert bounds[2] - bounds[0] > 1.0  # a trained model's posterior is not exact: k matters


def test_block_noise_estimate_does_not_depend_on_the_batching(trained):
    """The GPU's noise (rng.ImageBlocks), run here on the CPU through iwae_log_lik: the test
    images scored in batches cut mid-block get the estimate of one batch of them all."""
    model, x, _ = trained

    def estimate(start, stop):
        return iwae_log_lik(model, x[start:stop], 20, rng.image_blocks(0, "iwae", start, stop - start, "cpu"), chunk=8)

    whole = estimate(0, 200)
    pieces = torch.cat([estimate(0, 7), estimate(7, 150), estimate(150, 200)])
    # Float sums differ with the batch's shape (~1e-4 of ~130 nats); other noise moves an image by ~0.1.
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_on_a_gpu_the_estimate_does_not_depend_on_the_batch_size(trained):
    model, x, _ = trained
    small, large = (score_shard(model, x, 0, params(iwae_k=20, batch_size=b), torch.device("cuda")) for b in (7, 200))
    for name in ("neg_elbo", "recon", "kl", "nll_iwae"):
        assert small[name] == pytest.approx(large[name], rel=1e-5)


def test_estimate_does_not_depend_on_the_batch_size(trained):
    model, x, _ = trained
    small, large = (score(model, x, params(iwae_k=20, batch_size=b)) for b in (7, 200))
    for name in ("neg_elbo", "recon", "kl", "nll_iwae"):  # the same noise per image whatever the batching
        assert small[name] == pytest.approx(large[name], abs=1e-4)
    assert large["nll_iwae"] <= large["neg_elbo"]
    # Nats per image in bits per pixel.
    assert large["bits_per_dim"] == pytest.approx(large["nll_iwae"] / 784 / math.log(2))
    other_seed = score(model, x, params(iwae_k=20, batch_size=200, seed=1))
    assert other_seed["nll_iwae"] != large["nll_iwae"]  # the noise is eval.seed's


def test_shards_scored_apart_sum_to_the_figures_of_the_whole(trained):
    """What each Ray worker of eval.num_workers does, in this process: each shard's images get
    the noise of their global indexes, so the shards' sums are the whole's."""
    model, x, _ = trained
    p = params(iwae_k=20, batch_size=64)
    whole = score_shard(model, x, 0, p, torch.device("cpu"))
    halves = [score_shard(model, x[:120], 0, p, torch.device("cpu")),
              score_shard(model, x[120:], 120, p, torch.device("cpu"))]
    for name in ("neg_elbo", "recon", "kl", "nll_iwae"):
        assert halves[0][name] + halves[1][name] == pytest.approx(whole[name], rel=1e-6), name


def test_two_ray_workers_give_the_figures_of_one_process(trained, ray_address, capsys):
    """eval.num_workers: 2 shards the images over Ray workers; each image's noise comes from
    its global index, so the figures are those of one process. Each progress bar says where."""
    model, x, _ = trained
    where = "GPU" if torch.cuda.is_available() else "CPU"  # the test cluster holds this machine's GPUs
    one = score(model, x, params(iwae_k=20, batch_size=64))
    assert f"evaluate on {where}: 100%" in capsys.readouterr().err
    two = score(model, x, params(iwae_k=20, batch_size=64, num_workers=2))
    assert f"evaluate on 2 Ray workers, a {where} each: 100%" in capsys.readouterr().err
    for name in ("neg_elbo", "recon", "kl", "nll_iwae"):
        assert two[name] == pytest.approx(one[name], abs=1e-4), name
    assert two["active_units"] == one["active_units"] and two["test_images"] == len(x)


def test_active_units_count_latents_whose_posterior_mean_varies(trained):
    model, x, _ = trained
    silenced = VAE(model.config)
    silenced.load_state_dict(model.state_dict())
    with torch.no_grad():  # the mean of the first 3 latents no longer depends on the image
        silenced.encoder.head.weight[:3] = 0.0
        # The 4th's varies a little: a variance of 0.003 (a spread of 0.055), under the threshold.
        silenced.encoder.head.weight[3] *= (0.003 / posterior_means(silenced, x, 64).var(0)[3]).sqrt()
    spread = posterior_means(silenced, x, 64).var(0)
    assert (spread[:3] == 0).all() and spread[3] == pytest.approx(0.003, rel=1e-3)
    metrics = score(silenced, x, params(iwae_k=1))
    assert metrics["active_units"] == int((spread > ACTIVE_UNIT_VARIANCE).sum()) <= LATENT - 4
    assert score(model, x, params(iwae_k=1))["active_units"] > metrics["active_units"] - 3
    stats = latent_stats(posterior_means(silenced, x, 64))  # what export records for the served page
    assert sorted(stats["order"][-3:]) == [0, 1, 2] and stats["spread"][:3] == [0.0, 0.0, 0.0]
    assert [stats["spread"][d] for d in stats["order"]] == sorted(stats["spread"], reverse=True)


def test_the_test_set_is_binarised_once_from_eval_seed_under_dynamic_binarisation(tmp_path, mnist_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist").symlink_to(mnist_dir)
    layout = Layout(tmp_path)

    def images(binarize, seed=0):
        chosen = {"data": {"binarize": binarize}, "eval": {"seed": seed, "max_test_images": 100}}
        return load_test_set(layout, Params.model_validate(chosen))

    grey, labels = images("none")
    assert grey.shape == (100, 784) and len(labels) == 100 and len(grey.unique()) > 2  # grey levels as they are
    binary, _ = images("dynamic")
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    assert binary.mean().item() == pytest.approx(grey.mean().item(), abs=0.01)  # Bernoulli of the grey level
    assert torch.equal(binary, images("dynamic")[0]) and not torch.equal(binary, images("dynamic", seed=1)[0])


def test_binarisation_is_bernoulli_of_the_grey_level():
    grey = torch.full((2000, 784), 0.3)
    draws = rng.binarize(grey, rng.batch_uniform(0, 0, 0, 2000, 784))
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    assert draws.mean().item() == pytest.approx(0.3, abs=0.005)
    torch.testing.assert_close(draws, rng.binarize(grey, rng.batch_uniform(0, 0, 0, 2000, 784)))
    assert not torch.equal(draws, rng.binarize(grey, rng.batch_uniform(0, 0, 1, 2000, 784)))


def grid_cells(picture: Image.Image, rows: int, columns: int) -> torch.Tensor:
    """A picture grid's 28x28 cells (2-pixel padding), grey levels in [0, 1]: (rows, columns, 28, 28)."""
    grey = torch.from_numpy(np.asarray(picture.convert("L"), dtype=np.float32)) / 255
    # Past the first padding, each cell and the padding after it make a 30x30 tile.
    tiles = grey[2:, 2:].reshape(rows, 30, columns, 30).permute(0, 2, 1, 3)
    return tiles[:, :, :28, :28]


def test_reconstructions_sit_under_their_inputs(trained, tmp_path):
    """Each row of inputs has its reconstructions below it: on average nearer their own inputs
    than the other inputs of their row."""
    model, x, _ = trained
    layout = Layout(tmp_path)
    save_grids(model, x, layout, params(grid_images=16))
    with Image.open(layout.recon_plot) as picture:
        cells = grid_cells(picture, rows=4, columns=8)
    # The inputs' rows, to the PNG's 8 bits.
    torch.testing.assert_close(cells[::2].reshape(16, 784), x[:16], atol=1 / 255, rtol=0)
    for inputs, outputs in ((cells[0], cells[1]), (cells[2], cells[3])):
        distance = torch.cdist(outputs.reshape(8, -1), inputs.reshape(8, -1))  # [output, input]
        own, others = distance.diagonal().mean(), (distance.sum() - distance.diagonal().sum()) / 56
        assert own < 0.8 * others


def test_traversal_and_latent_map_pictures(trained, tmp_path):
    model, x, labels = trained
    mu = posterior_means(model, x, 64)
    save_traversal(model, mu, tmp_path / "traversal.png", rows=5, steps=11)
    with Image.open(tmp_path / "traversal.png") as picture:
        assert picture.size == (11 * 30 + 2, 5 * 30 + 2)  # 28-pixel cells, 2-pixel padding
        cells = grid_cells(picture, rows=5, columns=11)
    # Each row sweeps one latent from -3 to 3 with the others at 0: its middle image is z = 0 in
    # every row, and its ends differ.
    assert all(torch.equal(cells[row, 5], cells[0, 5]) for row in range(5))
    assert all((cells[row, 0] - cells[row, 10]).abs().mean() > 0.01 for row in range(5))
    for latent in (mu, mu[:, :2]):  # a PCA projection, and the 2-D latent itself
        save_latent_map(latent, labels, tmp_path / "map.png")
        with Image.open(tmp_path / "map.png") as picture:
            assert picture.size == (700, 700) and picture.format == "PNG"
    assert not list(tmp_path.glob("*.tmp"))


def test_two_layer_model_is_scored_and_drawn(trained, tmp_path):
    """Two stochastic layers: the figures and the pictures come from the same code, through
    the posterior mean of the top latent and the decoder's path through z_mid."""
    _, x, labels = trained
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, hidden_dims=(64,), mid_latent_dim=6, mid_hidden_dims=(16,))).eval()
    metrics = score(model, (x[:50] > 0.5).float(), params(iwae_k=20))
    assert metrics["neg_elbo"] == pytest.approx(metrics["recon"] + metrics["kl"])
    assert metrics["nll_iwae"] < metrics["neg_elbo"] and metrics["active_units"] <= 4
    mu = posterior_means(model, x, 64)
    assert mu.shape == (len(x), 4)
    layout = Layout(tmp_path)
    save_grids(model, x, layout, params(grid_images=16))
    save_traversal(model, mu, layout.traversal_plot, rows=4)
    for path in (layout.recon_plot, layout.samples_plot, layout.traversal_plot):
        with Image.open(path) as picture:
            assert picture.format == "PNG"
