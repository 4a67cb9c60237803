"""The compiled ops (``csrc/``, ``torch.ops.fastmim.csrc_*``) against the references.

The extension is built just-in-time when needed (cached across runs, so only the first run pays
a minute or two); the tests skip only when no C++ compiler is present. On CPU they run the C++
kernels; with a GPU and a CUDA build, the ``cuda``-marked tests run the CUDA kernels too.
Indexing results must equal the references bit for bit; sums within the dtype's tolerance.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from fastmim.ops import gather, masking
from fastmim.ops import loss as loss_ops
from fastmim.testing import assert_rel_close, kernel_devices, run_until_stalled

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.fixture(scope="module", autouse=True)
def ext():
    if os.environ.get("FASTMIM_NO_EXT") == "1":
        pytest.skip("FASTMIM_NO_EXT=1")
    from fastmim.ops import _csrc

    error = _csrc.load_error()
    if error is not None and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip(f"no C++ compiler: {error}")
    assert error is None, error  # a compiler is present: the extension must build
    return _csrc


@pytest.fixture(params=_devices())
def device(request):
    if request.param == "cuda":
        from fastmim.ops import _csrc

        if not _csrc.has_cuda():
            pytest.skip("fastmim._C was built without CUDA")
    return request.param


ops = torch.ops.fastmim


# ------------------------------------------------------------------------------ random masking


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40 + 7, 2**63 - 1])
@pytest.mark.parametrize("batch,num_patches", [(1, 1), (3, 49), (2, 197)])
def test_random_permutation_matches_reference(device, seed, batch, num_patches):
    seed_t = torch.tensor(seed, dtype=torch.int64)
    ids_shuffle, ids_restore = ops.csrc_random_permutation(seed_t, batch, num_patches, torch.device(device))
    ref_shuffle, ref_restore = masking.random_permutation_reference(batch, num_patches, seed=seed)
    assert torch.equal(ids_shuffle.cpu(), ref_shuffle)
    assert torch.equal(ids_restore.cpu(), ref_restore)


@pytest.mark.parametrize("num_keep", [0, 12, 48, 49])
def test_random_masking_matches_reference(device, num_keep):
    seed_t = torch.tensor(987654321, dtype=torch.int64, device=device)  # a seed on the device works too
    ids_keep, ids_restore, mask = ops.csrc_random_masking(seed_t, 3, 49, num_keep, torch.device(device))
    ref = masking.random_masking_reference(3, 49, num_keep=num_keep, seed=987654321)
    assert torch.equal(ids_keep.cpu(), ref.ids_keep)
    assert torch.equal(ids_restore.cpu(), ref.ids_restore)
    assert mask.dtype == torch.float32 and torch.equal(mask.cpu(), ref.mask)


def test_random_masking_varlen_matches_reference(device):
    counts = [5, 0, 49, 17]
    ref = masking.random_masking_reference(4, 49, num_keep=counts, seed=77)
    cu = ref.cu_seqlens.to(device)
    ids_keep, ids_restore, mask = ops.csrc_random_masking_varlen(
        torch.tensor(77), cu, 4, 49, sum(counts), torch.device(device))
    assert torch.equal(ids_keep.cpu(), ref.ids_keep)
    assert torch.equal(ids_restore.cpu(), ref.ids_restore)
    assert torch.equal(mask.cpu(), ref.mask)


@pytest.mark.parametrize("offset", [1, 6, 2**32 - 2, 2**63 - 2])
@pytest.mark.parametrize("offset_on", ["host", "device"])
def test_offset_gives_the_rows_of_a_larger_call(device, offset, offset_on):
    """Row b of a call with offset is sample offset + b (mod 2**32) of the seed: the reference's
    rows, which the reference tests pin to the rows of a larger offset-0 call."""
    B, L, K, seed = 3, 49, 12, 2**40 + 7
    seed_t, dev = torch.tensor(seed), torch.device(device)
    off = torch.tensor(offset, device=device if offset_on == "device" else "cpu")
    ids_shuffle, ids_restore = ops.csrc_random_permutation(seed_t, B, L, dev, offset=off)
    ref_shuffle, ref_restore = masking.random_permutation_reference(B, L, seed=seed, offset=offset)
    assert torch.equal(ids_shuffle.cpu(), ref_shuffle) and torch.equal(ids_restore.cpu(), ref_restore)
    if offset < 2**32 - 2:
        full_shuffle = masking.random_permutation_reference(B + offset, L, seed=seed)[0]
        assert torch.equal(ids_shuffle.cpu(), full_shuffle[offset:])
    ids_keep, ids_restore, mask = ops.csrc_random_masking(seed_t, B, L, K, dev, offset=off)
    ref = masking.random_masking_reference(B, L, num_keep=K, seed=seed, offset=offset)
    assert torch.equal(ids_keep.cpu(), ref.ids_keep) and torch.equal(ids_restore.cpu(), ref.ids_restore)
    assert torch.equal(mask.cpu(), ref.mask)
    counts = [5, 0, 49]
    ref = masking.random_masking_reference(B, L, num_keep=counts, seed=seed, offset=offset)
    ids_keep, ids_restore, mask = ops.csrc_random_masking_varlen(seed_t, ref.cu_seqlens.to(device), B, L,
                                                                 sum(counts), dev, offset=off)
    assert torch.equal(ids_keep.cpu(), ref.ids_keep) and torch.equal(ids_restore.cpu(), ref.ids_restore)
    assert torch.equal(mask.cpu(), ref.mask)
    # the public ops on the csrc backend, against the reference and the Triton path bit for bit
    from fastmim.ops import use_backend

    outs = {}
    for backend in ("csrc", "reference", "triton"):
        if backend == "triton" and device not in kernel_devices():
            continue
        with use_backend(backend):
            outs[backend] = masking.random_masking(B, L, num_keep=K, seed=seed, offset=off, device=device)
    for backend, out in outs.items():
        for got, want in zip(out, outs["reference"], strict=True):
            assert torch.equal(got.cpu(), want.cpu()), backend


# ------------------------------------------------------------------------------ gather_visible

TOKEN_CASES = [  # (B, L, K, D)
    (1, 49, 12, 64),
    (3, 49, 13, 7),
    (2, 197, 49, 96),
]


def _tokens(B, L, K, D, dtype, device, pos_rows, with_cls, pos_dtype=None):
    x = torch.randn(B, L, D, device=device).to(dtype)
    ids_keep = torch.stack([torch.randperm(L, device=device)[:K] for _ in range(B)])
    pos_dtype = pos_dtype or dtype
    pos = None if pos_rows is None else torch.randn(pos_rows, D, device=device).to(pos_dtype)
    cls = torch.randn(D, device=device).to(pos_dtype) if with_cls else None
    return x, ids_keep, pos, cls


@pytest.mark.parametrize("B,L,K,D", TOKEN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_kind,with_cls", [(None, False), ("L", False), ("L+1", True), ("L", True),
                                               ("L+1", False)])
def test_gather_visible_matches_reference(device, B, L, K, D, dtype, pos_kind, with_cls):
    pos_rows = {None: None, "L": L, "L+1": L + 1}[pos_kind]
    x, ids_keep, pos, cls = _tokens(B, L, K, D, dtype, device, pos_rows, with_cls)
    out = ops.csrc_gather_visible(x, ids_keep, pos, cls)
    ref = gather.gather_visible_reference(x, ids_keep, pos, cls_token=cls)
    assert out.dtype == ref.dtype and torch.equal(out, ref)  # pure indexing + one add: bit-exact

    grad_out = torch.randn_like(ref)
    grad_x, grad_pos, grad_cls = ops.csrc_gather_visible_backward(grad_out, ids_keep, L, with_cls, True, True, True)
    ref_x, ref_pos, ref_cls = gather._gather_visible_backward_reference(grad_out, ids_keep, None, L, with_cls)
    assert torch.equal(grad_x, ref_x.to(dtype))  # each position receives at most one row here
    assert_rel_close(grad_pos, ref_pos, dtype, name="grad_pos")
    if with_cls:
        assert_rel_close(grad_cls, ref_cls, dtype, name="grad_cls")
    else:
        assert grad_cls.numel() == 0


def test_gather_visible_int32_ids_mixed_dtypes_and_repeats(device):
    B, L, K, D = 2, 49, 20, 32
    x, ids_keep, pos, cls = _tokens(B, L, K, D, torch.bfloat16, device, L + 1, True, pos_dtype=torch.float32)
    ids_keep[:, 5] = ids_keep[:, 3]  # a repeated index: its gradients add up
    ids32 = ids_keep.to(torch.int32)
    out = ops.csrc_gather_visible(x, ids32, pos, cls)
    ref = gather.gather_visible_reference(x, ids_keep, pos, cls_token=cls)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    grad_out = torch.randn_like(ref)
    grad_x, grad_pos, _ = ops.csrc_gather_visible_backward(grad_out, ids32, L, True, True, True, False)
    ref_x, ref_pos, _ = gather._gather_visible_backward_reference(grad_out, ids_keep, None, L, True)
    assert_rel_close(grad_x, ref_x, torch.float32, name="grad_x")
    assert_rel_close(grad_pos, ref_pos, torch.float32, name="grad_pos")


# ------------------------------------------------------------------------------ unshuffle


@pytest.mark.parametrize("B,L,K,D", TOKEN_CASES + [(2, 49, 49, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_kind,with_cls", [(None, False), ("L", False), ("L+1", True), ("L", True)])
def test_unshuffle_matches_reference(device, B, L, K, D, dtype, pos_kind, with_cls):
    hc = int(with_cls)
    pos_rows = {None: None, "L": L, "L+1": L + 1}[pos_kind]
    ids_restore = torch.stack([torch.argsort(torch.randperm(L, device=device)) for _ in range(B)])
    x_visible = torch.randn(B, K + hc, D, device=device).to(dtype)
    mask_token = torch.randn(D, device=device).to(dtype)
    pos = None if pos_rows is None else torch.randn(pos_rows, D, device=device).to(dtype)
    out = ops.csrc_unshuffle(x_visible, ids_restore, mask_token, pos, with_cls)
    ref = gather.unshuffle_reference(x_visible, ids_restore, mask_token, pos, has_cls=with_cls)
    assert out.dtype == ref.dtype and torch.equal(out, ref)

    grad_out = torch.randn_like(ref)
    grad_x, grad_mask, grad_pos = ops.csrc_unshuffle_backward(grad_out, ids_restore, K, with_cls, True, True, True)
    ref_x, ref_mask, ref_pos = gather._unshuffle_backward_reference(grad_out, ids_restore, None, K + hc,
                                                                       with_cls)
    assert torch.equal(grad_x, ref_x.to(dtype))  # a permutation: each visible row receives one row
    assert_rel_close(grad_mask, ref_mask, dtype, name="grad_mask_token")
    assert_rel_close(grad_pos, ref_pos, dtype, name="grad_pos")


def test_unshuffle_mixed_dtypes(device):
    B, L, K, D = 2, 49, 12, 24
    ids_restore = torch.stack([torch.argsort(torch.randperm(L, device=device)) for _ in range(B)]).to(torch.int32)
    x_visible = torch.randn(B, K + 1, D, device=device).to(torch.float16)
    mask_token = torch.randn(D, device=device)
    pos = torch.randn(1, L + 1, D, device=device)
    out = ops.csrc_unshuffle(x_visible, ids_restore, mask_token, pos, True)
    ref = gather.unshuffle_reference(x_visible, ids_restore, mask_token, pos, has_cls=True)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


# ------------------------------------------------------------------------------ edge layouts


def _offset_copy(t, offset_bytes):
    """A contiguous copy of ``t`` whose data starts ``offset_bytes`` past an aligned address."""
    step = offset_bytes // t.element_size()
    flat = torch.full((t.numel() + step,), float("nan"), dtype=t.dtype, device=t.device)
    view = flat[step:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 == offset_bytes % 16
    return view


# D is a multiple of every pack width, so only the addresses can rule the 16-byte packs out; a
# 16-byte offset of an fp32 operand next to fp16 tokens breaks the 32-byte alignment its packs
# of 8 would need.
MISALIGNED_CASES = [(torch.float32, torch.float32, 4), (torch.bfloat16, torch.bfloat16, 2),
                    (torch.float16, torch.float32, 16), (torch.float16, torch.float32, 4)]


@pytest.mark.parametrize("dtype,aux_dtype,offset", MISALIGNED_CASES)
@pytest.mark.parametrize("operand", ["x", "pos_embed", "cls_token"])
def test_gather_visible_misaligned_views(device, dtype, aux_dtype, offset, operand):
    B, L, K, D = 2, 49, 13, 64
    x, ids_keep, pos, cls = _tokens(B, L, K, D, dtype, device, L + 1, True, pos_dtype=aux_dtype)
    ref = gather.gather_visible_reference(x, ids_keep, pos, cls_token=cls)
    args = {"x": x, "pos_embed": pos, "cls_token": cls}
    args[operand] = _offset_copy(args[operand], offset)
    out = ops.csrc_gather_visible(args["x"], ids_keep, args["pos_embed"], args["cls_token"])
    assert out.dtype == ref.dtype and torch.equal(out, ref)

    grad_out = torch.randn_like(ref).to(dtype)
    grad_out = _offset_copy(grad_out, grad_out.element_size())
    grad_x, grad_pos, grad_cls = ops.csrc_gather_visible_backward(grad_out, ids_keep, L, True, True, True, True)
    ref_x, ref_pos, ref_cls = gather._gather_visible_backward_reference(grad_out, ids_keep, None, L, True)
    assert torch.equal(grad_x, ref_x.to(dtype))
    assert_rel_close(grad_pos, ref_pos, dtype, name="grad_pos")
    assert_rel_close(grad_cls, ref_cls, dtype, name="grad_cls")


@pytest.mark.parametrize("dtype,aux_dtype,offset", MISALIGNED_CASES)
@pytest.mark.parametrize("operand", ["x_visible", "mask_token", "pos_embed"])
def test_unshuffle_misaligned_views(device, dtype, aux_dtype, offset, operand):
    B, L, K, D = 2, 49, 13, 64
    ids_restore = torch.stack([torch.argsort(torch.randperm(L, device=device)) for _ in range(B)])
    args = {"x_visible": torch.randn(B, K + 1, D, device=device).to(dtype),
            "mask_token": torch.randn(D, device=device).to(aux_dtype),
            "pos_embed": torch.randn(L + 1, D, device=device).to(aux_dtype)}
    ref = gather.unshuffle_reference(args["x_visible"], ids_restore, args["mask_token"], args["pos_embed"],
                                        has_cls=True)
    args[operand] = _offset_copy(args[operand], offset)
    out = ops.csrc_unshuffle(args["x_visible"], ids_restore, args["mask_token"], args["pos_embed"], True)
    assert out.dtype == ref.dtype and torch.equal(out, ref)

    grad_out = torch.randn_like(ref).to(dtype)
    grad_out = _offset_copy(grad_out, grad_out.element_size())
    grad_x, grad_mask, grad_pos = ops.csrc_unshuffle_backward(grad_out, ids_restore, K, True, True, True, True)
    ref_x, ref_mask, ref_pos = gather._unshuffle_backward_reference(grad_out, ids_restore, None, K + 1, True)
    assert torch.equal(grad_x, ref_x.to(dtype))
    assert_rel_close(grad_mask, ref_mask, dtype, name="grad_mask_token")
    assert_rel_close(grad_pos, ref_pos, dtype, name="grad_pos")


@pytest.mark.parametrize("has_cls", [False, True])
def test_token_ops_with_no_patches(device, has_cls):
    # L = K = 0: every kernel has nothing (or only the cls row) to do; none may launch an empty grid.
    B, D, hc = 2, 16, int(has_cls)
    ids = torch.empty(B, 0, dtype=torch.int64, device=device)
    x = torch.randn(B, 0, D, device=device)
    cls = torch.randn(D, device=device) if has_cls else None
    out = ops.csrc_gather_visible(x, ids, None, cls)
    ref = gather.gather_visible_reference(x, ids, None, cls_token=cls)
    assert out.shape == ref.shape == (B, hc, D) and torch.equal(out, ref)
    grad_out = torch.randn(B, hc, D, device=device)
    got = ops.csrc_gather_visible_backward(grad_out, ids, 0, has_cls, True, True, True)
    ref_x, ref_pos, ref_cls = gather._gather_visible_backward_reference(grad_out, ids, None, 0, has_cls)
    assert got[0].shape == ref_x.shape == (B, 0, D) and got[1].shape == ref_pos.shape == (0, D)
    if has_cls:
        assert_rel_close(got[2], ref_cls, torch.float32, name="grad_cls")
    else:
        assert got[2].numel() == 0

    x_visible = torch.randn(B, hc, D, device=device)
    mask_token = torch.randn(D, device=device)
    out = ops.csrc_unshuffle(x_visible, ids, mask_token, None, has_cls)
    ref = gather.unshuffle_reference(x_visible, ids, mask_token, None, has_cls=has_cls)
    assert out.shape == ref.shape == (B, hc, D) and torch.equal(out, ref)
    grad_x, grad_mask, grad_pos = ops.csrc_unshuffle_backward(grad_out, ids, 0, has_cls, True, True, True)
    ref_x, ref_mask, ref_pos = gather._unshuffle_backward_reference(grad_out, ids, None, hc, has_cls)
    assert torch.equal(grad_x, ref_x) and grad_pos.shape == ref_pos.shape == (hc, D)
    assert torch.equal(grad_mask, ref_mask) and not grad_mask.any()  # no masked position: sum over nothing
    if has_cls:
        assert torch.equal(grad_pos, ref_pos)


@pytest.mark.parametrize("B,D", [(0, 16), (2, 0)])
def test_token_ops_with_an_empty_batch_or_width(device, B, D):
    # Empty results, and zero sums over an empty batch, as the references give; no kernel may
    # launch an empty grid.
    L, K = 8, 3
    dev = torch.device(device)
    ids = torch.arange(K, device=dev).expand(B, K).contiguous()
    restore = torch.arange(L, device=dev).expand(B, L).contiguous()
    x, pos, cls = torch.randn(B, L, D, device=dev), torch.randn(L + 1, D, device=dev), torch.randn(D, device=dev)
    out = ops.csrc_gather_visible(x, ids, pos, cls)
    assert torch.equal(out, gather.gather_visible_reference(x, ids, pos, cls_token=cls))
    grad_out = torch.randn(B, K + 1, D, device=dev)
    got = ops.csrc_gather_visible_backward(grad_out, ids, L, True, True, True, True)
    for g, want in zip(got, gather._gather_visible_backward_reference(grad_out, ids, None, L, True), strict=True):
        assert torch.equal(g, want)
    x_visible = torch.randn(B, K + 1, D, device=dev)
    out = ops.csrc_unshuffle(x_visible, restore, cls, pos, True)
    assert torch.equal(out, gather.unshuffle_reference(x_visible, restore, cls, pos, has_cls=True))
    grad_out = torch.randn(B, L + 1, D, device=dev)
    got = ops.csrc_unshuffle_backward(grad_out, restore, K, True, True, True, True)
    for g, want in zip(got, gather._unshuffle_backward_reference(grad_out, restore, None, K + 1, True), strict=True):
        assert torch.equal(g, want)
    if B == 0:
        seed = torch.tensor(1)
        ids_keep, ids_restore, mask = ops.csrc_random_masking(seed, 0, L, K, dev)
        assert (ids_keep.shape, ids_restore.shape, mask.shape) == ((0, K), (0, L), (0, L))
        assert ops.csrc_random_permutation(seed, 0, L, dev)[0].shape == (0, L)
        cu = torch.zeros(1, dtype=torch.int32, device=dev)
        assert ops.csrc_random_masking_varlen(seed, cu, 0, L, 0, dev)[0].shape == (0,)


@pytest.mark.cuda
def test_cuda_kernels_read_zeros_for_out_of_range_indices(ext):
    # Index values on a GPU are not checked (a device sync): an out-of-range id gathers a zero row,
    # an out-of-range rank a zero token plus its position embedding; their gradients are dropped.
    if not ext.has_cuda():
        pytest.skip("fastmim._C was built without CUDA")
    B, L, K, D = 2, 8, 3, 16
    x, pos, cls = (torch.randn(shape, device="cuda") for shape in ((B, L, D), (L + 1, D), (D,)))
    ids = torch.stack([torch.randperm(L, device="cuda")[:K] for _ in range(B)])
    bad = ids.clone()
    bad[1, 1], bad[0, 2] = L, -1
    bad_rows = ([1, 0], [2, 3])  # their output rows (after the cls row)
    out = ops.csrc_gather_visible(x, bad, pos, cls)
    want = gather.gather_visible_reference(x, ids, pos, cls_token=cls)
    want[bad_rows] = 0
    assert torch.equal(out, want)
    grad_out = torch.randn_like(out)
    kept = grad_out.clone()
    kept[bad_rows] = 0
    got = ops.csrc_gather_visible_backward(grad_out, bad, L, True, True, True, True)
    want = gather._gather_visible_backward_reference(kept, ids, None, L, True)
    assert torch.equal(got[0], want[0])
    assert_rel_close(got[1], want[1], torch.float32, name="grad_pos")
    assert_rel_close(got[2], want[2], torch.float32, name="grad_cls")

    restore = torch.stack([torch.argsort(torch.randperm(L, device="cuda")) for _ in range(B)])
    i = int((restore[1] >= K).nonzero()[0, 0])  # a masked position: every visible rank keeps its position
    bad = restore.clone()
    bad[1, i] = L
    x_visible, mask_token, pos = torch.randn(B, K + 1, D, device="cuda"), torch.randn(D, device="cuda"), pos[1:]
    out = ops.csrc_unshuffle(x_visible, bad, mask_token, pos, True)
    want = gather.unshuffle_reference(x_visible, restore, mask_token, pos, has_cls=True)
    want[1, 1 + i] = pos[i]
    assert torch.equal(out, want)
    grad_out = torch.randn_like(out)
    got = ops.csrc_unshuffle_backward(grad_out, bad, K, True, True, True, True)
    want = gather._unshuffle_backward_reference(grad_out, restore, None, K + 1, True)
    assert torch.equal(got[0], want[0])
    assert_rel_close(got[1], want[1] - grad_out[1, 1 + i], torch.float32, name="grad_mask_token")
    assert_rel_close(got[2], want[2], torch.float32, name="grad_pos")


# ------------------------------------------------------------------------------ masked_patch_mse


def _loss_inputs(B, C, H, W, p, dtype, device, mask_ratio, constant=False):
    L, N = (H // p) * (W // p), p * p * C
    imgs = torch.randn(B, C, H, W, device=device)
    if constant:
        imgs[:, :, :p, :p] = 0.5  # patch 0 has zero variance
    pred = torch.randn(B, L, N, device=device).to(dtype)
    mask = (torch.rand(B, L, device=device) < mask_ratio).float()
    return pred, imgs, mask


LOSS_CASES = [  # (B, C, H, W, p)
    (1, 3, 16, 16, 4),
    (2, 1, 32, 48, 8),
    (2, 3, 28, 28, 14),
    (3, 3, 8, 12, 2),
]


@pytest.mark.parametrize("B,C,H,W,p", LOSS_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_patch_mse_matches_reference(device, B, C, H, W, p, dtype, norm_pix, reduction):
    pred, imgs, mask = _loss_inputs(B, C, H, W, p, dtype, device, 0.75, constant=True)
    loss, grad = ops.csrc_masked_patch_mse(pred, imgs, mask, None, p, norm_pix, 1e-6, reduction, True)
    ref_loss, ref_grad = loss_ops._reference_forward(pred, imgs, mask, None, p, norm_pix, 1e-6, reduction, True)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert_rel_close(loss, ref_loss, torch.float32, tol=2e-5, name="loss")  # fp32 sums in another order
    assert_rel_close(grad, ref_grad, dtype, name="grad_pred")
    grad_output = torch.rand(ref_loss.shape, device=device) + 0.5
    ref_scaled = (ref_grad * (grad_output if grad_output.dim() == 0 else grad_output[..., None])).to(dtype)
    ops.csrc_masked_patch_mse_backward(grad, grad_output)
    assert_rel_close(grad, ref_scaled, dtype, name="scaled grad_pred")


@pytest.mark.parametrize("mask_ratio", [0.0, 1.0])
def test_masked_patch_mse_mask_extremes(device, mask_ratio):
    pred, imgs, mask = _loss_inputs(2, 3, 16, 16, 4, torch.float32, device, mask_ratio)
    loss, grad = ops.csrc_masked_patch_mse(pred, imgs, mask, None, 4, True, 1e-6, "mean", True)
    ref_loss, ref_grad = loss_ops._reference_forward(pred, imgs, mask, None, 4, True, 1e-6, "mean", True)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_rel_close(loss, ref_loss, torch.float32, tol=2e-5)
    assert_rel_close(grad, ref_grad, torch.float32)
    if mask_ratio == 0.0:
        assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("layout", ["selected", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_patch_mse_masked_only_layouts(device, layout, dtype):
    B, C, H, W, p = 3, 3, 16, 24, 4
    L, N = (H // p) * (W // p), p * p * C
    _, imgs, _ = _loss_inputs(B, C, H, W, p, dtype, device, 0.0)
    ids_masked = torch.stack([torch.randperm(L, device=device)[:10] for _ in range(B)])
    mask = torch.zeros(B, L, device=device).scatter_(1, ids_masked, 1.0)
    if layout == "packed":
        ids_masked = (ids_masked + torch.arange(B, device=device)[:, None] * L).reshape(-1).to(torch.int32)
        pred = torch.randn(ids_masked.shape[0], N, device=device).to(dtype)
    else:
        pred = torch.randn(B, 10, N, device=device).to(dtype)
    loss, grad = ops.csrc_masked_patch_mse(pred, imgs, mask, ids_masked, p, True, 1e-6, "mean", True)
    ref_loss, ref_grad = loss_ops._reference_forward(pred, imgs, mask, ids_masked, p, True, 1e-6, "mean", True)
    assert_rel_close(loss, ref_loss, torch.float32, tol=2e-5)
    assert_rel_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("layout", ["full", "selected", "packed"])
def test_masked_patch_mse_empty_batch(device, layout):
    """B = 0 is a valid call on every backend: loss 0 ("none": no rows) and an empty gradient."""
    imgs, mask = torch.randn(0, 3, 16, 16, device=device), torch.zeros(0, 16, device=device)
    ids = {"full": None, "selected": torch.zeros(0, 5, dtype=torch.long, device=device),
           "packed": torch.zeros(0, dtype=torch.long, device=device)}[layout]
    pred = torch.randn(*((0, 16) if ids is None else ids.shape), 48, device=device)
    for reduction in ("mean", "sum", "none"):
        loss, grad = ops.csrc_masked_patch_mse(pred, imgs, mask, ids, 4, True, 1e-6, reduction, True)
        assert grad.shape == pred.shape and loss.shape == (pred.shape[:-1] if reduction == "none" else ())
        if reduction != "none":
            assert loss.item() == 0.0


def test_masked_patch_mse_no_mask_no_grad(device):
    pred, imgs, _ = _loss_inputs(2, 3, 16, 16, 8, torch.float16, device, 0.5)
    imgs = imgs.to(torch.bfloat16)  # pred and imgs may differ in dtype
    loss, grad = ops.csrc_masked_patch_mse(pred, imgs, None, None, 8, True, 1e-6, "mean", False)
    ref_loss, _ = loss_ops._reference_forward(pred, imgs, None, None, 8, True, 1e-6, "mean", False)
    assert grad.numel() == 0
    assert_rel_close(loss, ref_loss, torch.float32, tol=2e-5)


# ------------------------------------------------------------------------------ torch.compile


def test_compile_fullgraph_through_fake_kernels():
    B, L, D, K, p = 2, 16, 32, 4, 4

    def step(x, pos, cls, mask_token, imgs, pred, seed):
        ids_keep, ids_restore, mask = ops.csrc_random_masking(seed, B, L, K, x.device)
        visible = ops.csrc_gather_visible(x, ids_keep, pos, cls)
        full = ops.csrc_unshuffle(visible, ids_restore, mask_token, pos, True)
        loss, grad = ops.csrc_masked_patch_mse(pred, imgs, mask, None, p, True, 1e-6, "mean", True)
        grad_x, grad_pos, grad_cls = ops.csrc_gather_visible_backward(visible, ids_keep, L, True, True, True, True)
        return full.sum() + loss + grad.sum() + grad_x.sum() + grad_pos.sum() + grad_cls.sum()

    args = (torch.randn(B, L, D), torch.randn(L + 1, D), torch.randn(D), torch.randn(D),
            torch.randn(B, 3, 16, 16), torch.randn(B, L, p * p * 3), torch.tensor(5))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), step(*args))


def test_meta_shapes():
    x = torch.empty(2, 49, 8, device="meta")
    ids = torch.empty(2, 12, dtype=torch.int64, device="meta")
    assert ops.csrc_gather_visible(x, ids, torch.empty(50, 8, device="meta"), None).shape == (2, 12, 8)
    ids_restore = torch.empty(2, 49, dtype=torch.int64, device="meta")
    out = ops.csrc_unshuffle(torch.empty(2, 13, 8, device="meta"), ids_restore, torch.empty(8, device="meta"), None,
                             True)
    assert out.shape == (2, 50, 8)


# ------------------------------------------------------------------------------ bad input
# One case per argument check of the C++ ops, called directly (the public ops validate first).
# A CPU tensor next to a meta one exercises the same-device checks: the dispatcher then picks
# the Meta kernel, which must refuse the mix rather than return a shape-only result.

_B, _L, _K, _D = 2, 49, 12, 16
CPU = torch.device("cpu")


def _x(dtype=torch.float32, B=_B, L=_L, D=_D):
    return torch.randn(B, L, D).to(dtype)


def _ids(B=_B, K=_K, L=_L):
    return torch.stack([torch.randperm(L)[:K] for _ in range(B)])


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _restore(B=_B, L=_L):
    return torch.stack([torch.argsort(torch.randperm(L)) for _ in range(B)])


def _xv(dtype=torch.float32, B=_B, rows=_K):
    return torch.randn(B, rows, _D).to(dtype)


def _meta(t):
    return t.to("meta")


def _loss(pred=None, imgs=None, mask=None, ids=None, p=4, reduction="mean"):
    ref_pred, ref_imgs, ref_mask = _loss_inputs(2, 3, 16, 16, 4, torch.float32, "cpu", 0.5)
    pred = ref_pred if pred is None else pred
    imgs = ref_imgs if imgs is None else imgs
    mask = ref_mask if mask is None else mask
    return ops.csrc_masked_patch_mse(pred, imgs, mask, ids, p, True, 1e-6, reduction, True)


def _pred(*shape):  # (2, 16, 48) by default: imgs (2, 3, 16, 16) with p = 4
    return torch.randn(*(shape or (2, 16, 48)))


def _varlen(cu, total, batch=2, device=CPU):
    return ops.csrc_random_masking_varlen(torch.tensor(1), cu, batch, _L, total, device)


BAD_INPUT_CASES = {
    # gather_visible
    "gather/ids_keep too large": (lambda: ops.csrc_gather_visible(_x(), _with(_ids(), (1, 3), 49), None, None),
                                  r"ids_keep\[1, 3\] = 49 is out of range \[0, 49\)"),
    "gather/ids_keep negative": (lambda: ops.csrc_gather_visible(_x(), _with(_ids(), (1, 3), -1), None, None),
                                 r"ids_keep\[1, 3\] = -1 is out of range"),
    "gather/ids_keep dtype": (lambda: ops.csrc_gather_visible(_x(), _ids().float(), None, None),
                              "ids_keep must be int64 or int32, got Float"),
    "gather/ids_keep 1-D": (lambda: ops.csrc_gather_visible(_x(), _ids()[0], None, None),
                            "ids_keep must be 2-D"),
    "gather/ids_keep batch": (lambda: ops.csrc_gather_visible(_x(), _ids(B=3), None, None),
                              r"ids_keep must have shape \(2, N\), got \[3, 12\]"),
    "gather/ids_keep non-contiguous": (lambda: ops.csrc_gather_visible(_x(), _ids(B=_K, K=_B).t(), None, None),
                                       "ids_keep must be contiguous"),
    "gather/ids_keep too many columns": (
        lambda: ops.csrc_gather_visible(_x(), torch.randint(0, _L, (_B, _L + 1)), None, None),
        "ids_keep has 50 columns but x has only 49 patches"),
    "gather/ids_keep device": (lambda: ops.csrc_gather_visible(_x(), _meta(_ids()), None, None),
                               "x and ids_keep must be on the same device, got cpu and meta"),
    "gather/x dtype": (lambda: ops.csrc_gather_visible(_x(torch.float64), _ids(), None, None),
                       "x must be float32, bfloat16 or float16, got Double"),
    "gather/x non-contiguous": (lambda: ops.csrc_gather_visible(_x(L=_B, B=_L).transpose(0, 1), _ids(), None, None),
                                "x must be contiguous"),
    "gather/x 2-D": (lambda: ops.csrc_gather_visible(_x()[0], _ids(), None, None), "x must be 3-D"),
    "gather/dtypes promote to float64": (
        lambda: ops.csrc_gather_visible(_x(), _ids(), torch.randn(_L, _D, dtype=torch.float64), None),
        "the inputs promote to Double"),
    "gather/pos_embed dtype": (  # bf16 tokens + fp16 pos_embed promote to fp32, which pos_embed is not
        lambda: ops.csrc_gather_visible(_x(torch.bfloat16), _ids(), torch.randn(_L, _D).half(), None),
        "pos_embed must have the result dtype Float, got Half"),
    "gather/pos_embed shape": (lambda: ops.csrc_gather_visible(_x(), _ids(), torch.randn(48, _D), None),
                               r"pos_embed must have shape \(L, D\) or \(L \+ 1, D\)"),
    "gather/pos_embed 3-D batch": (lambda: ops.csrc_gather_visible(_x(), _ids(), torch.randn(2, _L, _D), None),
                                   r"pos_embed must have shape .* got \[2, 49, 16\]"),
    "gather/pos_embed non-contiguous": (lambda: ops.csrc_gather_visible(_x(), _ids(), torch.randn(_D, _L).t(), None),
                                        "pos_embed must be contiguous"),
    "gather/pos_embed device": (lambda: ops.csrc_gather_visible(_x(), _ids(), _meta(torch.randn(_L, _D)), None),
                                "pos_embed and the tokens must be on the same device"),
    "gather/cls_token shape": (lambda: ops.csrc_gather_visible(_x(), _ids(), None, torch.randn(_D - 1)),
                               r"cls_token must have 16 elements \(D,\), got shape \[15\]"),
    "gather/cls_token dtype": (  # pos_embed fp32 makes the result fp32; cls_token stayed bf16
        lambda: ops.csrc_gather_visible(_x(torch.bfloat16), _ids(), torch.randn(_L, _D),
                                        torch.randn(_D).bfloat16()),
        "cls_token must have the result dtype Float, got BFloat16"),
    "gather/cls_token non-contiguous": (lambda: ops.csrc_gather_visible(_x(), _ids(), None, torch.randn(2 * _D)[::2]),
                                        "cls_token must be contiguous"),
    "gather/cls_token device": (lambda: ops.csrc_gather_visible(_x(), _ids(), None, _meta(torch.randn(_D))),
                                "cls_token and the tokens must be on the same device"),
    # gather_visible backward
    "gather_bwd/ids_keep too large": (
        lambda: ops.csrc_gather_visible_backward(_xv(), _with(_ids(), (1, 3), 49), _L, False, True, True, False),
        r"ids_keep\[1, 3\] = 49 is out of range"),
    "gather_bwd/grad_out rows": (
        lambda: ops.csrc_gather_visible_backward(_xv(), _ids(), _L, True, True, True, False),
        r"grad_out must have K \+ has_cls = 13 rows, got 12"),
    "gather_bwd/num_patches < K": (
        lambda: ops.csrc_gather_visible_backward(_xv(), _ids(), 10, False, True, True, False),
        r"num_patches \(10\) must be >= K \(12\)"),
    "gather_bwd/grad_out dtype": (
        lambda: ops.csrc_gather_visible_backward(_xv(torch.float64), _ids(), _L, False, True, True, False),
        "grad_out must be float32, bfloat16 or float16"),
    "gather_bwd/grad_out non-contiguous": (
        lambda: ops.csrc_gather_visible_backward(torch.randn(_B, _D, _K).transpose(1, 2), _ids(), _L, False, True,
                                                 True, False),
        "grad_out must be contiguous"),
    "gather_bwd/ids_keep non-contiguous": (
        lambda: ops.csrc_gather_visible_backward(_xv(), _ids(B=_K, K=_B).t(), _L, False, True, True, False),
        "ids_keep must be contiguous"),
    "gather_bwd/ids_keep batch": (
        lambda: ops.csrc_gather_visible_backward(_xv(), _ids(B=1), _L, False, True, True, False),
        r"ids_keep must have shape \(2, N\)"),
    "gather_bwd/ids_keep device": (
        lambda: ops.csrc_gather_visible_backward(_xv(), _meta(_ids()), _L, False, True, True, False),
        "grad_out and ids_keep must be on the same device"),
    # unshuffle
    "unshuffle/ids_restore out of range": (
        lambda: ops.csrc_unshuffle(_xv(), _with(_restore(), (0, 7), 1000), torch.randn(_D), None, False),
        r"ids_restore\[0, 7\] = 1000 is out of range \[0, 49\)"),
    "unshuffle/ids_restore dtype": (
        lambda: ops.csrc_unshuffle(_xv(), _restore().to(torch.int16), torch.randn(_D), None, False),
        "ids_restore must be int64 or int32, got Short"),
    "unshuffle/ids_restore batch": (
        lambda: ops.csrc_unshuffle(_xv(), _restore(B=3), torch.randn(_D), None, False),
        r"ids_restore must have shape \(2, N\)"),
    "unshuffle/ids_restore non-contiguous": (
        lambda: ops.csrc_unshuffle(_xv(), torch.randint(0, _L, (_L, _B)).t(), torch.randn(_D), None, False),
        "ids_restore must be contiguous"),
    "unshuffle/ids_restore device": (
        lambda: ops.csrc_unshuffle(_xv(), _meta(_restore()), torch.randn(_D), None, False),
        "x_visible and ids_restore must be on the same device"),
    "unshuffle/x_visible dtype": (
        lambda: ops.csrc_unshuffle(_xv(torch.float64), _restore(), torch.randn(_D).double(), None, False),
        "x_visible must be float32, bfloat16 or float16, got Double"),
    "unshuffle/x_visible non-contiguous": (
        lambda: ops.csrc_unshuffle(torch.randn(_B, _D, _K).transpose(1, 2), _restore(), torch.randn(_D), None,
                                   False),
        "x_visible must be contiguous"),
    "unshuffle/x_visible rows": (
        lambda: ops.csrc_unshuffle(_xv(rows=_L + 1), _restore(), torch.randn(_D), None, False),
        r"x_visible must have K \+ has_cls rows with 0 <= K <= L = 49, got 50 rows"),
    "unshuffle/x_visible no cls row": (
        lambda: ops.csrc_unshuffle(_xv(rows=0), _restore(), torch.randn(_D), None, True),
        r"x_visible must have K \+ has_cls rows .* got 0 rows"),
    "unshuffle/mask_token shape": (
        lambda: ops.csrc_unshuffle(_xv(), _restore(), torch.randn(_D - 1), None, False),
        "mask_token must have 16 elements"),
    "unshuffle/mask_token dtype": (
        lambda: ops.csrc_unshuffle(_xv(torch.bfloat16), _restore(), torch.randn(_D).half(), None, False),
        "mask_token must have the result dtype Float, got Half"),
    "unshuffle/mask_token non-contiguous": (
        lambda: ops.csrc_unshuffle(_xv(), _restore(), torch.randn(2 * _D)[::2], None, False),
        "mask_token must be contiguous"),
    "unshuffle/mask_token device": (
        lambda: ops.csrc_unshuffle(_xv(), _restore(), _meta(torch.randn(_D)), None, False),
        "mask_token and the tokens must be on the same device"),
    "unshuffle/pos_embed dtype": (
        lambda: ops.csrc_unshuffle(_xv(), _restore(), torch.randn(_D), torch.randn(_L, _D).bfloat16(), False),
        "pos_embed must have the result dtype Float, got BFloat16"),
    "unshuffle/pos_embed shape": (
        lambda: ops.csrc_unshuffle(_xv(), _restore(), torch.randn(_D), torch.randn(_L + 2, _D), False),
        r"pos_embed must have shape \(L, D\) or \(L \+ 1, D\)"),
    "unshuffle/pos_embed device": (
        lambda: ops.csrc_unshuffle(_xv(), _restore(), torch.randn(_D), _meta(torch.randn(_L, _D)), False),
        "pos_embed and the tokens must be on the same device"),
    # unshuffle backward
    "unshuffle_bwd/ids_restore out of range": (
        lambda: ops.csrc_unshuffle_backward(_xv(rows=_L), _with(_restore(), (0, 7), 1000), _K, False, True, True,
                                            True),
        r"ids_restore\[0, 7\] = 1000 is out of range"),
    "unshuffle_bwd/num_visible": (
        lambda: ops.csrc_unshuffle_backward(_xv(rows=_L), _restore(), _L + 1, False, True, True, True),
        r"num_visible must be in \[0, 49\], got 50"),
    "unshuffle_bwd/grad_out rows": (
        lambda: ops.csrc_unshuffle_backward(_xv(rows=_L), _restore(), _K, True, True, True, True),
        r"grad_out must have L \+ has_cls = 50 rows, got 49"),
    "unshuffle_bwd/grad_out dtype": (
        lambda: ops.csrc_unshuffle_backward(_xv(torch.float64, rows=_L), _restore(), _K, False, True, True, True),
        "grad_out must be float32, bfloat16 or float16"),
    "unshuffle_bwd/ids_restore device": (
        lambda: ops.csrc_unshuffle_backward(_xv(rows=_L), _meta(_restore()), _K, False, True, True, True),
        "grad_out and ids_restore must be on the same device"),
    # masked_patch_mse
    "loss/patch_size divisibility": (lambda: _loss(p=5), "not divisible by patch_size 5"),
    "loss/patch_size < 1": (lambda: _loss(p=0), "patch_size must be >= 1, got 0"),
    "loss/reduction": (lambda: _loss(reduction="max"), "reduction must be 'mean', 'sum' or 'none', got 'max'"),
    "loss/pred shape": (lambda: _loss(pred=_pred(2, 15, 48)), r"pred must have shape \(2, 16, 48\)"),
    "loss/pred dtype": (lambda: _loss(pred=_pred().double()), "pred must be float32, bfloat16 or float16"),
    "loss/pred non-contiguous": (lambda: _loss(pred=torch.randn(2, 48, 16).transpose(1, 2)),
                                 "pred must be contiguous"),
    "loss/imgs dtype": (lambda: _loss(imgs=torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)),
                        "imgs must be float32, bfloat16 or float16, got Byte"),
    "loss/imgs non-contiguous": (lambda: _loss(imgs=torch.randn(2, 3, 16, 16).transpose(2, 3)),
                                 "imgs must be contiguous"),
    "loss/imgs 3-D": (lambda: _loss(imgs=torch.randn(3, 16, 16)), r"imgs must be 4-D \(B, C, H, W\)"),
    "loss/imgs empty": (lambda: _loss(imgs=torch.randn(2, 0, 16, 16)),
                        r"imgs must have C, H and W >= 1 \(only the batch may be empty\), got shape \[2, 0, 16, 16\]"),
    "loss/imgs device": (lambda: _loss(imgs=_meta(torch.randn(2, 3, 16, 16))),
                         "pred and imgs must be on the same device"),
    "loss/mask shape": (lambda: _loss(mask=torch.ones(2, 3)), r"mask must have shape \(2, 16\)"),
    "loss/mask dtype": (lambda: _loss(mask=torch.ones(2, 16, dtype=torch.int64)),
                        "mask must be a float or bool tensor, got Long"),
    "loss/mask device": (lambda: _loss(mask=_meta(torch.ones(2, 16))), "mask and pred must be on the same device"),
    "loss/ids_masked out of range": (
        lambda: _loss(pred=_pred(2, 3, 48), ids=torch.full((2, 3), 16)),
        r"ids_masked\[0, 0\] = 16 is out of range \[0, 16\)"),
    "loss/packed ids_masked out of range": (
        lambda: _loss(pred=_pred(4, 48), ids=torch.tensor([0, 5, 32, 7])),
        r"ids_masked\[2\] = 32 is out of range \[0, B \* L = 32\)"),
    # Values that wrap to a valid patch if narrowed to 32 bits, and a negative one: checked as int64.
    "loss/ids_masked 2**40": (lambda: _loss(pred=_pred(2, 3, 48), ids=torch.tensor([[1, 2**40, 3], [0, 1, 2]])),
                              r"ids_masked\[0, 1\] = 1099511627776 is out of range \[0, 16\)"),
    "loss/packed ids_masked 2**32 + 3": (lambda: _loss(pred=_pred(4, 48), ids=torch.tensor([0, 5, 7, 2**32 + 3])),
                                         r"ids_masked\[3\] = 4294967299 is out of range \[0, B \* L = 32\)"),
    "loss/ids_masked negative": (
        lambda: _loss(pred=_pred(2, 3, 48), ids=torch.tensor([[1, 2, 3], [0, -1, 2]], dtype=torch.int32)),
        r"ids_masked\[1, 1\] = -1 is out of range \[0, 16\)"),
    "loss/ids_masked dtype": (lambda: _loss(pred=_pred(2, 3, 48), ids=torch.zeros(2, 3)),
                              "ids_masked must be int64 or int32, got Float"),
    "loss/ids_masked non-contiguous": (lambda: _loss(pred=_pred(2, 3, 48), ids=torch.zeros(3, 2).long().t()),
                                       "ids_masked must be contiguous"),
    "loss/ids_masked device": (lambda: _loss(pred=_pred(2, 3, 48), ids=_meta(torch.zeros(2, 3).long())),
                               "ids_masked and pred must be on the same device"),
    "loss/ids_masked selected layout shape": (
        lambda: _loss(pred=_pred(2, 4, 48), ids=torch.zeros(2, 3).long()),
        r"with ids_masked \(B, K\) = \[2, 3\], pred must have shape \(2, K, 48\)"),
    "loss/ids_masked packed layout shape": (
        lambda: _loss(pred=_pred(5, 48), ids=torch.zeros(6).long()),
        r"with packed ids_masked \(T,\), pred must have shape \(T, 48\)"),
    # masked_patch_mse backward
    "loss_bwd/grad_pred empty": (lambda: ops.csrc_masked_patch_mse_backward(torch.empty(0), torch.tensor(1.0)),
                                 "grad_pred is empty"),
    "loss_bwd/grad_pred dtype": (lambda: ops.csrc_masked_patch_mse_backward(_pred().double(), torch.tensor(1.0)),
                                 "grad_pred must be float32, bfloat16 or float16"),
    "loss_bwd/grad_pred non-contiguous": (
        lambda: ops.csrc_masked_patch_mse_backward(torch.randn(2, 48, 16).transpose(1, 2), torch.tensor(1.0)),
        "grad_pred must be contiguous"),
    "loss_bwd/grad_output shape": (lambda: ops.csrc_masked_patch_mse_backward(_pred(), torch.ones(3)),
                                   r"grad_output must be a scalar or have shape \[2, 16\]"),
    "loss_bwd/grad_output device": (lambda: ops.csrc_masked_patch_mse_backward(_pred(), _meta(torch.tensor(1.0))),
                                    "grad_output and grad_pred must be on the same device"),
    # random masking
    "masking/num_keep": (lambda: ops.csrc_random_masking(torch.tensor(1), 2, _L, _L + 1, CPU),
                         r"num_keep must be in \[0, num_patches=49\], got 50"),
    "masking/batch": (lambda: ops.csrc_random_masking(torch.tensor(1), -1, _L, 5, CPU), "batch must be >= 0, got -1"),
    "masking/num_patches": (lambda: ops.csrc_random_permutation(torch.tensor(1), 2, 0, CPU),
                            r"num_patches must be in \[1, 2\*\*31\), got 0"),
    "masking/seed dtype": (lambda: ops.csrc_random_masking(torch.tensor(1.0), 2, _L, 5, CPU),
                           "seed must be an int64 tensor with one element, got Float"),
    "masking/seed numel": (lambda: ops.csrc_random_permutation(torch.tensor([1, 2]), 2, _L, CPU),
                           r"seed must be an int64 tensor with one element, got Long of shape \[2\]"),
    "masking/offset dtype": (
        lambda: ops.csrc_random_masking(torch.tensor(1), 2, _L, 5, CPU, offset=torch.tensor(1, dtype=torch.int32)),
        "csrc_random_masking: offset must be an int64 tensor with one element, got Int"),
    "masking/offset numel": (
        lambda: ops.csrc_random_permutation(torch.tensor(1), 2, _L, CPU, offset=torch.tensor([1, 2])),
        r"csrc_random_permutation: offset must be an int64 tensor with one element, got Long of shape \[2\]"),
    "masking/offset negative": (
        lambda: ops.csrc_random_permutation(torch.tensor(1), 2, _L, CPU, offset=torch.tensor(-4)),
        r"offset must be in \[0, 2\*\*63\), got -4"),
    "varlen/offset negative": (
        lambda: ops.csrc_random_masking_varlen(torch.tensor(1), torch.tensor([0, 3, 10]), 2, _L, 10, CPU,
                                               offset=torch.tensor(-(2**63))),
        r"csrc_random_masking_varlen: offset must be in \[0, 2\*\*63\), got -9223372036854775808"),
    "masking/no kernel for device": (lambda: ops.csrc_random_permutation(torch.tensor(1), 2, _L, torch.device("meta")),
                                     "no kernel for device meta"),
    "varlen/cu_seqlens[0] != 0": (lambda: _varlen(torch.tensor([1, 3, 10]), 10),
                                  r"cu_seqlens\[0\] must be 0, got 1"),
    "varlen/cu_seqlens decreasing": (
        lambda: _varlen(torch.tensor([0, 10, 5]), 5),
        r"keep count of sample 1 \(cu_seqlens\[2\] - cu_seqlens\[1\] = -5\) is out of range \[0, 49\]"),
    "varlen/count > L": (
        lambda: _varlen(torch.tensor([0, 3, 60], dtype=torch.int32), 60),
        r"keep count of sample 1 \(cu_seqlens\[2\] - cu_seqlens\[1\] = 57\) is out of range \[0, 49\]"),
    "varlen/last != total": (lambda: _varlen(torch.tensor([0, 3, 10]), 12),
                             r"total must equal cu_seqlens\[-1\] = 10, got 12"),
    "varlen/total > B * L": (lambda: _varlen(torch.tensor([0, 49, 99]), 99), r"total must be in \[0, B \* L\], got 99"),
    "varlen/cu_seqlens dtype": (lambda: _varlen(torch.tensor([0.0, 3.0, 10.0]), 10),
                                "cu_seqlens must be int64 or int32, got Float"),
    "varlen/cu_seqlens shape": (lambda: _varlen(torch.tensor([0, 3, 10, 12]), 12),
                                r"cu_seqlens must have shape \(3,\), got \[4\]"),
    "varlen/cu_seqlens device": (lambda: _varlen(torch.tensor([0, 3, 10]), 10, device=torch.device("meta")),
                                 "cu_seqlens must be on meta, got cpu"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT_CASES))
def test_bad_input_raises_clear_error(case):
    call, message = BAD_INPUT_CASES[case]
    with pytest.raises(RuntimeError, match=message):
        call()


# On CUDA cu_seqlens is checked by the kernel (no host sync): a bad one trips a device-side
# assert, which leaves the CUDA context unusable, so each case runs in its own process.
CUDA_BAD_CU_SEQLENS = {"cu_seqlens[0] != 0": ([1, 3, 10], 10), "decreasing": ([0, 10, 5], 5),
                       "count > L": ([0, 3, 60], 60), "last != total": ([0, 3, 10], 12)}


@pytest.mark.parametrize("case", list(CUDA_BAD_CU_SEQLENS))
def test_cuda_varlen_bad_cu_seqlens_trips_device_assert(ext, case):
    if not (torch.cuda.is_available() and ext.has_cuda()):
        pytest.skip("needs a GPU and the CUDA kernels")
    cu, total = CUDA_BAD_CU_SEQLENS[case]
    script = (
        "import torch\n"
        "from fastmim.ops import _csrc\n"
        "assert _csrc.load_error() is None, _csrc.load_error()\n"
        f"cu = torch.tensor({cu}, device='cuda')\n"
        f"torch.ops.fastmim.csrc_random_masking_varlen(torch.tensor(1), cu, 2, 49, {total}, torch.device('cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    proc = run_until_stalled([sys.executable, "-c", script])
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "inconsistent cu_seqlens" in output or "device-side assert" in output, output


def test_meta_kernels_accept_meta_inputs_under_the_device_checks():
    # The same-device checks of the Meta kernels must not reject an all-meta call (torch.compile).
    B, L, K, D = 2, 49, 12, 16
    m = {"device": "meta"}
    ids = torch.empty(B, K, dtype=torch.int64, **m)
    gx, gpos, gcls = ops.csrc_gather_visible_backward(torch.empty(B, K + 1, D, **m), ids, L, True, True, True, True)
    assert (gx.shape, gpos.shape, gcls.shape) == ((B, L, D), (L, D), (D,))
    ids_restore = torch.empty(B, L, dtype=torch.int64, **m)
    gx, gmask, gpos = ops.csrc_unshuffle_backward(torch.empty(B, L + 1, D, **m), ids_restore, K, True, True, True,
                                                  True)
    assert (gx.shape, gmask.shape, gpos.shape) == ((B, K + 1, D), (D,), (L + 1, D))
    pred = torch.empty(B, L, 48, **m)
    loss, grad = ops.csrc_masked_patch_mse(pred, torch.empty(B, 3, 28, 28, **m), torch.empty(B, L, **m), None, 4,
                                           True, 1e-6, "none", True)
    assert loss.shape == (B, L) and grad.shape == pred.shape
    ops.csrc_masked_patch_mse_backward(grad, torch.empty((), **m))


# ------------------------------------------------------------------------------ the public ops on csrc


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_token_ops_on_csrc_match_reference(dtype):
    from fastmim.ops import use_backend

    B, L, D = 2, 49, 24

    def run(backend):
        torch.manual_seed(1)
        x = torch.randn(B, L, D).to(dtype).requires_grad_()
        pos = torch.randn(1, L + 1, D).requires_grad_()  # fp32: the result promotes to fp32
        cls = torch.randn(1, 1, D).to(dtype).requires_grad_()
        mask_token = torch.randn(1, 1, D).to(dtype).requires_grad_()
        with use_backend(backend):
            m = masking.random_masking(B, L, 0.75, seed=11)
            visible = gather.gather_visible(x, m.ids_keep, pos, cls_token=cls)
            full = gather.unshuffle(visible, m.ids_restore, mask_token, pos, has_cls=True)
            (full * torch.linspace(-1, 1, full.numel()).reshape(full.shape)).sum().backward()
        return [m.ids_keep, m.ids_restore, m.mask, visible, full, x.grad, pos.grad, cls.grad, mask_token.grad]

    for got, ref in zip(run("csrc"), run("reference"), strict=True):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        if not got.dtype.is_floating_point:
            assert torch.equal(got, ref)
        else:
            assert_rel_close(got, ref, dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_public_loss_on_csrc_matches_reference(reduction):
    from fastmim.ops import use_backend

    pred, imgs, mask = _loss_inputs(2, 3, 16, 24, 4, torch.bfloat16, "cpu", 0.75)
    grads = []
    for backend in ("csrc", "reference"):
        p = pred.clone().requires_grad_()
        with use_backend(backend):
            loss = loss_ops.masked_patch_mse(p, imgs, mask, patch_size=4, reduction=reduction)
            loss.backward(torch.ones_like(loss) * 0.5)
        grads.append((loss.detach(), p.grad))
    assert_rel_close(grads[0][0], grads[1][0], torch.float32, tol=2e-5, name="loss")
    assert_rel_close(grads[0][1], grads[1][1], torch.bfloat16, name="grad_pred")
