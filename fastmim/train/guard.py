"""The guard that keeps non-finite values out of the weights and the checkpoints.

Each step whose loss or gradient norm is nan/inf is skipped: :func:`skip_flag` decides on the
device, without a host sync, and fused AdamW takes the flag as ``found_inf`` (as GradScaler
sets it), leaving parameters, moments and its step count as they were. A checkpoint is
written only when :func:`nonfinite_tensor` finds every weight and optimizer tensor finite.
What a run does after ``max_skips`` skipped steps in a row (``on_nonfinite``: skip, rollback,
stop) is the training loop's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastmim.train.distributed import DistInfo, local_tensor

__all__ = ["nonfinite_tensor", "skip_flag"]


def skip_flag(step_loss: torch.Tensor, grad_norm: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``1.0`` (a 0-dim device tensor) when the step's loss or gradient norm is not finite on
    any rank, else ``0.0``: every rank skips the steps any rank's loss calls for."""
    skip = (~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))).float()
    if info.enabled:
        torch.distributed.all_reduce(skip, op=torch.distributed.ReduceOp.MAX)
    return skip


def nonfinite_tensor(module: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> str | None:
    """The name of a weight, buffer or optimizer-state tensor holding nan or inf, else ``None``.
    One fused check (each tensor's largest magnitude: unlike a 2-norm it cannot overflow) and
    one host sync; in a distributed run a collective over every rank's shards."""
    param_names = {id(p): name for name, p in module.named_parameters()}
    named = list(module.state_dict().items())
    named += [(f"the optimizer's {key} of {param_names[id(p)]}", value)
              for p, state in optimizer.state.items() for key, value in state.items()
              if isinstance(value, torch.Tensor)]
    named = [(name, local_tensor(t)) for name, t in named if t.is_floating_point()]
    named = [(name, t) for name, t in named if t.numel() > 0]
    peaks = torch._foreach_norm([t for _, t in named], ord=math.inf)
    broken = (~torch.isfinite(torch.stack([peak.float() for peak in peaks]))).any().float()
    if info.enabled:
        torch.distributed.all_reduce(broken, op=torch.distributed.ReduceOp.MAX)
    if not broken.item():
        return None
    return next((name for name, t in named if not torch.isfinite(t).all()), "a tensor of another process")
