"""Token ops of masked image modeling: random masking, gather of visible tokens, decoder un-shuffle.

They replace the eager chain of the official MAE (``torch.rand`` noise, two ``argsort``, index
expansion, ``gather``, ``cat`` with mask tokens, ``gather`` again, position-embedding adds):

- :func:`random_masking` / :func:`random_permutation`: a per-sample random permutation of the
  ``L`` patches from a counter-based RNG keyed by ``(seed, offset + b)`` (the same bits on every
  backend for a given seed; ``offset`` lets each process of a data-parallel run take its rows
  of the global batch's masks), the keep set, the inverse permutation and the binary mask, in
  one kernel, with no host sync.
- :func:`gather_visible`: ``x[b, ids_keep[b]] + pos_embed[ids_keep[b]]``, optionally with a
  leading cls token (``cls_token + pos_embed`` cls slot) and packed varlen output.
- :func:`unshuffle`: the decoder's full-length sequence, visible tokens back at their
  positions, ``mask_token`` elsewhere, ``+ pos_embed``; cls token passed through.

Each op has a plain-PyTorch reference (``<op>_reference``, the definition of the result), a
Triton implementation (``fastmim/kernels/token_ops.py``), an autograd rule whose backward is
itself a registered op, and a ``torch.library`` registration so ``torch.compile(fullgraph=True)``
traces through it.

Conventions shared by the ops:

- Shapes: ``B`` samples, ``L`` patches, ``K`` kept (visible) patches, ``D`` channels.
- Index tensors may be int64 or int32 (dtype, shape and device checked). Their values follow
  the policy of :mod:`fastmim.ops._validate`: entries of ``ids_keep`` must be in ``[0, L)``;
  rows of ``ids_restore`` must be permutations of ``0..L-1``, as :func:`random_masking` returns
  them (the un-shuffle's backward writes each visible token's gradient from the one position of
  its rank, so a repeated or missing rank has no defined gradient); varlen ``cu_seqlens`` must
  start at 0, never decrease and end at the packed length, with every count at most
  ``max_seqlen`` (:func:`gather_visible`) or ``L`` (:func:`unshuffle`). Values on the host are
  always checked, by the public op before it dispatches (so on every backend) and by the
  references: a ``ValueError`` naming the op, the argument, the first bad position and the
  valid range. Values on an accelerator are checked only under ``FASTMIM_CHECK_INDICES=1`` or
  :func:`~fastmim.ops.check_indices` (a device sync), and never while torch.compile traces.
  Unchecked bad values never make a kernel read or write outside its tensors: an
  out-of-range ``ids_keep`` entry gathers a zero row and an out-of-range ``ids_restore`` entry
  a zero token (plus its position embedding), and their gradients are dropped; inconsistent
  offsets or rows that are not permutations give wrong values (gradient rows that no position
  maps to may be left unwritten). The reference backend on an accelerator indexes with
  PyTorch, whose own device-side checks then apply. An index repeated within a row of
  ``ids_keep`` is gathered once per occurrence and its gradient is the sum over the
  occurrences, on every backend.
- An empty batch (``B = 0``) gives empty results and gradients on every backend.
- ``pos_embed`` is ``(L, D)`` / ``(1, L, D)`` (patch rows only) or ``(L + 1, D)`` /
  ``(1, L + 1, D)``: one more row than there are patches means row 0 is the cls slot and rows
  ``1..L`` belong to the patches, the layout of the official MAE's ``pos_embed`` and
  ``decoder_pos_embed``. The cls slot is added to the cls token when there is one and unused
  (zero gradient) otherwise. With a cls token and an ``L``-row ``pos_embed`` the cls token gets
  no position embedding.
- The result dtype is PyTorch's type promotion of the floating inputs (as the eager chain:
  bf16 ``x`` + fp32 ``pos_embed`` gives fp32); values are added in fp32 and rounded once, which
  is what eager PyTorch does, so the forward results equal the eager chain's bit for bit.
- Gradients: reductions over the batch (``pos_embed``, ``cls_token``, ``mask_token``)
  accumulate in fp32 (fp64 for float64 gradients) and are deterministic (no atomics).
- Non-contiguous inputs give the same results on every backend. The Triton kernels read the
  large activations (``x``, ``x_visible``, incoming gradients) with their strides, no copy; the
  csrc backend makes them contiguous first (a copy when they are not); the reference indexes
  them with PyTorch. The small operands (``pos_embed``, tokens, index tensors, ``cu_seqlens``)
  are made contiguous on every backend (a copy only if they are not).
- The backend is chosen per call, forward and backward separately: a backward run outside a
  :func:`~fastmim.ops.use_backend` block picks its backend again (the default one).
- float64 inputs always run the reference (the kernels compute in fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fastmim.ops._dispatch import select_backend
from fastmim.ops._validate import check_cu_seqlens, check_index_range, check_permutation_rows

__all__ = [
    "Masking",
    "PackedMasking",
    "gather_visible",
    "gather_visible_reference",
    "masking_noise_reference",
    "num_keep_from_ratio",
    "random_masking",
    "random_masking_reference",
    "random_permutation",
    "random_permutation_reference",
    "unshuffle",
    "unshuffle_reference",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)
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

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """32-bit avalanche on int64 tensors holding values in [0, 2**32); every constant < 2**31 so
    the int64 products never overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def masking_noise_reference(seed: int | Tensor, batch: int, num_patches: int,
                            device: torch.device | str | None = None, *, offset: int | Tensor = 0) -> Tensor:
    """The noise that orders each sample's patches: ``(B, L)`` int64 values in ``[0, 2**32)``.

    ``seed_key = mix32(seed & M) ^ mix32((seed >> 32 & M) ^ 0x1B873593)``,
    ``row_key(b) = mix32(seed_key ^ mix32((offset + b) & M))``,
    ``noise(b, i) = mix32(row_key(b) ^ (i * 0x2545F491 & M))`` with ``M = 2**32 - 1``.
    Counter-based: element ``(b, i)`` depends only on ``(seed, offset + b, i)``, so every backend
    (and any tiling of the work) produces the same bits, and row ``b`` of a call with ``offset``
    is row ``offset + b`` of a larger call without. The sample counter is taken mod ``2**32``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(()).to(device)
    offset = _offset_tensor(offset).to(device)
    seed_key = _mix32(seed & _M32) ^ _mix32(((seed >> 32) & _M32) ^ 0x1B873593)
    # offset + b may wrap past 2**63: int64 addition wraps mod 2**64, which keeps the low 32 bits.
    b = torch.arange(batch, dtype=torch.int64, device=device) + offset
    i = torch.arange(num_patches, dtype=torch.int64, device=device)
    row_key = _mix32(seed_key ^ _mix32(b & _M32))
    return _mix32(row_key[:, None] ^ ((i * 0x2545F491) & _M32)[None, :])


def random_permutation_reference(batch: int, num_patches: int, *, seed: int | Tensor, offset: int | Tensor = 0,
                                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``ids_shuffle`` = stable ascending argsort of the noise (ties: smaller index first),
    ``ids_restore`` = its inverse; both ``(B, L)`` int64. Row ``b`` is sample ``offset + b``."""
    noise = masking_noise_reference(seed, batch, num_patches, device, offset=offset)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore


def random_masking_reference(batch: int, num_patches: int, mask_ratio: float | None = None, *,
                             num_keep: int | Sequence[int] | Tensor | None = None, seed: int | Tensor,
                             offset: int | Tensor = 0,
                             device: torch.device | str | None = None) -> Masking | PackedMasking:
    """The official MAE's ``random_masking`` with the counter-based noise:
    ``ids_keep = ids_shuffle[:, :K]``, ``mask[b, i] = ids_restore[b, i] >= K``.

    With per-sample counts, sample b keeps ``ids_shuffle[b, :count_b]``, packed one after another.
    Row ``b`` is sample ``offset + b`` (see :func:`random_permutation`).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    ids_shuffle, ids_restore = random_permutation_reference(batch, num_patches, seed=seed, offset=offset,
                                                            device=device)
    counts = _keep_counts(batch, num_patches, mask_ratio, num_keep)
    if isinstance(counts, int):
        mask = (ids_restore >= counts).to(torch.float32)
        return Masking(ids_shuffle[:, :counts], ids_restore, mask)
    counts_dev = counts.to(device)
    keep = torch.arange(num_patches, device=device)[None, :] < counts_dev[:, None]
    cu_seqlens, max_seqlen = _cu_seqlens(counts, device)
    mask = (ids_restore >= counts_dev[:, None]).to(torch.float32)
    return PackedMasking(ids_shuffle[keep], cu_seqlens, max_seqlen, ids_restore, mask)


# ============================================================================ masking: public API


def num_keep_from_ratio(num_patches: int, mask_ratio: float) -> int:
    """``int(L * (1 - mask_ratio))``, exactly as the official MAE computes ``len_keep``."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float in [0, 1), got {type(mask_ratio).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    return int(num_patches * (1 - mask_ratio))


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


def _seed_tensor(seed: int | Tensor | None, generator: torch.Generator | None) -> Tensor:
    """The seed as an int64 scalar tensor; drawn from ``generator`` (or the default CPU generator)
    when not given: on the generator's device, so no device sync either way."""
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
    return torch.ops.fastmim.random_permutation(_seed_tensor(seed, generator), _offset_tensor(offset), batch,
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
    seed_t = _seed_tensor(seed, generator)
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


# The compiled csrc kernels (fastmim._C) implement the dense token ops; on CPU they are the
# default where benchmarks/bench_token_ops.py measured them at least as fast as the reference.
_CSRC_CPU_DEFAULT = {"random_masking": ("csrc",), "gather_visible": ("csrc",), "unshuffle": ("csrc",)}


def _select(op: str, device: torch.device) -> str:
    return select_backend(op, device, implemented=("reference", "triton", "csrc"),
                          prefer_cpu=_CSRC_CPU_DEFAULT.get(op, ("reference",)))


def _masking_backend(device: torch.device) -> str:
    return _select("random_masking", device)


def _scalar_on(t: Tensor, device: torch.device) -> Tensor:
    # An 8-byte host-to-device copy, asynchronous (no wait on the device) when the scalar is on the host.
    return t.reshape(1).to(device, non_blocking=True)


@torch.library.custom_op("fastmim::random_permutation", mutates_args=())
def _random_permutation_op(seed: Tensor, offset: Tensor, batch: int, num_patches: int,
                           device: torch.device) -> tuple[Tensor, Tensor]:
    backend = _masking_backend(device)
    if backend == "triton":
        from fastmim.kernels import token_ops as kernels

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
        from fastmim.kernels import token_ops as kernels

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
        from fastmim.kernels import token_ops as kernels

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


# ============================================================================ shared validation


def _check_float(name: str, t: object, device: torch.device | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the tokens are on {device}")
    return t


def _check_index(name: str, t: object, ndim: int, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the tokens are on {device}")
    return t


def _check_varlen(cu_seqlens: object, batch: int, device: torch.device) -> Tensor:
    cu = _check_index("cu_seqlens", cu_seqlens, 1, device)
    if cu.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens must have shape (B + 1,) = ({batch + 1},), got {tuple(cu.shape)}")
    return cu


def _pos_2d(pos_embed: object, num_patches: int, dim: int, device: torch.device) -> Tensor | None:
    """``pos_embed`` as a 2-D ``(P, D)`` view, ``P`` in ``{L, L + 1}``."""
    if pos_embed is None:
        return None
    pos = _check_float("pos_embed", pos_embed, device)
    ok_rows = (num_patches, num_patches + 1)
    if not ((pos.dim() == 2 or (pos.dim() == 3 and pos.shape[0] == 1)) and pos.shape[-2] in ok_rows
            and pos.shape[-1] == dim):
        raise ValueError(f"pos_embed must have shape (L, D), (1, L, D), (L + 1, D) or (1, L + 1, D) with L = "
                         f"{num_patches}, D = {dim} (the L + 1 forms carry a leading cls slot), "
                         f"got {tuple(pos.shape)}")
    return pos.reshape(pos.shape[-2], dim)


def _token_1d(name: str, token: object, dim: int, device: torch.device) -> Tensor:
    token = _check_float(name, token, device)
    if token.numel() != dim or token.dim() > 3 or any(s != 1 for s in token.shape[:-1]):
        raise ValueError(f"{name} must have shape (D,), (1, D) or (1, 1, D) with D = {dim}, got {tuple(token.shape)}")
    return token.reshape(dim)


def _result_dtype(*tensors: Tensor | None) -> torch.dtype:
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _as_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A small operand (pos_embed, a token) in the result dtype, contiguous (a copy only if needed)."""
    return None if t is None else t.to(dtype).contiguous()


def _kernel_backend(op: str, device: torch.device, *tensors: Tensor | None) -> str:
    backend = _select(op, device)
    if backend != "reference" and any(t is not None and t.dtype == torch.float64 for t in tensors):
        return "reference"
    return backend


def _max_seqlen(cu_seqlens: Tensor, max_seqlen: int | None) -> int:
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
        return max_seqlen
    # A device sync when cu_seqlens lives on an accelerator: pass max_seqlen to avoid it.
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def _check_gather_values(ids_keep: Tensor, num_patches: int, cu_seqlens: Tensor | None,
                         max_seqlen: int | None) -> None:
    """The values of gather_visible's index arguments, under the policy of fastmim.ops._validate."""
    if cu_seqlens is not None:
        cu = check_cu_seqlens("cu_seqlens", cu_seqlens, max_seqlen=max_seqlen, op="gather_visible")
        if cu is not None and cu[-1] != ids_keep.shape[0]:
            raise ValueError(f"gather_visible: ids_keep must have cu_seqlens[-1] = {cu[-1]} rows (the packed "
                             f"length), got shape {tuple(ids_keep.shape)}")
    check_index_range("ids_keep", ids_keep, num_patches, op="gather_visible")


def _check_unshuffle_values(x_visible: Tensor, ids_restore: Tensor, cu_seqlens: Tensor | None,
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


def _varlen_rows(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For each packed row j: its sample ``b`` and its position ``j - cu_seqlens[b]`` within it."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    batch_of_row = torch.repeat_interleave(torch.arange(counts.shape[0], device=cu_seqlens.device), counts,
                                           output_size=total)
    return batch_of_row, torch.arange(total, device=cu_seqlens.device) - cu_seqlens.to(torch.int64)[batch_of_row]


def _pos_rows(pos: Tensor | None, num_patches: int) -> tuple[Tensor | None, Tensor | None]:
    """``(cls slot (D,) or None, patch rows (L, D) or None)`` of a 2-D pos_embed."""
    if pos is None:
        return None, None
    if pos.shape[0] == num_patches + 1:
        return pos[0], pos[1:]
    return None, pos


# ============================================================================ gather_visible


def gather_visible_reference(x: Tensor, ids_keep: Tensor, pos_embed: Tensor | None = None, *,
                             cls_token: Tensor | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
    """``out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]]``; with ``cls_token`` a
    leading row ``cls_token + pos_embed[cls slot]`` per sample.

    Equals the official MAE encoder's ``x + pos_embed[:, 1:]`` -> ``gather(ids_keep)`` ->
    ``cat(cls_token + pos_embed[:, :1], x)``. Varlen: ``ids_keep`` packed ``(T,)``, sample b at rows
    ``cu_seqlens[b]:cu_seqlens[b+1]``; the output is packed ``(T + B * has_cls, D)`` with sample b at
    rows ``cu_seqlens[b] + b * has_cls : cu_seqlens[b+1] + (b + 1) * has_cls`` (cls row first).
    Index values are checked as by :func:`gather_visible` (same ``ValueError``).
    """
    _check_gather_values(ids_keep, x.shape[1], cu_seqlens, None)
    return _gather_visible_eager(x, ids_keep, pos_embed, cls_token, cu_seqlens)


def _gather_visible_eager(x: Tensor, ids_keep: Tensor, pos_embed: Tensor | None, cls_token: Tensor | None,
                          cu_seqlens: Tensor | None) -> Tensor:
    """:func:`gather_visible_reference` on index values already checked (by the public op)."""
    B, L, D = x.shape
    pos = None if pos_embed is None else pos_embed.reshape(pos_embed.shape[-2], D)
    pos_cls, pos_patch = _pos_rows(pos, L)
    ids = ids_keep.long()
    if cu_seqlens is None:
        out = x[torch.arange(B, device=x.device)[:, None], ids]  # (B, K, D)
        if pos_patch is not None:
            out = out + pos_patch[ids]
    else:
        batch_of_row, _ = _varlen_rows(cu_seqlens, ids.shape[0])
        out = x[batch_of_row, ids]  # (T, D)
        if pos_patch is not None:
            out = out + pos_patch[ids]
    if cls_token is None:
        return out
    cls = cls_token.reshape(D)
    if pos_cls is not None:
        cls = cls + pos_cls
    dtype = torch.promote_types(out.dtype, cls.dtype)
    if cu_seqlens is None:
        return torch.cat([cls.reshape(1, 1, D).expand(B, 1, D).to(dtype), out.to(dtype)], dim=1)
    out_rows = torch.arange(ids.shape[0], device=x.device) + batch_of_row + 1
    cls_rows = cu_seqlens[:-1].long() + torch.arange(B, device=x.device)
    packed = torch.zeros((ids.shape[0] + B, D), dtype=dtype, device=x.device)
    packed = packed.index_put((out_rows,), out.to(dtype))
    return packed.index_put((cls_rows,), cls.to(dtype).expand(B, D))


def gather_visible(x: Tensor, ids_keep: Tensor, pos_embed: Tensor | None = None, *,
                   cls_token: Tensor | None = None, cu_seqlens: Tensor | None = None,
                   max_seqlen: int | None = None) -> Tensor:
    """Gather each sample's visible tokens and add their position embedding, in one pass.

    Args:
        x: ``(B, L, D)`` tokens, any strides (read in place by the Triton kernels, copied to a
            contiguous tensor by the csrc backend).
        ids_keep: ``(B, K)`` int64/int32 kept patch indices (from :func:`random_masking`), or packed
            ``(T,)`` with ``cu_seqlens``; a repeated index is gathered once per occurrence.
        pos_embed: optional ``(L, D)`` / ``(1, L, D)``, or ``(L + 1, D)`` / ``(1, L + 1, D)`` with a
            leading cls slot (the official MAE's ``pos_embed`` as is).
        cls_token: optional ``(D,)`` / ``(1, D)`` / ``(1, 1, D)``: prepends ``cls_token`` (+ the
            cls slot of ``pos_embed`` when it has one) to every sample, unshuffled.
        cu_seqlens: optional ``(B + 1,)`` int32/int64 offsets for the packed varlen layout:
            ``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[-1] = T``.
        max_seqlen: the largest per-sample count of the varlen layout; computed from
            ``cu_seqlens`` if omitted (a device sync on an accelerator: pass it, e.g. from
            :class:`PackedMasking`).

    Returns:
        ``(B, K + has_cls, D)``: ``out[b, has_cls + k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]]``
        and ``out[b, 0] = cls_token + pos_embed[cls slot]``; varlen: packed
        ``(T + B * has_cls, D)``, sample b at rows ``cu_seqlens[b] + b * has_cls`` onwards (its
        cu_seqlens is ``cu_seqlens + has_cls * arange(B + 1)``). dtype: promotion of x, pos_embed,
        cls_token.

    The official MAE encoder's masking, ``x = x + pos_embed[:, 1:]; x, mask, ids_restore =
    random_masking(x); x = cat(cls_token + pos_embed[:, :1], x)``, is one call:
    ``gather_visible(x, masking.ids_keep, pos_embed, cls_token=cls_token)``.

    Index values (``ids_keep`` in ``[0, L)``, ``cu_seqlens``, ``max_seqlen`` at least every
    count) are checked on the host, on an accelerator under :func:`~fastmim.ops.check_indices`;
    unchecked, an out-of-range id gathers a zero row (see the module doc).

    Backward: ``x`` receives the gradient at the kept positions (summed over the occurrences of a
    repeated index) and zero elsewhere; ``pos_embed``
    the sum over samples (fp32 accumulation, deterministic); ``cls_token`` the sum of the cls rows.
    """
    _check_float("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got shape {tuple(x.shape)}")
    B, L, D = x.shape
    device = x.device
    if cu_seqlens is None:
        ids_keep = _check_index("ids_keep", ids_keep, 2, device)
        if ids_keep.shape[0] != B or ids_keep.shape[1] > L:
            raise ValueError(f"ids_keep must have shape (B, K) with B = {B}, K <= L = {L}, got {tuple(ids_keep.shape)}")
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only for the varlen layout (with cu_seqlens)")
        max_seqlen = 0
    else:
        ids_keep = _check_index("ids_keep", ids_keep, 1, device)
        cu_seqlens = _check_varlen(cu_seqlens, B, device)
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
    _check_gather_values(ids_keep, L, cu_seqlens, max_seqlen)
    pos = _pos_2d(pos_embed, L, D, device)
    cls = None if cls_token is None else _token_1d("cls_token", cls_token, D, device)
    return torch.ops.fastmim.gather_visible(x, ids_keep, pos, cls, cu_seqlens, max_seqlen)


@torch.library.custom_op("fastmim::gather_visible", mutates_args=())
def _gather_visible_op(x: Tensor, ids_keep: Tensor, pos_embed: Tensor | None, cls_token: Tensor | None,
                       cu_seqlens: Tensor | None, max_seqlen: int) -> Tensor:
    backend = _kernel_backend("gather_visible", x.device, x, pos_embed, cls_token)
    if backend == "csrc" and cu_seqlens is None:  # the compiled kernels cover the dense layout
        dtype = _result_dtype(x, pos_embed, cls_token)
        return torch.ops.fastmim.csrc_gather_visible(x.contiguous(), ids_keep.contiguous(), _as_dtype(pos_embed, dtype),
                                                     _as_dtype(cls_token, dtype))
    if backend == "triton":
        from fastmim.kernels import token_ops as kernels

        return kernels.gather_visible_forward(
            x, ids_keep.contiguous(), None if pos_embed is None else pos_embed.contiguous(),
            None if cls_token is None else cls_token.contiguous(),
            None if cu_seqlens is None else cu_seqlens.contiguous(), max_seqlen,
            _result_dtype(x, pos_embed, cls_token))
    out = _gather_visible_eager(x, ids_keep, pos_embed, cls_token, cu_seqlens)
    return out.to(_result_dtype(x, pos_embed, cls_token)).contiguous()


@_gather_visible_op.register_fake
def _(x, ids_keep, pos_embed, cls_token, cu_seqlens, max_seqlen):
    B, L, D = x.shape
    has_cls = cls_token is not None
    dtype = _result_dtype(x, pos_embed, cls_token)
    if cu_seqlens is None:
        return x.new_empty((B, ids_keep.shape[1] + has_cls, D), dtype=dtype)
    return x.new_empty((ids_keep.shape[0] + B * has_cls, D), dtype=dtype)


def _accumulation(grad: Tensor) -> Tensor:
    """``grad`` in the dtype its sums accumulate in: fp32, or fp64 for a float64 gradient."""
    return grad.to(torch.promote_types(grad.dtype, torch.float32))


def _gather_visible_backward_reference(grad_out: Tensor, ids_keep: Tensor, cu_seqlens: Tensor | None,
                                       num_patches: int, has_cls: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x (B, L, D), grad_pos_patches (L, D), grad_cls (D,))`` in the accumulation dtype."""
    D = grad_out.shape[-1]
    g = _accumulation(grad_out)
    ids = ids_keep.long()
    if cu_seqlens is None:
        B = g.shape[0]
        grad_cls = g[:, 0].sum(0) if has_cls else g.new_zeros(D)
        rows = g[:, int(has_cls):]
        grad_x = g.new_zeros((B, num_patches, D)).scatter_add_(1, ids[..., None].expand(-1, -1, D), rows)
    else:
        B = cu_seqlens.shape[0] - 1
        batch_of_row, _ = _varlen_rows(cu_seqlens, ids.shape[0])
        rows = g[torch.arange(ids.shape[0], device=g.device) + batch_of_row * int(has_cls) + int(has_cls)]
        cls_rows = cu_seqlens[:-1].long() + torch.arange(B, device=g.device)
        grad_cls = g[cls_rows].sum(0) if has_cls else g.new_zeros(D)
        grad_x = g.new_zeros((B, num_patches, D)).index_put_((batch_of_row, ids), rows, accumulate=True)
    return grad_x, grad_x.sum(0), grad_cls


@torch.library.custom_op("fastmim::gather_visible_backward", mutates_args=())
def _gather_visible_backward_op(grad_out: Tensor, ids_keep: Tensor, cu_seqlens: Tensor | None, max_seqlen: int,
                                batch: int, num_patches: int, has_cls: bool, pos_rows: int,
                                x_dtype: torch.dtype, pos_dtype: torch.dtype, cls_dtype: torch.dtype,
                                need_x: bool, need_pos: bool, need_cls: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_x (B, L, D), grad_pos (pos_rows, D), grad_cls (D,))``; an unneeded one is empty."""
    L, D = num_patches, grad_out.shape[-1]
    need_pos = need_pos and pos_rows > 0
    need_cls_sum = has_cls and (need_cls or (need_pos and pos_rows == L + 1))
    backend = _kernel_backend("gather_visible", grad_out.device, grad_out)
    if backend == "csrc" and cu_seqlens is None:
        grad_x, grad_pos_patch, grad_cls = torch.ops.fastmim.csrc_gather_visible_backward(
            grad_out.contiguous(), ids_keep.contiguous(), L, has_cls, need_x, need_pos, need_cls_sum)
        grad_x = grad_x.to(x_dtype) if need_x else None
    elif backend == "triton":
        from fastmim.kernels import token_ops as kernels

        grad_x, grad_pos_patch = kernels.gather_visible_backward(
            grad_out, ids_keep.contiguous(), None if cu_seqlens is None else cu_seqlens.contiguous(), max_seqlen,
            batch, L, has_cls, x_dtype if need_x else None, need_pos)
        grad_cls = None
        if need_cls_sum:
            if cu_seqlens is None:
                cls_rows = grad_out[:, 0]
            else:
                # Clamped like the kernels' masks: offsets on a device are not checked against the
                # packed length, and an out-of-range index would be a device-side assert.
                rows = cu_seqlens[:-1].long() + torch.arange(batch, device=grad_out.device)
                cls_rows = grad_out[rows.clamp(0, grad_out.shape[0] - 1)]
            grad_cls = cls_rows.float().sum(0)
    else:
        grad_x, grad_pos_patch, grad_cls = _gather_visible_backward_reference(grad_out, ids_keep, cu_seqlens, L,
                                                                               has_cls)
        grad_x = grad_x.to(x_dtype) if need_x else None
    empty = grad_out.new_empty(0)
    if need_pos:
        if pos_rows == L + 1:
            slot = grad_cls if has_cls else grad_pos_patch.new_zeros(D)
            grad_pos_patch = torch.cat([slot[None], grad_pos_patch])
        grad_pos = grad_pos_patch.to(pos_dtype)
    else:
        grad_pos = empty
    return (grad_x if need_x else empty, grad_pos,
            grad_cls.to(cls_dtype) if (need_cls and has_cls) else grad_out.new_empty(0))


@_gather_visible_backward_op.register_fake
def _(grad_out, ids_keep, cu_seqlens, max_seqlen, batch, num_patches, has_cls, pos_rows, x_dtype, pos_dtype,
      cls_dtype, need_x, need_pos, need_cls):
    D = grad_out.shape[-1]
    empty = grad_out.new_empty(0)
    return (grad_out.new_empty((batch, num_patches, D), dtype=x_dtype) if need_x else empty,
            grad_out.new_empty((pos_rows, D), dtype=pos_dtype) if (need_pos and pos_rows > 0) else empty,
            grad_out.new_empty((D,), dtype=cls_dtype) if (need_cls and has_cls) else grad_out.new_empty(0))


def _gather_visible_setup(ctx, inputs, output):
    x, ids_keep, pos_embed, cls_token, cu_seqlens, max_seqlen = inputs
    ctx.save_for_backward(ids_keep, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.batch, ctx.num_patches = x.shape[0], x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.pos_rows = 0 if pos_embed is None else pos_embed.shape[0]
    ctx.pos_dtype = x.dtype if pos_embed is None else pos_embed.dtype
    ctx.has_cls = cls_token is not None
    ctx.cls_dtype = x.dtype if cls_token is None else cls_token.dtype


def _gather_visible_backward(ctx, grad_out):
    ids_keep, cu_seqlens = ctx.saved_tensors
    need_x, _, need_pos, need_cls = ctx.needs_input_grad[:4]
    grad_x, grad_pos, grad_cls = torch.ops.fastmim.gather_visible_backward(
        grad_out, ids_keep, cu_seqlens, ctx.max_seqlen, ctx.batch, ctx.num_patches, ctx.has_cls, ctx.pos_rows,
        ctx.x_dtype, ctx.pos_dtype, ctx.cls_dtype, need_x, need_pos, need_cls)
    return (grad_x if need_x else None, None, grad_pos if need_pos else None, grad_cls if need_cls else None,
            None, None)


_gather_visible_op.register_autograd(_gather_visible_backward, setup_context=_gather_visible_setup)


# ============================================================================ unshuffle


def unshuffle_reference(x_visible: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor | None = None,
                        *, has_cls: bool = False, cu_seqlens: Tensor | None = None) -> Tensor:
    """The official MAE decoder's input: ``cat([x[:, 1:], mask_tokens])`` -> ``gather(ids_restore)``
    -> ``cat([x[:, :1], .])`` -> ``+ decoder_pos_embed``. Row ``i`` of sample ``b`` is the visible
    token of rank ``ids_restore[b, i]`` when that rank is below ``K`` (sample b's count), else
    ``mask_token``; then ``+ pos_embed``. Index values are checked as by :func:`unshuffle` (same
    ``ValueError``).
    """
    _check_unshuffle_values(x_visible, ids_restore, cu_seqlens, has_cls)
    return _unshuffle_eager(x_visible, ids_restore, mask_token, pos_embed, has_cls, cu_seqlens)


def _unshuffle_eager(x_visible: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor | None,
                     has_cls: bool, cu_seqlens: Tensor | None) -> Tensor:
    """:func:`unshuffle_reference` on index values already checked (by the public op)."""
    B, L = ids_restore.shape
    D = x_visible.shape[-1]
    hc = int(has_cls)
    pos = None if pos_embed is None else pos_embed.reshape(pos_embed.shape[-2], D)
    pos_cls, pos_patch = _pos_rows(pos, L)
    ids = ids_restore.long()
    mask_token = mask_token.reshape(D)
    if cu_seqlens is None:
        cls, patches = x_visible[:, :hc], x_visible[:, hc:]
        K = patches.shape[1]
        mask_tokens = mask_token.reshape(1, 1, D).expand(B, L - K, D)
        x_ = torch.cat([patches, mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids[..., None].expand(-1, -1, D))
    else:
        counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        starts = cu_seqlens[:-1].long() + torch.arange(B, device=ids.device) * hc
        cls = x_visible[starts][:, None] if has_cls else None
        visible = ids < counts[:, None]
        dtype = torch.promote_types(x_visible.dtype, mask_token.dtype)
        # Only the visible positions index x_visible, which has no row at all when nothing is kept.
        x_ = mask_token.to(dtype).expand(B, L, D).clone()
        x_[visible] = x_visible[(starts[:, None] + hc + ids)[visible]].to(dtype)
    if pos_patch is not None:
        x_ = x_ + pos_patch
    if not has_cls:
        return x_
    if pos_cls is not None:
        cls = cls + pos_cls
    dtype = torch.promote_types(x_.dtype, cls.dtype)
    return torch.cat([cls.to(dtype), x_.to(dtype)], dim=1)


def unshuffle(x_visible: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor | None = None, *,
              has_cls: bool = False, cu_seqlens: Tensor | None = None) -> Tensor:
    """The decoder's full-length sequence: visible tokens back at their patch positions,
    ``mask_token`` at the masked ones, ``+ pos_embed``; one pass.

    Args:
        x_visible: ``(B, K + has_cls, D)`` (cls row first when ``has_cls``); or, with
            ``cu_seqlens``, packed ``(T + B * has_cls, D)`` as :func:`gather_visible` returns it.
            Any strides (read in place by the Triton kernels, copied to a contiguous tensor by
            the csrc backend).
        ids_restore: ``(B, L)`` int64/int32, from :func:`random_masking`: each row a permutation
            of ``0..L-1``.
        mask_token: ``(D,)`` / ``(1, D)`` / ``(1, 1, D)``.
        pos_embed: optional ``(L, D)`` / ``(1, L, D)``, or ``(L + 1, D)`` / ``(1, L + 1, D)`` with a
            leading cls slot (the official ``decoder_pos_embed`` as is).
        has_cls: ``x_visible`` carries a cls row first; it is passed through (+ the cls slot).
        cu_seqlens: ``(B + 1,)`` int32/int64 offsets of the per-sample visible counts (packed
            varlen input): ``cu_seqlens[0] = 0``, non-decreasing, every count at most ``L``,
            ``cu_seqlens[-1] = T``.

    Returns:
        ``(B, L + has_cls, D)``: ``out[b, has_cls + i] = x_visible[b, has_cls + ids_restore[b, i]]``
        if ``ids_restore[b, i] < K`` else ``mask_token``, ``+ pos_embed[i]``; ``out[b, 0] =
        x_visible[b, 0] + pos_embed[cls slot]``. dtype: promotion of x_visible, mask_token,
        pos_embed. Equals the official MAE decoder's chain bit for bit.

    Index values are checked on the host, on an accelerator under
    :func:`~fastmim.ops.check_indices`; unchecked, an out-of-range rank gives a zero token (see
    the module doc).

    Backward: ``x_visible`` gets the gradient of its row, ``mask_token`` the sum over masked
    positions, ``pos_embed`` the sum over samples (fp32 accumulation, deterministic).
    """
    _check_float("x_visible", x_visible)
    device = x_visible.device
    ids_restore = _check_index("ids_restore", ids_restore, 2, device)
    B, L = ids_restore.shape
    if not isinstance(has_cls, bool):
        raise TypeError(f"has_cls must be a bool, got {type(has_cls).__name__}")
    if cu_seqlens is None:
        if x_visible.dim() != 3 or x_visible.shape[0] != B or not has_cls <= x_visible.shape[1] <= L + has_cls:
            raise ValueError(f"x_visible must have shape (B, K{' + 1' if has_cls else ''}, D) with B = {B} and "
                             f"K <= L = {L} (ids_restore is {tuple(ids_restore.shape)}), got {tuple(x_visible.shape)}")
    else:
        cu_seqlens = _check_varlen(cu_seqlens, B, device)
        if x_visible.dim() != 2 or x_visible.shape[0] < B * has_cls:
            raise ValueError(f"with cu_seqlens, x_visible must be packed (T{' + B' if has_cls else ''}, D) with "
                             f"B = {B}, got shape {tuple(x_visible.shape)}")
    _check_unshuffle_values(x_visible, ids_restore, cu_seqlens, has_cls)
    D = x_visible.shape[-1]
    mask_token = _token_1d("mask_token", mask_token, D, device)
    pos = _pos_2d(pos_embed, L, D, device)
    return torch.ops.fastmim.unshuffle(x_visible, ids_restore, mask_token, pos, cu_seqlens, has_cls)


@torch.library.custom_op("fastmim::unshuffle", mutates_args=())
def _unshuffle_op(x_visible: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor | None,
                  cu_seqlens: Tensor | None, has_cls: bool) -> Tensor:
    dtype = _result_dtype(x_visible, mask_token, pos_embed)
    backend = _kernel_backend("unshuffle", x_visible.device, x_visible, mask_token, pos_embed)
    if backend == "csrc" and cu_seqlens is None:  # the compiled kernels cover the dense layout
        return torch.ops.fastmim.csrc_unshuffle(x_visible.contiguous(), ids_restore.contiguous(),
                                                _as_dtype(mask_token, dtype), _as_dtype(pos_embed, dtype), has_cls)
    if backend == "triton":
        from fastmim.kernels import token_ops as kernels

        return kernels.unshuffle_forward(
            x_visible, ids_restore.contiguous(), mask_token.contiguous(),
            None if pos_embed is None else pos_embed.contiguous(),
            None if cu_seqlens is None else cu_seqlens.contiguous(), has_cls, dtype)
    out = _unshuffle_eager(x_visible, ids_restore, mask_token, pos_embed, has_cls, cu_seqlens)
    return out.to(dtype).contiguous()


@_unshuffle_op.register_fake
def _(x_visible, ids_restore, mask_token, pos_embed, cu_seqlens, has_cls):
    B, L = ids_restore.shape
    return x_visible.new_empty((B, L + has_cls, x_visible.shape[-1]),
                               dtype=_result_dtype(x_visible, mask_token, pos_embed))


def _unshuffle_backward_reference(grad_out: Tensor, ids_restore: Tensor, cu_seqlens: Tensor | None,
                                  visible_rows: int, has_cls: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x_visible, grad_mask_token (D,), grad_pos (L + has_cls, D))`` in the accumulation dtype."""
    B, L = ids_restore.shape
    D = grad_out.shape[-1]
    hc = int(has_cls)
    g = _accumulation(grad_out)
    ids = ids_restore.long()
    g_patch = g[:, hc:]
    if cu_seqlens is None:
        counts = torch.full((B,), visible_rows - hc, dtype=torch.int64, device=g.device)
        starts = torch.arange(B, device=g.device) * visible_rows
    else:
        counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        starts = cu_seqlens[:-1].long() + torch.arange(B, device=g.device) * hc
    visible = ids < counts[:, None]
    grad_mask = g_patch[~visible].sum(0)
    # Only the visible positions index grad_x, which has no row at all when nothing is kept.
    grad_x = g.new_zeros((B * visible_rows if cu_seqlens is None else visible_rows, D))
    grad_x.index_put_(((starts[:, None] + hc + ids)[visible],), g_patch[visible], accumulate=True)
    if has_cls:
        grad_x[starts] += g[:, 0]
    if cu_seqlens is None:
        grad_x = grad_x.reshape(B, visible_rows, D)
    return grad_x, grad_mask, g.sum(0)


@torch.library.custom_op("fastmim::unshuffle_backward", mutates_args=())
def _unshuffle_backward_op(grad_out: Tensor, ids_restore: Tensor, cu_seqlens: Tensor | None, visible_rows: int,
                           has_cls: bool, pos_rows: int, x_dtype: torch.dtype, mask_dtype: torch.dtype,
                           pos_dtype: torch.dtype, need_x: bool, need_mask: bool,
                           need_pos: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_x_visible, grad_mask_token (D,), grad_pos (pos_rows, D))``; an unneeded one is empty."""
    L = ids_restore.shape[1]
    need_pos = need_pos and pos_rows > 0
    backend = _kernel_backend("unshuffle", grad_out.device, grad_out)
    if backend == "csrc" and cu_seqlens is None:
        grad_x, grad_mask, grad_pos = torch.ops.fastmim.csrc_unshuffle_backward(
            grad_out.contiguous(), ids_restore.contiguous(), visible_rows - int(has_cls), has_cls, need_x, need_mask,
            need_pos)
    elif backend == "triton":
        from fastmim.kernels import token_ops as kernels

        grad_x, grad_mask, grad_pos = kernels.unshuffle_backward(
            grad_out, ids_restore.contiguous(), None if cu_seqlens is None else cu_seqlens.contiguous(),
            visible_rows, has_cls, x_dtype if need_x else None, need_mask, need_pos)
    else:
        grad_x, grad_mask, grad_pos = _unshuffle_backward_reference(grad_out, ids_restore, cu_seqlens,
                                                                    visible_rows, has_cls)
    empty = grad_out.new_empty(0)
    if need_pos:  # grad_pos rows follow the output rows (cls row first when has_cls): map to pos rows
        if pos_rows == L + 1 and not has_cls:
            grad_pos = torch.cat([grad_pos.new_zeros((1, grad_pos.shape[1])), grad_pos])
        elif pos_rows == L and has_cls:
            grad_pos = grad_pos[1:]
        grad_pos = grad_pos.to(pos_dtype)
    return (grad_x.to(x_dtype) if need_x else empty, grad_mask.to(mask_dtype) if need_mask else empty,
            grad_pos if need_pos else grad_out.new_empty(0))


@_unshuffle_backward_op.register_fake
def _(grad_out, ids_restore, cu_seqlens, visible_rows, has_cls, pos_rows, x_dtype, mask_dtype, pos_dtype, need_x,
      need_mask, need_pos):
    B = ids_restore.shape[0]
    D = grad_out.shape[-1]
    shape_x = (B, visible_rows, D) if cu_seqlens is None else (visible_rows, D)
    return (grad_out.new_empty(shape_x, dtype=x_dtype) if need_x else grad_out.new_empty(0),
            grad_out.new_empty((D,), dtype=mask_dtype) if need_mask else grad_out.new_empty(0),
            grad_out.new_empty((pos_rows, D), dtype=pos_dtype) if (need_pos and pos_rows > 0)
            else grad_out.new_empty(0))


def _unshuffle_setup(ctx, inputs, output):
    x_visible, ids_restore, mask_token, pos_embed, cu_seqlens, has_cls = inputs
    ctx.save_for_backward(ids_restore, cu_seqlens)
    ctx.visible_rows = x_visible.shape[0] if cu_seqlens is not None else x_visible.shape[1]
    ctx.has_cls = has_cls
    ctx.x_dtype, ctx.mask_dtype = x_visible.dtype, mask_token.dtype
    ctx.pos_rows = 0 if pos_embed is None else pos_embed.shape[0]
    ctx.pos_dtype = x_visible.dtype if pos_embed is None else pos_embed.dtype


def _unshuffle_backward(ctx, grad_out):
    ids_restore, cu_seqlens = ctx.saved_tensors
    need_x, _, need_mask, need_pos = ctx.needs_input_grad[:4]
    grad_x, grad_mask, grad_pos = torch.ops.fastmim.unshuffle_backward(
        grad_out, ids_restore, cu_seqlens, ctx.visible_rows, ctx.has_cls, ctx.pos_rows, ctx.x_dtype, ctx.mask_dtype,
        ctx.pos_dtype, need_x, need_mask, need_pos)
    return (grad_x if need_x else None, None, grad_mask if need_mask else None, grad_pos if need_pos else None,
            None, None)


_unshuffle_op.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)
