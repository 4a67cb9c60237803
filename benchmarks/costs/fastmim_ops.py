"""What the cost model charges fastmim's own ops (``fastmim::*``).

On meta a custom op runs its fake implementation, so the counter sees one op and knows
nothing of the kernels behind it: this module states, per op, the FLOPs, the HBM bytes and
the kernel launches of its GPU implementation. ``tests/test_cost_model.py`` holds each
charge to the Triton kernels: the bytes they load and store, counted in the interpreter,
within 10%, and the launches (Triton kernels plus the small aten ops around them) equal.

Where a kernel reads only part of an input (the kept rows of ``gather_visible``, the masked
patches of ``masked_patch_mse``) the charge counts that part. Small operands that every
program re-reads (a position table, a mask token) are charged once: after the first read
they come from L2.

``masked_patch_mse`` with a dense mask reads ``pred`` and the image only for patches whose
mask is non-zero, which a meta tensor cannot tell: :data:`MASKED_FRACTION` (the step's mask
ratio, set by the driver) stands for the share of such patches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from costs import counter as cm

MASKED_FRACTION = {"value": 0.75}


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else cm.addressed_bytes(t)


def _outputs(out: Any) -> int:
    return sum(_nbytes(t) for t in cm._tensors(out))


# ----------------------------------------------------------------------------- token ops
def _gather_visible_bytes(args, kwargs, out):
    x, ids_keep, pos_embed, cls_token, cu_seqlens = args[:5]
    rows, dim = ids_keep.numel(), x.shape[-1]
    total = rows * dim * x.element_size() + _nbytes(ids_keep) + _nbytes(cu_seqlens) + _outputs(out)
    if pos_embed is not None:
        total += min(rows, pos_embed.shape[-2]) * dim * pos_embed.element_size()
    return total + _nbytes(cls_token)


def _gather_visible_backward_launches(args, kwargs, out):
    grad_out, ids_keep, cu_seqlens, max_seqlen, batch, num_patches, has_cls, pos_rows = args[:8]
    x_dtype, pos_dtype, cls_dtype, need_x, need_pos, need_cls = args[8:14]
    need_pos = need_pos and pos_rows > 0
    launches = 1
    if has_cls and (need_cls or (need_pos and pos_rows == num_patches + 1)):
        launches += 1 + (cls_dtype != torch.float32 and need_cls)  # cls row sum, cast
    if need_pos:
        launches += 1 + (pos_rows == num_patches + 1) + (pos_dtype != torch.float32)  # partial sums, cat, cast
    return launches


def _unshuffle_backward_launches(args, kwargs, out):
    # one kernel, then the per-chunk partial sums of the mask-token (and pos) gradients reduced
    grad_x, grad_mask, grad_pos = (list(out) + [None, None, None])[:3]
    return 1 + sum(1 for t in (grad_mask, grad_pos) if t is not None and t.numel() > 0)


# ----------------------------------------------------------------------------- loss
def _masked_patch_mse_bytes(args, kwargs, out):
    pred, imgs, mask, ids_masked = args[:4]
    loss, grad = out
    rows, n = pred.shape[:-1].numel(), pred.shape[-1]
    read_rows = rows if ids_masked is not None else rows * MASKED_FRACTION["value"]
    elsize = imgs.element_size()
    return int(read_rows * n * (pred.element_size() + elsize) + _nbytes(mask) + _nbytes(ids_masked)
               + _nbytes(grad) + _nbytes(loss))


def _masked_patch_mse_launches(args, kwargs, out):
    mask, reduction = args[2], args[7]
    # the kernel; the mask sum the mean divides by; the sum of the per-row losses
    return 1 + (mask is not None and reduction == "mean") + (reduction != "none")


# ----------------------------------------------------------------------------- attention
def _bhnd(q: torch.Tensor, k: torch.Tensor, cu_seqlens, key_index, max_seqlen) -> tuple[tuple, tuple]:
    """q and k shapes as (B, H, N, D) for the flop formulas; packed sequences as max_seqlen each."""
    if cu_seqlens is not None:
        total, heads, dim = q.shape
        seqs = cu_seqlens.shape[0] - 1
        n = max(1, total // max(1, seqs))
        n_k = key_index.shape[-1] if key_index is not None else n
        return (seqs, heads, n, dim), (seqs, heads, n_k, dim)
    batch, heads, n, dim = q.shape  # the op's dense layout is (B, H, N, D)
    n_k = key_index.shape[-1] if key_index is not None else k.shape[2]
    return (batch, heads, n, dim), (batch, heads, n_k, dim)


def _attention_flops(args, kwargs, out):
    q, k, v, cu_seqlens, key_index, key_mask, max_seqlen = args[:7]
    q_shape, k_shape = _bhnd(q, k, cu_seqlens, key_index, max_seqlen)
    return sdpa_flop_count(q_shape, k_shape, k_shape)


def _attention_backward_flops(args, kwargs, out):
    grad_out, q, k, v, o, lse, grad_lse, cu_seqlens, key_index, key_mask, max_seqlen = args[:11]
    q_shape, k_shape = _bhnd(q, k, cu_seqlens, key_index, max_seqlen)
    return sdpa_backward_flop_count(q_shape, q_shape, k_shape, k_shape)


def _attention_backward_launches(args, kwargs, out):
    """One kernel when every key fits one key block of the backward (short sequences: up to 128 keys, 256
    at head dims up to 32), else three: delta = rowsum(dO * O), dK and dV per key block, dQ per query
    block (the launcher's own rule)."""
    grad_out, q, k, v, o, lse, grad_lse, cu_seqlens, key_index, key_mask, max_seqlen = args[:11]
    q_shape, k_shape = _bhnd(q, k, cu_seqlens, key_index, max_seqlen)
    n_q = max_seqlen if cu_seqlens is not None else q_shape[2]
    n_k = max_seqlen if cu_seqlens is not None else k_shape[2]
    try:
        from fastmim.kernels.attention import _bwd_blocks
    except ImportError:  # triton missing: assume the long-sequence path
        return 3
    block_n = _bwd_blocks(q_shape[3], n_q, n_k, q.dtype == torch.float32)["dkdv_n"]
    return 1 if n_k <= block_n and grad_lse is None else 3


def _attention_backward_bytes(args, kwargs, out):
    """Fused path: each operand once. Three-kernel path: each kernel reads its own operands once
    (a head's slice stays in L2 across that kernel's blocks), so Q, K, V, dO, lse and delta are read
    by both the dK/dV and the dQ kernel."""
    if _attention_backward_launches(args, kwargs, out) == 1:
        return cm.op_bytes_generic(args, kwargs, out, "visible_attention_backward")
    grad_out, q, k, v, o, lse = args[:6]
    dq, dk, dv = out
    delta = _nbytes(lse)
    operands = _nbytes(q) + _nbytes(k) + _nbytes(v) + _nbytes(grad_out) + _nbytes(lse) + delta
    return (_nbytes(o) + _nbytes(grad_out) + delta) + (operands + _nbytes(dk) + _nbytes(dv)) + (operands + _nbytes(dq))


def _flash_backward_bytes(args, kwargs, out):
    """PyTorch's FlashAttention-2 backward: delta = rowsum(dO * O); one kernel for dK, dV with dQ
    accumulated in fp32; dQ converted to the input dtype."""
    grad_out, q, k, v, o, lse = args[:6]
    dq, dk, dv = out[:3]
    delta = _nbytes(lse)
    dq_accum = q.numel() * 4
    return ((_nbytes(o) + _nbytes(grad_out) + delta)
            + (_nbytes(q) + _nbytes(k) + _nbytes(v) + _nbytes(grad_out) + _nbytes(lse) + delta
               + _nbytes(dk) + _nbytes(dv) + dq_accum)
            + (dq_accum + _nbytes(dq)))


# The packed-qkv ops run the same kernels on views of one qkv tensor: charged as the unpacked ops.
def _unpacked_forward(args):
    qkv, cu_seqlens, max_seqlen = args[:3]
    from fastmim.ops.attention import _unpack_qkv

    return (*_unpack_qkv(qkv, cu_seqlens is not None), cu_seqlens, None, None, max_seqlen)


def _unpacked_backward(args, out):
    grad_out, qkv, o, lse, grad_lse, cu_seqlens, max_seqlen = args[:7]
    from fastmim.ops.attention import _token_major_swap, _unpack_qkv

    varlen = cu_seqlens is not None
    return ((_token_major_swap(grad_out, varlen), *_unpack_qkv(qkv, varlen), _token_major_swap(o, varlen), lse,
             grad_lse, cu_seqlens, None, None, max_seqlen), _unpack_qkv(out, varlen))


def _charged_as_unpacked_backward(formula):
    def charge(args, kwargs, out):
        unpacked_args, unpacked_out = _unpacked_backward(args, out)
        return formula(unpacked_args, kwargs, unpacked_out)
    return charge


# ----------------------------------------------------------------------------- norm_act (the single-pass row ops)
def _rows_cols(x: torch.Tensor) -> tuple[int, int]:
    return x.numel() // max(1, x.shape[-1]), x.shape[-1]


def _layer_norm_backward_bytes(args, kwargs, out):
    """Each operand once (weight from cache after the first program), plus the per-program fp32
    partial sums of dweight and dbias the kernel writes. Their reduction (one ``torch.sum``,
    charged as a launch) re-reads those partials: 2 x programs x C x 4 bytes, at most 1.6 MB a
    call at C = 768, left out of the bytes (well under 1% of the call)."""
    x = args[1]
    rows, cols = _rows_cols(x)
    try:
        from fastmim.kernels.norm_act import layer_norm_backward_programs
    except ImportError:  # triton missing: the launcher's rule
        def layer_norm_backward_programs(n):
            return max(1, min(n, 256))
    return cm.op_bytes_generic(args, kwargs, out, "layer_norm_backward") + 2 * layer_norm_backward_programs(
        rows) * cols * 4


def _bias_gelu_backward_bytes(args, kwargs, out):
    """Each operand once, plus the per-row-program fp32 partial sums of dbias (see above)."""
    x = args[1]
    rows, cols = _rows_cols(x)
    try:
        from fastmim.kernels.norm_act import bias_gelu_blocks
    except ImportError:
        return cm.op_bytes_generic(args, kwargs, out, "bias_gelu_backward")
    return cm.op_bytes_generic(args, kwargs, out, "bias_gelu_backward") + bias_gelu_blocks(rows, cols)[2] * cols * 4


# ----------------------------------------------------------------------------- fused_block (the fused GEMMs)
# Each operand once, each output once (the generic rule): a GEMM re-reads its A and B tiles from L2
# across its programs, as cuBLAS's do (charged the same way). The per-tile row statistics (12 bytes a
# 64-column tile), the LayerNorm backward's fp32 partial sums and their reduction in the weight-gradient
# launch are operands and outputs like any other. FLOPs: the product's 2 * M * N * K; the prologue and
# epilogue arithmetic (LayerNorm, GELU and its derivative, the statistics) counts none.
def _gemm_forward_flops(args, kwargs, out):
    x, weight = args[:2]
    return 2 * x.shape[0] * x.shape[1] * weight.shape[0]


def _gemm_dgelu_flops(args, kwargs, out):
    grad, weight = args[:2]
    return 2 * grad.shape[0] * grad.shape[1] * weight.shape[1]


def _gemm_wgrad_flops(args, kwargs, out):
    grad, x = args[:2]
    return 2 * grad.shape[0] * grad.shape[1] * x.shape[1]


cm.FLOP_FORMULAS["fastmim::gemm_forward"] = _gemm_forward_flops
cm.FLOP_FORMULAS["fastmim::gemm_dgelu"] = _gemm_dgelu_flops
cm.FLOP_FORMULAS["fastmim::gemm_wgrad"] = _gemm_wgrad_flops
cm.TRITON_GEMM_OPS.update({"fastmim::gemm_forward", "fastmim::gemm_dgelu", "fastmim::gemm_wgrad"})

cm.BYTE_FORMULAS["fastmim::visible_attention_backward"] = _attention_backward_bytes
cm.BYTE_FORMULAS["aten::_scaled_dot_product_flash_attention_backward"] = _flash_backward_bytes
cm.BYTE_FORMULAS["fastmim::gather_visible"] = _gather_visible_bytes
cm.LAUNCH_FORMULAS["fastmim::gather_visible_backward"] = _gather_visible_backward_launches
cm.LAUNCH_FORMULAS["fastmim::unshuffle_backward"] = _unshuffle_backward_launches
cm.BYTE_FORMULAS["fastmim::masked_patch_mse"] = _masked_patch_mse_bytes
cm.LAUNCH_FORMULAS["fastmim::masked_patch_mse"] = _masked_patch_mse_launches
cm.FLOP_FORMULAS["fastmim::visible_attention"] = _attention_flops
cm.FLOP_FORMULAS["fastmim::visible_attention_backward"] = _attention_backward_flops
cm.LAUNCH_FORMULAS["fastmim::visible_attention_backward"] = _attention_backward_launches
cm.FLOP_FORMULAS["fastmim::visible_attention_qkvpacked"] = lambda a, k, o: _attention_flops(_unpacked_forward(a), k, o)
for _table, _formula in ((cm.FLOP_FORMULAS, _attention_backward_flops), (cm.BYTE_FORMULAS, _attention_backward_bytes),
                        (cm.LAUNCH_FORMULAS, _attention_backward_launches)):
    _table["fastmim::visible_attention_qkvpacked_backward"] = _charged_as_unpacked_backward(_formula)
cm.BYTE_FORMULAS["fastmim::layer_norm_backward"] = _layer_norm_backward_bytes
cm.LAUNCH_FORMULAS["fastmim::layer_norm_backward"] = lambda args, kwargs, out: 2  # kernel, [dweight, dbias] sum
cm.BYTE_FORMULAS["fastmim::bias_gelu_backward"] = _bias_gelu_backward_bytes
cm.LAUNCH_FORMULAS["fastmim::bias_gelu_backward"] = lambda args, kwargs, out: 2  # kernel, dbias sum
