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
