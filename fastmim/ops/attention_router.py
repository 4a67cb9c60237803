"""The attention of the models: fastmim's ``visible_attention`` or a peer, chosen per call.

:func:`attention` / :func:`attention_qkvpacked` take ``backend`` from one vocabulary with the
other ops (:mod:`fastmim.ops._dispatch`):

- ``"triton"``: :func:`~fastmim.ops.visible_attention` on its Triton kernels (CUDA tensors, or
  CPU tensors under ``TRITON_INTERPRET=1``);
- ``"reference"``: :func:`~fastmim.ops.visible_attention_reference`;
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (varlen padded to
  ``max_seqlen``; key visibility as a boolean ``attn_mask``);
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (dense and varlen, the latter with
  a host sync to build its ``BlockDiagonalMask``); ImportError if xformers is missing;
- ``"fastmim"``: :func:`~fastmim.ops.visible_attention` with the op's own backend choice
  (Triton on CUDA, the reference on CPU; kept as the name older code passes);
- ``None``: :func:`choose_attn_backend`, which ``FASTMIM_BACKEND`` overrides when it names one
  of the above.

All backends give the same result up to rounding, including an empty key set (output 0), and
raise the same errors: the arguments are checked once, before a backend is chosen or run.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from fastmim import environment
from fastmim.ops._dispatch import forced_backend, use_backend
from fastmim.ops._validate import validate_attention, validate_qkv
from fastmim.ops.attention import (
    _key_mask_from,
    _split_key_visible,
    _token_major_swap,
    _unpack_qkv,
    _visible_attention,
    _visible_attention_qkvpacked,
    visible_attention_reference,
)

__all__ = ["ATTN_BACKENDS", "attention", "attention_qkvpacked", "choose_attn_backend", "sdpa_varlen"]

ATTN_BACKENDS = ("triton", "sdpa", "xformers", "reference", "fastmim")



def _sdpa_key_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA gives NaN for a query with no allowed key: such samples see every key, and are zeroed after."""
    nonempty = mask.any(-1, keepdim=True)
    return mask | ~nonempty, nonempty


def _varlen_pad_index(cu_seqlens: torch.Tensor, total: int, max_seqlen: int):
    """(sequence id, position in sequence) of each packed row, and the (B, max_seqlen) validity mask."""
    cu = cu_seqlens.to(torch.int64)
    rows = torch.arange(total, device=cu.device)
    seq_id = torch.searchsorted(cu[1:], rows, right=True)
    pos = rows - cu[seq_id]
    lengths = cu[1:] - cu[:-1]
    valid = torch.arange(max_seqlen, device=cu.device)[None, :] < lengths[:, None]
    return seq_id, pos, valid


def sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """Packed varlen attention through padded SDPA: pad to (B, H, max_seqlen, D), mask padded keys, unpad."""
    total, heads, dim = q.shape
    batch = cu_seqlens.numel() - 1
    seq_id, pos, valid = _varlen_pad_index(cu_seqlens, total, max_seqlen)

    def pad(t):
        return t.new_zeros(batch, max_seqlen, heads, dim).index_put((seq_id, pos), t).transpose(1, 2)

    key_mask, _ = _sdpa_key_mask(valid)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_mask[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[seq_id, pos]


def _sdpa_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale):
    if cu_seqlens is not None:
        return sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
    if key_visible is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    key_index, key_mask = _split_key_visible(key_visible)
    key_mask, nonempty = _sdpa_key_mask(_key_mask_from(key_index, key_mask, k.shape[2]))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], scale=scale)
    return out * nonempty[:, None, None, :].to(out.dtype)


def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError as exc:
        raise ImportError("attention backend 'xformers' was requested but xformers cannot be imported "
                          f"({exc}); install xformers or use backend='triton' or 'sdpa'") from exc
    return xops


def _xformers_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale):
    xops = _xformers_ops()
    if key_visible is not None:
        raise ValueError("attention backend 'xformers' does not support key_visible; use 'triton' or 'sdpa'")
    if cu_seqlens is not None:
        # BlockDiagonalMask needs the lengths on the host: a device sync (unlike backend='triton').
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        bias = xops.fmha.BlockDiagonalMask.from_seqlens(lengths)
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


_CHOICE_CACHE: dict[tuple, str] = {}


def _xformers_available() -> bool:
    try:
        _xformers_ops()
    except ImportError:
        return False
    return True


def _time_backend(backend: str, args: tuple, kwargs: dict, backward: bool, reps: int = 10) -> float:
    q, k, v = (t.detach().clone().requires_grad_(backward) for t in args)

    def step():
        out = attention(q, k, v, backend=backend, **kwargs)
        if backward:
            out.backward(torch.ones_like(out))

    for _ in range(3):
        step()
    torch.cuda.synchronize(q.device)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize(q.device)
    return (time.perf_counter() - start) / reps


def _measures_on(device: torch.device) -> bool:
    """Whether the backends are timed on ``device`` (elsewhere the choice is fixed)."""
    return device.type == "cuda"


def _choice_bucket(q, k, cu_seqlens, max_seqlen, key_visible, needs_grad) -> tuple:
    """The cache key of a measured choice: what the timing depends on, and nothing that changes per step.

    Varlen: the number of sequences and the ``max_seqlen`` bound, never the packed total ``T``, which
    moves with every batch under per-sample mask ratios (a key on it would re-time every step and
    grow the cache without bound). Key-visibility: the kind of ``key_visible``, not its ``K``.
    """
    if cu_seqlens is not None:
        mode, batch, lengths = "varlen", cu_seqlens.shape[0] - 1, (max_seqlen,)
        heads, head_dim = q.shape[1], q.shape[2]
    else:
        mode = "dense" if key_visible is None else ("keys-mask" if key_visible.dtype == torch.bool else "keys-index")
        batch, lengths = q.shape[0], (q.shape[2], k.shape[2])
        heads, head_dim = q.shape[1], q.shape[3]
    return (q.device.index, mode, batch, heads, *lengths, head_dim, q.dtype, needs_grad)


def choose_attn_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                        max_seqlen: int | None = None, key_visible: torch.Tensor | None = None,
                        scale: float | None = None) -> str:
    """The backend ``attention(..., backend=None)`` uses for these inputs.

    ``FASTMIM_BACKEND`` forces one when it names an attention backend (the deprecated
    ``FASTMIM_ATTN_BACKEND`` still does). On CPU: ``"sdpa"``. On CUDA: the fastest of ``triton``,
    ``sdpa`` (and ``xformers`` if importable and the mode is supported) measured on the first eager
    call of each bucket, like ``cudnn.benchmark``. A bucket is (device, mode, number of samples or
    sequences, heads, sequence lengths (``max_seqlen`` in varlen mode, not the packed total), head
    dim, dtype, grad): varlen batches with per-sample numbers of visible tokens share one
    measurement. While ``torch.compile`` traces, the choice is ``"triton"`` (no lookup: the cache
    is never consulted with symbolic sizes); while a CUDA graph is captured, an unmeasured bucket
    takes ``"triton"``.
    """
    forced = forced_backend()
    if forced in ATTN_BACKENDS:
        return forced
    legacy = environment.attention_backend_override()
    if legacy is not None:
        if legacy not in ATTN_BACKENDS:
            raise ValueError(f"FASTMIM_ATTN_BACKEND must be one of {ATTN_BACKENDS}, got {legacy!r}")
        return legacy
    if not _measures_on(q.device):
        return "sdpa"
    if torch.compiler.is_compiling():
        return "triton"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = _choice_bucket(q, k, cu_seqlens, max_seqlen, key_visible, needs_grad)
    if key in _CHOICE_CACHE:
        return _CHOICE_CACHE[key]
    if torch.cuda.is_current_stream_capturing():
        return "triton"
    candidates = ["triton", "sdpa"]
    if key_visible is None and _xformers_available():
        candidates.append("xformers")
    kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, key_visible=key_visible, scale=scale)
    with torch.enable_grad() if needs_grad else torch.no_grad():
        times = {}
        for backend in candidates:
            try:
                times[backend] = _time_backend(backend, (q, k, v), kwargs, needs_grad)
            except (RuntimeError, ValueError):  # e.g. an SDPA kernel missing for this dtype / head dim
                times[backend] = math.inf
    _CHOICE_CACHE[key] = min(times, key=times.get)
    return _CHOICE_CACHE[key]


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in ATTN_BACKENDS:
        raise ValueError(f"attention: backend must be one of {ATTN_BACKENDS} or None, got {backend!r}")


def _attention_on(backend, q, k, v, cu_seqlens, max_seqlen, key_visible, scale) -> torch.Tensor:
    """:func:`attention` by ``backend`` on validated arguments."""
    if backend == "triton":
        with use_backend("triton"):
            return _visible_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale)[0]
    if backend == "fastmim":
        return _visible_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale)[0]
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale)
    if backend == "xformers":
        return _xformers_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale)
    return visible_attention_reference(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                       key_visible=key_visible, scale=scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
              key_visible: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention for the models' attention module: ``q, k, v (B, H, N, D)`` -> ``(B, H, N, D)``.

    Same modes and arguments as :func:`~fastmim.ops.visible_attention` (varlen ``(T, H, D)`` with
    ``cu_seqlens`` and ``max_seqlen``; ``key_visible`` mask or index set), computed by ``backend``
    (see the module doc).

    All backends give the same result up to rounding, including an empty key set (output 0), and
    raise the same errors: the arguments are checked once, here, before a backend is chosen or run.
    """
    _check_backend(backend)
    validate_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale)
    if backend is None:
        backend = choose_attn_backend(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                      key_visible=key_visible, scale=scale)
    return _attention_on(backend, q, k, v, cu_seqlens, max_seqlen, key_visible, scale)


def attention_qkvpacked(qkv: torch.Tensor, *, backend: str | None = None, cu_seqlens: torch.Tensor | None = None,
                        max_seqlen: int | None = None, scale: float | None = None) -> torch.Tensor:
    """:func:`attention` on a packed ``qkv`` ``(B, N, 3, H, D)`` (varlen ``(T, 3, H, D)``), returning
    ``(B, N, H, D)`` (varlen ``(T, H, D)``): the models' attention module calls this.

    ``"triton"`` and ``"fastmim"`` run :func:`~fastmim.ops.visible_attention_qkvpacked` (no copy
    around the kernels); the other backends get q, k, v views and their output transposed back
    (as timm's attention does).
    """
    validate_qkv(qkv, cu_seqlens)
    _check_backend(backend)
    varlen = cu_seqlens is not None
    q, k, v = _unpack_qkv(qkv, varlen)
    validate_attention(q, k, v, cu_seqlens, max_seqlen, None, scale)
    if backend is None:
        backend = choose_attn_backend(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale)
    if backend == "triton":
        with use_backend("triton"):
            return _visible_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, scale)[0]
    if backend == "fastmim":
        return _visible_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, scale)[0]
    return _token_major_swap(_attention_on(backend, q, k, v, cu_seqlens, max_seqlen, None, scale), varlen)
