"""visible_attention: Triton kernels and the reference against float64 math, in every mode.

Tolerance rule (as in flash-attention's tests): the kernel's relative error against the float64
reference must stay within twice the error of a naive attention computed in the same low
precision (``upcast=False``), plus a small floor. Errors of order 1 (a missing key, a wrong
row) are far above it. The CPU interpreter runs every (N, D) pair of the grid in one dtype; the
full (N, D, dtype) grid and a few larger cases are marked ``cuda``.

The backends of ``attention()`` and the generated (hypothesis) cases are held to softmax(QK^T)V
written out in float64 (``_softmax_attention64``), which shares no code with fastmim. Bad offsets
and key ids must raise one ValueError on every backend, and given straight to the kernels must not
reach outside a tensor (checked with poisoned guards, in a subprocess).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmim import testing
from fastmim.ops import check_indices, use_backend
from fastmim.ops.attention import visible_attention, visible_attention_qkvpacked, visible_attention_reference
from fastmim.ops.attention_router import ATTN_BACKENDS, attention, attention_qkvpacked, choose_attn_backend

DEVICES = testing.kernel_devices()
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Floor of the tolerance: rounding that a naive low-precision attention can dodge by luck.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

N_VALUES = (1, 17, 50, 64, 197)
HEAD_DIMS = (32, 64, 80, 128)
# The CPU interpreter runs every (N, head dim) pair in one dtype (rotating through the three);
# CUDA runs the full grid.
PAIRS = [(n, d) for n in N_VALUES for d in HEAD_DIMS]
CPU_GRID = [(n, d, DTYPES[i % len(DTYPES)]) for i, (n, d) in enumerate(PAIRS)]
FULL_GRID = [(n, d, dt) for n, d in PAIRS for dt in DTYPES]
GRID = [pytest.param(*c, marks=() if c in CPU_GRID else pytest.mark.cuda) for c in FULL_GRID]


def _randn(*shape, dtype, device):
    return torch.randn(*shape, dtype=dtype, device=device)


def _forward_backward(fn, tensors, grad_out):
    """``fn(*tensors)`` and the gradients of ``<out, grad_out>`` w.r.t. each tensor."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def _softmax_attention64(q, k, v, *, cu_seqlens=None, max_seqlen=None, key_visible=None, scale=None):
    """``(out, lse)`` of softmax(scale q k^T) v written out in float64, one sample (or packed sequence) at a
    time over the keys its queries may see: independent of fastmim's code, so a test against it can fail."""
    del max_seqlen  # a bound for the kernels only
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:  # (T, H, D): each sequence as a dense sample of its own
        outs, lses = [], []
        for lo, hi in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
            out, lse = _softmax_attention64(*(t[lo:hi].transpose(0, 1)[None] for t in (q, k, v)), scale=scale)
            outs.append(out[0].transpose(0, 1))
            lses.append(lse[0])
        if not outs:  # B = 0
            return q * 0.0, q.new_empty(q.shape[1], 0)
        return torch.cat(outs), torch.cat(lses, dim=-1)
    outs, lses = [], []
    for b in range(q.shape[0]):
        keys = torch.arange(k.shape[2])
        if key_visible is not None:
            keys = key_visible[b].nonzero()[:, 0] if key_visible.dtype == torch.bool else key_visible[b]
        keys = keys.cpu()
        scores = scale * q[b] @ k[b][:, keys].transpose(-2, -1)  # (H, N, K)
        if keys.numel() == 0:  # no visible key: output 0, lse -inf (q still in the graph: zero gradient)
            outs.append(q[b] * 0.0)
            lses.append(torch.full(q.shape[1:3], float("-inf"), dtype=q.dtype, device=q.device))
        else:
            outs.append(torch.softmax(scores, dim=-1) @ v[b][:, keys])
            lses.append(torch.logsumexp(scores, dim=-1))
    if not outs:  # B = 0
        return q * 0.0, q.new_empty(q.shape[:3])
    return torch.stack(outs), torch.stack(lses)


@contextlib.contextmanager
def _on_triton_kernels():
    """Run forward and backward on the Triton kernels, their outputs NaN-poisoned; yields the launch counts.

    The backward op chooses its backend when autograd calls it, so the block must hold the backward too.
    """
    from fastmim.kernels import attention as kernels

    with use_backend("triton"), testing.poison_allocations(kernels), \
            testing.count_calls(kernels, {"forward": "attention_forward", "backward": "attention_backward"}) as calls:
        yield calls


def _check(fast, ref, tensors, dtype, device, names=("q", "k", "v")):
    """Compare ``fast`` (Triton kernels on ``device``, in ``dtype``) with ``ref`` in float64 and in ``dtype``
    (the yardstick), forward and backward."""
    cpu = [t.cpu() for t in tensors]
    low = [t.to(dtype) for t in cpu]
    grad_out = torch.randn_like(ref(*[t.double() for t in low])).float()
    out64, grads64 = _forward_backward(ref, [t.double() for t in low], grad_out.double())
    out_lp, grads_lp = _forward_backward(lambda *a: ref(*a, upcast=False), low, grad_out)
    with _on_triton_kernels() as calls:
        out, grads = _forward_backward(fast, [t.to(device) for t in low], grad_out.to(device))
    assert calls == {"forward": 1, "backward": 1}, f"the Triton kernels did not run forward and backward: {calls}"
    for name, got, yard, want in zip(("out", *names), [out, *grads], [out_lp, *grads_lp], [out64, *grads64],
                                     strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        err, err_lp = testing.rel_error(got, want), testing.rel_error(yard, want)
        tol = 2 * err_lp + FLOOR[dtype]
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.2e} (naive {dtype} attention: {err_lp:.2e})"


# ---------------------------------------------------------------------------------------------
# dense
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, head_dim, dtype", GRID)
def test_dense_matches_reference(device, n, head_dim, dtype):
    q, k, v = (_randn(1, 2, n, head_dim, dtype=torch.float32, device="cpu") for _ in range(3))
    _check(visible_attention, visible_attention_reference, (q, k, v), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_cross_lengths_strided_and_scale(device):
    """k/v longer than q; q read through strides of a (B, N, H, D) buffer; explicit scale."""
    q = _randn(2, 23, 3, 64, dtype=torch.float32, device="cpu").transpose(1, 2)  # non-contiguous view
    k, v = (_randn(2, 3, 70, 64, dtype=torch.float32, device="cpu") for _ in range(2))
    _check(lambda q, k, v: visible_attention(q, k, v, scale=0.3),
           lambda q, k, v, upcast=True: visible_attention_reference(q, k, v, scale=0.3, upcast=upcast),
           (q, k, v), torch.float16, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [50, 197])
def test_kernels_write_every_element(device, n):
    """Output, lse and gradients come from the kernels, not from what the memory held (NaN poison)."""
    from fastmim.kernels import attention as kernels

    q, k, v = (_randn(1, 2, n, 80, dtype=torch.bfloat16, device=device) for _ in range(3))
    with testing.poison_allocations(kernels):
        out, lse = kernels.attention_forward(q, k, v, 80**-0.5)
        dq, dk, dv = kernels.attention_backward(torch.randn_like(out), q, k, v, out, lse, 80**-0.5)
    for t in (out, lse, dq, dk, dv):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", DEVICES)
def test_heads_per_program(device):
    """A program covering several heads computes the same as one head per program."""
    from fastmim.kernels.attention import attention_forward

    q, k, v = (_randn(2, 4, 17, 32, dtype=torch.float16, device=device) for _ in range(3))
    one, lse_one = attention_forward(q, k, v, 0.2, heads_per_program=1)
    four, lse_four = attention_forward(q, k, v, 0.2, heads_per_program=4)
    assert torch.equal(one, four) and torch.equal(lse_one, lse_four)
    ref = visible_attention_reference(q.double(), k.double(), v.double(), scale=0.2)
    assert testing.rel_error(four, ref) < 2e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("through", ["out+lse", "lse"])
def test_lse_and_its_gradient(device, through):
    q, k, v = (_randn(1, 2, 33, 32, dtype=torch.float32, device="cpu") for _ in range(3))

    def loss(out, lse):
        return lse if through == "lse" else out.sum(-1) + lse.to(out.dtype)

    def fast(q, k, v):
        return loss(*visible_attention(q, k, v, return_lse=True))

    def ref(q, k, v, upcast=True):
        return loss(*visible_attention_reference(q, k, v, return_lse=True, upcast=upcast))

    _check(fast, ref, (q, k, v), torch.float32, device)


def _out_plus_lse(out, lse):
    return out.sum(-1) + lse


def test_reference_gradcheck_float64():
    """The reference backward (explicit formula, used by the op's reference backend) is the true gradient."""
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, False, True, True, False]])
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    with use_backend("reference"):
        assert torch.autograd.gradcheck(lambda q, k, v: visible_attention(q, k, v), (q, k, v))
        assert torch.autograd.gradcheck(lambda q, k, v: visible_attention(q, k, v, key_visible=mask), (q, k, v))
        assert torch.autograd.gradcheck(
            lambda q, k, v: visible_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                              cu_seqlens=cu, max_seqlen=3), (q, k, v))
        assert torch.autograd.gradcheck(lambda q, k, v: _out_plus_lse(*visible_attention(q, k, v, return_lse=True)),
                                        (q, k, v))


# ---------------------------------------------------------------------------------------------
# varlen packed
# ---------------------------------------------------------------------------------------------


def _per_sample_dense(lengths):
    """Varlen attention computed as one dense reference call per sample (the definition)."""
    def ref(q, k, v, upcast=True):
        outs, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            dense = [t[sl].transpose(0, 1)[None] for t in (q, k, v)]
            if n:  # a sequence of length 0 has no rows
                outs.append(visible_attention_reference(*dense, upcast=upcast)[0].transpose(0, 1))
            start += n
        return torch.cat(outs)
    return ref


VARLEN_CASES = [
    pytest.param([1, 17, 50], 32, torch.bfloat16, 64, id="short-bf16"),
    pytest.param([50, 1, 0, 23], 80, torch.float16, 50, id="hd80-empty-seq"),
    pytest.param([197, 64, 1], 32, torch.bfloat16, 197, id="decoder-len"),
    pytest.param([64, 50, 17, 1, 197], 128, torch.float16, 256, marks=pytest.mark.cuda, id="hd128-loose-bound"),
    pytest.param([20, 3], 128, torch.bfloat16, 32, id="hd128-loose-bound-small"),
    pytest.param([49, 33, 1], 64, torch.float32, 49, id="fp32"),
    pytest.param([37], 64, torch.bfloat16, 37, id="one-seq"),  # cu_seqlens of length 2
    pytest.param([1], 32, torch.float16, 1, id="one-seq-len1"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths, head_dim, dtype, max_seqlen", VARLEN_CASES)
def test_varlen_equals_per_sample_dense(device, lengths, head_dim, dtype, max_seqlen):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (_randn(total, 3, head_dim, dtype=torch.float32, device="cpu") for _ in range(3))

    def fast(q, k, v):
        return visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen)

    _check(fast, _per_sample_dense(lengths), (q, k, v), dtype, device)
    # The op's own reference (block-diagonal mask) agrees with the per-sample definition.
    ref = visible_attention_reference(q.double(), k.double(), v.double(), cu_seqlens=cu.cpu(), max_seqlen=max_seqlen)
    assert testing.rel_error(ref, _per_sample_dense(lengths)(q.double(), k.double(), v.double())) < 1e-12


# ---------------------------------------------------------------------------------------------
# packed qkv (the layout of the models' qkv projection)
# ---------------------------------------------------------------------------------------------


def _views(qkv, varlen):
    return qkv.unbind(1) if varlen else qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _token_major(t, varlen):
    """An output ``(B, H, N, D)`` as the packed op gives it, ``(B, N, H, D)`` (varlen ``(T, H, D)`` as it is)."""
    return t if varlen else t.transpose(1, 2)


def _qkvpacked_reference(cu_seqlens=None, max_seqlen=None):
    def ref(qkv, upcast=True):
        varlen = cu_seqlens is not None
        out = visible_attention_reference(*_views(qkv, varlen), cu_seqlens=None if not varlen else cu_seqlens.cpu(),
                                          max_seqlen=max_seqlen, upcast=upcast)
        return out if varlen else out.transpose(1, 2)
    return ref


QKVPACKED_CASES = [((1, 50, 3, 64), torch.bfloat16), ((2, 17, 2, 80), torch.float16), ((3, 1, 2, 32), torch.float32),
                   ((2, 197, 2, 32), torch.bfloat16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, dtype", QKVPACKED_CASES)
def test_qkvpacked_dense_matches_reference(device, shape, dtype):
    batch, n, heads, head_dim = shape
    qkv = _randn(batch, n, 3, heads, head_dim, dtype=torch.float32, device="cpu")
    _check(visible_attention_qkvpacked, _qkvpacked_reference(), (qkv,), dtype, device, names=("qkv",))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths, dtype", [([13], torch.float16), ([50, 1, 0, 23], torch.bfloat16)])
def test_qkvpacked_varlen_matches_reference(device, lengths, dtype):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    qkv = _randn(sum(lengths), 3, 2, 64, dtype=torch.float32, device="cpu")
    _check(lambda t: visible_attention_qkvpacked(t, cu_seqlens=cu, max_seqlen=max(lengths)),
           _qkvpacked_reference(cu, max(lengths)), (qkv,), dtype, device, names=("qkv",))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen", [False, True])
def test_qkvpacked_is_visible_attention_on_the_views(device, varlen):
    """Same kernels, other strides: the packed op equals visible_attention on q, k, v views bit for bit,
    its output is token-major (the reshape before the projection is a view) and dqkv is one buffer."""
    if varlen:
        qkv = _randn(31, 3, 2, 32, dtype=torch.bfloat16, device=device)
        kwargs = dict(cu_seqlens=torch.tensor([0, 9, 31], dtype=torch.int32, device=device), max_seqlen=22)
    else:
        qkv = _randn(2, 23, 3, 2, 32, dtype=torch.bfloat16, device=device)
        kwargs = {}
    packed, split = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    with use_backend("triton"):
        out, lse = visible_attention_qkvpacked(packed, return_lse=True, **kwargs)
        ref, ref_lse = visible_attention(*_views(split, varlen), return_lse=True, **kwargs)
        ref = ref if varlen else ref.transpose(1, 2)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
    assert out.is_contiguous() and out.shape == ref.shape
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert torch.equal(packed.grad, split.grad)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("backend", ["fastmim", "sdpa", "reference", None])
def test_attention_qkvpacked_backends_agree(varlen, backend):
    """Every backend against softmax(QK^T)V written out in float64, forward and backward; "fastmim" runs the
    Triton kernels (on CPU through the interpreter), not the reference it would take on CPU by default."""
    device = _backend_device(backend)
    qkv = torch.randn(19, 3, 2, 16) if varlen else torch.randn(2, 19, 3, 2, 16)
    kwargs = dict(cu_seqlens=torch.tensor([0, 7, 19], dtype=torch.int32), max_seqlen=12) if varlen else {}

    grad_out = torch.randn(19, 2, 16) if varlen else torch.randn(2, 19, 2, 16)
    want, (want_grad,) = _forward_backward(
        lambda t: _token_major(_softmax_attention64(*_views(t, varlen), **kwargs)[0], varlen), [qkv.double()],
        grad_out.double())
    kwargs = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    with _kernels_if(backend == "fastmim") as calls:
        out, (grad,) = _forward_backward(lambda t: attention_qkvpacked(t, backend=backend, **kwargs),
                                         [qkv.to(device)], grad_out.to(device))
    assert calls in (None, {"forward": 1, "backward": 1}), calls
    assert out.shape == grad_out.shape
    testing.assert_rel_close(out, want, torch.float32)
    testing.assert_rel_close(grad, want_grad, torch.float32, name="dqkv")


def test_qkvpacked_bad_input():
    with pytest.raises(ValueError, match=r"qkv must be \(B, N, 3, H, D\), got shape \(2, 19, 2, 2, 16\)"):
        visible_attention_qkvpacked(torch.randn(2, 19, 2, 2, 16))
    with pytest.raises(ValueError, match=r"qkv must be \(T, 3, H, D\) with cu_seqlens"):
        visible_attention_qkvpacked(torch.randn(2, 19, 3, 2, 16), cu_seqlens=torch.tensor([0, 2], dtype=torch.int32),
                                    max_seqlen=2)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        attention_qkvpacked([1, 2, 3])
    with pytest.raises(ValueError, match="max_seqlen must be a Python int"):
        visible_attention_qkvpacked(torch.randn(5, 3, 2, 16), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_qkvpacked_compiles_fullgraph():
    torch._dynamo.reset()
    qkv = torch.randn(2, 10, 3, 2, 16, requires_grad=True)

    def f(t):
        return visible_attention_qkvpacked(t).reshape(2, 10, 32)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(qkv)
    out.sum().backward()
    assert torch.allclose(out, f(qkv), atol=1e-6) and torch.isfinite(qkv.grad).all()


# ---------------------------------------------------------------------------------------------
# key-visibility
# ---------------------------------------------------------------------------------------------


def _visible_sets(batch, length, num_visible, device):
    ids = torch.stack([torch.randperm(length)[:num_visible] for _ in range(batch)]).to(device)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device).scatter(1, ids, True)
    return ids, mask


def _gathered_dense(ids):
    """Key-visibility as dense attention on gathered keys (the definition)."""
    def ref(q, k, v, upcast=True):
        index = ids.cpu()[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        return visible_attention_reference(q, k.gather(2, index), v.gather(2, index), upcast=upcast)
    return ref


KEY_CASES = [
    pytest.param(2, 50, 13, 32, torch.bfloat16, id="L50-K13"),
    pytest.param(2, 197, 49, 32, torch.bfloat16, id="decoder-L197-K49"),
    pytest.param(2, 64, 64, 80, torch.float16, id="all-visible-hd80"),
    pytest.param(2, 17, 1, 64, torch.float16, id="one-key"),
    pytest.param(1, 1, 1, 64, torch.bfloat16, id="B1-L1"),
    pytest.param(1, 23, 6, 32, torch.float16, id="B1-L23-K6"),
    pytest.param(2, 197, 150, 128, torch.float16, marks=pytest.mark.cuda, id="L197-K150-hd128"),
    pytest.param(2, 40, 30, 128, torch.bfloat16, id="L40-K30-hd128"),
    pytest.param(2, 50, 20, 64, torch.float32, id="fp32"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["index", "mask"])
@pytest.mark.parametrize("batch, length, num_visible, head_dim, dtype", KEY_CASES)
def test_key_visibility_equals_dense_on_gathered_keys(device, kind, batch, length, num_visible, head_dim, dtype):
    ids, mask = _visible_sets(batch, length, num_visible, device)
    key_visible = ids if kind == "index" else mask
    q, k, v = (_randn(batch, 2, length, head_dim, dtype=torch.float32, device="cpu") for _ in range(3))

    def fast(q, k, v):
        return visible_attention(q, k, v, key_visible=key_visible)

    _check(fast, _gathered_dense(ids), (q, k, v), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_key_visibility_invisible_keys_get_zero_gradient(device):
    ids, mask = _visible_sets(2, 30, 7, device)
    q, k, v = (_randn(2, 2, 30, 32, dtype=torch.float16, device=device).requires_grad_() for _ in range(3))
    with use_backend("triton"):
        visible_attention(q, k, v, key_visible=ids.to(torch.int32)).sum().backward()
    hidden = ~mask[:, None, :, None].expand_as(k)
    assert k.grad[hidden].abs().max() == 0 and v.grad[hidden].abs().max() == 0
    assert v.grad[~hidden].abs().min() > 0


# ---------------------------------------------------------------------------------------------
# empty key set: output 0, lse -inf, zero gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["index", "mask"])
def test_fully_masked_key_set(backend, kind):
    if backend == "triton" and not DEVICES:
        pytest.skip("no device for the Triton kernels")
    device = DEVICES[0] if backend == "triton" else "cpu"
    length = 20
    ids = torch.stack([torch.arange(0), torch.arange(0)]) if kind == "index" else None
    mask = torch.zeros(2, length, dtype=torch.bool, device=device)
    mask[1, :5] = True
    key_visible = ids.to(device) if kind == "index" else mask
    q, k, v = (_randn(2, 2, length, 32, dtype=torch.bfloat16, device=device).requires_grad_() for _ in range(3))
    with use_backend(backend):
        out, lse = visible_attention(q, k, v, key_visible=key_visible, return_lse=True)
        out.backward(torch.randn_like(out))
    empty = slice(None) if kind == "index" else 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.all(lse[empty] == float("-inf"))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[empty], torch.zeros_like(t.grad[empty]))
    if kind == "mask":  # the other sample is unaffected
        ref = visible_attention_reference(q[1:].double(), k[1:, :, :5].double(), v[1:, :, :5].double())
        assert testing.rel_error(out[1:], ref) < 1.6e-2


def test_fully_masked_key_set_sdpa_backend():
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 3:] = True
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend="sdpa", key_visible=mask)
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert all(torch.isfinite(t.grad).all() and torch.equal(t.grad[0], torch.zeros_like(t.grad[0])) for t in (q, k, v))


# ---------------------------------------------------------------------------------------------
# empty batch (B = 0) and empty varlen sequences: the same result on every backend
# ---------------------------------------------------------------------------------------------


def _attention_by(backend, packed=False):
    """The function that runs the family on ``backend``: visible_attention(_qkvpacked) with the op's backend
    forced ("triton", "reference": see :func:`_on_backend`), attention(_qkvpacked) for "sdpa"."""
    if backend == "sdpa":
        return functools.partial(attention_qkvpacked if packed else attention, backend="sdpa")
    return visible_attention_qkvpacked if packed else visible_attention


@contextlib.contextmanager
def _on_backend(backend):
    """Forward and backward inside the block run on ``backend`` (the backward op picks its backend when
    autograd calls it, so the block holds it too); yields the kernels' launch counts for "triton"."""
    if backend == "sdpa":
        yield None
    elif backend == "triton":
        with _on_triton_kernels() as calls:
            yield calls
    else:
        with use_backend(backend):
            yield None


BACKENDS_HERE = [*(["triton"] if "cpu" in DEVICES else []), "reference", "sdpa"]


def _empty_batch_cases():
    dense, packed = torch.randn(0, 2, 5, 16), torch.randn(0, 2, 16)
    cu = torch.zeros(1, dtype=torch.int32)  # B = 0: one offset
    return [
        ("dense", False, (dense, dense, dense), {}),
        ("mask", False, (dense, dense, dense), dict(key_visible=torch.zeros(0, 5, dtype=torch.bool))),
        ("index", False, (dense, dense, dense), dict(key_visible=torch.zeros(0, 3, dtype=torch.int64))),
        ("varlen", False, (packed, packed, packed), dict(cu_seqlens=cu, max_seqlen=1)),
        ("qkv", True, (torch.randn(0, 5, 3, 2, 16),), {}),
        ("qkv-varlen", True, (torch.randn(0, 3, 2, 16),), dict(cu_seqlens=cu, max_seqlen=1)),
    ]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("case", range(len(_empty_batch_cases())))
def test_empty_batch_gives_empty_output(backend, case):
    """B = 0 (dense, key-visibility, varlen ``cu_seqlens = [0]``, packed qkv): an empty output shaped like the
    input's (and an empty lse), empty gradients, on every backend."""
    mode, packed, tensors, kwargs = _empty_batch_cases()[case]
    fn = _attention_by(backend, packed)
    varlen = "cu_seqlens" in kwargs
    want = _softmax_attention64(*(_views(tensors[0], varlen) if packed else tensors), **kwargs)[0]
    want = _token_major(want, varlen) if packed else want
    with _on_backend(backend):
        out, grads = _forward_backward(lambda *t: fn(*t, **kwargs), tensors, torch.zeros(want.shape))
        if backend != "sdpa":
            _, lse = fn(*tensors, return_lse=True, **kwargs)
            assert lse.numel() == 0, mode
    assert out.shape == want.shape and out.dtype == tensors[0].dtype, mode
    assert all(g.shape == t.shape for g, t in zip(grads, tensors, strict=True)), mode


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("lengths", [[0, 3, 0, 4, 0], [0], [0, 0, 0], [1, 0]])
def test_empty_sequences(backend, lengths):
    """A varlen sequence of length 0 has no rows and changes nothing else (all of them empty: T = 0)."""
    (q, k, v), cu = _packed(lengths)
    kwargs = dict(cu_seqlens=cu, max_seqlen=max(1, *lengths))
    grad_out = torch.randn_like(q)
    want, want_grads = _forward_backward(lambda *t: _softmax_attention64(*t, **kwargs)[0],
                                         [t.double() for t in (q, k, v)], grad_out.double())
    with _on_backend(backend):
        out, grads = _forward_backward(lambda *t: _attention_by(backend)(*t, **kwargs), (q, k, v), grad_out)
        packed, (dqkv,) = _forward_backward(lambda t: _attention_by(backend, packed=True)(t, **kwargs),
                                            [torch.stack([q, k, v], dim=1)], grad_out)
    testing.assert_rel_close(out, want, torch.float32)
    testing.assert_rel_close(packed, want, torch.float32, name="packed output")
    for i, (got, ref) in enumerate(zip(grads, want_grads, strict=True)):
        testing.assert_rel_close(got, ref, torch.float32, name=f"d{'qkv'[i]}")
        testing.assert_rel_close(dqkv[:, i], ref, torch.float32, name=f"dqkv[:, {i}]")


# ---------------------------------------------------------------------------------------------
# attention(): the models' backend choice
# ---------------------------------------------------------------------------------------------


def _mode_inputs(mode):
    if mode == "varlen":
        cu = torch.tensor([0, 5, 6, 17], dtype=torch.int32)
        return [torch.randn(17, 2, 32) for _ in range(3)], dict(cu_seqlens=cu, max_seqlen=11)
    kwargs = {}
    if mode == "index":
        kwargs["key_visible"] = torch.stack([torch.randperm(12)[:5] for _ in range(2)])
    if mode == "mask":
        kwargs["key_visible"] = torch.rand(2, 12) < 0.5
    return [torch.randn(2, 3, 12, 32) for _ in range(3)], kwargs


def _backend_device(backend):
    """Where ``attention(backend=...)`` is tested: "fastmim" on the kernels' device (CPU under the interpreter)."""
    if backend != "fastmim":
        return "cpu"
    if not DEVICES:
        pytest.skip("no device for the Triton kernels")
    return DEVICES[0]


def _kernels_if(on_kernels):
    """``_on_triton_kernels()`` if ``on_kernels`` (yields the launch counts), else a block that yields None."""
    return _on_triton_kernels() if on_kernels else contextlib.nullcontext()


@pytest.mark.parametrize("mode", ["dense", "varlen", "index", "mask"])
@pytest.mark.parametrize("backend", ["fastmim", "sdpa", "reference", None])
def test_attention_backends_agree(mode, backend):
    """Every backend against softmax(QK^T)V written out in float64, forward and backward; "fastmim" runs the
    Triton kernels (on CPU through the interpreter), not the reference it would take on CPU by default."""
    device = _backend_device(backend)
    tensors, kwargs = _mode_inputs(mode)
    grad_out = torch.randn_like(tensors[0])
    want, want_grads = _forward_backward(lambda q, k, v: _softmax_attention64(q, k, v, **kwargs)[0],
                                         [t.double() for t in tensors], grad_out.double())
    kwargs = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    with _kernels_if(backend == "fastmim") as calls:
        out, grads = _forward_backward(lambda q, k, v: attention(q, k, v, backend=backend, **kwargs),
                                       [t.to(device) for t in tensors], grad_out.to(device))
    assert calls in (None, {"forward": 1, "backward": 1}), calls
    testing.assert_rel_close(out, want, torch.float32)
    for name, got, ref in zip("qkv", grads, want_grads, strict=True):
        testing.assert_rel_close(got, ref, torch.float32, name=f"d{name}")


def test_attention_backend_names_and_default():
    q = torch.randn(1, 1, 4, 16)
    assert ATTN_BACKENDS == ("triton", "sdpa", "xformers", "reference", "fastmim")
    assert choose_attn_backend(q, q, q) == "sdpa"  # CPU default
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, q, q, backend="flash")
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="xformers"):
            attention(q, q, q, backend="xformers")


def test_attention_backend_env_override(monkeypatch):
    # One switch for every op: FASTMIM_BACKEND names attention's backend too; a name attention
    # does not have (csrc) leaves its choice alone.
    q = torch.randn(1, 1, 4, 16)
    monkeypatch.setenv("FASTMIM_BACKEND", "reference")
    assert choose_attn_backend(q, q, q) == "reference"
    monkeypatch.setenv("FASTMIM_BACKEND", "csrc")
    assert choose_attn_backend(q, q, q) == "sdpa"
    monkeypatch.setenv("FASTMIM_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTMIM_BACKEND must be one of"):
        choose_attn_backend(q, q, q)
    # The attention-only switch it replaces still works, with a warning.
    monkeypatch.delenv("FASTMIM_BACKEND")
    monkeypatch.setenv("FASTMIM_ATTN_BACKEND", "reference")
    with pytest.warns(FutureWarning, match="FASTMIM_ATTN_BACKEND is deprecated"):
        assert choose_attn_backend(q, q, q) == "reference"
    monkeypatch.setenv("FASTMIM_ATTN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTMIM_ATTN_BACKEND"), pytest.warns(FutureWarning):
        choose_attn_backend(q, q, q)


@pytest.mark.parametrize("device", testing.kernel_devices())
def test_triton_forces_the_kernels_and_fastmim_keeps_the_ops_own_choice(device):
    q, k, v = (torch.randn(2, 2, 5, 16, device=device) for _ in range(3))
    from fastmim.kernels import attention as kernels

    with testing.count_calls(kernels, {"forward": "attention_forward"}) as calls:
        forced = attention(q, k, v, backend="triton")
    assert calls["forward"] == 1
    with testing.count_calls(kernels, {"forward": "attention_forward"}) as calls:
        default = attention(q, k, v, backend="fastmim")
    # On CPU the op's own default is its reference; on CUDA its Triton kernels.
    assert calls["forward"] == (1 if device == "cuda" else 0)
    testing.assert_rel_close(forced, default, torch.float32)


def _measured_choice(monkeypatch, times):
    """``choose_attn_backend`` on CPU as if on CUDA: it measures, with the timing replaced by a recorder."""
    attn = importlib.import_module("fastmim.ops.attention_router")

    timed = []

    def time_backend(backend, args, kwargs, backward, reps=10):
        timed.append(backend)
        return times[backend]

    monkeypatch.setattr(attn, "_measures_on", lambda device: True)
    monkeypatch.setattr(attn, "_time_backend", time_backend)
    monkeypatch.setattr(attn, "_xformers_available", lambda: False)
    monkeypatch.setattr(attn, "_CHOICE_CACHE", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return attn, timed


def _packed(lengths, heads=2, head_dim=16, dtype=torch.float32):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return [torch.randn(sum(lengths), heads, head_dim, dtype=dtype) for _ in range(3)], cu


def test_choice_cache_varlen_bucket_ignores_the_packed_total(monkeypatch):
    """Per-sample numbers of visible tokens change T every step: one measurement serves them all."""
    attn, timed = _measured_choice(monkeypatch, {"triton": 1.0, "sdpa": 2.0})
    for lengths in ([5, 7], [9, 11], [16, 1], [3, 3]):
        (q, k, v), cu = _packed(lengths)
        assert choose_attn_backend(q, k, v, cu_seqlens=cu, max_seqlen=16) == "triton"
    assert timed == ["triton", "sdpa"] and len(attn._CHOICE_CACHE) == 1
    # What the timing does depend on is a new bucket: the bound, the number of sequences, heads, dtype.
    for (q, k, v), cu, bound in [(*_packed([5, 7]), 32), (*_packed([5, 7, 2]), 16), (*_packed([5, 7], heads=4), 16),
                                 (*_packed([5, 7], dtype=torch.float16), 16)]:
        choose_attn_backend(q, k, v, cu_seqlens=cu, max_seqlen=bound)
    assert len(timed) == 2 + 4 * 2 and len(attn._CHOICE_CACHE) == 5


def test_choice_cache_dense_and_key_visibility_buckets(monkeypatch):
    attn, timed = _measured_choice(monkeypatch, {"triton": 3.0, "sdpa": 2.0})
    q = torch.randn(2, 3, 12, 16)
    ids = torch.stack([torch.randperm(12)[:5] for _ in range(2)])
    assert choose_attn_backend(q, q, q) == "sdpa"
    assert choose_attn_backend(q, q, q, key_visible=ids) == "sdpa"
    assert choose_attn_backend(q, q, q, key_visible=ids[:, :3]) == "sdpa"  # same bucket: K is not part of it
    assert choose_attn_backend(q, q, q, key_visible=torch.rand(2, 12) < 0.5) == "sdpa"
    assert choose_attn_backend(q.requires_grad_(), q, q) == "sdpa"  # forward + backward is timed apart
    assert len(timed) == 4 * 2 and len(attn._CHOICE_CACHE) == 4


def test_choice_under_compile_is_fixed_and_skips_the_cache(monkeypatch):
    """While dynamo traces, the choice neither measures nor reads the cache (its sizes may be symbolic)."""
    class NoLookup(dict):
        def __contains__(self, key):
            raise AssertionError("the backend cache was consulted while tracing")

        __getitem__ = __contains__

    attn, timed = _measured_choice(monkeypatch, {"triton": 2.0, "sdpa": 1.0})
    monkeypatch.setattr(attn, "_CHOICE_CACHE", NoLookup())
    torch._dynamo.reset()

    def f(q, k, v, cu):
        return attention(q, k, v, cu_seqlens=cu, max_seqlen=8)

    (q, k, v), cu = _packed([5, 8])
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cu)
    ref = visible_attention_reference(q, k, v, cu_seqlens=cu)
    assert timed == [] and testing.rel_error(out, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, cu_seqlens=None, key_visible=None):
        qkv = self.qkv(x)
        if cu_seqlens is not None:  # (T, C)
            q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(1)
            return visible_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=8).flatten(1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return visible_attention(q, k, v, key_visible=key_visible).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("mode", ["dense", "varlen", "index"])
def test_compile_fullgraph(mode):
    torch._dynamo.reset()
    block = _Block()
    if mode == "varlen":
        x, kwargs = torch.randn(13, 32), dict(cu_seqlens=torch.tensor([0, 8, 13], dtype=torch.int32))
    else:
        x = torch.randn(2, 10, 32)
        kwargs = dict(key_visible=torch.tensor([[0, 3, 4], [9, 1, 2]])) if mode == "index" else {}
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, **kwargs)
    out.sum().backward()
    assert torch.allclose(out, block(x, **kwargs), atol=1e-6)
    assert block.qkv.weight.grad is not None and torch.isfinite(block.qkv.weight.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_triton_kernels(device):
    """The compiled graph calls the registered op, which runs the kernels (fake and real outputs agree)."""
    torch._dynamo.reset()
    block = _Block().to(device)
    x, ids = torch.randn(2, 10, 32, device=device), torch.tensor([[0, 3, 4], [9, 1, 2]], device=device)
    with use_backend("triton"):
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, key_visible=ids)
        out.sum().backward()
    with use_backend("reference"):
        ref = block(x, key_visible=ids)
    assert testing.rel_error(out, ref) < 1e-5


def test_compile_fullgraph_attention_default_backend():
    """The models' entry point, backend chosen inside the compiled region (no graph break)."""
    torch._dynamo.reset()

    def f(q, k, v, mask):
        return attention(q, k, v, key_visible=mask) + attention(q, k, v, backend="fastmim")

    q = torch.randn(2, 2, 10, 16, requires_grad=True)
    mask = torch.rand(2, 10) < 0.5
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, q, q, mask)
    out.sum().backward()
    assert torch.allclose(out, f(q, q, q, mask), atol=1e-5) and torch.isfinite(q.grad).all()


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(7, 2, 80, dtype=torch.bfloat16)
        out, lse = visible_attention(q, q, q, cu_seqlens=torch.empty(3, dtype=torch.int32), max_seqlen=4,
                                     return_lse=True)
        assert out.shape == (7, 2, 80) and lse.shape == (2, 7) and lse.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(2, 3, 8, 16)
    p = torch.randn(8, 3, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return [
        ((x, x, x.half()), {}, TypeError, "share a dtype"),
        ((x.int(), x, x), {}, TypeError, "q must be float16"),
        ((x[0], x[0], x[0]), {}, ValueError, r"q must be \(B, H, N, D\)"),
        ((x, x[:, :2], x[:, :2]), {}, ValueError, "k and v must be"),
        ((x, x[..., :0, :], x[..., :0, :]), {}, ValueError, "no keys"),
        ((p, p, p), dict(cu_seqlens=cu), ValueError, "max_seqlen must be a Python int"),
        ((p, p, p), dict(cu_seqlens=cu, max_seqlen=torch.tensor(5)), ValueError, "max_seqlen must be a Python int"),
        ((p, p, p), dict(cu_seqlens=cu.long(), max_seqlen=5), TypeError, "cu_seqlens must be an int32"),
        ((p, p, p), dict(cu_seqlens=cu[:0], max_seqlen=5), ValueError, r"cu_seqlens must be 1-D \(B\+1,\)"),
        ((x, x, x), dict(cu_seqlens=cu, max_seqlen=5), ValueError, r"q must be packed \(T, H, D\)"),
        ((p, p[:5], p[:5]), dict(cu_seqlens=cu, max_seqlen=5), ValueError, "shaped like q"),
        ((x, x, x), dict(max_seqlen=5), ValueError, "only meaningful with cu_seqlens"),
        ((p, p, p), dict(cu_seqlens=cu, max_seqlen=5, key_visible=torch.ones(2, 8, dtype=torch.bool)),
         ValueError, "not with cu_seqlens"),
        ((x, x, x), dict(key_visible=torch.ones(2, 7, dtype=torch.bool)), ValueError, r"boolean key_visible must"),
        ((x, x, x), dict(key_visible=torch.zeros(2, 9, dtype=torch.int64)), ValueError, "integer key_visible must"),
        ((x, x, x), dict(key_visible=torch.zeros(2, 3)), TypeError, "key_visible must be bool"),
        ((x, torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)),
         dict(key_visible=torch.zeros(2, 3, dtype=torch.int64)), ValueError, "same length L"),
        ((x, x, x), dict(scale="big"), TypeError, "scale must be"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs(case):
    args, kwargs, error, match = _bad_cases()[case]
    with pytest.raises(error, match=match):
        visible_attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# values of cu_seqlens and key_visible: checked on the host, never outside a tensor in the kernels
# ---------------------------------------------------------------------------------------------


def _every_entry_point(q, k, v, **kwargs):
    """Call the family's public functions on every backend (the ops' own: triton, reference; attention's:
    fastmim, sdpa, xformers, reference and the default) with these arguments; the packed qkv forms too in the
    dense and varlen modes. Returns ``{entry point: the ValueError it raised, or None}``."""
    calls = {f"visible_attention[{b}]": (b, lambda: visible_attention(q, k, v, **kwargs))
             for b in ("triton", "reference")}
    calls.update({f"attention[{b}]": (None, lambda b=b: attention(q, k, v, backend=b, **kwargs))
                  for b in (*ATTN_BACKENDS, None)})
    if "key_visible" not in kwargs:
        varlen = "cu_seqlens" in kwargs
        qkv = torch.stack([q, k, v], dim=1) if varlen else torch.stack([q, k, v], dim=0).permute(1, 3, 0, 2, 4)
        calls.update({f"visible_attention_qkvpacked[{b}]": (b, lambda: visible_attention_qkvpacked(qkv, **kwargs))
                      for b in ("triton", "reference")})
        calls.update({f"attention_qkvpacked[{b}]": (None, lambda b=b: attention_qkvpacked(qkv, backend=b, **kwargs))
                      for b in (*ATTN_BACKENDS, None)})
    raised = {}
    for name, (forced, call) in calls.items():
        try:
            with use_backend(forced):
                call()
        except ValueError as exc:
            raised[name] = str(exc)
        else:
            raised[name] = None
    return raised


def _assert_same_error(raised, *needles):
    messages = set(raised.values())
    assert len(messages) == 1 and None not in messages, f"not the same ValueError everywhere: {raised}"
    message = messages.pop()
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


BAD_OFFSETS = [
    pytest.param([0, 4, 1000], 996, "cu_seqlens[-1] = 1000, expected the packed length 10", id="past-the-end"),
    pytest.param([0, 6, 4, 10], 6, "cu_seqlens[2] = 4 < cu_seqlens[1] = 6", id="decreasing"),
    pytest.param([2, 6, 10], 6, "cu_seqlens[0] = 2, expected 0", id="not-from-0"),
    pytest.param([0, 6, 9], 6, "cu_seqlens[-1] = 9, expected the packed length 10", id="short-of-the-end"),
    pytest.param([0, 6, 10], 5, "max_seqlen = 5 is smaller than sequence 0 of cu_seqlens (6 tokens)", id="bound"),
]


@pytest.mark.parametrize("cu, max_seqlen, message", BAD_OFFSETS)
def test_bad_offsets_raise_the_same_error_on_every_backend(cu, max_seqlen, message):
    """Host tensors: bad offsets or a max_seqlen below a sequence length raise one ValueError, before any
    backend runs (the Triton path once corrupted the heap with the first case; the CPU default accepted
    the decreasing offsets and the short bound)."""
    q, k, v = (torch.randn(10, 2, 16) for _ in range(3))
    raised = _every_entry_point(q, k, v, cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max_seqlen)
    _assert_same_error(raised, "visible_attention: ", message)


BAD_KEY_IDS = [
    pytest.param([[0, 3, 8], [1, 2, 4]], "key_visible[0, 2] = 8 is outside the valid range [0, 8)", id="L"),
    pytest.param([[0, 3, 5], [1, -1, 4]], "key_visible[1, 1] = -1 is outside the valid range [0, 8)", id="negative"),
    pytest.param([[0, 3, 5], [2**40, 1, 4]], "key_visible[1, 0] = 1099511627776 is outside", id="beyond-int32"),
    pytest.param([[0, 3, 5], [4, 1, 4]], "key_visible[1, 2] = 4 repeats key_visible[1, 0]", id="repeat"),
]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("ids, message", BAD_KEY_IDS)
def test_bad_key_ids_raise_the_same_error_on_every_backend(ids, message, dtype):
    """Integer key_visible: ids in [0, L), each at most once per row (the reference and SDPA read the set as
    a mask, the kernel would count a repeated key twice); out-of-range ids once returned values read from
    outside the tensor on the Triton path."""
    if dtype == torch.int32 and max(map(max, ids)) >= 2**31:
        pytest.skip("not an int32 value")
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    raised = _every_entry_point(q, k, v, key_visible=torch.tensor(ids, dtype=dtype))
    _assert_same_error(raised, "visible_attention: ", message)


@pytest.mark.cuda
def test_device_values_checked_only_under_check_indices():
    """CUDA tensors: no sync by default (the kernels stay inside their tensors), the host's checks and
    errors under check_indices()."""
    q = torch.randn(10, 2, 16, device="cuda")
    cu = torch.tensor([0, 4, 1000], dtype=torch.int32, device="cuda")
    x = torch.randn(2, 2, 8, 16, device="cuda")
    ids = torch.tensor([[0, 3, 100000], [1, -5, 2]], device="cuda")
    with use_backend("triton"):
        visible_attention(q, q, q, cu_seqlens=cu, max_seqlen=996)
        visible_attention(x, x, x, key_visible=ids)
        torch.cuda.synchronize()
        with check_indices(), pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 1000, expected the packed length"):
            visible_attention(q, q, q, cu_seqlens=cu, max_seqlen=996)
        with check_indices(), pytest.raises(ValueError, match=r"key_visible\[0, 2\] = 100000 is outside"):
            attention(x, x, x, key_visible=ids, backend="sdpa")


GUARD = 1 << 14  # elements of NaN (or the int max) on each side of every tensor a kernel may touch


class _Guarded(types.SimpleNamespace):
    """``torch`` as a launcher module sees it, but every tensor it allocates lies in the middle of a buffer
    whose ends are poisoned; :meth:`place` puts an input there too, :meth:`assert_intact` checks the ends."""

    def __init__(self):
        super().__init__()
        self.buffers = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def place(self, t):
        flat = testing.poison_like(torch.empty(GUARD + t.numel() + GUARD, dtype=t.dtype, device=t.device))
        inside = flat[GUARD:GUARD + t.numel()].view(t.shape)
        inside.copy_(t)
        self.buffers.append((flat, t.numel()))
        return inside

    def empty(self, *args, **kwargs):
        return self.place(testing.poison_like(torch.empty(*args, **kwargs)))

    def empty_like(self, *args, **kwargs):
        return self.place(testing.poison_like(torch.empty_like(*args, **kwargs)))

    def zeros_like(self, *args, **kwargs):
        return self.place(torch.zeros_like(*args, **kwargs))

    def assert_intact(self):
        """The poison around every tensor placed since the last check is intact."""
        for i, (flat, numel) in enumerate(self.buffers):
            for end in (flat[:GUARD], flat[GUARD + numel:]):
                poisoned = end.isnan() if end.is_floating_point() else end == testing.poison_like(end[:1])
                assert bool(poisoned.all()), f"buffer {i}: a kernel wrote outside it"
        self.buffers.clear()


def _kernels_stay_inside(device):
    """The launchers with offsets and key ids the host would reject, every tensor in guards: no error, no
    crash, no write outside a tensor, and the documented results (offsets clamped to [0, T], an out-of-range
    key id not visible). Runs in a subprocess (see the test below): an access outside a tensor may crash."""
    from fastmim.kernels import attention as kernels

    torch.manual_seed(0)
    real_torch = kernels.torch
    kernels.torch = guarded = _Guarded()
    try:
        # varlen: forward, fused and unfused backward (grad_lse), and the packed-qkv launchers
        for cu, max_seqlen in [([0, 4, 1000], 6), ([0, 6, 4, 10], 6), ([-7, 3, 10], 10), ([0, 3, 2**31 - 1], 7),
                               ([5, 2, -3, 10], 3), ([0, 8, 10], 2), ([10, 0], 4)]:
            qkv = guarded.place(torch.randn(10, 3, 1, 16, device=device))
            q, k, v = qkv.unbind(1)
            cu_t = guarded.place(torch.tensor(cu, dtype=torch.int32, device=device))
            out, lse = kernels.attention_forward(q, k, v, 0.25, cu_seqlens=cu_t, max_seqlen=max_seqlen)
            grad_out = guarded.place(torch.randn_like(out))
            for grad_lse in (None, guarded.place(torch.randn_like(lse))):
                kernels.attention_backward(grad_out, q, k, v, out, lse, 0.25, cu_seqlens=cu_t, max_seqlen=max_seqlen,
                                           grad_lse=grad_lse)
            packed_out, packed_lse = kernels.attention_qkvpacked_forward(qkv, 0.25, cu_seqlens=cu_t,
                                                                         max_seqlen=max_seqlen)
            kernels.attention_qkvpacked_backward(grad_out, qkv, packed_out, packed_lse, 0.25, cu_seqlens=cu_t,
                                                 max_seqlen=max_seqlen)
            guarded.assert_intact()
            if cu == [0, 4, 1000]:  # clamped to [0, 4, 10]
                want = _softmax_attention64(q, k, v, cu_seqlens=torch.tensor([0, 4, 10]), scale=0.25)[0]
                testing.assert_rel_close(out, want, torch.float32)
                testing.assert_rel_close(packed_out, want, torch.float32, name="packed output")
        # key ids outside [0, L): not visible, nothing read or written at them
        for ids in ([[0, 3, 100000], [1, -5, 2]], [[2**40 + 3, 3, 6], [7, 1, -(2**40)]], [[-1, 9, 8], [2, 8, 0]]):
            for dtype in (torch.int64, torch.int32):
                if dtype == torch.int32 and any(abs(i) >= 2**31 for row in ids for i in row):
                    continue
                q, k, v = (guarded.place(torch.randn(2, 1, 8, 16, device=device)) for _ in range(3))
                key_index = guarded.place(torch.tensor(ids, dtype=dtype, device=device))
                out, lse = kernels.attention_forward(q, k, v, 0.25, key_index=key_index)
                grad_out = guarded.place(torch.randn_like(out))
                grads = kernels.attention_backward(grad_out, q, k, v, out, lse, 0.25, key_index=key_index)
                guarded.assert_intact()
                visible = torch.zeros(2, 8, dtype=torch.bool)
                for b, row in enumerate(ids):
                    visible[b, [i for i in row if 0 <= i < 8]] = True
                leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
                want = _softmax_attention64(*leaves, key_visible=visible, scale=0.25)[0]
                want.backward(grad_out.cpu().double())
                testing.assert_rel_close(out, want, torch.float32)
                for name, got, leaf in zip("qkv", grads, leaves, strict=True):
                    testing.assert_rel_close(got, leaf.grad, torch.float32, name=f"d{name}")
    finally:
        kernels.torch = real_torch


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_stay_inside_their_tensors(device):
    """Bad offsets and key ids given straight to the launchers (no host check) in a fresh interpreter."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import {Path(__file__).stem} as t; t._kernels_stay_inside({device!r})")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"exit status {run.returncode}:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="kernels not runnable here")
def test_kernel_module_imports_only_torch_and_triton():
    import ast
    import inspect

    from fastmim.kernels import attention as kernels

    tree = ast.parse(inspect.getsource(kernels))
    roots = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert roots <= {"__future__", "os", "torch", "triton"}


# ---------------------------------------------------------------------------------------------
# property tests: generated cases on every backend here, against the float64 definition
# ---------------------------------------------------------------------------------------------

# The kernels have no float64 (such inputs take the reference): "triton" is drawn in their dtypes only.
PROPERTY_DTYPES = {"triton": (torch.float32, torch.bfloat16),
                   "reference": (torch.float32, torch.bfloat16, torch.float64),
                   "sdpa": (torch.float32, torch.bfloat16, torch.float64)}


def _property_settings(modes):
    """At least 200 cases per op over the backends here and its ``modes``; derandomized: the same cases on
    every run."""
    return settings(max_examples=-(-200 // (len(BACKENDS_HERE) * modes)), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
LAYOUTS = ("contiguous", "padded", "strided")


@st.composite
def _attention_case(draw, mode, dtypes, packed=False):
    """``(shapes, kwargs, dtype, layout, seed)`` of a visible_attention (``packed``: _qkvpacked) call in
    ``mode``: tiny sizes from 1 (batch 1, sequence length 1), varlen sequences of length 0, key sets of every
    size."""
    heads, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from((8, 16)))
    kwargs = {}
    if mode == "varlen":
        lengths = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        kwargs = dict(cu_seqlens=cu, max_seqlen=max(1, *lengths) + draw(st.integers(0, 3)))
        q_shape = kv_shape = (sum(lengths), heads, head_dim)
    else:
        batch, length = draw(st.integers(1, 2)), draw(st.integers(1, 9))
        key_length = draw(st.integers(1, 9)) if mode == "dense" and not packed else length
        q_shape, kv_shape = (batch, heads, length, head_dim), (batch, heads, key_length, head_dim)
        if mode == "index":
            num_visible = draw(st.integers(0, length))
            ids = [draw(st.permutations(range(length)))[:num_visible] for _ in range(batch)]
            dtype = draw(st.sampled_from((torch.int32, torch.int64)))
            kwargs["key_visible"] = torch.tensor(ids, dtype=dtype).reshape(batch, num_visible)
        if mode == "mask":
            rows = draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=batch,
                                 max_size=batch))
            kwargs["key_visible"] = torch.tensor(rows, dtype=torch.bool)
    if packed:
        shape = (*q_shape[:-2], 3, *q_shape[-2:]) if mode == "varlen" else (batch, length, 3, heads, head_dim)
        shapes = (shape,)
    else:
        shapes = (q_shape, kv_shape, kv_shape)
    dtype, layout = draw(st.sampled_from(dtypes)), draw(st.sampled_from(LAYOUTS))
    return shapes, kwargs, dtype, layout, draw(st.integers(0, 2**32 - 1))


def _laid_out(shape, dtype, layout, generator, permute):
    """A leaf buffer and the view of ``shape`` the op gets: ``contiguous``; ``padded`` (rows further apart than
    their length, with ``permute`` a token-major buffer seen head-major: read in place); ``strided`` (a last
    dimension of stride 2: the op copies it)."""
    dim = shape[-1]
    if layout == "padded" and permute:  # (B, H, N, D) from (B, N, H, D + 8), (T, H, D) from (H, T, D + 8)
        order = (0, 2, 1, 3) if len(shape) == 4 else (1, 0, 2)
        buffer = torch.randn(*(shape[i] for i in order[:-1]), dim + 8, generator=generator).to(dtype)
        return buffer.requires_grad_(), buffer[..., :dim].permute(order)
    width = {"contiguous": dim, "padded": dim + 8, "strided": 2 * dim}[layout]
    buffer = torch.randn(*shape[:-1], width, generator=generator).to(dtype).requires_grad_()
    return buffer, buffer[..., ::2] if layout == "strided" else buffer[..., :dim]


def _definition(packed, kwargs):
    """The family's result in float64 (:func:`_softmax_attention64`), for unpacked or packed inputs."""
    if not packed:
        return lambda q, k, v: _softmax_attention64(q, k, v, **kwargs)[0]
    varlen = "cu_seqlens" in kwargs
    return lambda qkv: _token_major(_softmax_attention64(*_views(qkv, varlen), **kwargs)[0], varlen)


def _check_generated(backend, case, packed):
    shapes, kwargs, dtype, layout, seed = case
    generator = torch.Generator().manual_seed(seed)
    leaves, views = zip(*(_laid_out(s, dtype, layout, generator, permute=not packed) for s in shapes), strict=True)
    out_shape = (*shapes[0][:-3], *shapes[0][-2:]) if packed else shapes[0]
    grad_out = torch.randn(out_shape, generator=generator).to(dtype)
    refs = [t.detach().double().requires_grad_() for t in views]
    want = _definition(packed, kwargs)(*refs)
    want_grads = torch.autograd.grad(want, refs, grad_out.double(), allow_unused=True, materialize_grads=True)
    lse_want = None if packed else _softmax_attention64(*refs, **kwargs)[1]
    fn = _attention_by(backend, packed)
    with _on_backend(backend) as calls:
        if backend == "sdpa":
            out, lse = fn(*views, **kwargs), None
        else:
            out, lse = fn(*views, return_lse=True, **kwargs)
        grads = torch.autograd.grad(out, views, grad_out, allow_unused=True, materialize_grads=True)
    assert calls in (None, {"forward": 1, "backward": 1}), calls
    assert out.shape == want.shape and out.dtype == dtype
    testing.assert_rel_close(out, want, dtype)
    # The backward rounds twice more to the input dtype (P and dS before their products, as FA2 does).
    for name, got, ref in zip(("dqkv",) if packed else ("dq", "dk", "dv"), grads, want_grads, strict=True):
        testing.assert_rel_close(got, ref, tol=2 * testing.TOLERANCES[dtype], name=name)
    if lse is not None and lse_want is not None:
        # exp(lse), the softmax denominator: its relative error is the absolute error of the lse (near 0 at times).
        testing.assert_rel_close(lse.exp(), lse_want.exp(), torch.float64 if dtype == torch.float64 else torch.float32,
                         name="exp(lse)")


@pytest.mark.parametrize("mode", ["dense", "varlen", "index", "mask"])
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@_property_settings(modes=4)
@given(data=st.data())
def test_property_visible_attention(backend, mode, data):
    """visible_attention on ``backend`` in ``mode``: output, lse and gradients."""
    _check_generated(backend, data.draw(_attention_case(mode, PROPERTY_DTYPES[backend])), packed=False)


@pytest.mark.parametrize("mode", ["dense", "varlen"])
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@_property_settings(modes=2)
@given(data=st.data())
def test_property_visible_attention_qkvpacked(backend, mode, data):
    """visible_attention_qkvpacked on ``backend`` in ``mode``: output and the gradient of qkv."""
    _check_generated(backend, data.draw(_attention_case(mode, PROPERTY_DTYPES[backend], packed=True)), packed=True)


@st.composite
def _bad_values(draw):
    """``(q, k, v, kwargs, needle)``: arguments with one bad offset, bound or key id that the host check
    must reject, and what its message must say (the argument, the first bad position, the value)."""
    kind = draw(st.sampled_from(("start", "decreasing", "end", "bound", "range", "repeat")))
    if kind in ("range", "repeat"):
        batch, length = draw(st.integers(1, 3)), draw(st.integers(2, 9))
        num_visible = draw(st.integers(2 if kind == "repeat" else 1, length))
        ids = [draw(st.permutations(range(length)))[:num_visible] for _ in range(batch)]
        dtype = draw(st.sampled_from((torch.int32, torch.int64)))
        b, j = draw(st.integers(0, batch - 1)), draw(st.integers(0, num_visible - 1))
        if kind == "range":
            limit = 2**31 - 1 if dtype == torch.int32 else 2**40
            ids[b][j] = draw(st.one_of(st.integers(-limit, -1), st.integers(length, limit)))
            needle = f"key_visible[{b}, {j}] = {ids[b][j]} is outside the valid range [0, {length})"
        else:
            i = draw(st.integers(0, num_visible - 1).filter(lambda i: i != j))
            ids[b][j] = ids[b][i]
            needle = f"key_visible[{b}, {max(i, j)}] = {ids[b][j]} repeats key_visible[{b}, {min(i, j)}]"
        q, k, v = (torch.randn(batch, 1, length, 8) for _ in range(3))
        return q, k, v, dict(key_visible=torch.tensor(ids, dtype=dtype)), needle
    lengths = draw(st.lists(st.integers(0, 6), min_size=2 if kind == "decreasing" else 1, max_size=4))
    if kind == "bound":
        lengths[draw(st.integers(0, len(lengths) - 1))] = draw(st.integers(2, 6))
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    total, max_seqlen = cu[-1], max(1, *lengths)
    if kind == "start":
        cu[0] = draw(st.integers(-50, 50).filter(bool))
        needle = f"cu_seqlens[0] = {cu[0]}, expected 0"
    elif kind == "decreasing":
        i = draw(st.integers(1, len(cu) - 1))
        cu[i] = cu[i - 1] - draw(st.integers(1, 2**20))
        needle = f"cu_seqlens[{i}] = {cu[i]} < cu_seqlens[{i - 1}] = {cu[i - 1]}"
    elif kind == "end":
        cu[-1] = draw(st.integers(cu[-2], 2**31 - 1).filter(lambda end: end != total))
        needle = f"cu_seqlens[-1] = {cu[-1]}, expected the packed length {total}"
    else:
        max_seqlen = draw(st.integers(1, max(lengths) - 1))
        needle = (f"max_seqlen = {max_seqlen} is smaller than sequence {lengths.index(max(lengths))} of cu_seqlens "
                  f"({max(lengths)} tokens)")
    q, k, v = (torch.randn(total, 1, 8) for _ in range(3))
    return q, k, v, dict(cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max_seqlen), needle


@settings(max_examples=100, deadline=None, derandomize=True)
@given(case=_bad_values())
def test_property_bad_values_raise_the_same_error_on_every_backend(case):
    q, k, v, kwargs, needle = case
    _assert_same_error(_every_entry_point(q, k, v, **kwargs), "visible_attention: ", needle)
