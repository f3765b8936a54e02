"""The ELBO and its terms, in nats per image, and the importance-weighted bound.

    log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || p(z))          (ELBO)
    log p(x) >= E[log mean_k p(x, z_k) / q(z_k|x)]             (IWAE, k samples; k=1 is the ELBO)

Training maximises either (`iwae_terms`); evaluation estimates log p(x) with a large k.
The model's forward gives the per-sample terms (see VAE.forward).
"""
from __future__ import annotations

import math

import torch

from vae import rng
from vae.model import VAE


def elbo_terms(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image reconstruction (-log p(x|z)), KL, and their sum, the negative ELBO; one
    sample per image (eps: (N, noise_dim))."""
    log_px_z, _, kl = model(x, eps[None])
    recon = -log_px_z[0]
    return {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


def iwae_terms(model: VAE, x: torch.Tensor, eps: torch.Tensor, dreg: bool = False,
               kl_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Training terms with k = len(eps) importance samples per image (eps: (k, N, noise_dim)):
    `loss`, the negative IWAE bound (Burda et al. 2015), and the ELBO's terms averaged over
    the k samples, for the logs. With k = 1 the loss is the negative ELBO itself.
    dreg: the loss's encoder gradients are the doubly reparameterised ones (k > 1).
    kl_weight: KL warm-up's b in [0, 1] (a tensor, so a CUDA graph reads it): the loss's
    log-weights are log p(x|z) + b (log p(z) - log q(z|x)), with k = 1 the reconstruction plus
    b KL; None, as 1, with no multiplication. The logged terms are the unweighted ones."""
    if dreg and len(eps) == 1:
        raise ValueError("doubly reparameterised gradients need k > 1 importance samples")
    # One call of the model's forward: under DDP only that forward's parameters get their
    # gradients averaged across workers.
    log_px_z, log_ratio, kl = model(x, eps, dreg, kl_weight)
    recon = -log_px_z.mean(0)
    if kl_weight is None:
        bound_kl, bound_ratio = kl, log_ratio
    else:  # KL warm-up: the bound's prior-to-posterior part weighted by b; the logged terms unweighted
        bound_kl, bound_ratio = kl_weight * kl, kl_weight * log_ratio
    bound = recon + bound_kl if len(eps) == 1 else math.log(len(eps)) - torch.logsumexp(log_px_z + bound_ratio, dim=0)
    return {"loss": bound, "neg_elbo": recon + kl, "recon": recon, "kl": kl}


Noise = torch.Generator | list[torch.Generator] | rng.ImageBlocks | torch.Tensor


def draw_noise(generator: Noise, samples: int, images: int, dim: int, device: torch.device) -> torch.Tensor:
    """Standard normal noise (samples, images, dim) on `device`: from one generator, from one
    generator per image (each image's column from its own), or from blocks of images
    (rng.ImageBlocks), drawn where the generators live. (A tensor of noise is sliced by the caller.)"""
    if isinstance(generator, torch.Generator):
        return torch.randn((samples, images, dim), generator=generator, device=generator.device).to(device)
    if isinstance(generator, rng.ImageBlocks):
        return generator.draw(samples, dim).to(device)
    return torch.stack([torch.randn((samples, dim), generator=g, device=g.device) for g in generator], 1).to(device)


@torch.no_grad()
def iwae_log_lik(model: VAE, x: torch.Tensor, k: int, generator: Noise, chunk: int = 64) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) per image, with k samples from q(z|x).

    The k samples are drawn `chunk` at a time and combined with a running logsumexp, so
    memory stays at (N, chunk) whatever k is. The noise comes from one generator, one per
    image, or blocks of images (see draw_noise); or is given, (k, N, noise_dim), as a served
    score's noise is (to check one against the other).
    """
    features = model.encoder.body(x)
    mu, logvar = model.encoder.gaussian(features)
    total = torch.full((len(x),), -math.inf, device=x.device)
    for start in range(0, k, chunk):
        if isinstance(generator, torch.Tensor):
            eps = generator[start:start + chunk].to(x.device)
        else:
            eps = draw_noise(generator, min(chunk, k - start), len(x), model.config.noise_dim, x.device)
        log_px_z, log_ratio, _ = model.sample_terms(x, mu, logvar, eps, features=features)
        total = torch.logaddexp(total, torch.logsumexp(log_px_z + log_ratio, dim=0))
    return total - math.log(k)
