"""vae/model.py and vae/objectives.py: shapes, saved form, and the maths of the bounds."""
import io
import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from pipeline import compat
from vae import rng
from vae.densities import gaussian_kl, gaussian_log_prob
from vae.model import VAE, ImageDecoder, ImageEncoder, ImageScore, ModelFileError, VAEConfig
from vae.objectives import draw_noise, elbo_terms, iwae_log_lik, iwae_terms


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_dim=8, hidden_dims=(64, 32)))


def test_shapes(model):
    x = torch.rand(5, 784)
    log_px_z, log_ratio, kl = model(x, torch.randn(3, 5, 8))
    assert log_px_z.shape == log_ratio.shape == (3, 5) and kl.shape == (5,)
    assert ImageDecoder(model)(torch.randn(3, 8)).shape == (3, 1, 28, 28)
    terms = elbo_terms(model, x, torch.randn(5, 8))
    assert all(t.shape == (5,) for t in terms.values())
    torch.testing.assert_close(terms["neg_elbo"], terms["recon"] + terms["kl"])


def test_checkpoint_loads_with_weights_only(model):
    buffer = io.BytesIO()
    torch.save(model.to_checkpoint(), buffer)
    buffer.seek(0)
    restored = VAE.from_checkpoint(torch.load(buffer, weights_only=True))
    assert restored.config == model.config
    z = torch.randn(2, 8)
    torch.testing.assert_close(restored.decoder(z), model.decoder(z))


class _RunsCode:
    """A pickle that runs code when unpickled: it would create the file it names."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _saved(checkpoint) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def _edited(model, section: str, **changes) -> dict:
    checkpoint = model.to_checkpoint()
    checkpoint[section] = {**checkpoint[section], **changes}
    return checkpoint


@pytest.mark.parametrize("contents, message", [
    (lambda m, tmp: b"", "not a readable model file, cut short or corrupted"),
    (lambda m, tmp: _saved(m.to_checkpoint())[:3000], "not a readable model file, cut short or corrupted"),
    (lambda m, tmp: b"not a model at all", "torch's weights-only loader refused it (Unsupported operand"),
    (lambda m, tmp: _saved({"config": {}, "state_dict": _RunsCode(tmp / "ran")}),
     f"refused it (Unsupported global: GLOBAL {io.open.__module__}.open was not an allowed global by default), "
     "and nothing in it was unpickled"),  # pickled by its module: io on Python 3.11, _io on 3.12
    (lambda m, tmp: _saved({"model": m.state_dict()}), "not a model file (it has no 'config' and 'state_dict'"),
    (lambda m, tmp: _saved(_edited(m, "config", arch="resnet")),
     "its config is not a VAE's (model.arch: unknown architecture 'resnet'"),
    (lambda m, tmp: _saved(_edited(m, "config", depth=3)), "its config is not a VAE's (VAEConfig.__init__() got an "
     "unexpected keyword argument 'depth')"),
    (lambda m, tmp: _saved(_edited(m, "config", latent_dim=9)), "its weights do not fit its config (Error(s) in "
     "loading state_dict for VAE: size mismatch for encoder.head.weight"),
], ids=["empty", "cut short", "not torch's", "runs code", "no config", "bad arch", "unknown key", "misshapen"])
def test_a_file_that_is_not_a_saved_model_is_named_with_what_is_wrong(model, tmp_path, contents, message):
    path = tmp_path / "vae.pt"
    path.write_bytes(contents(model, tmp_path))
    with pytest.raises(ModelFileError) as error:
        VAE.load(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    assert len(str(error.value)) < 400 and "\n" not in str(error.value)  # one line, not torch's pages of advice
    assert not (tmp_path / "ran").exists()
    path.write_bytes(_saved(model.to_checkpoint()))  # the same path with a saved model loads
    assert VAE.load(path).config == model.config


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="model.arch: unknown architecture 'resnet'"):
        VAEConfig(arch="resnet")


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_activation_is_the_one_named_and_saved(arch):
    config = VAEConfig(latent_dim=4, hidden_dims=(16,), arch=arch, mid_latent_dim=6, activation="silu")
    model = VAE(config)
    kinds = {type(m) for m in model.modules() if not list(m.children())}
    assert torch.nn.SiLU in kinds and torch.nn.ReLU not in kinds
    assert VAE.from_checkpoint(model.to_checkpoint()).config.activation == "silu"
    with pytest.raises(ValueError, match="model.activation: unknown activation 'gelu'"):
        VAEConfig(activation="gelu")


def test_analytic_kl_matches_monte_carlo():
    generator = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 6, generator=generator)
    logvar = torch.randn(4, 6, generator=generator) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 4, 6, generator=generator)
    zeros = torch.zeros_like(mu)
    monte_carlo = (gaussian_log_prob(z, mu, logvar) - gaussian_log_prob(z, zeros, zeros)).mean(0)
    torch.testing.assert_close(monte_carlo, gaussian_kl(mu, logvar), atol=0.03, rtol=0.01)


def mean_of_draws(draw, x: torch.Tensor, times: int, per_call: int = 16) -> torch.Tensor:
    """Per image of x, the mean of `times` draws: draw(copies) on x repeated per_call times, each
    copy with noise of its own, gives (..., len(copies)). For the ELBO of 16 images 4000 times, 16
    copies a call took a fifth of the time of one a call (250 calls, not 4000) and 0.4x that of all
    in one call (tensors too large for the caches)."""
    assert times % per_call == 0, (times, per_call)
    copies = x.repeat(per_call, 1)
    return sum(draw(copies).unflatten(-1, (per_call, len(x))).sum(-2) for _ in range(times // per_call)) / times


def test_iwae_with_one_sample_is_the_elbo_in_expectation(model):
    x = (torch.rand(16, 784) > 0.5).float()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        elbo = -mean_of_draws(lambda c: elbo_terms(model, c, torch.randn(len(c), 8, generator=generator))["neg_elbo"],
                              x, 4000)
        iwae_1 = mean_of_draws(lambda c: iwae_log_lik(model, c, 1, generator), x, 4000)
        iwae_64 = iwae_log_lik(model, x, 64, generator)
    torch.testing.assert_close(iwae_1, elbo, atol=0.1, rtol=0)
    assert (iwae_64 > elbo).all()  # more samples, a tighter bound
    assert torch.isfinite(iwae_64).all() and not math.isnan(iwae_64.sum().item())


def test_iwae_training_bound_is_tighter_and_matches_the_estimator(model):
    """The training loss with k samples: with k = 1 exactly the negative ELBO; with k = 8
    below it on average, and on average equal to minus the evaluation estimate L_8. The terms
    logged beside it are the ELBO's, averaged over the k samples."""
    x = (torch.rand(16, 784, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        eps = torch.randn(1, 16, 8, generator=generator)
        one = iwae_terms(model, x, eps)
        torch.testing.assert_close(one["loss"], elbo_terms(model, x, eps[0])["neg_elbo"])
        def eight(copies):  # the loss and the negative ELBO, from the same 8 samples
            terms = iwae_terms(model, copies, torch.randn(8, len(copies), 8, generator=generator))
            return torch.stack([terms["loss"], terms["neg_elbo"]])

        loss, neg_elbo = mean_of_draws(eight, x, 1024)
        estimate = mean_of_draws(lambda c: iwae_log_lik(model, c, 8, generator), x, 1024)
    assert (loss < neg_elbo - 0.1).all()  # tighter for every image (by 0.3 to 1.5 nats here)
    torch.testing.assert_close(loss, -estimate, atol=0.2, rtol=0)
    eps = torch.randn(8, 16, 8, generator=generator, requires_grad=False)
    with torch.no_grad():
        logged, per_sample = iwae_terms(model, x, eps), [elbo_terms(model, x, e) for e in eps]
    for name in ("neg_elbo", "recon", "kl"):
        torch.testing.assert_close(logged[name], torch.stack([terms[name] for terms in per_sample]).mean(0))
    iwae_terms(model, x, eps)["loss"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_conv_architecture_shapes_and_any_leading_dims():
    torch.manual_seed(0)
    model = VAE(VAEConfig(arch="conv", latent_dim=6, hidden_dims=(32,)))
    x = torch.rand(4, 784)
    log_px_z, _, kl = model(x, torch.randn(1, 4, 6))
    assert log_px_z.shape == (1, 4) and kl.shape == (4,)
    assert any(isinstance(m, torch.nn.Conv2d) for m in model.encoder.modules())
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.decoder.modules())
    z = torch.randn(3, 4, 6)  # (k, N, latent), as IWAE decodes
    torch.testing.assert_close(model.decoder(z)[1], model.decoder(z[1]))
    assert torch.isfinite(iwae_log_lik(model, (x > 0.5).float(), 5, torch.Generator().manual_seed(0))).all()


@pytest.fixture
def two_layer():
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_dim=4, hidden_dims=(64,), mid_latent_dim=6, mid_hidden_dims=(16, 16)))


def test_two_layer_weights_are_the_chain_of_conditionals(two_layer):
    """log p(x|z_mid) and log p(z_mid|z)p(z) - log q(z_mid|x)q(z|z_mid), written out again
    with torch.distributions from the model's parts and the same noise."""
    model, x = two_layer, (torch.rand(5, 784) > 0.5).float()
    eps = torch.randn(3, 5, 10)
    with torch.no_grad():
        log_px_z, log_ratio, kl = model(x, eps)
        mu, logvar = model.encoder(x)
        q_mid = Normal(mu, torch.exp(0.5 * logvar))
        mid = q_mid.loc + q_mid.scale * eps[..., :6]
        top_mu, top_logvar = model.upper_encoder(mid)
        q_top = Normal(top_mu, torch.exp(0.5 * top_logvar))
        top = q_top.loc + q_top.scale * eps[..., 6:]
        p_mu, p_logvar = model.upper_decoder(top)
        expected = (Normal(0.0, 1.0).log_prob(top).sum(-1)
                    + Normal(p_mu, torch.exp(0.5 * p_logvar)).log_prob(mid).sum(-1)
                    - q_mid.log_prob(mid).sum(-1) - q_top.log_prob(top).sum(-1))
        torch.testing.assert_close(log_ratio, expected)
        torch.testing.assert_close(log_px_z, Bernoulli(logits=model.decoder(mid)).log_prob(x).sum(-1))
        torch.testing.assert_close(kl, -expected.mean(0))


def test_two_layer_bounds_and_gradients(two_layer):
    model, x = two_layer, (torch.rand(8, 784, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        elbo = -mean_of_draws(lambda c: elbo_terms(model, c, torch.randn(len(c), 10, generator=generator))["neg_elbo"],
                              x, 2000)
        iwae_1 = mean_of_draws(lambda c: iwae_log_lik(model, c, 1, generator), x, 2000)
        iwae_64 = iwae_log_lik(model, x, 64, generator)
    torch.testing.assert_close(iwae_1, elbo, atol=0.3, rtol=0)
    assert (iwae_64 > elbo).all()
    iwae_terms(model, x, torch.randn(4, 8, 10, generator=generator))["loss"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    z = torch.randn(3, 4)
    through_mid = torch.sigmoid(model.decoder(model.upper_decoder(z)[0]))
    torch.testing.assert_close(ImageDecoder(model)(z).flatten(1), through_mid)
    assert model.posterior_mean(x).shape == (8, 4)


def test_dreg_gradients_are_the_estimator_written_out(model):
    """dreg: the same loss, the decoder's gradients unchanged, and the encoder's gradients
    those of Tucker et al.'s estimator written out with autograd: sum_i w_i^2 log w_i, with
    q's density at a detached mean and variance. Eager, and traced by torch.compile as the
    trainer's compile is: the hook that reweights z's gradient must survive the tracing
    (aot_eager traces the same graph as inductor without its code generation, ~10 s)."""
    x = (torch.rand(16, 784, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    eps = torch.randn(5, 16, 8, generator=torch.Generator().manual_seed(4))
    encoder, decoder = list(model.encoder.parameters()), list(model.decoder.parameters())

    mu, logvar = model.encoder(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    log_w = (Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1) + Normal(0, 1).log_prob(z).sum(-1)
             - gaussian_log_prob(z, mu.detach(), logvar.detach()))
    w = torch.softmax(log_w.detach(), dim=0)
    expected = [*torch.autograd.grad(-(w ** 2 * log_w).sum(), encoder, retain_graph=True),
                *torch.autograd.grad(-(w * log_w).sum(), decoder)]

    # Compiled only where torch can (the trainer refuses compile with DReG elsewhere: test_train_ray).
    compiled = [torch.compile(model, dynamic=False, backend="aot_eager")] if compat.compiles_dreg() else []
    for forward in (model, *compiled):
        model.zero_grad()
        terms = iwae_terms(forward, x, eps, dreg=True)
        torch.testing.assert_close(terms["loss"], iwae_terms(model, x, eps)["loss"], atol=1e-4, rtol=0)
        terms["loss"].sum().backward()
        for got, want in zip([p.grad for p in encoder + decoder], expected):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="k > 1"):
        iwae_terms(model, x, eps[:1], dreg=True)


def test_dreg_is_unbiased_with_less_variance(model):
    """Per-draw gradients of the IWAE loss (k = 8) with respect to one image's posterior mean
    and log-variance, over 4000 draws: DReG's mean equals the plain estimator's (both are
    unbiased) and its variance is smaller. Weights w_i instead of w_i^2, or q's density not
    detached, would move the mean."""
    x = (torch.rand(1, 784, generator=torch.Generator().manual_seed(3)) > 0.5).float().expand(4000, 784)
    with torch.no_grad():
        mu0, logvar0 = model.encoder(x[:1])
    eps = torch.randn(8, 4000, 8, generator=torch.Generator().manual_seed(5))

    def per_draw_grads(dreg: bool) -> torch.Tensor:
        # One leaf row per draw, so each row's gradient is that draw's alone.
        mu, logvar = (t.expand(4000, 8).clone().requires_grad_() for t in (mu0, logvar0))
        log_px_z, log_ratio, _ = model.sample_terms(x, mu, logvar, eps, dreg)
        (-torch.logsumexp(log_px_z + log_ratio, dim=0)).sum().backward()
        return torch.cat([mu.grad, logvar.grad], dim=1)

    plain, dreg = per_draw_grads(False), per_draw_grads(True)
    stderr = ((plain.var(0) + dreg.var(0)) / len(plain)).sqrt()
    assert ((plain.mean(0) - dreg.mean(0)).abs() < 4 * stderr).all()
    assert dreg.var(0).sum() < 0.5 * plain.var(0).sum()


@pytest.fixture
def top_down():
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=3, hidden_dims=(48,), mid_latent_dim=5, mid_hidden_dims=(16, 12),
                          mid_layout="top_down", prior="vamp", pseudo_inputs=4))
    model.init_pseudo_inputs(torch.rand(4, 784, generator=torch.Generator().manual_seed(3)))
    return model


def test_top_down_weights_are_tomczak_and_wellings_conditionals(top_down):
    """log p(x|z_mid, z) and log p(z) p(z_mid|z) - log q(z|x) q(z_mid|x, z), written out with
    torch.distributions from the model's parts: z from x's encoder, z_mid from x's features and
    z, the decoder reading both, the VampPrior on z. The served decoder goes through z_mid's
    mean given z, the served encoder is q(z|x)."""
    model, x = top_down, (torch.rand(5, 784, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    eps = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        log_px_z, log_ratio, kl = model(x, eps)
        q_top = Normal(*_loc_scale(model.encoder(x)))
        top = q_top.loc + q_top.scale * eps[..., 5:]
        hidden = model.encoder.body(x)
        h = model.mid_encoder.act(model.mid_encoder.from_x(hidden) + model.mid_encoder.from_z(top))
        q_mid = Normal(*_loc_scale(model.mid_encoder.out(h)))
        mid = q_mid.loc + q_mid.scale * eps[..., :5]
        p_mid = Normal(*_loc_scale(model.upper_decoder(top)))
        u_mu, u_logvar = model.encoder(model.pseudo_inputs)
        components = Normal(u_mu, torch.exp(0.5 * u_logvar)).log_prob(top[..., None, :]).sum(-1)
        vamp = torch.logsumexp(components, -1) - math.log(4)
        expected = vamp + p_mid.log_prob(mid).sum(-1) - q_top.log_prob(top).sum(-1) - q_mid.log_prob(mid).sum(-1)
        torch.testing.assert_close(log_ratio, expected)
        logits = model.decoder(torch.cat([mid, top], -1))
        torch.testing.assert_close(log_px_z, Bernoulli(logits=logits).log_prob(x).sum(-1))
        torch.testing.assert_close(kl, -expected.mean(0))
        z = torch.randn(2, 3)
        through_mean = torch.sigmoid(model.decoder(torch.cat([model.upper_decoder(z)[0], z], -1)))
        torch.testing.assert_close(ImageDecoder(model)(z).flatten(1), through_mean)
        torch.testing.assert_close(ImageEncoder(model)(x), model.encoder(x))
        assert model.posterior_mean(x).shape == (5, 3)


def _loc_scale(gaussian):
    mu, logvar = gaussian
    return mu, torch.exp(0.5 * logvar)


@pytest.mark.parametrize("kl_weight", [None, 0.3])
def test_top_down_dreg_is_the_estimator_written_out(top_down, kl_weight):
    """dreg on the top-down layout, with and without KL warm-up's weight b, against the
    estimator written out without hooks: q's densities from a frozen copy of the model at the
    live samples (z and z_mid, z_mid's sampling depending on z), the samples' path to the
    encoder weighted by c_i = w_i ((1 - b) + b w_i), where log w = log p(x|z_mid, z) + b (log p -
    log q); the generative side (decoder, p(z_mid|z), the VampPrior's pseudo-inputs and its
    use of the encoder) weighted by w_i. The same loss as without dreg."""
    model = top_down
    x = (torch.rand(6, 784, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    eps = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(4))
    b = None if kl_weight is None else torch.tensor(kl_weight)
    encoder = list(model.encoder.parameters()) + list(model.mid_encoder.parameters())
    generative = [*model.decoder.parameters(), *model.upper_decoder.parameters(), model.pseudo_inputs]
    frozen = VAE(model.config)
    frozen.load_state_dict(model.state_dict())
    frozen.requires_grad_(False)

    mu, logvar = model.encoder(x)
    top = mu + torch.exp(0.5 * logvar) * eps[..., 5:]
    mid_mu, mid_logvar = model.mid_encoder(model.mid_encoder.from_x(model.encoder.body(x)), top)
    mid = mid_mu + torch.exp(0.5 * mid_logvar) * eps[..., :5]
    log_px = Bernoulli(logits=model.decoder(torch.cat([mid, top], -1))).log_prob(x).sum(-1)
    log_q = (gaussian_log_prob(top, *frozen.encoder(x))
             + gaussian_log_prob(mid, *frozen.mid_encoder(frozen.mid_encoder.from_x(frozen.encoder.body(x)), top)))
    beta = 1.0 if b is None else b
    # The samples' path: the prior with frozen pseudo-inputs and encoder.
    log_w = log_px + beta * (frozen.log_prior(top) + gaussian_log_prob(mid, *model.upper_decoder(top)) - log_q)
    w = torch.softmax(log_w.detach(), dim=0)
    prior_params = beta * model.log_prior(top.detach())  # the VampPrior's own parameters at fixed samples
    c = w * ((1 - beta) + beta * w)
    expected = [*torch.autograd.grad(-(c * log_w).sum() - (w * prior_params).sum(), encoder, retain_graph=True),
                *torch.autograd.grad(-(w * log_w).sum() - (w * prior_params).sum(), generative, allow_unused=True)]

    terms = iwae_terms(model, x, eps, dreg=True, kl_weight=b)
    torch.testing.assert_close(terms["loss"], iwae_terms(model, x, eps, kl_weight=b)["loss"], atol=1e-4, rtol=0)
    terms["loss"].sum().backward()
    for got, want in zip([p.grad for p in encoder + generative], expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    assert model.mid_encoder.from_x.weight.grad.abs().sum() > 0 and model.pseudo_inputs.grad.abs().sum() > 0


@pytest.mark.parametrize("layout, kl_weight", [("model", 0.4), ("top_down", None), ("top_down", 0.4)])
def test_dreg_stays_unbiased_on_the_top_down_layout_and_under_kl_warmup(layout, kl_weight, request):
    """As test_dreg_is_unbiased_with_less_variance, for what DReG was extended to: per-draw
    gradients of the (warm-up weighted) IWAE loss, k = 8, with respect to one image's
    posterior mean and log-variance of z and, top-down, its features that q(z_mid|x, z) reads.
    The means agree with the plain estimator's: reweighting z's gradient twice (once through
    z_mid's sampling) or a warm-up scale of w_i instead of (1 - b) + b w_i would move them."""
    model, draws = request.getfixturevalue(layout), 3000
    x = (torch.rand(1, 784, generator=torch.Generator().manual_seed(3)) > 0.5).float().expand(draws, 784)
    with torch.no_grad():
        features0 = model.encoder.body(x[:1])
        mu0, logvar0 = model.encoder.gaussian(features0)
    eps = torch.randn(8, draws, model.config.noise_dim, generator=torch.Generator().manual_seed(5))
    b = None if kl_weight is None else torch.tensor(kl_weight)

    def per_draw_grads(dreg: bool) -> torch.Tensor:
        # One leaf row per draw, so each row's gradient is that draw's alone.
        leaves = [t.expand(draws, t.shape[-1]).clone().requires_grad_() for t in (mu0, logvar0, features0)]
        mu, logvar, features = leaves
        log_px_z, log_ratio, _ = model.sample_terms(x, mu, logvar, eps, dreg, b, features=features)
        weighted = log_ratio if b is None else b * log_ratio
        (-torch.logsumexp(log_px_z + weighted, dim=0)).sum().backward()
        return torch.cat([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves], dim=1)

    plain, dreg = per_draw_grads(False), per_draw_grads(True)
    stderr = ((plain.var(0) + dreg.var(0)) / len(plain)).sqrt()
    assert ((plain.mean(0) - dreg.mean(0)).abs() <= 4.5 * stderr + 1e-6).all()
    assert dreg.var(0).sum() < plain.var(0).sum()


def test_kl_warmup_weights_the_bound_and_one_is_none():
    """iwae_terms' loss with KL warm-up's b: log k - logsumexp(log p(x|z) + b log_ratio), the
    ELBO's reconstruction plus b KL with k = 1; b = 1 is the unweighted loss to the bit; the
    logged terms stay unweighted."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, hidden_dims=(32,)))
    x = (torch.rand(5, 784, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    eps = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        log_px_z, log_ratio, kl = model(x, eps)
        b = torch.tensor(0.25)
        terms = iwae_terms(model, x, eps, kl_weight=b)
        torch.testing.assert_close(terms["loss"], math.log(3) - torch.logsumexp(log_px_z + 0.25 * log_ratio, 0))
        torch.testing.assert_close(terms["kl"], kl)
        one = iwae_terms(model, x, eps[:1], kl_weight=b)
        torch.testing.assert_close(one["loss"], one["recon"] + 0.25 * one["kl"])
        assert torch.equal(iwae_terms(model, x, eps, kl_weight=torch.tensor(1.0))["loss"],
                           iwae_terms(model, x, eps)["loss"])


@pytest.mark.parametrize("layers", ["model", "two_layer", "top_down"])
def test_served_encoder_and_score_are_the_models_own_maths(layers, request):
    """ImageEncoder's mean is posterior_mean's (what the page's sliders and embeddings use);
    ImageScore with the evaluate stage's per-image noise is its -L_k to the float, so a served
    score can be checked against the stage's figures."""
    model = request.getfixturevalue(layers).eval()
    x = (torch.rand(6, 784, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with torch.no_grad():
        mu, logvar = ImageEncoder(model)(x)
        torch.testing.assert_close(mu, model.posterior_mean(x), atol=0, rtol=0)
        assert logvar.shape == mu.shape == (6, model.config.latent_dim)
        k = 7
        noise = draw_noise(rng.image_generators(0, "iwae", 0, 6), k, 6, model.config.noise_dim, torch.device("cpu"))
        expected = -iwae_log_lik(model, x, k, rng.image_generators(0, "iwae", 0, 6), chunk=k)
        torch.testing.assert_close(ImageScore(model)(x, noise.transpose(0, 1)), expected, atol=1e-4, rtol=0)


@pytest.fixture
def vamp():
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=(32,), prior="vamp", pseudo_inputs=7))
    model.init_pseudo_inputs(torch.rand(7, 784, generator=torch.Generator().manual_seed(3)))
    return model


def test_mixture_log_prob_is_the_brute_force_mixture():
    """The matrix-product form against log (1/K) sum_k N(z; m_k, v_k) written out, in float64."""
    from vae.densities import mixture_log_prob

    g = torch.Generator().manual_seed(0)
    means, logvars = 2 * torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    z = 3 * torch.randn(4, 6, 3, generator=g)
    brute = torch.logsumexp(gaussian_log_prob(z[..., None, :].double(), means.double(), logvars.double()), -1)
    expected = brute - math.log(5)
    assert mixture_log_prob(z, means, logvars).shape == (4, 6)
    torch.testing.assert_close(mixture_log_prob(z, means, logvars).double(), expected, atol=1e-4, rtol=1e-5)


def test_the_vamp_prior_is_the_mixture_of_posteriors_at_its_pseudo_inputs_and_a_density(vamp):
    """log p(z) is the mean of q(z|u_k) over the pseudo-inputs (brute force); it integrates to
    1 over the latent plane (a grid sum); its samples come from it (their mean and variance
    are the mixture's, within Monte-Carlo error)."""
    with torch.no_grad():
        mu, logvar = vamp.encoder(vamp.pseudo_inputs)
        z = torch.randn(10, 2)
        per_component = gaussian_log_prob(z[:, None, :], mu, logvar)
        torch.testing.assert_close(vamp.log_prior(z), torch.logsumexp(per_component, -1) - math.log(7))
        side = torch.linspace(-12, 12, 601)
        grid = torch.cartesian_prod(side, side)
        mass = vamp.log_prior(grid).double().exp().sum() * (side[1] - side[0]) ** 2
        assert mass.item() == pytest.approx(1.0, abs=2e-3)
        draws = vamp.sample_prior(20_000, torch.Generator().manual_seed(1))
        assert (draws.mean(0) - mu.mean(0)).abs().max() < 4 * draws.std(0).max() / math.sqrt(20_000)
        within, between = logvar.exp().mean(0), mu.var(0, unbiased=False)  # the components' spread, their means'
        torch.testing.assert_close(draws.var(0), within + between, rtol=0.03, atol=0)  # 1% is one standard error


def test_the_vamp_prior_trains_with_iwae_and_dreg_and_its_pseudo_inputs_learn(vamp):
    """Its bound is the model's with log p(z) from the mixture (the ELBO's KL the samples'
    estimate); DReG and the plain gradient agree on the pseudo-inputs' gradient (DReG changes
    only the encoder's path through q), and both reach them."""
    x = (torch.rand(6, 784, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    eps = torch.randn(5, 6, 2, generator=torch.Generator().manual_seed(4))
    log_px_z, log_ratio, kl = vamp(x, eps)
    mu, logvar = vamp.encoder(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    torch.testing.assert_close(log_ratio, vamp.log_prior(z) - gaussian_log_prob(z, mu, logvar))
    torch.testing.assert_close(kl, -log_ratio.mean(0))
    grads = []
    for dreg in (False, True):
        vamp.zero_grad()
        iwae_terms(vamp, x, eps, dreg=dreg)["loss"].mean().backward()
        grads.append(vamp.pseudo_inputs.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("layout", ["vamp", "top_down"])
def test_a_vamp_prior_saves_loads_and_exports_its_graphs(layout, tmp_path, request):
    """The pseudo-inputs (and the top-down layout's networks) travel in the checkpoint; the
    score graph holds the prior (the encoder at the pseudo-inputs) and the decoder graph z's
    path through z_mid's mean, each matching torch."""
    import numpy as np

    from pipeline.export import export_decoder, export_score
    from pipeline.serve.session import open_session

    model = request.getfixturevalue(layout)
    buffer = io.BytesIO()
    torch.save(model.to_checkpoint(), buffer)
    loaded = VAE.from_checkpoint(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)).eval()
    torch.testing.assert_close(loaded.pseudo_inputs, model.pseudo_inputs)
    export_score(loaded, 4, tmp_path / "score.onnx", opset=18)
    export_decoder(ImageDecoder(loaded), loaded.config.latent_dim, tmp_path / "decoder.onnx", opset=18)
    x, eps = torch.rand(3, 784), torch.randn(3, 4, loaded.config.noise_dim)
    z = torch.randn(5, loaded.config.latent_dim)
    with torch.no_grad():
        expected, images = ImageScore(loaded)(x, eps).numpy(), ImageDecoder(loaded)(z).numpy()
    (got,) = open_session(tmp_path / "score.onnx").run(["score"], {"x": x.numpy(), "eps": eps.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    (got,) = open_session(tmp_path / "decoder.onnx").run(None, {"z": z.numpy()})
    np.testing.assert_allclose(got, images, atol=1e-6)
