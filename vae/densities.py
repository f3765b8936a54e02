"""Log-densities of the model's distributions, summed over the last dimension (nats)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def bernoulli_log_lik(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) summed over pixels, per image. x may be grayscale in [0, 1].

    Exported to ONNX (the score graph), the same value as x * logits - softplus(logits): the
    exporter decomposes binary_cross_entropy_with_logits into log(sigmoid(logits)), which
    onnxruntime computes as written, so a confident pixel (logits below -88) gives -inf
    there. PyTorch's own kernel stays for training and evaluation (their figures unchanged)."""
    if torch.compiler.is_exporting():
        return (x * logits - F.softplus(logits)).sum(-1)
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, per image."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def prior_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), per latent vector."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def mixture_log_prob(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor) -> torch.Tensor:
    """log of the equal-weight mixture (1/K) sum_k N(z; means_k, exp(logvars_k)), per latent
    vector z (..., d), of the K diagonal Gaussians means, logvars (K, d). The squared distances
    come from matrix products, (z - m)^2 / v = z^2 / v - 2 z m / v + m^2 / v: memory (..., K),
    not (..., K, d), which for L_5000's 64 samples of 1,000 images and 500 components is 6 GB."""
    precision = torch.exp(-logvars)  # (K, d)
    flat = z.reshape(-1, z.shape[-1])
    squared = flat.pow(2) @ precision.T - 2 * flat @ (means * precision).T + (means.pow(2) * precision).sum(-1)
    components = -0.5 * (z.shape[-1] * LOG_2PI + logvars.sum(-1) + squared)  # (M, K)
    return (torch.logsumexp(components, dim=-1) - math.log(len(means))).reshape(z.shape[:-1])
