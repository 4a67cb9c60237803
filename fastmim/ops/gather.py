"""Gather ops of masked image modeling: the encoder's visible tokens and the decoder's full sequence.

They replace the eager chain of the official MAE (index expansion, ``gather``, ``cat`` with mask
tokens, ``gather`` again, position-embedding adds), given a masking from
:mod:`fastmim.ops.masking`:

- :func:`gather_visible`: ``x[b, ids_keep[b]] + pos_embed[ids_keep[b]]``, optionally with a
  leading cls token (``cls_token + pos_embed`` cls slot) and packed varlen output.
- :func:`unshuffle`: the decoder's full-length sequence, visible tokens back at their
  positions, ``mask_token`` elsewhere, ``+ pos_embed``; cls token passed through.

Each op has a plain-PyTorch reference (``<op>_reference``: the definition of the result, same
arguments), a Triton and a csrc implementation (``fastmim/kernels/gather.py``, ``csrc/*/token_ops.*``),
a ``torch.library`` registration (``torch.compile(fullgraph=True)`` traces through it) and an
autograd rule whose backward is itself a registered op, in this order below (argument checks:
:mod:`fastmim.ops._gather_args`).

Conventions shared by the ops:

- Shapes: ``B`` samples, ``L`` patches, ``K`` kept (visible) patches, ``D`` channels. An empty
  batch (``B = 0``) gives empty results and gradients on every backend.
- Index tensors may be int64 or int32 (dtype, shape and device checked). Their values follow
  the policy of :mod:`fastmim.ops._validate`: entries of ``ids_keep`` must be in ``[0, L)``;
  rows of ``ids_restore`` must be permutations of ``0..L-1``, as the masking ops return them
  (the un-shuffle's backward writes each visible token's gradient from the one position of
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
  ``ids_keep`` is gathered once per occurrence, its gradient summed over them, on every backend.
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

import torch
from torch import Tensor

from fastmim.ops._dispatch import select_backend
from fastmim.ops._gather_args import (
    check_float,
    check_gather_values,
    check_index,
    check_token,
    check_unshuffle_values,
    check_varlen,
    max_seqlen_of,
    pos_embed_2d,
)

__all__ = ["gather_visible", "gather_visible_reference", "unshuffle", "unshuffle_reference"]

# ============================================================================ helpers


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
    # The compiled csrc kernels (fastmim._C) are the CPU default: benchmarks/bench_gather.py
    # measured them at least as fast as the reference. float64 always runs the reference.
    backend = select_backend(op, device, implemented=("reference", "triton", "csrc"), prefer_cpu=("csrc",))
    if backend != "reference" and any(t is not None and t.dtype == torch.float64 for t in tensors):
        return "reference"
    return backend


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


def _accumulation(grad: Tensor) -> Tensor:
    """``grad`` in the dtype its sums accumulate in: fp32, or fp64 for a float64 gradient."""
    return grad.to(torch.promote_types(grad.dtype, torch.float32))


# ============================================================================ references


def gather_visible_reference(x: Tensor, ids_keep: Tensor, pos_embed: Tensor | None = None, *,
                             cls_token: Tensor | None = None, cu_seqlens: Tensor | None = None,
                             max_seqlen: int | None = None) -> Tensor:
    """``out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]]``; with ``cls_token`` a
    leading row ``cls_token + pos_embed[cls slot]`` per sample.

    Equals the official MAE encoder's ``x + pos_embed[:, 1:]`` -> ``gather(ids_keep)`` ->
    ``cat(cls_token + pos_embed[:, :1], x)``. Varlen: ``ids_keep`` packed ``(T,)``, sample b at rows
    ``cu_seqlens[b]:cu_seqlens[b+1]``; the output is packed ``(T + B * has_cls, D)`` with sample b at
    rows ``cu_seqlens[b] + b * has_cls : cu_seqlens[b+1] + (b + 1) * has_cls`` (cls row first).
    Index values (and ``max_seqlen``, when given) are checked as by :func:`gather_visible` (same
    ``ValueError``).
    """
    check_gather_values(ids_keep, x.shape[1], cu_seqlens, max_seqlen)
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


def unshuffle_reference(x_visible: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor | None = None,
                        *, has_cls: bool = False, cu_seqlens: Tensor | None = None) -> Tensor:
    """The official MAE decoder's input: ``cat([x[:, 1:], mask_tokens])`` -> ``gather(ids_restore)``
    -> ``cat([x[:, :1], .])`` -> ``+ decoder_pos_embed``. Row ``i`` of sample ``b`` is the visible
    token of rank ``ids_restore[b, i]`` when that rank is below ``K`` (sample b's count), else
    ``mask_token``; then ``+ pos_embed``. Index values are checked as by :func:`unshuffle` (same
    ``ValueError``).
    """
    check_unshuffle_values(x_visible, ids_restore, cu_seqlens, has_cls)
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


# ============================================================================ registered ops


@torch.library.custom_op("fastmim::gather_visible", mutates_args=())
def _gather_visible_op(x: Tensor, ids_keep: Tensor, pos_embed: Tensor | None, cls_token: Tensor | None,
                       cu_seqlens: Tensor | None, max_seqlen: int) -> Tensor:
    backend = _kernel_backend("gather_visible", x.device, x, pos_embed, cls_token)
    if backend == "csrc" and cu_seqlens is None:  # the compiled kernels cover the dense layout
        dtype = _result_dtype(x, pos_embed, cls_token)
        return torch.ops.fastmim.csrc_gather_visible(x.contiguous(), ids_keep.contiguous(), _as_dtype(pos_embed, dtype),
                                                     _as_dtype(cls_token, dtype))
    if backend == "triton":
        from fastmim.kernels import gather as kernels

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
        from fastmim.kernels import gather as kernels

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


@torch.library.custom_op("fastmim::unshuffle", mutates_args=())
def _unshuffle_op(x_visible: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor | None,
                  cu_seqlens: Tensor | None, has_cls: bool) -> Tensor:
    dtype = _result_dtype(x_visible, mask_token, pos_embed)
    backend = _kernel_backend("unshuffle", x_visible.device, x_visible, mask_token, pos_embed)
    if backend == "csrc" and cu_seqlens is None:  # the compiled kernels cover the dense layout
        return torch.ops.fastmim.csrc_unshuffle(x_visible.contiguous(), ids_restore.contiguous(),
                                                _as_dtype(mask_token, dtype), _as_dtype(pos_embed, dtype), has_cls)
    if backend == "triton":
        from fastmim.kernels import gather as kernels

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
        from fastmim.kernels import gather as kernels

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


# ============================================================================ autograd rules


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


def _input_grads(ctx, backward_op, *args) -> tuple[Tensor | None, ...]:
    """Gradients of the op's inputs 0, 2, 3 (of six) from ``backward_op(*args, need_0, need_2, need_3)``."""
    needs = tuple(ctx.needs_input_grad[i] for i in (0, 2, 3))
    grads = [grad if need else None for grad, need in zip(backward_op(*args, *needs), needs, strict=True)]
    return grads[0], None, grads[1], grads[2], None, None


def _gather_visible_backward(ctx, grad_out):
    ids_keep, cu_seqlens = ctx.saved_tensors
    return _input_grads(ctx, torch.ops.fastmim.gather_visible_backward, grad_out, ids_keep, cu_seqlens, ctx.max_seqlen,
                        ctx.batch, ctx.num_patches, ctx.has_cls, ctx.pos_rows, ctx.x_dtype, ctx.pos_dtype,
                        ctx.cls_dtype)


_gather_visible_op.register_autograd(_gather_visible_backward, setup_context=_gather_visible_setup)


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
    return _input_grads(ctx, torch.ops.fastmim.unshuffle_backward, grad_out, ids_restore, cu_seqlens, ctx.visible_rows,
                        ctx.has_cls, ctx.pos_rows, ctx.x_dtype, ctx.mask_dtype, ctx.pos_dtype)


_unshuffle_op.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)


# ============================================================================ public ops


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
    check_float("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got shape {tuple(x.shape)}")
    B, L, D = x.shape
    device = x.device
    if cu_seqlens is None:
        ids_keep = check_index("ids_keep", ids_keep, 2, device)
        if ids_keep.shape[0] != B or ids_keep.shape[1] > L:
            raise ValueError(f"ids_keep must have shape (B, K) with B = {B}, K <= L = {L}, got {tuple(ids_keep.shape)}")
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only for the varlen layout (with cu_seqlens)")
        max_seqlen = 0
    else:
        ids_keep = check_index("ids_keep", ids_keep, 1, device)
        cu_seqlens = check_varlen(cu_seqlens, B, device)
        max_seqlen = max_seqlen_of(cu_seqlens, max_seqlen)
    check_gather_values(ids_keep, L, cu_seqlens, max_seqlen)
    pos = pos_embed_2d(pos_embed, L, D, device)
    cls = None if cls_token is None else check_token("cls_token", cls_token, D, device)
    return torch.ops.fastmim.gather_visible(x, ids_keep, pos, cls, cu_seqlens, max_seqlen)


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
    check_float("x_visible", x_visible)
    device = x_visible.device
    ids_restore = check_index("ids_restore", ids_restore, 2, device)
    B, L = ids_restore.shape
    if not isinstance(has_cls, bool):
        raise TypeError(f"has_cls must be a bool, got {type(has_cls).__name__}")
    if cu_seqlens is None:
        if x_visible.dim() != 3 or x_visible.shape[0] != B or not has_cls <= x_visible.shape[1] <= L + has_cls:
            raise ValueError(f"x_visible must have shape (B, K{' + 1' if has_cls else ''}, D) with B = {B} and "
                             f"K <= L = {L} (ids_restore is {tuple(ids_restore.shape)}), got {tuple(x_visible.shape)}")
    else:
        cu_seqlens = check_varlen(cu_seqlens, B, device)
        if x_visible.dim() != 2 or x_visible.shape[0] < B * has_cls:
            raise ValueError(f"with cu_seqlens, x_visible must be packed (T{' + B' if has_cls else ''}, D) with "
                             f"B = {B}, got shape {tuple(x_visible.shape)}")
    check_unshuffle_values(x_visible, ids_restore, cu_seqlens, has_cls)
    D = x_visible.shape[-1]
    mask_token = check_token("mask_token", mask_token, D, device)
    pos = pos_embed_2d(pos_embed, L, D, device)
    return torch.ops.fastmim.unshuffle(x_visible, ids_restore, mask_token, pos, cu_seqlens, has_cls)
