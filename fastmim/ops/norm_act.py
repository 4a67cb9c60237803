"""Single-pass row ops of the ViT block: LayerNorm, residual add + LayerNorm, bias + GELU, and
their forms followed by a linear layer.

Each step runs in one pass over the activations, forward and backward, around cuBLAS GEMMs: the
fusion of the blocks that cannot take the GEMM-fused path of :mod:`fastmim.ops.fused_block`
(which builds on this module's LayerNorm reference and backward).

- :func:`layer_norm`: LayerNorm over the last dim, statistics in fp32. Saves only its input
  (which the residual stream keeps alive anyway) and the per-row ``mean``/``rstd``; backward
  writes ``dx`` and reduces ``dweight``/``dbias`` from per-program partial sums in a fixed
  order (deterministic).
- :func:`add_layer_norm`: ``s = x + residual`` and ``layer_norm(s)`` in one pass, returning
  both; its backward adds the gradient of ``s`` into ``dx`` in the same pass.
- :func:`bias_gelu`: ``gelu(x + bias)`` (exact erf GELU, timm's default ``nn.GELU``) on the
  output of a bias-free ``fc1`` matmul. Saves only ``x``: backward recomputes ``x + bias`` and
  the GELU derivative, and reduces ``dbias`` in the same pass as ``dx``.
- :func:`bias_gelu_linear`: ``bias_gelu`` followed by ``fc2``, saving only ``x`` (``fc2``
  would otherwise keep the activation for its weight gradient): backward recomputes the
  activation in the pass that computes its gradient.
- :func:`layer_norm_linear`, :func:`add_layer_norm_linear`: ``layer_norm`` (after the residual
  add) followed by a linear layer, saving ``s`` and the row statistics, not the normalised tensor:
  backward recomputes it in the LayerNorm backward pass, for the weight gradient.

Dtypes: ``x`` (and ``residual``) float16/bfloat16/float32 on the Triton path (float64 takes
the reference); the affine parameters may have another float dtype (fp32 master weights under
autocast); outputs have the dtype of ``x`` (of ``x + residual`` by type promotion), parameter
gradients the dtype of the parameter. Inputs are made contiguous once (``.contiguous()``: no
copy for a block's activations).
"""

from __future__ import annotations

import torch

from fastmim.ops._block_args import check_layer_norm, check_linear, check_tensor, check_vector, check_x
from fastmim.ops._dispatch import select_backend

__all__ = ["add_layer_norm", "add_layer_norm_linear", "add_layer_norm_reference", "bias_gelu", "bias_gelu_linear",
           "bias_gelu_reference", "layer_norm", "layer_norm_linear", "layer_norm_reference"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("reference", "triton")
_MAX_LN_COLS = 8192  # the Triton LayerNorm keeps a whole row in registers


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------
# References (the spec)
# --------------------------------------------------------------------------------------------

def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                         ) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim (biased variance), computed
    in fp32 (fp64 for fp64 inputs), returned in the dtype of ``x``."""
    acc = _acc_dtype(x, weight, bias)
    xf = x.to(acc)
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(acc) + bias.to(acc)
    return y.to(x.dtype)


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, layer_norm_reference(s))`` with ``s = x + residual`` (PyTorch type promotion)."""
    s = x + residual
    return s, layer_norm_reference(s, weight, bias, eps)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``h * Phi(h)`` with ``h = x + bias`` (bias over the last dim) and ``Phi`` the normal CDF
    (exact erf GELU), computed in fp32 (fp64 for fp64 inputs), returned in the dtype of ``x``."""
    acc = _acc_dtype(x, bias)
    h = x.to(acc) + bias.to(acc)
    return (0.5 * h * (1.0 + torch.erf(h * 0.5**0.5))).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

def _ln_backend(x: torch.Tensor, *params: torch.Tensor) -> str:
    backend = select_backend("layer_norm", x.device, implemented=_BACKENDS)
    ok = x.dtype in _TRITON_DTYPES and all(p.dtype in _TRITON_DTYPES for p in params)
    return "triton" if backend == "triton" and ok and x.shape[-1] <= _MAX_LN_COLS else "reference"


def _native_ok(*tensors: torch.Tensor) -> bool:
    """The reference backend runs PyTorch's own LayerNorm/GELU kernels (the unfused block's, so the
    fused model on CPU matches the unfused one to the last bit where it can) when every tensor
    has one dtype, float32 or float64; mixed or low-precision dtypes take the fp32 formulas."""
    return tensors[0].dtype in (torch.float32, torch.float64) and all(t.dtype == tensors[0].dtype for t in tensors)


def _reference_stats(s: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    sf = s.to(_acc_dtype(s))
    var, mean = torch.var_mean(sf, dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


def _reference_ln_backward(grad_y, s, weight, mean, rstd, grad_sum, param_dtype):
    acc = mean.dtype
    dy = grad_y.to(acc)
    xhat = (s.to(acc) - mean[..., None]) * rstd[..., None]
    wdy = dy * weight.to(acc)
    c1 = (xhat * wdy).mean(dim=-1, keepdim=True)
    c2 = wdy.mean(dim=-1, keepdim=True)
    dx = (wdy - (xhat * c1 + c2)) * rstd[..., None]
    if grad_sum is not None:
        dx = dx + grad_sum.to(acc)
    rows = tuple(range(dy.dim() - 1))
    return dx.to(s.dtype), torch.stack([(dy * xhat).sum(dim=rows), dy.sum(dim=rows)]).to(param_dtype)


def _gelu_backend(x: torch.Tensor, bias: torch.Tensor) -> str:
    backend = select_backend("bias_gelu", x.device, implemented=_BACKENDS)
    ok = x.dtype in _TRITON_DTYPES and bias.dtype in _TRITON_DTYPES
    return "triton" if backend == "triton" and ok else "reference"


# --------------------------------------------------------------------------------------------
# Registered ops
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastmim::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _ln_backend(x, weight, bias) == "triton":
        from fastmim.kernels import norm_act as kernels

        _, y, mean, rstd = kernels.layer_norm_forward(x, weight, bias, eps)
        return y, mean, rstd
    if _native_ok(x, weight, bias):
        y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
    mean, rstd = _reference_stats(x, eps)
    return layer_norm_reference(x, weight, bias, eps).contiguous(), mean, rstd


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = x.new_empty(x.shape[:-1], dtype=stats_dtype)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("fastmim::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    if _ln_backend(x, residual, weight, bias) == "triton":
        from fastmim.kernels import norm_act as kernels

        return kernels.layer_norm_forward(x, weight, bias, eps, residual=residual, sum_dtype=sum_dtype)
    s = x + residual
    if _native_ok(s, weight, bias):
        y, mean, rstd = torch.native_layer_norm(s, (s.shape[-1],), weight, bias, eps)
        return s, y, mean.view(s.shape[:-1]), rstd.view(s.shape[:-1])
    y = layer_norm_reference(s, weight, bias, eps)
    mean, rstd = _reference_stats(s, eps)
    return s.contiguous(), y.contiguous(), mean, rstd


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    stats_dtype = torch.float64 if sum_dtype == torch.float64 else torch.float32
    stats = x.new_empty(x.shape[:-1], dtype=stats_dtype)
    return x.new_empty(x.shape, dtype=sum_dtype), x.new_empty(x.shape, dtype=sum_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("fastmim::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor, grad_sum: torch.Tensor | None, param_dtype: torch.dtype,
                            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dparams, y)``: ``dx`` includes ``grad_sum`` (the gradient reaching ``x`` directly);
    ``dparams`` is ``(2, C)``, ``[dweight, dbias]``, in ``param_dtype``; ``y`` the forward output
    recomputed when ``bias`` is given (else empty)."""
    if _ln_backend(x, weight) == "triton" and grad_y.dtype in _TRITON_DTYPES and (
            bias is None or bias.dtype in _TRITON_DTYPES):
        from fastmim.kernels import norm_act as kernels

        dx, dparams, y = kernels.layer_norm_backward(grad_y, x, weight, mean, rstd, grad_sum, param_dtype, bias)
        return dx, dparams, y if y is not None else x.new_empty(0)
    y = x.new_empty(0)
    if bias is not None:
        xhat = (x.to(mean.dtype) - mean[..., None]) * rstd[..., None]
        y = (xhat * weight.to(mean.dtype) + bias.to(mean.dtype)).to(x.dtype)
    if _native_ok(x, weight, grad_y) and param_dtype == x.dtype and mean.dtype == x.dtype:
        stats = x.shape[:-1] + (1,)
        dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
            grad_y, x, [x.shape[-1]], mean.view(stats), rstd.view(stats), weight, None, [True, True, False])
        dparams = torch.stack([dw, grad_y.sum(dim=tuple(range(x.dim() - 1)))])
        return (dx if grad_sum is None else dx + grad_sum), dparams, y
    dx, dparams = _reference_ln_backward(grad_y, x, weight, mean, rstd, grad_sum, param_dtype)
    return dx.contiguous(), dparams, y


@_layer_norm_backward_op.register_fake
def _(grad_y, x, weight, mean, rstd, grad_sum, param_dtype, bias):
    y = x.new_empty(x.shape if bias is not None else (0,))
    return x.new_empty(x.shape), x.new_empty((2, x.shape[-1]), dtype=param_dtype), y


@torch.library.custom_op("fastmim::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if _gelu_backend(x, bias) == "triton":
        from fastmim.kernels import norm_act as kernels

        return kernels.bias_gelu_forward(x, bias)
    if _native_ok(x, bias):
        return torch.nn.functional.gelu(x + bias)
    return bias_gelu_reference(x, bias).contiguous()


@_bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastmim::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, recompute: bool,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dbias, act)``; ``act = gelu(x + bias)`` recomputed when ``recompute`` (else empty)."""
    if _gelu_backend(x, bias) == "triton" and grad_y.dtype in _TRITON_DTYPES:
        from fastmim.kernels import norm_act as kernels

        dx, dbias, act = kernels.bias_gelu_backward(grad_y, x, bias, recompute=recompute)
        return dx, dbias, act if act is not None else x.new_empty(0)
    rows = tuple(range(x.dim() - 1))
    if _native_ok(x, bias, grad_y):
        h = x + bias
        dx = torch.ops.aten.gelu_backward(grad_y, h)
        return dx, dx.sum(dim=rows), torch.nn.functional.gelu(h) if recompute else x.new_empty(0)
    acc = _acc_dtype(x, bias)
    h = x.to(acc) + bias.to(acc)
    cdf = 0.5 * (1.0 + torch.erf(h * 0.5**0.5))
    pdf = torch.exp(-0.5 * h * h) * (2.0 * torch.pi) ** -0.5
    dx = grad_y.to(acc) * (cdf + h * pdf)
    act = (h * cdf).to(x.dtype) if recompute else x.new_empty(0)
    return dx.to(x.dtype).contiguous(), dx.sum(dim=rows).to(bias.dtype), act


@_bias_gelu_backward_op.register_fake
def _(grad_y, x, bias, recompute):
    return x.new_empty(x.shape), bias.new_empty(bias.shape), x.new_empty(x.shape if recompute else (0,))


# --------------------------------------------------------------------------------------------
# Autograd rules
# --------------------------------------------------------------------------------------------

def _param_grads(dparams: torch.Tensor, weight_dtype: torch.dtype, bias_dtype: torch.dtype):
    return dparams[0].to(weight_dtype), dparams[1].to(bias_dtype)


def _param_dtype(weight: torch.Tensor, bias: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype == bias.dtype else torch.promote_types(torch.float32, weight.dtype)


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients for mean and rstd
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.dtypes = (bias.dtype, _param_dtype(weight, bias))


def _ln_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    bias_dtype, param_dtype = ctx.dtypes
    if grad_y is None:
        return None, None, None, None
    dx, dparams, _ = torch.ops.fastmim.layer_norm_backward(grad_y, x, weight, mean, rstd, None, param_dtype, None)
    return dx, *_param_grads(dparams, weight.dtype, bias_dtype), None


def _add_ln_setup_context(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    s, y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.dtypes = (x.dtype, residual.dtype, bias.dtype, _param_dtype(weight, bias))


def _add_ln_backward(ctx, grad_s, grad_y, grad_mean, grad_rstd):
    s, weight, mean, rstd = ctx.saved_tensors
    x_dtype, residual_dtype, bias_dtype, param_dtype = ctx.dtypes
    if grad_y is None:  # only the sum was used: the gradient passes through to both inputs
        if grad_s is None:
            return None, None, None, None, None
        return grad_s.to(x_dtype), grad_s.to(residual_dtype), None, None, None
    ds, dparams, _ = torch.ops.fastmim.layer_norm_backward(grad_y, s, weight, mean, rstd, grad_s, param_dtype, None)
    return ds.to(x_dtype), ds.to(residual_dtype), *_param_grads(dparams, weight.dtype, bias_dtype), None


torch.library.register_autograd("fastmim::layer_norm", _ln_backward, setup_context=_ln_setup_context)
torch.library.register_autograd("fastmim::add_layer_norm", _add_ln_backward, setup_context=_add_ln_setup_context)


def _gelu_setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _gelu_backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    dx, dbias, _ = torch.ops.fastmim.bias_gelu_backward(grad_y, x, bias, False)
    return dx, dbias


torch.library.register_autograd("fastmim::bias_gelu", _gelu_backward, setup_context=_gelu_setup_context)


class _BiasGeluLinear(torch.autograd.Function):
    """``linear(gelu(x + bias), weight, linear_bias)`` saving only ``x`` (and the parameters).

    The matmuls stay aten ops (cuBLAS, and counted as GEMMs by the cost model); backward runs
    ``dact = grad @ weight`` first, then one ``fastmim::bias_gelu_backward`` pass that writes
    ``dx``, ``dbias`` and the recomputed activation, which the weight gradient then reads.
    Under autocast the forward's matmul runs in the autocast dtype; backward casts ``weight``
    to the gradient's dtype and returns parameter gradients in the parameters' dtypes.
    """

    @staticmethod
    def forward(ctx, x, bias, weight, linear_bias):
        act = torch.ops.fastmim.bias_gelu(x, bias)
        ctx.save_for_backward(x, bias, weight)
        ctx.linear_bias_dtype = None if linear_bias is None else linear_bias.dtype
        return torch.nn.functional.linear(act, weight, linear_bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, bias, weight = ctx.saved_tensors
        grad_act = torch.matmul(grad_out, weight.to(grad_out.dtype))
        dx, dbias, act = torch.ops.fastmim.bias_gelu_backward(grad_act, x, bias, True)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        dweight = torch.matmul(grad_2d.t(), act.reshape(-1, act.shape[-1]).to(grad_out.dtype)).to(weight.dtype)
        dlinear_bias = None
        if ctx.linear_bias_dtype is not None:
            dlinear_bias = grad_2d.sum(dim=0, dtype=ctx.linear_bias_dtype)
        return dx, dbias, dweight, dlinear_bias


class _LayerNormLinear(torch.autograd.Function):
    """``(s, linear(layer_norm(s), weight, linear_bias))`` with ``s = x + residual``, or ``s = x``
    (returned as a view of ``x``) without a residual, saving ``s`` (the residual stream keeps it
    anyway), ``mean``/``rstd`` and the parameters, not the normalised tensor: backward recomputes
    it in the LayerNorm backward pass, for the weight gradient. The gradient reaching ``s`` joins
    ``dx`` inside that pass, so a residual stream read by this LayerNorm and passed on as ``s``
    needs no separate gradient add. Casts as :class:`_BiasGeluLinear`.
    """

    @staticmethod
    def forward(ctx, x, residual, ln_weight, ln_bias, eps, weight, linear_bias):
        if residual is None:
            s = x.view_as(x)
            y, mean, rstd = torch.ops.fastmim.layer_norm(x, ln_weight, ln_bias, eps)
        else:
            s, y, mean, rstd = torch.ops.fastmim.add_layer_norm(x, residual, ln_weight, ln_bias, eps)
        ctx.save_for_backward(x if residual is None else s, ln_weight, ln_bias, mean, rstd, weight)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype,
                      None if linear_bias is None else linear_bias.dtype)
        ctx.set_materialize_grads(False)
        return s, torch.nn.functional.linear(y, weight, linear_bias)

    @staticmethod
    def backward(ctx, grad_s, grad_out):
        s, ln_weight, ln_bias, mean, rstd, weight = ctx.saved_tensors
        x_dtype, residual_dtype, linear_bias_dtype = ctx.dtypes
        if grad_out is None:  # only s was used: the gradient passes through to the inputs
            if grad_s is None:
                return None, None, None, None, None, None, None
            dresidual = None if residual_dtype is None else grad_s.to(residual_dtype)
            return grad_s.to(x_dtype), dresidual, None, None, None, None, None
        grad_y = torch.matmul(grad_out, weight.to(grad_out.dtype))
        param_dtype = _param_dtype(ln_weight, ln_bias)
        ds, dparams, y = torch.ops.fastmim.layer_norm_backward(grad_y, s, ln_weight, mean, rstd, grad_s, param_dtype,
                                                                ln_bias)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        dweight = torch.matmul(grad_2d.t(), y.reshape(-1, y.shape[-1]).to(grad_out.dtype)).to(weight.dtype)
        dlinear_bias = None if linear_bias_dtype is None else grad_2d.sum(dim=0, dtype=linear_bias_dtype)
        dln_weight, dln_bias = _param_grads(dparams, ln_weight.dtype, ln_bias.dtype)
        dresidual = None if residual_dtype is None else ds.to(residual_dtype)
        return ds.to(x_dtype), dresidual, dln_weight, dln_bias, None, dweight, dlinear_bias


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of ``x (..., C)`` with affine ``weight``, ``bias`` ``(C,)``.

    Same result as ``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)``; see
    :func:`layer_norm_reference`. Saves ``x`` and per-row fp32 ``mean``/``rstd`` for backward.
    """
    eps = check_layer_norm(x, weight, bias, eps)
    return torch.ops.fastmim.layer_norm(x, weight, bias, eps)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, layer_norm(s))`` with ``s = x + residual``, in one pass: a block's residual add and the
    LayerNorm after it. ``x`` and ``residual`` ``(..., C)`` of the same shape; ``s`` has their
    promoted dtype. Saves ``s`` (which the residual stream keeps anyway) and ``mean``/``rstd``."""
    eps = check_layer_norm(x, weight, bias, eps)
    check_x(residual, "residual")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.device != x.device:
        raise ValueError(f"residual must be on the device of x ({x.device}), got {residual.device}")
    s, y, _, _ = torch.ops.fastmim.add_layer_norm(x, residual, weight, bias, eps)
    return s, y


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` (exact erf GELU) with ``bias (C,)`` over the last dim of ``x (..., C)``.

    For ``fc1`` run as a matmul without bias: ``bias_gelu(x @ fc1.weight.T, fc1.bias)`` equals
    ``gelu(fc1(x))`` and saves only the matmul output for backward. See :func:`bias_gelu_reference`.
    """
    check_x(x)
    check_vector(bias, "bias", x)
    return torch.ops.fastmim.bias_gelu(x, bias)


def bias_gelu_linear(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                     linear_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(bias_gelu(x, bias), weight, linear_bias)``: a ViT MLP's GELU and ``fc2``.

    ``x (..., H)`` is ``fc1``'s output without its bias, ``bias (H,)`` that bias, ``weight
    (C, H)`` and ``linear_bias (C,)`` ``fc2``'s parameters. Saves only ``x``: backward recomputes
    the activation (in the same pass as its gradient) instead of keeping it for ``fc2``'s weight
    gradient, which takes ``B * N * H`` elements off the activation memory of every block.
    """
    check_x(x)
    check_vector(bias, "bias", x)
    check_tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.device != x.device:
        raise ValueError(f"weight must be (C, {x.shape[-1]}) on {x.device}, got {tuple(weight.shape)} on "
                         f"{weight.device}")
    if linear_bias is not None:
        check_tensor(linear_bias, "linear_bias")
        if linear_bias.shape != (weight.shape[0],) or linear_bias.device != x.device:
            raise ValueError(f"linear_bias must be ({weight.shape[0]},) on {x.device}, got "
                             f"{tuple(linear_bias.shape)} on {linear_bias.device}")
    return _BiasGeluLinear.apply(x, bias, weight, linear_bias)


def layer_norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      linear_weight: torch.Tensor, linear_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(layer_norm(x, weight, bias, eps), linear_weight, linear_bias)`` (a block's norm1 and
    qkv), saving ``x`` and the row statistics but not the normalised tensor (recomputed in backward)."""
    eps = check_layer_norm(x, weight, bias, eps)
    check_linear(linear_weight, linear_bias, x, ("linear_weight", "linear_bias"))
    return _LayerNormLinear.apply(x, None, weight, bias, eps, linear_weight, linear_bias)[1]


def add_layer_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, linear(layer_norm(s), linear_weight, linear_bias))`` with ``s = x + residual`` (a block's
    residual add, norm2 and fc1), saving ``s`` and the row statistics, not the normalised tensor.

    ``residual=None``: ``s = x`` (a view). Either way the gradient that reaches ``s`` through its other
    uses is added to ``x``'s inside the LayerNorm backward pass, not by a separate add."""
    eps = check_layer_norm(x, weight, bias, eps)
    if residual is not None:
        check_x(residual, "residual")
        if residual.shape != x.shape or residual.device != x.device:
            raise ValueError(f"residual must have the shape and device of x {tuple(x.shape)} ({x.device}), got "
                             f"{tuple(residual.shape)} ({residual.device})")
    check_linear(linear_weight, linear_bias, x, ("linear_weight", "linear_bias"))
    return _LayerNormLinear.apply(x, residual, weight, bias, eps, linear_weight, linear_bias)
