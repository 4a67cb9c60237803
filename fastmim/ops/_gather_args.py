"""Argument checks of the gather ops (:mod:`fastmim.ops.gather`): types, shapes and devices of
every tensor argument, and the values of the index arguments under the policy of
:mod:`fastmim.ops._validate`. Each raises a ``TypeError`` or ``ValueError`` naming the argument."""

from __future__ import annotations

import torch
from torch import Tensor

from fastmim.ops._validate import check_cu_seqlens, check_index_range, check_permutation_rows

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)


def check_float(name: str, t: object, device: torch.device | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the tokens are on {device}")
    return t


def check_index(name: str, t: object, ndim: int, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the tokens are on {device}")
    return t


def check_varlen(cu_seqlens: object, batch: int, device: torch.device) -> Tensor:
    cu = check_index("cu_seqlens", cu_seqlens, 1, device)
    if cu.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens must have shape (B + 1,) = ({batch + 1},), got {tuple(cu.shape)}")
    return cu


def pos_embed_2d(pos_embed: object, num_patches: int, dim: int, device: torch.device) -> Tensor | None:
    """``pos_embed`` as a 2-D ``(P, D)`` view, ``P`` in ``{L, L + 1}``."""
    if pos_embed is None:
        return None
    pos = check_float("pos_embed", pos_embed, device)
    ok_rows = (num_patches, num_patches + 1)
    if not ((pos.dim() == 2 or (pos.dim() == 3 and pos.shape[0] == 1)) and pos.shape[-2] in ok_rows
            and pos.shape[-1] == dim):
        raise ValueError(f"pos_embed must have shape (L, D), (1, L, D), (L + 1, D) or (1, L + 1, D) with L = "
                         f"{num_patches}, D = {dim} (the L + 1 forms carry a leading cls slot), "
                         f"got {tuple(pos.shape)}")
    return pos.reshape(pos.shape[-2], dim)


def check_token(name: str, token: object, dim: int, device: torch.device) -> Tensor:
    token = check_float(name, token, device)
    if token.numel() != dim or token.dim() > 3 or any(s != 1 for s in token.shape[:-1]):
        raise ValueError(f"{name} must have shape (D,), (1, D) or (1, 1, D) with D = {dim}, got {tuple(token.shape)}")
    return token.reshape(dim)


def max_seqlen_of(cu_seqlens: Tensor, max_seqlen: int | None) -> int:
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
        return max_seqlen
    # A device sync when cu_seqlens lives on an accelerator: pass max_seqlen to avoid it.
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def check_gather_values(ids_keep: Tensor, num_patches: int, cu_seqlens: Tensor | None,
                         max_seqlen: int | None) -> None:
    """The values of gather_visible's index arguments, under the policy of fastmim.ops._validate."""
    if cu_seqlens is not None:
        cu = check_cu_seqlens("cu_seqlens", cu_seqlens, max_seqlen=max_seqlen, op="gather_visible")
        if cu is not None and cu[-1] != ids_keep.shape[0]:
            raise ValueError(f"gather_visible: ids_keep must have cu_seqlens[-1] = {cu[-1]} rows (the packed "
                             f"length), got shape {tuple(ids_keep.shape)}")
    check_index_range("ids_keep", ids_keep, num_patches, op="gather_visible")


def check_unshuffle_values(x_visible: Tensor, ids_restore: Tensor, cu_seqlens: Tensor | None,
                            has_cls: bool) -> None:
    """The values of unshuffle's index arguments, under the policy of fastmim.ops._validate."""
    check_permutation_rows("ids_restore", ids_restore, op="unshuffle")
    cu = None if cu_seqlens is None else check_cu_seqlens("cu_seqlens", cu_seqlens, op="unshuffle")
    if cu is None:
        return
    B, L = ids_restore.shape
    for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        # A sample's visible tokens take ranks 0..count-1 of its L patches: at most L of them.
        if hi - lo > L:
            raise ValueError(f"unshuffle: sample {b} has cu_seqlens[{b + 1}] - cu_seqlens[{b}] = {hi - lo} visible "
                             f"tokens, more than its L = {L} patches")
    packed = f"(T{' + B' if has_cls else ''}, D)"
    if x_visible.shape[0] != cu[-1] + B * has_cls:
        raise ValueError(f"unshuffle: x_visible must be packed {packed} = ({cu[-1] + B * has_cls}, D) with T = "
                         f"cu_seqlens[-1] = {cu[-1]}, B = {B}, got shape {tuple(x_visible.shape)}")
