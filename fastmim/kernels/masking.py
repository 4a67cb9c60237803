"""Triton kernel of the masking ops: the counter-based RNG's noise, each patch's rank and the mask.

This module imports only ``torch`` and ``triton`` so another codebase can copy it whole. The
launcher takes tensors already validated by ``fastmim.ops.masking`` (which holds the
plain-PyTorch references that define each result and the RNG's specification); it allocates
the outputs and launches. The RNG constants are those of ``fastmim.ops.masking`` (every backend
must produce the same bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- RNG + ranking

_M32: tl.constexpr = tl.constexpr(0xFFFFFFFF)
# lowbias32's multipliers; the salt of the seed's high word; the odd stride that spreads the
# patch counter (see fastmim.ops.masking, which names and explains each).
_MIX_MULTIPLIER_1: tl.constexpr = tl.constexpr(0x7FEB352D)
_MIX_MULTIPLIER_2: tl.constexpr = tl.constexpr(0x2C1B3C6D)
_SEED_HIGH_SALT: tl.constexpr = tl.constexpr(0x1B873593)
_PATCH_STRIDE: tl.constexpr = tl.constexpr(0x2545F491)


@triton.jit
def _mix32(x):
    # 32-bit avalanche (a "lowbias32"-style finaliser); uint32 multiplies wrap mod 2**32.
    x ^= x >> 16
    x *= _MIX_MULTIPLIER_1
    x ^= x >> 15
    x *= _MIX_MULTIPLIER_2
    x ^= x >> 16
    return x


@triton.jit
def _row_noise(row_key, i):
    return _mix32(row_key ^ (i.to(tl.uint32) * _PATCH_STRIDE))


@triton.jit
def _random_masking_kernel(
    seed_ptr, offset_ptr, cu_ptr, ids_keep_ptr, ids_restore_ptr, mask_ptr,
    L, K, T,
    VARLEN: tl.constexpr, WRITE_MASK: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Program (b, i-block): noise of patches i, their rank among all L patches of row b, and the
    writes that follow from the rank (ids_restore, mask, ids_keep[rank] = i)."""
    b = tl.program_id(0)
    pid_i = tl.program_id(1)
    seed = tl.load(seed_ptr).to(tl.int64)
    seed_key = _mix32((seed & _M32).to(tl.uint32)) ^ _mix32(((seed >> 32) & _M32).to(tl.uint32) ^ _SEED_HIGH_SALT)
    # The sample counter is offset + b mod 2**32: an int64 sum wraps mod 2**64, which keeps the low 32 bits.
    counter = tl.load(offset_ptr).to(tl.int64) + b.to(tl.int64)
    row_key = _mix32(seed_key ^ _mix32((counter & _M32).to(tl.uint32)))

    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_valid = i < L
    noise_i = _row_noise(row_key, i)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    # rank[i] = #{j : noise[j] < noise[i] or (noise[j] == noise[i] and j < i)} = position of i in
    # the stable ascending argsort. Unsigned compares: the noise is uint32.
    for j0 in range(0, L, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        noise_j = _row_noise(row_key, j)
        before = (noise_j[None, :] < noise_i[:, None]) | ((noise_j[None, :] == noise_i[:, None])
                                                          & (j[None, :] < i[:, None]))
        before = before & (j[None, :] < L)
        rank += tl.sum(before.to(tl.int32), axis=1)

    row = b.to(tl.int64)
    if VARLEN:
        start = tl.load(cu_ptr + row).to(tl.int64)
        count = tl.load(cu_ptr + row + 1).to(tl.int64) - start
    else:
        start = row * K
        count = K
    tl.store(ids_restore_ptr + row * L + i, rank.to(ids_restore_ptr.dtype.element_ty), mask=i_valid)
    if WRITE_MASK:
        tl.store(mask_ptr + row * L + i, (rank >= count).to(mask_ptr.dtype.element_ty), mask=i_valid)
    keep = i_valid & (rank < count)
    if VARLEN:
        keep = keep & (start + rank >= 0) & (start + rank < T)
    tl.store(ids_keep_ptr + start + rank, i.to(ids_keep_ptr.dtype.element_ty), mask=keep)


def random_masking_forward(seed: torch.Tensor, offset: torch.Tensor, batch: int, num_patches: int, num_keep: int,
                           device: torch.device, *, cu_seqlens: torch.Tensor | None = None,
                           total: int | None = None, write_mask: bool = True):
    """Launch the fused noise + rank + mask kernel.

    ``seed``, ``offset``: int64 tensors with one element on ``device`` (read by the kernel, no host
    sync); row ``b`` is sample ``offset + b`` of the seed's stream.
    Dense: returns ``ids_keep (B, K)``, ``ids_restore (B, L)``, ``mask (B, L)`` float32.
    Varlen (``cu_seqlens`` given, ``total = cu_seqlens[-1]``): ``ids_keep`` is packed ``(total,)``.
    ``write_mask=False`` returns ``mask=None`` (used by ``random_permutation``: K = L).
    """
    B, L = batch, num_patches
    varlen = cu_seqlens is not None
    ids_keep = torch.empty((total,) if varlen else (B, num_keep), dtype=torch.int64, device=device)
    ids_restore = torch.empty((B, L), dtype=torch.int64, device=device)
    mask = torch.empty((B, L), dtype=torch.float32, device=device) if write_mask else None
    if B == 0 or L == 0:
        return ids_keep, ids_restore, mask
    block_j = min(triton.next_power_of_2(L), 256)
    block_i = min(triton.next_power_of_2(L), max(16, 8192 // block_j))
    grid = (B, triton.cdiv(L, block_i))
    _random_masking_kernel[grid](
        seed, offset, cu_seqlens if varlen else ids_restore, ids_keep, ids_restore, mask if write_mask else ids_restore,
        L, 0 if varlen else num_keep, ids_keep.shape[0],
        VARLEN=varlen, WRITE_MASK=write_mask, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4,
    )
    return ids_keep, ids_restore, mask
