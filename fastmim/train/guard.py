"""The guard that keeps non-finite values out of the weights and the checkpoints.

Each step whose loss or gradient norm is nan/inf is skipped: :func:`skip_flag` decides on the
device, without a host sync, and fused AdamW takes the flag as ``found_inf`` (as GradScaler
sets it), leaving parameters, moments and its step count as they were. A checkpoint is
written only when :func:`nonfinite_tensor` finds every weight and optimizer tensor finite, and
a periodic one only after a step that was not skipped, so it never replaces the last good one;
a run whose weights end non-finite is an error, never a success.

When ``max_skips`` steps in a row were skipped (read with each metrics record),
``on_nonfinite`` decides (:class:`DivergencePolicy`): ``skip`` goes on (a run that ends so
fails), ``rollback`` reloads the last checkpoint and retries with a fresh data order, ``stop``
ends with an error. The loop does the reloading; the policy counts the tries and words the
error.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from fastmim.train.config import TrainError
from fastmim.train.distributed import DistInfo, local_tensor

__all__ = ["ROLLBACKS_PER_CHECKPOINT", "DivergencePolicy", "SkipCounters", "nonfinite_tensor", "skip_flag"]

# Fresh data orders tried from one checkpoint (on_nonfinite="rollback") before the run gives up.
ROLLBACKS_PER_CHECKPOINT = 3


def skip_flag(step_loss: torch.Tensor, grad_norm: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``1.0`` (a 0-dim device tensor) when the step's loss or gradient norm is not finite on
    any rank, else ``0.0``: every rank skips the steps any rank's loss calls for."""
    skip = (~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))).float()
    if info.enabled:
        torch.distributed.all_reduce(skip, op=torch.distributed.ReduceOp.MAX)
    return skip


class SkipCounters:
    """The guard's counts, device tensors added to without a host sync; the loop reads them with
    each metrics record."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)  # steps skipped so far (rolled-back ones included)
        self.streak = torch.zeros((), device=device)  # steps skipped in a row up to the latest
        self.latest = torch.zeros((), device=device)  # 1 when the latest step was skipped, else 0

    def count(self, skip: torch.Tensor) -> None:
        """The step just taken, ``skip`` being its :func:`skip_flag`."""
        self.latest = skip
        self.total += skip
        self.streak = (self.streak + skip) * skip


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


class DivergencePolicy:
    """What a run does once its values stay non-finite, as ``on_nonfinite`` says, and the error
    that ends it. It keeps the count of rollbacks to the same checkpoint and the streak already
    warned about; ``saved_step`` is the step of the run's last checkpoint (-1: none yet)."""

    def __init__(self, on_nonfinite: str, out: Path, is_main: bool):
        self.on_nonfinite, self.out, self.is_main = on_nonfinite, out, is_main
        self.rollback_target, self.rollback_attempts, self.warned_streak = -1, 0, 0

    def error(self, reason: str, saved_step: int) -> TrainError:
        """The error that ends a diverged run, naming the checkpoint it keeps."""
        kept = (f"the checkpoint of step {saved_step} in {self.out} is kept" if saved_step >= 0
                else "no checkpoint was written")
        return TrainError(f"{reason}: training diverged (try a lower --blr, --clip-grad, or --precision fp32); {kept}")

    def after_skips(self, streak: int, step: int, stop_at: int, saved_step: int) -> str | None:
        """``max_skips`` or more steps in a row, up to ``step``, were skipped. ``rollback``: the
        reason to roll back; ``stop`` (or ``skip`` at the run's last step): raises the run's
        error; ``skip``: ``None``, going on with a warning once per streak."""
        reason = f"the last {streak} steps (to step {step}) had a non-finite loss or gradient and were skipped"
        if self.on_nonfinite == "rollback":
            return reason
        if self.on_nonfinite == "stop" or step >= stop_at:
            raise self.error(reason, saved_step)
        if self.warned_streak != step - streak + 1:  # once per streak
            self.warned_streak = step - streak + 1
            if self.is_main:
                warnings.warn(f"{reason}; going on (--on-nonfinite skip: a run that ends so fails)", stacklevel=2)
        return None

    def count_rollback(self, reason: str, saved_step: int) -> None:
        """Count a rollback to the checkpoint of ``saved_step``; raises the run's error when there
        is no checkpoint yet, or when this one has had its ``ROLLBACKS_PER_CHECKPOINT`` tries."""
        if saved_step < 0:
            raise self.error(f"{reason}; there is no checkpoint yet to roll back to", saved_step)
        if saved_step == self.rollback_target:
            self.rollback_attempts += 1
        else:
            self.rollback_target, self.rollback_attempts = saved_step, 1
        if self.rollback_attempts > ROLLBACKS_PER_CHECKPOINT:
            raise self.error(f"{reason}, after {ROLLBACKS_PER_CHECKPOINT} rollbacks to step {saved_step} with fresh "
                             f"data orders", saved_step)
