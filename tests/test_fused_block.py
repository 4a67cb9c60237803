"""fused_block ops (layer_norm, add_layer_norm, bias_gelu): Triton kernels and op against their references."""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastmim.kernels.fused_block as kernels
from fastmim import ops
from fastmim.testing import TOLERANCES, assert_rel_close, kernel_devices

DEVICES = kernel_devices()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, N, C): batch 1, odd row counts (7, 147, 197 rows), channel counts that are not powers of two.
SHAPES = [(1, 7, 48), (3, 49, 40), (1, 197, 24)]


@contextlib.contextmanager
def poisoned_allocations():
    """Every float buffer the launchers allocate starts as NaN: an element a kernel skips shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
        mp.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
        yield


# Every shape and dtype with the launchers' own program counts, and the largest shape in fp32 with
# "few_programs": several rows (row blocks) per backward program, so the partial sums accumulate.
CASES = [(shape, dtype, "default") for shape in SHAPES for dtype in DTYPES] + [(SHAPES[-1], torch.float32, "few")]
GELU_SHAPES = [(1, 7, 48), (3, 49, 100), (1, 197, 72)]
GELU_CASES = [(shape, dtype, "default") for shape in GELU_SHAPES for dtype in DTYPES] + [
    (GELU_SHAPES[-1], torch.float32, "few")]


@pytest.fixture
def programs(request, monkeypatch):
    if request.param == "few":
        monkeypatch.setattr(kernels, "_LN_BACKWARD_PROGRAMS", 3)
        monkeypatch.setattr(kernels, "_GELU_BACKWARD_ROW_PROGRAMS", 2)
        monkeypatch.setattr(kernels, "_GELU_TILE", 256)
    return request.param


def _leaf(t):
    return t.detach().requires_grad_(True)


def _grads(out, grad, inputs):
    return torch.autograd.grad(out, inputs, grad)


def _check(outs, refs, dtypes, names):
    for out, ref, dtype, name in zip(outs, refs, dtypes, names, strict=True):
        assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
        assert_rel_close(out, ref, dtype, name=name)


# --------------------------------------------------------------------------------------------
# Triton kernels against the reference, forward and backward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype,programs", CASES, indirect=["programs"])
def test_layer_norm_triton_matches_reference(device, dtype, shape, programs):
    c = shape[-1]
    x = torch.randn(shape, device=device).mul_(2).add_(0.5).to(dtype)
    weight, bias = torch.randn(c, device=device).to(dtype), torch.randn(c, device=device).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    xs, ws, bs = _leaf(x), _leaf(weight), _leaf(bias)
    with ops.use_backend("triton"), poisoned_allocations():
        y = ops.layer_norm(xs, ws, bs, 1e-6)
        grads = _grads(y, grad, (xs, ws, bs))
    x64, w64, b64 = (_leaf(t.double()) for t in (x, weight, bias))
    ref = ops.layer_norm_reference(x64, w64, b64, 1e-6)
    refs = _grads(ref, grad.double(), (x64, w64, b64))
    _check((y, *grads), (ref, *refs), [dtype] * 4, ["y", "dx", "dweight", "dbias"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype,programs", CASES, indirect=["programs"])
def test_add_layer_norm_triton_matches_reference(device, dtype, shape, programs):
    c = shape[-1]
    x, residual = (torch.randn(shape, device=device).to(dtype) for _ in range(2))
    weight, bias = torch.randn(c, device=device).to(dtype), torch.randn(c, device=device).to(dtype)
    grad_s, grad_y = (torch.randn(shape, device=device).to(dtype) for _ in range(2))
    leaves = [_leaf(t) for t in (x, residual, weight, bias)]
    with ops.use_backend("triton"), poisoned_allocations():
        s, y = ops.add_layer_norm(*leaves, eps=1e-5)
        grads = torch.autograd.grad((s, y), leaves, (grad_s, grad_y))
    # The sum is rounded to the dtype before it is normalised (as an unfused add leaves it): so is the reference's.
    s_ref = (x.double() + residual.double()).to(dtype)
    # (the interpreter may round fp32 -> bf16 differently from PyTorch: the dtype's tolerance, not equality)
    assert_rel_close(s, s_ref, dtype, name="s")
    leaves64 = [_leaf(t.double()) for t in (x, residual, weight, bias)]
    s64, y64 = ops.add_layer_norm_reference(*leaves64, eps=1e-5)
    refs = torch.autograd.grad((s64, y64), leaves64, (grad_s.double(), grad_y.double()))
    _check((y, *grads), (y64, *refs), [dtype] * 5, ["y", "dx", "dresidual", "dweight", "dbias"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype,programs", GELU_CASES, indirect=["programs"])
def test_bias_gelu_triton_matches_reference(device, dtype, shape, programs):
    x = torch.randn(shape, device=device).mul_(2).to(dtype)
    bias = torch.randn(shape[-1], device=device).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    xs, bs = _leaf(x), _leaf(bias)
    with ops.use_backend("triton"), poisoned_allocations():
        y = ops.bias_gelu(xs, bs)
        grads = _grads(y, grad, (xs, bs))
    x64, b64 = _leaf(x.double()), _leaf(bias.double())
    ref = ops.bias_gelu_reference(x64, b64)
    assert_rel_close(ref, F.gelu(x64 + b64), torch.float64, name="reference vs F.gelu")
    refs = _grads(ref, grad.double(), (x64, b64))
    _check((y, *grads), (ref, *refs), [dtype] * 3, ["y", "dx", "dbias"])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_parameters_keep_their_dtype(device):
    """Autocast leaves fp32 parameters and a bf16 (or fp32) activation: outputs follow the
    activations, parameter gradients the parameters."""
    x = torch.randn(5, 3, 40, device=device, dtype=torch.bfloat16)
    r = torch.randn(5, 3, 40, device=device)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    grad = torch.randn(5, 3, 40, device=device)
    for backend in ("triton", "reference"):
        leaves = [_leaf(t) for t in (x, r, w, b)]
        with ops.use_backend(backend):
            s, y = ops.add_layer_norm(*leaves)
            grads = torch.autograd.grad(y, leaves, grad)
            z = ops.bias_gelu(leaves[0], leaves[2])
            gz = torch.autograd.grad(z, (leaves[0], leaves[2]), grad.bfloat16())
        assert s.dtype == y.dtype == torch.float32 and z.dtype == torch.bfloat16
        assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
        assert [g.dtype for g in gz] == [torch.bfloat16, torch.float32]
        leaves64 = [_leaf(t.double()) for t in (x, r, w, b)]
        refs = torch.autograd.grad(ops.add_layer_norm_reference(*leaves64)[1], leaves64, grad.double())
        for name, g, ref in zip(["dx", "dresidual", "dweight", "dbias"], grads, refs, strict=True):
            assert_rel_close(g, ref, torch.bfloat16 if g.dtype == torch.bfloat16 else torch.float32,
                             name=f"{backend} {name}")


# --------------------------------------------------------------------------------------------
# The references (the spec) and the registered backward formulas, in float64
# --------------------------------------------------------------------------------------------

def test_references_equal_pytorch_and_pass_gradcheck():
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert_rel_close(ops.layer_norm_reference(x, w, b, 1e-6), F.layer_norm(x, (12,), w, b, 1e-6), torch.float64)
    assert_rel_close(ops.bias_gelu_reference(x, b), F.gelu(x + b), torch.float64)
    assert torch.autograd.gradcheck(lambda *a: ops.layer_norm_reference(*a, 1e-6), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.add_layer_norm_reference(*a, 1e-6), (x, r, w, b))
    assert torch.autograd.gradcheck(ops.bias_gelu_reference, (x, b))


def test_registered_backward_ops_pass_gradcheck():
    """The ops' own backward (fastmim::layer_norm_backward, fastmim::bias_gelu_backward) on float64."""
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.layer_norm(*a, 1e-5), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.add_layer_norm(*a, 1e-5), (x, r, w, b))
    assert torch.autograd.gradcheck(ops.bias_gelu, (x, b))


# --------------------------------------------------------------------------------------------
# compile, validation
# --------------------------------------------------------------------------------------------

def test_compile_fullgraph():
    class MiniBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
            self.fc1, self.fc2 = torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)

        def forward(self, x):
            x, h = ops.add_layer_norm(x, ops.layer_norm(x, self.norm1.weight, self.norm1.bias), self.norm2.weight,
                                  self.norm2.bias)
            return x + self.fc2(ops.bias_gelu(F.linear(h, self.fc1.weight), self.fc1.bias))

    model = MiniBlock()
    x = torch.randn(2, 9, 16)
    eager = model(x)
    eager.sum().backward()
    eager_grad = model.fc1.bias.grad.clone()
    model.zero_grad()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    assert_rel_close(out, eager, torch.float32, name="compiled output")
    assert_rel_close(model.fc1.bias.grad, eager_grad, torch.float32, name="compiled fc1 bias grad")


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, b: ops.layer_norm(x, w[:-1], b), ValueError, r"weight must have shape \(8,\)"),
    (lambda x, w, b: ops.layer_norm(x, w, b[None]), ValueError, r"bias must have shape \(8,\)"),
    (lambda x, w, b: ops.layer_norm(x.long(), w, b), TypeError, "x must be float16"),
    (lambda x, w, b: ops.layer_norm(x, w, b, eps=-1.0), ValueError, "eps must be a non-negative"),
    (lambda x, w, b: ops.layer_norm(x[..., :0], w[:0], b[:0]), ValueError, "non-empty last dim"),
    (lambda x, w, b: ops.add_layer_norm(x, x[:1], w, b), ValueError, "residual must have the shape of x"),
    (lambda x, w, b: ops.add_layer_norm(x, "x", w, b), TypeError, "residual must be a torch.Tensor"),
    (lambda x, w, b: ops.bias_gelu(x, b[:3]), ValueError, r"bias must have shape \(8,\)"),
    (lambda x, w, b: ops.bias_gelu([1.0], b), TypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    x, w, b = torch.randn(2, 3, 8), torch.randn(8), torch.randn(8)
    with pytest.raises(error, match=match):
        call(x, w, b)


def test_tolerances_are_the_shared_ones():
    assert TOLERANCES[torch.bfloat16] > TOLERANCES[torch.float16] > TOLERANCES[torch.float32]


# --------------------------------------------------------------------------------------------
# The ViT block on these ops
# --------------------------------------------------------------------------------------------

def test_fused_block_runs_timm_steps_where_the_fused_ops_have_no_kernel():
    """On CPU without the Triton path the fused ops' reference would only add recomputation: the block
    takes timm's steps there (no fastmim op runs), and the fused ones on the Triton path."""
    from fastmim.models.vit import FusedBlock

    block = FusedBlock(32, 2, qkv_bias=True, attn_backend="sdpa")
    x = torch.randn(2, 5, 32)
    with ops.use_backend("reference"):
        assert not block.fusable(x)
    with ops.use_backend("triton"):
        assert block.fusable(x)
    assert block.fusable(x.to("meta"))  # shape-only runs (the cost model) see the GPU step
    real = torch.ops.fastmim.gemm_forward
    for backend, fused in (("reference", False), ("triton", True)):
        seen = []
        with ops.use_backend(backend), mock.patch.object(torch.ops.fastmim, "gemm_forward",
                                                     side_effect=lambda *a, seen=seen: seen.append(a) or real(*a)):
            block(x)
        assert bool(seen) == fused, backend


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_block_is_the_timm_block(backend):
    from functools import partial

    from fastmim.models.vit import Block, FusedBlock

    if backend == "triton" and "cpu" not in DEVICES and not torch.cuda.is_available():
        pytest.skip("no device for the Triton kernels")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    plain = Block(32, 2, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), attn_backend="sdpa")
    fused = FusedBlock(32, 2, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), attn_backend="sdpa")
    assert list(fused.state_dict()) == list(plain.state_dict())
    with torch.no_grad():  # non-trivial affine parameters, so a swapped weight or bias shows
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused.load_state_dict(plain.state_dict())
    plain, fused = plain.to(device), fused.to(device)
    x = torch.randn(2, 9, 32, device=device)
    grad = torch.randn(2, 9, 32, device=device)
    xp, xf = _leaf(x), _leaf(x)
    ref = plain(xp)
    ref.backward(grad)
    with ops.use_backend(backend):
        out = fused(xf)
        out.backward(grad)
    assert_rel_close(out, ref, torch.float32, name="block output")
    assert_rel_close(xf.grad, xp.grad, torch.float32, name="dx")
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert_rel_close(p.grad, q.grad, tol=1e-4, name=f"grad {name}")  # fp32 sums in another order


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_add_layer_norm_with_one_output_used(backend):
    x, r = torch.randn(3, 5, 16, requires_grad=True), torch.randn(3, 5, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    grad = torch.randn(3, 5, 16)
    with ops.use_backend(backend):
        s, y = ops.add_layer_norm(x, r, w, b)
        gx, gr = torch.autograd.grad(s, (x, r), grad)
        assert torch.equal(gx, grad) and torch.equal(gr, grad)
        s, y = ops.add_layer_norm(x, r, w, b)
        grads = torch.autograd.grad(y, (x, r, w, b), grad)
    refs = torch.autograd.grad(ops.add_layer_norm_reference(x, r, w, b)[1], (x, r, w, b), grad)
    for name, g, ref in zip(["dx", "dresidual", "dweight", "dbias"], grads, refs, strict=True):
        assert_rel_close(g, ref, torch.float32, name=name)


# --------------------------------------------------------------------------------------------
# bias_gelu_linear: GELU + fc2 recomputing the activation in backward
# --------------------------------------------------------------------------------------------

def _mlp_tail_reference(x, bias, weight, linear_bias):
    return F.linear(ops.bias_gelu_reference(x, bias), weight, linear_bias)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_linear_matches_reference(backend, dtype, with_bias):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 13, 40, device=device).to(dtype)
    bias, weight = torch.randn(40, device=device).to(dtype), (torch.randn(24, 40, device=device) / 6).to(dtype)
    linear_bias = torch.randn(24, device=device).to(dtype) if with_bias else None
    grad = torch.randn(2, 13, 24, device=device).to(dtype)
    inputs = [t for t in (x, bias, weight, linear_bias) if t is not None]
    leaves = [_leaf(t) for t in inputs]
    with ops.use_backend(backend):
        out = ops.bias_gelu_linear(*leaves) if with_bias else ops.bias_gelu_linear(*leaves, None)
        grads = _grads(out, grad, leaves)
    leaves64 = [_leaf(t.double()) for t in inputs]
    ref = _mlp_tail_reference(*leaves64) if with_bias else _mlp_tail_reference(*leaves64, None)
    refs = _grads(ref, grad.double(), leaves64)
    names = ["out", "dx", "dbias", "dweight", "dlinear_bias"][:len(inputs) + 1]
    # bf16: a matmul over 40 products after the rounded activation, twice the one-pass tolerance.
    tol = TOLERANCES[dtype] * (2 if dtype == torch.bfloat16 else 1)
    for name, got, want in zip(names, (out, *grads), (ref, *refs), strict=True):
        assert got.dtype == dtype, name
        assert_rel_close(got, want, tol=tol, name=name)


def test_bias_gelu_linear_saves_only_its_input_and_passes_gradcheck():
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    linear_bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.bias_gelu_linear(x.detach().requires_grad_(), bias, weight, linear_bias)
    params = {bias.data_ptr(), weight.data_ptr()}
    activations = [t for t in saved if t.data_ptr() not in params]
    assert len(activations) == 1 and activations[0].shape == x.shape  # x only: no (3, 4, 10) activation
    assert torch.autograd.gradcheck(ops.bias_gelu_linear, (x, bias, weight, linear_bias))


def test_bias_gelu_linear_compiles_fullgraph():
    fc1, fc2 = torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)

    def mlp(h):
        return ops.bias_gelu_linear(F.linear(h, fc1.weight), fc1.bias, fc2.weight, fc2.bias)

    h = torch.randn(2, 9, 16)
    eager = mlp(h)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias):
        p.grad = None
    out = torch.compile(mlp, fullgraph=True, backend="aot_eager")(h)
    out.sum().backward()
    assert_rel_close(out, eager, torch.float32, name="compiled output")
    for p, g in zip((fc1.weight, fc1.bias, fc2.weight, fc2.bias), eager_grads, strict=True):
        assert_rel_close(p.grad, g, torch.float32, name="compiled grad")


# --------------------------------------------------------------------------------------------
# layer_norm_linear / add_layer_norm_linear: the LayerNorm output recomputed in backward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, None, True])
def test_layer_norm_linear_matches_reference(backend, dtype, with_residual):
    """``with_residual``: False, ``layer_norm_linear``; None, ``add_layer_norm_linear`` without a
    residual, its ``s`` (a view of ``x``) used too, so ``dx`` carries the gradient of ``s``; True, with one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (2, 13, 40)
    x, r = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)
    w, b = torch.randn(40, device=device).to(dtype), torch.randn(40, device=device).to(dtype)
    lw, lb = (torch.randn(24, 40, device=device) / 6).to(dtype), torch.randn(24, device=device).to(dtype)
    grad_s, grad = torch.randn(shape, device=device).to(dtype), torch.randn(2, 13, 24, device=device).to(dtype)
    inputs = [x, r, w, b, lw, lb] if with_residual else [x, w, b, lw, lb]

    def run(*t, fast):
        if with_residual is None:
            xx, ww, bb, lww, lbb = t
            s, y = ops.add_layer_norm_linear(xx, None, ww, bb, 1e-6, lww, lbb) if fast else \
                (xx, F.linear(ops.layer_norm_reference(xx, ww, bb, 1e-6), lww, lbb))
            if fast:
                assert s._base is xx
            return (s, y), (grad_s, grad)
        if with_residual:
            xx, rr, ww, bb, lww, lbb = t
            s, y = ops.add_layer_norm_linear(xx, rr, ww, bb, 1e-6, lww, lbb) if fast else \
                (xx + rr, F.linear(ops.layer_norm_reference(xx + rr, ww, bb, 1e-6), lww, lbb))
            return (s, y), (grad_s, grad)
        xx, ww, bb, lww, lbb = t
        out = ops.layer_norm_linear(xx, ww, bb, 1e-6, lww, lbb) if fast else \
            F.linear(ops.layer_norm_reference(xx, ww, bb, 1e-6), lww, lbb)
        return (out,), (grad,)

    leaves = [_leaf(t) for t in inputs]
    with ops.use_backend(backend):
        outs, grads_in = run(*leaves, fast=True)
        grads = torch.autograd.grad(outs, leaves, grads_in)
    leaves64 = [_leaf(t.double()) for t in inputs]
    refs_out, refs_in = run(*leaves64, fast=False)
    refs = torch.autograd.grad(refs_out, leaves64, [g.double() for g in refs_in])
    tol = TOLERANCES[dtype] * (2 if dtype == torch.bfloat16 else 1)  # a matmul after a rounded LayerNorm
    for i, (got, want) in enumerate(zip((*outs, *grads), (*refs_out, *refs), strict=True)):
        assert got.dtype == dtype, i
        assert_rel_close(got, want, tol=tol, name=f"output/gradient {i}")


def test_layer_norm_linear_saves_no_normalised_tensor_and_passes_gradcheck():
    x, r = (torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(10, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lw, lb = torch.randn(6, 10, dtype=torch.float64, requires_grad=True), torch.randn(6, dtype=torch.float64,
                                                                                      requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        s, _ = ops.add_layer_norm_linear(x, r, w, b, 1e-5, lw, lb)
    params = {t.data_ptr() for t in (w, b, lw, lb)}
    full = [t for t in saved if t.data_ptr() not in params and t.shape == x.shape]
    assert len(full) == 1 and full[0].data_ptr() == s.data_ptr()  # the sum only, not the normalised tensor
    assert torch.autograd.gradcheck(lambda *a: ops.layer_norm_linear(a[0], a[1], a[2], 1e-5, a[3], a[4]),
                                    (x, w, b, lw, lb))
    assert torch.autograd.gradcheck(lambda *a: ops.add_layer_norm_linear(a[0], a[1], a[2], a[3], 1e-5, a[4], a[5]),
                                    (x, r, w, b, lw, lb))


def test_fused_block_compiles_fullgraph():
    """The fused steps (Triton path) trace into one graph and compute what the eager block does."""
    from fastmim.models.vit import FusedBlock

    torch.manual_seed(0)
    block = FusedBlock(32, 2, qkv_bias=True, attn_backend="sdpa")
    x = torch.randn(2, 9, 32)
    with ops.use_backend("triton"):
        assert block.fusable(x)
        eager = block(x)
        eager.sum().backward()
        eager_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
        block.zero_grad()
        torch._dynamo.reset()
        targets = []
        aot_eager = torch._dynamo.lookup_backend("aot_eager")

        def inspecting_aot_eager(gm, example_inputs):
            targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return aot_eager(gm, example_inputs)

        out = torch.compile(block, fullgraph=True, backend=inspecting_aot_eager)(x)
        out.sum().backward()
    # the three fused steps, as autograd Functions; no LayerNorm or GELU of timm's steps left
    assert targets.count("autograd_function_apply") == 3, targets
    assert not any("layer_norm" in t or "gelu" in t for t in targets), targets
    assert_rel_close(out, eager, torch.float32, name="compiled block")
    for n, p in block.named_parameters():
        assert_rel_close(p.grad, eager_grads[n], torch.float32, name=f"compiled grad {n}")


def _block_stack(fused: bool, depth: int = 3, plain_at: int | None = None):
    from functools import partial

    from fastmim.models.vit import Block, FusedBlock

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList()
    for i in range(depth):
        cls = FusedBlock if fused and i != plain_at else Block
        blocks.append(cls(32, 2, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                          attn_backend="fastmim"))
    with torch.no_grad():
        for p in blocks.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return blocks


@pytest.mark.parametrize("plain_at", [None, 1])
@pytest.mark.parametrize("packed", [False, True])
def test_run_blocks_is_the_blocks_in_turn(plain_at, packed):
    """Fused blocks chained on a two-term residual stream (a plain block in the middle breaks the
    chain) give the blocks' function, forward and backward, dense and packed."""
    from fastmim.models.vit import run_blocks

    fused, plain = _block_stack(True, plain_at=plain_at), _block_stack(False)
    fused.load_state_dict(plain.state_dict())
    kwargs = {}
    x = torch.randn(2, 9, 32)
    if packed:
        x = torch.randn(13, 32)
        kwargs = dict(cu_seqlens=torch.tensor([0, 6, 13], dtype=torch.int32), max_seqlen=7)
    grad = torch.randn_like(x)
    xp, xf = _leaf(x), _leaf(x)
    ref = xp
    for blk in plain:
        ref = blk(ref, **kwargs)
    ref.backward(grad)
    with ops.use_backend("triton"):
        out = run_blocks(fused, xf, **kwargs)
        out.backward(grad)
    assert_rel_close(out, ref, torch.float32, name="output")
    assert_rel_close(xf.grad, xp.grad, torch.float32, name="dx")
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert_rel_close(p.grad, q.grad, tol=1e-4, name=f"grad {name}")


def test_run_blocks_leaves_no_residual_add_in_the_fused_blocks():
    """No add kernel, forward or backward: each residual add runs in a GEMM's epilogue, each residual
    gradient joins dx inside a LayerNorm backward kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastmim.models.vit import run_blocks

    class CountAdds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.adds = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_):
                self.adds += 1
            return func(*args, **(kwargs or {}))

    blocks = _block_stack(True)
    x = _leaf(torch.randn(2, 9, 32))
    with ops.use_backend("triton"):
        with CountAdds() as forward:
            out = run_blocks(blocks, x)
        with CountAdds() as backward:
            out.backward(torch.randn_like(out))
    assert forward.adds == 0
    assert backward.adds == 0


# --------------------------------------------------------------------------------------------
# GEMMs with the block's steps fused in (norm_linear, linear_add, norm_mlp_add)
# --------------------------------------------------------------------------------------------

from fastmim.ops import (  # noqa: E402
    layer_norm_stats,
    linear_add,
    linear_add_reference,
    norm_linear,
    norm_linear_reference,
    norm_mlp_add,
    norm_mlp_add_reference,
)
from fastmim.testing import poison_allocations  # noqa: E402

# Interpreter tiles (BLOCK_M, BLOCK_N, BLOCK_K): several row, column and K blocks with ragged ends
# (M = 37, N = 72 or 40, K = 48), and 128-column blocks holding two statistics tiles.
GEMM_TILES = [(16, 64, 16), (32, 128, 32)]


@pytest.fixture
def gemm_tiles(request, monkeypatch):
    bm, bn, bk = request.param
    monkeypatch.setattr(kernels, "_interpret_config", lambda m, n, k: (bm, bn, bk, 4, 1))
    return request.param


def _stats_of(s):
    """(mean, var) per row from the per-tile statistics, in float64."""
    count, mean_t, m2_t = s.double().unbind(-1)
    mean = (count * mean_t).sum(-1) / count.sum(-1)
    return mean, (m2_t + count * (mean_t - mean[:, None]) ** 2).sum(-1) / count.sum(-1)


@pytest.mark.skipif("cpu" not in DEVICES, reason="the interpreter runs these launchers on CPU tensors")
@pytest.mark.parametrize("gemm_tiles", GEMM_TILES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gemm_launchers_match_float64(dtype, gemm_tiles):
    """Each fused GEMM launcher against float64 math on ragged shapes, outputs NaN-poisoned first."""
    m, k, n = 37, 48, 72
    tol = TOLERANCES[dtype] * (2 if dtype == torch.bfloat16 else 1)
    x, res = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    w, b = (torch.randn(n, k) / 7).to(dtype), torch.randn(n).to(dtype)
    g, be = torch.randn(k).to(dtype), torch.randn(k).to(dtype)
    grad, pre = torch.randn(m, n).to(dtype), torch.randn(m, k).to(dtype)
    xd, wd, bd, gd, bed = (t.double() for t in (x, w, b, g, be))
    with poison_allocations(kernels):
        stats = kernels.row_stats(x)
        fwd = kernels.linear_forward(x, w, b, dtype, dtype, norm=(stats, g, be, 1e-6), gelu=True)
        add = kernels.linear_forward(x, w, None, dtype, dtype, residual=res)
        dpre = kernels.linear_dgelu(grad, w, pre, dtype)
        mean, rstd = fwd["mean"], fwd["rstd"]
        partial = torch.randn(2, 5, k)
        dw_ln, db_ln, dparams = kernels.linear_wgrad(grad, x, dtype, torch.float32, dtype, norm=(mean, rstd, g, be),
                                                     partial=partial, param_dtype=torch.float32)
        dw_gelu, db_gelu, _ = kernels.linear_wgrad(grad, pre, dtype, dtype, None, gelu=True)
    ln = F.layer_norm(xd, (k,), gd, bed, 1e-6)
    assert_rel_close(_stats_of(stats)[0], xd.mean(-1), torch.float32, name="row_stats mean")
    assert_rel_close(mean, xd.mean(-1), torch.float32, name="prologue mean")
    assert_rel_close(rstd, (xd.var(-1, unbiased=False) + 1e-6).rsqrt(), torch.float32, name="prologue rstd")
    h = ln @ wd.t() + bd
    assert_rel_close(fwd["pre"], h, tol=tol, name="fc1 pre-activation")
    assert_rel_close(fwd["out"], F.gelu(h), tol=tol, name="fc1 GELU")
    s = xd @ wd.t() + res.double()
    assert_rel_close(add["out"], s, tol=tol, name="residual epilogue")
    assert add["stats"].shape == (m, kernels.stats_tiles(n), 3)
    smean, svar = _stats_of(add["stats"])
    assert_rel_close(smean, add["out"].double().mean(-1), torch.float32, name="epilogue stats mean")
    assert_rel_close(svar, add["out"].double().var(-1, unbiased=False), torch.float32, name="epilogue stats var")
    pd = pre.double().requires_grad_()
    (ref_dpre,) = torch.autograd.grad(F.gelu(pd), pd, grad.double() @ wd)
    assert_rel_close(dpre, ref_dpre, tol=tol, name="dGELU epilogue")
    assert_rel_close(dw_ln, grad.double().t() @ ln, tol=tol, name="wgrad, LayerNorm prologue")
    assert dw_ln.dtype == torch.float32 and db_ln.dtype == dtype and db_gelu is None
    assert_rel_close(db_ln, grad.double().sum(0), tol=tol, name="bias gradient row sums")
    assert_rel_close(dparams, partial.double().sum(1), torch.float32, name="dgamma/dbeta side reduction")
    assert_rel_close(dw_gelu, grad.double().t() @ F.gelu(pre.double()), tol=tol, name="wgrad, GELU prologue")


def _mlp_inputs(dtype, c=40, hidden=72, shape=(2, 13)):
    x = torch.randn(*shape, c).to(dtype)
    params = [torch.randn(c), torch.randn(c), torch.randn(hidden, c) / 6, torch.randn(hidden),
              torch.randn(c, hidden) / 8, torch.randn(c)]
    return [x] + [p.to(dtype) for p in params]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gemm_ops_match_reference(backend, dtype):
    """norm_mlp_add and norm_linear -> linear_add (a block's two halves), forward and every gradient."""
    if backend == "triton" and not DEVICES:
        pytest.skip("no device for the Triton kernels")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tol = TOLERANCES[dtype] * (2 if dtype == torch.bfloat16 else 1)
    inputs = [t.to(device) for t in _mlp_inputs(dtype)]
    qkv_w, qkv_b = (torch.randn(120, 40, device=device) / 6).to(dtype), torch.randn(120, device=device).to(dtype)
    proj_w, proj_b = (torch.randn(40, 120, device=device) / 10).to(dtype), torch.randn(40, device=device).to(dtype)
    grad = torch.randn(2, 13, 40, device=device).to(dtype)

    def run(x, nw, nb, w1, b1, w2, b2, qw, qb, pw, pb, fast):
        if fast:
            xv, qkv = norm_linear(x, None, nw, nb, 1e-6, qw, qb)
            s, stats = linear_add(qkv, pw, pb, xv)
            return norm_mlp_add(s, stats, nw, nb, 1e-6, w1, b1, w2, b2)[0]
        s = linear_add_reference(norm_linear_reference(x, nw, nb, 1e-6, qw, qb), pw, pb, x)
        return norm_mlp_add_reference(s, nw, nb, 1e-6, w1, b1, w2, b2)

    tensors = inputs + [qkv_w, qkv_b, proj_w, proj_b]
    leaves = [_leaf(t) for t in tensors]
    with ops.use_backend(backend):
        out = run(*leaves, fast=True)
        grads = _grads(out, grad, leaves)
    leaves64 = [_leaf(t.double()) for t in tensors]
    ref = run(*leaves64, fast=False)
    refs = _grads(ref, grad.double(), leaves64)
    names = ["out", "dx", "dnorm_w", "dnorm_b", "dfc1_w", "dfc1_b", "dfc2_w", "dfc2_b", "dqkv_w", "dqkv_b", "dproj_w",
             "dproj_b"]
    for name, got, want in zip(names, (out, *grads), (ref, *refs), strict=True):
        assert got.dtype == dtype, name
        assert_rel_close(got, want, tol=tol, name=f"{backend} {name}")


def test_fused_gemm_ops_pass_gradcheck_and_save_no_activation():
    """The registered backward formulas (float64: the reference implementations of the custom ops), and
    what norm_mlp_add saves: x, the row mean/rstd and fc1's pre-activation, no activation or LN output."""
    x, nw, nb, w1, b1, w2, b2 = (_leaf(t.double()) for t in _mlp_inputs(torch.float64, c=6, hidden=10, shape=(2, 3)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm_mlp_add(x, None, nw, nb, 1e-5, w1, b1, w2, b2)
    params = {t.data_ptr() for t in (nw, nb, w1, b1, w2, b2)}
    activations = sorted(tuple(t.shape) for t in saved if t.data_ptr() not in params)
    assert activations == [(2, 3, 6), (6,), (6,), (6, 10)], activations  # x, mean, rstd, fc1 pre-activation
    assert torch.autograd.gradcheck(lambda *a: norm_mlp_add(a[0], None, a[1], a[2], 1e-5, *a[3:])[0],
                                    (x, nw, nb, w1, b1, w2, b2))
    qw, qb = _leaf(torch.randn(9, 6, dtype=torch.float64)), _leaf(torch.randn(9, dtype=torch.float64))
    pw = _leaf(torch.randn(6, 9, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda x, nw, nb, qw, qb, pw: linear_add(norm_linear(x, None, nw, nb, 1e-5, qw, qb)[1], pw, None, x)[0],
        (x, nw, nb, qw, qb, pw))
    stats = layer_norm_stats(x)
    assert stats.shape == (6, 1, 3) and torch.equal(stats[:, 0, 0], torch.full((6,), 6.0, dtype=torch.float64))


@pytest.mark.skipif("cpu" not in DEVICES, reason="the interpreter runs the Triton path on CPU")
def test_fused_gemm_ops_under_autocast_keep_the_dtypes_of_the_unfused_block():
    """bf16 autocast over fp32 parameters and an fp32 residual stream: the products in bf16, the stream
    and every parameter gradient in fp32, the values those of the unfused chain under the same autocast."""
    inputs = _mlp_inputs(torch.float32)
    grad = torch.randn(2, 13, 40)
    results = {}
    for fast in (True, False):
        leaves = [_leaf(t) for t in inputs]
        with ops.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
            if fast:
                out = norm_mlp_add(leaves[0], None, leaves[1], leaves[2], 1e-6, *leaves[3:])[0]
            else:
                out = norm_mlp_add_reference(leaves[0], leaves[1], leaves[2], 1e-6, *leaves[3:])
        results[fast] = (out, *_grads(out, grad, leaves))
    for i, (got, want) in enumerate(zip(results[True], results[False], strict=True)):
        assert got.dtype == want.dtype == torch.float32, i
        assert_rel_close(got, want, tol=2 * TOLERANCES[torch.bfloat16], name=f"output/gradient {i}")


def test_fused_block_launches_only_gemms_and_layer_norm_rows():
    """One block, forward and backward on the fused-GEMM path: the ops that run, in order. Forward:
    statistics, qkv, attention, proj, fc1, fc2; backward: no elementwise, reduction or add kernel
    between the GEMMs, the LayerNorm rows and the attention (three cuBLAS input-gradient GEMMs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastmim.models.vit import FusedBlock

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
            if not view and func.__name__.split(".")[0] not in ("empty", "empty_like", "new_empty", "detach",
                                                                             "promote_types", "result_type"):
                self.names.append(func._schema.name.replace("aten::", "").replace("fastmim::", ""))
            return out

    block = FusedBlock(32, 2, qkv_bias=True, attn_backend="fastmim")
    x = _leaf(torch.randn(2, 5, 32))
    with ops.use_backend("triton"):
        assert block.stream_fusable(x)
        with Ops() as forward:
            out = block(x)
        grad = torch.randn_like(out)
        with Ops() as backward:
            out.backward(grad)
    assert forward.names == ["layer_norm_stats", "gemm_forward", "visible_attention_qkvpacked", "gemm_forward",
                             "gemm_forward", "gemm_forward"], forward.names
    assert backward.names == ["gemm_dgelu", "gemm_wgrad", "mm", "layer_norm_backward_partial", "gemm_wgrad",
                              "mm", "gemm_wgrad", "visible_attention_qkvpacked_backward", "mm",
                              "layer_norm_backward_partial", "gemm_wgrad"], backward.names
