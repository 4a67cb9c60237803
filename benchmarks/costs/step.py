"""One training step under the counter: forward, backward, AdamW step.

The optimizer is MAE's: AdamW, betas (0.9, 0.95), weight decay 0.05 on weights and none on
biases, norms and 1-D parameters (two parameter groups, as timm's ``add_weight_decay``
gives), run as PyTorch's fused AdamW (``fused=True``: one multi-tensor kernel per group for
the update plus one for the step counters). ``torch.optim.AdamW(fused=True)`` refuses meta
tensors, so :class:`FusedAdamW` calls the same functional fused path directly; on CPU and
CUDA it runs the same kernels as the class.

The step counted is a steady-state one: a first, uncounted step creates the optimizer
state, gradients are then set to ``None`` (``zero_grad(set_to_none=True)``) and the second
step is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.adamw import adamw

from costs.counter import StepCost, StepCounter


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class FusedAdamW:
    """AdamW through PyTorch's fused kernel (``torch._fused_adamw_``), usable on meta tensors."""

    def __init__(self, model: nn.Module, lr: float = 1.5e-4, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        self.groups = [g for g in param_groups_weight_decay(model, weight_decay) if g["params"]]
        self.lr, self.betas, self.eps = lr, betas, eps
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for s in self.state.values() for t in s.values()]

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for g in self.groups:
            params = [p for p in g["params"] if p.grad is not None]
            for p in params:
                if p not in self.state:
                    self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                                     "step": torch.zeros((), dtype=torch.float32, device=p.device)}
            states = [self.state[p] for p in params]
            adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                  [], [s["step"] for s in states], foreach=False, fused=True, amsgrad=False, beta1=self.betas[0],
                  beta2=self.betas[1], lr=self.lr, weight_decay=g["weight_decay"], eps=self.eps, maximize=False)


def mae_loss(model: nn.Module, imgs: torch.Tensor, mask_ratio: float = 0.75) -> torch.Tensor:
    """The loss of an MAE-style model: ``forward(imgs, mask_ratio) -> (loss, pred, mask)``."""
    return model(imgs, mask_ratio=mask_ratio)[0]


def count_step(model: nn.Module, inputs: Sequence[torch.Tensor],
               loss_fn: Callable[..., torch.Tensor] = mae_loss, *, gpu_kernels: bool = True,
               optimizer: FusedAdamW | None = None, after_step: Callable[[], Any] | None = None) -> StepCost:
    """Counts one steady-state training step of ``model`` on ``inputs`` (any device; meta costs nothing).

    ``after_step``: work the method does after the optimizer step (LUT's EMA teacher update),
    counted in the optimizer phase."""
    model.train()
    optimizer = optimizer or FusedAdamW(model)
    loss_fn(model, *inputs).backward()
    optimizer.step()
    if after_step is not None:
        after_step()
    optimizer.zero_grad()
    counter = StepCounter(model, gpu_kernels=gpu_kernels)
    try:
        counter.track([*model.parameters(), *model.buffers(), *optimizer.state_tensors(), *inputs], resident=True)
        with counter.phase("forward"):
            loss = loss_fn(model, *inputs)
        with counter.phase("backward"):
            loss.backward()
        del loss
        with counter.phase("optimizer"):
            optimizer.step()
            if after_step is not None:
                after_step()
    finally:
        counter.detach()
    return counter.result()
