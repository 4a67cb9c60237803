"""The compiled ops (``csrc/``, ``torch.ops.fastmim.csrc_*``) against the references.

The extension is built just-in-time when needed (cached across runs, so only the first run pays
a minute or two); the tests skip only when no C++ compiler is present. On CPU they run the C++
kernels; with a GPU and a CUDA build, the ``cuda``-marked tests run the CUDA kernels too.
Indexing results must equal the references bit for bit; sums within the dtype's tolerance.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fastmim.ops import loss as loss_ops
from fastmim.ops import token_ops
from fastmim.testing import assert_rel_close

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
    ref_shuffle, ref_restore = token_ops.random_permutation_reference(batch, num_patches, seed=seed)
    assert torch.equal(ids_shuffle.cpu(), ref_shuffle)
    assert torch.equal(ids_restore.cpu(), ref_restore)


@pytest.mark.parametrize("num_keep", [0, 12, 48, 49])
def test_random_masking_matches_reference(device, num_keep):
    seed_t = torch.tensor(987654321, dtype=torch.int64, device=device)  # a seed on the device works too
    ids_keep, ids_restore, mask = ops.csrc_random_masking(seed_t, 3, 49, num_keep, torch.device(device))
    ref = token_ops.random_masking_reference(3, 49, num_keep=num_keep, seed=987654321)
    assert torch.equal(ids_keep.cpu(), ref.ids_keep)
    assert torch.equal(ids_restore.cpu(), ref.ids_restore)
    assert mask.dtype == torch.float32 and torch.equal(mask.cpu(), ref.mask)


def test_random_masking_varlen_matches_reference(device):
    counts = [5, 0, 49, 17]
    ref = token_ops.random_masking_reference(4, 49, num_keep=counts, seed=77)
    cu = ref.cu_seqlens.to(device)
    ids_keep, ids_restore, mask = ops.csrc_random_masking_varlen(
        torch.tensor(77), cu, 4, 49, sum(counts), torch.device(device))
    assert torch.equal(ids_keep.cpu(), ref.ids_keep)
    assert torch.equal(ids_restore.cpu(), ref.ids_restore)
    assert torch.equal(mask.cpu(), ref.mask)


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
    ref = token_ops.gather_visible_reference(x, ids_keep, pos, cls_token=cls)
    assert out.dtype == ref.dtype and torch.equal(out, ref)  # pure indexing + one add: bit-exact

    grad_out = torch.randn_like(ref)
    grad_x, grad_pos, grad_cls = ops.csrc_gather_visible_backward(grad_out, ids_keep, L, with_cls, True, True, True)
    ref_x, ref_pos, ref_cls = token_ops._gather_visible_backward_reference(grad_out, ids_keep, None, L, with_cls)
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
    ref = token_ops.gather_visible_reference(x, ids_keep, pos, cls_token=cls)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    grad_out = torch.randn_like(ref)
    grad_x, grad_pos, _ = ops.csrc_gather_visible_backward(grad_out, ids32, L, True, True, True, False)
    ref_x, ref_pos, _ = token_ops._gather_visible_backward_reference(grad_out, ids_keep, None, L, True)
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
    ref = token_ops.unshuffle_reference(x_visible, ids_restore, mask_token, pos, has_cls=with_cls)
    assert out.dtype == ref.dtype and torch.equal(out, ref)

    grad_out = torch.randn_like(ref)
    grad_x, grad_mask, grad_pos = ops.csrc_unshuffle_backward(grad_out, ids_restore, K, with_cls, True, True, True)
    ref_x, ref_mask, ref_pos = token_ops._unshuffle_backward_reference(grad_out, ids_restore, None, K + hc,
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
    ref = token_ops.unshuffle_reference(x_visible, ids_restore, mask_token, pos, has_cls=True)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


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


def test_bad_input_raises_clear_errors():
    x = torch.randn(2, 49, 16)
    ids = torch.stack([torch.randperm(49)[:12] for _ in range(2)])
    bad_ids = ids.clone()
    bad_ids[1, 3] = 49
    with pytest.raises(RuntimeError, match=r"ids_keep\[1, 3\] = 49 is out of range"):
        ops.csrc_gather_visible(x, bad_ids, None, None)
    negative = ids.clone()
    negative[1, 3] = -1
    with pytest.raises(RuntimeError, match=r"ids_keep\[1, 3\] = -1 is out of range"):
        ops.csrc_gather_visible(x, negative, None, None)
    with pytest.raises(RuntimeError, match="ids_keep must be int64 or int32"):
        ops.csrc_gather_visible(x, ids.float(), None, None)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ops.csrc_gather_visible(x.transpose(0, 1), ids, None, None)
    with pytest.raises(RuntimeError, match="pos_embed must have shape"):
        ops.csrc_gather_visible(x, ids, torch.randn(48, 16), None)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        ops.csrc_gather_visible(x.double(), ids, None, None)
    with pytest.raises(RuntimeError, match=r"ids_keep\[1, 3\] = 49 is out of range"):
        ops.csrc_gather_visible_backward(torch.randn(2, 12, 16), bad_ids, 49, False, True, True, False)
    with pytest.raises(RuntimeError, match="grad_out must have K \\+ has_cls = 13 rows"):
        ops.csrc_gather_visible_backward(torch.randn(2, 12, 16), ids, 49, True, True, True, False)

    ids_restore = torch.stack([torch.argsort(torch.randperm(49)) for _ in range(2)])
    bad_restore = ids_restore.clone()
    bad_restore[0, 7] = 1000
    xv = torch.randn(2, 12, 16)
    with pytest.raises(RuntimeError, match=r"ids_restore\[0, 7\] = 1000 is out of range"):
        ops.csrc_unshuffle(xv, bad_restore, torch.randn(16), None, False)
    with pytest.raises(RuntimeError, match="mask_token must have 16 elements"):
        ops.csrc_unshuffle(xv, ids_restore, torch.randn(15), None, False)
    with pytest.raises(RuntimeError, match=r"ids_restore\[0, 7\] = 1000 is out of range"):
        ops.csrc_unshuffle_backward(torch.randn(2, 49, 16), bad_restore, 12, False, True, True, True)
    with pytest.raises(RuntimeError, match="num_visible must be in"):
        ops.csrc_unshuffle_backward(torch.randn(2, 49, 16), ids_restore, 50, False, True, True, True)

    pred, imgs, mask = _loss_inputs(2, 3, 16, 16, 4, torch.float32, "cpu", 0.5)
    with pytest.raises(RuntimeError, match="not divisible by patch_size 5"):
        ops.csrc_masked_patch_mse(pred, imgs, mask, None, 5, True, 1e-6, "mean", True)
    with pytest.raises(RuntimeError, match=r"pred must have shape \(2, 16, 48\)"):
        ops.csrc_masked_patch_mse(pred[:, :15].contiguous(), imgs, mask, None, 4, True, 1e-6, "mean", True)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        ops.csrc_masked_patch_mse(pred, imgs, mask[:, :3], None, 4, True, 1e-6, "mean", True)
    with pytest.raises(RuntimeError, match="reduction must be"):
        ops.csrc_masked_patch_mse(pred, imgs, mask, None, 4, True, 1e-6, "max", True)
    ids_masked = torch.full((2, 3), 16, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"ids_masked\[0, 0\] = 16 is out of range"):
        ops.csrc_masked_patch_mse(pred[:, :3].contiguous(), imgs, mask, ids_masked, 4, True, 1e-6, "mean", True)
    with pytest.raises(RuntimeError, match="grad_pred is empty"):
        ops.csrc_masked_patch_mse_backward(torch.empty(0), torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="grad_output must be a scalar or have shape"):
        ops.csrc_masked_patch_mse_backward(pred.clone(), torch.ones(3))

    with pytest.raises(RuntimeError, match="num_keep must be in"):
        ops.csrc_random_masking(torch.tensor(1), 2, 49, 50, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor"):
        ops.csrc_random_masking(torch.tensor(1.0), 2, 49, 5, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="keep count of sample 1"):
        ops.csrc_random_masking_varlen(torch.tensor(1), torch.tensor([0, 3, 60]), 2, 49, 60, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="no kernel for device meta"):
        ops.csrc_random_permutation(torch.tensor(1), 2, 49, torch.device("meta"))



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
            m = token_ops.random_masking(B, L, 0.75, seed=11)
            visible = token_ops.gather_visible(x, m.ids_keep, pos, cls_token=cls)
            full = token_ops.unshuffle(visible, m.ids_restore, mask_token, pos, has_cls=True)
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
