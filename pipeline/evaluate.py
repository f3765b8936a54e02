"""Stage `evaluate`: the test-set ELBO, its terms and an importance-weighted log-likelihood,
in nats per image, plus image grids; all logged into the pipeline's MLflow run.

Every random draw (reparameterisation noise, IWAE samples, prior samples) comes from
`eval.seed`, so the same model always gets the same figures.
"""
from __future__ import annotations

import math

import torch
from torchvision.utils import make_grid, save_image

from pipeline import tracking
from pipeline.files import Layout, atomic_path, write_json
from pipeline.params import Params, load_params
from vae import rng
from vae.data import load_split, to_float
from vae.model import IMAGE_SHAPE, VAE
from vae.objectives import elbo_terms, iwae_log_lik


def load_model(layout: Layout) -> VAE:
    model = VAE.from_checkpoint(torch.load(layout.model, weights_only=True))
    return model.eval()


@torch.no_grad()
def test_metrics(model: VAE, x: torch.Tensor, params: Params) -> dict[str, float]:
    generator = rng.eval_generator(params.eval.seed)
    eps = torch.randn((len(x), model.config.latent_dim), generator=generator)
    sums = {"neg_elbo": 0.0, "recon": 0.0, "kl": 0.0, "nll_iwae": 0.0}
    for idx in torch.arange(len(x)).split(params.eval.batch_size):
        for name, values in elbo_terms(model, x[idx], eps[idx]).items():
            sums[name] += values.sum().item()
        sums["nll_iwae"] -= iwae_log_lik(model, x[idx], params.eval.iwae_k, generator).sum().item()
    metrics = {name: total / len(x) for name, total in sums.items()}
    metrics["bits_per_dim"] = metrics["nll_iwae"] / (math.prod(IMAGE_SHAPE) * math.log(2))
    return {**metrics, "iwae_k": params.eval.iwae_k, "test_images": len(x)}


def save_png(path, images: torch.Tensor, nrow: int) -> None:
    with atomic_path(path) as tmp:
        save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), tmp, format="PNG")


@torch.no_grad()
def save_grids(model: VAE, x: torch.Tensor, layout: Layout, params: Params) -> None:
    """Reconstructions (each row of inputs above its row of outputs) and prior samples."""
    n, per_row = min(params.eval.grid_images, len(x)), 8
    inputs = x[:n]
    mu, _ = model.encoder(inputs)
    outputs = torch.sigmoid(model.decoder(mu))
    rows = []
    for start in range(0, n, per_row):
        rows += [inputs[start:start + per_row], outputs[start:start + per_row]]
    save_png(layout.recon_plot, torch.cat(rows).reshape(-1, *IMAGE_SHAPE), per_row)
    z = torch.randn((params.eval.grid_images, model.config.latent_dim),
                    generator=rng.eval_generator(params.eval.seed + 1))
    save_png(layout.samples_plot, torch.sigmoid(model.decoder(z)).reshape(-1, *IMAGE_SHAPE), per_row)


def main() -> None:
    layout, params = Layout(), load_params()
    client, run_id = tracking.open_run(layout)
    with tracking.failing_marks(client, run_id):
        model = load_model(layout)
        images, _ = load_split(layout.data_dir, "test")
        x = to_float(images[: params.eval.max_test_images])
        metrics = test_metrics(model, x, params)
        save_grids(model, x, layout, params)
        write_json(layout.eval_metrics, metrics)
        tracking.log_metrics(client, run_id, {f"test_{k}": v for k, v in metrics.items()})
        for path in (layout.eval_metrics, layout.recon_plot, layout.samples_plot):
            client.log_artifact(run_id, str(path), "evaluation")
    print(f"evaluate: test -ELBO {metrics['neg_elbo']:.2f} nats (recon {metrics['recon']:.2f}, "
          f"KL {metrics['kl']:.2f}), IWAE k={params.eval.iwae_k} NLL {metrics['nll_iwae']:.2f} "
          f"on {len(x)} images -> {layout.eval_metrics}", flush=True)
