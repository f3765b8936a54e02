"""vae/training.py and vae/cuda_graph.py: training with nothing but torch, in one process."""
import io
from dataclasses import replace
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vae.cuda_graph import GraphedTrainer
from vae.data import load_split
from vae.model import VAE, VAEConfig
from vae.training import TERMS, Shard, TrainConfig, Trainer, learning_rate_schedule, validate, validation_set

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

CONFIG = TrainConfig(seed=0, epochs=2, batch_size=32, lr=2e-3, lr_schedule="onecycle", iwae_k=2, dreg=True,
                     binarize=True, bf16=False, kl_warmup_epochs=0)


SMALL = VAEConfig(latent_dim=4, hidden_dims=(64,))


def make_trainer(images: torch.Tensor, config: TrainConfig = CONFIG, graphed: bool = False, device: str = "cpu",
                 model_config: VAEConfig = SMALL) -> tuple[VAE, Trainer, Callable[[int], dict]]:
    """The model, its trainer, and epoch -> mean terms: Trainer.epoch, or a GraphedTrainer's."""
    torch.manual_seed(config.seed)
    model = VAE(model_config).to(device)
    trainer = Trainer.create(model, config, train_images=len(images), capturable=graphed, device=torch.device(device))
    images = images.to(device)
    return model, trainer, GraphedTrainer(trainer, images).epoch if graphed else lambda e: trainer.epoch(images, e)


def trained(images: torch.Tensor, config: TrainConfig = CONFIG, **how) -> tuple[VAE, list[dict]]:
    model, _, epoch = make_trainer(images, config, **how)
    return model, [epoch(e) for e in range(config.epochs)]


def max_abs_diff(a: VAE, b: VAE) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


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


def test_each_worker_trains_on_its_slice_of_every_global_batch(mnist_dir):
    """What one worker trains on, step by step (images binarised, noise), is what two workers
    train on side by side, rank 0's then rank 1's; and each scales its loss so that the mean of
    their first gradients, which DDP takes, is the one worker's gradient."""
    images = load_split(mnist_dir, "train")[0][:80]  # steps of 32, 32 and 16 images

    def walk(shard: Shard) -> tuple[list, list[torch.Tensor]]:
        model, trainer, _ = make_trainer(images, replace(CONFIG, epochs=1))
        trainer.shard, step, seen, first_gradient = shard, trainer.step, [], []

        def spy(x, eps, global_batch):
            seen.append((x, eps))
            terms = step(x, eps, global_batch)
            if not first_gradient:
                first_gradient.extend(p.grad.clone() for p in model.parameters())
            return terms

        trainer.step = spy
        trainer.epoch(images, 0)
        return seen, first_gradient

    (one, gradient), halves = walk(Shard()), [walk(Shard(rank, 2)) for rank in (0, 1)]
    assert [len(x) for x, _ in one] == [32, 32, 16] and [len(x) for x, _ in halves[1][0]] == [16, 16, 8]
    for whole, first, second in zip(one, halves[0][0], halves[1][0]):
        assert torch.equal(whole[0], torch.cat([first[0], second[0]]))  # the images, binarised
        assert torch.equal(whole[1], torch.cat([first[1], second[1]], 1))  # the noise, (k, images, noise_dim)
    for g, g0, g1 in zip(gradient, halves[0][1], halves[1][1]):
        torch.testing.assert_close(g, (g0 + g1) / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("epochs, images", [(30, 50_000), (2, 300), (1, 64)])
def test_learning_rate_schedule_peaks_at_train_lr_and_survives_tiny_runs(epochs, images):
    config = TrainConfig(seed=0, epochs=epochs, batch_size=128, lr=2e-3, lr_schedule="onecycle", iwae_k=1,
                         dreg=False, binarize=False, bf16=False, kl_warmup_epochs=0)
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


# 330 images in batches of 32: ten full batches and a last one of 10, each its own graph.
WALK = 330


@pytest.mark.parametrize("config", [CONFIG, replace(CONFIG, iwae_k=1, dreg=False, binarize=False),
                                    replace(CONFIG, kl_warmup_epochs=2)],
                         ids=["iwae-dreg-binarized", "elbo", "kl-warmup"])
def test_the_graphed_walk_trains_as_trainer_epoch_does(mnist_dir, config):
    """GraphedTrainer on the CPU, where each "replay" runs the captured step eagerly: its static
    buffers, warm-up, last batch and schedule give Trainer.epoch's model. Catches buffers filled
    with the wrong draws or rows, a warm-up that leaves its steps in the weights (0.02 off), a
    learning rate or momentum the schedule no longer reaches, a last batch dropped, a KL
    warm-up weight the graphs do not see change."""
    images = load_split(mnist_dir, "train")[0][:WALK]
    eager, eager_history = trained(images, config)
    graphed, graphed_history = trained(images, config, graphed=True)
    # Only the Adam implementation differs (fused against GraphAdam): rounding, 6e-6 at most in
    # the weights and 2.1e-5 in the epochs' means here, against 0.02 with the warm-up's steps left in.
    assert max_abs_diff(eager, graphed) <= 1e-4
    for a, b in zip(eager_history, graphed_history):
        assert a == pytest.approx(b, rel=1e-4)
    _, trainer, epoch = make_trainer(images, config, graphed=True)
    epoch(0)
    beta1 = trainer.optimizer.param_groups[0]["betas"][0]
    # The tensor a graph reads (the CPU's eager replay would also see a number), kept on the
    # one-cycle momentum, which has left its starting 0.95 by now.
    assert isinstance(beta1, torch.Tensor)
    eager_beta1 = _eager_beta1(images, config)
    assert eager_beta1 < 0.95 and beta1.item() == pytest.approx(eager_beta1)


class HostReads(TorchDispatchMode):
    """The ops run under it that read a tensor's values back to the host: .item(), a tensor
    passed where torch takes a number, a shape that depends on values. On CUDA each waits for
    the GPU, and a CUDA-graph capture refuses it."""
    OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


# Every architecture, for the tests of the captured step.
ARCHITECTURES = pytest.mark.parametrize("model_config", [
    SMALL, replace(SMALL, arch="conv"),
    replace(SMALL, mid_latent_dim=3, mid_hidden_dims=(16,), mid_layout="top_down", prior="vamp", pseudo_inputs=10,
            activation="silu")], ids=["mlp", "conv", "two-level-vampprior-silu"])


class HostTensors(TorchDispatchMode):
    """The ops run under it that take a tensor held by the host. With the step's own tensors on
    a device, each is a copy from the host or a host number that torch reads at launch: a CUDA
    graph would replay the value it had at capture (a learning rate that never moves)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves((args, kwargs))):
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@ARCHITECTURES
def test_the_captured_step_takes_nothing_from_the_host(model_config):
    """The captured step of each size, GraphAdam's update included, on the `meta` device: tensors
    with shapes and no values. There a read back to the host fails, as a capture on a GPU does
    (torch's foreach Adam read beta1 and beta2 back, three reads a step), and HostTensors sees
    any host tensor the step takes, the 0-dim ones torch would otherwise accept beside a GPU's.
    The KL weight and the learning rate and beta1 are device tensors for that reason."""
    meta = torch.device("meta")
    config = replace(CONFIG, kl_warmup_epochs=2)
    trainer = Trainer.create(VAE(model_config).to(meta), config, 100, capturable=True, device=meta)
    graphed = GraphedTrainer(trainer, torch.zeros((100, 784), dtype=torch.uint8, device=meta))
    assert sorted(graphed.steps) == [4, 32]  # the full batch and the epoch's last
    taken, half = HostTensors(), torch.tensor(0.5)
    with taken:  # what it sees: a host number beside a device tensor
        torch.ones((), device=meta) * half
    assert taken.seen == ["aten::mul"]
    taken.seen.clear()
    with taken:
        for step in graphed.steps.values():
            graphed._body(step)
    assert taken.seen == []


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_an_epoch_reads_back_to_the_host_only_its_means(graphed):
    """Between its steps too an epoch leaves the GPU running: its one read back is the terms'
    means at its end, after the last step (a read per step would make the host wait for each)."""
    images = torch.randint(0, 256, (100, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    epoch = make_trainer(images, replace(CONFIG, kl_warmup_epochs=2), graphed=graphed)[2]
    with HostReads() as reads:
        epoch(0)
    assert reads.seen == ["aten::_local_scalar_dense"] * len(TERMS)


def _eager_beta1(images, config) -> float:
    _, trainer, epoch = make_trainer(images, config)
    epoch(0)
    return trainer.optimizer.param_groups[0]["betas"][0]


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_a_checkpoint_resumes_on_either_path_to_the_uninterrupted_model(mnist_dir, graphed):
    """Trainer.state_dict after an eager epoch, through torch.save and a weights-only load, into
    a new trainer of either kind: the second epoch ends where two uninterrupted ones do (to the
    bit eagerly). The saved learning rate and betas are numbers, and the new trainer keeps its
    own Adam implementation (a fused checkpoint must not make a capturable Adam fused)."""
    images = load_split(mnist_dir, "train")[0][:WALK]
    config = replace(CONFIG, epochs=2)
    uninterrupted, _ = trained(images, config)
    first, trainer, epoch = make_trainer(images, config)
    epoch(0)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), **trainer.state_dict()}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    assert all(isinstance(group["lr"], float) for group in saved["optimizer"]["param_groups"])
    resumed, trainer, _ = make_trainer(images, config, graphed=graphed)
    resumed.load_state_dict(saved["model"])
    trainer.load_state_dict(saved)
    assert trainer.optimizer.param_groups[0]["fused"] is not graphed
    again = GraphedTrainer(trainer, images).epoch if graphed else (lambda e: trainer.epoch(images, e))
    again(1)
    if graphed:
        assert max_abs_diff(uninterrupted, resumed) <= 1e-4
    else:
        assert max_abs_diff(uninterrupted, resumed) == 0


def test_graphed_training_refuses_what_it_cannot_capture(mnist_dir):
    images = load_split(mnist_dir, "train")[0][:64]
    _, trainer, _ = make_trainer(images)
    with pytest.raises(ValueError, match=r"capturable=True"):
        GraphedTrainer(trainer, images)
    _, trainer, _ = make_trainer(images, graphed=True)
    trainer.shard = Shard(0, 2)
    with pytest.raises(ValueError, match="one worker, not 2"):
        GraphedTrainer(trainer, images)


@pytest.mark.gpu
@CUDA
@ARCHITECTURES
def test_on_a_gpu_the_captured_graph_trains_as_the_eager_step_does(mnist_dir, model_config):
    """The real capture, of every architecture, with DReG, binarisation and KL warm-up: the
    CUDA-graph epochs against eager epochs on the same GPU, same draws, and against themselves."""
    images = load_split(mnist_dir, "train")[0][:WALK]
    config, how = replace(CONFIG, kl_warmup_epochs=2), {"device": "cuda", "model_config": model_config}
    eager, eager_history = trained(images, config, **how)
    graphed, graphed_history = trained(images, config, graphed=True, **how)
    again, again_history = trained(images, config, graphed=True, **how)
    # A convolutional model's weights are left out, and its means held looser: cuDNN may sum
    # their gradients in any order, and Adam turns rounding in a near-zero gradient into a step
    # of up to the learning rate (on a CPU, eager and graphed conv models differ by 5.6e-3,
    # their means by 2.5e-5 relative at most).
    conv = model_config.arch == "conv"
    rel = 1e-3 if conv else 1e-4
    for a, b, c in zip(eager_history, graphed_history, again_history):
        assert b == pytest.approx(a, rel=rel) and c == pytest.approx(b, rel=rel)
    if not conv:
        assert max_abs_diff(eager, graphed) <= 1e-4  # fused against GraphAdam: rounding
        assert max_abs_diff(graphed, again) == 0  # replays are deterministic from the seed


def test_kl_warmup_ramps_the_weight_the_trainer_trains_with(mnist_dir):
    """Tomczak & Welling's linear ramp, per epoch from 0; the trainer's weight tensor follows
    it, and training with it is not training without it."""
    config = replace(CONFIG, epochs=5, kl_warmup_epochs=4)
    assert [config.kl_weight(e) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert CONFIG.kl_weight(0) is None
    images = load_split(mnist_dir, "train")[0][:64]
    warm, trainer, epoch = make_trainer(images, replace(config, epochs=2))
    epoch(0)
    assert trainer.kl_weight.item() == 0.25
    cold, _, cold_epoch = make_trainer(images, replace(config, epochs=2, kl_warmup_epochs=0))
    cold_epoch(0)
    assert max_abs_diff(warm, cold) > 1e-4
