"""The VAE: a Gaussian encoder q(z|x), a Bernoulli decoder p(x|z), and a prior p(z): the
standard normal, or a VampPrior (Tomczak & Welling 2018: the mixture of the encoder's
posteriors at K learned pseudo-inputs); optionally a second stochastic layer between x and z
(Burda et al.'s two-layer model).

Pure PyTorch. The architecture is chosen by a small config, so a saved model is its
state_dict plus `asdict(config)`: no pickled classes, loadable with weights_only=True.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vae.densities import bernoulli_log_lik, gaussian_kl, gaussian_log_prob, mixture_log_prob, prior_log_prob

IMAGE_SHAPE = (1, 28, 28)
INPUT_DIM = 28 * 28


# The hidden layers' nonlinearity. SiLU (x * sigmoid(x)) is smooth where ReLU has a kink;
# on the paper preset it reached a given ELBO in fewer epochs at the same cost per epoch.
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
# conv: two stride-2 convolutions take 28x28 to CONV_CHANNELS[-1] maps of 7x7.
CONV_CHANNELS = (32, 64)
CONV_FLAT = CONV_CHANNELS[-1] * 7 * 7
# p(z): standard, N(0, I); vamp, the VampPrior (1/K) sum_k q(z | u_k) at K pseudo-inputs u_k.
PRIORS = ("standard", "vamp")


@dataclass(frozen=True)
class VAEConfig:
    """The architecture. Its defaults are params.yaml's (pipeline/params.py takes them from here)."""
    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (512, 256)  # mlp: every hidden layer; conv: the dense layers after the convolutions
    arch: str = "mlp"
    # Two stochastic layers, x <-> h <-> z_mid <-> h' <-> z: z_mid's size (None: one layer, x <-> h <-> z)
    # and the hidden layers h' between z_mid and z.
    mid_latent_dim: int | None = None
    mid_hidden_dims: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    prior: str = "standard"
    pseudo_inputs: int = 500  # the VampPrior's K (Tomczak & Welling used 500 on MNIST)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch: unknown architecture {self.arch!r} (known: {', '.join(map(repr, ARCHS))})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: unknown activation {self.activation!r} "
                             f"(known: {', '.join(map(repr, ACTIVATIONS))})")
        if self.prior not in PRIORS:
            raise ValueError(f"model.prior: unknown prior {self.prior!r} (known: {', '.join(map(repr, PRIORS))})")
        if self.prior == "vamp" and self.mid_latent_dim:
            raise ValueError("model.prior: vamp is implemented for one stochastic layer "
                             f"(got model.mid_latent_dim: {self.mid_latent_dim})")
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        object.__setattr__(self, "mid_hidden_dims", tuple(self.mid_hidden_dims))

    @property
    def bottom_dim(self) -> int:
        """The size of the latent next to x: z_mid with two layers, else z."""
        return self.mid_latent_dim or self.latent_dim

    @property
    def noise_dim(self) -> int:
        """Standard normal draws per sample: z_mid's then z's (see VAE.forward)."""
        return self.latent_dim + (self.mid_latent_dim or 0)


def mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    """Linear layers with the activation `act` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def conv_body(act: type[nn.Module]) -> nn.Sequential:
    """(N, 784) -> (N, CONV_FLAT): 28x28 -> 14x14 -> 7x7 feature maps, flattened."""
    c1, c2 = CONV_CHANNELS
    return nn.Sequential(nn.Unflatten(1, IMAGE_SHAPE), nn.Conv2d(1, c1, 4, 2, 1), act(),
                         nn.Conv2d(c1, c2, 4, 2, 1), act(), nn.Flatten())


def deconv_head(act: type[nn.Module]) -> nn.Sequential:
    """(N, CONV_FLAT) -> (N, 784) logits: the mirror of conv_body."""
    c1, c2 = CONV_CHANNELS
    return nn.Sequential(nn.Unflatten(1, (c2, 7, 7)), nn.ConvTranspose2d(c2, c1, 4, 2, 1), act(),
                         nn.ConvTranspose2d(c1, 1, 4, 2, 1), nn.Flatten())


def mlp_encoder_body(config: VAEConfig, act: type[nn.Module]) -> nn.Module:
    """x (N, 784) -> the last hidden layer."""
    return nn.Sequential(mlp([INPUT_DIM, *config.hidden_dims], act), act())


def conv_encoder_body(config: VAEConfig, act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(conv_body(act), mlp([CONV_FLAT, *config.hidden_dims], act), act())


def mlp_decoder_net(config: VAEConfig, act: type[nn.Module]) -> nn.Module:
    """The latent next to x (N, bottom_dim) -> Bernoulli logits (N, 784)."""
    return mlp([config.bottom_dim, *reversed(config.hidden_dims), INPUT_DIM], act)


def conv_decoder_net(config: VAEConfig, act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(mlp([config.bottom_dim, *reversed(config.hidden_dims), CONV_FLAT], act), act(),
                         deconv_head(act))


# The architectures, by the name model.arch gives: the encoder's body up to its last hidden
# layer, and the decoder's network. A new one is a pair of builders added here.
ARCHS = {"mlp": (mlp_encoder_body, mlp_decoder_net),  # dense layers only
         "conv": (conv_encoder_body, conv_decoder_net)}  # two stride-2 convolutions each way


class Gaussian(nn.Module):
    """An MLP from its input to the mean and log-variance of a diagonal Gaussian."""

    def __init__(self, sizes: list[int], act: type[nn.Module]):
        super().__init__()
        self.net = mlp([*sizes[:-1], 2 * sizes[-1]], act)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(h).chunk(2, dim=-1)
        return mu, logvar


class Encoder(nn.Module):
    """x (N, 784) -> mean and log-variance of the diagonal Gaussian q(z|x) (of z_mid with two layers)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        body, _ = ARCHS[config.arch]
        self.body = body(config, ACTIVATIONS[config.activation])
        self.head = nn.Linear(config.hidden_dims[-1], 2 * config.bottom_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    """z (N, latent_dim) -> Bernoulli logits of the 784 pixels (from z_mid with two layers)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        _, net = ARCHS[config.arch]
        self.net = net(config, ACTIVATIONS[config.activation])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Any leading dims (IWAE decodes (k, N, latent) at once); convolutions want (N, latent).
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], INPUT_DIM)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)  # q(z|x), or q(z_mid|x)
        self.decoder = Decoder(config)  # p(x|z), or p(x|z_mid)
        if config.mid_latent_dim:
            mid, top = [config.mid_latent_dim, *config.mid_hidden_dims], config.latent_dim
            act = ACTIVATIONS[config.activation]
            self.upper_encoder = Gaussian([*mid, top], act)  # q(z|z_mid)
            self.upper_decoder = Gaussian([top, *reversed(mid)], act)  # p(z_mid|z)
        if config.prior == "vamp":
            # Grey levels until init_pseudo_inputs sets them to training images (train does).
            self.pseudo_inputs = nn.Parameter(torch.full((config.pseudo_inputs, INPUT_DIM), 0.05))

    @torch.no_grad()
    def init_pseudo_inputs(self, images: torch.Tensor) -> None:
        """The VampPrior's pseudo-inputs set to these K images (N, 784), as Tomczak & Welling
        suggest (learning then moves them); nothing with the standard prior."""
        if self.config.prior == "vamp":
            self.pseudo_inputs.copy_(images[:self.config.pseudo_inputs].reshape(-1, INPUT_DIM))

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) per latent vector z (..., latent_dim)."""
        if self.config.prior == "standard":
            return prior_log_prob(z)
        return mixture_log_prob(z, *self.encoder(self.pseudo_inputs))

    def sample_prior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n draws of z from p(z), from `generator`: for the VampPrior, a component (pseudo-input)
        uniformly, then its Gaussian."""
        noise = torch.randn((n, self.config.latent_dim), generator=generator)
        if self.config.prior == "standard":
            return noise
        mu, logvar = self.encoder(self.pseudo_inputs)
        pick = torch.randint(len(mu), (n,), generator=generator)
        return mu[pick] + torch.exp(0.5 * logvar[pick]) * noise

    def forward(self, x: torch.Tensor, eps: torch.Tensor, dreg: bool = False):
        """k reparameterised samples of the latents per image, from the noise eps (k, N, noise_dim)
        given by the caller (so it can be drawn from the seed and the sample index, not from
        hidden RNG state). Returns, per sample, log p(x|z) and log p(z) - log q(z|x), each (k, N),
        and the ELBO's KL term per image: in closed form with one stochastic layer, else the
        samples' estimate. dreg: the encoder's gradients of the IWAE bound become the doubly
        reparameterised ones (see `_doubly_reparameterised`); the values do not change."""
        return self.sample_terms(x, *self.encoder(x), eps, dreg)

    def sample_terms(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor,
                     dreg: bool = False):
        """forward's terms from the encoder's output (mu, logvar), already computed for x: the
        importance-weighted estimate draws its samples in chunks and encodes x only once."""
        noise, top_noise = eps.split([self.config.bottom_dim, eps.shape[-1] - self.config.bottom_dim], dim=-1)
        z = mu + torch.exp(0.5 * logvar) * noise
        log_px_z = bernoulli_log_lik(self.decoder(z), x.expand(len(z), *x.shape))
        if not self.config.mid_latent_dim:
            if dreg and z.requires_grad:
                log_ratio = _doubly_reparameterised(z, mu, logvar, log_px_z, self.log_prior)
            else:
                log_ratio = self.log_prior(z) - gaussian_log_prob(z, mu, logvar)
            # The KL to the standard normal in closed form; to a VampPrior, the samples' estimate.
            kl = gaussian_kl(mu, logvar) if self.config.prior == "standard" else -log_ratio.mean(0)
            return log_px_z, log_ratio, kl
        if dreg:
            raise ValueError("doubly reparameterised gradients are implemented for one stochastic layer only")
        top_mu, top_logvar = self.upper_encoder(z)
        top = top_mu + torch.exp(0.5 * top_logvar) * top_noise
        log_ratio = (prior_log_prob(top) + gaussian_log_prob(z, *self.upper_decoder(top))
                     - gaussian_log_prob(z, mu, logvar) - gaussian_log_prob(top, top_mu, top_logvar))
        return log_px_z, log_ratio, -log_ratio.mean(0)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of q(z|x); with two layers, of q(z|z_mid) at z_mid's mean."""
        mu, _ = self.encoder(x)
        return self.upper_encoder(mu)[0] if self.config.mid_latent_dim else mu

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of the pixels given z; with two layers, through z_mid's mean given z."""
        return self.decoder(self.upper_decoder(z)[0] if self.config.mid_latent_dim else z)

    def to_checkpoint(self) -> dict:
        return {"state_dict": self.state_dict(), "config": asdict(self.config)}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "VAE":
        model = cls(VAEConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
        return model

    @classmethod
    def load(cls, path) -> "VAE":
        """The model `vae train` saved at path, in eval mode (weights only: nothing unpickled)."""
        return cls.from_checkpoint(torch.load(path, map_location="cpu", weights_only=True)).eval()


def _doubly_reparameterised(z, mu, logvar, log_px_z, log_prior) -> torch.Tensor:
    """log p(z) - log q(z|x) for k samples z (k, N, latent), wired for the DReG estimator
    (Tucker et al. 2019) of the IWAE bound's gradient: the encoder reaches the bound only
    through z (q's density is taken at a detached mu and logvar), and the gradient that
    reaches z from sample i is scaled by its normalised importance weight w_i, so that with
    the bound's own weight the encoder gets sum_i w_i^2 d log w_i / dz_i * dz_i / dphi.
    Unbiased like the plain gradient, and its signal-to-noise ratio does not fall as k grows,
    as the plain estimator's does. The decoder's (and a VampPrior's) gradients are unchanged."""
    log_ratio = log_prior(z) - gaussian_log_prob(z, mu.detach(), logvar.detach())
    weights = torch.softmax((log_px_z + log_ratio).detach(), dim=0)
    z.register_hook(lambda grad: grad * weights.unsqueeze(-1))
    return log_ratio


class Served(nn.Module):
    """One direction of the VAE as a module of its own, as the server runs it (and ONNX holds it)."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model


class ImageDecoder(Served):
    """The decoder as served: z -> pixel probabilities shaped as images (N, 1, 28, 28)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.decode(z)).reshape(-1, *IMAGE_SHAPE)


class ImageEncoder(Served):
    """The encoder as served: images x (N, 784) in [0, 1] -> the mean and log-variance of
    q(z|x), each (N, latent_dim): an image's embedding and its spread. With two layers, of
    q(z|z_mid) at z_mid's mean, as posterior_mean takes it."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.model.encoder(x)
        if self.model.config.mid_latent_dim:
            mu, logvar = self.model.upper_encoder(mu)
        return mu, logvar


class ImageScore(Served):
    """The per-image score as served: -L_k in nats, the negative importance-weighted bound on
    log p(x) with k samples (in expectation an upper bound on -log p(x): the less likely the
    image, the larger), from images x (N, 784) and the caller's standard normal noise eps
    (N, k, noise_dim), batch first like x (as rng.batch_noise draws it, and as Triton wants every
    input). The maths of objectives.iwae_log_lik, in one chunk of k."""

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        log_px_z, log_ratio, _ = self.model(x, eps.transpose(0, 1))
        return math.log(eps.shape[1]) - torch.logsumexp(log_px_z + log_ratio, dim=0)
