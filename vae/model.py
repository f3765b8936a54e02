"""The VAE: a Gaussian encoder q(z|x), a Bernoulli decoder p(x|z), and the standard normal prior.

Pure PyTorch. The architecture is chosen by a small config, so a saved model is its
state_dict plus `asdict(config)`: no pickled classes, loadable with weights_only=True.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
INPUT_DIM = 28 * 28


ARCHS = ("mlp", "conv")
# conv: two stride-2 convolutions take 28x28 to CONV_CHANNELS[-1] maps of 7x7.
CONV_CHANNELS = (32, 64)
CONV_FLAT = CONV_CHANNELS[-1] * 7 * 7


@dataclass(frozen=True)
class VAEConfig:
    latent_dim: int = 20
    hidden_dims: tuple[int, ...] = (400,)  # mlp: every hidden layer; conv: the dense layer after the convolutions
    arch: str = "mlp"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch: unknown architecture {self.arch!r} (known: {', '.join(map(repr, ARCHS))})")
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def conv_body() -> nn.Sequential:
    """(N, 784) -> (N, CONV_FLAT): 28x28 -> 14x14 -> 7x7 feature maps, flattened."""
    c1, c2 = CONV_CHANNELS
    return nn.Sequential(nn.Unflatten(1, IMAGE_SHAPE), nn.Conv2d(1, c1, 4, 2, 1), nn.ReLU(),
                         nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(), nn.Flatten())


def deconv_head() -> nn.Sequential:
    """(N, CONV_FLAT) -> (N, 784) logits: the mirror of conv_body."""
    c1, c2 = CONV_CHANNELS
    return nn.Sequential(nn.Unflatten(1, (c2, 7, 7)), nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),
                         nn.ConvTranspose2d(c1, 1, 4, 2, 1), nn.Flatten())


class Encoder(nn.Module):
    """x (N, 784) -> mean and log-variance of the diagonal Gaussian q(z|x)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        if config.arch == "conv":
            self.body = nn.Sequential(conv_body(), mlp([CONV_FLAT, *config.hidden_dims]), nn.ReLU())
        else:
            self.body = nn.Sequential(mlp([INPUT_DIM, *config.hidden_dims]), nn.ReLU())
        self.head = nn.Linear(config.hidden_dims[-1], 2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    """z (N, latent_dim) -> Bernoulli logits of the 784 pixels."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        if config.arch == "conv":
            self.net = nn.Sequential(mlp([config.latent_dim, *reversed(config.hidden_dims), CONV_FLAT]), nn.ReLU(),
                                     deconv_head())
        else:
            self.net = mlp([config.latent_dim, *reversed(config.hidden_dims), INPUT_DIM])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Any leading dims (IWAE decodes (k, N, latent) at once); convolutions want (N, latent).
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], INPUT_DIM)


class ImageDecoder(nn.Module):
    """The decoder as served: z -> pixel probabilities shaped as images (N, 1, 28, 28)."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z)).reshape(-1, *IMAGE_SHAPE)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        """Reparameterised pass: z = mu + sigma * eps, with the noise eps given by the caller
        (so it can be drawn from the seed and the sample index, not from hidden RNG state)."""
        mu, logvar = self.encoder(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decoder(z), mu, logvar

    def to_checkpoint(self) -> dict:
        return {"state_dict": self.state_dict(), "config": asdict(self.config)}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "VAE":
        model = cls(VAEConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
        return model
