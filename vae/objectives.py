"""The ELBO and its terms, in nats per image, and the importance-weighted bound.

    log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || p(z))          (ELBO)
    log p(x) >= E[log mean_k p(x, z_k) / q(z_k|x)]             (IWAE, k samples; k=1 is the ELBO)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vae.model import VAE

LOG_2PI = math.log(2 * math.pi)


def bernoulli_log_lik(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) summed over pixels, per image. x may be grayscale in [0, 1]."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, per image."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def elbo_terms(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image reconstruction (-log p(x|z)), KL, and their sum, the negative ELBO."""
    logits, mu, logvar = model(x, eps)
    recon = -bernoulli_log_lik(logits, x)
    kl = gaussian_kl(mu, logvar)
    return {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


@torch.no_grad()
def iwae_log_lik(model: VAE, x: torch.Tensor, k: int, generator: torch.Generator,
                 chunk: int = 64) -> torch.Tensor:
    """Importance-weighted estimate of log p(x) per image, with k samples from q(z|x).

    The k samples are drawn `chunk` at a time and combined with a running logsumexp, so
    memory stays at (N, chunk) whatever k is.
    """
    mu, logvar = model.encoder(x)
    total = torch.full((len(x),), -math.inf)
    for start in range(0, k, chunk):
        m = min(chunk, k - start)
        eps = torch.randn((m, *mu.shape), generator=generator)
        z = mu + torch.exp(0.5 * logvar) * eps                      # (m, N, D)
        log_px_z = bernoulli_log_lik(model.decoder(z), x.expand(m, *x.shape))
        log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz = gaussian_log_prob(z, mu, logvar)
        total = torch.logaddexp(total, torch.logsumexp(log_px_z + log_pz - log_qz, dim=0))
    return total - math.log(k)
