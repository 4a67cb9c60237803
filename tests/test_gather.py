"""Gather ops: gather_visible and unshuffle.

The fast path (Triton, through the interpreter on CPU; csrc when built) is compared with the
plain-PyTorch references, and the references with the official MAE chain they replace. Index
ops are pure copies plus one rounded add, so forward results must be bit-identical; gradient
sums over the batch are compared within the dtype tolerance.

Every buffer the Triton launchers allocate (outputs and reduction workspaces) is poisoned and
sits between two poisoned guard bands, checked after each test: a skipped write shows up as NaN
(or the integer max) instead of inheriting a correct value, and a write before the start or past
the end is caught.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmim import testing
from fastmim.kernels import gather as kernels
from fastmim.ops import (
    backend_status,
    gather_visible,
    gather_visible_reference,
    num_keep_from_ratio,
    random_masking,
    random_masking_reference,
    random_permutation,
    random_permutation_reference,
    unshuffle,
    unshuffle_reference,
    use_backend,
)
from fastmim.ops.masking import masking_noise_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers.official_mae import MaskedAutoencoderViT as OfficialMAE  # noqa: E402

DEVICES = testing.kernel_devices()
RATIOS = [0.0, 0.5, 0.75, 0.9]
CSRC_ERROR = backend_status("cpu")["csrc"]
_LAUNCHERS = ("gather_visible_forward", "gather_visible_backward", "unshuffle_forward", "unshuffle_backward")


@pytest.fixture(autouse=True)
def triton_calls():
    """Guards the Triton launchers' allocations; yields the launcher calls by name."""
    launchers = {name: name for name in _LAUNCHERS}
    with testing.guarded_allocations(kernels), testing.count_calls(kernels, launchers) as calls:
        yield calls


def test_launcher_buffers_are_poisoned():
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        t = kernels.torch.empty((3, 5), dtype=dtype, device="cpu")
        assert t.shape == (3, 5) and t.dtype == dtype and t.is_contiguous() and testing.is_poison(t)


def _assert_same_values(out, ref, device):
    """Bit-identical: a copy plus one add in fp32 rounded once, as eager PyTorch does. Except bf16
    under the Triton interpreter, whose fp32 -> bf16 conversion truncates instead of rounding to
    nearest (a GPU rounds to nearest): there, one bf16 ulp."""
    if out.dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        assert torch.allclose(out.float(), ref.float(), rtol=2**-7, atol=0), "beyond one bf16 ulp"
    else:
        assert torch.equal(out, ref)


def _backends(device):
    """(backend, device) pairs to run: the reference on CPU, Triton on every kernel device."""
    return [("reference", "cpu")] + [("triton", d) for d in DEVICES]


# ----------------------------------------------------------------------------- official MAE chain


def official_encoder_masking(x, pos_embed, cls_token, mask_ratio, noise):
    """models_mae's forward_encoder up to the blocks (its random_masking inlined), the noise passed in."""
    len_keep = int(x.shape[1] * (1 - mask_ratio))
    x = x + pos_embed[:, 1:, :]
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, dim=1, index=ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, x.shape[2]))
    mask = torch.ones_like(noise, dtype=torch.float32)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    cls = cls_token + pos_embed[:, :1, :]
    return torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1), mask, ids_restore


def official_decoder_unshuffle(x, ids_restore, mask_token, decoder_pos_embed):
    """models_mae's forward_decoder from the mask tokens to ``+ decoder_pos_embed``: the official
    model's (benchmarks/peers), its embedding, norm and head identities, what its blocks get."""
    identity, blocks_input = torch.nn.Identity(), []
    decoder = types.SimpleNamespace(decoder_embed=identity, mask_token=mask_token, decoder_pos_embed=decoder_pos_embed,
                                    decoder_blocks=[lambda t: blocks_input.append(t) or t], decoder_norm=identity,
                                    decoder_pred=identity)
    OfficialMAE.forward_decoder(decoder, x, ids_restore)
    return blocks_input[0]


# ----------------------------------------------------------------------------- gather_visible


def _strided(t, strided):
    """``t`` itself, or an equal tensor laid out with its last two dims swapped in memory."""
    if not strided or t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _pos_embed(kind, L, D, dtype, strided, g):
    """A position embedding of ``kind``: "none", "L" (L, D), "L+1" (L + 1, D), "1L" (1, L, D), "1L+1"."""
    if kind == "none":
        return None
    pos = _strided(torch.randn(L + kind.endswith("+1"), D, generator=g).to(dtype), strided)
    return pos[None] if kind.startswith("1") else pos


def _make_gather_inputs(B, L, D, K, dtype, device, pos_kind, with_cls, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype)
    ids_keep = random_masking_reference(B, L, num_keep=K, seed=seed + 1).ids_keep.to(device)
    pos = _pos_embed(pos_kind, L, D, dtype, False, g)
    cls = torch.randn(1, 1, D, generator=g).to(device=device, dtype=dtype) if with_cls else None
    return x, ids_keep, None if pos is None else pos.to(device), cls


def _grads(fn, inputs, grad_out_seed=5, grad_out=None):
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out)
    if grad_out is not None:
        g = grad_out.to(out.dtype)
    wrt = [t for t in leaves if t is not None]
    return out.detach(), torch.autograd.grad(out, wrt, g)


def _assert_matches_reference(fast, reference, inputs, backend, grad_out=None, dtype=torch.float32):
    """``fast`` on ``backend`` against ``reference``: the output and the first input's gradient (index
    copies) exactly (Triton: see :func:`_assert_same_values`), the other gradients (sums) within the
    tolerance of ``dtype``; returns the output."""
    ref_out, ref_grads = _grads(reference, inputs, grad_out=grad_out)
    with use_backend(backend):
        out, grads = _grads(fast, inputs, grad_out=grad_out)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    for got, want in ((out, ref_out), (grads[0], ref_grads[0])):
        if backend == "triton":
            _assert_same_values(got, want, got.device)
        else:
            assert torch.equal(got, want)
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        assert got.dtype == want.dtype
        testing.assert_rel_close(got, want, dtype)
    return out


def _triton_case(op, B, L, D, K, dtype, device, pos_kind, cls):
    """``(fast, reference, inputs, output shape)`` of a case of ``op``; the fast op takes int32 indices."""
    if op == "gather_visible":
        x, ids_keep, pos, cls_token = _make_gather_inputs(B, L, D, K, dtype, device, pos_kind, cls)
        return (lambda x, p, c: gather_visible(x, ids_keep.int(), p, cls_token=c),
                lambda x, p, c: gather_visible_reference(x, ids_keep, p, cls_token=c), (x, pos, cls_token),
                (B, K + cls, D))
    x, ids_restore, mask_token, pos = _make_unshuffle_inputs(B, L, D, K, dtype, device, pos_kind, cls)
    return (lambda x, m, p: unshuffle(x, ids_restore.int(), m, p, has_cls=cls),
            lambda x, m, p: unshuffle_reference(x, ids_restore, m, p, has_cls=cls), (x, mask_token, pos),
            (B, L + cls, D))


# (op, B, L, D, K, pos_kind, cls token): each on every kernel device, in every kernel dtype
_TRITON_CASES = [
    ("gather_visible", 1, 49, 64, 12, "1L+1", True),
    ("gather_visible", 3, 197, 48, 49, "L", False),
    ("gather_visible", 2, 49, 96, 49, "1L", True),
    ("gather_visible", 2, 16, 32, 4, "none", False),
    ("unshuffle", 1, 49, 64, 12, "1L+1", True),
    ("unshuffle", 3, 197, 48, 19, "L", False),
    ("unshuffle", 2, 49, 96, 0, "1L", True),
    ("unshuffle", 2, 16, 32, 16, "none", False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", testing.KERNEL_DTYPES)
@pytest.mark.parametrize("op,B,L,D,K,pos_kind,cls", _TRITON_CASES)
def test_triton_matches_reference(device, dtype, op, B, L, D, K, pos_kind, cls, triton_calls):
    fast, reference, inputs, shape = _triton_case(op, B, L, D, K, dtype, device, pos_kind, cls)
    ref_out, ref_grads = _grads(reference, inputs)
    # The backward op picks its backend when it runs: the gradient must be taken inside the block.
    with use_backend("triton"):
        out, grads = _grads(fast, inputs)
    assert triton_calls[f"{op}_forward"] == 1 and triton_calls[f"{op}_backward"] == 1
    assert out.shape == shape and out.dtype == ref_out.dtype
    _assert_same_values(out, ref_out, device)
    assert torch.equal(grads[0], ref_grads[0])  # the gradient of x (gather) or x_visible (unshuffle): index copies
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        assert got.dtype == want.dtype
        testing.assert_rel_close(got, want, dtype, name=f"{op}: pos/cls/mask_token grad")


@pytest.mark.parametrize("device", DEVICES)
def test_gather_visible_non_contiguous_and_only_x_grad(device):
    B, L, D, K = 2, 49, 64, 12
    base = torch.randn(B, D, L, device=device)
    x = base.transpose(1, 2)  # (B, L, D), stride 1 along L
    ids_keep = random_masking_reference(B, L, num_keep=K, seed=4).ids_keep.to(device)
    pos = torch.randn(1, L + 1, D, device=device)
    with use_backend("triton"):
        out = gather_visible(x, ids_keep, pos)
    assert torch.equal(out, gather_visible_reference(x, ids_keep, pos))
    xg = x.detach().requires_grad_(True)
    with use_backend("triton"):
        (gx,) = torch.autograd.grad(gather_visible(xg, ids_keep, pos).sum(), (xg,))
    want = torch.zeros(B, L, D, device=device)
    want[torch.arange(B)[:, None], ids_keep] = 1.0
    assert torch.equal(gx, want)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_outside_use_backend_picks_its_backend_again(device, triton_calls):
    x = torch.randn(2, 16, 8, device=device, requires_grad=True)
    ids_keep = random_masking_reference(2, 16, num_keep=5, seed=1).ids_keep.to(device)
    with use_backend("triton"):
        out = gather_visible(x, ids_keep)
    with use_backend("reference"):
        out.sum().backward()
    assert triton_calls["gather_visible_forward"] == 1 and triton_calls["gather_visible_backward"] == 0
    want = torch.zeros_like(x)
    want[torch.arange(2)[:, None], ids_keep] = 1.0
    assert torch.equal(x.grad, want)


@pytest.mark.parametrize("device", DEVICES)
def test_unshuffle_non_contiguous_inputs_triton(device):
    # x_visible and the incoming gradient transposed in memory (stride 1 along the rows), dense
    # and packed; the packed one also skips every other column.
    B, L, D, K = 2, 49, 64, 12
    m = random_masking_reference(B, L, num_keep=K, seed=6)
    x = torch.randn(B, D, K + 1, device=device).transpose(1, 2)
    mt = torch.randn(D, device=device)
    pos = torch.randn(L + 1, D, device=device)
    grad = torch.randn(B, D, L + 1, device=device).transpose(1, 2)
    ids_restore = m.ids_restore.to(device)
    _assert_matches_reference(lambda x, mt, p: unshuffle(x, ids_restore, mt, p, has_cls=True),
                              lambda x, mt, p: unshuffle_reference(x, ids_restore, mt, p, has_cls=True),
                              (x, mt, pos), "triton", grad_out=grad)
    v = random_masking_reference(B, L, num_keep=[3, 9], seed=6)
    packed = torch.randn(12 + B, 2 * D, device=device)[:, ::2]
    cu = v.cu_seqlens.to(device)
    restore = v.ids_restore.to(device)
    _assert_matches_reference(lambda x, mt: unshuffle(x, restore, mt, has_cls=True, cu_seqlens=cu),
                              lambda x, mt: unshuffle_reference(x, restore, mt, has_cls=True, cu_seqlens=cu),
                              (packed, mt), "triton")


@pytest.mark.skipif(CSRC_ERROR is not None, reason=f"csrc backend unavailable: {CSRC_ERROR}")
def test_csrc_non_contiguous_inputs_match_reference():
    # The csrc backend (the CPU default) makes x, x_visible and grad_out contiguous before its kernels.
    B, L, D = 3, 49, 40
    m = random_masking_reference(B, L, 0.75, seed=9)
    K = m.ids_keep.shape[1]
    x = torch.randn(B, D, L).transpose(1, 2)
    pos = torch.randn(1, L + 1, D)
    cls = torch.randn(D)
    ids_keep = torch.stack([m.ids_keep, m.ids_keep], -1)[..., 0]  # int64, row stride 2 K
    assert not x.is_contiguous() and not ids_keep.is_contiguous()
    grad_enc = torch.randn(B, D, K + 1).transpose(1, 2)
    _assert_matches_reference(lambda x, p, c: gather_visible(x, ids_keep, p, cls_token=c),
                              lambda x, p, c: gather_visible_reference(x, ids_keep, p, cls_token=c),
                              (x, pos, cls), "csrc", grad_out=grad_enc)
    xv = torch.randn(B, D, K + 1).transpose(1, 2)
    mt = torch.randn(1, 1, D)
    grad_dec = torch.randn(B, D, L + 1).transpose(1, 2)
    ids_restore = m.ids_restore.t().contiguous().t()
    _assert_matches_reference(lambda x, mt, p: unshuffle(x, ids_restore, mt, p, has_cls=True),
                              lambda x, mt, p: unshuffle_reference(x, ids_restore, mt, p, has_cls=True),
                              (xv, mt, pos), "csrc", grad_out=grad_dec)


def _duplicate_ids_backends():
    backends = [("triton", d) for d in DEVICES]
    return backends + ([("csrc", "cpu")] if CSRC_ERROR is None else [])


@pytest.mark.parametrize("backend,device", _duplicate_ids_backends())
def test_gather_visible_repeated_indices_sum_gradients(backend, device):
    # Indices drawn with replacement: pairs, triples and more per row; K = 150 spans two blocks of
    # the Triton backward's scan (128 indices each), so a repeat can straddle them.
    B, L, D, K = 2, 197, 8, 150
    g = torch.Generator().manual_seed(3)
    ids_keep = torch.randint(0, L, (B, K), generator=g)
    ids_keep[0, :4] = ids_keep[0, -1]
    assert any(int(torch.bincount(row).max()) >= 3 for row in ids_keep)
    x = torch.randn(B, L, D, generator=g)
    pos = torch.randn(L + 1, D, generator=g)
    cls = torch.randn(D, generator=g)
    inputs = [t.to(device) for t in (x, pos, cls)]
    ids = ids_keep.to(device)
    ref_out, ref_grads = _grads(lambda x, p, c: gather_visible_reference(x, ids, p, cls_token=c), inputs)
    with use_backend(backend):
        out, grads = _grads(lambda x, p, c: gather_visible(x, ids, p, cls_token=c), inputs)
    assert torch.equal(out, ref_out)
    for got, want in zip(grads, ref_grads, strict=True):
        testing.assert_rel_close(got, want, torch.float32)
    if backend == "triton":  # packed varlen: the same rows, sample 1 keeping a shorter prefix
        cu = torch.tensor([0, K, K + 100], dtype=torch.int32, device=device)
        packed = torch.cat([ids[0], ids[1, :100]])
        ref_out, ref_grads = _grads(lambda x, p: gather_visible_reference(x, packed, p, cu_seqlens=cu), inputs[:2])
        with use_backend(backend):
            out, grads = _grads(lambda x, p: gather_visible(x, packed, p, cu_seqlens=cu), inputs[:2])
        assert torch.equal(out, ref_out)
        for got, want in zip(grads, ref_grads, strict=True):
            testing.assert_rel_close(got, want, torch.float32)


def test_gather_visible_equals_official_encoder_chain():
    B, L, D, ratio = 3, 49, 32, 0.75
    x = torch.randn(B, L, D)
    pos = torch.randn(1, L + 1, D)
    cls = torch.randn(1, 1, D)
    want, want_mask, want_restore = official_encoder_masking(x, pos, cls, ratio, masking_noise_reference(8, B, L))
    m = random_masking(B, L, ratio, seed=8)
    for backend, device in _backends("cpu"):
        with use_backend(backend):
            got = gather_visible(x.to(device), m.ids_keep.to(device), pos.to(device), cls_token=cls.to(device))
        assert torch.equal(got.cpu(), want), backend
    assert torch.equal(m.mask, want_mask) and torch.equal(m.ids_restore, want_restore)


def test_gather_visible_dtype_promotion_like_eager():
    x = torch.randn(2, 16, 8, dtype=torch.bfloat16)
    pos = torch.randn(1, 17, 8)
    cls = torch.randn(1, 1, 8)
    ids = random_masking_reference(2, 16, 0.5, seed=0).ids_keep
    want, _, _ = official_encoder_masking(x, pos, cls, 0.5, masking_noise_reference(0, 2, 16))
    for backend, device in _backends("cpu"):
        with use_backend(backend):
            got = gather_visible(x.to(device), ids.to(device), pos.to(device), cls_token=cls.to(device))
        assert got.dtype == torch.float32 and torch.equal(got.cpu(), want)


# ----------------------------------------------------------------------------- unshuffle


def _make_unshuffle_inputs(B, L, D, K, dtype, device, pos_kind, has_cls, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K + has_cls, D, generator=g).to(device=device, dtype=dtype)
    ids_restore = random_masking_reference(B, L, num_keep=K, seed=seed + 1).ids_restore.to(device)
    mask_token = torch.randn(1, 1, D, generator=g).to(device=device, dtype=dtype)
    pos = _pos_embed(pos_kind, L, D, dtype, False, g)
    return x, ids_restore, mask_token, None if pos is None else pos.to(device)


def test_unshuffle_equals_official_decoder_chain():
    B, L, D, K = 3, 49, 32, 12
    x, ids_restore, mask_token, pos = _make_unshuffle_inputs(B, L, D, K, torch.float32, "cpu", "1L+1", True)
    want = official_decoder_unshuffle(x, ids_restore, mask_token, pos)
    assert torch.equal(unshuffle_reference(x, ids_restore, mask_token, pos, has_cls=True), want)
    for backend, device in _backends("cpu"):
        with use_backend(backend):
            got = unshuffle(x.to(device), ids_restore.to(device), mask_token.to(device), pos.to(device), has_cls=True)
        assert torch.equal(got.cpu(), want), backend


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [192, 384, 512, 768, 1024, 1280, 200])
def test_model_widths_forward_and_backward(device, D):
    # the ViT widths (768 and 1280 are not powers of two: 3 and 5 blocks of 256) and an odd one
    B, L, K = 2, 10, 3
    x, ids_keep, pos, cls = _make_gather_inputs(B, L, D, K, torch.float32, device, "1L+1", True)
    out = _assert_matches_reference(lambda x, p, c: gather_visible(x, ids_keep, p, cls_token=c),
                                    lambda x, p, c: gather_visible_reference(x, ids_keep, p, cls_token=c),
                                    (x, pos, cls), "triton")
    restore = random_masking_reference(B, L, num_keep=K, seed=1).ids_restore.to(device)
    mt = torch.randn(D, device=device)
    _assert_matches_reference(lambda v, m, p: unshuffle(v, restore, m, p, has_cls=True),
                              lambda v, m, p: unshuffle_reference(v, restore, m, p, has_cls=True), (out, mt, pos),
                              "triton")


# ----------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("has_cls", [False, True])
def test_varlen_gather_and_unshuffle(has_cls):
    B, L, D = 4, 49, 32
    counts = [5, 0, 49, 12]
    m = random_masking_reference(B, L, num_keep=counts, seed=21)
    x = torch.randn(B, L, D)
    pos = torch.randn(1, L + 1, D)
    cls = torch.randn(D) if has_cls else None
    mask_token = torch.randn(D)
    packed = gather_visible_reference(x, m.ids_keep, pos, cls_token=cls, cu_seqlens=m.cu_seqlens)
    # the packed layout is the per-sample dense results, one after another
    dense = random_permutation_reference(B, L, seed=21)[0]
    pieces = [gather_visible_reference(x[b:b + 1], dense[b:b + 1, :c], pos, cls_token=cls)[0]
              for b, c in enumerate(counts)]
    assert torch.equal(packed, torch.cat(pieces))
    full = unshuffle_reference(packed, m.ids_restore, mask_token, pos, has_cls=has_cls, cu_seqlens=m.cu_seqlens)
    for b in range(B):
        want = unshuffle_reference(pieces[b][None], m.ids_restore[b:b + 1], mask_token, pos, has_cls=has_cls)
        assert torch.equal(full[b:b + 1], want)

    def run_both(fn, inputs):
        ref = _grads(lambda *a: fn(*a, reference=True), inputs)
        outs = []
        for device in DEVICES:
            with use_backend("triton"):
                outs.append(_grads(lambda *a: fn(*a, reference=False),
                                   [None if t is None else t.to(device) for t in inputs]))
        return ref, outs

    cu, ids_keep, ids_restore = m.cu_seqlens, m.ids_keep, m.ids_restore

    def gather_fn(x, p, c, reference):
        if reference:
            return gather_visible_reference(x, ids_keep, p, cls_token=c, cu_seqlens=cu)
        dev = x.device
        return gather_visible(x, ids_keep.to(dev), p, cls_token=c, cu_seqlens=cu.to(dev), max_seqlen=m.max_seqlen)

    def unshuffle_fn(xv, mt, p, reference):
        if reference:
            return unshuffle_reference(xv, ids_restore, mt, p, has_cls=has_cls, cu_seqlens=cu)
        dev = xv.device
        return unshuffle(xv, ids_restore.to(dev), mt, p, has_cls=has_cls, cu_seqlens=cu.to(dev))

    for fn, inputs in ((gather_fn, (x, pos, cls)), (unshuffle_fn, (packed, mask_token, pos))):
        (ref_out, ref_grads), outs = run_both(fn, inputs)
        for out, grads in outs:
            assert torch.equal(out.cpu(), ref_out)
            assert torch.equal(grads[0].cpu(), ref_grads[0])
            for got, want in zip(grads[1:], ref_grads[1:], strict=True):
                testing.assert_rel_close(got, want, torch.float32)


# ----------------------------------------------------------------------------- gradcheck (float64)


def test_gradcheck_references_and_registered_ops_float64():
    B, L, D = 2, 7, 3
    m = random_masking_reference(B, L, 0.5, seed=2)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, L + 1, D, dtype=torch.float64, requires_grad=True)
    cls = torch.randn(1, 1, D, dtype=torch.float64, requires_grad=True)
    K = m.ids_keep.shape[1]
    xv = torch.randn(B, K + 1, D, dtype=torch.float64, requires_grad=True)
    mt = torch.randn(D, dtype=torch.float64, requires_grad=True)
    checks = [
        (lambda x, p, c: gather_visible_reference(x, m.ids_keep, p, cls_token=c), (x, pos, cls)),
        (lambda x, p, c: gather_visible(x, m.ids_keep, p, cls_token=c), (x, pos, cls)),
        (lambda x, p: gather_visible(x, m.ids_keep, p[:, 1:]), (x, pos)),
        (lambda xv, mt, p: unshuffle_reference(xv, m.ids_restore, mt, p, has_cls=True), (xv, mt, pos)),
        (lambda xv, mt, p: unshuffle(xv, m.ids_restore, mt, p, has_cls=True), (xv, mt, pos)),
        (lambda xv, mt: unshuffle(xv[:, 1:], m.ids_restore, mt), (xv, mt)),
    ]
    v = random_masking_reference(B, L, num_keep=[2, 5], seed=2)
    xp = torch.randn(7 + B, D, dtype=torch.float64, requires_grad=True)
    checks += [
        (lambda x, p, c: gather_visible(x, v.ids_keep, p, cls_token=c, cu_seqlens=v.cu_seqlens), (x, pos, cls)),
        (lambda xp, mt, p: unshuffle(xp, v.ids_restore, mt, p, has_cls=True, cu_seqlens=v.cu_seqlens), (xp, mt, pos)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------- random shapes


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(1, 70), D=st.sampled_from([8, 24, 40, 64]),
       ratio=st.sampled_from(RATIOS + [0.3]), has_cls=st.booleans(), seed=st.integers(0, 2**63 - 1))
def test_random_shapes_triton_matches_reference(B, L, D, ratio, has_cls, seed):
    # The encoder gather and the decoder unshuffle chained, forward and backward: the gradient
    # reaches x through both backward kernels, pos_embed gets both ops' contributions.
    ref = random_masking_reference(B, L, ratio, seed=seed)
    g = torch.Generator().manual_seed(seed % 2**32)
    x = torch.randn(B, L, D, generator=g)
    pos = torch.randn(L + 1, D, generator=g)
    cls = torch.randn(D, generator=g) if has_cls else None
    mt = torch.randn(D, generator=g)

    def chain(x, pos, cls, mt, m):
        enc = gather_visible(x, m.ids_keep, pos, cls_token=cls)
        return enc, unshuffle(enc, m.ids_restore, mt, pos, has_cls=has_cls)

    def reference_chain(x, pos, cls, mt):
        enc = gather_visible_reference(x, ref.ids_keep, pos, cls_token=cls)
        return enc, unshuffle_reference(enc, ref.ids_restore, mt, pos, has_cls=has_cls)

    enc_ref = reference_chain(x, pos, cls, mt)[0]
    dec_ref, grads_ref = _grads(lambda *a: reference_chain(*a)[1], (x, pos, cls, mt))
    for device in DEVICES:
        inputs = [None if t is None else t.to(device) for t in (x, pos, cls, mt)]
        with use_backend("triton"):
            m = random_masking(B, L, ratio, seed=seed, device=device)
            enc = chain(*inputs, m)[0]
            dec, grads = _grads(lambda *a, m=m: chain(*a, m)[1], inputs)
        assert torch.equal(m.ids_keep.cpu(), ref.ids_keep) and torch.equal(m.mask.cpu(), ref.mask)
        assert torch.equal(enc.cpu(), enc_ref) and torch.equal(dec.cpu(), dec_ref)
        assert torch.equal(grads[0].cpu(), grads_ref[0])  # grad_x: a gather then a scatter, no sums
        for got, want in zip(grads[1:], grads_ref[1:], strict=True):
            testing.assert_rel_close(got, want, torch.float32)


# ----------------------------------------------------------------------------- torch.compile


class _TinyMAE(torch.nn.Module):
    def __init__(self, L=16, D=8):
        super().__init__()
        self.L = L
        self.pos_embed = torch.nn.Parameter(torch.randn(1, L + 1, D))
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, D))
        self.mask_token = torch.nn.Parameter(torch.randn(1, 1, D))
        self.proj = torch.nn.Linear(D, D)

    def forward(self, x, seed, offset):
        m = random_masking(x.shape[0], self.L, 0.75, seed=seed, offset=offset, device=x.device)
        h = self.proj(gather_visible(x, m.ids_keep, self.pos_embed, cls_token=self.cls_token))
        out = unshuffle(h, m.ids_restore, self.mask_token, self.pos_embed, has_cls=True)
        return (out.square().mean(-1)[:, 1:] * m.mask).sum()


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    model = _TinyMAE()
    x = torch.randn(2, 16, 8)
    seed, offset = torch.tensor(3), torch.tensor(6)
    want = model(x, seed, offset)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(x, seed, offset)
    got.backward()
    assert torch.equal(got, want)
    for p, g in zip(model.parameters(), want_grads, strict=True):
        testing.assert_rel_close(p.grad, g, torch.float32)
    # a seed drawn from the default generator inside the graph traces too, and an int offset
    fn = torch.compile(lambda: random_masking(2, 16, 0.5).ids_keep, backend="aot_eager", fullgraph=True)
    assert fn().shape == (2, 8)
    fn = torch.compile(lambda s: random_permutation(2, 16, seed=s, offset=4)[0], backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(torch.tensor(3)), random_permutation_reference(6, 16, seed=3)[0][4:])


# ----------------------------------------------------------------------------- bad inputs


def test_bad_gather_and_unshuffle_arguments():
    x = torch.randn(2, 16, 8)
    ids = random_masking_reference(2, 16, 0.5, seed=0).ids_keep
    restore = random_masking_reference(2, 16, 0.5, seed=0).ids_restore
    with pytest.raises(TypeError, match="ids_keep must be int64 or int32, got torch.float32"):
        gather_visible(x, ids.float())
    with pytest.raises(ValueError, match=r"ids_keep must have shape \(B, K\) with B = 2"):
        gather_visible(x, ids[:1])
    with pytest.raises(ValueError, match="ids_keep is on meta but the tokens are on cpu"):
        gather_visible(x, ids.to("meta"))
    with pytest.raises(ValueError, match=r"x must be \(B, L, D\)"):
        gather_visible(x[0], ids)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(L, D\).*got \(1, 15, 8\)"):
        gather_visible(x, ids, torch.randn(1, 15, 8))
    with pytest.raises(ValueError, match=r"cls_token must have shape \(D,\).*got \(2, 8\)"):
        gather_visible(x, ids, cls_token=torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"cu_seqlens must have shape \(B \+ 1,\) = \(3,\)"):
        gather_visible(x, ids.flatten(), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be float32"):
        gather_visible(x.long(), ids)
    xv = torch.randn(2, 9, 8)
    with pytest.raises(ValueError, match=r"x_visible must have shape \(B, K \+ 1, D\)"):
        unshuffle(torch.randn(2, 18, 8), restore, torch.randn(8), has_cls=True)
    with pytest.raises(ValueError, match=r"mask_token must have shape \(D,\)"):
        unshuffle(xv, restore, torch.randn(4), has_cls=True)
    with pytest.raises(ValueError, match="ids_restore must be 2-D"):
        unshuffle(xv, restore.flatten(), torch.randn(8), has_cls=True)
    with pytest.raises(TypeError, match="has_cls must be a bool"):
        unshuffle(xv, restore, torch.randn(8), has_cls=1)


def test_bad_varlen_lengths():
    B, L, D = 2, 16, 8
    v = random_masking_reference(B, L, num_keep=[3, 5], seed=0)
    x = torch.randn(B, L, D)
    with pytest.raises(ValueError, match=r"ids_keep must have cu_seqlens\[-1\] = 8 rows.*got shape \(7,\)"):
        gather_visible(x, v.ids_keep[:7], cu_seqlens=v.cu_seqlens)
    with pytest.raises(ValueError, match=r"ids_keep must have cu_seqlens\[-1\] = 8 rows.*got shape \(9,\)"):
        gather_visible(x, torch.cat([v.ids_keep, v.ids_keep[:1]]), cu_seqlens=v.cu_seqlens)
    with pytest.raises(ValueError, match=r"gather_visible: cu_seqlens\[0\] = 1, expected 0"):
        gather_visible(x, v.ids_keep, cu_seqlens=torch.tensor([1, 4, 8]))
    with pytest.raises(ValueError, match=r"gather_visible: cu_seqlens\[2\] = 8 < cu_seqlens\[1\] = 9: offsets must be "
                                         r"non-decreasing"):
        gather_visible(x, v.ids_keep, cu_seqlens=torch.tensor([0, 9, 8]))
    with pytest.raises(ValueError, match=r"gather_visible: max_seqlen = 4 is smaller than sequence 1 of cu_seqlens "
                                         r"\(5 tokens\)"):
        gather_visible(x, v.ids_keep, cu_seqlens=v.cu_seqlens, max_seqlen=4)
    packed = gather_visible(x, v.ids_keep, cls_token=torch.randn(D), cu_seqlens=v.cu_seqlens)
    assert packed.shape == (8 + B, D)
    mt = torch.randn(D)
    for rows in (8 + B - 1, 8 + B + 1, 8):
        with pytest.raises(ValueError, match=rf"x_visible must be packed \(T \+ B, D\) = \(10, D\).*\({rows}, 8\)"):
            unshuffle(torch.randn(rows, D), v.ids_restore, mt, has_cls=True, cu_seqlens=v.cu_seqlens)
    with pytest.raises(ValueError, match=r"x_visible must be packed \(T \+ B, D\) with B = 2, got shape \(1, 8\)"):
        unshuffle(torch.randn(1, D), v.ids_restore, mt, has_cls=True, cu_seqlens=v.cu_seqlens)
    with pytest.raises(ValueError, match=r"unshuffle: cu_seqlens\[2\] = 5 < cu_seqlens\[1\] = 6"):
        unshuffle(packed, v.ids_restore, mt, has_cls=True, cu_seqlens=torch.tensor([0, 6, 5]))
    with pytest.raises(ValueError, match=r"unshuffle: sample 1 has cu_seqlens\[2\] - cu_seqlens\[1\] = 17 visible "
                                         r"tokens, more than its L = 16 patches"):
        unshuffle(torch.randn(17 + B, D), v.ids_restore, mt, has_cls=True, cu_seqlens=torch.tensor([0, 0, 17]))


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_kernels_stay_inside_short_tensors(device):
    # cu_seqlens on a device is not checked against the packed lengths (a host sync); the
    # registered ops are called directly here to skip the host-side check. The packed inputs are
    # the heads of longer buffers whose tails hold markers: a read past the end would pull a
    # marker into the result; a write past the end trips the guard band of the fixture.
    B, L, D = 2, 16, 8
    # claims 11 packed rows for 9: sample 0 runs 1 past the end, sample 1 starts past it
    cu = torch.tensor([0, 10, 11], dtype=torch.int32, device=device)
    ids_buf = torch.randint(0, L - 1, (12,), device=device)
    ids_buf[9:] = L - 1  # patch L - 1 holds the marker and is never gathered from the real rows
    ids_keep = ids_buf[:9]
    x = torch.randn(B, L, D, device=device)
    x[:, L - 1] = 1e4
    xg = x.detach().requires_grad_(True)
    cls = torch.randn(D, device=device, requires_grad=True)
    with use_backend("triton"):
        out = torch.ops.fastmim.gather_visible(xg, ids_keep, None, cls, cu, 10)
        gx, gcls = torch.autograd.grad(out, (xg, cls), torch.ones_like(out))
    assert out.shape == (9 + B, D) and bool((out.abs() < 1e3).all())
    assert bool(torch.isfinite(gcls).all())
    assert torch.equal(gx[:, L - 1], torch.zeros(B, D, device=device))
    assert float(gx.sum()) == 9 * D  # the 9 rows of ids_keep, all in sample 0
    ids_restore = random_permutation_reference(B, L, seed=2)[1].to(device)
    xv_buf = torch.randn(9 + B + 3, D, device=device)
    xv_buf[9 + B:] = 1e4
    xv = xv_buf[: 9 + B].detach().requires_grad_(True)
    mt = torch.randn(D, device=device)
    with use_backend("triton"):
        dec = torch.ops.fastmim.unshuffle(xv, ids_restore, mt, None, cu, True)
        (gxv,) = torch.autograd.grad(dec, (xv,), torch.ones_like(dec))
    assert dec.shape == (B, L + 1, D) and bool((dec.abs() < 1e3).all())
    assert gxv.shape == xv.shape


# ----------------------------------------------------------------------------- index values
# Host index values are checked by the public op before it dispatches, and by the references:
# the same ValueError on every backend. The kernels behind them never access memory outside their
# tensors whatever the values: called directly (no check), an out-of-range id reads zeros and its
# gradient is dropped (Triton), or the kernel raises (csrc on CPU, where checking is free).


_OPS = {"gather_visible": (gather_visible, gather_visible_reference), "unshuffle": (unshuffle, unshuffle_reference)}


def _assert_same_error_everywhere(op, args, kwargs, match=None):
    """``op(*args, **kwargs)`` (host tensors) raises the same ValueError on every backend and from its
    reference; returns the message."""
    public, reference = _OPS[op]
    messages = set()
    for backend in ("reference", "triton", "csrc"):
        with use_backend(backend), pytest.raises(ValueError, match=match) as info:
            public(*args, **kwargs)
        messages.add(str(info.value))
    with pytest.raises(ValueError, match=match) as info:
        reference(*args, **kwargs)
    messages.add(str(info.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith(f"{op}: "), message
    return message


def _bad_index_cases():
    """{case: (op, args, kwargs, message)}: one bad value each, on host tensors."""
    B, L, D = 2, 8, 4
    x, pos, cls, mt = torch.randn(B, L, D), torch.randn(L + 1, D), torch.randn(D), torch.randn(D)
    m = random_masking_reference(B, L, num_keep=3, seed=1)
    v = random_masking_reference(B, L, num_keep=[2, 5], seed=1)
    xv = torch.randn(B, 4, D)
    packed = torch.randn(7 + B, D)

    def put(t, index, value):
        t = t.clone()
        t[index] = value
        return t

    restore = m.ids_restore
    repeated = put(restore, (1, 4), int(restore[1, 5]))
    return {
        "ids_keep -1": ("gather_visible", (x, put(m.ids_keep, (1, 2), -1), pos), {"cls_token": cls},
                        r"ids_keep\[1, 2\] = -1 is outside the valid range \[0, 8\)"),
        "ids_keep L (int32)": ("gather_visible", (x, put(m.ids_keep, (0, 0), L).int()), {},
                               r"ids_keep\[0, 0\] = 8 is outside the valid range \[0, 8\)"),
        "ids_keep far below": ("gather_visible", (x, put(m.ids_keep, (1, 0), -(2**40)), pos), {},
                               rf"ids_keep\[1, 0\] = {-(2**40)} is outside"),
        "packed ids_keep L": ("gather_visible", (x, put(v.ids_keep, 6, L)), {"cu_seqlens": v.cu_seqlens},
                              r"ids_keep\[6\] = 8 is outside the valid range \[0, 8\)"),
        "gather cu_seqlens[0]": ("gather_visible", (x, v.ids_keep), {"cu_seqlens": torch.tensor([1, 2, 7])},
                                 r"cu_seqlens\[0\] = 1, expected 0"),
        "gather cu_seqlens decreasing": ("gather_visible", (x, v.ids_keep), {"cu_seqlens": torch.tensor([0, 8, 7])},
                                         r"cu_seqlens\[2\] = 7 < cu_seqlens\[1\] = 8"),
        "gather cu_seqlens total": ("gather_visible", (x, v.ids_keep), {"cu_seqlens": torch.tensor([0, 2, 6])},
                                    r"ids_keep must have cu_seqlens\[-1\] = 6 rows"),
        "gather max_seqlen": ("gather_visible", (x, v.ids_keep), {"cu_seqlens": v.cu_seqlens, "max_seqlen": 4},
                              r"max_seqlen = 4 is smaller than sequence 1 of cu_seqlens \(5 tokens\)"),
        "ids_restore -1": ("unshuffle", (xv, put(restore, (0, 3), -1), mt, pos), {"has_cls": True},
                           r"ids_restore\[0, 3\] = -1 is outside the valid range \[0, 8\)"),
        "ids_restore L (int32)": ("unshuffle", (xv[:, 1:], put(restore, (1, 7), L).int(), mt), {},
                                  r"ids_restore\[1, 7\] = 8 is outside the valid range \[0, 8\)"),
        "ids_restore repeated rank": ("unshuffle", (xv, repeated, mt), {"has_cls": True},
                                      r"ids_restore\[1\] must be a permutation of 0..7 \(each index once\)"),
        "packed ids_restore": ("unshuffle", (packed, put(v.ids_restore, (1, 0), 9), mt),
                               {"has_cls": True, "cu_seqlens": v.cu_seqlens}, r"ids_restore\[1, 0\] = 9 is outside"),
        "unshuffle cu_seqlens[0]": ("unshuffle", (packed[:7], v.ids_restore, mt),
                                    {"cu_seqlens": torch.tensor([2, 2, 7])}, r"cu_seqlens\[0\] = 2, expected 0"),
        "unshuffle count > L": ("unshuffle", (torch.randn(9, D), v.ids_restore, mt),
                                {"cu_seqlens": torch.tensor([0, 0, 9])},
                                r"sample 1 has cu_seqlens\[2\] - cu_seqlens\[1\] = 9 visible tokens, more than its "
                                r"L = 8 patches"),
        "unshuffle cu_seqlens total": ("unshuffle", (packed, v.ids_restore, mt),
                                       {"has_cls": True, "cu_seqlens": torch.tensor([0, 2, 6])},
                                       r"x_visible must be packed \(T \+ B, D\) = \(8, D\) with T = "
                                       r"cu_seqlens\[-1\] = 6"),
    }


@pytest.mark.parametrize("name", list(_bad_index_cases()))
def test_bad_index_values_raise_the_same_error_on_every_backend(name):
    op, args, kwargs, message = _bad_index_cases()[name]
    _assert_same_error_everywhere(op, args, kwargs, match=message)


_MARK = 1e4  # what lies around the inputs of the direct kernel calls: never valid data
_FENCE = 1024  # elements of markers on each side


def _fenced(t):
    """A copy of ``t`` in the middle of a buffer of markers: a kernel reading outside ``t`` pulls a
    marker into its result."""
    buf = torch.full((t.numel() + 2 * _FENCE,), _MARK, dtype=t.dtype, device=t.device)
    buf[_FENCE: _FENCE + t.numel()] = t.flatten()
    return buf[_FENCE: _FENCE + t.numel()].view(t.shape)


def _assert_unmarked(*tensors):
    for t in tensors:
        assert bool((t.abs() < _MARK / 10).all()), "a kernel read outside its input"


# (bad value, ids dtype): just outside [0, L), far outside, and int32's extremes
OUT_OF_RANGE = [(-1, torch.int64), (8, torch.int64), (2**40, torch.int64), (-(2**40), torch.int64),
                (2**31 - 1, torch.int32), (-(2**31), torch.int32)]
# each on every kernel device, dense and packed (varlen)
_OUT_OF_RANGE_CASES = [(device, varlen, bad, ids_dtype) for device in DEVICES for varlen in (False, True)
                       for bad, ids_dtype in OUT_OF_RANGE]


def _direct_triton_call(op, ids, inputs, args, g, triton_calls):
    """``torch.ops.fastmim.<op>(inputs[0], ids, *inputs[1:], *args)`` on Triton: the registered op
    called directly, which skips the host check, its inputs and the incoming gradient (drawn from
    ``g``) fenced by markers. Each launcher ran once and nothing returned holds a marker; returns
    the output, the incoming gradient and the gradients of ``inputs``."""
    leaves = [_fenced(t).requires_grad_() for t in inputs]
    with use_backend("triton"):
        out = getattr(torch.ops.fastmim, op)(leaves[0], ids, *leaves[1:], *args)
        grad_out = _fenced(torch.randn(out.shape, generator=g).to(out.device))
        grads = torch.autograd.grad(out, leaves, grad_out)
    assert triton_calls[f"{op}_forward"] == 1 and triton_calls[f"{op}_backward"] == 1
    _assert_unmarked(out, *grads)
    return out, grad_out, grads


@pytest.mark.parametrize("device,varlen,bad,ids_dtype", _OUT_OF_RANGE_CASES)
def test_triton_gather_reads_zeros_for_out_of_range_ids(device, varlen, bad, ids_dtype, triton_calls):
    # The registered op called directly skips the host check: the bad row gathers zeros (no
    # position embedding either), its gradient goes nowhere, every other row is unaffected.
    B, L, D, K = 2, 8, 4, 3
    ids = random_masking_reference(B, L, num_keep=K, seed=2).ids_keep.to(device)
    bad_ids = ids.clone()
    bad_ids[1, 1] = bad
    bad_row = (1, 2)  # the row of the bad id in the (B, K + 1, D) output
    cu, max_seqlen = None, 0
    if varlen:
        ids, bad_ids = ids.flatten(), bad_ids.flatten()
        cu, max_seqlen = torch.tensor([0, K, 2 * K], dtype=torch.int32, device=device), K
        bad_row = (K + 1 + 2,)
    g = torch.Generator().manual_seed(0)
    x, pos, cls = (torch.randn(shape, generator=g).to(device) for shape in ((B, L, D), (L + 1, D), (D,)))
    out, grad_out, grads = _direct_triton_call("gather_visible", bad_ids.to(ids_dtype), (x, pos, cls), (cu, max_seqlen),
                                               g, triton_calls)
    kept_grad = grad_out.clone()
    kept_grad[bad_row] = 0
    want, want_grads = _grads(lambda x, p, c: gather_visible_reference(x, ids, p, cls_token=c, cu_seqlens=cu),
                              (x, pos, cls), grad_out=kept_grad)
    want[bad_row] = 0
    assert torch.equal(out, want)
    assert torch.equal(grads[0], want_grads[0])
    for got, ref in zip(grads[1:], want_grads[1:], strict=True):
        testing.assert_rel_close(got, ref, torch.float32)


@pytest.mark.parametrize("device,varlen,bad,ids_dtype", _OUT_OF_RANGE_CASES)
def test_triton_unshuffle_reads_a_zero_token_for_out_of_range_ranks(device, varlen, bad, ids_dtype, triton_calls):
    # A masked position's rank replaced by an out-of-range one (the visible ranks keep one position
    # each, so every row of the x_visible gradient is still written): that position reads a zero
    # token instead of the mask token (plus its position embedding), and its gradient reaches
    # pos_embed only.
    B, L, D, K = 2, 8, 4, 3
    ids_restore = random_masking_reference(B, L, num_keep=K, seed=2).ids_restore.to(device)
    i = int((ids_restore[1] >= K).nonzero()[0, 0])  # a masked position of sample 1
    bad_restore = ids_restore.clone()
    bad_restore[1, i] = bad
    cu = torch.tensor([0, K, 2 * K], dtype=torch.int32, device=device) if varlen else None
    g = torch.Generator().manual_seed(0)
    xv = torch.randn((2 * (K + 1), D) if varlen else (B, K + 1, D), generator=g).to(device)
    mt, pos = torch.randn(D, generator=g).to(device), torch.randn(L + 1, D, generator=g).to(device)
    out, grad_out, grads = _direct_triton_call("unshuffle", bad_restore.to(ids_dtype), (xv, mt, pos), (cu, True), g,
                                               triton_calls)
    want, want_grads = _grads(lambda x, m, p: unshuffle_reference(x, ids_restore, m, p, has_cls=True, cu_seqlens=cu),
                              (xv, mt, pos), grad_out=grad_out)
    want[1, 1 + i] = pos[1 + i]
    assert torch.equal(out, want)
    assert torch.equal(grads[0], want_grads[0])
    testing.assert_rel_close(grads[1], want_grads[1] - grad_out[1, 1 + i], torch.float32, name="grad_mask_token")
    testing.assert_rel_close(grads[2], want_grads[2], torch.float32, name="grad_pos")


@pytest.mark.skipif(CSRC_ERROR is not None, reason=f"csrc backend unavailable: {CSRC_ERROR}")
def test_csrc_kernels_refuse_out_of_range_indices():
    # The C++ kernels called directly (no host check) raise before any access the bad index
    # steers; run in a child process so that a regression which crashes shows as a failure here.
    script = textwrap.dedent("""
        import torch
        from fastmim.ops import _csrc

        assert _csrc.load_error() is None, _csrc.load_error()
        ops = torch.ops.fastmim
        B, L, K, D = 2, 8, 3, 4
        x, xv, mt = torch.randn(B, L, D), torch.randn(B, K + 1, D), torch.randn(D)
        ids_keep = torch.stack([torch.randperm(L)[:K] for _ in range(B)])
        ids_restore = torch.stack([torch.randperm(L) for _ in range(B)])
        for bad, dtype in %r:
            dtype = getattr(torch, dtype)
            keep, restore = ids_keep.clone(), ids_restore.clone()
            keep[1, 2], restore[1, 5] = bad, bad
            keep, restore = keep.to(dtype), restore.to(dtype)
            calls = {
                "gather": lambda: ops.csrc_gather_visible(x, keep, torch.randn(L + 1, D), mt),
                "gather_bwd": lambda: ops.csrc_gather_visible_backward(xv, keep, L, True, True, True, True),
                "unshuffle": lambda: ops.csrc_unshuffle(xv, restore, mt, torch.randn(L, D), True),
                "unshuffle_bwd": lambda: ops.csrc_unshuffle_backward(torch.randn(B, L + 1, D), restore, K, True,
                                                                     True, True, True),
            }
            for name, call in calls.items():
                try:
                    call()
                except RuntimeError as error:
                    assert f"[1, {2 if 'gather' in name else 5}] = {bad} is out of range [0, {L})" in str(error), error
                else:
                    raise AssertionError(f"{name} accepted the index {bad}")
        print("refused every bad index")
    """ % [(bad, str(dtype).removeprefix("torch.")) for bad, dtype in OUT_OF_RANGE])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "refused every bad index" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.cuda
def test_cuda_index_values_checked_only_under_check_indices():
    # On an accelerator reading the values back is a device sync: checked only in the debug mode;
    # otherwise an out-of-range id reads zeros on the Triton path.
    from fastmim.ops import check_indices

    B, L, D = 2, 8, 4
    x = torch.randn(B, L, D, device="cuda")
    ids = torch.tensor([[0, 8], [1, 2]], device="cuda")
    with use_backend("triton"):
        out = gather_visible(x, ids)
        assert torch.equal(out[0, 1], torch.zeros(D, device="cuda"))
        with check_indices(), pytest.raises(ValueError, match=r"gather_visible: ids_keep\[0, 1\] = 8 is outside"):
            gather_visible(x, ids)
        restore = random_permutation_reference(B, L, seed=0)[1].cuda()
        restore[0, 0] = restore[0, 1]
        with check_indices(), pytest.raises(ValueError, match=r"unshuffle: ids_restore\[0\] must be a permutation"):
            unshuffle(torch.randn(B, 3, D, device="cuda"), restore, torch.randn(D, device="cuda"))


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", testing.backend_devices())
def test_empty_batch_gives_empty_results_on_every_backend(backend, device):
    L, D, K = 8, 4, 3
    with use_backend(backend):
        m = random_masking(0, L, num_keep=K, seed=1, device=device)
        shuffle, restore = random_permutation(0, L, seed=1, device=device)
        v = random_masking(0, L, num_keep=[], seed=1, device=device)
    assert (m.ids_keep.shape, m.ids_restore.shape, m.mask.shape) == ((0, K), (0, L), (0, L))
    assert shuffle.shape == restore.shape == (0, L)
    assert v.ids_keep.shape == (0,) and v.cu_seqlens.tolist() == [0] and v.max_seqlen == 0
    x, pos, cls, mt = (torch.randn(shape, device=device) for shape in ((0, L, D), (L + 1, D), (D,), (D,)))
    for ids, cu in ((m.ids_keep, None), (v.ids_keep, v.cu_seqlens)):
        out = _assert_matches_reference(
            lambda x, p, c, ids=ids, cu=cu: gather_visible(x, ids, p, cls_token=c, cu_seqlens=cu),
            lambda x, p, c, ids=ids, cu=cu: gather_visible_reference(x, ids, p, cls_token=c, cu_seqlens=cu),
            (x, pos, cls), backend)
        assert out.shape == ((0, K + 1, D) if cu is None else (0, D))
    for xv, cu in ((torch.randn(0, K + 1, D, device=device), None), (torch.randn(0, D, device=device), v.cu_seqlens)):
        hc = cu is None  # the dense case with a cls row, the packed one without
        out = _assert_matches_reference(
            lambda x, m_, p, cu=cu, hc=hc: unshuffle(x, restore, m_, p, has_cls=hc, cu_seqlens=cu),
            lambda x, m_, p, cu=cu, hc=hc: unshuffle_reference(x, restore, m_, p, has_cls=hc, cu_seqlens=cu),
            (xv, mt, pos), backend)
        assert out.shape == (0, L + hc, D)


@pytest.mark.parametrize("backend,device", testing.backend_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unshuffle_with_no_visible_patch(backend, device, dtype):
    # K = 0 without a cls token, and every sample of a packed batch keeping nothing: every
    # position takes the mask token. (float64 runs the reference on every backend.)
    B, L, D = 2, 8, 4
    restore = random_permutation_reference(B, L, seed=3)[1].to(device)
    mt, pos = torch.randn(D, dtype=dtype, device=device), torch.randn(L, D, dtype=dtype, device=device)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
    for xv, cu_ in ((torch.randn(B, 0, D, dtype=dtype, device=device), None),
                    (torch.randn(0, D, dtype=dtype, device=device), cu)):
        out = _assert_matches_reference(lambda x, m, p, cu_=cu_: unshuffle(x, restore, m, p, cu_seqlens=cu_),
                                        lambda x, m, p, cu_=cu_: unshuffle_reference(x, restore, m, p, cu_seqlens=cu_),
                                        (xv, mt, pos), backend, dtype=dtype)
        assert torch.equal(out, (mt + pos).expand(B, L, D))


@pytest.mark.parametrize("backend,device", testing.backend_devices())
def test_float64_gradients_stay_float64(backend, device):
    # float64 runs the reference on every backend; its backward must not round through fp32.
    # The gradients of x and x_visible are copies of the incoming one: equal to it, bit for bit.
    B, L, D = 2, 7, 3
    f64 = {"dtype": torch.float64, "device": device}
    m = random_masking(B, L, num_keep=3, seed=2, device=device)
    v = random_masking(B, L, num_keep=[1, 4], seed=2, device=device)
    x, pos, cls, mt = (torch.randn(shape, **f64) for shape in ((B, L, D), (L + 1, D), (D,), (D,)))
    for ids, cu in ((m.ids_keep, None), (v.ids_keep, v.cu_seqlens)):
        _assert_matches_reference(
            lambda x, p, c, ids=ids, cu=cu: gather_visible(x, ids, p, cls_token=c, cu_seqlens=cu),
            lambda x, p, c, ids=ids, cu=cu: gather_visible_reference(x, ids, p, cls_token=c, cu_seqlens=cu),
            (x, pos, cls), backend, dtype=torch.float64)
    for xv, restore, cu in ((torch.randn(B, 4, D, **f64), m.ids_restore, None),
                            (torch.randn(5 + B, D, **f64), v.ids_restore, v.cu_seqlens)):
        _assert_matches_reference(
            lambda x, m_, p, restore=restore, cu=cu: unshuffle(x, restore, m_, p, has_cls=True, cu_seqlens=cu),
            lambda x, m_, p, restore=restore, cu=cu: unshuffle_reference(x, restore, m_, p, has_cls=True,
                                                                         cu_seqlens=cu),
            (xv, mt, pos), backend, dtype=torch.float64)


# ----------------------------------------------------------------------------- properties
# Generated cases on every backend that runs here, forward and backward against the references:
# empty and single-sample batches, no kept patch, one patch, odd sizes, the extreme mask ratios,
# strided inputs, fp32 / bf16 / fp64 (fp64 runs the reference on every backend). Tiny shapes keep
# the Triton interpreter fast; derandomized, so every run checks the same cases.

PROPERTY_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
_PROPERTY_SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)
_sizes = st.integers(0, 3), st.integers(1, 12), st.integers(1, 16)  # B, L, D


def _coarsest(*dtypes):
    """The dtype with the widest tolerance among ``dtypes``: sums round at its precision."""
    return max(dtypes, key=testing.TOLERANCES.__getitem__)


@st.composite
def _keep(draw, B, L, varlen):
    """Per-sample counts (varlen) or a keep count: often a mask ratio's, 0 and 0.95 among them."""
    ratio_keep = st.sampled_from([0.0, 0.95, 0.75]).map(lambda r: num_keep_from_ratio(L, r))
    if varlen:
        return draw(st.lists(st.one_of(ratio_keep, st.integers(0, L)), min_size=B, max_size=B))
    return draw(st.one_of(ratio_keep, st.integers(0, L)))


@st.composite
def _gather_cases(draw):
    B, L, D = (draw(s) for s in _sizes)
    varlen = draw(st.booleans())
    dtype = draw(st.sampled_from(PROPERTY_DTYPES))
    return {"B": B, "L": L, "D": D, "varlen": varlen, "keep": draw(_keep(B, L, varlen)),
            "pos": draw(st.sampled_from(["none", "L", "1L", "L+1", "1L+1"])), "cls": draw(st.booleans()),
            "dtype": dtype, "aux_dtype": draw(st.sampled_from([dtype, torch.float32])),
            "ids_dtype": draw(st.sampled_from([torch.int64, torch.int32])), "strided": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**32 - 1))}


@pytest.mark.parametrize("backend,device", testing.backend_devices())
@_PROPERTY_SETTINGS
@given(case=_gather_cases())
def test_property_gather_visible(backend, device, case):
    B, L, D, dtype, aux, strided = (case[k] for k in ("B", "L", "D", "dtype", "aux_dtype", "strided"))
    g = torch.Generator().manual_seed(case["seed"])
    m = random_masking_reference(B, L, num_keep=case["keep"], seed=case["seed"], device=device)
    ids, cu = m.ids_keep.to(case["ids_dtype"]), (m.cu_seqlens if case["varlen"] else None)
    if strided:  # every other element of a wider tensor
        ids = torch.stack([ids, ids], -1)[..., 0]
    x = _strided(torch.randn(B, L, D, generator=g).to(dtype), strided).to(device)
    pos = _pos_embed(case["pos"], L, D, aux, strided, g)
    cls = torch.randn(1, 1, D, generator=g).to(aux) if case["cls"] else None
    inputs = [None if t is None else t.to(device) for t in (x, pos, cls)]
    hc = int(case["cls"])
    out_shape = (m.ids_keep.shape[0] + B * hc, D) if cu is not None else (B, m.ids_keep.shape[1] + hc, D)
    grad_out = _strided(torch.randn(out_shape, generator=g), strided).to(device)
    max_seqlen = m.max_seqlen if cu is not None else None
    _assert_matches_reference(
        lambda x, p, c: gather_visible(x, ids, p, cls_token=c, cu_seqlens=cu, max_seqlen=max_seqlen),
        lambda x, p, c: gather_visible_reference(x, ids, p, cls_token=c, cu_seqlens=cu, max_seqlen=max_seqlen),
        inputs, backend, grad_out=grad_out, dtype=_coarsest(dtype, aux))


@st.composite
def _unshuffle_cases(draw):
    case = draw(_gather_cases())
    case["has_cls"] = case.pop("cls")
    case["token_dims"] = draw(st.integers(1, 3))  # mask_token (D,), (1, D) or (1, 1, D)
    return case


@pytest.mark.parametrize("backend,device", testing.backend_devices())
@_PROPERTY_SETTINGS
@given(case=_unshuffle_cases())
def test_property_unshuffle(backend, device, case):
    B, L, D, dtype, aux, strided = (case[k] for k in ("B", "L", "D", "dtype", "aux_dtype", "strided"))
    hc = int(case["has_cls"])
    g = torch.Generator().manual_seed(case["seed"])
    m = random_masking_reference(B, L, num_keep=case["keep"], seed=case["seed"], device=device)
    restore, cu = m.ids_restore.to(case["ids_dtype"]), (m.cu_seqlens if case["varlen"] else None)
    restore = _strided(restore, strided)
    visible = (m.ids_keep.shape[0] + B * hc, D) if cu is not None else (B, m.ids_keep.shape[1] + hc, D)
    x_visible = _strided(torch.randn(visible, generator=g).to(dtype), strided).to(device)
    mask_token = torch.randn(D, generator=g).to(aux).reshape((1,) * (case["token_dims"] - 1) + (D,))
    pos = _pos_embed(case["pos"], L, D, aux, strided, g)
    grad_out = _strided(torch.randn(B, L + hc, D, generator=g), strided).to(device)
    inputs = [None if t is None else t.to(device) for t in (x_visible, mask_token, pos)]
    _assert_matches_reference(
        lambda x, mt, p: unshuffle(x, restore, mt, p, has_cls=bool(hc), cu_seqlens=cu),
        lambda x, mt, p: unshuffle_reference(x, restore, mt, p, has_cls=bool(hc), cu_seqlens=cu),
        inputs, backend, grad_out=grad_out, dtype=_coarsest(dtype, aux))


@st.composite
def _bad_index_property_cases(draw):
    """A valid call of gather_visible or unshuffle with one index value or offset made bad:
    ``(op, args, kwargs, kind, what the message must name)``."""
    op = draw(st.sampled_from(["gather_visible", "unshuffle"]))
    B, L, D = draw(st.integers(1, 3)), draw(st.integers(1, 12)), 3
    varlen = draw(st.booleans())
    # a dense gather needs an index to spoil: K >= 1
    keep = draw(st.integers(1, L) if op == "gather_visible" and not varlen else _keep(B, L, varlen))
    m = random_masking_reference(B, L, num_keep=keep, seed=draw(st.integers(0, 2**32 - 1)))
    ids_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    limit = 2**31 if ids_dtype == torch.int32 else 2**62
    ids = (m.ids_keep if op == "gather_visible" else m.ids_restore).to(ids_dtype).clone()
    name = "ids_keep" if op == "gather_visible" else "ids_restore"
    cu = m.cu_seqlens.clone() if varlen else None
    hc = draw(st.booleans()) if op == "unshuffle" else False
    kinds = (["index"] if ids.numel() else []) + (["repeat"] if op == "unshuffle" and L >= 2 else [])
    if varlen:
        kinds += ["cu_start", "cu_order", "cu_total"] + (["cu_count"] if op == "unshuffle" else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "index":
        flat = draw(st.integers(0, ids.numel() - 1))
        value = draw(st.one_of(st.integers(-limit, -1), st.integers(L, limit - 1)))
        ids.view(-1)[flat] = value
        where = [flat] if ids.dim() == 1 else [flat // ids.shape[1], flat % ids.shape[1]]
        names = f"{name}[{', '.join(map(str, where))}] = {value} is outside the valid range [0, {L})"
    elif kind == "repeat":
        b, i, j = draw(st.integers(0, B - 1)), *draw(st.lists(st.integers(0, L - 1), min_size=2, max_size=2,
                                                              unique=True))
        ids[b, i] = ids[b, j]
        names = f"{name}[{b}] must be a permutation"
    elif kind == "cu_start":
        cu[0] = draw(st.integers(1, 5))
        names = "cu_seqlens[0]"
    elif kind == "cu_order":
        b = draw(st.integers(1, B))
        cu[b] = cu[b - 1] - draw(st.integers(1, 5))
        names = f"cu_seqlens[{b}] = {int(cu[b])} < cu_seqlens[{b - 1}]"
    elif kind == "cu_total":
        cu[-1] += draw(st.integers(1, 5))
        names = "cu_seqlens["
    else:  # one sample with more visible tokens than patches
        b = draw(st.integers(0, B - 1))
        cu[b + 1:] += L + 1 - int(cu[b + 1] - cu[b])
        names = f"sample {b} has cu_seqlens[{b + 1}] - cu_seqlens[{b}] = {L + 1} visible tokens"
    kwargs = {} if cu is None else {"cu_seqlens": cu}
    if op == "gather_visible":
        return op, (torch.randn(B, L, D), ids), kwargs, names
    if not varlen:
        x_visible = torch.randn(B, m.ids_keep.shape[1] + hc, D)
    else:  # sized for the offsets when a count is too large, so that only the count is wrong
        x_visible = torch.randn((int(cu[-1]) if kind == "cu_count" else m.ids_keep.shape[0]) + B * hc, D)
    return op, (x_visible, ids, torch.randn(D)), {"has_cls": hc, **kwargs}, names


@settings(max_examples=200, deadline=None, derandomize=True)
@given(case=_bad_index_property_cases())
def test_property_bad_indices_raise_the_same_error_everywhere(case):
    op, args, kwargs, names = case
    message = _assert_same_error_everywhere(op, args, kwargs)
    assert names in message, message
