"""Triton kernels of the ViT block's GEMMs with its memory-bound steps (LayerNorm, bias, GELU, residual
add) in their prologues and epilogues, and the row statistics a LayerNorm prologue reads.

Imports only ``torch`` and ``triton``: another codebase can copy this file whole. The public
ops, their references and autograd rules live in ``fastmim/ops/fused_block.py``; the single-pass
LayerNorm and bias + GELU row kernels (among them the LayerNorm backward pass between these GEMMs)
in ``fastmim/kernels/norm_act.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under the interpreter, tl.dot on bf16/fp16 operands returns wrong values: operands are rounded to
# the dot dtype (as on the GPU) and widened to fp32 for the dot.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # a jit function reads only constexpr globals
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


# --------------------------------------------------------------------------------------------
# GEMMs with the block's memory-bound steps in their prologue and epilogue
# --------------------------------------------------------------------------------------------
#
# One tiled GEMM kernel, ``C[M, N] = prologue(A)[M, K] @ prologue(B)[K, N]`` with fp32 accumulation,
# specialised by compile-time flags (the fusions of Apex's ``fused_dense`` and cuBLASLt's
# GELU_AUX / DGELU_BGRAD epilogues, and LayerNorm applied where its input is read):
#
# - ``A_NORM``: A's rows are LayerNorm-ed on load, ``(a - mean) * rstd * gamma[k] + beta[k]``, with
#   ``mean``/``rstd`` combined from the per-tile row statistics of A (below); the programs of the
#   first column block store them (fp32) for the backward pass. The LayerNorm output is never written.
# - ``B_MODE``: 1, ``B = gelu(B)`` (the activation recomputed from the saved pre-activation for a
#   weight gradient); 2, B's rows (tokens) LayerNorm-ed along N from the saved ``mean``/``rstd``.
# - ``EPILOGUE``: 1, ``+ bias`` then GELU: the pre-activation goes to ``AUX`` and the activation to
#   ``C``; 2, ``C = acc * gelu'(AUX)`` (fc2's input gradient turned into fc1's pre-activation
#   gradient); 3, ``C = acc + bias + RES`` (a residual add) plus the per-tile row statistics of the
#   stored ``C`` (``STATS_TILE`` columns a tile: count, mean, sum of squared deviations, fp32),
#   which a LayerNorm prologue combines (Chan et al.'s pairwise formula) without another pass.
# - ``ROW_SUM``: the programs of the first column block also sum A's rows over K: with
#   ``A = grad^T`` (a weight gradient) that is the bias gradient, at no extra read.
# - ``HAS_SIDE``: the first ``n_side`` programs reduce a LayerNorm backward's per-program partial
#   sums of ``dgamma``/``dbeta`` (fixed order, deterministic) instead of a separate reduction kernel;
#   the GEMM tiles take the programs after them.
#
# Operands are cast to the dot dtype (``DOT``: 0 bf16, 1 fp16, 2 fp32 as 3xTF32) after their
# prologue, as an unfused chain would round the LayerNorm or GELU output it stores. Tiles follow the
# grouped ("super-grouping") order of Triton's matmul tutorial for L2 reuse.

STATS_TILE = 64  # columns per row-statistics tile of the residual epilogue (fixed: shapes must not
#                  depend on the autotuned block size)
_SIDE_BLOCK = 128  # columns each side program of the dgamma/dbeta reduction sums

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried on CUDA, per GEMM kind; each compiles for
# sm_80 and sm_90a without spills (benchmarks/gpu_compile_report.py). BLOCK_N is a multiple of
# STATS_TILE for the residual epilogue. The 64-wide tiles are for weight gradients of narrow layers (a
# decoder's), whose few 128 x 128 output tiles would leave SMs idle; the GELU prologue's erf needs
# 32-deep K steps on sm_80 (64 spills there).
GEMM_CONFIGS = {
    "forward": ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)),
    "wgrad": ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)),
    "wgrad_gelu": ((128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)),
}
_GROUP_M = 8
_TUNED: dict[tuple, tuple[int, int, int, int, int]] = {}


def _interpret_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """The interpreter's tiles: large ones (its cost is per program and per op, not per element)."""
    def p2(x, lo, hi):
        return max(lo, min(hi, triton.next_power_of_2(max(x, 1))))
    return p2(m, 16, 128), p2(n, STATS_TILE, 256), p2(k, 16, 64), 4, 1


@triton.jit
def _gelu_f32(h):
    return 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))


@triton.jit
def _gelu_grad_f32(h):
    cdf = 0.5 * (1.0 + tl.math.erf(h * _INV_SQRT2))
    return cdf + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI


@triton.jit
def _to_dot(x, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """``x`` rounded to the dot dtype (widened back to fp32 under the interpreter, whose bf16 dot is wrong)."""
    if DOT == 0:
        x = x.to(tl.bfloat16)
    elif DOT == 1:
        x = x.to(tl.float16)
    else:
        x = x.to(tl.float32)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _gemm_mainloop(A, B, MEAN, RSTD, GAMMA, BETA, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk,
                   stride_bn, row_mean, row_rstd, A_NORM: tl.constexpr, B_MODE: tl.constexpr, ROW_SUM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                   INTERPRET: tl.constexpr):
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    if B_MODE == 2:
        gamma_n = tl.load(GAMMA + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        beta_n = tl.load(BETA + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    a_rows = A + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = B + offs_n.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        a = tl.load(a_rows + ks.to(tl.int64)[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if A_NORM:
            g = tl.load(GAMMA + ks, mask=k_ok, other=0.0).to(tl.float32)
            bb = tl.load(BETA + ks, mask=k_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) - row_mean[:, None]) * row_rstd[:, None] * g[None, :] + bb[None, :]
        if ROW_SUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        b = tl.load(b_cols + ks.to(tl.int64)[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if B_MODE == 1:
            b = _gelu_f32(b.to(tl.float32))
        elif B_MODE == 2:
            mk = tl.load(MEAN + ks, mask=k_ok, other=0.0)
            rk = tl.load(RSTD + ks, mask=k_ok, other=0.0)
            b = (b.to(tl.float32) - mk[:, None]) * rk[:, None] * gamma_n[None, :] + beta_n[None, :]
            b = tl.where(k_ok[:, None], b, 0.0)
        a = _to_dot(a, DOT, INTERPRET)
        b = _to_dot(b, DOT, INTERPRET)
        if DOT == 2:
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, b, acc)
    return acc, row_sum


@triton.jit
def _side_reduce(PART, DPARAM, n_part, n_cols, sid, SIDE_BLOCK: tl.constexpr):
    """``DPARAM[0] = sum_p PART[0, p]``, ``DPARAM[1] = sum_p PART[1, p]`` over this program's columns."""
    cols = sid * SIDE_BLOCK + tl.arange(0, SIDE_BLOCK)
    ok = cols < n_cols
    acc_w = tl.zeros([SIDE_BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([SIDE_BLOCK], dtype=tl.float32)
    for p in range(0, n_part):
        acc_w += tl.load(PART + p * n_cols + cols, mask=ok, other=0.0)
        acc_b += tl.load(PART + (n_part + p) * n_cols + cols, mask=ok, other=0.0)
    tl.store(DPARAM + cols, acc_w.to(DPARAM.dtype.element_ty), mask=ok)
    tl.store(DPARAM + n_cols + cols, acc_b.to(DPARAM.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["stats_in_tiles", "eps", "n_side", "n_part", "n_part_cols"])
def _fused_gemm_kernel(A, B, C, BIAS, AUX, RES, STATS_IN, STATS_OUT, MEAN, RSTD, GAMMA, BETA, DBIAS, PART, DPARAM,
                       M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stats_in_tiles, eps, n_side, n_part,
                       n_part_cols,
                       A_NORM: tl.constexpr, B_MODE: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ROW_SUM: tl.constexpr, HAS_SIDE: tl.constexpr, STATS_T: tl.constexpr,
                       STATS_TILE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SIDE_BLOCK: tl.constexpr, DOT: tl.constexpr,
                       INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    if HAS_SIDE:
        if pid < n_side:
            _side_reduce(PART, DPARAM, n_part, n_part_cols, pid, SIDE_BLOCK)
            return
        pid -= n_side
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N

    row_mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if A_NORM:  # the row statistics of A from its per-tile statistics (count, mean, M2)
        t = tl.arange(0, STATS_T)
        s_ok = m_ok[:, None] & (t < stats_in_tiles)[None, :]
        s_ptr = STATS_IN + offs_m.to(tl.int64)[:, None] * (3 * stats_in_tiles) + 3 * t[None, :]
        cnt = tl.load(s_ptr, mask=s_ok, other=0.0)
        tile_mean = tl.load(s_ptr + 1, mask=s_ok, other=0.0)
        tile_m2 = tl.load(s_ptr + 2, mask=s_ok, other=0.0)
        count = tl.sum(cnt, axis=1)
        count = tl.where(count > 0, count, 1.0)
        row_mean = tl.sum(cnt * tile_mean, axis=1) / count
        dev = tile_mean - row_mean[:, None]
        var = tl.sum(tile_m2 + cnt * dev * dev, axis=1) / count
        row_rstd = 1.0 / tl.sqrt(var + eps)

    if ROW_SUM:
        if pid_n == 0:
            acc, row_sum = _gemm_mainloop(A, B, MEAN, RSTD, GAMMA, BETA, offs_m, offs_n, M, N, K, stride_am,
                                          stride_ak, stride_bk, stride_bn, row_mean, row_rstd, A_NORM, B_MODE, True,
                                          BLOCK_M, BLOCK_N, BLOCK_K, DOT, INTERPRET)
            tl.store(DBIAS + offs_m, row_sum.to(DBIAS.dtype.element_ty), mask=m_ok)
        else:
            acc, row_sum = _gemm_mainloop(A, B, MEAN, RSTD, GAMMA, BETA, offs_m, offs_n, M, N, K, stride_am,
                                          stride_ak, stride_bk, stride_bn, row_mean, row_rstd, A_NORM, B_MODE, False,
                                          BLOCK_M, BLOCK_N, BLOCK_K, DOT, INTERPRET)
    else:
        acc, row_sum = _gemm_mainloop(A, B, MEAN, RSTD, GAMMA, BETA, offs_m, offs_n, M, N, K, stride_am, stride_ak,
                                      stride_bk, stride_bn, row_mean, row_rstd, A_NORM, B_MODE, False,
                                      BLOCK_M, BLOCK_N, BLOCK_K, DOT, INTERPRET)

    c_mask = m_ok[:, None] & n_ok[None, :]
    c_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:  # bias + GELU: the pre-activation to AUX (rounded as stored), its GELU to C
        pre = acc.to(AUX.dtype.element_ty)
        tl.store(AUX + c_off, pre, mask=c_mask)
        out = _gelu_f32(pre.to(tl.float32))
    elif EPILOGUE == 2:  # GELU's derivative at the saved pre-activation
        pre = tl.load(AUX + c_off, mask=c_mask, other=0.0).to(tl.float32)
        out = acc * _gelu_grad_f32(pre)
    elif EPILOGUE == 3:  # residual add
        out = acc + tl.load(RES + c_off, mask=c_mask, other=0.0).to(tl.float32)
    else:
        out = acc
    out = out.to(C.dtype.element_ty)
    tl.store(C + c_off, out, mask=c_mask)
    if EPILOGUE == 3:  # per-tile row statistics of the stored sum, STATS_TILE_N columns a tile
        SUB: tl.constexpr = BLOCK_N // STATS_TILE_N
        x = tl.where(c_mask, out.to(tl.float32), 0.0)
        x3 = tl.reshape(x, [BLOCK_M, SUB, STATS_TILE_N])
        first_col = pid_n * BLOCK_N + tl.arange(0, SUB) * STATS_TILE_N
        cnt = tl.minimum(tl.maximum(N - first_col, 0), STATS_TILE_N).to(tl.float32)
        tile_mean = tl.sum(x3, axis=2) / tl.where(cnt > 0, cnt, 1.0)[None, :]
        cols3 = tl.reshape(tl.broadcast_to(offs_n[None, :], [BLOCK_M, BLOCK_N]), [BLOCK_M, SUB, STATS_TILE_N])
        dev = tl.where(cols3 < N, x3 - tile_mean[:, :, None], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=2)
        n_tiles = tl.cdiv(N, STATS_TILE_N)
        tile_idx = pid_n * SUB + tl.arange(0, SUB)
        st_ok = m_ok[:, None] & (tile_idx < n_tiles)[None, :]
        st_ptr = STATS_OUT + offs_m.to(tl.int64)[:, None] * (3 * n_tiles) + 3 * tile_idx[None, :]
        tl.store(st_ptr, tl.broadcast_to(cnt[None, :], [BLOCK_M, SUB]), mask=st_ok)
        tl.store(st_ptr + 1, tile_mean, mask=st_ok)
        tl.store(st_ptr + 2, tile_m2, mask=st_ok)
    if A_NORM:
        if pid_n == 0:  # the statistics the LayerNorm backward needs
            tl.store(MEAN + offs_m, row_mean, mask=m_ok)
            tl.store(RSTD + offs_m, row_rstd, mask=m_ok)


@triton.jit
def _row_stats_kernel(X, STATS, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One statistics tile per row (count, mean, M2), for a LayerNorm prologue with no producer epilogue."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    r_ok = rows < n_rows
    mask = r_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    dev = tl.where(mask, x - mean[:, None], 0.0)
    base = STATS + rows.to(tl.int64) * 3
    tl.store(base, tl.zeros([BLOCK_R], dtype=tl.float32) + n_cols, mask=r_ok)
    tl.store(base + 1, mean, mask=r_ok)
    tl.store(base + 2, tl.sum(dev * dev, axis=1), mask=r_ok)


_DOT_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def stats_tiles(cols: int) -> int:
    """Row-statistics tiles of a residual-epilogue output with ``cols`` columns."""
    return triton.cdiv(cols, STATS_TILE)


def row_stats(x: torch.Tensor) -> torch.Tensor:
    """``(rows, 1, 3)`` fp32: each row's (count, mean, M2) of ``x (rows, C)`` (contiguous)."""
    rows, cols = x.shape
    stats = torch.empty((rows, 1, 3), dtype=torch.float32, device=x.device)
    if rows > 0:
        block_c = triton.next_power_of_2(cols)
        block_r = max(1, min(4096 // block_c, triton.next_power_of_2(rows)))
        _row_stats_kernel[(triton.cdiv(rows, block_r),)](x, stats, rows, cols, BLOCK_R=block_r, BLOCK_C=block_c,
                                                           num_warps=_num_warps(block_r * block_c))
    return stats


def _run_gemm(kind: str, key: tuple, m: int, n: int, k: int, device: torch.device, n_side: int,
              launch, before=None) -> None:
    """Launch with the tiles of ``kind`` for this problem: the interpreter's; on CUDA the fastest of
    :data:`GEMM_CONFIGS` (timed once per ``key``, the launches being idempotent); on the meta device
    (the compile report's capture) every configuration."""
    def grid(cfg):
        return (n_side + triton.cdiv(m, cfg[0]) * triton.cdiv(n, cfg[1]),)

    if device.type == "meta":
        for cfg in GEMM_CONFIGS[kind]:
            launch(grid(cfg), cfg)
        return
    if device.type != "cuda":
        cfg = _interpret_config(m, n, k)
        launch(grid(cfg), cfg)
        return
    cfg = _TUNED.get(key)
    if cfg is None:
        from triton.testing import do_bench

        configs = GEMM_CONFIGS[kind]
        times = [do_bench(lambda c=c: launch(grid(c), c), warmup=5, rep=20) for c in configs]
        cfg = _TUNED[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    launch(grid(cfg), cfg)


def _stats_t(tiles: int) -> int:
    """The statistics-tile block of a LayerNorm prologue: 16 for rows up to 1024 wide (one compiled
    variant for the first block's single tile and every ViT width up to ViT-L's)."""
    return max(16, triton.next_power_of_2(tiles))


def _dot_code(dtype: torch.dtype) -> int:
    return _DOT_CODES[dtype]


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dot_dtype: torch.dtype,
                   out_dtype: torch.dtype, norm: tuple | None = None, gelu: bool = False,
                   residual: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``x (M, K) @ weight (N, K)^T + bias`` with its fusions; returns a dict of the outputs.

    ``norm = (stats, gamma, beta, eps)``: x's rows LayerNorm-ed on load (``stats``: ``(M, T, 3)``
    per-tile statistics of x); adds ``mean``, ``rstd`` (fp32, ``(M,)``). ``gelu``: ``out`` is the GELU of
    the biased product and ``pre`` the product itself. ``residual (M, N)``: ``out = residual + ...`` and
    ``stats`` its per-tile row statistics (``(M, stats_tiles(N), 3)``)."""
    m, k = x.shape
    n = weight.shape[0]
    dev = x.device
    out = torch.empty((m, n), dtype=out_dtype, device=dev)
    res = {"out": out}
    dummy = out
    if gelu:
        res["pre"] = torch.empty((m, n), dtype=out_dtype, device=dev)
    if residual is not None:
        res["stats"] = torch.empty((m, stats_tiles(n), 3), dtype=torch.float32, device=dev)
    stats_in, gamma, beta, eps = (None, None, None, 0.0) if norm is None else norm
    if norm is not None:
        res["mean"] = torch.empty(m, dtype=torch.float32, device=dev)
        res["rstd"] = torch.empty(m, dtype=torch.float32, device=dev)
    if m == 0 or n == 0:
        if residual is not None:
            res["stats"].zero_()
        return res
    t_in = 1 if stats_in is None else stats_in.shape[1]

    def launch(grid, cfg):
        bm, bn, bk, warps, stages = cfg
        _fused_gemm_kernel[grid](
            x, weight, out, bias if bias is not None else dummy, res.get("pre", dummy),
            residual if residual is not None else dummy, stats_in if stats_in is not None else dummy,
            res.get("stats", dummy), res.get("mean", dummy), res.get("rstd", dummy),
            gamma if gamma is not None else dummy, beta if beta is not None else dummy, dummy, dummy, dummy,
            m, n, k, x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), t_in, eps, 0, 0, 0,
            A_NORM=norm is not None, B_MODE=0, EPILOGUE=1 if gelu else (3 if residual is not None else 0),
            HAS_BIAS=bias is not None, ROW_SUM=False, HAS_SIDE=False,
            STATS_T=_stats_t(t_in), STATS_TILE_N=STATS_TILE, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            GROUP_M=_GROUP_M, SIDE_BLOCK=_SIDE_BLOCK, DOT=_dot_code(dot_dtype), INTERPRET=_INTERPRET,
            num_warps=warps, num_stages=stages)

    key = ("forward", norm is not None, gelu, residual is not None, bias is not None, triton.next_power_of_2(m), n, k,
           x.dtype, weight.dtype, out_dtype, dot_dtype, t_in)
    _run_gemm("forward", key, m, n, k, dev, 0, launch)
    return res


def linear_dgelu(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, dot_dtype: torch.dtype,
                 ) -> torch.Tensor:
    """``(grad (M, N) @ weight (N, K)) * gelu'(pre (M, K))``: the gradient of the pre-activation of a
    GELU whose output went through ``weight`` (fc2's input gradient, GELU's backward in its epilogue)."""
    m, n = grad.shape
    k = weight.shape[1]
    out = torch.empty((m, k), dtype=pre.dtype, device=grad.device)
    if m == 0 or k == 0:
        return out
    if n == 0:
        return out.zero_()

    def launch(grid, cfg):
        bm, bn, bk, warps, stages = cfg
        _fused_gemm_kernel[grid](
            grad, weight, out, out, pre, out, out, out, out, out, out, out, out, out, out,
            m, k, n, grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1), 1, 0.0, 0, 0, 0,
            A_NORM=False, B_MODE=0, EPILOGUE=2, HAS_BIAS=False, ROW_SUM=False, HAS_SIDE=False, STATS_T=1,
            STATS_TILE_N=STATS_TILE, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M,
            SIDE_BLOCK=_SIDE_BLOCK, DOT=_dot_code(dot_dtype), INTERPRET=_INTERPRET, num_warps=warps,
            num_stages=stages)

    key = ("dgelu", triton.next_power_of_2(m), n, k, grad.dtype, weight.dtype, pre.dtype, dot_dtype)
    _run_gemm("forward", key, m, k, n, grad.device, 0, launch)
    return out


def linear_wgrad(grad: torch.Tensor, x: torch.Tensor, dot_dtype: torch.dtype, weight_dtype: torch.dtype,
                 bias_dtype: torch.dtype | None = None, gelu: bool = False, norm: tuple | None = None,
                 partial: torch.Tensor | None = None, param_dtype: torch.dtype | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dweight, dbias, dparams)`` of a linear layer: ``dweight = grad (T, N)^T @ x' (T, K)``.

    ``x'`` is ``gelu(x)`` with ``gelu`` (x the saved pre-activation), ``layer_norm(x)`` with ``norm =
    (mean, rstd, gamma, beta)`` (x the saved LayerNorm input), else ``x``. ``dbias`` (when
    ``bias_dtype``) is the column sum of ``grad``, taken from the same tiles. ``partial (2, P, C)``: a
    LayerNorm backward's per-program sums of dgamma/dbeta, reduced by extra programs of this launch into
    ``dparams (2, C)`` (``param_dtype``)."""
    tokens, n_out = grad.shape
    k_in = x.shape[1]
    dev = grad.device
    dweight = torch.empty((n_out, k_in), dtype=weight_dtype, device=dev)
    dbias = torch.empty(n_out, dtype=bias_dtype, device=dev) if bias_dtype is not None else None
    dparams = None
    n_side = n_part = n_part_cols = 0
    if partial is not None:
        n_part, n_part_cols = partial.shape[1], partial.shape[2]
        dparams = torch.empty((2, n_part_cols), dtype=param_dtype, device=dev)
        n_side = triton.cdiv(n_part_cols, _SIDE_BLOCK)
    if tokens == 0 or n_out == 0 or k_in == 0:
        dweight.zero_()
        if dbias is not None:
            dbias.zero_()
        if dparams is not None:
            dparams.copy_(partial.sum(dim=1))
        return dweight, dbias, dparams
    mean, rstd, gamma, beta = (None,) * 4 if norm is None else norm
    dummy = dweight

    def launch(grid, cfg):
        bm, bn, bk, warps, stages = cfg
        _fused_gemm_kernel[grid](
            grad, x, dweight, dummy, dummy, dummy, dummy, dummy,
            mean if mean is not None else dummy, rstd if rstd is not None else dummy,
            gamma if gamma is not None else dummy, beta if beta is not None else dummy,
            dbias if dbias is not None else dummy, partial if partial is not None else dummy,
            dparams if dparams is not None else dummy,
            n_out, k_in, tokens, grad.stride(1), grad.stride(0), x.stride(0), x.stride(1), 1, 0.0, n_side, n_part,
            n_part_cols, A_NORM=False, B_MODE=1 if gelu else (2 if norm is not None else 0), EPILOGUE=0,
            HAS_BIAS=False, ROW_SUM=dbias is not None, HAS_SIDE=partial is not None, STATS_T=1,
            STATS_TILE_N=STATS_TILE, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M, SIDE_BLOCK=_SIDE_BLOCK,
            DOT=_dot_code(dot_dtype), INTERPRET=_INTERPRET, num_warps=warps, num_stages=stages)

    kind = "wgrad_gelu" if gelu else "wgrad"
    key = (kind, norm is not None, dbias is not None, partial is not None, n_out, k_in,
           triton.next_power_of_2(tokens), grad.dtype, x.dtype, weight_dtype, dot_dtype)
    _run_gemm(kind, key, n_out, k_in, tokens, dev, n_side, launch)
    return dweight, dbias, dparams
