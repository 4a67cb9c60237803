"""Triton kernels of the gather ops: gather of the visible tokens, the decoder's un-shuffle.

This module imports only ``torch`` and ``triton`` so another codebase can copy it whole. The
launchers (``*_forward`` / ``*_backward``) take tensors already validated and shaped by
``fastmim.ops.gather`` (which also holds the plain-PyTorch references that define each
result); they allocate outputs and launch. Layout conventions shared by all launchers:

- ``pos_embed`` is 2-D ``(P, D)`` contiguous with ``P = L`` (patch rows only) or ``P = L + 1``
  (``pos_offset = 1``: row 0 is the cls slot, rows ``1..L`` the patches).
- ``cls_token`` / ``mask_token`` are 1-D ``(D,)`` contiguous.
- Index tensors (``ids_keep``, ``ids_restore``) are contiguous int32 or int64; the kernels
  load either. ``cu_seqlens`` (varlen) is contiguous int32 or int64, ``(B + 1,)``.
- Index values are not checked here (``fastmim.ops`` checks them on the host; on a device that
  would need a host sync) and no value can make a kernel access memory outside its tensors:
  every access an index steers is masked with the real extent of the tensor. An ``ids_keep``
  entry outside ``[0, L)`` gathers a zero row, an ``ids_restore`` rank outside ``[0, L)`` gives
  a zero token (plus the position embedding), and their gradients are dropped. Inconsistent
  ``cu_seqlens`` or ``ids_restore`` rows that are not permutations give wrong values (a
  gradient row that no position maps to is left unwritten), never an out-of-bounds access.
- Big activations (``x``, ``x_visible``, ``grad_out``) are read with their strides (no copy);
  every output is freshly allocated and contiguous.
- Values are added in fp32 and rounded once to the output dtype; gradient reductions over the
  batch (``pos_embed``, ``mask_token``) accumulate in fp32 per program into a workspace that
  is then summed in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- block sizes


def _block_d(D: int) -> int:
    # The widest power-of-two block that divides D wastes no lanes (768 = 3 x 256, 1280 = 5 x 256);
    # other widths fall back to a masked block.
    for block in (256, 128, 64):
        if D % block == 0:
            return block
    return min(triton.next_power_of_2(D), 256)


def _block_rows(block_d: int, rows: int) -> int:
    # ~4K elements per program: 16 B-vector loads per thread at 4 warps.
    return max(1, min(triton.next_power_of_2(max(rows, 1)), 4096 // block_d))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_chunks(batch: int, tiles: int, device: torch.device) -> int:
    """How many batch chunks a reduction over b is split into (each writes one fp32 partial).

    More chunks give more programs; each chunk costs one fp32 partial of the reduced tensor in
    memory traffic, so they are capped at B / 32 (a few % of the main traffic at bf16).
    """
    target = 4 * _sm_count(device.index or 0) if device.type == "cuda" else 1
    want = triton.cdiv(target, max(tiles, 1))
    return max(1, min(batch, want, batch // 32))


# ----------------------------------------------------------------------------- gather_visible


@triton.jit
def _gather_visible_fwd_kernel(
    x_ptr, ids_ptr, pos_ptr, cls_ptr, cu_ptr, out_ptr,
    B, L, K, T, D, tiles_per_sample,
    stride_xb, stride_xl, stride_xd,
    HAS_POS: tl.constexpr, POS_OFFSET: tl.constexpr, HAS_CLS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row block, D block) of the output: out row = [cls] or x[b, ids_keep[b, k]] (+ pos)."""
    pid = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = d < D
    if VARLEN:
        # Output rows of sample b: [cu[b] + b*HAS_CLS, cu[b+1] + (b+1)*HAS_CLS).
        b_scalar = pid // tiles_per_sample
        t = (pid % tiles_per_sample) * BLOCK_T + tl.arange(0, BLOCK_T)
        start = tl.load(cu_ptr + b_scalar).to(tl.int64)
        count = tl.load(cu_ptr + b_scalar + 1).to(tl.int64) - start
        b = tl.zeros([BLOCK_T], dtype=tl.int64) + b_scalar
        out_row = start + b * HAS_CLS + t
        row_valid = (t < count + HAS_CLS) & (out_row >= 0) & (out_row < T + B * HAS_CLS)
    else:
        rows_per_sample = K + HAS_CLS
        out_row = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        b = out_row // rows_per_sample
        t = out_row - b * rows_per_sample
        row_valid = out_row < B * rows_per_sample
        start = b * K
    k = t - HAS_CLS
    is_patch = row_valid & (k >= 0)
    if VARLEN:
        is_patch = is_patch & (start + k >= 0) & (start + k < T)
    idx = tl.load(ids_ptr + start + k, mask=is_patch, other=0).to(tl.int64)
    # An out-of-range index reads nothing: a zero row.
    take = is_patch & (idx >= 0) & (idx < L)
    m = take[:, None] & d_valid[None, :]
    acc = tl.load(x_ptr + b[:, None] * stride_xb + idx[:, None] * stride_xl + d[None, :] * stride_xd,
                  mask=m, other=0.0).to(tl.float32)
    if HAS_POS:
        acc += tl.load(pos_ptr + (idx[:, None] + POS_OFFSET) * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_CLS:
        cm = (row_valid & (t == 0))[:, None] & d_valid[None, :]
        cls_val = tl.load(cls_ptr + d[None, :] + 0 * t[:, None], mask=cm, other=0.0).to(tl.float32)
        if HAS_POS and POS_OFFSET == 1:
            cls_val += tl.load(pos_ptr + d[None, :] + 0 * t[:, None], mask=cm, other=0.0).to(tl.float32)
        acc += cls_val
    tl.store(out_ptr + out_row[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & d_valid[None, :])


def gather_visible_forward(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None,
                           cls_token: torch.Tensor | None, cu_seqlens: torch.Tensor | None, max_seqlen: int,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """``x (B, L, D)`` any strides; dense ``ids_keep (B, K)`` -> ``(B, K + has_cls, D)``; varlen packed
    ``ids_keep (T,)`` + ``cu_seqlens (B + 1,)`` -> ``(T + B * has_cls, D)``."""
    B, L, D = x.shape
    has_cls = cls_token is not None
    varlen = cu_seqlens is not None
    if varlen:
        K = 0
        out = torch.empty((ids_keep.shape[0] + B * has_cls, D), dtype=out_dtype, device=x.device)
        rows = max_seqlen + has_cls
    else:
        K = ids_keep.shape[1]
        out = torch.empty((B, K + has_cls, D), dtype=out_dtype, device=x.device)
        rows = B * (K + has_cls)
    if out.numel() == 0:
        return out
    block_d = _block_d(D)
    block_t = _block_rows(block_d, rows)
    tiles_per_sample = triton.cdiv(rows, block_t)
    grid = (B * tiles_per_sample if varlen else tiles_per_sample, triton.cdiv(D, block_d))
    pos_offset = 0 if pos_embed is None else pos_embed.shape[0] - L
    _gather_visible_fwd_kernel[grid](
        x, ids_keep, pos_embed if pos_embed is not None else x, cls_token if has_cls else x,
        cu_seqlens if varlen else ids_keep, out,
        B, L, K, ids_keep.shape[0], D, tiles_per_sample,
        x.stride(0), x.stride(1), x.stride(2),
        HAS_POS=pos_embed is not None, POS_OFFSET=pos_offset, HAS_CLS=int(has_cls), VARLEN=varlen,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return out


@triton.jit
def _last_match_below(ids_ptr, start, count, T, patch, below, VARLEN: tl.constexpr, BLOCK_K: tl.constexpr):
    """For each patch: the largest k < below with ids_keep[start + k] == patch (-1 if none), and how
    many such k there are. Compares against the whole ids_keep row: no inverse map to build."""
    found = tl.full(patch.shape, -1, dtype=tl.int64)
    hits = tl.zeros(patch.shape, dtype=tl.int32)
    for k0 in range(0, count, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_valid = kk < count
        if VARLEN:
            k_valid = k_valid & (start + kk >= 0) & (start + kk < T)
        ids = tl.load(ids_ptr + start + kk, mask=k_valid, other=-1).to(tl.int64)
        hit = (ids[None, :] == patch[:, None]) & (kk[None, :] < below[:, None])
        found = tl.maximum(found, tl.max(tl.where(hit, kk[None, :].to(tl.int64), -1), axis=1))
        hits += tl.sum(hit.to(tl.int32), axis=1)
    return found, hits


@triton.jit
def _gather_visible_bwd_kernel(
    grad_ptr, ids_ptr, cu_ptr, grad_x_ptr, pos_part_ptr,
    B, L, K, T, D, b_per_chunk,
    stride_gb, stride_gt, stride_gd,
    HAS_CLS: tl.constexpr, VARLEN: tl.constexpr, WRITE_X: tl.constexpr, WRITE_POS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (patch block, D block, batch chunk): for each b, sum the gradient rows k with
    ids_keep[b, k] == patch into grad_x[b, patch] (zero where patch was removed), and accumulate
    the pos_embed gradient over b in fp32. A repeated index gets the sum of its rows, as the
    reference's scatter_add; the common case (no repeats) costs one scan of the ids_keep row."""
    patch = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2)
    patch_valid = patch < L
    d_valid = d < D
    pos_acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    b_begin = chunk * b_per_chunk
    b_end = tl.minimum(b_begin + b_per_chunk, B)
    for b in range(b_begin, b_end):
        b64 = tl.cast(b, tl.int64)
        if VARLEN:
            start = tl.load(cu_ptr + b64).to(tl.int64)
            count = tl.load(cu_ptr + b64 + 1).to(tl.int64) - start
            row_base = start + b64 * HAS_CLS
            g_base = 0
        else:
            start = b64 * K
            count = K
            row_base = 0
            g_base = b64 * stride_gb
        found, hits = _last_match_below(ids_ptr, start, count, T, patch, tl.zeros([BLOCK_P], dtype=tl.int64) + count,
                                        VARLEN, BLOCK_K)
        has = patch_valid & (found >= 0)
        g = tl.load(grad_ptr + g_base + (row_base + HAS_CLS + found)[:, None] * stride_gt + d[None, :] * stride_gd,
                    mask=has[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
        # Repeated indices: walk down to the next-lower match once per extra hit.
        for _ in range(1, tl.max(tl.where(patch_valid, hits, 0), axis=0)):
            found, _hits_below = _last_match_below(ids_ptr, start, count, T, patch, found, VARLEN, BLOCK_K)
            has = patch_valid & (found >= 0)
            g += tl.load(grad_ptr + g_base + (row_base + HAS_CLS + found)[:, None] * stride_gt
                         + d[None, :] * stride_gd, mask=has[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
        if WRITE_X:
            tl.store(grad_x_ptr + (b64 * L + patch[:, None]) * D + d[None, :], g.to(grad_x_ptr.dtype.element_ty),
                     mask=patch_valid[:, None] & d_valid[None, :])
        if WRITE_POS:
            pos_acc += g
    if WRITE_POS:
        tl.store(pos_part_ptr + (chunk.to(tl.int64) * L + patch[:, None]) * D + d[None, :], pos_acc,
                 mask=patch_valid[:, None] & d_valid[None, :])


def gather_visible_backward(grad_out: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor | None,
                            max_seqlen: int, batch: int, num_patches: int, has_cls: bool,
                            grad_x_dtype: torch.dtype | None, need_pos: bool):
    """Returns ``(grad_x (B, L, D) or None, grad_pos_patches (L, D) float32 or None)``.

    ``grad_out``: dense ``(B, K + has_cls, D)`` or varlen packed ``(T + B * has_cls, D)``, any strides.
    The cls row's gradient (``grad_out[:, 0]``) is not handled here (a tiny sum the caller does).
    """
    B, L = batch, num_patches
    D = grad_out.shape[-1]
    varlen = cu_seqlens is not None
    device = grad_out.device
    write_x = grad_x_dtype is not None
    grad_x = torch.empty((B, L, D), dtype=grad_x_dtype, device=device) if write_x else None
    if (not write_x and not need_pos) or B * L * D == 0:
        return grad_x, (torch.zeros((L, D), dtype=torch.float32, device=device) if need_pos else None)
    block_d = _block_d(D)
    block_l = _block_rows(block_d, L)
    k_max = max_seqlen if varlen else ids_keep.shape[1]
    block_k = min(triton.next_power_of_2(max(k_max, 1)), 128)
    tiles = triton.cdiv(L, block_l) * triton.cdiv(D, block_d)
    chunks = _num_chunks(B, tiles, device) if need_pos else B
    b_per_chunk = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, b_per_chunk)
    pos_part = torch.empty((chunks, L, D), dtype=torch.float32, device=device) if need_pos else None
    if varlen:
        strides = (0, grad_out.stride(0), grad_out.stride(1))
    else:
        strides = (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    grid = (triton.cdiv(L, block_l), triton.cdiv(D, block_d), chunks)
    _gather_visible_bwd_kernel[grid](
        grad_out, ids_keep, cu_seqlens if varlen else ids_keep,
        grad_x if write_x else grad_out, pos_part if need_pos else grad_out,
        B, L, 0 if varlen else ids_keep.shape[1], ids_keep.shape[0], D, b_per_chunk,
        *strides,
        HAS_CLS=int(has_cls), VARLEN=varlen, WRITE_X=write_x, WRITE_POS=need_pos,
        BLOCK_P=block_l, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    grad_pos = pos_part.sum(0) if need_pos else None
    return grad_x, grad_pos


# ----------------------------------------------------------------------------- unshuffle


@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr, ids_restore_ptr, mask_token_ptr, pos_ptr, cu_ptr, out_ptr,
    B, L, K, X_ROWS, D,
    stride_xb, stride_xt, stride_xd,
    HAS_POS: tl.constexpr, POS_OFFSET: tl.constexpr, HAS_CLS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row block of the (B, L + has_cls) output, D block): each row takes the visible token
    of rank ids_restore[b, i] when that rank is < K, else mask_token; then + pos_embed[row]."""
    pid = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = d < D
    rows_per_sample = L + HAS_CLS
    r = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_valid = r < B * rows_per_sample
    b = r // rows_per_sample
    t = r - b * rows_per_sample
    i = t - HAS_CLS
    is_patch = row_valid & (i >= 0)
    is_cls = row_valid & (t == 0) & (HAS_CLS == 1)
    rank = tl.load(ids_restore_ptr + b * L + i, mask=is_patch, other=-1).to(tl.int64)
    if VARLEN:
        start = tl.load(cu_ptr + b, mask=row_valid, other=0).to(tl.int64)
        count = tl.load(cu_ptr + b + 1, mask=row_valid, other=0).to(tl.int64) - start
        x_row = start + b * HAS_CLS + tl.where(is_cls, 0, HAS_CLS + rank)
        x_off = x_row * stride_xt
    else:
        count = K
        x_off = b * stride_xb + tl.where(is_cls, 0, HAS_CLS + rank) * stride_xt
    visible = is_patch & (rank >= 0) & (rank < count)
    masked = is_patch & (rank >= count) & (rank < L)  # an out-of-range rank is neither: a zero token
    take_x = visible | is_cls
    if VARLEN:
        take_x = take_x & (x_row >= 0) & (x_row < X_ROWS)
    xv = tl.load(x_ptr + x_off[:, None] + d[None, :] * stride_xd, mask=take_x[:, None] & d_valid[None, :],
                 other=0.0).to(tl.float32)
    mask_tok = tl.load(mask_token_ptr + d, mask=d_valid, other=0.0).to(tl.float32)
    acc = tl.where(masked[:, None], mask_tok[None, :], xv)
    if HAS_POS:
        if POS_OFFSET == 1:
            pos_row = i + 1  # the cls row (i = -1) reads the cls slot 0
            pos_m = row_valid
        else:
            pos_row = i
            pos_m = is_patch
        acc += tl.load(pos_ptr + pos_row[:, None] * D + d[None, :], mask=pos_m[:, None] & d_valid[None, :],
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + r[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & d_valid[None, :])


def unshuffle_forward(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                      pos_embed: torch.Tensor | None, cu_seqlens: torch.Tensor | None, has_cls: bool,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """``x_visible``: dense ``(B, K + has_cls, D)`` or varlen packed ``(T + B * has_cls, D)``, any strides;
    ``ids_restore (B, L)`` -> ``(B, L + has_cls, D)``."""
    B, L = ids_restore.shape
    D = x_visible.shape[-1]
    varlen = cu_seqlens is not None
    out = torch.empty((B, L + has_cls, D), dtype=out_dtype, device=x_visible.device)
    if out.numel() == 0:
        return out
    block_d = _block_d(D)
    rows = B * (L + has_cls)
    block_t = _block_rows(block_d, rows)
    if varlen:
        K, strides = 0, (0, x_visible.stride(0), x_visible.stride(1))
    else:
        K, strides = x_visible.shape[1] - has_cls, (x_visible.stride(0), x_visible.stride(1), x_visible.stride(2))
    grid = (triton.cdiv(rows, block_t), triton.cdiv(D, block_d))
    _unshuffle_fwd_kernel[grid](
        x_visible, ids_restore, mask_token, pos_embed if pos_embed is not None else mask_token,
        cu_seqlens if varlen else ids_restore, out,
        B, L, K, x_visible.shape[0], D, *strides,
        HAS_POS=pos_embed is not None, POS_OFFSET=0 if pos_embed is None else pos_embed.shape[0] - L,
        HAS_CLS=int(has_cls), VARLEN=varlen, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return out


@triton.jit
def _unshuffle_bwd_kernel(
    grad_ptr, ids_restore_ptr, cu_ptr, grad_x_ptr, pos_part_ptr, mask_part_ptr,
    B, L, K, X_ROWS, D, b_per_chunk,
    stride_gb, stride_gt, stride_gd,
    HAS_CLS: tl.constexpr, VARLEN: tl.constexpr,
    WRITE_X: tl.constexpr, WRITE_POS: tl.constexpr, WRITE_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row block t of the output, D block, batch chunk): for each b, route grad_out[b, t] to
    grad_x_visible[b, rank] (a permutation: each visible row written exactly once) or into the
    mask_token sum, and accumulate the pos_embed gradient over b, all in fp32."""
    pid_t = tl.program_id(0)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.program_id(2)
    t_valid = t < L + HAS_CLS
    d_valid = d < D
    i = t - HAS_CLS
    is_patch = t_valid & (i >= 0)
    is_cls = t_valid & (t == 0) & (HAS_CLS == 1)
    pos_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    mask_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_begin = chunk * b_per_chunk
    b_end = tl.minimum(b_begin + b_per_chunk, B)
    for b in range(b_begin, b_end):
        b64 = tl.cast(b, tl.int64)
        g = tl.load(grad_ptr + b64 * stride_gb + t[:, None] * stride_gt + d[None, :] * stride_gd,
                    mask=t_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
        rank = tl.load(ids_restore_ptr + b64 * L + i, mask=is_patch, other=-1).to(tl.int64)
        if VARLEN:
            start = tl.load(cu_ptr + b64).to(tl.int64)
            count = tl.load(cu_ptr + b64 + 1).to(tl.int64) - start
            x_base = start + b64 * HAS_CLS
        else:
            count = K
            x_base = b64 * (K + HAS_CLS)
        visible = is_patch & (rank >= 0) & (rank < count)
        if WRITE_X:
            x_row = x_base + tl.where(is_cls, 0, HAS_CLS + rank)
            write = visible | is_cls
            if VARLEN:
                write = write & (x_row >= 0) & (x_row < X_ROWS)
            tl.store(grad_x_ptr + x_row[:, None] * D + d[None, :], g.to(grad_x_ptr.dtype.element_ty),
                     mask=write[:, None] & d_valid[None, :])
        if WRITE_MASK:  # the masked positions; an out-of-range rank's gradient is dropped
            masked = is_patch & (rank >= count) & (rank < L)
            mask_acc += tl.sum(tl.where(masked[:, None], g, 0.0), axis=0)
        if WRITE_POS:
            pos_acc += g
    if WRITE_POS:
        tl.store(pos_part_ptr + (chunk.to(tl.int64) * (L + HAS_CLS) + t[:, None]) * D + d[None, :], pos_acc,
                 mask=t_valid[:, None] & d_valid[None, :])
    if WRITE_MASK:
        tl.store(mask_part_ptr + (chunk.to(tl.int64) * tl.num_programs(0) + pid_t) * D + d, mask_acc, mask=d_valid)


def unshuffle_backward(grad_out: torch.Tensor, ids_restore: torch.Tensor, cu_seqlens: torch.Tensor | None,
                       visible_rows: int, has_cls: bool, grad_x_dtype: torch.dtype | None,
                       need_mask: bool, need_pos: bool):
    """``grad_out (B, L + has_cls, D)`` any strides. Returns ``(grad_x_visible or None, grad_mask_token
    (D,) float32 or None, grad_pos (L + has_cls, D) float32 or None)``; ``grad_x_visible`` has
    ``visible_rows`` rows per sample (dense ``(B, visible_rows, D)``) or is packed ``(visible_rows, D)``.

    Rows of ``ids_restore`` must be permutations of ``0..L-1`` (as ``random_masking`` returns): each
    visible row of ``grad_x_visible`` is then written exactly once.
    """
    B, L = ids_restore.shape
    D = grad_out.shape[-1]
    device = grad_out.device
    varlen = cu_seqlens is not None
    write_x = grad_x_dtype is not None
    shape_x = (visible_rows, D) if varlen else (B, visible_rows, D)
    grad_x = torch.empty(shape_x, dtype=grad_x_dtype, device=device) if write_x else None
    rows = L + has_cls
    if (not (write_x or need_mask or need_pos)) or B * rows * D == 0:
        zeros_mask = torch.zeros(D, dtype=torch.float32, device=device) if need_mask else None
        zeros_pos = torch.zeros((rows, D), dtype=torch.float32, device=device) if need_pos else None
        return grad_x, zeros_mask, zeros_pos
    block_d = _block_d(D)
    block_t = _block_rows(block_d, rows)
    n_t = triton.cdiv(rows, block_t)
    tiles = n_t * triton.cdiv(D, block_d)
    chunks = _num_chunks(B, tiles, device) if (need_pos or need_mask) else B
    b_per_chunk = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, b_per_chunk)
    pos_part = torch.empty((chunks, rows, D), dtype=torch.float32, device=device) if need_pos else None
    mask_part = torch.empty((chunks * n_t, D), dtype=torch.float32, device=device) if need_mask else None
    grid = (n_t, triton.cdiv(D, block_d), chunks)
    _unshuffle_bwd_kernel[grid](
        grad_out, ids_restore, cu_seqlens if varlen else ids_restore,
        grad_x if write_x else grad_out, pos_part if need_pos else grad_out, mask_part if need_mask else grad_out,
        B, L, 0 if varlen else visible_rows - has_cls, visible_rows, D, b_per_chunk,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        HAS_CLS=int(has_cls), VARLEN=varlen, WRITE_X=write_x, WRITE_POS=need_pos, WRITE_MASK=need_mask,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return grad_x, (mask_part.sum(0) if need_mask else None), (pos_part.sum(0) if need_pos else None)
