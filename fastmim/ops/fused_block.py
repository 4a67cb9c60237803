"""GEMM-fused ops of the ViT block: its GEMMs with LayerNorm, bias, GELU and the residual add in their
prologues and epilogues.

A pre-norm ViT block spends its non-GEMM memory traffic on LayerNorm, the residual adds and
GELU, each next to a GEMM that already reads or writes the same tensor. The GEMM-fused ops (the
ViT block's default on the Triton path, ``fastmim.models.vit.FusedBlock``):

- :func:`norm_linear`: ``linear(layer_norm(x))`` with the LayerNorm in the GEMM's prologue (qkv);
- :func:`linear_add`: ``residual + linear(x)`` with bias, add and the row statistics of the sum in
  the GEMM's epilogue (proj);
- :func:`norm_mlp_add`: ``x + fc2(gelu(fc1(layer_norm(x))))``: fc1 with a LayerNorm prologue and a
  bias + GELU epilogue, fc2 with a bias + residual + statistics epilogue; backward as Apex's
  ``fused_dense`` with cuBLASLt's DGELU_BGRAD epilogue (GELU's derivative in fc2's input-gradient
  epilogue), GELU and LayerNorm recomputed in the weight-gradient GEMMs' prologues, bias gradients
  summed in those GEMMs (section "The GEMMs with ... fused into them" below);
- :func:`layer_norm_stats`: the row statistics of a stream no fused GEMM wrote.

The single-pass row ops these build on and stand in for (LayerNorm, residual add + LayerNorm,
bias + GELU around cuBLAS GEMMs, for the blocks that cannot take this path) are
:mod:`fastmim.ops.norm_act`.
"""

from __future__ import annotations

import torch

from fastmim.ops._block_args import check_layer_norm, check_linear, check_stats, check_x
from fastmim.ops._dispatch import select_backend
from fastmim.ops.norm_act import (
    _BACKENDS,
    _TRITON_DTYPES,
    _acc_dtype,
    _ln_backend,
    _param_dtype,
    _param_grads,
    _reference_ln_backward,
    layer_norm_reference,
)

__all__ = ["layer_norm_stats", "linear_add", "linear_add_reference", "norm_linear", "norm_linear_reference",
           "norm_mlp_add", "norm_mlp_add_reference"]


# --------------------------------------------------------------------------------------------
# The GEMMs with the LayerNorm, bias, GELU and residual steps fused into them
# --------------------------------------------------------------------------------------------
#
# The residual stream travels with its per-row statistics: ``stats (rows, T, 3)`` fp32 holds, for T
# column tiles of each row, (count, mean, sum of squared deviations). The GEMM that writes the stream
# (``linear_add``: proj, fc2) computes them in its epilogue; the GEMM that reads its LayerNorm
# (``norm_linear``: qkv; ``norm_mlp_add``: fc1) combines them into ``mean``/``rstd`` and normalises in
# its prologue, so neither the LayerNorm output nor a separate statistics pass exists. The first block
# of a run gets its statistics from :func:`layer_norm_stats`.
#
# Backward: fc2's input gradient GEMM applies GELU's derivative in its epilogue; fc2's weight gradient
# recomputes the activation from the saved pre-activation in its prologue; the weight gradient GEMMs
# of qkv and fc1 recompute the LayerNorm output in their prologue from the saved input, mean and rstd;
# every bias gradient is summed from the gradient tiles its weight gradient GEMM reads; the LayerNorm
# backward row kernel writes per-program sums of dgamma/dbeta that extra programs of the next weight
# gradient GEMM reduce. The input-gradient GEMMs without an epilogue (qkv, proj, fc1) stay cuBLAS's.

_STATS_TILE = 64  # the kernels' STATS_TILE (the statistics' shape must be known without triton)


# --------------------------------------------------------------------------------------------
# References (the spec)
# --------------------------------------------------------------------------------------------

def norm_linear_reference(x, norm_weight, norm_bias, eps, weight, bias=None) -> torch.Tensor:
    """``linear(layer_norm_reference(x), weight, bias)``."""
    return torch.nn.functional.linear(layer_norm_reference(x, norm_weight, norm_bias, eps), weight, bias)


def linear_add_reference(x, weight, bias, residual) -> torch.Tensor:
    """``residual + linear(x, weight, bias)``."""
    return residual + torch.nn.functional.linear(x, weight, bias)


def norm_mlp_add_reference(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                           ) -> torch.Tensor:
    """``x + fc2(gelu(fc1(layer_norm_reference(x))))`` (exact erf GELU)."""
    h = torch.nn.functional.linear(layer_norm_reference(x, norm_weight, norm_bias, eps), fc1_weight, fc1_bias)
    return x + torch.nn.functional.linear(torch.nn.functional.gelu(h), fc2_weight, fc2_bias)


# --------------------------------------------------------------------------------------------
# Statistics, backends, dtypes
# --------------------------------------------------------------------------------------------

def _stats_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def combine_stats(stats: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, rstd)`` per row from per-tile statistics ``(rows, T, 3)`` (count, mean, M2)."""
    count, tile_mean, tile_m2 = stats.unbind(-1)
    total = count.sum(-1).clamp_min(1)
    mean = (count * tile_mean).sum(-1) / total
    var = (tile_m2 + count * (tile_mean - mean[..., None]) ** 2).sum(-1) / total
    return mean, torch.rsqrt(var + eps)


def tile_stats(s: torch.Tensor, tile: int = _STATS_TILE) -> torch.Tensor:
    """Per-tile row statistics ``(rows, ceil(C / tile), 3)`` of ``s (rows, C)``, in fp32 (fp64 for fp64)."""
    acc = _stats_dtype(s)
    rows, cols = s.shape
    tiles = -(-cols // tile)
    padded = torch.zeros((rows, tiles * tile), dtype=acc, device=s.device)
    padded[:, :cols] = s.to(acc)
    valid = (torch.arange(tiles * tile, device=s.device) < cols).view(tiles, tile)
    x = padded.view(rows, tiles, tile)
    count = valid.sum(-1).to(acc).expand(rows, tiles)
    mean = x.sum(-1) / count.clamp_min(1)
    m2 = torch.where(valid, x - mean[..., None], 0).pow(2).sum(-1)
    return torch.stack([count, mean, m2], dim=-1)


def _ln_backward_programs(rows: int) -> int:
    try:
        from fastmim.kernels.norm_act import layer_norm_backward_programs
    except ImportError:  # triton missing: the launcher's rule
        return max(1, min(rows, 256))
    return layer_norm_backward_programs(rows)


def _gemm_backend(*tensors: torch.Tensor | None, dot_dtype: torch.dtype) -> str:
    present = [t for t in tensors if t is not None]
    backend = select_backend("fused_gemm", present[0].device, implemented=_BACKENDS)
    ok = dot_dtype in _TRITON_DTYPES and all(t.dtype in _TRITON_DTYPES for t in present)
    return "triton" if backend == "triton" and ok else "reference"


def _gelu_acc(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * h * (1.0 + torch.erf(h * 0.5**0.5))


def _gelu_grad_acc(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(h * 0.5**0.5)) + h * torch.exp(-0.5 * h * h) * (2.0 * torch.pi) ** -0.5


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and back (the rounding a stored intermediate gets)."""
    return t.to(dtype).to(t.dtype)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _dot_dtype(x: torch.Tensor, *weights: torch.Tensor) -> torch.dtype:
    """The dtype of the products: autocast's where it is on for ``x``'s device, else the inputs' promoted one."""
    device_type = x.device.type if x.device.type in ("cuda", "cpu") else "cuda"
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = x.dtype
    for w in weights:
        dtype = torch.promote_types(dtype, w.dtype)
    return dtype


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _opt_dtype(t: torch.Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


# --------------------------------------------------------------------------------------------
# Registered ops
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastmim::layer_norm_stats", mutates_args=())
def _layer_norm_stats_op(x: torch.Tensor) -> torch.Tensor:
    """``(rows, 1, 3)``: each row's (count, mean, M2) of a ``(rows, C)`` tensor."""
    if _gemm_backend(x, dot_dtype=x.dtype) == "triton":
        from fastmim.kernels import fused_block as kernels

        return kernels.row_stats(x.contiguous())
    return tile_stats(x, tile=max(1, x.shape[-1]))


@_layer_norm_stats_op.register_fake
def _(x):
    return x.new_empty((x.shape[0], 1, 3), dtype=_stats_dtype(x))


@torch.library.custom_op("fastmim::gemm_forward", mutates_args=())
def _gemm_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stats: torch.Tensor | None,
                     norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, eps: float, gelu: bool,
                     residual: torch.Tensor | None, dot_dtype: torch.dtype,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (M, K) @ weight (N, K)^T + bias`` with its fusions: ``(out, pre, stats_out, mean, rstd)``.

    ``stats``: x's rows LayerNorm-ed (``norm_weight``, ``norm_bias``, ``eps``) before the product,
    ``mean``/``rstd`` returned. ``gelu``: ``out = gelu(pre)``, ``pre`` the biased product.
    ``residual (M, N)``: ``out = residual + product``, ``stats_out`` its per-tile row statistics.
    Outputs not asked for are empty. Products in ``dot_dtype`` (operands rounded to it)."""
    out_dtype = dot_dtype if residual is None else torch.promote_types(residual.dtype, dot_dtype)
    norm = None if stats is None else (stats, norm_weight, norm_bias, eps)
    if _gemm_backend(x, weight, bias, residual, norm_weight, norm_bias, dot_dtype=dot_dtype) == "triton":
        from fastmim.kernels import fused_block as kernels

        res = kernels.linear_forward(x.contiguous(), weight, bias, dot_dtype, out_dtype,
                                     norm=None if norm is None else (stats.contiguous(), norm_weight.contiguous(),
                                                                     norm_bias.contiguous(), eps),
                                     gelu=gelu, residual=None if residual is None else residual.contiguous())
        return (res["out"], res.get("pre", _empty(x)), res.get("stats", _empty(x)), res.get("mean", _empty(x)),
                res.get("rstd", _empty(x)))
    acc = _acc_dtype(x, weight, *(t for t in (bias, residual) if t is not None))
    a = x.to(acc)
    mean, rstd = _empty(x), _empty(x)
    if stats is not None:
        mean, rstd = combine_stats(stats.to(acc), eps)
        a = (a - mean[:, None]) * rstd[:, None] * norm_weight.to(acc) + norm_bias.to(acc)
        mean, rstd = mean.to(stats.dtype), rstd.to(stats.dtype)
    out = _round(a, dot_dtype) @ _round(weight.to(acc), dot_dtype).t()
    if bias is not None:
        out = out + bias.to(acc)
    pre, stats_out = _empty(x), _empty(x)
    if gelu:
        pre = out.to(out_dtype)
        out = _gelu_acc(pre.to(acc))
    if residual is not None:
        out = out + residual.to(acc)
    out = out.to(out_dtype)
    if residual is not None:
        stats_out = tile_stats(out).to(_stats_dtype(x, residual))
    return out, pre, stats_out, mean, rstd


@_gemm_forward_op.register_fake
def _(x, weight, bias, stats, norm_weight, norm_bias, eps, gelu, residual, dot_dtype):
    out_dtype = dot_dtype if residual is None else torch.promote_types(residual.dtype, dot_dtype)
    m, n = x.shape[0], weight.shape[0]
    sd = _stats_dtype(x, residual)
    out = x.new_empty((m, n), dtype=out_dtype)
    pre = x.new_empty((m, n), dtype=out_dtype) if gelu else _empty(x)
    stats_out = x.new_empty((m, -(-n // _STATS_TILE), 3), dtype=sd) if residual is not None else _empty(x)
    mean = x.new_empty(m, dtype=stats.dtype) if stats is not None else _empty(x)
    return out, pre, stats_out, mean, torch.empty_like(mean)


@torch.library.custom_op("fastmim::gemm_dgelu", mutates_args=())
def _gemm_dgelu_op(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, dot_dtype: torch.dtype,
                   ) -> torch.Tensor:
    """``(grad (M, N) @ weight (N, K)) * gelu'(pre (M, K))``, dtype of ``pre``."""
    if _gemm_backend(grad, weight, pre, dot_dtype=dot_dtype) == "triton":
        from fastmim.kernels import fused_block as kernels

        return kernels.linear_dgelu(grad.contiguous(), weight, pre.contiguous(), dot_dtype)
    acc = _acc_dtype(grad, weight, pre)
    dact = _round(grad.to(acc), dot_dtype) @ _round(weight.to(acc), dot_dtype)
    return (dact * _gelu_grad_acc(pre.to(acc))).to(pre.dtype)


@_gemm_dgelu_op.register_fake
def _(grad, weight, pre, dot_dtype):
    return pre.new_empty(pre.shape)


@torch.library.custom_op("fastmim::gemm_wgrad", mutates_args=())
def _gemm_wgrad_op(grad: torch.Tensor, x: torch.Tensor, weight_dtype: torch.dtype, bias_dtype: torch.dtype | None,
                   gelu: bool, mean: torch.Tensor | None, rstd: torch.Tensor | None,
                   norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, partial: torch.Tensor | None,
                   param_dtype: torch.dtype | None, dot_dtype: torch.dtype,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dweight, dbias, dparams)``: ``dweight = grad (T, N)^T @ x' (T, K)`` with ``x' = gelu(x)``
    (``gelu``), ``layer_norm(x)`` (``mean`` given) or ``x``; ``dbias`` the column sums of ``grad`` (when
    ``bias_dtype``); ``dparams (2, C)`` the sums over programs of a LayerNorm backward's ``partial`` (when
    given). Outputs not asked for are empty."""
    norm = None if mean is None else (mean, rstd, norm_weight, norm_bias)
    if _gemm_backend(grad, x, norm_weight, norm_bias, dot_dtype=dot_dtype) == "triton":
        from fastmim.kernels import fused_block as kernels

        dw, db, dp = kernels.linear_wgrad(
            grad.contiguous(), x.contiguous(), dot_dtype, weight_dtype, bias_dtype, gelu=gelu,
            norm=None if norm is None else tuple(t.contiguous() for t in norm),
            partial=None if partial is None else partial.contiguous(), param_dtype=param_dtype)
        return dw, db if db is not None else _empty(grad), dp if dp is not None else _empty(grad)
    acc = _acc_dtype(grad, x)
    b = x.to(acc)
    if gelu:
        b = _gelu_acc(b)
    elif norm is not None:
        b = (b - mean.to(acc)[:, None]) * rstd.to(acc)[:, None] * norm_weight.to(acc) + norm_bias.to(acc)
    g = grad.to(acc)
    dweight = (_round(g, dot_dtype).t() @ _round(b, dot_dtype)).to(weight_dtype)
    dbias = g.sum(0).to(bias_dtype) if bias_dtype is not None else _empty(grad)
    dparams = partial.sum(1).to(param_dtype) if partial is not None else _empty(grad)
    return dweight, dbias, dparams


@_gemm_wgrad_op.register_fake
def _(grad, x, weight_dtype, bias_dtype, gelu, mean, rstd, norm_weight, norm_bias, partial, param_dtype, dot_dtype):
    dweight = grad.new_empty((grad.shape[1], x.shape[1]), dtype=weight_dtype)
    dbias = grad.new_empty(grad.shape[1], dtype=bias_dtype) if bias_dtype is not None else _empty(grad)
    dparams = grad.new_empty((2, partial.shape[2]), dtype=param_dtype) if partial is not None else _empty(grad)
    return dweight, dbias, dparams


@torch.library.custom_op("fastmim::layer_norm_backward_partial", mutates_args=())
def _layer_norm_backward_partial_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                                    rstd: torch.Tensor, grad_sum: torch.Tensor | None,
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, partial)`` of a LayerNorm over ``x (rows, C)``: ``dx`` includes ``grad_sum``; ``partial``
    ``(2, P, C)`` holds per-program sums of ``[dweight, dbias]`` (the reference puts the whole sums in
    program 0), reduced by :func:`fastmim.kernels.fused_block.linear_wgrad`'s extra programs."""
    rows, cols = x.shape
    if _ln_backend(x, weight) == "triton" and grad_y.dtype in _TRITON_DTYPES and (
            grad_sum is None or grad_sum.dtype in _TRITON_DTYPES):
        from fastmim.kernels import norm_act as kernels

        dx, partial, _ = kernels.layer_norm_backward_partial(grad_y, x, weight, mean, rstd, grad_sum)
        return dx, partial
    acc = _stats_dtype(x, grad_y)
    dx, dparams = _reference_ln_backward(grad_y, x, weight, mean.to(acc), rstd.to(acc), grad_sum, acc)
    partial = torch.zeros((2, _ln_backward_programs(rows), cols), dtype=acc, device=x.device)
    partial[:, 0] = dparams
    return dx.contiguous(), partial


@_layer_norm_backward_partial_op.register_fake
def _(grad_y, x, weight, mean, rstd, grad_sum):
    rows, cols = x.shape
    return x.new_empty(x.shape), x.new_empty((2, _ln_backward_programs(rows), cols), dtype=_stats_dtype(x, grad_y))


# --------------------------------------------------------------------------------------------
# Autograd rules
# --------------------------------------------------------------------------------------------

class _NormLinear(torch.autograd.Function):
    """``(x, linear(layer_norm(x), weight, bias))`` with the LayerNorm in the GEMM's prologue (see above)."""

    @staticmethod
    def forward(ctx, x, stats, norm_weight, norm_bias, eps, weight, bias):
        dot = _dot_dtype(x, weight)
        x2 = _rows(x)
        if stats is None:
            stats = torch.ops.fastmim.layer_norm_stats(x2)
        out, _, _, mean, rstd = torch.ops.fastmim.gemm_forward(x2, weight, bias, stats, norm_weight, norm_bias, eps,
                                                               False, None, dot)
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, weight)
        ctx.dot, ctx.bias_dtype = dot, _opt_dtype(bias)
        ctx.set_materialize_grads(False)
        return x.view_as(x), out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_x, grad_out):
        x, norm_weight, norm_bias, mean, rstd, weight = ctx.saved_tensors
        if grad_out is None:
            return grad_x, None, None, None, None, None, None
        x2, g2 = _rows(x), _rows(grad_out)
        grad_y = torch.matmul(g2.to(ctx.dot), weight.to(ctx.dot))
        dx, partial = torch.ops.fastmim.layer_norm_backward_partial(
            grad_y, x2, norm_weight, mean, rstd, None if grad_x is None else _rows(grad_x))
        param_dtype = _param_dtype(norm_weight, norm_bias)
        dweight, dbias, dparams = torch.ops.fastmim.gemm_wgrad(g2, x2, weight.dtype, ctx.bias_dtype, False, mean, rstd,
                                                              norm_weight, norm_bias, partial, param_dtype, ctx.dot)
        dnw, dnb = _param_grads(dparams, norm_weight.dtype, norm_bias.dtype)
        return (dx.view(x.shape), None, dnw, dnb, None, dweight, dbias if ctx.bias_dtype is not None else None)


class _LinearAdd(torch.autograd.Function):
    """``(residual + linear(x, weight, bias), stats)``: bias and residual add in the GEMM's epilogue, with
    the per-tile row statistics of the sum (for the LayerNorm after it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        dot = _dot_dtype(x, weight)
        out, _, stats, _, _ = torch.ops.fastmim.gemm_forward(_rows(x), weight, bias, None, None, None, 0.0, False,
                                                             _rows(residual), dot)
        ctx.save_for_backward(x, weight)
        ctx.dot, ctx.bias_dtype, ctx.residual_dtype = dot, _opt_dtype(bias), residual.dtype
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return out.view(*x.shape[:-1], weight.shape[0]), stats

    @staticmethod
    def backward(ctx, grad_s, grad_stats):
        x, weight = ctx.saved_tensors
        if grad_s is None:
            return None, None, None, None
        g2 = _rows(grad_s)
        dx = torch.matmul(g2.to(ctx.dot), weight.to(ctx.dot)).to(x.dtype)
        dweight, dbias, _ = torch.ops.fastmim.gemm_wgrad(g2, _rows(x), weight.dtype, ctx.bias_dtype, False, None, None,
                                                         None, None, None, None, ctx.dot)
        return (dx.view(x.shape), dweight, dbias if ctx.bias_dtype is not None else None,
                grad_s.to(ctx.residual_dtype))


class _NormMLPAdd(torch.autograd.Function):
    """``(x + fc2(gelu(fc1(layer_norm(x)))), stats)``, saving ``x``, ``mean``/``rstd`` and fc1's
    pre-activation only (see above for where each step runs)."""

    @staticmethod
    def forward(ctx, x, stats, norm_weight, norm_bias, eps, w1, b1, w2, b2):
        dot = _dot_dtype(x, w1, w2)
        x2 = _rows(x)
        if stats is None:
            stats = torch.ops.fastmim.layer_norm_stats(x2)
        act, pre, _, mean, rstd = torch.ops.fastmim.gemm_forward(x2, w1, b1, stats, norm_weight, norm_bias, eps, True,
                                                                 None, dot)
        out, _, stats_out, _, _ = torch.ops.fastmim.gemm_forward(act, w2, b2, None, None, None, 0.0, False, x2, dot)
        ctx.save_for_backward(x, norm_weight, norm_bias, mean, rstd, w1, w2, pre)
        ctx.dot, ctx.b1_dtype, ctx.b2_dtype = dot, _opt_dtype(b1), _opt_dtype(b2)
        ctx.mark_non_differentiable(stats_out)
        ctx.set_materialize_grads(False)
        return out.view(x.shape), stats_out

    @staticmethod
    def backward(ctx, grad_s, grad_stats):
        x, norm_weight, norm_bias, mean, rstd, w1, w2, pre = ctx.saved_tensors
        if grad_s is None:
            return (None,) * 9
        x2, g2 = _rows(x), _rows(grad_s)
        dpre = torch.ops.fastmim.gemm_dgelu(g2, w2, pre, ctx.dot)
        dw2, db2, _ = torch.ops.fastmim.gemm_wgrad(g2, pre, w2.dtype, ctx.b2_dtype, True, None, None, None, None, None,
                                                   None, ctx.dot)
        grad_y = torch.matmul(dpre.to(ctx.dot), w1.to(ctx.dot))
        dx, partial = torch.ops.fastmim.layer_norm_backward_partial(grad_y, x2, norm_weight, mean, rstd, g2)
        param_dtype = _param_dtype(norm_weight, norm_bias)
        dw1, db1, dparams = torch.ops.fastmim.gemm_wgrad(dpre, x2, w1.dtype, ctx.b1_dtype, False, mean, rstd,
                                                         norm_weight, norm_bias, partial, param_dtype, ctx.dot)
        dnw, dnb = _param_grads(dparams, norm_weight.dtype, norm_bias.dtype)
        return (dx.view(x.shape), None, dnw, dnb, None, dw1, db1 if ctx.b1_dtype is not None else None, dw2,
                db2 if ctx.b2_dtype is not None else None)


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------

def layer_norm_stats(x: torch.Tensor) -> torch.Tensor:
    """The row statistics the fused-GEMM ops take: ``(rows, 1, 3)``, each row's (count, mean, sum of
    squared deviations) over the last dim of ``x``, fp32 (fp64 for fp64 ``x``)."""
    check_x(x)
    return torch.ops.fastmim.layer_norm_stats(_rows(x))


def norm_linear(x: torch.Tensor, stats: torch.Tensor | None, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, linear(layer_norm(x, norm_weight, norm_bias, eps), weight, bias))`` (a block's norm1 and qkv).

    The LayerNorm runs in the GEMM's prologue from ``stats`` (the per-tile row statistics of ``x`` that
    :func:`linear_add` or :func:`norm_mlp_add` return; ``None``: computed by :func:`layer_norm_stats`);
    nothing but ``x``, the row ``mean``/``rstd`` and the parameters is saved. The first output is ``x``
    itself (a view): the gradient reaching it through its other uses joins ``dx`` inside the LayerNorm
    backward kernel. Backward: cuBLAS input gradient, LayerNorm backward, and a weight gradient GEMM that
    recomputes the LayerNorm output on load and sums the bias gradient (and reduces dgamma/dbeta)."""
    eps = check_layer_norm(x, norm_weight, norm_bias, eps)
    check_linear(weight, bias, x)
    return _NormLinear.apply(x, check_stats(stats, x), norm_weight, norm_bias, eps, weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, stats)``: ``s = residual + linear(x, weight, bias)`` (a block's proj and residual add) with the
    bias, the add and the per-tile row statistics of ``s`` (for the next LayerNorm) in the GEMM's
    epilogue. ``s`` has the dtype of ``residual`` promoted with the products'."""
    check_x(x)
    check_linear(weight, bias, x)
    check_x(residual, "residual")
    if residual.shape != (*x.shape[:-1], weight.shape[0]) or residual.device != x.device:
        raise ValueError(f"residual must be {(*x.shape[:-1], weight.shape[0])} on {x.device}, got "
                         f"{tuple(residual.shape)} on {residual.device}")
    return _LinearAdd.apply(x, weight, bias, residual)


def norm_mlp_add(x: torch.Tensor, stats: torch.Tensor | None, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                 eps: float, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
                 fc2_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, stats)``: ``s = x + fc2(gelu(fc1(layer_norm(x))))`` (a block's norm2, MLP and residual add).

    fc1: LayerNorm prologue, bias + GELU epilogue writing the pre-activation (saved) and the activation
    (read by fc2, not saved); fc2: bias + residual epilogue with the row statistics of ``s``. Backward:
    fc2's input gradient GEMM applies GELU's derivative in its epilogue, fc2's weight gradient recomputes
    GELU on load, fc1's recomputes the LayerNorm; bias gradients come from the weight gradient GEMMs."""
    eps = check_layer_norm(x, norm_weight, norm_bias, eps)
    check_linear(fc1_weight, fc1_bias, x, ("fc1_weight", "fc1_bias"))
    hidden = x.new_empty((1, fc1_weight.shape[0]))
    check_linear(fc2_weight, fc2_bias, hidden, ("fc2_weight", "fc2_bias"))
    if fc2_weight.shape[0] != x.shape[-1]:
        raise ValueError(f"fc2_weight must be ({x.shape[-1]}, {fc1_weight.shape[0]}), got {tuple(fc2_weight.shape)}")
    return _NormMLPAdd.apply(x, check_stats(stats, x), norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                             fc2_bias)
