"""vae/graph_adam.py: the Adam a CUDA graph captures steps as torch's Adam does."""
import io

import pytest
import torch

from vae.graph_adam import GraphAdam
from vae.training import TrainConfig, Trainer, learning_rate_schedule

CONFIG = TrainConfig(seed=0, epochs=1, batch_size=32, lr=2e-3, lr_schedule="onecycle", iwae_k=1, dreg=False,
                     binarize=False, bf16=False, kl_warmup_epochs=0)


@pytest.mark.parametrize("hyperparameters", ["numbers", "tensors"])
def test_graph_adam_steps_as_torchs_adam_and_shares_its_checkpoints(hyperparameters):
    """GraphAdam against torch's Adam on the same gradients under the one-cycle schedule (the
    learning rate and momentum change every step), its learning rate and beta1 numbers or, as
    the graphs read them, tensors; then each one's checkpoint (through torch.save, as
    Trainer.state_dict saves it) resumed by the other, which steps on as the first does."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(3)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(12)]

    def optimiser(graph: bool):
        params = [p.clone().requires_grad_() for p in start]
        made = GraphAdam(params, lr=CONFIG.lr) if graph else torch.optim.Adam(params, lr=CONFIG.lr)
        return params, made, learning_rate_schedule(made, CONFIG, train_images=12 * CONFIG.batch_size)

    def run(params, made, schedule, steps):
        for step in steps:
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            made.step()
            schedule.step()
            group = made.param_groups[0]
            if hyperparameters == "tensors" and isinstance(made, GraphAdam):
                group["lr"] = torch.tensor(float(group["lr"]))
                group["betas"] = (torch.tensor(float(group["betas"][0])), group["betas"][1])

    def resumed(source, graph: bool):
        params, made, schedule = optimiser(graph)
        with torch.no_grad():
            for p, q in zip(params, source[0]):
                p.copy_(q)
        buffer = io.BytesIO()  # Trainer's checkpoint of the optimiser and schedule, and its loading
        torch.save(Trainer(None, source[1], source[2], CONFIG, noise_dim=1).state_dict(), buffer)
        saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        Trainer(None, made, schedule, CONFIG, noise_dim=1).load_state_dict(saved)
        return params, made, schedule

    def distance(a, b) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a[0], b[0]))
    ours, theirs = optimiser(True), optimiser(False)
    run(*ours, range(6))
    run(*theirs, range(6))
    assert float(ours[1].param_groups[0]["betas"][0]) < 0.95  # the momentum has moved from its start
    assert 0 < distance(ours, theirs) <= 1e-6  # 1.2e-7 here: rounding
    from_theirs, from_ours = resumed(theirs, True), resumed(ours, False)
    for optimisers in (ours, theirs, from_theirs, from_ours):
        run(*optimisers, range(6, 12))
    assert distance(ours, theirs) <= 1e-6
    assert distance(from_theirs, theirs) <= 1e-6 and distance(from_ours, ours) <= 1e-6
