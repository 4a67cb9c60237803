"""Argument checks of the ViT block's ops (:mod:`fastmim.ops.norm_act`, :mod:`fastmim.ops.fused_block`):
the type, dtype, shape and device of every tensor argument and the value of ``eps``. Each raises a
``TypeError`` or ``ValueError`` naming the argument."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_vector(t, name: str, x: torch.Tensor) -> None:
    check_tensor(t, name)
    if t.shape != (x.shape[-1],):
        raise ValueError(f"{name} must have shape ({x.shape[-1]},) (the last dim of x), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


def check_x(x, name: str = "x") -> None:
    check_tensor(x, name)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one dim with a non-empty last dim, got shape {tuple(x.shape)}")


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return float(eps)


def check_layer_norm(x, weight, bias, eps) -> float:
    check_x(x)
    check_vector(weight, "weight", x)
    check_vector(bias, "bias", x)
    return check_eps(eps)


def check_linear(weight, linear_bias, x: torch.Tensor, names=("weight", "linear_bias")) -> None:
    check_tensor(weight, names[0])
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.device != x.device:
        raise ValueError(f"{names[0]} must be (out_features, {x.shape[-1]}) on {x.device}, got "
                         f"{tuple(weight.shape)} on {weight.device}")
    if linear_bias is not None:
        check_tensor(linear_bias, names[1])
        if linear_bias.shape != (weight.shape[0],) or linear_bias.device != x.device:
            raise ValueError(f"{names[1]} must be ({weight.shape[0]},) on {x.device}, got "
                             f"{tuple(linear_bias.shape)} on {linear_bias.device}")


def check_stats(stats, x: torch.Tensor) -> torch.Tensor | None:
    if stats is None:
        return None
    check_tensor(stats, "stats")
    rows = x.numel() // x.shape[-1]
    if stats.dim() != 3 or stats.shape[0] != rows or stats.shape[2] != 3 or stats.shape[1] < 1:
        raise ValueError(f"stats must be (rows, tiles, 3) with rows = {rows}, got {tuple(stats.shape)}")
    return stats
