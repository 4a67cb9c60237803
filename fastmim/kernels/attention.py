"""Flash attention over visible tokens: Triton forward and backward kernels and their launchers.

Three layouts share one set of kernels (``VARLEN`` and ``KEY_MODE`` are compile-time flags):

- dense: ``q (B, H, Nq, D)``, ``k, v (B, H, Nk, D)``;
- varlen packed: ``q, k, v (T, H, D)`` with ``cu_seqlens (B+1,)`` int32: sequence ``b`` is rows
  ``cu_seqlens[b]:cu_seqlens[b+1]`` and attends only to itself;
- key-visibility (dense layout, ``Nq = Nk = L``): queries attend only to a per-sample set of
  visible keys, given either as indices ``key_index (B, K)`` (the kernel gathers those rows of
  ``k``/``v`` on the fly: only the ``K`` visible keys are computed) or as a boolean
  ``key_mask (B, L)`` (all ``L`` keys are read, invisible ones get a score of -inf).

Forward: online softmax in base 2 (the scale times log2(e) is folded into the scores), fp32
accumulation, the log-sum-exp ``lse`` (natural log, fp32) saved for the backward. A query whose
key set is empty gets output 0 and ``lse = -inf``; its gradients are 0.

Backward (the FA2 scheme, no atomics): ``delta = rowsum(dO * O)`` (a small preprocessing
kernel), then one program per key block accumulates ``dK``/``dV`` stepping through the query
blocks, and a second kernel, one program per query block, accumulates ``dQ`` stepping through the
key blocks. When the whole key set fits in one key block (bf16/fp16: ``Nk <= 128`` for head dims
up to 64, ``<= 64`` above; the MAE encoder and short varlen sequences) and no gradient reaches the
lse, one fused kernel does all three: with a single key block each query block's ``dQ`` is complete
after one step, so it is stored at once, and ``delta`` is computed in the same pass.

Short sequences: one query block covers a whole MAE encoder sequence, and a forward program may
cover several heads of the same sample (``HEADS_PER_PROGRAM``, on CUDA when programs are plentiful).

fp32 inputs take 3xTF32 dots (``input_precision="tf32x3"``: tensor cores, close to fp32 accuracy).
Block sizes and warps were chosen by compiling for sm_90a and sm_80 and reading ``ptxas -v``: no
spills for bf16/fp16 on sm_90a at head dims 32-128 (small ones in the sm_80 dK/dV kernel).

Head dims up to 256 (32, 64, 80, 128 are the tested ones); a head dim that is not a power of two
(80) runs in the next power-of-two block with masked loads. Rows are read with strides; the last
dimension must have unit stride (the launchers here assume it; ``fastmim.ops`` ensures it).

This module imports only torch and triton so it can be copied into another codebase.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under the interpreter, tl.dot on bf16/fp16 operands returns wrong values (triton 3.8/3.9):
# operands are then rounded to the input dtype (as on the GPU) and widened to fp32 for the dot.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634

KEYS_ALL = 0  # every key of the sample (dense or varlen)
KEYS_INDEX = 1  # key_index (B, K): the kernel gathers rows of k and v
KEYS_MASK = 2  # key_mask (B, L): invisible keys are skipped by a -inf score

MAX_HEAD_DIM = 256
FUSED_BACKWARD_MAX_KEYS = 128
FUSED_BACKWARD_MAX_KEYS_SMALL_HEAD = 256  # head dims up to 32: see _bwd_blocks


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr, INTERPRET: tl.constexpr, FP32_IN: tl.constexpr,
         FP32_PRECISION: tl.constexpr = "tf32x3"):
    """``a @ b`` with fp32 accumulation, operands rounded to the I/O dtype first (as FA2 does).

    ``FP32_IN``: fp32 operands, multiplied as 3xTF32 (a plain tl.dot would round them to TF32)."""
    a = a.to(DTYPE)
    b = b.to(DTYPE)
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if FP32_IN:
        return tl.dot(a, b, input_precision=FP32_PRECISION)
    else:
        return tl.dot(a, b)


@triton.jit
def _load_key_block(K, V, KIDX, KMASK, k_base, v_base, kidx_base, kmask_base, offs_n, n_k, n_rows,
                    stride_kn, stride_vn, offs_d, d_valid, KEY_MODE: tl.constexpr):
    """Rows ``offs_n`` of the key set: k, v blocks ``(BLOCK_N, BLOCK_D)``, their row numbers, which of
    them are rows of k/v (``n_rows`` per sample), visibility."""
    n_valid = offs_n < n_k
    if KEY_MODE == 1:
        ids = tl.load(KIDX + kidx_base + offs_n, mask=n_valid, other=0)
        # Ids are not checked on the device: one outside [0, n_rows) (compared before any narrowing)
        # is a key that is not visible, its row neither read nor written.
        n_valid = n_valid & (ids >= 0) & (ids < n_rows)
        rows = tl.where(n_valid, ids, 0).to(tl.int32)
    else:
        rows = offs_n
    tile_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=tile_mask, other=0.0)
    v = tl.load(V + v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=tile_mask, other=0.0)
    visible = n_valid
    if KEY_MODE == 2:
        visible = visible & (tl.load(KMASK + kmask_base + offs_n, mask=n_valid, other=0) != 0)
    return k, v, rows, n_valid, visible


@triton.jit
def _seq_extent(CU, b, N_Q, N_K, N_ROWS, VARLEN: tl.constexpr):
    """(first row, number of queries, number of keys) of sample ``b``."""
    if VARLEN:
        # Offsets are not checked on the device: clamped to the packed rows [0, N_ROWS] (and the end
        # to the start), bad ones give wrong sequences, never rows outside the tensors.
        seq_start = tl.minimum(tl.maximum(tl.load(CU + b), 0), N_ROWS)
        seq_end = tl.minimum(tl.maximum(tl.load(CU + b + 1), seq_start), N_ROWS)
        seq_len = (seq_end - seq_start).to(tl.int32)
        return seq_start.to(tl.int64), seq_len, seq_len
    else:
        return tl.zeros([], dtype=tl.int64), N_Q, N_K


@triton.jit
def _fwd_one_head(Q, K, V, Out, LSE, KIDX, KMASK, b, h, seq_start, n_q, n_k, n_rows, start_m, qk_scale,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                  stride_lb, stride_lh, stride_ln, stride_ib, stride_mb,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  KEY_MODE: tl.constexpr, INTERPRET: tl.constexpr, FP32_IN: tl.constexpr):
    DTYPE: tl.constexpr = Q.dtype.element_ty
    b = b.to(tl.int64)
    h = h.to(tl.int64)
    q_base = b * stride_qb + h * stride_qh + seq_start * stride_qn
    k_base = b * stride_kb + h * stride_kh + seq_start * stride_kn
    v_base = b * stride_vb + h * stride_vh + seq_start * stride_vn
    o_base = b * stride_ob + h * stride_oh + seq_start * stride_on
    l_base = b * stride_lb + h * stride_lh + seq_start * stride_ln

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < n_q
    d_valid = offs_d < HEAD_DIM
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, rows, in_rows, visible = _load_key_block(K, V, KIDX, KMASK, k_base, v_base, b * stride_ib,
                                                       b * stride_mb, offs_n, n_k, n_rows, stride_kn, stride_vn,
                                                       offs_d, d_valid, KEY_MODE)
        s = _dot(q, tl.trans(k), DTYPE, INTERPRET, FP32_IN) * qk_scale
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far has m_new = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, DTYPE, INTERPRET, FP32_IN)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(Out + o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + l_base + offs_m * stride_ln, lse, mask=m_valid)


# The kernels' pointer arguments (rows read with the strides passed beside them):
#   Q, Out, DO, DQ       (B, H, Nq, D), or (T, H, D) packed with VARLEN
#   K, V, DK, DV         (B, H, Nk, D), or (T, H, D) packed with VARLEN
#   LSE, DELTA           (B, H, Nq) fp32, or (T, H) packed
#   CU                   (B + 1,) int32 sequence offsets (VARLEN only)
#   KIDX                 (B, K) int32/int64 visible key ids (KEY_MODE index only)
#   KMASK                (B, L) bool/uint8 key visibility (KEY_MODE mask only)


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, LSE, CU, KIDX, KMASK, N_Q, N_K, N_ROWS, H, qk_scale,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                     stride_lb, stride_lh, stride_ln, stride_ib, stride_mb,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     HEADS_PER_PROGRAM: tl.constexpr, VARLEN: tl.constexpr, KEY_MODE: tl.constexpr,
                     INTERPRET: tl.constexpr, FP32_IN: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    head_groups = H // HEADS_PER_PROGRAM
    b = tl.program_id(1) // head_groups
    h0 = (tl.program_id(1) % head_groups) * HEADS_PER_PROGRAM
    seq_start, n_q, n_k = _seq_extent(CU, b, N_Q, N_K, N_ROWS, VARLEN)
    if start_m >= n_q:  # varlen: the grid covers max_seqlen, this sample is shorter
        return
    # Short sequences leave a program little work: it then covers several heads (same rows).
    for i in tl.static_range(HEADS_PER_PROGRAM):
        _fwd_one_head(Q, K, V, Out, LSE, KIDX, KMASK, b, h0 + i, seq_start, n_q, n_k, N_ROWS, start_m, qk_scale,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                      stride_lb, stride_lh, stride_ln, stride_ib, stride_mb,
                      HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, KEY_MODE, INTERPRET, FP32_IN)


@triton.jit
def _attn_bwd_preprocess_kernel(Out, DO, DELTA, CU, N_Q, N_ROWS, H,
                                stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                                stride_lb, stride_lh, stride_ln,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                VARLEN: tl.constexpr):
    """``delta = rowsum(dO * O)`` in fp32, laid out like the lse."""
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // H
    h = (tl.program_id(1) % H).to(tl.int64)
    seq_start, n_q, n_k = _seq_extent(CU, b, N_Q, N_Q, N_ROWS, VARLEN)
    if start_m >= n_q:
        return
    b = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < n_q
    mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    # Base pointers in 64-bit scalars, per-tile offsets in 32 bits (a tile's offsets are small).
    Out += b * stride_ob + h * stride_oh + seq_start * stride_on
    DO += b * stride_dob + h * stride_doh + seq_start * stride_don
    DELTA += b * stride_lb + h * stride_lh + seq_start * stride_ln
    o = tl.load(Out + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + offs_m * stride_ln, tl.sum(o * do, 1), mask=m_valid)


@triton.jit
def _bwd_scores(q, k, lse2, visible, qk_scale, DTYPE: tl.constexpr, INTERPRET: tl.constexpr, FP32_IN: tl.constexpr):
    """Softmax probabilities ``P`` of a (query block, key block) tile, recomputed from the saved lse."""
    s = _dot(q, tl.trans(k), DTYPE, INTERPRET, FP32_IN) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    return tl.where(visible[None, :], p, 0.0)


@triton.jit
def _load_query_block(Q, DO, LSE, DELTA, Out, q_base, do_base, l_base, o_base, offs_m, n_q,
                      stride_qn, stride_don, stride_ln, stride_on, offs_d, d_valid, FUSED: tl.constexpr):
    m_valid = offs_m < n_q
    tile_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=tile_mask, other=0.0)
    do = tl.load(DO + do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=tile_mask, other=0.0)
    lse = tl.load(LSE + l_base + offs_m * stride_ln, mask=m_valid, other=float("inf"))
    # An empty key set has lse = -inf: use +inf so every P of the row is exp2(-inf) = 0 (gradients 0).
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if FUSED:
        o = tl.load(Out + o_base + offs_m[:, None] * stride_on + offs_d[None, :], mask=tile_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    else:
        delta = tl.load(DELTA + l_base + offs_m * stride_ln, mask=m_valid, other=0.0)
    return q, do, lse2, delta, tile_mask


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, Out, DO, LSE, DELTA, DQ, DK, DV, CU, KIDX, KMASK, N_Q, N_K, N_ROWS, H,
                          sm_scale, qk_scale,
                          stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                          stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                          stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                          stride_lb, stride_lh, stride_ln, stride_ib, stride_mb,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          VARLEN: tl.constexpr, KEY_MODE: tl.constexpr, FUSED: tl.constexpr,
                          INTERPRET: tl.constexpr, FP32_IN: tl.constexpr):
    """dK, dV of one key block (and, if ``FUSED``, dQ and delta: the whole key set is this block)."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1) // H
    h = (tl.program_id(1) % H).to(tl.int64)
    seq_start, n_q, n_k = _seq_extent(CU, b, N_Q, N_K, N_ROWS, VARLEN)
    if start_n >= n_k:
        return
    b = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    k, v, rows, in_rows, visible = _load_key_block(K, V, KIDX, KMASK,
                                                   b * stride_kb + h * stride_kh + seq_start * stride_kn,
                                                   b * stride_vb + h * stride_vh + seq_start * stride_vn,
                                                   b * stride_ib, b * stride_mb, offs_n, n_k, N_ROWS, stride_kn,
                                                   stride_vn, offs_d, d_valid, KEY_MODE)
    q_base = b * stride_qb + h * stride_qh + seq_start * stride_qn
    do_base = b * stride_dob + h * stride_doh + seq_start * stride_don
    o_base = b * stride_ob + h * stride_oh + seq_start * stride_on
    l_base = b * stride_lb + h * stride_lh + seq_start * stride_ln
    dq_base = b * stride_dqb + h * stride_dqh + seq_start * stride_dqn

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse2, delta, tile_mask = _load_query_block(Q, DO, LSE, DELTA, Out, q_base, do_base, l_base, o_base,
                                                          offs_m, n_q, stride_qn, stride_don, stride_ln, stride_on,
                                                          offs_d, d_valid, FUSED)
        p = _bwd_scores(q, k, lse2, visible, qk_scale, DTYPE, INTERPRET, FP32_IN)
        dv += _dot(tl.trans(p), do, DTYPE, INTERPRET, FP32_IN)
        dp = _dot(do, tl.trans(v), DTYPE, INTERPRET, FP32_IN)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds), q, DTYPE, INTERPRET, FP32_IN)
        if FUSED:
            dq = _dot(ds, k, DTYPE, INTERPRET, FP32_IN) * sm_scale
            tl.store(DQ + dq_base + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=tile_mask)
    dk = dk * sm_scale
    n_mask = in_rows[:, None] & d_valid[None, :]
    DK += b * stride_dkb + h * stride_dkh + seq_start * stride_dkn
    DV += b * stride_dvb + h * stride_dvh + seq_start * stride_dvn
    dk_ptrs = DK + rows[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + rows[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_mask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, KIDX, KMASK, N_Q, N_K, N_ROWS, H, sm_scale, qk_scale,
                        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                        stride_dqb, stride_dqh, stride_dqn, stride_lb, stride_lh, stride_ln, stride_ib, stride_mb,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        VARLEN: tl.constexpr, KEY_MODE: tl.constexpr, INTERPRET: tl.constexpr, FP32_IN: tl.constexpr):
    """dQ of one query block, accumulated over every key block."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // H
    h = (tl.program_id(1) % H).to(tl.int64)
    seq_start, n_q, n_k = _seq_extent(CU, b, N_Q, N_K, N_ROWS, VARLEN)
    if start_m >= n_q:
        return
    b = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_base = b * stride_qb + h * stride_qh + seq_start * stride_qn
    l_base = b * stride_lb + h * stride_lh + seq_start * stride_ln
    q, do, lse2, delta, tile_mask = _load_query_block(Q, DO, LSE, DELTA, Q, q_base,
                                                      b * stride_dob + h * stride_doh + seq_start * stride_don,
                                                      l_base, q_base, offs_m, n_q, stride_qn, stride_don, stride_ln,
                                                      stride_qn, offs_d, d_valid, False)
    k_base = b * stride_kb + h * stride_kh + seq_start * stride_kn
    v_base = b * stride_vb + h * stride_vh + seq_start * stride_vn
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, rows, in_rows, visible = _load_key_block(K, V, KIDX, KMASK, k_base, v_base, b * stride_ib,
                                                       b * stride_mb, offs_n, n_k, N_ROWS, stride_kn, stride_vn,
                                                       offs_d, d_valid, KEY_MODE)
        p = _bwd_scores(q, k, lse2, visible, qk_scale, DTYPE, INTERPRET, FP32_IN)
        dp = _dot(do, tl.trans(v), DTYPE, INTERPRET, FP32_IN)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds, k, DTYPE, INTERPRET, FP32_IN)
    dq = dq * sm_scale
    DQ += b * stride_dqb + h * stride_dqh + seq_start * stride_dqn
    tl.store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------------------------
# Launchers. Layout of every tensor is given as (stride_b, stride_h, stride_n); varlen tensors
# (T, H, D) have stride_b = 0 and their rows offset by cu_seqlens[b]. lse/delta are fp32,
# (B, H, Nq) dense or (H, T) varlen.
# ----------------------------------------------------------------------------------------------


def _bhn_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    if varlen:  # (T, H, D)
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    if varlen:  # (H, T)
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def _blocks(head_dim: int, max_q: int, max_k: int, fp32: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for short sequences.

    Chosen by compiling for sm_80 and sm_90a (ptxas -v): no register spills for fp16/bf16 at the tested
    head dims, shared memory under 100 KiB. fp32 inputs (3xTF32 dots, 4-byte tiles) get smaller
    tiles, 8 warps and fewer pipeline stages.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Short sequences: the whole key set in one block, so a row's softmax needs no rescaling.
    max_block_n = FUSED_BACKWARD_MAX_KEYS if block_d <= 64 else 64
    max_block_m = 64
    if fp32:
        max_block_n, max_block_m = (64, 32) if block_d <= 64 else (32, 32)
    block_n = max(16, min(triton.next_power_of_2(max_k), max_block_n))
    block_m = max(16, min(triton.next_power_of_2(max_q), max_block_m))
    num_warps = 4 if block_m * max(block_n, block_d) <= 64 * 64 and not fp32 else 8
    return block_m, block_n, block_d, num_warps, 2 if fp32 else 3


def _bwd_blocks(head_dim: int, max_q: int, max_k: int, fp32: bool = False) -> dict[str, int]:
    """Backward tiles, FA2-style: the dK/dV program holds a large key block and steps through queries in
    small blocks; the dQ program holds a large query block and steps through keys in small blocks
    (a small step keeps the (M, N) score, dP and dS tiles, next to two accumulators, out of spills)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    _, key_block, _, _, num_stages = _blocks(head_dim, max_q, max_k, fp32)
    step = 16 if fp32 or block_d > 64 else 32
    query_block = 32 if fp32 else 64
    # A key block that cannot hold every key gains nothing from its size, and at 128 keys it spills on
    # sm_80 (ptxas -v): such sequences take 64-key blocks (more programs, no spill).
    dkdv_n = key_block if max_k <= key_block else min(key_block, 64)
    if not fp32 and block_d <= 32 and key_block < max_k <= FUSED_BACKWARD_MAX_KEYS_SMALL_HEAD:
        # Short sequences at small head dims (the MAE decoder: 197 tokens, head dim 32): every key and value
        # of a (batch, head) stays on chip in one 256-key block, so one program per (batch, head) writes dQ,
        # dK and dV in one pass (the fused kernel) instead of the three-kernel path; 16-query steps and 8
        # warps compile without spills for sm_80 and sm_90a (ptxas -v).
        return dict(dkdv_m=16, dkdv_n=FUSED_BACKWARD_MAX_KEYS_SMALL_HEAD,
                    dq_m=max(16, min(triton.next_power_of_2(max_q), query_block)), dq_n=step, block_d=block_d,
                    num_warps=8, num_stages=num_stages)
    return dict(
        dkdv_m=max(16, min(triton.next_power_of_2(max_q), step)), dkdv_n=dkdv_n,
        dq_m=max(16, min(triton.next_power_of_2(max_q), query_block)),
        dq_n=max(16, min(triton.next_power_of_2(max_k), step)),
        block_d=block_d, num_warps=4 if block_d <= 64 and dkdv_n <= 64 and not fp32 else 8, num_stages=num_stages,
    )


def _key_args(key_index: torch.Tensor | None, key_mask: torch.Tensor | None, dummy: torch.Tensor):
    if key_index is not None:
        return KEYS_INDEX, key_index, key_index.stride(0), dummy, 0
    if key_mask is not None:
        mask = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
        return KEYS_MASK, dummy, 0, mask, mask.stride(0)
    return KEYS_ALL, dummy, 0, dummy, 0


def _problem(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int,
             key_index: torch.Tensor | None):
    """``n_rows``: the rows of k along the sequence (varlen: the packed T), the bound the kernels hold
    the values of ``cu_seqlens`` and ``key_index`` to."""
    varlen = cu_seqlens is not None
    if varlen:
        batch, heads, head_dim = cu_seqlens.numel() - 1, q.shape[1], q.shape[2]
        n_q = n_k = max_seqlen
        n_rows = k.shape[0]
    else:
        batch, heads, n_q, head_dim = q.shape
        n_k = key_index.shape[1] if key_index is not None else k.shape[2]
        n_rows = k.shape[2]
    return varlen, batch, heads, head_dim, n_q, n_k, n_rows


def _heads_per_program(heads: int, batch: int, n_q_blocks: int, block_m: int, device: torch.device) -> int:
    """Several heads per program when sequences are short and programs plentiful (fewer, longer programs)."""
    if block_m > 64 or device.type != "cuda":
        return 1
    programs = batch * heads * n_q_blocks
    target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    for hpp in (4, 2):
        if heads % hpp == 0 and programs // hpp >= target:
            return hpp
    return 1


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0,
                      key_index: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                      heads_per_program: int | None = None, out: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out`` (like q) and ``lse`` (fp32, (B, H, Nq) or (H, T) varlen).

    ``out``: where to write the output, shaped like q with any strides but a unit last one (a
    ``(B, N, H, D)`` buffer seen as ``(B, H, N, D)``, so the model's reshape back is a view)."""
    varlen, batch, heads, head_dim, n_q, n_k, n_rows = _problem(q, k, cu_seqlens, max_seqlen, key_index)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((heads, q.shape[0]) if varlen else (batch, heads, n_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    block_m, block_n, block_d, num_warps, num_stages = _blocks(head_dim, n_q, n_k, q.dtype == torch.float32)
    n_q_blocks = triton.cdiv(n_q, block_m)
    hpp = heads_per_program or _heads_per_program(heads, batch, n_q_blocks, block_m, q.device)
    if heads % hpp:
        raise ValueError(f"heads_per_program={hpp} must divide the number of heads {heads}")
    key_mode, kidx, stride_ib, kmask, stride_mb = _key_args(key_index, key_mask, lse)
    cu = cu_seqlens if varlen else lse
    grid = (n_q_blocks, batch * (heads // hpp))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu, kidx, kmask, n_q, n_k, n_rows, heads, scale * LOG2E,
        *_bhn_strides(q, varlen), *_bhn_strides(k, varlen), *_bhn_strides(v, varlen), *_bhn_strides(out, varlen),
        *_lse_strides(lse, varlen), stride_ib, stride_mb,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HEADS_PER_PROGRAM=hpp,
        VARLEN=varlen, KEY_MODE=key_mode, INTERPRET=_INTERPRET, FP32_IN=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, scale: float, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0,
                       key_index: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                       grad_lse: torch.Tensor | None = None,
                       grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``dq, dk, dv`` (like q, k, v). ``grad_lse`` (like lse) is the gradient reaching the lse, if any.

    ``grads``: ``(dq, dk, dv)`` to write into, with any strides but a unit last one (views of one
    packed ``dqkv`` buffer); not with ``key_index``, whose invisible rows must be zeroed first."""
    varlen, batch, heads, head_dim, n_q, n_k, n_rows = _problem(q, k, cu_seqlens, max_seqlen, key_index)
    if grads is not None:
        if key_index is not None:
            raise ValueError("attention_backward: grads= cannot be combined with key_index")
        dq, dk, dv = grads
    else:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        # With key_index only the visible rows of k/v get a gradient written: the others must be 0.
        alloc = torch.zeros_like if key_index is not None else torch.empty_like
        dk = alloc(k, memory_format=torch.contiguous_format)
        dv = alloc(v, memory_format=torch.contiguous_format)
    if q.numel() == 0 or k.numel() == 0 or n_k == 0:  # nothing to attend to: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    blocks = _bwd_blocks(head_dim, n_q, n_k, q.dtype == torch.float32)
    key_mode, kidx, stride_ib, kmask, stride_mb = _key_args(key_index, key_mask, lse)
    cu = cu_seqlens if varlen else lse
    fused = n_k <= blocks["dkdv_n"] and grad_lse is None
    common = dict(HEAD_DIM=head_dim, BLOCK_D=blocks["block_d"], VARLEN=varlen, INTERPRET=_INTERPRET,
                  FP32_IN=q.dtype == torch.float32, num_warps=blocks["num_warps"], num_stages=blocks["num_stages"])
    if fused:
        delta = lse  # unused
    else:
        delta = torch.empty_like(lse)
        _attn_bwd_preprocess_kernel[(triton.cdiv(n_q, blocks["dq_m"]), batch * heads)](
            out, grad_out, delta, cu, n_q, n_rows, heads, *_bhn_strides(out, varlen), *_bhn_strides(grad_out, varlen),
            *_lse_strides(delta, varlen), HEAD_DIM=head_dim, BLOCK_M=blocks["dq_m"], BLOCK_D=blocks["block_d"],
            VARLEN=varlen, num_warps=4,
        )
        if grad_lse is not None:
            # d lse / d s_j = p_j: the extra term enters dS = P * (dP - delta) as -grad_lse in delta.
            delta -= grad_lse
    _attn_bwd_dkdv_kernel[(triton.cdiv(n_k, blocks["dkdv_n"]), batch * heads)](
        q, k, v, out, grad_out, lse, delta, dq, dk, dv, cu, kidx, kmask, n_q, n_k, n_rows, heads, scale,
        scale * LOG2E,
        *_bhn_strides(q, varlen), *_bhn_strides(k, varlen), *_bhn_strides(v, varlen), *_bhn_strides(out, varlen),
        *_bhn_strides(grad_out, varlen), *_bhn_strides(dq, varlen), *_bhn_strides(dk, varlen),
        *_bhn_strides(dv, varlen), *_lse_strides(lse, varlen), stride_ib, stride_mb,
        BLOCK_M=blocks["dkdv_m"], BLOCK_N=blocks["dkdv_n"], KEY_MODE=key_mode, FUSED=fused, **common,
    )
    if not fused:
        _attn_bwd_dq_kernel[(triton.cdiv(n_q, blocks["dq_m"]), batch * heads)](
            q, k, v, grad_out, lse, delta, dq, cu, kidx, kmask, n_q, n_k, n_rows, heads, scale, scale * LOG2E,
            *_bhn_strides(q, varlen), *_bhn_strides(k, varlen), *_bhn_strides(v, varlen),
            *_bhn_strides(grad_out, varlen), *_bhn_strides(dq, varlen), *_lse_strides(lse, varlen),
            stride_ib, stride_mb, BLOCK_M=blocks["dq_m"], BLOCK_N=blocks["dq_n"], KEY_MODE=key_mode, **common,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Packed qkv: the output of a ViT's qkv projection, read and written in place
# ----------------------------------------------------------------------------------------------


def unpack_qkv(qkv: torch.Tensor, varlen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``q, k, v`` of a packed ``qkv``: ``(B, N, 3, H, D)`` -> three ``(B, H, N, D)``, or
    ``(T, 3, H, D)`` -> three ``(T, H, D)``; no copy."""
    return qkv.unbind(1) if varlen else qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _bhnd_view(t: torch.Tensor, varlen: bool) -> torch.Tensor:
    """A ``(B, N, H, D)`` tensor seen as ``(B, H, N, D)`` (varlen ``(T, H, D)`` as it is)."""
    return t if varlen else t.transpose(1, 2)


def attention_qkvpacked_forward(qkv: torch.Tensor, scale: float, cu_seqlens: torch.Tensor | None = None,
                                max_seqlen: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` ``(B, N, H, D)`` (varlen ``(T, H, D)``) and ``lse`` from a packed ``qkv``.

    The output is written in the token-major layout, so the model's ``out.reshape(B, N, H * D)``
    before the projection is a view, not the copy a ``(B, H, N, D)`` output would need."""
    varlen = cu_seqlens is not None
    out = torch.empty((*qkv.shape[:-3], *qkv.shape[-2:]), dtype=qkv.dtype, device=qkv.device)
    _, lse = attention_forward(*unpack_qkv(qkv, varlen), scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                               out=_bhnd_view(out, varlen))
    return out, lse


def attention_qkvpacked_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 scale: float, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0,
                                 grad_lse: torch.Tensor | None = None) -> torch.Tensor:
    """``dqkv`` shaped like ``qkv``: the kernels write ``dq``, ``dk``, ``dv`` into one buffer, so
    autograd neither stacks three gradients nor copies them back through the permute."""
    varlen = cu_seqlens is not None
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    attention_backward(_bhnd_view(grad_out, varlen), *unpack_qkv(qkv, varlen), _bhnd_view(out, varlen), lse, scale,
                       cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, grad_lse=grad_lse,
                       grads=unpack_qkv(dqkv, varlen))
    return dqkv
