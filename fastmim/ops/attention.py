"""``visible_attention``: flash attention over visible tokens, and the attention backend choice.

Three modes (all non-causal, softmax scale ``D**-0.5`` unless given):

- **dense**: ``q (B, H, Nq, D)``, ``k, v (B, H, Nk, D)`` -> ``(B, H, Nq, D)``.
- **varlen packed**: ``q, k, v (T, H, D)`` with ``cu_seqlens (B+1,)`` int32 (sequence ``b`` is rows
  ``cu_seqlens[b]:cu_seqlens[b+1]`` and attends only to itself) and ``max_seqlen``, a Python int
  bound on the sequence lengths, so the kernels never need ``cu_seqlens`` on the host (no sync,
  and ``torch.compile`` traces the op). ``cu_seqlens`` must start at 0, be non-decreasing, end at
  ``T``, and no sequence may be longer than ``max_seqlen``. A sequence of length 0 has no rows
  and changes nothing else.
- **key-visibility**: ``q, k, v (B, H, L, D)`` with ``key_visible``, either a boolean mask
  ``(B, L)`` (True = visible) or an integer index set ``(B, K)`` of key positions in ``[0, L)``,
  each at most once per row (the reference and SDPA read the set as a mask, the kernel would
  count a repeated key twice). Every query attends only to its sample's visible keys; no gathered
  copy of ``k``/``v`` is made (the kernel reads the visible rows in place). Keys that are not
  visible get zero gradient.

The values of ``cu_seqlens`` (with ``max_seqlen``) and of an integer ``key_visible`` follow the
policy of :mod:`fastmim.ops._validate`, once per call in the public functions before any backend
runs: host tensors are always checked (``ValueError`` naming the argument, the first bad position
and the valid range), accelerator tensors only under :func:`fastmim.ops.check_indices` or
``FASTMIM_CHECK_INDICES=1``. Unchecked, the kernels stay inside their tensors whatever the values:
offsets are clamped to ``[0, T]``, an out-of-range key id is a key that is not visible (nothing
read, no gradient), and output rows that no sequence within ``max_seqlen`` covers are left
unwritten: wrong values, never an access outside a tensor.

An empty batch (``B = 0``: dense ``q (0, H, N, D)``, or varlen ``cu_seqlens = [0]`` with ``T = 0``)
gives an empty output and lse on every backend.

:func:`visible_attention_qkvpacked` runs the dense and varlen modes on a ViT's packed qkv
projection, ``(B, N, 3, H, D)`` or ``(T, 3, H, D)``, returning ``(B, N, H, D)`` / ``(T, H, D)``: the
same kernels on views, with no copy on the way in, out or back (one ``dqkv`` buffer).

A query whose visible key set is empty (a boolean mask row with no True, an index set with
``K = 0``, a varlen sequence of length 0 has no queries) gets output **0** and
``lse = -inf``, and contributes **zero** gradient to q, k and v (no NaN).

Backends inside the op (see :mod:`fastmim.ops._dispatch`): ``triton`` (``fastmim/kernels/attention.py``,
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) for fp16/bf16/fp32 and head dims up to
256; ``reference`` (plain PyTorch, fp32 math; float64 inputs always take it). Inputs whose last
dimension is not contiguous are copied once (``.contiguous()``); other strides are read as they are.

:func:`~fastmim.ops.attention_router.attention` (in :mod:`fastmim.ops.attention_router`) is the
entry point of the models' attention module: it chooses between this op, PyTorch SDPA, xformers
and the reference.
"""

from __future__ import annotations

import torch

from fastmim.ops._dispatch import select_backend
from fastmim.ops._validate import validate_attention, validate_qkv

__all__ = ["visible_attention", "visible_attention_qkvpacked", "visible_attention_reference"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_KERNEL_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Reference: the definition of the result
# ---------------------------------------------------------------------------------------------


def _split_key_visible(key_visible: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``key_visible`` -> ``(key_index, key_mask)``: a boolean tensor is a mask, an integer one an index set."""
    if key_visible is None:
        return None, None
    if key_visible.dtype == torch.bool:
        return None, key_visible
    return key_visible, None


def _varlen_allowed(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T, T) boolean: row t may attend to column u iff both lie in the same sequence."""
    rows = torch.arange(total, device=cu_seqlens.device)
    seq_id = torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)
    return seq_id[:, None] == seq_id[None, :]


def _key_mask_from(key_index: torch.Tensor | None, key_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    if key_mask is not None:
        return key_mask
    if key_index is not None:
        mask = torch.zeros(key_index.shape[0], length, dtype=torch.bool, device=key_index.device)
        return mask.scatter(1, key_index.to(torch.int64), True)
    return None


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _attention_math(q, k, v, allowed, scale):
    """Softmax attention on (B, H, N, D) tensors; ``allowed`` broadcasts to (B, H, Nq, Nk) or is None.

    ``lse_i = log sum_{j allowed} exp(s_ij)``, ``out_i = sum_{j allowed} exp(s_ij - lse_i) v_j`` with
    ``s = scale * q k^T``; a row with no allowed key has ``out_i = 0``, ``lse_i = -inf``.
    """
    s = (q @ k.transpose(-2, -1)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # No key at all (T = 0 in varlen mode) has no maximum to reduce to: every row is empty.
    row_max = s.amax(-1, keepdim=True).detach() if s.shape[-1] else s.new_full((*s.shape[:-1], 1), float("-inf"))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # empty row: exp(-inf) = 0
    e = torch.exp(s - row_max)
    denom = e.sum(-1, keepdim=True)  # >= 1 unless the row is empty
    out = (e @ v) / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    lse = (row_max + denom.log()).squeeze(-1)
    return out, lse


def _to_bhnd(q, k, v, cu_seqlens, key_index, key_mask, upcast=True):
    """Any mode as dense (B, H, N, D) math tensors plus the ``allowed`` pattern."""
    dtype = _math_dtype(q.dtype) if upcast else q.dtype
    if cu_seqlens is not None:
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0).to(dtype) for t in (q, k, v))  # (1, H, T, D)
        return q4, k4, v4, _varlen_allowed(cu_seqlens, q.shape[0])
    mask = _key_mask_from(key_index, key_mask, k.shape[2])
    allowed = None if mask is None else mask[:, None, None, :]
    return q.to(dtype), k.to(dtype), v.to(dtype), allowed


def _from_bhnd(t: torch.Tensor, varlen: bool) -> torch.Tensor:
    return t[0].transpose(0, 1) if varlen else t


def visible_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                                key_visible: torch.Tensor | None = None, scale: float | None = None,
                                return_lse: bool = False, upcast: bool = True):
    """Plain-PyTorch attention over visible tokens (fp32 math, float64 for float64 inputs).

    Same arguments as :func:`visible_attention`. ``out_i = sum_j softmax_j(scale * q_i . k_j) v_j`` over
    the keys ``j`` that query ``i`` may see (its own sequence in varlen mode, the visible keys in
    key-visibility mode); an empty key set gives ``out_i = 0`` and ``lse_i = -inf``. Returns ``out``
    (dtype of q) and, if ``return_lse``, ``lse`` (float32; (B, H, Nq), or (H, T) in varlen mode).
    ``upcast=False`` does the math in the input dtype: the error of that naive low-precision
    attention is the yardstick the tests hold the kernels to.
    """
    del max_seqlen  # only a bound for the kernels' grid
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    key_index, key_mask = _split_key_visible(key_visible)
    out, lse = _attention_math(*_to_bhnd(q, k, v, cu_seqlens, key_index, key_mask, upcast), scale)
    varlen = cu_seqlens is not None
    out = _from_bhnd(out, varlen).to(q.dtype)
    lse = (lse[0] if varlen else lse).to(torch.promote_types(torch.float32, lse.dtype))
    return (out, lse) if return_lse else out


def _reference_backward(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens, key_index, key_mask, scale):
    """The gradient, written out: ``P = exp(s - lse)``, ``dV = P^T dO``, ``dP = dO V^T``,
    ``dS = P * (dP - rowsum(dO * O) + dlse)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``."""
    varlen = cu_seqlens is not None
    q4, k4, v4, allowed = _to_bhnd(q, k, v, cu_seqlens, key_index, key_mask)
    dtype = q4.dtype
    go4, o4 = (t.transpose(0, 1).unsqueeze(0).to(dtype) if varlen else t.to(dtype) for t in (grad_out, out))
    lse4 = (lse.unsqueeze(0) if varlen else lse).to(dtype)
    lse4 = torch.where(lse4 == float("-inf"), float("inf"), lse4)  # empty row: P = 0
    p = torch.exp((q4 @ k4.transpose(-2, -1)) * scale - lse4[..., None])
    if allowed is not None:
        p = p.masked_fill(~allowed, 0.0)
    delta = (go4 * o4).sum(-1)
    if grad_lse is not None:
        delta = delta - (grad_lse.unsqueeze(0) if varlen else grad_lse).to(dtype)
    ds = p * (go4 @ v4.transpose(-2, -1) - delta[..., None])
    dq, dk, dv = (ds @ k4) * scale, (ds.transpose(-2, -1) @ q4) * scale, p.transpose(-2, -1) @ go4
    return tuple(_from_bhnd(g, varlen).to(t.dtype) for g, t in zip((dq, dk, dv), (q, k, v), strict=True))


def _unpack_qkv(qkv: torch.Tensor, varlen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` views: ``(B, N, 3, H, D)`` -> ``(B, H, N, D)`` each, ``(T, 3, H, D)`` -> ``(T, H, D)``."""
    return qkv.unbind(1) if varlen else qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _token_major_swap(t: torch.Tensor, varlen: bool) -> torch.Tensor:
    """``(B, N, H, D)`` <-> ``(B, H, N, D)``, a view either way (varlen ``(T, H, D)`` as it is)."""
    return t if varlen else t.transpose(1, 2)


def _packed_out_shape(qkv: torch.Tensor) -> tuple[int, ...]:
    return (*qkv.shape[:-3], *qkv.shape[-2:])


def _packed_lse_shape(qkv: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    heads = qkv.shape[-2]
    return (heads, qkv.shape[0]) if varlen else (qkv.shape[0], heads, qkv.shape[1])


# ---------------------------------------------------------------------------------------------
# Registered ops (torch.library): each forward returns (out, lse); each backward is an op too
# ---------------------------------------------------------------------------------------------


def _backend_for(q: torch.Tensor) -> str:
    if q.dtype not in _KERNEL_DTYPES or q.shape[-1] > _MAX_KERNEL_HEAD_DIM:
        return "reference"
    return select_backend("visible_attention", q.device, implemented=("reference", "triton"))


@torch.library.custom_op("fastmim::visible_attention", mutates_args=())
def _visible_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                          key_index: torch.Tensor | None, key_mask: torch.Tensor | None, max_seqlen: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend_for(q) == "triton":
        from fastmim.kernels.attention import attention_forward

        return attention_forward(q, k, v, scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                 key_index=key_index, key_mask=key_mask)
    out, lse = _attention_math(*_to_bhnd(q, k, v, cu_seqlens, key_index, key_mask), scale)
    varlen = cu_seqlens is not None
    return _from_bhnd(out, varlen).to(q.dtype).contiguous(), (lse[0] if varlen else lse).contiguous()


@_visible_attention_op.register_fake
def _(q, k, v, cu_seqlens, key_index, key_mask, max_seqlen, scale):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else q.shape[:3]
    lse = q.new_empty(lse_shape, dtype=_math_dtype(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("fastmim::visible_attention_backward", mutates_args=())
def _visible_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None,
                                   cu_seqlens: torch.Tensor | None, key_index: torch.Tensor | None,
                                   key_mask: torch.Tensor | None, max_seqlen: int,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _backend_for(q) == "triton":
        from fastmim.kernels.attention import attention_backward

        return attention_backward(grad_out.contiguous(), q, k, v, out, lse, scale, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen, key_index=key_index, key_mask=key_mask, grad_lse=grad_lse)
    grads = _reference_backward(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens, key_index, key_mask, scale)
    return tuple(g.contiguous() for g in grads)


@_visible_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens, key_index, key_mask, max_seqlen, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.custom_op("fastmim::visible_attention_qkvpacked", mutates_args=())
def _qkvpacked_op(qkv: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens is not None
    q, k, v = _unpack_qkv(qkv, varlen)
    if _backend_for(q) == "triton":
        from fastmim.kernels.attention import attention_qkvpacked_forward

        return attention_qkvpacked_forward(qkv, scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    out, lse = _attention_math(*_to_bhnd(q, k, v, cu_seqlens, None, None), scale)
    out = _from_bhnd(out, varlen).to(qkv.dtype)
    return _token_major_swap(out, varlen).contiguous(), (lse[0] if varlen else lse).contiguous()


@_qkvpacked_op.register_fake
def _(qkv, cu_seqlens, max_seqlen, scale):
    lse = qkv.new_empty(_packed_lse_shape(qkv, cu_seqlens is not None), dtype=_math_dtype(qkv.dtype))
    return qkv.new_empty(_packed_out_shape(qkv)), lse


@torch.library.custom_op("fastmim::visible_attention_qkvpacked_backward", mutates_args=())
def _qkvpacked_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           grad_lse: torch.Tensor | None, cu_seqlens: torch.Tensor | None, max_seqlen: int,
                           scale: float) -> torch.Tensor:
    varlen = cu_seqlens is not None
    q, k, v = _unpack_qkv(qkv, varlen)
    grad_out = grad_out.contiguous()  # (B, N, H, D) as the reshape before the projection gives it: no copy
    if _backend_for(q) == "triton":
        from fastmim.kernels.attention import attention_qkvpacked_backward

        return attention_qkvpacked_backward(grad_out, qkv, out, lse, scale, cu_seqlens=cu_seqlens,
                                            max_seqlen=max_seqlen, grad_lse=grad_lse)
    grads = _reference_backward(_token_major_swap(grad_out, varlen), q, k, v, _token_major_swap(out, varlen), lse,
                                grad_lse, cu_seqlens, None, None, scale)
    return torch.stack([_token_major_swap(g, varlen) for g in grads], dim=-3).contiguous()


@_qkvpacked_backward_op.register_fake
def _(grad_out, qkv, out, lse, grad_lse, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Autograd rules
# ---------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, key_index, key_mask, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, key_index, key_mask)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, key_index, key_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fastmim.visible_attention_backward(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens,
                                                              key_index, key_mask, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("fastmim::visible_attention", _backward, setup_context=_setup_context)


def _qkvpacked_setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.set_materialize_grads(False)


def _qkvpacked_backward(ctx, grad_out, grad_lse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dqkv = torch.ops.fastmim.visible_attention_qkvpacked_backward(grad_out, qkv, out, lse, grad_lse, cu_seqlens,
                                                                  ctx.max_seqlen, ctx.scale)
    return dqkv, None, None, None


torch.library.register_autograd("fastmim::visible_attention_qkvpacked", _qkvpacked_backward,
                                setup_context=_qkvpacked_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions (arguments checked by fastmim.ops._validate)
# ---------------------------------------------------------------------------------------------


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _visible_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`visible_attention` on validated arguments: ``(out, lse)``."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    key_index, key_mask = _split_key_visible(key_visible)
    if key_index is not None:
        key_index = key_index.contiguous()
    if key_mask is not None:
        key_mask = key_mask.contiguous()
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _visible_attention_op(q, k, v, cu_seqlens, key_index, key_mask, 0 if max_seqlen is None else max_seqlen,
                                 scale)


def visible_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                      max_seqlen: int | None = None, key_visible: torch.Tensor | None = None,
                      scale: float | None = None, return_lse: bool = False):
    """Flash attention over visible tokens (dense, varlen packed, or key-visibility; see the module doc).

    Args:
        q, k, v: ``(B, H, N, D)`` (dense / key-visibility; k, v may have another length ``Nk`` when
            ``key_visible`` is None) or ``(T, H, D)`` packed with ``cu_seqlens``. fp16, bf16, fp32
            (float64 runs the reference).
        cu_seqlens: ``(B+1,)`` int32 offsets of the packed sequences.
        max_seqlen: Python int, an upper bound on the sequence lengths (required with ``cu_seqlens``).
        key_visible: bool ``(B, L)`` mask or int ``(B, K)`` index set of the keys each sample's
            queries may attend to.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scores (natural log), ``(B, H, N)`` or ``(H, T)``,
            fp32 (float64 for float64 inputs); differentiable.

    Returns ``out`` shaped like ``q`` (and ``lse``). An empty key set gives ``out = 0``, ``lse = -inf``.
    Bad values of ``cu_seqlens`` / ``key_visible`` raise ``ValueError`` (host tensors; see the module doc).
    """
    validate_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale)
    out, lse = _visible_attention(q, k, v, cu_seqlens, max_seqlen, key_visible, scale)
    return (out, lse) if return_lse else out


def _visible_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`visible_attention_qkvpacked` on validated arguments: ``(out, lse)``."""
    scale = float(qkv.shape[-1] ** -0.5 if scale is None else scale)
    return _qkvpacked_op(_unit_last_stride(qkv), cu_seqlens, 0 if max_seqlen is None else max_seqlen, scale)


def visible_attention_qkvpacked(qkv: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                                max_seqlen: int | None = None, scale: float | None = None,
                                return_lse: bool = False):
    """:func:`visible_attention` (dense or varlen) on the packed output of a qkv projection.

    Args:
        qkv: ``(B, N, 3, H, D)``, or ``(T, 3, H, D)`` packed with ``cu_seqlens`` -- the layout of
            ``linear(x).reshape(B, N, 3, H, D)``. q, k and v are read from it in place.
        cu_seqlens, max_seqlen, scale, return_lse: as for :func:`visible_attention`.

    Returns ``out`` ``(B, N, H, D)`` (varlen ``(T, H, D)``), so ``out.reshape(B, N, H * D)`` is a
    view (the input of the output projection), and ``lse`` as :func:`visible_attention` gives it.
    The backward pass writes the gradient of ``qkv`` into one buffer: autograd neither stacks three
    gradients nor copies them back through a permute. Same result as :func:`visible_attention` on
    the q, k, v views (the same kernels).
    """
    validate_qkv(qkv, cu_seqlens)
    validate_attention(*_unpack_qkv(qkv, cu_seqlens is not None), cu_seqlens, max_seqlen, None, scale)
    out, lse = _visible_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, scale)
    return (out, lse) if return_lse else out
