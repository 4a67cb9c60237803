"""Masking ops of masked image modeling: which patches each sample keeps.

They replace the official MAE's ``torch.rand`` noise and two ``argsort`` calls:

- :func:`random_permutation`: a per-sample random permutation of the ``L`` patches from a
  counter-based RNG keyed by ``(seed, offset + b)`` (the same bits on every backend for a given
  seed; ``offset`` lets each process of a data-parallel run take its rows of the global
  batch's permutations), and its inverse, in one kernel, with no host sync.
- :func:`random_masking`: the same permutation cut after the keep count ``K``: the keep set,
  the inverse permutation and the binary mask (``K`` per batch, or one count per sample in the
  packed varlen layout).
- :func:`masking_from_permutation` and :func:`masking_from_mask`: the same results for a
  permutation or a mask made elsewhere (the official ``argsort`` of noise, a block-wise mask,
  an explicit mask), plain PyTorch.

The keep count lives here too: :func:`check_mask_ratio` is the one check of a mask ratio
(a float in ``[0, 1)``) and :func:`num_keep_from_ratio` the official ``len_keep = int(L * (1 -
mask_ratio))``. Which masks a model uses (these ops, the official draw, block-wise or grid
masks, a mask given by the caller) is chosen in :mod:`fastmim.models.masking`.

Conventions: ``B`` samples, ``L`` patches, ``K`` kept (visible) patches. Index results are
int64 and masks float32 with 1 = masked (removed), 0 = kept, as the official model. Each op has
a plain-PyTorch reference (``<op>_reference``, the definition of the result, same arguments), a
Triton kernel (``fastmim/kernels/masking.py``), a csrc kernel (``csrc/*/token_ops.*``) and a
``torch.library`` registration so ``torch.compile(fullgraph=True)`` traces through it; the
results are integers, so there is no autograd rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fastmim.ops._dispatch import select_backend

__all__ = [
    "Masking",
    "PackedMasking",
    "check_mask_ratio",
    "masking_from_mask",
    "masking_from_permutation",
    "masking_noise_reference",
    "num_keep_from_ratio",
    "random_masking",
    "random_masking_reference",
    "random_permutation",
    "random_permutation_reference",
    "seed_tensor",
]

_SEED_LIMIT = 2**63


class Masking(NamedTuple):
    """Result of :func:`random_masking` with one keep count for the whole batch."""

    ids_keep: Tensor  #: (B, K) int64, the kept patch indices of each sample in shuffled order
    ids_restore: Tensor  #: (B, L) int64, rank of each patch in the shuffle (inverse permutation)
    mask: Tensor  #: (B, L) float32, 1 = masked (removed), 0 = kept


class PackedMasking(NamedTuple):
    """Result of :func:`random_masking` with a keep count per sample (packed varlen layout)."""

    ids_keep: Tensor  #: (T,) int64, sample b's kept indices at rows cu_seqlens[b]:cu_seqlens[b+1]
    cu_seqlens: Tensor  #: (B + 1,) int32, cumulative keep counts, starting at 0
    max_seqlen: int  #: the largest keep count (a Python int: static for kernels and compile)
    ids_restore: Tensor  #: (B, L) int64
    mask: Tensor  #: (B, L) float32, 1 = masked; row b has L - count_b ones


# ============================================================================ the counter-based RNG
# The same constants are in the Triton and csrc kernels, which must produce the same bits.

_M32 = 0xFFFFFFFF
# lowbias32's two multipliers (a 32-bit avalanche: every input bit flips each output bit with
# probability close to 1/2), each < 2**31 so the int64 products below never overflow.
_MIX_MULTIPLIER_1 = 0x7FEB352D
_MIX_MULTIPLIER_2 = 0x2C1B3C6D
# Xored into the seed's high word before mixing it, so that the two 32-bit halves of a seed do
# not cancel (seeds hi:lo and lo:hi, or equal halves, would otherwise collide).
SEED_HIGH_SALT = 0x1B873593
# Odd, so ``i * PATCH_STRIDE mod 2**32`` is a bijection: spreads consecutive patch counters over
# all 32 bits before the row key is mixed in.
PATCH_STRIDE = 0x2545F491


def _mix32(x: Tensor) -> Tensor:
    """32-bit avalanche on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX_MULTIPLIER_1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX_MULTIPLIER_2) & _M32
    return x ^ (x >> 16)


def masking_noise_reference(seed: int | Tensor, batch: int, num_patches: int,
                            device: torch.device | str | None = None, *, offset: int | Tensor = 0) -> Tensor:
    """The noise that orders each sample's patches: ``(B, L)`` int64 values in ``[0, 2**32)``.

    ``seed_key = mix32(seed & M) ^ mix32((seed >> 32 & M) ^ SEED_HIGH_SALT)``,
    ``row_key(b) = mix32(seed_key ^ mix32((offset + b) & M))``,
    ``noise(b, i) = mix32(row_key(b) ^ (i * PATCH_STRIDE & M))`` with ``M = 2**32 - 1``.
    Counter-based: element ``(b, i)`` depends only on ``(seed, offset + b, i)``, so every backend
    (and any tiling of the work) produces the same bits, and row ``b`` of a call with ``offset``
    is row ``offset + b`` of a larger call without. The sample counter is taken mod ``2**32``.
    Other generators draw their words from the same stream (:mod:`fastmim.models.masking`).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(()).to(device)
    offset = _offset_tensor(offset).to(device)
    seed_key = _mix32(seed & _M32) ^ _mix32(((seed >> 32) & _M32) ^ SEED_HIGH_SALT)
    # offset + b may wrap past 2**63: int64 addition wraps mod 2**64, which keeps the low 32 bits.
    b = torch.arange(batch, dtype=torch.int64, device=device) + offset
    i = torch.arange(num_patches, dtype=torch.int64, device=device)
    row_key = _mix32(seed_key ^ _mix32(b & _M32))
    return _mix32(row_key[:, None] ^ ((i * PATCH_STRIDE) & _M32)[None, :])


# ============================================================================ keep counts


def check_mask_ratio(mask_ratio: object, name: str = "mask_ratio") -> float:
    """``mask_ratio`` as a float in ``[0, 1)``: the one check of a mask ratio in fastmim (the ops,
    the models, ``fastmim train --mask-ratio``). ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(mask_ratio).__name__}")
    if math.isnan(mask_ratio) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {mask_ratio!r}")
    return float(mask_ratio)


def num_keep_from_ratio(num_patches: int, mask_ratio: float) -> int:
    """``int(L * (1 - mask_ratio))``, exactly as the official MAE computes ``len_keep``."""
    return int(num_patches * (1 - check_mask_ratio(mask_ratio)))


def _keep_counts(batch: int, num_patches: int, mask_ratio: float | None,
                 num_keep: int | Sequence[int] | Tensor | None) -> int | Tensor:
    """An int K for the dense layout or an int64 tensor of per-sample counts (its own device)."""
    if (mask_ratio is None) == (num_keep is None):
        raise ValueError("give exactly one of mask_ratio and num_keep")
    if mask_ratio is not None:
        return num_keep_from_ratio(num_patches, mask_ratio)
    if isinstance(num_keep, bool):
        raise TypeError("num_keep must be an int, a list of ints or a 1-D integer tensor, got bool")
    if isinstance(num_keep, int):
        if not 0 <= num_keep <= num_patches:
            raise ValueError(f"num_keep must be in [0, num_patches={num_patches}], got {num_keep}")
        return num_keep
    if isinstance(num_keep, Tensor):
        if num_keep.dtype.is_floating_point or num_keep.dtype.is_complex or num_keep.dtype == torch.bool:
            raise TypeError(f"num_keep tensor must have an integer dtype, got {num_keep.dtype}")
        counts = num_keep.to(torch.int64)
    elif isinstance(num_keep, Sequence) and all(isinstance(c, int) and not isinstance(c, bool) for c in num_keep):
        counts = torch.tensor(list(num_keep), dtype=torch.int64)
    else:
        raise TypeError(f"num_keep must be an int, a list of ints or a 1-D integer tensor, got {num_keep!r}")
    if counts.shape != (batch,):
        raise ValueError(f"num_keep per sample must have shape (batch,) = ({batch},), got {tuple(counts.shape)}")
    if counts.device.type == "cpu" and batch > 0 and not bool(((counts >= 0) & (counts <= num_patches)).all()):
        raise ValueError(f"num_keep counts must be in [0, num_patches={num_patches}], got {counts.tolist()}")
    return counts


def _cu_seqlens(counts: Tensor, device: torch.device) -> tuple[Tensor, int]:
    """``cu_seqlens (B + 1,)`` int32 on ``device`` and ``max_seqlen``. Counts on the host: no device
    sync (a small host-to-device copy). Counts on an accelerator: one sync to read the max and
    the total (the packed length is a shape)."""
    cu = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=counts.device)
    cu[1:] = torch.cumsum(counts, 0)
    if counts.device.type != "cpu":
        stats = torch.stack([counts.min(), counts.max()]).cpu() if counts.numel() else torch.zeros(2, dtype=torch.int64)
        if counts.numel() and stats[0] < 0:
            raise ValueError(f"num_keep counts must be >= 0, got a minimum of {int(stats[0])}")
        max_seqlen = int(stats[1])
    else:
        max_seqlen = int(counts.max()) if counts.numel() else 0
    return cu.to(device, non_blocking=True), max_seqlen


# ============================================================================ argument checks


def _counter_key(name: str, value: int | Tensor, accepted: str) -> Tensor:
    """``value`` (an int or an int64 scalar tensor in ``[0, 2**63)``) as an int64 scalar tensor."""
    if isinstance(value, Tensor):
        if value.dtype != torch.int64 or value.numel() != 1:
            raise ValueError(f"{name} tensor must be int64 with one element, got {value.dtype} of shape "
                             f"{tuple(value.shape)}")
        # int64 holds exactly [-2**63, 2**63): only the sign is left to check. Free on the host;
        # skipped on an accelerator (a device sync) and while torch.compile traces (a graph break).
        if value.device.type == "cpu" and not torch.compiler.is_compiling() and int(value) < 0:
            raise ValueError(f"{name} must be in [0, 2**63), got {int(value)}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__}")
    if not 0 <= value < _SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return torch.tensor(value, dtype=torch.int64)


def seed_tensor(seed: int | Tensor | None, generator: torch.Generator | None = None) -> Tensor:
    """The seed of the counter-based RNG as an int64 scalar tensor. Without one it is drawn from
    ``generator`` (or the default CPU generator, so ``torch.manual_seed`` fixes it), on the
    generator's device: no device sync either way. Every masking op and generator draws it so."""
    if seed is not None and generator is not None:
        raise ValueError("give at most one of seed and generator")
    if seed is None:
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64, device=device)
    return _counter_key("seed", seed, "an int, an int64 tensor or None")


def _offset_tensor(offset: int | Tensor) -> Tensor:
    """The sample offset as an int64 scalar tensor (on its own device: no device sync)."""
    return _counter_key("offset", offset, "an int or an int64 tensor")


def _check_sizes(batch: int, num_patches: int) -> None:
    # An empty batch gives empty results, as it does for gather_visible and unshuffle.
    for name, value, low in (("batch", batch, 0), ("num_patches", num_patches, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def _resolve_device(device: torch.device | str | None) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ============================================================================ references


def random_permutation_reference(batch: int, num_patches: int, *, seed: int | Tensor | None = None,
                                 generator: torch.Generator | None = None, offset: int | Tensor = 0,
                                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``ids_shuffle`` = stable ascending argsort of the noise (ties: smaller index first),
    ``ids_restore`` = its inverse; both ``(B, L)`` int64. Row ``b`` is sample ``offset + b``."""
    noise = masking_noise_reference(seed_tensor(seed, generator), batch, num_patches, device, offset=offset)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore


def random_masking_reference(batch: int, num_patches: int, mask_ratio: float | None = None, *,
                             num_keep: int | Sequence[int] | Tensor | None = None, seed: int | Tensor | None = None,
                             generator: torch.Generator | None = None, offset: int | Tensor = 0,
                             device: torch.device | str | None = None) -> Masking | PackedMasking:
    """The official MAE's ``random_masking`` with the counter-based noise:
    ``ids_keep = ids_shuffle[:, :K]``, ``mask[b, i] = ids_restore[b, i] >= K``.

    With per-sample counts, sample b keeps ``ids_shuffle[b, :count_b]``, packed one after another.
    Row ``b`` is sample ``offset + b`` (see :func:`random_permutation`).
    """
    counts = _keep_counts(batch, num_patches, mask_ratio, num_keep)
    ids_shuffle, ids_restore = random_permutation_reference(batch, num_patches, seed=seed, generator=generator,
                                                            offset=offset, device=device)
    return masking_from_permutation(ids_shuffle, ids_restore, counts)


def masking_from_permutation(ids_shuffle: Tensor, ids_restore: Tensor,
                             num_keep: int | Sequence[int] | Tensor) -> Masking | PackedMasking:
    """The masking that keeps each sample's first ``num_keep`` patches of ``ids_shuffle``.

    ``ids_shuffle`` / ``ids_restore``: ``(B, L)`` permutations and their inverses (as the
    official ``argsort`` of noise gives them). ``num_keep``: one int (:class:`Masking`) or one
    count per sample (:class:`PackedMasking`; counts on the host: no device sync).
    """
    batch, length = ids_shuffle.shape
    counts = _keep_counts(batch, length, None, num_keep)
    if isinstance(counts, int):
        return Masking(ids_shuffle[:, :counts], ids_restore, (ids_restore >= counts).to(torch.float32))
    device = ids_shuffle.device
    counts_dev = counts.to(device)
    keep = torch.arange(length, device=device)[None, :] < counts_dev[:, None]
    cu_seqlens, max_seqlen = _cu_seqlens(counts, device)
    mask = (ids_restore >= counts_dev[:, None]).to(torch.float32)
    return PackedMasking(ids_shuffle[keep], cu_seqlens, max_seqlen, ids_restore, mask)


def masking_from_mask(mask: Tensor) -> Masking | PackedMasking:
    """The masking a given ``(B, L)`` mask describes (1 / True = removed, 0 / False = kept).

    Each sample keeps its visible patches in increasing patch index; ``ids_restore`` ranks them
    first, then the masked ones (a stable argsort of the mask). Samples that keep the same number
    of patches give :class:`Masking`, otherwise :class:`PackedMasking`. The counts are read on
    the host (a device sync for an accelerator mask).
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a (B, L) tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    removed = mask.bool() if mask.dtype == torch.bool else mask != 0
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask values must be 0 (kept) or 1 (removed)")
    ids_shuffle = torch.argsort(removed.to(torch.uint8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    counts = (mask.shape[1] - removed.sum(dim=1)).tolist()
    uniform = len(set(counts)) <= 1
    return masking_from_permutation(ids_shuffle, ids_restore, counts[0] if uniform and counts else counts)


# ============================================================================ registered ops

# The compiled csrc kernels (fastmim._C) are the CPU default: benchmarks/bench_masking.py
# measured them at least as fast as the reference.
def _masking_backend(device: torch.device) -> str:
    return select_backend("random_masking", device, implemented=("reference", "triton", "csrc"), prefer_cpu=("csrc",))


def _scalar_on(t: Tensor, device: torch.device) -> Tensor:
    # An 8-byte host-to-device copy, asynchronous (no wait on the device) when the scalar is on the host.
    return t.reshape(1).to(device, non_blocking=True)


@torch.library.custom_op("fastmim::random_permutation", mutates_args=())
def _random_permutation_op(seed: Tensor, offset: Tensor, batch: int, num_patches: int,
                           device: torch.device) -> tuple[Tensor, Tensor]:
    backend = _masking_backend(device)
    if backend == "triton":
        from fastmim.kernels import masking as kernels

        ids_shuffle, ids_restore, _ = kernels.random_masking_forward(
            _scalar_on(seed, device), _scalar_on(offset, device), batch, num_patches, num_patches, device,
            write_mask=False)
        return ids_shuffle, ids_restore
    if backend == "csrc":
        return torch.ops.fastmim.csrc_random_permutation(seed, batch, num_patches, device, offset=offset)
    return random_permutation_reference(batch, num_patches, seed=seed, offset=offset, device=device)


@_random_permutation_op.register_fake
def _(seed, offset, batch, num_patches, device):
    return (torch.empty((batch, num_patches), dtype=torch.int64, device=device),
            torch.empty((batch, num_patches), dtype=torch.int64, device=device))


@torch.library.custom_op("fastmim::random_masking", mutates_args=())
def _random_masking_op(seed: Tensor, offset: Tensor, batch: int, num_patches: int, num_keep: int,
                       device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    backend = _masking_backend(device)
    if backend == "triton":
        from fastmim.kernels import masking as kernels

        return kernels.random_masking_forward(_scalar_on(seed, device), _scalar_on(offset, device), batch, num_patches,
                                              num_keep, device)
    if backend == "csrc":
        return torch.ops.fastmim.csrc_random_masking(seed, batch, num_patches, num_keep, device, offset=offset)
    out = random_masking_reference(batch, num_patches, num_keep=num_keep, seed=seed, offset=offset, device=device)
    return out.ids_keep.clone(), out.ids_restore, out.mask  # clone: ids_keep must not be a view of a temporary


@_random_masking_op.register_fake
def _(seed, offset, batch, num_patches, num_keep, device):
    return (torch.empty((batch, num_keep), dtype=torch.int64, device=device),
            torch.empty((batch, num_patches), dtype=torch.int64, device=device),
            torch.empty((batch, num_patches), dtype=torch.float32, device=device))


@torch.library.custom_op("fastmim::random_masking_varlen", mutates_args=())
def _random_masking_varlen_op(seed: Tensor, offset: Tensor, cu_seqlens: Tensor, batch: int, num_patches: int,
                              total: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    backend = _masking_backend(device)
    if backend == "triton":
        from fastmim.kernels import masking as kernels

        return kernels.random_masking_forward(_scalar_on(seed, device), _scalar_on(offset, device), batch, num_patches,
                                              0, device, cu_seqlens=cu_seqlens.contiguous(), total=total)
    if backend == "csrc":
        return torch.ops.fastmim.csrc_random_masking_varlen(seed, cu_seqlens, batch, num_patches, total, device,
                                                            offset=offset)
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    ids_shuffle, ids_restore = random_permutation_reference(batch, num_patches, seed=seed, offset=offset,
                                                            device=device)
    keep = torch.arange(num_patches, device=device)[None, :] < counts[:, None]
    ids_keep = ids_shuffle.masked_select(keep)
    return ids_keep, ids_restore, (ids_restore >= counts[:, None]).to(torch.float32)


@_random_masking_varlen_op.register_fake
def _(seed, offset, cu_seqlens, batch, num_patches, total, device):
    return (torch.empty((total,), dtype=torch.int64, device=device),
            torch.empty((batch, num_patches), dtype=torch.int64, device=device),
            torch.empty((batch, num_patches), dtype=torch.float32, device=device))


# ============================================================================ public ops


def random_permutation(batch: int, num_patches: int, *, seed: int | Tensor | None = None,
                       generator: torch.Generator | None = None, offset: int | Tensor = 0,
                       device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """A uniformly random permutation of ``0..L-1`` per sample, from the counter-based RNG.

    Returns ``(ids_shuffle, ids_restore)``, both ``(B, L)`` int64 on ``device`` (default CPU):
    ``ids_shuffle[b]`` lists the patches in shuffled order, ``ids_restore[b]`` is its inverse
    (the rank of each patch). ``seed`` (int in ``[0, 2**63)`` or an int64 scalar tensor on the
    host or on ``device``, its value in the same range: checked on the host, not on a device)
    gives the same permutation on every backend; without one, a seed is drawn from
    ``generator`` (or the default CPU generator): never a device sync.

    ``offset`` (same types and range as ``seed``, default 0) numbers the samples: row ``b`` gets
    the permutation of sample ``offset + b`` of the seed, i.e. row ``offset + b`` of a call with
    offset 0 and a larger batch. A process holding rows ``[r * B, (r + 1) * B)`` of a global
    batch passes ``offset = r * B`` and gets the rows a single process would, whatever the
    number of processes. Samples are counted mod ``2**32``.
    """
    _check_sizes(batch, num_patches)
    device = _resolve_device(device)
    return torch.ops.fastmim.random_permutation(seed_tensor(seed, generator), _offset_tensor(offset), batch,
                                                num_patches, device)


def random_masking(batch: int, num_patches: int, mask_ratio: float | None = None, *,
                   num_keep: int | Sequence[int] | Tensor | None = None, seed: int | Tensor | None = None,
                   generator: torch.Generator | None = None, offset: int | Tensor = 0,
                   device: torch.device | str | None = None) -> Masking | PackedMasking:
    """Per-sample random masking of ``L = num_patches`` patches, as the official MAE's
    ``random_masking`` (same outputs and conventions) with a counter-based RNG and one fused kernel.

    Give exactly one of:

    - ``mask_ratio`` in ``[0, 1)``: keeps ``K = int(L * (1 - mask_ratio))`` patches per sample
      (the official MAE's ``len_keep``), returns :class:`Masking` ``(ids_keep (B, K),
      ids_restore (B, L), mask (B, L))``;
    - ``num_keep``: an int ``K`` (same result), or per-sample counts (a list of ints or a 1-D
      integer tensor of length ``B``), which returns :class:`PackedMasking` ``(ids_keep (T,),
      cu_seqlens (B + 1,) int32, max_seqlen, ids_restore (B, L), mask (B, L))`` with ``T`` the
      total count. Counts as a list or a CPU tensor: no device sync. Counts as an accelerator
      tensor: one device sync (``T`` and ``max_seqlen`` are shapes the host needs).

    ``ids_keep`` holds each sample's kept patch indices in shuffled order; ``ids_restore[b, i]``
    is the rank of patch ``i``; ``mask`` is float32 with 1 = masked (removed), 0 = kept. The
    permutation is that of :func:`random_permutation` for the same seed (``ids_keep`` is a prefix
    of ``ids_shuffle``), so masks of the same seed nest across ratios. Seeding and ``offset`` (row
    ``b`` is sample ``offset + b``) as in :func:`random_permutation`. Everything is int64 / float32
    on ``device`` (default CPU).
    """
    _check_sizes(batch, num_patches)
    device = _resolve_device(device)
    counts = _keep_counts(batch, num_patches, mask_ratio, num_keep)
    seed_t = seed_tensor(seed, generator)
    offset_t = _offset_tensor(offset)
    if isinstance(counts, int):
        return Masking(*torch.ops.fastmim.random_masking(seed_t, offset_t, batch, num_patches, counts, device))
    cu_seqlens, max_seqlen = _cu_seqlens(counts, device)
    if max_seqlen > num_patches:
        raise ValueError(f"num_keep counts must be <= num_patches={num_patches}, got a maximum of {max_seqlen}")
    total = int(counts.sum()) if counts.device.type == "cpu" else int(cu_seqlens[-1])
    ids_keep, ids_restore, mask = torch.ops.fastmim.random_masking_varlen(seed_t, offset_t, cu_seqlens, batch,
                                                                          num_patches, total, device)
    return PackedMasking(ids_keep, cu_seqlens, max_seqlen, ids_restore, mask)
