"""Fused steps of the ViT block: LayerNorm, residual add + LayerNorm, bias + GELU, and the block's
GEMMs with those steps in their prologues and epilogues.

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

The single-pass ops around cuBLAS GEMMs (each step in one pass over the activations, forward and
backward; the fusion of the blocks that cannot take the GEMM-fused path):

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

Dtypes: ``x`` (and ``residual``) float16/bfloat16/float32 on the Triton path (float64 takes
the reference); the affine parameters may have another float dtype (fp32 master weights under
autocast); outputs have the dtype of ``x`` (of ``x + residual`` by type promotion), parameter
gradients the dtype of the parameter. Inputs are made contiguous once (``.contiguous()``: no
copy for a block's activations).
"""

from __future__ import annotations

import torch

from fastmim.ops._dispatch import select_backend

__all__ = ["add_layer_norm", "add_layer_norm_linear", "add_layer_norm_reference", "bias_gelu", "bias_gelu_linear",
           "bias_gelu_reference", "layer_norm", "layer_norm_linear", "layer_norm_reference", "layer_norm_stats",
           "linear_add", "linear_add_reference", "norm_linear", "norm_linear_reference", "norm_mlp_add",
           "norm_mlp_add_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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
# Validation
# --------------------------------------------------------------------------------------------

def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_vector(t, name: str, x: torch.Tensor) -> None:
    _check_tensor(t, name)
    if t.shape != (x.shape[-1],):
        raise ValueError(f"{name} must have shape ({x.shape[-1]},) (the last dim of x), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


def _check_x(x, name: str = "x") -> None:
    _check_tensor(x, name)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one dim with a non-empty last dim, got shape {tuple(x.shape)}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return float(eps)


def _check_layer_norm(x, weight, bias, eps) -> float:
    _check_x(x)
    _check_vector(weight, "weight", x)
    _check_vector(bias, "bias", x)
    return _check_eps(eps)


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


# --------------------------------------------------------------------------------------------
# Registered ops
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastmim::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _ln_backend(x, weight, bias) == "triton":
        from fastmim.kernels import fused_block as kernels

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
        from fastmim.kernels import fused_block as kernels

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
        from fastmim.kernels import fused_block as kernels

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


def _gelu_backend(x: torch.Tensor, bias: torch.Tensor) -> str:
    backend = select_backend("bias_gelu", x.device, implemented=_BACKENDS)
    ok = x.dtype in _TRITON_DTYPES and bias.dtype in _TRITON_DTYPES
    return "triton" if backend == "triton" and ok else "reference"


@torch.library.custom_op("fastmim::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if _gelu_backend(x, bias) == "triton":
        from fastmim.kernels import fused_block as kernels

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
        from fastmim.kernels import fused_block as kernels

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
    eps = _check_layer_norm(x, weight, bias, eps)
    return torch.ops.fastmim.layer_norm(x, weight, bias, eps)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, layer_norm(s))`` with ``s = x + residual``, in one pass: a block's residual add and the
    LayerNorm after it. ``x`` and ``residual`` ``(..., C)`` of the same shape; ``s`` has their
    promoted dtype. Saves ``s`` (which the residual stream keeps anyway) and ``mean``/``rstd``."""
    eps = _check_layer_norm(x, weight, bias, eps)
    _check_x(residual, "residual")
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
    _check_x(x)
    _check_vector(bias, "bias", x)
    return torch.ops.fastmim.bias_gelu(x, bias)


def bias_gelu_linear(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                     linear_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(bias_gelu(x, bias), weight, linear_bias)``: a ViT MLP's GELU and ``fc2``.

    ``x (..., H)`` is ``fc1``'s output without its bias, ``bias (H,)`` that bias, ``weight
    (C, H)`` and ``linear_bias (C,)`` ``fc2``'s parameters. Saves only ``x``: backward recomputes
    the activation (in the same pass as its gradient) instead of keeping it for ``fc2``'s weight
    gradient, which takes ``B * N * H`` elements off the activation memory of every block.
    """
    _check_x(x)
    _check_vector(bias, "bias", x)
    _check_tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.device != x.device:
        raise ValueError(f"weight must be (C, {x.shape[-1]}) on {x.device}, got {tuple(weight.shape)} on "
                         f"{weight.device}")
    if linear_bias is not None:
        _check_tensor(linear_bias, "linear_bias")
        if linear_bias.shape != (weight.shape[0],) or linear_bias.device != x.device:
            raise ValueError(f"linear_bias must be ({weight.shape[0]},) on {x.device}, got "
                             f"{tuple(linear_bias.shape)} on {linear_bias.device}")
    return _BiasGeluLinear.apply(x, bias, weight, linear_bias)


def _check_linear(weight, linear_bias, x: torch.Tensor, names=("weight", "linear_bias")) -> None:
    _check_tensor(weight, names[0])
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.device != x.device:
        raise ValueError(f"{names[0]} must be (out_features, {x.shape[-1]}) on {x.device}, got "
                         f"{tuple(weight.shape)} on {weight.device}")
    if linear_bias is not None:
        _check_tensor(linear_bias, names[1])
        if linear_bias.shape != (weight.shape[0],) or linear_bias.device != x.device:
            raise ValueError(f"{names[1]} must be ({weight.shape[0]},) on {x.device}, got "
                             f"{tuple(linear_bias.shape)} on {linear_bias.device}")


def layer_norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      linear_weight: torch.Tensor, linear_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(layer_norm(x, weight, bias, eps), linear_weight, linear_bias)`` (a block's norm1 and
    qkv), saving ``x`` and the row statistics but not the normalised tensor (recomputed in backward)."""
    eps = _check_layer_norm(x, weight, bias, eps)
    _check_linear(linear_weight, linear_bias, x, ("linear_weight", "linear_bias"))
    return _LayerNormLinear.apply(x, None, weight, bias, eps, linear_weight, linear_bias)[1]


def add_layer_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, linear(layer_norm(s), linear_weight, linear_bias))`` with ``s = x + residual`` (a block's
    residual add, norm2 and fc1), saving ``s`` and the row statistics, not the normalised tensor.

    ``residual=None``: ``s = x`` (a view). Either way the gradient that reaches ``s`` through its other
    uses is added to ``x``'s inside the LayerNorm backward pass, not by a separate add."""
    eps = _check_layer_norm(x, weight, bias, eps)
    if residual is not None:
        _check_x(residual, "residual")
        if residual.shape != x.shape or residual.device != x.device:
            raise ValueError(f"residual must have the shape and device of x {tuple(x.shape)} ({x.device}), got "
                             f"{tuple(residual.shape)} ({residual.device})")
    _check_linear(linear_weight, linear_bias, x, ("linear_weight", "linear_bias"))
    return _LayerNormLinear.apply(x, residual, weight, bias, eps, linear_weight, linear_bias)


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
        from fastmim.kernels.fused_block import layer_norm_backward_programs
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
        from fastmim.kernels import fused_block as kernels

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


def _check_stats(stats, x: torch.Tensor) -> torch.Tensor | None:
    if stats is None:
        return None
    _check_tensor(stats, "stats")
    rows = x.numel() // x.shape[-1]
    if stats.dim() != 3 or stats.shape[0] != rows or stats.shape[2] != 3 or stats.shape[1] < 1:
        raise ValueError(f"stats must be (rows, tiles, 3) with rows = {rows}, got {tuple(stats.shape)}")
    return stats


def layer_norm_stats(x: torch.Tensor) -> torch.Tensor:
    """The row statistics the fused-GEMM ops take: ``(rows, 1, 3)``, each row's (count, mean, sum of
    squared deviations) over the last dim of ``x``, fp32 (fp64 for fp64 ``x``)."""
    _check_x(x)
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
    eps = _check_layer_norm(x, norm_weight, norm_bias, eps)
    _check_linear(weight, bias, x)
    return _NormLinear.apply(x, _check_stats(stats, x), norm_weight, norm_bias, eps, weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, stats)``: ``s = residual + linear(x, weight, bias)`` (a block's proj and residual add) with the
    bias, the add and the per-tile row statistics of ``s`` (for the next LayerNorm) in the GEMM's
    epilogue. ``s`` has the dtype of ``residual`` promoted with the products'."""
    _check_x(x)
    _check_linear(weight, bias, x)
    _check_x(residual, "residual")
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
    eps = _check_layer_norm(x, norm_weight, norm_bias, eps)
    _check_linear(fc1_weight, fc1_bias, x, ("fc1_weight", "fc1_bias"))
    hidden = x.new_empty((1, fc1_weight.shape[0]))
    _check_linear(fc2_weight, fc2_bias, hidden, ("fc2_weight", "fc2_bias"))
    if fc2_weight.shape[0] != x.shape[-1]:
        raise ValueError(f"fc2_weight must be ({x.shape[-1]}, {fc1_weight.shape[0]}), got {tuple(fc2_weight.shape)}")
    return _NormMLPAdd.apply(x, _check_stats(stats, x), norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight,
                             fc2_bias)


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
