"""fused_block ops (norm_linear, linear_add, norm_mlp_add: the ViT block's GEMMs with its LayerNorm, bias,
GELU and residual add fused in) and the ViT block on them (FusedBlock, run_blocks): Triton kernels and ops
against their references, the block against timm's."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastmim.kernels.fused_block as kernels
from fastmim import ops
from fastmim.testing import TOLERANCES, assert_rel_close, kernel_devices, poison_allocations

DEVICES = kernel_devices()


def _leaf(t):
    return t.detach().requires_grad_(True)


def _grads(out, grad, inputs):
    return torch.autograd.grad(out, inputs, grad)


# --------------------------------------------------------------------------------------------
# GEMMs with the block's steps fused in (norm_linear, linear_add, norm_mlp_add)
# --------------------------------------------------------------------------------------------

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
            xv, qkv = ops.norm_linear(x, None, nw, nb, 1e-6, qw, qb)
            s, stats = ops.linear_add(qkv, pw, pb, xv)
            return ops.norm_mlp_add(s, stats, nw, nb, 1e-6, w1, b1, w2, b2)[0]
        s = ops.linear_add_reference(ops.norm_linear_reference(x, nw, nb, 1e-6, qw, qb), pw, pb, x)
        return ops.norm_mlp_add_reference(s, nw, nb, 1e-6, w1, b1, w2, b2)

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
        ops.norm_mlp_add(x, None, nw, nb, 1e-5, w1, b1, w2, b2)
    params = {t.data_ptr() for t in (nw, nb, w1, b1, w2, b2)}
    activations = sorted(tuple(t.shape) for t in saved if t.data_ptr() not in params)
    assert activations == [(2, 3, 6), (6,), (6,), (6, 10)], activations  # x, mean, rstd, fc1 pre-activation
    assert torch.autograd.gradcheck(lambda *a: ops.norm_mlp_add(a[0], None, a[1], a[2], 1e-5, *a[3:])[0],
                                    (x, nw, nb, w1, b1, w2, b2))
    qw, qb = _leaf(torch.randn(9, 6, dtype=torch.float64)), _leaf(torch.randn(9, dtype=torch.float64))
    pw = _leaf(torch.randn(6, 9, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda x, nw, nb, qw, qb, pw: ops.linear_add(ops.norm_linear(x, None, nw, nb, 1e-5, qw, qb)[1], pw, None, x)[0],
        (x, nw, nb, qw, qb, pw))
    stats = ops.layer_norm_stats(x)
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
                out = ops.norm_mlp_add(leaves[0], None, leaves[1], leaves[2], 1e-6, *leaves[3:])[0]
            else:
                out = ops.norm_mlp_add_reference(leaves[0], leaves[1], leaves[2], 1e-6, *leaves[3:])
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
