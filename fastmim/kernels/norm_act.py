"""Triton kernels of the ViT block's single-pass row steps (LayerNorm, residual add + LayerNorm, bias + GELU).

Imports only ``torch`` and ``triton``: another codebase can copy this file whole. The public
ops, their references and autograd rules live in ``fastmim/ops/norm_act.py``; the GEMMs with
these steps fused into them in ``fastmim/kernels/fused_block.py`` (whose backward runs its
LayerNorm pass here: :func:`layer_norm_backward_partial`).

All tensors are taken as contiguous ``(rows, C)`` matrices (the launchers call
``.contiguous()``, which is free for the activations a ViT block produces). Statistics and
arithmetic are fp32 whatever the I/O dtype.

- LayerNorm forward: one program per row (the whole row in registers, ``C <= 8192``), writes the
  output and the per-row ``mean`` and ``rstd`` (fp32), the only tensors backward needs besides
  the input. With a residual it first writes ``s = x + residual`` (rounded to the output dtype,
  as an unfused add would leave it) and normalises ``s``: the residual add and the next
  LayerNorm in one pass.
- LayerNorm backward: a fixed number of programs (:func:`layer_norm_backward_programs`), each
  walking a contiguous run of rows: ``dx`` per row (plus the gradient of ``s`` when the forward
  had a residual: both branches of the residual stream in one store), and per-program partial
  sums of ``dweight`` and ``dbias`` in fp32, reduced afterwards by one ``torch.sum`` in a fixed
  order (deterministic, no atomics); when asked, the forward output recomputed from the input
  and the statistics (for the weight gradient of the linear layer after it, which then need
  not save it).
- bias + GELU (exact, erf): ``gelu(x + bias)``. Backward recomputes ``x + bias`` and the GELU
  derivative from the saved pre-bias input ``x`` (no saved activation output), writes ``dx``
  and per-program partial sums of ``dbias`` and, when asked, the activation itself (for the
  weight gradient of the linear layer after it, which then need not save it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # a jit function reads only constexpr globals
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# Programs of the LayerNorm backward: enough to fill a GPU, few enough that the fp32 partial
# sums of dweight/dbias (2 x programs x C) stay small next to dx.
_LN_BACKWARD_PROGRAMS = 256
# Row-programs of the bias+GELU backward (per column block): the same trade-off for dbias.
_GELU_BACKWARD_ROW_PROGRAMS = 64
_GELU_TILE = 4096  # elements of a (rows x columns) tile per program


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def layer_norm_backward_programs(rows: int) -> int:
    """Programs (and rows of the partial-sum buffers) of the LayerNorm backward for ``rows`` rows."""
    return max(1, min(rows, _LN_BACKWARD_PROGRAMS))


def bias_gelu_blocks(rows: int, cols: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, row_programs)`` of the bias+GELU kernels; ``row_programs`` is the backward's."""
    block_n = min(triton.next_power_of_2(max(cols, 1)), 256)
    block_m = max(1, min(_GELU_TILE // block_n, triton.next_power_of_2(max(rows, 1))))
    row_programs = max(1, min(triton.cdiv(rows, block_m), _GELU_BACKWARD_ROW_PROGRAMS))
    return block_m, block_n, row_programs


# --------------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------------

@triton.jit
def _layer_norm_fwd_kernel(X, R, S, Y, W, B, MEAN, RSTD, n_cols, eps,
                           HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    m = cols < n_cols
    off = row * n_cols + cols
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + off, mask=m, other=0.0).to(tl.float32)
        s = x.to(S.dtype.element_ty)
        tl.store(S + off, s, mask=m)
        x = s.to(tl.float32)  # normalise the stored sum, as the unfused add + LayerNorm would
    mean = tl.sum(x, axis=0) / n_cols
    d = tl.where(m, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
    y = d * rstd * w + b
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(DY, X, W, B, MEAN, RSTD, DS, DX, Y, PARTIAL, n_rows, n_cols, rows_per_program,
                           HAS_DSUM: tl.constexpr, STORE_Y: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    m = cols < n_cols
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if STORE_Y:
        b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        if row < n_rows:
            off = row.to(tl.int64) * n_cols + cols
            x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(m, (x - mean) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / n_cols
            c2 = tl.sum(wdy, axis=0) / n_cols
            dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DSUM:
                dx += tl.load(DS + off, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
            if STORE_Y:  # the forward output, recomputed for the weight gradient of the layer after it
                tl.store(Y + off, (xhat * w + b).to(Y.dtype.element_ty), mask=m)
            dw += dy * xhat
            db += dy
    n_programs = tl.num_programs(0)
    tl.store(PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=m)
    tl.store(PARTIAL + (n_programs + pid).to(tl.int64) * n_cols + cols, db, mask=m)


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None, sum_dtype: torch.dtype | None = None,
                       ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, y, mean, rstd)`` of LayerNorm over the last dim of ``x`` (of ``s = x + residual`` when given).

    ``s`` (dtype ``sum_dtype``) is ``None`` without a residual; ``y`` has the dtype of ``s`` (of
    ``x`` without residual); ``mean`` and ``rstd`` are fp32 of shape ``x.shape[:-1]``.
    """
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols).contiguous()
    rows = x2.shape[0]
    out_dtype = x.dtype if residual is None else (sum_dtype or x.dtype)
    y = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, cols).contiguous()
        s = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
    else:
        r2, s = x2, None
    if rows > 0:
        block = triton.next_power_of_2(cols)
        _layer_norm_fwd_kernel[(rows,)](
            x2, r2, s if s is not None else y, y, weight.contiguous(), bias.contiguous(), mean, rstd, cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_C=block, num_warps=_num_warps(block))
    shape = x.shape
    return (None if s is None else s.view(shape)), y.view(shape), mean.view(shape[:-1]), rstd.view(shape[:-1])


def layer_norm_backward_partial(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor, grad_sum: torch.Tensor | None, bias: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx, partial, y)``: ``dx`` (dtype of ``x``, ``(rows, C)``) includes ``grad_sum`` when given;
    ``partial`` is ``(2, programs, C)`` fp32, each program's sums of ``dweight`` and ``dbias`` (for a
    reduction in a fixed order); ``y`` the forward output recomputed (dtype of ``x``) when ``bias`` is given."""
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols).contiguous()
    rows = x2.shape[0]
    dy = grad_y.reshape(-1, cols).contiguous()
    ds = grad_sum.reshape(-1, cols).contiguous() if grad_sum is not None else dy
    dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device) if bias is not None else None
    programs = layer_norm_backward_programs(rows)
    partial = torch.empty((2, programs, cols), dtype=torch.float32, device=x.device)
    if rows > 0:
        block = triton.next_power_of_2(cols)
        _layer_norm_bwd_kernel[(programs,)](
            dy, x2, weight.contiguous(), bias.contiguous() if bias is not None else weight, mean.contiguous(),
            rstd.contiguous(), ds, dx, y if y is not None else dx, partial, rows, cols, triton.cdiv(rows, programs),
            HAS_DSUM=grad_sum is not None, STORE_Y=y is not None, BLOCK_C=block, num_warps=_num_warps(block))
    else:
        partial.zero_()
    return dx, partial, y


def layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, grad_sum: torch.Tensor | None, param_dtype: torch.dtype,
                        bias: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx, dparams, y)``: ``dx`` (dtype of ``x``) includes ``grad_sum`` when given; ``dparams`` is
    ``(2, C)`` in ``param_dtype``, ``[dweight, dbias]``, reduced from the partial sums by one ``torch.sum``;
    ``y`` is the forward output recomputed (dtype of ``x``) when ``bias`` is given, else ``None``."""
    dx, partial, y = layer_norm_backward_partial(grad_y, x, weight, mean, rstd, grad_sum, bias)
    return dx.view(x.shape), torch.sum(partial, dim=1, dtype=param_dtype), None if y is None else y.view(x.shape)


# --------------------------------------------------------------------------------------------
# bias + GELU
# --------------------------------------------------------------------------------------------

@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    off = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    b = tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    h = tl.load(X + off, mask=m, other=0.0).to(tl.float32) + b[None, :]
    y = 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, ACT, PARTIAL, n_rows, n_cols, blocks_per_program,
                          STORE_ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, blocks_per_program):
        rows = (pid_m * blocks_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        m = (rows < n_rows)[:, None] & col_ok[None, :]
        off = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        h = tl.load(X + off, mask=m, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(h * _INV_SQRT2))
        pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
        dx = tl.where(m, dy * (cdf + h * pdf), 0.0)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
        if STORE_ACT:  # the activation itself, recomputed for the next layer's weight gradient
            tl.store(ACT + off, (h * cdf).to(ACT.dtype.element_ty), mask=m)
        acc += tl.sum(dx, axis=0)
    tl.store(PARTIAL + pid_m.to(tl.int64) * n_cols + cols, acc, mask=col_ok)


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` (exact erf GELU) over the last dim, dtype of ``x``."""
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols).contiguous()
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    if rows > 0:
        block_m, block_n, _ = bias_gelu_blocks(rows, cols)
        grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
        _bias_gelu_fwd_kernel[grid](x2, bias.contiguous(), y, rows, cols, BLOCK_M=block_m, BLOCK_N=block_n,
                                    num_warps=4)
    return y.view(x.shape)


def bias_gelu_backward(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, recompute: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx, dbias, act)`` of ``gelu(x + bias)``, recomputing ``x + bias`` from ``x``; ``act`` is
    ``gelu(x + bias)`` itself (dtype of ``x``) when ``recompute``, else ``None``."""
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols).contiguous()
    rows = x2.shape[0]
    dy = grad_y.reshape(-1, cols).contiguous()
    dx = torch.empty_like(x2)
    act = torch.empty_like(x2) if recompute else None
    block_m, block_n, programs = bias_gelu_blocks(rows, cols)
    partial = torch.empty((programs, cols), dtype=torch.float32, device=x.device)
    if rows > 0:
        blocks_per_program = triton.cdiv(triton.cdiv(rows, block_m), programs)
        _bias_gelu_bwd_kernel[(programs, triton.cdiv(cols, block_n))](
            dy, x2, bias.contiguous(), dx, act if recompute else dx, partial, rows, cols, blocks_per_program,
            STORE_ACT=recompute, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    else:
        partial.zero_()
    return dx.view(x.shape), torch.sum(partial, dim=0, dtype=bias.dtype), None if act is None else act.view(x.shape)
