"""Heads and losses shared by the two-view methods (CMAE, LUT).

- :func:`mlp_head`: ``Linear(no bias) -> BatchNorm -> ReLU`` repeated, then a last ``Linear``
  (no norm, no activation): the projection heads of SimCLR/BYOL and of LUT's reference code.
- :class:`HeadBatchNorm1d`: ``BatchNorm1d`` whose batch statistics span every process when a
  process group of more than one rank is initialised (SyncBatchNorm semantics on any device,
  CPU/gloo included, where ``nn.SyncBatchNorm`` refuses CPU tensors); plain ``BatchNorm1d``
  otherwise, bit for bit.
- :func:`all_gather_with_grad`: every rank's rows concatenated in rank order, differentiable;
  the identity in a single process (no process group needed).
- :func:`info_nce`: symmetric InfoNCE with in-batch negatives gathered across ranks.
- :func:`cosine_loss`: ``2 - 2 cos(a, b)`` per row (BYOL's normalised MSE).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["HeadBatchNorm1d", "FrozenBatchNorm1d", "mlp_head", "all_gather_with_grad", "info_nce", "cosine_loss",
           "world_info"]


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllReduceSum(torch.autograd.Function):
    """``sum over ranks`` of a tensor; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class _AllGather(torch.autograd.Function):
    """Rows of every rank, in rank order. Backward: this rank's slice of the gradient summed over
    ranks (each rank's loss depends on every rank's rows), so the gradients that DDP then averages
    equal those of one process holding the whole batch."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        rank, world = world_info()
        ctx.rank, ctx.rows = rank, t.shape[0]
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        parts[rank] = t  # the local rows keep their own values exactly
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """``(world * N, ...)``: every rank's ``(N, ...)`` rows in rank order (same ``N`` on every rank).

    Differentiable: the local rows are the live tensor, and the gradient reaching them is summed
    over all ranks' losses. Without an initialised process group (or with one rank) it returns
    ``t`` itself.
    """
    _, world = world_info()
    if world == 1:
        return t
    return _AllGather.apply(t)


class HeadBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` over ``(N, C)`` with statistics over the global batch under DDP.

    In training mode with an initialised process group of more than one rank, the mean and the
    biased variance are computed from per-rank sums reduced over all ranks (fp32, differentiable),
    and the running statistics take the unbiased global variance, as ``nn.SyncBatchNorm`` does;
    this works on CPU (gloo) too. Otherwise it is exactly ``nn.BatchNorm1d``. Being a
    ``BatchNorm1d``, ``nn.SyncBatchNorm.convert_sync_batchnorm`` still converts it if wanted.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, world = world_info()
        if world == 1 or not self.training or x.dim() != 2:
            return super().forward(x)
        xf = x.float()
        count = torch.full((1,), float(x.shape[0]), device=x.device)
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), count])
        stats = _AllReduceSum.apply(stats)
        channels = x.shape[1]
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                momentum = 0.1 if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
                self.num_batches_tracked.add_(1)
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.float() + self.bias.float()
        return out.to(x.dtype)


class FrozenBatchNorm1d(nn.Module):
    """Inference-only BatchNorm: ``weight``, ``bias``, ``running_mean``, ``running_var`` are all
    buffers (an EMA teacher's copy of a :class:`HeadBatchNorm1d`: no parameter, never synced)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm1d:
        frozen = cls(bn.num_features, bn.eps)
        like = bn.running_mean if bn.running_mean is not None else bn.weight
        if like is not None:  # the source's device and dtype (a float64 model's teacher stays float64)
            frozen.to(device=like.device, dtype=like.dtype)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.running_mean is not None:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, *, sync_bn: bool = True) -> nn.Sequential:
    """``num_layers`` linears without bias, ``BatchNorm1d + ReLU`` between them (none after the last).

    ``sync_bn``: :class:`HeadBatchNorm1d` (global-batch statistics under DDP) instead of
    ``nn.BatchNorm1d`` (per-process statistics).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    norm = HeadBatchNorm1d if sync_bn else nn.BatchNorm1d
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [norm(d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views ``(N, E)``: ``(CE(z1 K2^T / t) + CE(z2 K1^T / t)) / 2``.

    Rows are L2-normalised (in fp32); ``K1``/``K2`` are the views gathered from every rank
    (:func:`all_gather_with_grad`), so each query has ``world * N - 1`` in-batch negatives, the
    other view of every other image (MoCo v3 / CLIP form). The positive of local row ``i`` is
    global row ``rank * N + i``. Averaged over this rank's queries; the mean over ranks is the
    loss of one process holding the global batch.
    """
    z1 = F.normalize(z1.float(), dim=-1)
    z2 = F.normalize(z2.float(), dim=-1)
    rank, _ = world_info()
    labels = torch.arange(z1.shape[0], device=z1.device) + rank * z1.shape[0]
    logits_12 = z1 @ all_gather_with_grad(z2).t() / temperature
    logits_21 = z2 @ all_gather_with_grad(z1).t() / temperature
    return 0.5 * (F.cross_entropy(logits_12, labels) + F.cross_entropy(logits_21, labels))


def cosine_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``mean over rows of 2 - 2 cos(p, z)`` (fp32), in ``[0, 4]``."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.float(), dim=-1)
    return (2 - 2 * (p * z).sum(dim=-1)).mean()
