"""The VAE: a Gaussian encoder q(z|x), a Bernoulli decoder p(x|z), and a prior p(z): the
standard normal, or a VampPrior (Tomczak & Welling 2018: the mixture of the encoder's
posteriors at K learned pseudo-inputs); optionally a second stochastic layer z_mid below z,
in one of two layouts (MID_LAYOUTS):

    chain     (Burda et al. 2015)   q(z_mid|x) q(z|z_mid),   p(z) p(z_mid|z) p(x|z_mid)
    top_down  (Tomczak & Welling)   q(z|x) q(z_mid|x, z),    p(z) p(z_mid|z) p(x|z_mid, z)

In both, z is the top: the served decoder maps z to an image through z_mid's mean given z.

Pure PyTorch. The architecture is chosen by a small config, so a saved model is its
state_dict plus `asdict(config)`: no pickled classes, loadable with weights_only=True.
"""
from __future__ import annotations

import math
import pickle
import warnings
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
# With a second stochastic layer, how it is wired (see the module's docstring).
MID_LAYOUTS = ("chain", "top_down")


class ModelFileError(ValueError):
    """A file that is not a saved model: unreadable, cut short, or holding something else."""


@dataclass(frozen=True)
class VAEConfig:
    """The architecture. Its defaults are params.yaml's (pipeline/params.py takes them from here)."""
    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (512, 256)  # mlp: every hidden layer; conv: the dense layers after the convolutions
    arch: str = "mlp"
    # Two stochastic layers: z_mid's size (None: one layer, x <-> h <-> z), the hidden layers
    # of the networks between z_mid and z, and their layout (MID_LAYOUTS).
    mid_latent_dim: int | None = None
    mid_hidden_dims: tuple[int, ...] = (100, 100)
    mid_layout: str = "chain"
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
        if self.mid_layout not in MID_LAYOUTS:
            raise ValueError(f"model.mid_layout: unknown layout {self.mid_layout!r} "
                             f"(known: {', '.join(map(repr, MID_LAYOUTS))})")
        if self.prior == "vamp" and self.chain:
            raise ValueError("model.prior: vamp takes one stochastic layer or model.mid_layout: top_down "
                             f"(got model.mid_latent_dim: {self.mid_latent_dim} with the chain layout)")
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        object.__setattr__(self, "mid_hidden_dims", tuple(self.mid_hidden_dims))

    @property
    def chain(self) -> bool:
        """Two stochastic layers in Burda et al.'s chain: x's encoder and decoder meet z_mid only."""
        return bool(self.mid_latent_dim) and self.mid_layout == "chain"

    @property
    def top_down(self) -> bool:
        """Two stochastic layers in Tomczak & Welling's layout: x encodes to z, decodes from both."""
        return bool(self.mid_latent_dim) and self.mid_layout == "top_down"

    @property
    def encoded_dim(self) -> int:
        """The latent that x's encoder gives the Gaussian of: z_mid in the chain, else z."""
        return self.mid_latent_dim if self.chain else self.latent_dim

    @property
    def decoded_dim(self) -> int:
        """The decoder's input: z_mid in the chain, z_mid and z side by side top-down, else z."""
        return self.mid_latent_dim + self.latent_dim * self.top_down if self.mid_latent_dim else self.latent_dim

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
    """The decoder's latents (N, decoded_dim) -> Bernoulli logits (N, 784)."""
    return mlp([config.decoded_dim, *reversed(config.hidden_dims), INPUT_DIM], act)


def conv_decoder_net(config: VAEConfig, act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(mlp([config.decoded_dim, *reversed(config.hidden_dims), CONV_FLAT], act), act(),
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
    """x (N, 784) -> mean and log-variance of the diagonal Gaussian q(z|x) (of z_mid in the chain)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        body, _ = ARCHS[config.arch]
        self.body = body(config, ACTIVATIONS[config.activation])
        self.head = nn.Linear(config.hidden_dims[-1], 2 * config.encoded_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gaussian(self.body(x))

    def gaussian(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance from the body's output (its last hidden layer)."""
        mu, logvar = self.head(features).chunk(2, dim=-1)
        return mu, logvar


class MidPosterior(nn.Module):
    """q(z_mid | x, z) of the top-down layout: x's features (the encoder's last hidden layer)
    and z, each through a linear layer, summed, then an MLP to z_mid's mean and log-variance.
    x's half is computed once per image (`from_x`), shared by its k samples of z."""

    def __init__(self, config: VAEConfig, act: type[nn.Module]):
        super().__init__()
        width = config.mid_hidden_dims[0]
        self.from_x = nn.Linear(config.hidden_dims[-1], width)
        self.from_z = nn.Linear(config.latent_dim, width, bias=False)
        self.act = act()
        self.out = Gaussian([*config.mid_hidden_dims, config.mid_latent_dim], act)

    def forward(self, x_part: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out(self.act(x_part + self.from_z(z)))


class Decoder(nn.Module):
    """z (N, decoded_dim) -> Bernoulli logits of the 784 pixels (see VAEConfig.decoded_dim)."""

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
        self.encoder = Encoder(config)  # q(z|x), or q(z_mid|x) in the chain
        self.decoder = Decoder(config)  # p(x|z), p(x|z_mid) in the chain, p(x|z_mid, z) top-down
        act = ACTIVATIONS[config.activation]
        mid, top = [config.mid_latent_dim, *config.mid_hidden_dims], config.latent_dim
        if config.chain:
            self.upper_encoder = Gaussian([*mid, top], act)  # q(z|z_mid)
        if config.top_down:
            self.mid_encoder = MidPosterior(config, act)  # q(z_mid|x, z)
        if config.mid_latent_dim:
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

    def forward(self, x: torch.Tensor, eps: torch.Tensor, dreg: bool = False,
                kl_weight: torch.Tensor | None = None):
        """k reparameterised samples of the latents per image, from the noise eps (k, N, noise_dim)
        given by the caller (so it can be drawn from the seed and the sample index, not from
        hidden RNG state). Returns, per sample, log p(x|z) and log p(z) - log q(z|x), each (k, N),
        and the ELBO's KL term per image: in closed form with one stochastic layer and the
        standard prior, else the samples' estimate. dreg: the encoder's gradients of the IWAE
        bound become the doubly reparameterised ones (see `_doubly_reparameterised`), for the
        bound whose log-weights are log p(x|z) + kl_weight * (log p(z) - log q(z|x)) (KL
        warm-up; None: 1); the values do not change."""
        features = self.encoder.body(x)
        return self.sample_terms(x, *self.encoder.gaussian(features), eps, dreg, kl_weight, features)

    def sample_terms(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor,
                     dreg: bool = False, kl_weight: torch.Tensor | None = None,
                     features: torch.Tensor | None = None):
        """forward's terms from the encoder's output (mu, logvar), already computed for x: the
        importance-weighted estimate draws its samples in chunks and encodes x only once.
        features: the encoder's last hidden layer for x, which the top-down layout's q(z_mid|x, z)
        also reads (recomputed if not given)."""
        # The noise of z_mid, then of z (one layer: of z).
        mid_noise, top_noise = eps.split([self.config.mid_latent_dim, self.config.latent_dim], -1) \
            if self.config.mid_latent_dim else (None, eps)
        if self.config.top_down:
            return self._top_down_terms(x, mu, logvar, top_noise, mid_noise, dreg, kl_weight, features)
        # One layer: z from q(z|x); the chain: z_mid from q(z_mid|x), then z from q(z|z_mid).
        z = mu + torch.exp(0.5 * logvar) * (mid_noise if self.config.chain else top_noise)
        log_px_z = bernoulli_log_lik(self.decoder(z), x.expand(len(z), *x.shape))
        if self.config.chain:
            if dreg:
                raise ValueError("doubly reparameterised gradients are implemented for one stochastic layer "
                                 "and the top_down layout, not the chain")
            return self._chain_terms(z, mu, logvar, top_noise, log_px_z)
        if dreg and z.requires_grad:
            log_ratio = self.log_prior(z) - gaussian_log_prob(z, mu.detach(), logvar.detach())
            _doubly_reparameterised(log_px_z, log_ratio, kl_weight, z)
        else:
            log_ratio = self.log_prior(z) - gaussian_log_prob(z, mu, logvar)
        # The KL to the standard normal in closed form; to a VampPrior, the samples' estimate.
        kl = gaussian_kl(mu, logvar) if self.config.prior == "standard" else -log_ratio.mean(0)
        return log_px_z, log_ratio, kl

    def _chain_terms(self, mid, mu, logvar, top_noise, log_px_z):
        """Burda et al.'s chain: z from q(z|z_mid) at the sampled z_mid."""
        top_mu, top_logvar = self.upper_encoder(mid)
        top = top_mu + torch.exp(0.5 * top_logvar) * top_noise
        log_ratio = (prior_log_prob(top) + gaussian_log_prob(mid, *self.upper_decoder(top))
                     - gaussian_log_prob(mid, mu, logvar) - gaussian_log_prob(top, top_mu, top_logvar))
        return log_px_z, log_ratio, -log_ratio.mean(0)

    def _top_down_terms(self, x, mu, logvar, noise, mid_noise, dreg, kl_weight, features):
        """Tomczak & Welling's layout: z from q(z|x), then z_mid from q(z_mid|x, z); x decoded
        from both. With dreg, q's densities are taken with detached parameters at the live
        samples, and the gradients reaching each sample's latents are reweighted: z's own uses
        through an alias of z (`top`), so that the gradient reaching z through z_mid's sampling
        is reweighted once, at z_mid, not twice."""
        x_part = self.mid_encoder.from_x(self.encoder.body(x) if features is None else features)
        z = mu + torch.exp(0.5 * logvar) * noise
        mid_mu, mid_logvar = self.mid_encoder(x_part, z)
        mid = mid_mu + torch.exp(0.5 * mid_logvar) * mid_noise
        dreg = dreg and z.requires_grad
        top = z.view_as(z) if dreg else z
        log_px_z = bernoulli_log_lik(self.decoder(torch.cat([mid, top], -1)), x.expand(len(z), *x.shape))
        log_p = self.log_prior(top) + gaussian_log_prob(mid, *self.upper_decoder(top))
        if dreg:
            q_mid = torch.func.functional_call(self.mid_encoder, _detached(self.mid_encoder), (x_part.detach(), top))
            log_ratio = log_p - gaussian_log_prob(top, mu.detach(), logvar.detach()) - gaussian_log_prob(mid, *q_mid)
            _doubly_reparameterised(log_px_z, log_ratio, kl_weight, top, mid)
        else:
            log_ratio = log_p - gaussian_log_prob(z, mu, logvar) - gaussian_log_prob(mid, mid_mu, mid_logvar)
        return log_px_z, log_ratio, -log_ratio.mean(0)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of q(z|x); in the chain, of q(z|z_mid) at z_mid's mean."""
        mu, _ = self.encoder(x)
        return self.upper_encoder(mu)[0] if self.config.chain else mu

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of the pixels given z; with two layers, at z_mid's mean given z."""
        if not self.config.mid_latent_dim:
            return self.decoder(z)
        mid = self.upper_decoder(z)[0]
        return self.decoder(torch.cat([mid, z], -1) if self.config.top_down else mid)

    def to_checkpoint(self) -> dict:
        return {"state_dict": self.state_dict(), "config": asdict(self.config)}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "VAE":
        model = cls(VAEConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
        return model

    @classmethod
    def load(cls, path) -> "VAE":
        """The model `vae train` saved at path, in eval mode (weights only: nothing unpickled).
        A file that is not one is a ModelFileError naming the file and what is wrong with it."""
        try:
            with warnings.catch_warnings():  # torch's advice on a pickle protocol it was not written with
                warnings.simplefilter("ignore", UserWarning)
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as e:  # unknown bytes, or objects beyond tensors and plain data
            detail = str(e).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
            raise ModelFileError(f"{path}: not a model file: torch's weights-only loader refused it "
                                 f"({gist(detail or e)}), and nothing in it was unpickled") from None
        except (RuntimeError, EOFError, OSError) as e:
            reason = f" ({gist(e)})" if str(e) else ""
            raise ModelFileError(f"{path}: not a readable model file, cut short or corrupted{reason}") from None
        if not (isinstance(checkpoint, dict) and {"config", "state_dict"} <= checkpoint.keys()):
            raise ModelFileError(f"{path}: not a model file (it has no 'config' and 'state_dict', as a saved "
                                 f"VAE has)")
        try:
            return cls.from_checkpoint(checkpoint).eval()
        except (TypeError, ValueError) as e:  # VAEConfig's: an unknown key, a bad value
            raise ModelFileError(f"{path}: its config is not a VAE's ({gist(e)})") from None
        except RuntimeError as e:  # load_state_dict's: missing, unexpected or misshapen weights
            raise ModelFileError(f"{path}: its weights do not fit its config ({gist(e)})") from None


def gist(error: Exception, limit: int = 200) -> str:
    """A library's error in a line: its first sentence, at most `limit` characters (torch's go
    on for lines of advice, or list every missing weight)."""
    text = " ".join(str(error).split())
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _detached(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters cut from autograd, for torch.func.functional_call: the module's
    function, constant in its parameters."""
    return {name: p.detach() for name, p in module.named_parameters()}


def _doubly_reparameterised(log_px_z, log_ratio, kl_weight, *latents) -> None:
    """Wires the DReG estimator (Tucker et al. 2019) of the IWAE bound's encoder gradient, given
    log p(z) - log q(z|x) already taken with q's parameters detached (the encoder then reaches
    the bound only through the samples): the gradient reaching each sample's latents is scaled
    by its normalised importance weight w_i, so that with the bound's own weight the encoder
    gets sum_i w_i^2 d log w_i / dz_i * dz_i / dphi. Unbiased like the plain gradient, and its
    signal-to-noise ratio does not fall as k grows, as the plain estimator's does. The
    decoder's (and a VampPrior's) gradients are unchanged.

    Under KL warm-up the log-weights are log p(x|z) + b * log_ratio, and the score term that
    DReG rewrites is b times q's: the scale becomes (1 - b) + b * w_i (derived as Tucker et al.
    do; b = 1 gives w_i)."""
    log_w = log_px_z + log_ratio if kl_weight is None else log_px_z + kl_weight * log_ratio
    scale = torch.softmax(log_w.detach(), dim=0)
    if kl_weight is not None:
        scale = (1 - kl_weight) + kl_weight * scale
    for latent in latents:
        latent.register_hook(lambda grad: grad * scale.unsqueeze(-1))


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
    q(z|x), each (N, latent_dim): an image's embedding and its spread. In the chain, of
    q(z|z_mid) at z_mid's mean, as posterior_mean takes it."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.model.encoder(x)
        if self.model.config.chain:
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
