"""norm_act ops (layer_norm, add_layer_norm, bias_gelu and their forms followed by a linear layer): Triton
kernels and ops against their references."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastmim.kernels.norm_act as kernels
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
