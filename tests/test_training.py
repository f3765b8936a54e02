"""vae/training.py: training with nothing but torch, in one process."""
from dataclasses import replace

import pytest
import torch

from vae.data import load_split
from vae.model import VAE, VAEConfig
from vae.training import Shard, TrainConfig, Trainer, learning_rate_schedule, validate, validation_set

CONFIG = TrainConfig(seed=0, epochs=2, batch_size=32, lr=2e-3, lr_schedule="onecycle", iwae_k=2, dreg=True,
                     binarize=True, bf16=False)


def trained(images: torch.Tensor, config: TrainConfig = CONFIG) -> tuple[VAE, list[dict]]:
    torch.manual_seed(config.seed)
    model = VAE(VAEConfig(latent_dim=4, hidden_dims=(64,)))
    trainer = Trainer.create(model, config, train_images=len(images))
    return model, [trainer.epoch(images, epoch) for epoch in range(config.epochs)]


def test_a_script_trains_the_model_with_torch_alone(mnist_dir):
    images = load_split(mnist_dir, "train")[0][:320]
    model, history = trained(images)
    assert history[1]["neg_elbo"] < history[0]["neg_elbo"]  # it learns
    assert history[0]["neg_elbo"] == pytest.approx(history[0]["recon"] + history[0]["kl"])
    again, _ = trained(images)  # the seed alone decides the model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other, _ = trained(images, replace(CONFIG, seed=1))
    assert not torch.equal(model.decoder.net[0].weight, other.decoder.net[0].weight)
    x, eps = validation_set(load_split(mnist_dir, "train")[0][-100:], seed=0, noise_dim=4, binarize=True)
    assert set(x.unique().tolist()) == {0.0, 1.0}  # binarised once
    whole = validate(model, x, eps)
    halves = [validate(model, x, eps, shard=Shard(rank, 2)) for rank in (0, 1)]  # no reduction: each its half
    assert whole["neg_elbo"] == pytest.approx(sum(h["neg_elbo"] for h in halves) / 2, rel=1e-6)


@pytest.mark.parametrize("epochs, images", [(30, 50_000), (2, 300), (1, 64)])
def test_learning_rate_schedule_peaks_at_train_lr_and_survives_tiny_runs(epochs, images):
    config = TrainConfig(seed=0, epochs=epochs, batch_size=128, lr=2e-3, lr_schedule="onecycle", iwae_k=1,
                         dreg=False, binarize=False, bf16=False)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=config.lr)
    schedule = learning_rate_schedule(optimizer, config, images)
    rates = []
    for _ in range(epochs * -(-images // 128)):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert max(rates) == pytest.approx(2e-3)
    if len(rates) >= 4:  # warm-up from below the peak, annealed far below it at the end
        assert rates[0] < 2e-3 / 10 and rates[-1] < 2e-3 / 100
    else:
        assert rates == [2e-3] * len(rates)
