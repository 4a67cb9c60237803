"""Triton kernel of :func:`fastmim.ops.resized_crop_flip_normalize`: crop, antialiased bicubic
resize, horizontal flip and normalisation of ``uint8`` images in one pass.

This module imports only ``torch`` and ``triton`` so another codebase can copy it whole. The
launcher takes arguments already validated by ``fastmim.ops.resized_crop`` (which holds the
plain-PyTorch reference that defines the result) and launches.

The resampling is PyTorch's ``interpolate(mode="bicubic", antialias=True)`` (Pillow's): along
each axis output index ``i`` of a crop of ``n`` pixels resized to ``m`` has ``scale = n / m``,
``center = scale * (i + 0.5)``, ``support = 2 * max(scale, 1)``, taps ``j`` in
``[max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n))`` with weights
``cubic((j - center + 0.5) / max(scale, 1))`` (Keys, ``a = -0.5``) normalised to sum 1.

One program computes a ``BLOCK_Y x BLOCK_X`` tile of one channel of one output image: it walks
the crop rows the tile's vertical taps cover, resamples each horizontally for the tile's columns
(a ``[BLOCK_X, TAPS]`` gather; when every column's taps fit one block, as up to a 3.5x downscale,
their weights and offsets are computed once per program, else per row and block), clamps the
resampled row to ``[0, 255]`` as the two-pass ``uint8`` resamplers of Pillow and torchvision do
between their passes, and accumulates it into every output row of the tile with its vertical
weight (zero outside a row's taps). Flipping reads the mirrored column's weights. Accumulation in
fp32, clamped to ``[0, 255]``, then ``(x / 255 - mean) / std`` rounded once to the output dtype.

Out-of-range boxes (values on an accelerator are not checked unless asked) are clamped into their
image, and every read is masked with the extent of the ``uint8`` buffer: wrong pixels, never an
access outside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_Y = 16
BLOCK_X = 32
# Taps per block: every column's taps fit one block up to a downscale of 3.5 (int(4 * scale) + 2 <= 16).
TAPS = 16


@triton.jit
def _cubic(x):
    # Keys' cubic convolution kernel with a = -0.5 (Pillow's and PyTorch's antialiased bicubic).
    x = tl.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _axis(o, crop, out_size):
    """Filter geometry of output indices ``o`` along an axis cropped to ``crop`` pixels:
    ``(center, first tap, tap count, 1 / filter scale, support)``."""
    scale = crop.to(tl.float32) / out_size
    support = tl.where(scale >= 1.0, 2.0 * scale, 2.0)
    inv = tl.where(scale >= 1.0, 1.0 / scale, 1.0)
    center = scale * (o.to(tl.float32) + 0.5)
    first = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    count = tl.minimum((center + support + 0.5).to(tl.int32), crop) - first
    return center, first, count, inv, support


@triton.jit
def _taps(first, count, center, inv, j0, TAPS: tl.constexpr):
    """Taps ``j0 .. j0 + TAPS - 1`` of each output index: ``(positions, weights, in range)``, each
    ``[len(first), TAPS]``; weights of taps past an index's count are 0 (not yet normalised)."""
    j = j0 + tl.arange(0, TAPS)
    pos = first[:, None] + j[None, :]
    ok = j[None, :] < count[:, None]
    w = _cubic((pos - center[:, None] + 0.5) * inv)
    return pos, tl.where(ok, w, 0.0), ok


@triton.jit
def _normaliser(first, count, center, inv, support, TAPS: tl.constexpr):
    """``(taps, norm)`` of an axis: how many taps the widest output index has (a bound from the
    support), and per output index ``1 / (sum of its weights)``, 0 where they sum to 0."""
    taps = (2.0 * support).to(tl.int32) + 2
    total = tl.zeros_like(center)
    for j0 in range(0, taps, TAPS):
        _, w, _ = _taps(first, count, center, inv, j0, TAPS)
        total += tl.sum(w, axis=1)
    return taps, tl.where(total != 0.0, 1.0 / tl.where(total != 0.0, total, 1.0), 0.0)


@triton.jit
def _row_weight(r, first, count, center, inv, norm):
    """Normalised weight of crop row ``r`` for each output row (0 outside its taps)."""
    w = _cubic((r - center + 0.5) * inv) * norm
    return tl.where((r >= first) & (r < first + count), w, 0.0)


@triton.jit
def _resized_crop_kernel(
    src_ptr,     # uint8 pixels: image b starts layout[b, 0] elements after this pointer (extent elements)
    layout_ptr,  # (B, 6) int64: offset, height, width, stride_c, stride_h, stride_w
    boxes_ptr,   # (B, 4) int32/int64: top, left, height, width
    flip_ptr,    # (B,) uint8, 1 = mirror (read only when HAS_FLIP)
    mean_ptr,    # (C,) fp32
    std_ptr,     # (C,) fp32
    out_ptr,     # (B, C, OH, OW) contiguous fp32/bf16/fp16
    C, OH, OW, extent,
    HAS_FLIP: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, TAPS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // C).to(tl.int64)
    c = pid % C
    lay = layout_ptr + b * 6
    base = tl.load(lay)
    H = tl.load(lay + 1).to(tl.int32)
    W = tl.load(lay + 2).to(tl.int32)
    sc = tl.load(lay + 3)
    sh = tl.load(lay + 4)
    sw = tl.load(lay + 5)
    box = boxes_ptr + b * 4
    # Clamped into the image: an unchecked bad box reads wrong pixels of its own image, nothing else.
    top = tl.minimum(tl.maximum(tl.load(box).to(tl.int32), 0), H - 1)
    left = tl.minimum(tl.maximum(tl.load(box + 1).to(tl.int32), 0), W - 1)
    crop_h = tl.minimum(tl.maximum(tl.load(box + 2).to(tl.int32), 1), H - top)
    crop_w = tl.minimum(tl.maximum(tl.load(box + 3).to(tl.int32), 1), W - left)

    xo = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)
    x_valid = xo < OW
    xs = xo
    if HAS_FLIP:
        flipped = tl.load(flip_ptr + b) != 0
        xs = tl.where(flipped, OW - 1 - xo, xo)
    cx, x_first, x_count, inv_x, support_x = _axis(xs, crop_w, OW)
    taps_x, norm_x = _normaliser(x_first, x_count, cx, inv_x, support_x, TAPS)

    y0 = tl.program_id(1) * BLOCK_Y
    yo = y0 + tl.arange(0, BLOCK_Y)
    cy, y_first, y_count, inv_y, support_y = _axis(yo, crop_h, OH)
    taps_y, norm_y = _normaliser(y_first, y_count, cy, inv_y, support_y, TAPS)
    # Crop rows the tile reads: from the first tap of its first row to the last tap of its last.
    y_last = tl.minimum(y0 + BLOCK_Y, OH) - 1
    scale_y = crop_h.to(tl.float32) / OH
    r_lo = tl.maximum((scale_y * (y0 + 0.5) - support_y + 0.5).to(tl.int32), 0)
    r_hi = tl.minimum((scale_y * (y_last + 0.5) + support_y + 0.5).to(tl.int32), crop_h)

    # Offsets of the taps are clamped into the buffer instead of masked: a tap out of a column's
    # range has weight 0, and an unchecked bad layout reads wrong pixels, never outside the buffer.
    row0 = base + c.to(tl.int64) * sc + top.to(tl.int64) * sh
    last = extent - 1
    acc = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
    if (taps_x <= TAPS) & (taps_y <= TAPS):
        # Every column's and every row's taps fit one block (up to a 3.5x downscale): the weights
        # and the column offsets are computed once; a row's vertical weights are picked from a table.
        cols, wx, _ = _taps(x_first, x_count, cx, inv_x, 0, TAPS)
        wx = wx * norm_x[:, None]
        col_offs = row0 + (left + cols).to(tl.int64) * sw
        _, wy_table, _ = _taps(y_first, y_count, cy, inv_y, 0, TAPS)
        wy_table = wy_table * norm_y[:, None]
        k = tl.arange(0, TAPS)[None, :]
        for r in range(r_lo, r_hi):
            offs = tl.minimum(tl.maximum(col_offs + r * sh, 0), last)
            v = tl.load(src_ptr + offs).to(tl.float32)
            h = tl.minimum(tl.maximum(tl.sum(wx * v, axis=1), 0.0), 255.0)
            wy = tl.sum(tl.where(k == (r - y_first)[:, None], wy_table, 0.0), axis=1)
            acc += wy[:, None] * h[None, :]
    else:
        for r in range(r_lo, r_hi):
            row = row0 + r * sh
            h = tl.zeros([BLOCK_X], dtype=tl.float32)
            for j0 in range(0, taps_x, TAPS):
                cols, wx, _ = _taps(x_first, x_count, cx, inv_x, j0, TAPS)
                offs = tl.minimum(tl.maximum(row + (left + cols).to(tl.int64) * sw, 0), last)
                v = tl.load(src_ptr + offs).to(tl.float32)
                h += tl.sum(wx * v, axis=1)
            h = tl.minimum(tl.maximum(h * norm_x, 0.0), 255.0)
            acc += _row_weight(r, y_first, y_count, cy, inv_y, norm_y)[:, None] * h[None, :]

    acc = tl.minimum(tl.maximum(acc, 0.0), 255.0)
    mean = tl.load(mean_ptr + c)
    std = tl.load(std_ptr + c)
    out = (acc / 255.0 - mean) / std
    o_ptrs = out_ptr + ((b * C + c) * OH + yo[:, None]).to(tl.int64) * OW + xo[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(yo < OH)[:, None] & x_valid[None, :])


def resized_crop_flip_normalize_forward(images: torch.Tensor, layout: torch.Tensor, boxes: torch.Tensor,
                                        flip: torch.Tensor | None, channels: int, out_h: int, out_w: int,
                                        mean: torch.Tensor, std: torch.Tensor, extent: int,
                                        dtype: torch.dtype) -> torch.Tensor:
    """Launch the kernel: ``images`` any uint8 tensor (its first element is offset 0 of ``layout``),
    ``layout (B, 6)`` int64, ``boxes (B, 4)`` int32/int64 contiguous, ``flip (B,)`` bool or None,
    ``mean``/``std (C,)`` fp32; returns ``(B, C, out_h, out_w)`` of ``dtype``."""
    B = layout.shape[0]
    out = torch.empty((B, channels, out_h, out_w), dtype=dtype, device=images.device)
    if B == 0:
        return out
    flip_arg = flip.contiguous().view(torch.uint8) if flip is not None else layout
    grid = (B * channels, triton.cdiv(out_h, BLOCK_Y), triton.cdiv(out_w, BLOCK_X))
    _resized_crop_kernel[grid](
        images, layout.contiguous(), boxes.contiguous(), flip_arg, mean.contiguous(), std.contiguous(), out,
        channels, out_h, out_w, extent,
        HAS_FLIP=flip is not None, BLOCK_Y=BLOCK_Y, BLOCK_X=BLOCK_X, TAPS=TAPS, num_warps=4,
    )
    return out
