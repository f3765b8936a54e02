"""Adam whose update a CUDA graph captures in a few kernels, reading its learning rate and beta1
from device tensors (the one-cycle schedule changes both every step; vae/cuda_graph.py).

torch's own Adam (2.11 to 2.14) offers no such update:
- fused takes beta1 as a number, which a graph keeps from capture time: the schedule's
  momentum would stop;
- foreach passes a tensor beta1 where its kernels take a number (`_foreach_lerp_`,
  `_foreach_pow`), which reads it back to the host: a capture refuses that;
- single-tensor reads it as a tensor, but runs about 19 ops a parameter tensor: 230 for the
  default model's 12, against 21 here, in a step whose cost on a GPU is its kernels.

So this is torch's capturable Adam (torch/optim/adam.py, `_single_tensor_adam`), rewritten in
foreach ops that take tensors. It keeps torch's state (`step`, `exp_avg`, `exp_avg_sq`) and
param groups, so checkpoints move between it and torch's Adam and the schedulers drive it. No
weight decay, amsgrad or maximize: Trainer uses none.
"""
from __future__ import annotations

import torch


class GraphAdam(torch.optim.Adam):
    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr, foreach=False, capturable=True)

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """p's state, made as torch's capturable Adam makes it; a step loaded onto the host
        (from a checkpoint of a CPU run) moved to p's device, where the graph reads it."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:
            state["step"] = state["step"].to(p.device, torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("GraphAdam takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            grads = [p.grad for p in params]
            exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            # m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, torch._foreach_mul(grads, 1 - beta1))
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            # p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), with torch's
            # current beta1 in the bias correction, as torch's Adam has it. Every step count is
            # the same: the first one's stands for all.
            step = steps[0]
            step_size = lr / (1 - beta1 ** step)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, (1 - beta2 ** step).sqrt())
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, -step_size), denom)
