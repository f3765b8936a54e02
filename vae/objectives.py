"""The ELBO and its terms, in nats per image, and the importance-weighted bound.

    log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || p(z))          (ELBO)
    log p(x) >= E[log mean_k p(x, z_k) / q(z_k|x)]             (IWAE, k samples; k=1 is the ELBO)

Training maximises either (`iwae_terms`); evaluation estimates log p(x) with a large k.
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


def prior_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), per latent vector."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def elbo_terms(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image reconstruction (-log p(x|z)), KL, and their sum, the negative ELBO."""
    logits, mu, logvar = model(x, eps)
    recon = -bernoulli_log_lik(logits, x)
    kl = gaussian_kl(mu, logvar)
    return {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


def _log_weights(x, logits, z, mu, logvar) -> tuple[torch.Tensor, torch.Tensor]:
    """For k latent draws z (k, N, D) and their decoded logits: log p(x|z_k) and the
    importance log-weights log p(x, z_k) - log q(z_k|x), each (k, N)."""
    log_px_z = bernoulli_log_lik(logits, x.expand(len(z), *x.shape))
    return log_px_z, log_px_z + prior_log_prob(z) - gaussian_log_prob(z, mu, logvar)


def iwae_terms(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training terms with k = len(eps) importance samples per image (eps: (k, N, D)): `loss`,
    the negative IWAE bound (Burda et al. 2015), and the ELBO's terms averaged over the k
    samples, for the logs. With k = 1 the loss is the negative ELBO with its analytic KL."""
    if len(eps) == 1:
        terms = elbo_terms(model, x, eps[0])
        return {"loss": terms["neg_elbo"], **terms}
    # Through the model's own forward (which broadcasts over the k draws): under DDP only
    # that forward's parameters get their gradients averaged across workers.
    logits, mu, logvar = model(x, eps)
    z = mu + torch.exp(0.5 * logvar) * eps  # the draws the forward decoded
    log_px_z, log_w = _log_weights(x, logits, z, mu, logvar)
    recon, kl = -log_px_z.mean(0), gaussian_kl(mu, logvar)
    return {"loss": math.log(len(eps)) - torch.logsumexp(log_w, dim=0), "neg_elbo": recon + kl,
            "recon": recon, "kl": kl}


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
        z = mu + torch.exp(0.5 * logvar) * torch.randn((min(chunk, k - start), *mu.shape), generator=generator)
        _, log_w = _log_weights(x, model.decoder(z), z, mu, logvar)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
    return total - math.log(k)
