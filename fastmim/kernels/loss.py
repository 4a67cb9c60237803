"""Triton kernels of the masked-patch MSE loss (MAE's ``forward_loss``), with their launchers.

Imports only ``torch`` and ``triton``: another codebase can copy this file whole. The public
op, its reference and its autograd rule live in ``fastmim/ops/loss.py``.

One forward kernel reads each needed patch of the image straight from ``imgs (B, C, H, W)``
by index math (no patchified copy), normalises it per patch (mean, unbiased variance, eps
inside the square root) in fp32, and writes, per patch row, the weighted loss and, when asked,
the gradient with respect to ``pred``: the loss is quadratic in ``pred`` and its target does
not depend on ``pred``, so the gradient is known in the forward pass and backward only has to
scale it by ``grad_output`` (done in place by the second kernel, as Liger-Kernel's fused cross
entropy does). Rows whose weight is 0 (visible patches) read neither ``pred`` nor ``imgs``.

Rows. The kernel walks "rows" of ``pred``, one patch each, in one of three layouts:

- ``LAYOUT_FULL``: ``pred (B, L, N)``, row ``r = b * L + l``, weight ``mask[b, l]``.
- ``LAYOUT_SELECTED``: ``pred (B, K, N)`` holds only the patches ``ids[b, k]`` (e.g. the
  masked ones), row ``r = b * K + k``, weight ``mask[b, ids[b, k]]`` or 1.
- ``LAYOUT_PACKED``: ``pred (T, N)``, row ``r`` is patch ``ids[r] = b * L + l`` of the batch,
  weight ``mask[b, l]`` or 1.

``N = p * p * C`` is the patch length in the official MAE order (row, column, channel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LAYOUT_FULL = 0
LAYOUT_SELECTED = 1
LAYOUT_PACKED = 2

# Elements of a (rows x patch) tile per program: large enough to keep loads in flight,
# small enough that the fp32 copies of target, pred and difference stay in registers.
_TILE_ELEMENTS = 4096


@triton.jit
def _masked_patch_mse_fwd_kernel(
    pred_ptr,  # (B, L, N) LAYOUT_FULL, (B, K, N) LAYOUT_SELECTED or (T, N) LAYOUT_PACKED; N = p * p * C
    imgs_ptr,  # (B, C, H, W), read in place by patch index math
    weight_ptr,  # (B, L) patch weights (HAS_WEIGHT only)
    ids_ptr,  # (B, K) or (T,) patch ids of pred's rows (LAYOUT_SELECTED / LAYOUT_PACKED only)
    weight_sum_ptr,  # () fp32: sum of the weights (SCALE_BY_WEIGHT_SUM only)
    row_loss_ptr,  # (rows,) fp32 weighted loss of each row of pred
    grad_ptr,  # like pred, contiguous: d loss / d pred (COMPUTE_GRAD only)
    num_rows, rows_per_sample, batch, num_patches, grid_w,
    stride_pred_sample, stride_pred_row,
    stride_img_b, stride_img_c, stride_img_h, stride_img_w,
    stride_weight_b, stride_weight_l,
    stride_ids_sample, stride_ids_row,
    eps, row_scale,
    PATCH: tl.constexpr, CHANNELS: tl.constexpr,
    LAYOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, NORM_PIX: tl.constexpr,
    SCALE_BY_WEIGHT_SUM: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    N = PATCH * PATCH * CHANNELS
    # Row and patch indices fit in int32 (B * L < 2**31); offsets into memory are int64.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    sample = rows // rows_per_sample
    within = rows - sample * rows_per_sample

    # The values of ids are not checked on the device (that would sync): a row whose id is out
    # of range reads nothing and gets weight 0. The range test is done on the id as stored
    # (int64), before it is narrowed to int32: 2**32 would otherwise wrap to patch 0.
    if LAYOUT == 0:
        b = sample
        patch = within
    elif LAYOUT == 1:
        b = sample
        ids_offsets = sample.to(tl.int64) * stride_ids_sample + within.to(tl.int64) * stride_ids_row
        index = tl.load(ids_ptr + ids_offsets, mask=row_ok, other=0).to(tl.int64)
        row_ok = row_ok & (index >= 0) & (index < num_patches)
        patch = tl.where(row_ok, index, 0).to(tl.int32)
    else:
        index = tl.load(ids_ptr + within.to(tl.int64) * stride_ids_row, mask=row_ok, other=0).to(tl.int64)
        row_ok = row_ok & (index >= 0) & (index < batch * num_patches)
        flat = tl.where(row_ok, index, 0).to(tl.int32)
        b = flat // num_patches
        patch = flat - b * num_patches

    if HAS_WEIGHT:
        weight_offsets = b.to(tl.int64) * stride_weight_b + patch.to(tl.int64) * stride_weight_l
        weight = tl.load(weight_ptr + weight_offsets, mask=row_ok, other=0).to(tl.float32)
    else:
        weight = tl.where(row_ok, 1.0, 0.0)
    active = row_ok & (weight != 0.0)

    # Column j of a patch row is (pi, qi, c) in the official nchpwq -> nhwpqc order; the
    # image offset splits into a per-row part (patch corner) and a per-column part.
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    pi = cols // (PATCH * CHANNELS)
    qi = (cols // CHANNELS) % PATCH
    ch = cols % CHANNELS
    patch_row = patch // grid_w
    top = (patch_row * PATCH).to(tl.int64)
    left = ((patch - patch_row * grid_w) * PATCH).to(tl.int64)
    img_row = b.to(tl.int64) * stride_img_b + top * stride_img_h + left * stride_img_w
    img_col = ch * stride_img_c + pi * stride_img_h + qi * stride_img_w

    tile_ok = active[:, None] & col_ok[None, :]
    target = tl.load(imgs_ptr + (img_row[:, None] + img_col[None, :]), mask=tile_ok, other=0.0).to(tl.float32)
    pred_row = sample.to(tl.int64) * stride_pred_sample + within.to(tl.int64) * stride_pred_row
    pred = tl.load(pred_ptr + (pred_row[:, None] + cols[None, :]), mask=tile_ok, other=0.0).to(tl.float32)

    if NORM_PIX:
        mean = tl.sum(target, axis=1) / N
        # Two-pass variance from registers: exact for constant patches, no cancellation.
        centred = tl.where(tile_ok, target - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / (N - 1)
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        target = centred * rstd[:, None]

    diff = tl.where(tile_ok, pred - target, 0.0)
    loss = tl.sum(diff * diff, axis=1) / N

    if SCALE_BY_WEIGHT_SUM:
        # The mean over masked patches divides by sum(mask), read on the device (no host
        # sync); an all-zero mask gives loss 0 and gradient 0 instead of 0 / 0.
        weight_sum = tl.load(weight_sum_ptr).to(tl.float32)
        scale = tl.where(weight_sum != 0.0, 1.0 / tl.where(weight_sum != 0.0, weight_sum, 1.0), 0.0)
    else:
        scale = row_scale
    coef = weight * scale
    tl.store(row_loss_ptr + rows, loss * coef, mask=rows < num_rows)

    if COMPUTE_GRAD:
        grad = diff * (coef * (2.0 / N))[:, None]
        grad_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        store_ok = (rows < num_rows)[:, None] & col_ok[None, :]
        tl.store(grad_ptr + grad_offsets, grad.to(grad_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _scale_grad_by_scalar_kernel(grad_ptr,  # (numel,) the saved gradient, scaled in place
                                 grad_output_ptr,  # () the incoming gradient of the scalar loss
                                 numel, BLOCK: tl.constexpr):
    scale = tl.load(grad_output_ptr).to(tl.float32)
    # grad_output is 1 for a plain loss.backward(): then there is nothing to do and the
    # saved gradient is returned as it is, at the cost of one scalar load per program.
    if scale != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < numel
        grad = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        tl.store(grad_ptr + offsets, (grad * scale).to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale_grad_by_row_kernel(grad_ptr,  # (num_rows, N) the saved gradient, scaled in place
                              grad_output_ptr,  # (num_rows,) strided: the incoming gradient of each row's loss
                              num_rows, stride_go,
                              N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    ok = row_ok[:, None] & (cols < N)[None, :]
    scale = tl.load(grad_output_ptr + rows * stride_go, mask=row_ok, other=0.0).to(tl.float32)
    offsets = rows[:, None] * N + cols[None, :]
    grad = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(grad_ptr + offsets, (grad * scale[:, None]).to(grad_ptr.dtype.element_ty), mask=ok)


def _row_blocks(num_rows: int, n: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n)
    block_r = max(1, min(triton.next_power_of_2(max(num_rows, 1)), _TILE_ELEMENTS // block_n))
    num_warps = 8 if block_r * block_n >= 4096 else 4
    return block_r, block_n, num_warps


def masked_patch_mse_forward(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    weight: torch.Tensor | None,
    ids: torch.Tensor | None,
    *,
    layout: int,
    patch_size: int,
    norm_pix_loss: bool,
    eps: float,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns ``(loss, grad_pred)``.

    Shapes (``N = patch_size**2 * C``, ``L = (H / p) * (W / p)``):
    ``imgs (B, C, H, W)`` any strides; ``pred`` ``(B, L, N)`` (``LAYOUT_FULL``), ``(B, K, N)``
    (``LAYOUT_SELECTED``) or ``(T, N)`` (``LAYOUT_PACKED``), last dimension contiguous, other
    strides free (e.g. ``decoder_out[:, 1:]``); ``weight (B, L)`` or ``None`` (all ones, only
    with ids); ``ids`` ``None``, ``(B, K)`` patch indices in ``[0, L)`` or ``(T,)`` flat
    indices ``b * L + l``. Inputs are trusted (the caller validated them) but for the values of
    ``ids``: a row whose id is out of range reads no patch and has weight 0 (loss 0, gradient
    0, left out of the weights' sum; without ``weight``, ``"mean"`` still divides by the number
    of rows). No access falls outside a tensor whatever ``ids`` holds. ``B * L`` and the
    number of rows must be below ``2**31`` (the kernel's row and patch indices are int32).

    ``loss``: float32, ``()`` for ``reduction`` ``"mean"`` (sum of ``weight * patch_loss``
    divided by the sum of the weights, 0 when that sum is 0) and ``"sum"``, else the rows'
    shape (``pred.shape[:-1]``) holding ``weight * patch_loss``. ``grad_pred``: the gradient
    of ``loss`` (summed, for ``"none"``) with respect to ``pred``, contiguous, dtype of
    ``pred``; an empty tensor when ``compute_grad`` is false.
    """
    batch, channels, height, width = imgs.shape
    p = patch_size
    grid_w = width // p
    num_patches = (height // p) * grid_w
    n = p * p * channels
    rows_shape = pred.shape[:-1]
    if max(batch * num_patches, rows_shape.numel()) >= 2**31:
        raise ValueError(f"masked_patch_mse_forward: B * L = {batch * num_patches} patches and the "
                         f"{rows_shape.numel()} rows of pred must both be below 2**31 (the kernel's int32 indices)")
    if layout == LAYOUT_PACKED:
        num_rows, rows_per_sample = pred.shape[0], max(pred.shape[0], 1)
        stride_pred_sample, stride_pred_row = 0, pred.stride(0)
        stride_ids_sample, stride_ids_row = 0, ids.stride(0)
    else:
        num_rows, rows_per_sample = pred.shape[0] * pred.shape[1], max(pred.shape[1], 1)
        stride_pred_sample, stride_pred_row = pred.stride(0), pred.stride(1)
        stride_ids_sample, stride_ids_row = (ids.stride(0), ids.stride(1)) if ids is not None else (0, 0)
    device = pred.device
    row_loss = torch.empty(rows_shape, dtype=torch.float32, device=device)
    grad = torch.empty(rows_shape + (n,), dtype=pred.dtype, device=device) if compute_grad \
        else torch.empty(0, dtype=pred.dtype, device=device)
    if num_rows == 0:
        if reduction == "none":
            return row_loss, grad
        return row_loss.new_zeros(()), grad

    scale_by_weight_sum = reduction == "mean" and weight is not None
    if scale_by_weight_sum:
        if ids is None:
            weight_sum = weight.sum(dtype=torch.float32)
        else:
            # The rows' weights as the kernel sees them: an out-of-range id weighs 0 (and is not
            # used to index, where a plain gather would read outside `weight`).
            index = ids.long()
            in_range = (index >= 0) & (index < (num_patches if layout == LAYOUT_SELECTED else batch * num_patches))
            index = index.where(in_range, 0)
            rows_weight = weight.gather(1, index) if layout == LAYOUT_SELECTED else weight.reshape(-1)[index]
            weight_sum = rows_weight.where(in_range, 0).sum(dtype=torch.float32)
        row_scale = 1.0
    else:
        weight_sum = row_loss  # unused by the kernel
        row_scale = 1.0 / num_rows if reduction == "mean" else 1.0
    weight_arg = weight if weight is not None else row_loss
    ids_arg = ids if ids is not None else row_loss
    stride_weight = (weight.stride(0), weight.stride(1)) if weight is not None else (0, 0)

    block_r, block_n, num_warps = _row_blocks(num_rows, n)
    grid = (triton.cdiv(num_rows, block_r),)
    _masked_patch_mse_fwd_kernel[grid](
        pred, imgs, weight_arg, ids_arg, weight_sum, row_loss, grad,
        num_rows, rows_per_sample, batch, num_patches, grid_w,
        stride_pred_sample, stride_pred_row,
        imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3),
        stride_weight[0], stride_weight[1],
        stride_ids_sample, stride_ids_row,
        float(eps), float(row_scale),
        PATCH=p, CHANNELS=channels,
        LAYOUT=layout, HAS_WEIGHT=weight is not None, NORM_PIX=norm_pix_loss,
        SCALE_BY_WEIGHT_SUM=scale_by_weight_sum, COMPUTE_GRAD=compute_grad,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps,
    )
    if reduction == "none":
        return row_loss, grad
    return row_loss.sum(), grad


def masked_patch_mse_scale_grad_(grad_pred: torch.Tensor, grad_output: torch.Tensor) -> None:
    """Multiply ``grad_pred`` (contiguous ``(..., N)``) in place by ``grad_output``.

    ``grad_output`` is a scalar (``"mean"``/``"sum"``: a no-op when it is 1, decided on the
    device) or has ``grad_pred.shape[:-1]`` (``"none"``: one factor per row).
    """
    rows_shape = grad_pred.shape[:-1]
    if grad_output.dim() != 0 and grad_output.shape != rows_shape:
        raise ValueError(f"masked_patch_mse_scale_grad_: grad_output must be a scalar or have grad_pred's row "
                         f"shape {tuple(rows_shape)}, got {tuple(grad_output.shape)}")
    if not grad_pred.is_contiguous():
        raise ValueError("masked_patch_mse_scale_grad_: grad_pred must be contiguous (the kernels index it densely)")
    if grad_pred.numel() == 0:
        return
    if grad_output.dim() == 0:
        block = 4096
        _scale_grad_by_scalar_kernel[(triton.cdiv(grad_pred.numel(), block),)](
            grad_pred, grad_output, grad_pred.numel(), BLOCK=block, num_warps=8)
        return
    n = grad_pred.shape[-1]
    grad_output = grad_output.reshape(-1)
    num_rows = grad_output.shape[0]
    block_r, block_n, num_warps = _row_blocks(num_rows, n)
    _scale_grad_by_row_kernel[(triton.cdiv(num_rows, block_r),)](
        grad_pred, grad_output, num_rows, grad_output.stride(0),
        N=n, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps)
