"""visible_attention: Triton kernels and the reference against float64 math, in every mode.

Tolerance rule (as in flash-attention's tests): the kernel's relative error against the float64
reference must stay within twice the error of a naive attention computed in the same low
precision (``upcast=False``), plus a small floor. Errors of order 1 (a missing key, a wrong
row) are far above it. The CPU interpreter runs every (N, D) pair of the grid in one dtype; the
full (N, D, dtype) grid and a few larger cases are marked ``cuda``.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch

from fastmim.ops import use_backend
from fastmim.ops.attention import (
    ATTN_BACKENDS,
    attention,
    attention_qkvpacked,
    choose_attn_backend,
    visible_attention,
    visible_attention_qkvpacked,
    visible_attention_reference,
)
from fastmim.testing import count_calls, kernel_devices, poison_allocations, rel_error

DEVICES = kernel_devices()
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


@contextlib.contextmanager
def _on_triton_kernels():
    """Run forward and backward on the Triton kernels, their outputs NaN-poisoned; yields the launch counts.

    The backward op chooses its backend when autograd calls it, so the block must hold the backward too.
    """
    from fastmim.kernels import attention as kernels

    with use_backend("triton"), poison_allocations(kernels), \
            count_calls(kernels, {"forward": "attention_forward", "backward": "attention_backward"}) as calls:
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
        err, err_lp = rel_error(got, want), rel_error(yard, want)
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
    with poison_allocations(kernels):
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
    assert rel_error(four, ref) < 2e-3


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
    assert rel_error(ref, _per_sample_dense(lengths)(q.double(), k.double(), v.double())) < 1e-12


# ---------------------------------------------------------------------------------------------
# packed qkv (the layout of the models' qkv projection)
# ---------------------------------------------------------------------------------------------


def _views(qkv, varlen):
    return qkv.unbind(1) if varlen else qkv.permute(2, 0, 3, 1, 4).unbind(0)


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


def test_attention_qkvpacked_backends_agree():
    qkv = torch.randn(2, 19, 3, 2, 16)
    outs = {b: attention_qkvpacked(qkv, backend=b) for b in ("fastmim", "sdpa", "reference")}
    assert outs["fastmim"].shape == (2, 19, 2, 16)
    for b in ("sdpa", "reference"):
        assert rel_error(outs[b], outs["fastmim"]) < 1e-5, b
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    packed = qkv[0]  # (19, 3, 2, 16)
    got = {b: attention_qkvpacked(packed, backend=b, cu_seqlens=cu, max_seqlen=12) for b in ("fastmim", "sdpa")}
    assert rel_error(got["sdpa"], got["fastmim"]) < 1e-5


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
        assert rel_error(out[1:], ref) < 1.6e-2


def test_fully_masked_key_set_sdpa_backend():
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 3:] = True
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend="sdpa", key_visible=mask)
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert all(torch.isfinite(t.grad).all() and torch.equal(t.grad[0], torch.zeros_like(t.grad[0])) for t in (q, k, v))


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


@pytest.mark.parametrize("mode", ["dense", "varlen", "index", "mask"])
@pytest.mark.parametrize("backend", ["fastmim", "sdpa", None])
def test_attention_backends_agree(mode, backend):
    tensors, kwargs = _mode_inputs(mode)
    ref = attention(*tensors, backend="reference", **kwargs)
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = attention(*leaves, backend=backend, **kwargs)
    out.sum().backward()
    assert rel_error(out, ref) < 1e-5
    ref_leaves = [t.clone().requires_grad_() for t in tensors]
    attention(*ref_leaves, backend="reference", **kwargs).sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert rel_error(got.grad, want.grad) < 1e-5


def test_attention_backend_names_and_default():
    q = torch.randn(1, 1, 4, 16)
    assert ATTN_BACKENDS == ("fastmim", "sdpa", "xformers", "reference")
    assert choose_attn_backend(q, q, q) == "sdpa"  # CPU default
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, q, q, backend="flash")
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="xformers"):
            attention(q, q, q, backend="xformers")


def test_attention_backend_env_override(monkeypatch):
    q = torch.randn(1, 1, 4, 16)
    monkeypatch.setenv("FASTMIM_ATTN_BACKEND", "reference")
    assert choose_attn_backend(q, q, q) == "reference"
    monkeypatch.setenv("FASTMIM_ATTN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTMIM_ATTN_BACKEND"):
        choose_attn_backend(q, q, q)


def _measured_choice(monkeypatch, times):
    """``choose_attn_backend`` on CPU as if on CUDA: it measures, with the timing replaced by a recorder."""
    attn = importlib.import_module("fastmim.ops.attention")  # the package's ``attention`` is the function

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
    attn, timed = _measured_choice(monkeypatch, {"fastmim": 1.0, "sdpa": 2.0})
    for lengths in ([5, 7], [9, 11], [16, 1], [3, 3]):
        (q, k, v), cu = _packed(lengths)
        assert choose_attn_backend(q, k, v, cu_seqlens=cu, max_seqlen=16) == "fastmim"
    assert timed == ["fastmim", "sdpa"] and len(attn._CHOICE_CACHE) == 1
    # What the timing does depend on is a new bucket: the bound, the number of sequences, heads, dtype.
    for (q, k, v), cu, bound in [(*_packed([5, 7]), 32), (*_packed([5, 7, 2]), 16), (*_packed([5, 7], heads=4), 16),
                                 (*_packed([5, 7], dtype=torch.float16), 16)]:
        choose_attn_backend(q, k, v, cu_seqlens=cu, max_seqlen=bound)
    assert len(timed) == 2 + 4 * 2 and len(attn._CHOICE_CACHE) == 5


def test_choice_cache_dense_and_key_visibility_buckets(monkeypatch):
    attn, timed = _measured_choice(monkeypatch, {"fastmim": 3.0, "sdpa": 2.0})
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

    attn, timed = _measured_choice(monkeypatch, {"fastmim": 2.0, "sdpa": 1.0})
    monkeypatch.setattr(attn, "_CHOICE_CACHE", NoLookup())
    torch._dynamo.reset()

    def f(q, k, v, cu):
        return attention(q, k, v, cu_seqlens=cu, max_seqlen=8)

    (q, k, v), cu = _packed([5, 8])
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cu)
    ref = visible_attention_reference(q, k, v, cu_seqlens=cu)
    assert timed == [] and rel_error(out, ref) < 1e-5


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
    assert rel_error(out, ref) < 1e-5


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
        ((p, p, p), dict(cu_seqlens=cu[:1], max_seqlen=5), ValueError, r"cu_seqlens must be 1-D \(B\+1,\)"),
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
