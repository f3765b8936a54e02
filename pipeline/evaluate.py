"""Stage `evaluate`: the test-set ELBO, its terms and an importance-weighted log-likelihood,
in nats per image, the active latent units, plus pictures (reconstructions, prior samples,
a latent traversal, a map of the latent space); all logged into the pipeline's MLflow run.

Every random draw (test-set binarisation, reparameterisation noise, IWAE samples, prior
samples) comes from `eval.seed`, each test image's noise from its global index, so the same
model always gets the same figures, whatever the batch size or the number of workers
(`eval.num_workers` shards the test images over Ray workers, on GPUs where the cluster has
them; one worker and no cluster score in this process, on its GPU if it has one).
"""
from __future__ import annotations

import math
import os

import torch
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from pipeline import tracking
from pipeline.files import Layout, atomic_path, write_json
from pipeline.params import Params, load_params
from vae import rng
from vae.data import load_split, to_float
from vae.model import IMAGE_SHAPE, VAE
from vae.objectives import draw_noise, elbo_terms, iwae_log_lik

# Burda et al. (2015): a latent unit is active when its posterior mean varies across images.
ACTIVE_UNIT_VARIANCE = 0.01


def test_set(layout: Layout, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images as the model sees them (binarised once from eval.seed under dynamic
    binarisation, as in the literature) and their digit labels."""
    images, labels = load_split(layout.data_dir, "test")
    x = to_float(images[: params.eval.max_test_images])
    if params.data.binarize == "dynamic":
        x = rng.binarize(x, torch.rand(x.shape, generator=rng.eval_generator(params.eval.seed, "binarize")))
    return x, labels[: len(x)]


@torch.no_grad()
def posterior_means(model: VAE, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model.posterior_mean(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


TERMS = ("neg_elbo", "recon", "kl", "nll_iwae")


@torch.no_grad()
def score_shard(model: VAE, x: torch.Tensor, start: int, params: Params, device: torch.device,
                progress: bool = False) -> dict[str, float]:
    """Each test metric summed over the images x, which are images start..start+len(x)-1 of
    the test set; each image's noise comes from eval.seed and that global index."""
    model = model.to(device).eval()
    sums = dict.fromkeys(TERMS, 0.0)
    batches = range(0, len(x), params.eval.batch_size)
    where = "GPU" if device.type == "cuda" else "CPU"
    for first in tqdm(batches, desc=f"evaluate on {where}", unit="batch", disable=not progress, mininterval=5):
        batch, index = x[first:first + params.eval.batch_size].to(device), start + first
        elbo = image_noise(params.eval.seed, "elbo", index, len(batch), device)
        eps = draw_noise(elbo, 1, len(batch), model.config.noise_dim, device)[0]
        for name, values in elbo_terms(model, batch, eps).items():
            sums[name] += values.sum().item()
        iwae = image_noise(params.eval.seed, "iwae", index, len(batch), device)
        sums["nll_iwae"] -= iwae_log_lik(model, batch, params.eval.iwae_k, iwae).sum().item()
    return sums


def image_noise(seed: int, purpose: str, start: int, count: int, device: torch.device):
    """Where the test images start..start+count-1 get their noise, keyed by their indexes either
    way: on a GPU, blocks of images drawn on it (few launches); on a CPU, a generator per
    image, as before blocks existed (its figures stay as they were). So a GPU's figures equal
    each other across batch sizes and workers, not the CPU's to the last digit."""
    if device.type == "cuda":
        return rng.image_blocks(seed, purpose, start, count, device)
    return rng.image_generators(seed, purpose, start, count)


def _shard_sums(x: torch.Tensor, params: Params, model: VAE) -> dict[str, float]:
    """All the shards' sums: as Ray tasks, one per shard (each on a GPU when the cluster has
    them) with eval.num_workers > 1, or with one worker when a configured cluster has GPUs
    and this machine none; otherwise in this process, on its GPU if it has one."""
    shards = [(int(idx[0]), x[idx]) for idx in torch.arange(len(x)).tensor_split(params.eval.num_workers)
              if len(idx)]
    local = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cluster = params.train.ray_address or os.environ.get("RAY_ADDRESS")
    if params.eval.num_workers == 1 and (local.type == "cuda" or not cluster):
        return score_shard(model, x, 0, params, local, progress=True)
    import ray

    from pipeline.ray_connect import connect_ray

    connect_ray(params.eval.num_workers, params.train.ray_address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    if params.eval.num_workers == 1 and not gpus:  # a CPU cluster: no faster than here
        return score_shard(model, x, 0, params, local, progress=True)
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_score_on_worker)
    pending = [task.remote(model.to_checkpoint(), shard, start, params) for start, shard in shards]
    total = dict.fromkeys(TERMS, 0.0)
    each = "a GPU" if gpus else "a CPU"
    with tqdm(total=len(pending), desc=f"evaluate on {len(pending)} Ray workers, {each} each", unit="shard") as bar:
        while pending:
            (done,), pending = ray.wait(pending)
            for name, value in ray.get(done).items():
                total[name] += value
            bar.update()
    return total


def _score_on_worker(checkpoint: dict, x: torch.Tensor, start: int, params: Params) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return score_shard(VAE.from_checkpoint(checkpoint), x, start, params, device)


def score(model: VAE, x: torch.Tensor, params: Params, mu: torch.Tensor | None = None) -> dict[str, float]:
    """The test metrics; mu, the posterior means of x, when the caller already has them.
    The figures do not depend on the batch size, the worker count or where they ran."""
    sums = _shard_sums(x, params, model)
    model.cpu()  # where the pictures are drawn
    metrics = {name: total / len(x) for name, total in sums.items()}
    metrics["bits_per_dim"] = metrics["nll_iwae"] / (math.prod(IMAGE_SHAPE) * math.log(2))
    spread = (posterior_means(model, x, params.eval.batch_size) if mu is None else mu).var(0)
    metrics["active_units"] = int((spread > ACTIVE_UNIT_VARIANCE).sum())
    return {**metrics, "iwae_k": params.eval.iwae_k, "test_images": len(x)}


def latent_stats(mu: torch.Tensor) -> dict:
    """How much the model uses each latent dimension: the spread (standard deviation) of the
    test set's posterior means along it, and the dimensions ordered by it, most used first.
    Export records both in the ONNX decoder; the served page orders its sliders by them."""
    spread = mu.std(0)
    return {"order": spread.argsort(descending=True).tolist(), "spread": [round(s, 6) for s in spread.tolist()]}


def save_png(path, images: torch.Tensor, nrow: int) -> None:
    with atomic_path(path) as tmp:
        save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), tmp, format="PNG")


@torch.no_grad()
def save_grids(model: VAE, x: torch.Tensor, layout: Layout, params: Params) -> None:
    """Reconstructions (each row of inputs above its row of outputs) and prior samples."""
    n, per_row = min(params.eval.grid_images, len(x)), 8
    inputs = x[:n]
    outputs = torch.sigmoid(model.decode(model.posterior_mean(inputs)))
    rows = []
    for start in range(0, n, per_row):
        rows += [inputs[start:start + per_row], outputs[start:start + per_row]]
    save_png(layout.recon_plot, torch.cat(rows).reshape(-1, *IMAGE_SHAPE), per_row)
    z = model.sample_prior(params.eval.grid_images, rng.eval_generator(params.eval.seed, "samples"))
    save_png(layout.samples_plot, torch.sigmoid(model.decode(z)).reshape(-1, *IMAGE_SHAPE), per_row)


@torch.no_grad()
def save_traversal(model: VAE, mu: torch.Tensor, path, rows: int = 10, steps: int = 11) -> None:
    """One row per latent dimension (the most used first, by the spread of the test set's
    posterior means): that dimension swept from -3 to 3, the others held at 0."""
    dims = mu.var(0).argsort(descending=True)[:rows]
    z = torch.zeros(len(dims), steps, model.config.latent_dim)
    for row, dim in enumerate(dims):
        z[row, :, dim] = torch.linspace(-3, 3, steps)
    images = torch.sigmoid(model.decode(z.reshape(-1, model.config.latent_dim)))
    save_png(path, images.reshape(-1, *IMAGE_SHAPE), steps)


def save_latent_map(mu: torch.Tensor, labels: torch.Tensor, path) -> None:
    """The test set's posterior means coloured by digit: the latent plane itself when it is
    2-D, else its first two principal components."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    if mu.shape[1] == 2:
        points, axes, title = mu, ("z[0]", "z[1]"), "Latent means of the test images"
    else:
        centred = mu - mu.mean(0)
        components = torch.linalg.svd(centred, full_matrices=False).Vh[:2]
        points, axes = centred @ components.T, ("PC 1", "PC 2")
        title = f"Latent means of the test images (PCA of {mu.shape[1]} dimensions)"
    fig, ax = plt.subplots(figsize=(7, 7), dpi=100)
    dots = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=4, alpha=0.6)
    ax.legend(*dots.legend_elements(), title="digit", loc="upper right", markerscale=1.5, fontsize=8)
    ax.set(xlabel=axes[0], ylabel=axes[1], title=title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    layout, params = Layout(), load_params()
    client, run_id = tracking.open_run(layout)
    with tracking.failing_marks(client, run_id):
        model = VAE.load(layout.model)
        x, labels = test_set(layout, params)
        mu = posterior_means(model, x, params.eval.batch_size)  # for the metrics and both latent pictures
        metrics = score(model, x, params, mu)
        save_grids(model, x, layout, params)
        save_traversal(model, mu, layout.traversal_plot)
        save_latent_map(mu, labels, layout.latent_plot)
        write_json(layout.latent_stats, latent_stats(mu))
        write_json(layout.eval_metrics, metrics)
        tracking.log_metrics(client, run_id, {f"test_{k}": v for k, v in metrics.items()})
        for path in (layout.eval_metrics, layout.recon_plot, layout.samples_plot, layout.traversal_plot,
                     layout.latent_plot):
            client.log_artifact(run_id, str(path), "evaluation")
    print(f"evaluate: test -ELBO {metrics['neg_elbo']:.2f} nats (recon {metrics['recon']:.2f}, "
          f"KL {metrics['kl']:.2f}), IWAE k={params.eval.iwae_k} NLL {metrics['nll_iwae']:.2f}, "
          f"{metrics['active_units']} active units, on {len(x)} images -> {layout.eval_metrics}", flush=True)
