"""Argument checks of the ops, in one module: the checks of each op family's arguments
(``validate_<op>``: shapes, dtypes, devices, always, for free) and one policy for the values of
index and offset arguments.

Index *values* (``ids_keep``,
``ids_restore``, ``ids_masked``, integer ``key_visible``, ``cu_seqlens``) are checked as follows:

- **On the host** (CPU tensors, on every backend: reference, csrc, and Triton through its
  interpreter) they are always checked; a bad value raises ``ValueError`` naming the argument,
  the first bad position, the value and the expected range.
- **On an accelerator** reading them back would be a device sync on the hot path, so they are
  checked only while index checks are on (``FASTMIM_CHECK_INDICES=1`` in the environment, or
  :func:`check_indices` in code): the debug mode for a run that misbehaves. With checks off,
  every kernel still masks every access with the real extent of the tensor it reads or writes,
  so a bad index gives wrong values (an out-of-range id reads zeros, its gradient is dropped),
  never an access outside a tensor.
- **While torch.compile traces** they are never checked (a data-dependent check would break
  the graph); the compiled kernels keep their masked accesses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fastmim import environment

__all__ = ["check_cu_seqlens", "check_distinct_rows", "check_image_geometry", "check_index_range", "check_indices",
           "check_permutation_rows", "validate_attention", "validate_masked_patch_mse", "validate_qkv",
           "values_checked"]

_checks_forced: bool | None = None


def _checks_on() -> bool:
    if _checks_forced is not None:
        return _checks_forced
    return environment.check_indices()


@contextlib.contextmanager
def check_indices(enabled: bool = True) -> Iterator[None]:
    """Check index values of accelerator tensors too (a device sync per op call) inside the block.

    ``FASTMIM_CHECK_INDICES=1`` turns the same checks on for a whole process. Host tensors are
    always checked.
    """
    global _checks_forced
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _checks_forced = _checks_forced, enabled
    try:
        yield
    finally:
        _checks_forced = previous


def values_checked(t: Tensor) -> bool:
    """Whether the values of ``t`` are checked under the policy above."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t):  # no values to read
        return False
    return t.device.type == "cpu" or _checks_on()


def _first_bad(bad: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def check_index_range(name: str, t: Tensor, high: int, *, low: int = 0, op: str | None = None) -> None:
    """Every value of ``t`` in ``[low, high)`` (when checked: see :func:`values_checked`)."""
    if t.numel() == 0 or not values_checked(t):
        return
    bad = (t < low) | (t >= high)
    if bool(bad.any()):
        where = _first_bad(bad)
        prefix = f"{op}: " if op else ""
        position = f"[{', '.join(map(str, where))}]" if where else ""
        raise ValueError(f"{prefix}{name}{position} = {int(t[where])} is outside the valid range [{low}, {high})")


def check_permutation_rows(name: str, t: Tensor, *, op: str | None = None) -> None:
    """Every row of the 2-D ``t`` a permutation of ``0..L-1`` (when checked)."""
    if t.numel() == 0 or not values_checked(t):
        return
    length = t.shape[-1]
    check_index_range(name, t, length, op=op)
    expected = torch.arange(length, device=t.device, dtype=t.dtype)
    wrong = (t.sort(dim=-1).values != expected).any(dim=-1)
    if bool(wrong.any()):
        row = int(wrong.nonzero()[0, 0])
        prefix = f"{op}: " if op else ""
        raise ValueError(f"{prefix}{name}[{row}] must be a permutation of 0..{length - 1} (each index once), "
                         f"got {t[row].tolist()[:16]}{' ...' if length > 16 else ''}")


def check_distinct_rows(name: str, t: Tensor, *, op: str | None = None) -> None:
    """No value twice in a row of the 2-D ``t`` (when checked): each index of a set at most once."""
    if t.numel() == 0 or not values_checked(t):
        return
    ordered = t.sort(dim=-1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        row, col = _first_bad(repeated)
        value = int(ordered[row, col])
        first, second = ((t[row] == value).nonzero()[:2, 0]).tolist()
        prefix = f"{op}: " if op else ""
        raise ValueError(f"{prefix}{name}[{row}, {second}] = {value} repeats {name}[{row}, {first}]: each index "
                         f"may appear at most once per row")


def check_cu_seqlens(name: str, cu_seqlens: Tensor, *, total: int | None = None, max_seqlen: int | None = None,
                     op: str | None = None) -> list[int] | None:
    """Offsets ``cu_seqlens`` valid (when checked): ``cu_seqlens[0] = 0``, non-decreasing,
    ``cu_seqlens[-1] = total`` (the packed length, when given) and every count ``<= max_seqlen``
    (when given). Returns the offsets as a list when they were checked, else ``None``."""
    if not values_checked(cu_seqlens):
        return None
    prefix = f"{op}: " if op else ""
    cu = cu_seqlens.tolist()
    if not cu:
        return cu
    if cu[0] != 0:
        raise ValueError(f"{prefix}{name}[0] = {cu[0]}, expected 0 (offsets start at 0)")
    for i in range(1, len(cu)):
        if cu[i] < cu[i - 1]:
            raise ValueError(f"{prefix}{name}[{i}] = {cu[i]} < {name}[{i - 1}] = {cu[i - 1]}: offsets must be "
                             f"non-decreasing")
    if total is not None and cu[-1] != total:
        raise ValueError(f"{prefix}{name}[-1] = {cu[-1]}, expected the packed length {total}")
    if max_seqlen is not None and len(cu) > 1:
        counts = [hi - lo for lo, hi in zip(cu[:-1], cu[1:], strict=True)]
        longest = max(counts)
        if longest > max_seqlen:
            b = counts.index(longest)
            raise ValueError(f"{prefix}max_seqlen = {max_seqlen} is smaller than sequence {b} of {name} "
                             f"({longest} tokens): it must bound every sequence length")
    return cu


# ---------------------------------------------------------------------------------------------
# Arguments of each op family
# ---------------------------------------------------------------------------------------------


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ATTENTION_DTYPES = _FLOAT_DTYPES
_LOSS_REDUCTIONS = ("mean", "sum", "none")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale) -> None:
    """The arguments of :func:`fastmim.ops.visible_attention` and the router's ``attention``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"visible_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _ATTENTION_DTYPES:
            raise TypeError(f"visible_attention: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"visible_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"visible_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"visible_attention: scale must be a Python float or None, got {type(scale).__name__}")
    if cu_seqlens is not None:
        if key_visible is not None:
            raise ValueError("visible_attention: key_visible is for the dense (B, H, L, D) layout, not with cu_seqlens")
        if q.dim() != 3:
            raise ValueError(f"visible_attention: with cu_seqlens, q must be packed (T, H, D), got shape {_shape(q)}")
        if _shape(k) != _shape(q) or _shape(v) != _shape(q):
            raise ValueError(f"visible_attention: with cu_seqlens, k and v must be shaped like q {_shape(q)}, "
                             f"got k {_shape(k)}, v {_shape(v)}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
            got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise TypeError(f"visible_attention: cu_seqlens must be an int32 tensor, got {got}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"visible_attention: cu_seqlens must be 1-D (B+1,), got shape {_shape(cu_seqlens)}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"visible_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"visible_attention: max_seqlen must be a Python int >= 1 bounding every sequence "
                             f"length (no host sync is made to find it), got {max_seqlen!r}")
        check_cu_seqlens("cu_seqlens", cu_seqlens, total=q.shape[0], max_seqlen=max_seqlen, op="visible_attention")
        return
    if max_seqlen is not None:
        raise ValueError("visible_attention: max_seqlen is only meaningful with cu_seqlens")
    if q.dim() != 4:
        raise ValueError(f"visible_attention: q must be (B, H, N, D) (or (T, H, D) with cu_seqlens), got shape "
                         f"{_shape(q)}")
    if k.dim() != 4 or _shape(k) != _shape(v) or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"visible_attention: k and v must be (B, H, Nk, D) matching q {_shape(q)} in B, H, D, "
                         f"got k {_shape(k)}, v {_shape(v)}")
    if k.shape[2] == 0:
        raise ValueError(f"visible_attention: k has no keys (shape {_shape(k)})")
    if key_visible is None:
        return
    if not isinstance(key_visible, torch.Tensor):
        raise TypeError(f"visible_attention: key_visible must be a tensor, got {type(key_visible).__name__}")
    batch, length = q.shape[0], k.shape[2]
    if q.shape[2] != length:
        raise ValueError(f"visible_attention: key_visible needs q and k of the same length L, got q {_shape(q)}, "
                         f"k {_shape(k)}")
    if key_visible.device != q.device:
        raise ValueError(f"visible_attention: key_visible is on {key_visible.device}, q on {q.device}")
    if key_visible.dtype == torch.bool:
        if _shape(key_visible) != (batch, length):
            raise ValueError(f"visible_attention: boolean key_visible must be (B, L) = {(batch, length)}, "
                             f"got {_shape(key_visible)}")
    elif key_visible.dtype in (torch.int32, torch.int64):
        if key_visible.dim() != 2 or key_visible.shape[0] != batch or key_visible.shape[1] > length:
            raise ValueError(f"visible_attention: integer key_visible must be (B, K) = ({batch}, K <= {length}), "
                             f"got {_shape(key_visible)}")
        check_index_range("key_visible", key_visible, length, op="visible_attention")
        check_distinct_rows("key_visible", key_visible, op="visible_attention")
    else:
        raise TypeError(f"visible_attention: key_visible must be bool (B, L) or int32/int64 (B, K), "
                        f"got {key_visible.dtype}")


def validate_qkv(qkv, cu_seqlens) -> None:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"visible_attention_qkvpacked: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    want = "(T, 3, H, D) with cu_seqlens" if cu_seqlens is not None else "(B, N, 3, H, D)"
    if qkv.dim() != (4 if cu_seqlens is not None else 5) or qkv.shape[-3] != 3:
        raise ValueError(f"visible_attention_qkvpacked: qkv must be {want}, got shape {_shape(qkv)}")


def check_image_geometry(imgs: torch.Tensor, patch_size: int, name: str) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(imgs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(imgs).__name__}")
    if imgs.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(imgs.shape)}")
    height, width = imgs.shape[2], imgs.shape[3]
    if height % patch_size or width % patch_size:
        raise ValueError(f"{name} height and width must be divisible by patch_size={patch_size}, "
                         f"got {height}x{width}")


def validate_masked_patch_mse(pred, imgs, mask, patch_size, norm_pix_loss, eps, reduction,
                              ids_masked) -> torch.Tensor | None:
    """The arguments of :func:`fastmim.ops.masked_patch_mse`; returns ``mask`` as a float tensor (or ``None``)."""
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"pred must be a torch.Tensor, got {type(pred).__name__}")
    check_image_geometry(imgs, patch_size, "imgs")
    if reduction not in _LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_LOSS_REDUCTIONS}, got {reduction!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    for name, t in (("pred", pred), ("imgs", imgs)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    batch, channels, height, width = imgs.shape
    if min(channels, height, width) < 1:
        raise ValueError(f"imgs must have C, H and W >= 1 (only the batch B may be empty), got {tuple(imgs.shape)}")
    p = patch_size
    num_patches = (height // p) * (width // p)
    n = p * p * channels
    if norm_pix_loss and n < 2:
        raise ValueError(f"norm_pix_loss needs at least 2 values per patch (p*p*C = {n}): the unbiased variance "
                         "of one value is undefined")
    if ids_masked is None:
        expected = (batch, num_patches, n)
        if tuple(pred.shape) != expected:
            raise ValueError(f"pred must have shape (B, L, p*p*C) = {expected} for imgs {tuple(imgs.shape)} and "
                             f"patch_size={p}, got {tuple(pred.shape)} (pass ids_masked for a subset of patches)")
        if mask is None:
            raise ValueError("mask (B, L) is required when pred holds every patch (ids_masked is None)")
    else:
        if not isinstance(ids_masked, torch.Tensor):
            raise TypeError(f"ids_masked must be a torch.Tensor, got {type(ids_masked).__name__}")
        if ids_masked.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids_masked must be int64 or int32, got {ids_masked.dtype}")
        if ids_masked.device != pred.device:
            raise ValueError(f"ids_masked is on {ids_masked.device}, expected pred's device {pred.device}")
        if pred.dim() == 3:
            if pred.shape[0] != batch or pred.shape[2] != n:
                raise ValueError(f"pred must have shape (B, K, p*p*C) = ({batch}, K, {n}) with ids_masked, "
                                 f"got {tuple(pred.shape)}")
            if tuple(ids_masked.shape) != tuple(pred.shape[:2]):
                raise ValueError(f"ids_masked must have shape (B, K) = {tuple(pred.shape[:2])} like pred's first "
                                 f"two dimensions, got {tuple(ids_masked.shape)}")
            if pred.shape[1] > num_patches:
                raise ValueError(f"pred has K={pred.shape[1]} rows per sample, more than L={num_patches} patches")
        elif pred.dim() == 2:
            if pred.shape[1] != n:
                raise ValueError(f"pred must have shape (T, p*p*C) = (T, {n}) in the packed layout, "
                                 f"got {tuple(pred.shape)}")
            if tuple(ids_masked.shape) != (pred.shape[0],):
                raise ValueError(f"ids_masked must have shape (T,) = ({pred.shape[0]},) in the packed layout, "
                                 f"got {tuple(ids_masked.shape)}")
        else:
            raise ValueError(f"pred must have shape (B, K, p*p*C) or (T, p*p*C) with ids_masked, "
                             f"got {tuple(pred.shape)}")
        check_index_range("ids_masked", ids_masked, num_patches if pred.dim() == 3 else batch * num_patches,
                          op="masked_patch_mse")
    if pred.shape[-1] > 0 and pred.stride(-1) != 1:
        raise ValueError(f"pred's last dimension must be contiguous (stride 1), got strides {pred.stride()}")
    if imgs.device != pred.device:
        raise ValueError(f"imgs is on {imgs.device}, expected pred's device {pred.device}")
    if imgs.requires_grad:
        raise ValueError("imgs requires grad, but masked_patch_mse gives gradients to pred only: "
                         "pass imgs.detach()")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != (batch, num_patches):
            raise ValueError(f"mask must have shape (B, L) = {(batch, num_patches)}, got {tuple(mask.shape)}")
        if mask.device != pred.device:
            raise ValueError(f"mask is on {mask.device}, expected pred's device {pred.device}")
        if mask.dtype == torch.bool:
            mask = mask.to(torch.float32)
        elif mask.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"mask must be a float or bool tensor, got {mask.dtype}")
        else:
            _check_weights(mask)
        if mask.requires_grad:
            raise ValueError("mask requires grad, but masked_patch_mse gives gradients to pred only: "
                             "pass mask.detach()")
    return mask


def _check_weights(mask: torch.Tensor) -> None:
    """Every weight finite and ``>= 0``, checked when index values are (same policy, same cost): a
    negative weight can cancel the others in ``sum(mask)``, a non-finite one poisons the whole loss."""
    if mask.numel() == 0 or not values_checked(mask):
        return
    bad = ~(mask >= 0) | torch.isinf(mask)  # NaN fails mask >= 0
    if bool(bad.any()):
        b, patch = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"masked_patch_mse: mask[{b}, {patch}] = {float(mask[b, patch])} is not a finite weight "
                         ">= 0")
