"""Token ops: random masking / permutation, gather_visible, unshuffle.

The fast path (Triton, through the interpreter on CPU) is compared with the plain-PyTorch
references, and the references with the official MAE chain they replace. Index ops are pure
copies plus one rounded add, so forward results must be bit-identical; gradient sums over the
batch are compared within the dtype tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmim.ops import (
    PackedMasking,
    gather_visible,
    gather_visible_reference,
    random_masking,
    random_masking_reference,
    random_permutation,
    random_permutation_reference,
    unshuffle,
    unshuffle_reference,
    use_backend,
)
from fastmim.ops.token_ops import masking_noise_reference
from fastmim.testing import assert_rel_close, kernel_devices

DEVICES = kernel_devices()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RATIOS = [0.0, 0.5, 0.75, 0.9]


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


def official_random_masking(x, mask_ratio, noise):
    """models_mae.MaskedAutoencoderViT.random_masking with the noise passed in."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def official_encoder_masking(x, pos_embed, cls_token, mask_ratio, noise):
    x = x + pos_embed[:, 1:, :]
    x, mask, ids_restore = official_random_masking(x, mask_ratio, noise)
    cls = cls_token + pos_embed[:, :1, :]
    return torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1), mask, ids_restore


def official_decoder_unshuffle(x, ids_restore, mask_token, decoder_pos_embed):
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + decoder_pos_embed


# ----------------------------------------------------------------------------- RNG and masking


def _spec_noise(seed, b, i):
    """The brief's RNG spec in plain Python integers."""
    M = 0xFFFFFFFF

    def mix32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & M
        x ^= x >> 15
        x = (x * 0x2C1B3C6D) & M
        return x ^ (x >> 16)

    seed_key = mix32(seed & M) ^ mix32(((seed >> 32) & M) ^ 0x1B873593)
    row_key = mix32(seed_key ^ mix32(b & M))
    return mix32(row_key ^ ((i * 0x2545F491) & M))


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 12345, 2**63 - 1])
def test_noise_follows_the_spec(seed):
    noise = masking_noise_reference(seed, 3, 50)
    for b, i in [(0, 0), (1, 7), (2, 49), (2, 13)]:
        assert int(noise[b, i]) == _spec_noise(seed, b, i)
    assert int(noise.min()) >= 0 and int(noise.max()) < 2**32


def _assert_permutation(ids):
    L = ids.shape[-1]
    assert torch.equal(ids.sort(dim=-1).values.cpu(), torch.arange(L).expand(ids.shape))


@pytest.mark.parametrize("batch,num_patches", [(1, 1), (3, 49), (2, 197), (1, 1024)])
def test_random_permutation_valid_and_equal_across_backends(batch, num_patches):
    ref_shuffle, ref_restore = random_permutation_reference(batch, num_patches, seed=7)
    _assert_permutation(ref_shuffle)
    assert torch.equal(torch.gather(ref_shuffle, 1, ref_restore), torch.arange(num_patches).expand(batch, -1))
    for backend, device in _backends("cpu"):
        with use_backend(backend):
            ids_shuffle, ids_restore = random_permutation(batch, num_patches, seed=7, device=device)
        assert ids_shuffle.dtype == ids_restore.dtype == torch.int64
        assert ids_shuffle.device.type == torch.device(device).type
        assert torch.equal(ids_shuffle.cpu(), ref_shuffle), backend
        assert torch.equal(ids_restore.cpu(), ref_restore), backend


@pytest.mark.parametrize("mask_ratio", RATIOS)
@pytest.mark.parametrize("batch,num_patches", [(1, 49), (4, 197)])
def test_random_masking_matches_reference_and_official(mask_ratio, batch, num_patches):
    seed = 1234
    ref = random_masking_reference(batch, num_patches, mask_ratio, seed=seed)
    K = int(num_patches * (1 - mask_ratio))
    assert ref.ids_keep.shape == (batch, K)
    # the official MAE's random_masking fed with the same noise gives the same keep set and mask
    x = torch.randn(batch, num_patches, 3)
    noise = masking_noise_reference(seed, batch, num_patches)
    x_masked, mask, ids_restore = official_random_masking(x, mask_ratio, noise)
    assert torch.equal(ref.ids_restore, ids_restore)
    assert torch.equal(ref.mask, mask)
    assert torch.equal(x[torch.arange(batch)[:, None], ref.ids_keep], x_masked)
    for backend, device in _backends("cpu"):
        with use_backend(backend):
            out = random_masking(batch, num_patches, mask_ratio, seed=seed, device=device)
        assert out.mask.dtype == torch.float32 and out.ids_keep.dtype == torch.int64
        for name in ("ids_keep", "ids_restore", "mask"):
            assert torch.equal(getattr(out, name).cpu(), getattr(ref, name)), (backend, name)
    _assert_permutation(ref.ids_restore)
    assert torch.equal(ref.mask.sum(1), torch.full((batch,), float(num_patches - K)))
    assert torch.equal(ref.mask.gather(1, ref.ids_keep), torch.zeros(batch, K))


def test_seed_reproducibility():
    for backend, device in _backends("cpu"):
        with use_backend(backend):
            a = random_masking(2, 49, 0.75, seed=99, device=device)
            b = random_masking(2, 49, 0.75, seed=torch.tensor(99), device=device)
            c = random_masking(2, 49, 0.75, seed=100, device=device)
            g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            d = random_masking(2, 49, 0.75, generator=g1, device=device)
            e = random_masking(2, 49, 0.75, generator=g2, device=device)
        assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)
        assert not torch.equal(a.ids_restore, c.ids_restore)
        assert torch.equal(d.ids_restore, e.ids_restore)
    # samples of one batch get different permutations; nested keep sets across ratios
    assert not torch.equal(a.ids_restore[0], a.ids_restore[1])
    lo = random_masking_reference(2, 49, 0.9, seed=99)
    assert torch.equal(a.ids_keep[:, : lo.ids_keep.shape[1]].cpu(), lo.ids_keep)


def test_random_masking_uniform_first_position():
    # each patch is equally likely to be kept first: chi-square-ish bound on 4000 rows of L = 8
    ids = random_masking_reference(4000, 8, num_keep=1, seed=3).ids_keep[:, 0]
    counts = torch.bincount(ids, minlength=8).float()
    assert (counts - 500).abs().max() < 120, counts


@pytest.mark.parametrize("counts_kind", ["list", "cpu_tensor"])
def test_random_masking_varlen(counts_kind):
    counts = [3, 0, 49, 17, 1]
    num_keep = counts if counts_kind == "list" else torch.tensor(counts, dtype=torch.int32)
    ref = random_masking_reference(5, 49, num_keep=num_keep, seed=11)
    assert isinstance(ref, PackedMasking)
    dense = random_permutation_reference(5, 49, seed=11)[0]
    assert torch.equal(ref.ids_keep, torch.cat([dense[b, :c] for b, c in enumerate(counts)]))
    assert ref.cu_seqlens.tolist() == [0, 3, 3, 52, 69, 70] and ref.cu_seqlens.dtype == torch.int32
    assert ref.max_seqlen == 49
    assert ref.mask.sum(1).tolist() == [49 - c for c in counts]
    for backend, device in _backends("cpu"):
        with use_backend(backend):
            out = random_masking(5, 49, num_keep=num_keep, seed=11, device=device)
        assert out.max_seqlen == ref.max_seqlen
        for name in ("ids_keep", "cu_seqlens", "ids_restore", "mask"):
            assert torch.equal(getattr(out, name).cpu(), getattr(ref, name)), (backend, name)


# ----------------------------------------------------------------------------- gather_visible


def _make_gather_inputs(B, L, D, K, dtype, device, pos_kind, with_cls, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype)
    ids_keep = random_masking_reference(B, L, num_keep=K, seed=seed + 1).ids_keep.to(device)
    pos_rows = {"none": 0, "L": L, "1L": L, "1L+1": L + 1}[pos_kind]
    pos = None
    if pos_rows:
        pos = torch.randn(pos_rows, D, generator=g).to(device=device, dtype=dtype)
        if pos_kind.startswith("1"):
            pos = pos[None]
    cls = torch.randn(1, 1, D, generator=g).to(device=device, dtype=dtype) if with_cls else None
    return x, ids_keep, pos, cls


def _grads(fn, inputs, grad_out_seed=5):
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out)
    wrt = [t for t in leaves if t is not None]
    return out.detach(), torch.autograd.grad(out, wrt, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,D,K,pos_kind,with_cls", [
    (1, 49, 64, 12, "1L+1", True),
    (3, 197, 48, 49, "L", False),
    (2, 49, 96, 49, "1L", True),
    (2, 16, 32, 4, "none", False),
])
def test_gather_visible_triton_matches_reference(device, dtype, B, L, D, K, pos_kind, with_cls):
    x, ids_keep, pos, cls = _make_gather_inputs(B, L, D, K, dtype, device, pos_kind, with_cls)
    ref_out, ref_grads = _grads(lambda x, p, c: gather_visible_reference(x, ids_keep, p, cls_token=c), (x, pos, cls))
    with use_backend("triton"):
        out, grads = _grads(lambda x, p, c: gather_visible(x, ids_keep.int(), p, cls_token=c), (x, pos, cls))
    assert out.shape == (B, K + with_cls, D) and out.dtype == ref_out.dtype
    _assert_same_values(out, ref_out, device)
    assert torch.equal(grads[0], ref_grads[0])  # grad_x is a pure scatter
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        assert got.dtype == want.dtype
        assert_rel_close(got, want, dtype, name="pos/cls grad")


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
    pos_rows = {"none": 0, "L": L, "1L": L, "1L+1": L + 1}[pos_kind]
    pos = None
    if pos_rows:
        pos = torch.randn(pos_rows, D, generator=g).to(device=device, dtype=dtype)
        if pos_kind.startswith("1"):
            pos = pos[None]
    return x, ids_restore, mask_token, pos


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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,D,K,pos_kind,has_cls", [
    (1, 49, 64, 12, "1L+1", True),
    (3, 197, 48, 19, "L", False),
    (2, 49, 96, 0, "1L", True),
    (2, 16, 32, 16, "none", False),
])
def test_unshuffle_triton_matches_reference(device, dtype, B, L, D, K, pos_kind, has_cls):
    x, ids_restore, mask_token, pos = _make_unshuffle_inputs(B, L, D, K, dtype, device, pos_kind, has_cls)
    ref_out, ref_grads = _grads(lambda x, m, p: unshuffle_reference(x, ids_restore, m, p, has_cls=has_cls),
                                (x, mask_token, pos))
    with use_backend("triton"):
        out, grads = _grads(lambda x, m, p: unshuffle(x, ids_restore.int(), m, p, has_cls=has_cls),
                            (x, mask_token, pos))
    assert out.shape == (B, L + has_cls, D)
    _assert_same_values(out, ref_out, device)
    assert torch.equal(grads[0], ref_grads[0])  # grad_x_visible is a pure gather
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        assert got.dtype == want.dtype
        assert_rel_close(got, want, dtype, name="mask/pos grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [192, 384, 512, 768, 1024, 1280, 200])
def test_model_widths_forward_and_backward(device, D):
    # the ViT widths (768 and 1280 are not powers of two: 3 and 5 blocks of 256) and an odd one
    B, L, K = 2, 10, 3
    x, ids_keep, pos, cls = _make_gather_inputs(B, L, D, K, torch.float32, device, "1L+1", True)
    ref_out, ref_grads = _grads(lambda x, p, c: gather_visible_reference(x, ids_keep, p, cls_token=c), (x, pos, cls))
    with use_backend("triton"):
        out, grads = _grads(lambda x, p, c: gather_visible(x, ids_keep, p, cls_token=c), (x, pos, cls))
    assert torch.equal(out, ref_out) and torch.equal(grads[0], ref_grads[0])
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        assert_rel_close(got, want, torch.float32)
    restore = random_masking_reference(B, L, num_keep=K, seed=1).ids_restore.to(device)
    mt = torch.randn(D, device=device)
    ref_out, ref_grads = _grads(lambda v, m, p: unshuffle_reference(v, restore, m, p, has_cls=True), (out, mt, pos))
    with use_backend("triton"):
        dec, grads = _grads(lambda v, m, p: unshuffle(v, restore, m, p, has_cls=True), (out, mt, pos))
    assert torch.equal(dec, ref_out) and torch.equal(grads[0], ref_grads[0])
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        assert_rel_close(got, want, torch.float32)


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
                assert_rel_close(got, want, torch.float32)


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


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(1, 70), D=st.sampled_from([8, 24, 40, 64]),
       ratio=st.sampled_from(RATIOS + [0.3]), has_cls=st.booleans(), seed=st.integers(0, 2**63 - 1))
def test_random_shapes_triton_matches_reference(B, L, D, ratio, has_cls, seed):
    ref = random_masking_reference(B, L, ratio, seed=seed)
    x = torch.randn(B, L, D)
    pos = torch.randn(L + 1, D)
    cls = torch.randn(D) if has_cls else None
    mt = torch.randn(D)
    enc_ref = gather_visible_reference(x, ref.ids_keep, pos, cls_token=cls)
    dec_ref = unshuffle_reference(enc_ref, ref.ids_restore, mt, pos, has_cls=has_cls)
    for device in DEVICES:
        with use_backend("triton"):
            m = random_masking(B, L, ratio, seed=seed, device=device)
            enc = gather_visible(x.to(device), m.ids_keep, pos.to(device),
                                 cls_token=None if cls is None else cls.to(device))
            dec = unshuffle(enc, m.ids_restore, mt.to(device), pos.to(device), has_cls=has_cls)
        assert torch.equal(m.ids_keep.cpu(), ref.ids_keep) and torch.equal(m.mask.cpu(), ref.mask)
        assert torch.equal(enc.cpu(), enc_ref) and torch.equal(dec.cpu(), dec_ref)


# ----------------------------------------------------------------------------- torch.compile


class _TinyMAE(torch.nn.Module):
    def __init__(self, L=16, D=8):
        super().__init__()
        self.L = L
        self.pos_embed = torch.nn.Parameter(torch.randn(1, L + 1, D))
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, D))
        self.mask_token = torch.nn.Parameter(torch.randn(1, 1, D))
        self.proj = torch.nn.Linear(D, D)

    def forward(self, x, seed):
        m = random_masking(x.shape[0], self.L, 0.75, seed=seed, device=x.device)
        h = self.proj(gather_visible(x, m.ids_keep, self.pos_embed, cls_token=self.cls_token))
        out = unshuffle(h, m.ids_restore, self.mask_token, self.pos_embed, has_cls=True)
        return (out.square().mean(-1)[:, 1:] * m.mask).sum()


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    model = _TinyMAE()
    x = torch.randn(2, 16, 8)
    seed = torch.tensor(3)
    want = model(x, seed)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(x, seed)
    got.backward()
    assert torch.equal(got, want)
    for p, g in zip(model.parameters(), want_grads, strict=True):
        assert_rel_close(p.grad, g, torch.float32)
    # a seed drawn from the default generator inside the graph traces too
    fn = torch.compile(lambda: random_masking(2, 16, 0.5).ids_keep, backend="aot_eager", fullgraph=True)
    assert fn().shape == (2, 8)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_masking_arguments():
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(2, 16, 1.0)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(2, 16, -0.1)
    with pytest.raises(ValueError, match="exactly one of mask_ratio and num_keep"):
        random_masking(2, 16)
    with pytest.raises(ValueError, match="exactly one of mask_ratio and num_keep"):
        random_masking(2, 16, 0.5, num_keep=3)
    with pytest.raises(ValueError, match=r"num_keep must be in \[0, num_patches=16\]"):
        random_masking(2, 16, num_keep=17)
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(2,\)"):
        random_masking(2, 16, num_keep=[1, 2, 3])
    with pytest.raises(ValueError, match="counts must be in"):
        random_masking(2, 16, num_keep=[1, 20])
    with pytest.raises(TypeError, match="integer dtype"):
        random_masking(2, 16, num_keep=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        random_masking(2, 16, 0.5, seed=-1)
    with pytest.raises(ValueError, match="at most one of seed and generator"):
        random_masking(2, 16, 0.5, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed tensor must be int64"):
        random_permutation(2, 16, seed=torch.tensor(1.0))
    with pytest.raises(ValueError, match="num_patches must be >= 1"):
        random_permutation(2, 0, seed=1)


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
