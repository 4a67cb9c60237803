"""masked_patch_mse: Triton kernels and the op against the official MAE forward_loss."""

import contextlib

import pytest
import torch

from fastmim.ops import masked_patch_mse, masked_patch_mse_reference, patchify, unpatchify, use_backend
from fastmim.ops._dispatch import backend_status
from fastmim.testing import TOLERANCES, assert_rel_close, count_calls, kernel_devices, poison_allocations, rel_error

DEVICES = kernel_devices()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, C, H, W, p): every patch size the issue names, one and three channels, non-square
# images, batch 1, and patch lengths p*p*C that are not powers of two (12, 48, 588, 768).
GEOMETRIES = [
    (2, 3, 8, 8, 2),
    (1, 3, 16, 16, 4),
    (2, 1, 16, 24, 8),
    (2, 3, 28, 42, 14),
    (2, 3, 32, 32, 16),
    (3, 3, 32, 48, 4),
]


def official_forward_loss(imgs, pred, mask, p, norm_pix_loss):
    """facebookresearch/mae models_mae.py, patchify + forward_loss, verbatim but for self."""
    assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum("nchpwq->nhwpqc", x)
    target = x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss


def random_masking_ids(batch, num_patches, num_masked, device="cpu"):
    """MAE's random masking: ids_shuffle, and mask with 1 on the removed patches."""
    ids_shuffle = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    ids_masked = ids_shuffle[:, num_patches - num_masked:]
    mask = torch.zeros(batch, num_patches, device=device)
    mask.scatter_(1, ids_masked, 1.0)
    return ids_masked, mask


def make_inputs(batch, channels, height, width, p, dtype, device, mask_ratio=0.75):
    num_patches = (height // p) * (width // p)
    imgs = torch.randn(batch, channels, height, width, device=device).to(dtype)
    pred = torch.randn(batch, num_patches, p * p * channels, device=device).to(dtype)
    ids_masked, mask = random_masking_ids(batch, num_patches, int(num_patches * mask_ratio), device)
    return pred, imgs, mask, ids_masked


def reference_loss_and_grad(pred, imgs, mask, grad_output=None, **kwargs):
    """The reference in float64 on the same input values, and its autograd gradient."""
    pred64 = pred.detach().double().requires_grad_(True)
    mask64 = None if mask is None else mask.double()
    loss = masked_patch_mse_reference(pred64, imgs.double(), mask64, **kwargs)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, pred64, go)
    return loss.detach(), grad


@contextlib.contextmanager
def _kernel_calls(backend):
    """Counts the Triton launchers' calls; their outputs (allocated by the launcher) are NaN-poisoned."""
    if backend != "triton":
        yield {"forward": 0, "backward": 0}
        return
    from fastmim.kernels import loss as kernels

    with poison_allocations(kernels), \
            count_calls(kernels, {"forward": "masked_patch_mse_forward",
                                  "backward": "masked_patch_mse_scale_grad_"}) as calls:
        yield calls


def run_op(pred, imgs, mask, grad_output=None, backend="triton", **kwargs):
    """Forward and backward on ``backend``: the backward op picks its backend when autograd calls it, so
    both run inside the block (on "triton" the kernels' launches are asserted)."""
    pred = pred.detach().clone().requires_grad_(True)
    with use_backend(backend), _kernel_calls(backend) as calls:
        loss = masked_patch_mse(pred, imgs, mask, **kwargs)
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    if backend == "triton":
        assert calls == {"forward": 1, "backward": 1}, f"the Triton kernels did not run forward and backward: {calls}"
    return loss.detach(), pred.grad


# --------------------------------------------------------------------------------------------
# patchify / unpatchify and the reference
# --------------------------------------------------------------------------------------------


def test_patchify_layout_is_row_column_channel_on_a_non_square_image():
    imgs = torch.randn(2, 3, 8, 12)
    p = 4
    x = patchify(imgs, p)
    assert x.shape == (2, 6, 48)
    for b in range(2):
        for patch in range(6):
            top, left = (patch // 3) * p, (patch % 3) * p
            expected = imgs[b, :, top:top + p, left:left + p].permute(1, 2, 0).reshape(-1)
            assert torch.equal(x[b, patch], expected)
    assert torch.equal(unpatchify(x, p, 3, 8, 12), imgs)


def test_unpatchify_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match=r"x must have shape \(B, 6, 48\)"):
        unpatchify(torch.randn(2, 5, 48), 4, 3, 8, 12)
    with pytest.raises(ValueError, match="divisible by patch_size=4"):
        unpatchify(torch.randn(2, 6, 48), 4, 3, 8, 10)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reference_is_the_official_forward_loss(norm_pix):
    pred, imgs, mask, _ = make_inputs(2, 3, 32, 32, 8, torch.float32, "cpu")
    ours = masked_patch_mse_reference(pred, imgs, mask, patch_size=8, norm_pix=norm_pix)
    official = official_forward_loss(imgs, pred, mask, 8, norm_pix)
    assert torch.equal(ours, official)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("selected", [False, True])
def test_reference_gradcheck_float64(norm_pix, selected):
    pred, imgs, mask, ids_masked = make_inputs(2, 2, 8, 12, 2, torch.float64, "cpu", mask_ratio=0.5)
    imgs.requires_grad_(True)
    if selected:
        pred = pred.gather(1, ids_masked[..., None].expand(-1, -1, pred.shape[-1]))
    pred.requires_grad_(True)
    kwargs = dict(patch_size=2, norm_pix=norm_pix, ids_masked=ids_masked if selected else None)
    fn = lambda pred, imgs: masked_patch_mse_reference(pred, imgs, mask, **kwargs)
    assert torch.autograd.gradcheck(fn, (pred, imgs))


def test_reference_all_visible_is_zero_with_zero_gradient():
    pred, imgs, mask, _ = make_inputs(2, 3, 8, 8, 2, torch.float32, "cpu", mask_ratio=0.0)
    assert mask.sum() == 0
    pred.requires_grad_(True)
    loss = masked_patch_mse_reference(pred, imgs, mask, patch_size=2)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


# --------------------------------------------------------------------------------------------
# Triton kernels against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "B{}C{}_{}x{}_p{}".format(*g))
@pytest.mark.parametrize("norm_pix", [True, False])
def test_triton_matches_reference(device, dtype, geometry, norm_pix):
    batch, channels, height, width, p = geometry
    pred, imgs, mask, _ = make_inputs(batch, channels, height, width, p, dtype, device)
    kwargs = dict(patch_size=p, norm_pix=norm_pix)
    grad_output = torch.tensor(3.0, device=device)  # not 1, so backward really scales
    loss, grad = run_op(pred, imgs, mask, grad_output, **kwargs)
    ref_loss, ref_grad = reference_loss_and_grad(pred, imgs, mask, grad_output, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == pred.shape
    # Same input values, fp32 statistics and sums: the loss is as exact as an fp32 computation.
    assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    assert_rel_close(grad, ref_grad, dtype, name="grad_pred")
    assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))  # visible rows written, as 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_ratio", [0.0, 0.75, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_mask_ratios_and_reductions(device, mask_ratio, reduction):
    pred, imgs, mask, _ = make_inputs(2, 3, 28, 28, 4, torch.float32, device, mask_ratio=mask_ratio)
    kwargs = dict(patch_size=4, reduction=reduction)
    # "mean" takes grad_output = 1 (the scaling kernel's no-op branch), "sum" another scalar, "none" one per row.
    grad_output = {"mean": None, "sum": torch.tensor(-0.37, device=device),
                   "none": torch.randn(2, 49, device=device)}[reduction]
    loss, grad = run_op(pred, imgs, mask, grad_output, **kwargs)
    ref_loss, ref_grad = reference_loss_and_grad(pred, imgs, mask, grad_output, **kwargs)
    assert loss.shape == ref_loss.shape
    assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    assert_rel_close(grad, ref_grad, torch.float32, name="grad_pred")
    if mask_ratio == 0.0:
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_constant_patches_are_finite(device, dtype):
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 16, 4, dtype, device, mask_ratio=1.0)
    # Patch values k/4 sum exactly in every dtype: the centred patch is exactly 0 on both sides.
    exact = (torch.randint(-8, 8, (2, 3, 4, 4), device=device) / 4).to(dtype)
    imgs[:, :, :8] = exact.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)[:, :, :8]
    imgs[:, :, 8:, :8] = 0.3  # constant, but its mean is not exact in fp32
    loss, grad = run_op(pred, imgs, mask, patch_size=4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad = reference_loss_and_grad(pred, imgs, mask, patch_size=4)
    assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    # A constant patch's target is the mean's rounding error times 1/sqrt(eps) = 1000, in the
    # official fp32 code too: on the 0.3 patches fp32 and fp64 differ by about 1e-4.
    assert_rel_close(grad, ref_grad, dtype, tol=max(TOLERANCES[dtype], 1e-3), name="grad_pred")
    exact_rows = slice(0, 8)  # the patches of the first two patch rows
    assert_rel_close(grad[:, exact_rows], ref_grad[:, exact_rows], dtype, name="grad_pred (exact patches)")


def _loss_with_normalisation(imgs, pred, mask, p, normalise):
    """The official loss with another patch normalisation ``normalise(target, mean, var_unbiased)``."""
    target = patchify(imgs, p)
    target = normalise(target, target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True))
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("backend, dtype", [("triton", torch.float32), ("triton", torch.bfloat16),
                                            ("reference", torch.float32), ("csrc", torch.float32)], ids=str)
def test_eps_inside_the_square_root_and_unbiased_variance(backend, dtype):
    """Patches with variance of the order of eps: target = (t - mean) / sqrt(var + eps) with the unbiased
    variance, as the official code; the near misses (sqrt(var) + eps, the biased variance) are far off."""
    if backend == "triton" and not DEVICES:
        pytest.skip("no device runs the Triton kernels here")
    if backend == "csrc" and backend_status("cpu")["csrc"] is not None:
        pytest.skip(f"csrc backend unavailable: {backend_status('cpu')['csrc']}")
    device = DEVICES[0] if backend == "triton" else "cpu"
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 16, 4, torch.float32, device)
    pred, imgs = pred.to(dtype), (imgs * 1e-3).to(dtype)  # var ~ 1e-6 = eps
    pred64 = pred.double().requires_grad_(True)
    official = official_forward_loss(imgs.double(), pred64, mask.double(), 4, norm_pix_loss=True)
    (official_grad,) = torch.autograd.grad(official, pred64)
    loss, grad = run_op(pred, imgs, mask, backend=backend, patch_size=4)
    assert_rel_close(loss, official, torch.float32, name="loss")
    assert_rel_close(grad, official_grad, dtype, name="grad_pred")
    eps = 1e-6
    near_misses = {
        "sqrt(var) + eps": lambda t, mean, var: (t - mean) / (var.sqrt() + eps),
        "biased variance": lambda t, mean, var: (t - mean) / (var * (47 / 48) + eps).sqrt(),
    }
    for name, normalise in near_misses.items():
        other = _loss_with_normalisation(imgs.double(), pred.double(), mask.double(), 4, normalise)
        assert rel_error(other, official) > 100 * TOLERANCES[torch.float32], name


@pytest.mark.skipif("cpu" not in DEVICES, reason="an out-of-range index is a device-side assert on CUDA")
@pytest.mark.parametrize("layout", ["selected", "packed"])
def test_out_of_range_ids_masked_behaves_as_documented(layout):
    """Not checked on the host: "mean" with a mask gathers the weights and raises; otherwise the Triton
    kernel reads nothing for the row and gives it weight 0."""
    pred, imgs, mask, ids_masked = make_inputs(2, 3, 16, 16, 4, torch.float32, "cpu")  # L = 16, K = 12
    pred = pred[:, :12].contiguous()
    if layout == "packed":  # flat indices b * L + l, in [0, B * L)
        pred, ids_masked = pred.reshape(-1, 48), (ids_masked + torch.tensor([[0], [16]])).reshape(-1)
    bad = ids_masked.clone()
    bad.view(-1)[0] = mask.numel() if layout == "packed" else mask.shape[1]
    with use_backend("triton"), pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        masked_patch_mse(pred, imgs, mask, patch_size=4, ids_masked=bad)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        masked_patch_mse_reference(pred, imgs, mask, patch_size=4, ids_masked=bad)
    loss, grad = run_op(pred, imgs, mask, patch_size=4, ids_masked=bad, reduction="none")
    clean_loss, clean_grad = run_op(pred, imgs, mask, patch_size=4, ids_masked=ids_masked, reduction="none")
    first = (0, 0) if layout == "selected" else (0,)
    assert loss[first] == 0 and torch.count_nonzero(grad[first]) == 0 and clean_loss[first] > 0
    rest = torch.ones_like(loss, dtype=torch.bool)
    rest[first] = False
    assert torch.equal(loss[rest], clean_loss[rest]) and torch.equal(grad[rest], clean_grad[rest])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_masked_only_and_packed_layouts_equal_the_full_layout(device, reduction, with_mask):
    batch, p = 3, 4
    pred, imgs, mask, ids_masked = make_inputs(batch, 3, 20, 28, p, torch.float32, device)  # L = 35
    n = pred.shape[-1]
    if reduction == "none":  # one factor per row, the same for a patch in every layout
        go_full = torch.randn(mask.shape, device=device)
        go_sel = go_full.gather(1, ids_masked)
        go_packed = torch.empty(2 * go_sel.numel(), device=device)[::2]  # a strided grad_output
        go_packed.copy_(go_sel.reshape(-1))
    else:
        go_full = go_sel = go_packed = torch.tensor(1.7, device=device)
    full_loss, full_grad = run_op(pred, imgs, mask, go_full, patch_size=p, reduction=reduction)
    pred_masked = pred.gather(1, ids_masked[..., None].expand(-1, -1, n))
    kwargs = dict(patch_size=p, reduction=reduction, ids_masked=ids_masked)
    sel_loss, sel_grad = run_op(pred_masked, imgs, mask if with_mask else None, go_sel, **kwargs)
    num_patches = mask.shape[1]
    flat_ids = (ids_masked + torch.arange(batch, device=device)[:, None] * num_patches).reshape(-1)
    kwargs["ids_masked"] = flat_ids
    packed_loss, packed_grad = run_op(pred_masked.reshape(-1, n), imgs, mask if with_mask else None, go_packed,
                                      **kwargs)
    full_grad_masked = full_grad.gather(1, ids_masked[..., None].expand(-1, -1, n))
    if reduction == "none":
        full_loss = full_loss.gather(1, ids_masked)
    assert sel_loss.shape == full_loss.shape and packed_loss.shape == full_loss.reshape(-1).shape[:sel_loss.dim()]
    assert_rel_close(sel_loss, full_loss, torch.float32, name="masked-only loss")
    assert_rel_close(packed_loss.reshape(sel_loss.shape), full_loss, torch.float32, name="packed loss")
    assert_rel_close(sel_grad, full_grad_masked, torch.float32, name="masked-only grad")
    assert_rel_close(packed_grad.reshape(sel_grad.shape), full_grad_masked, torch.float32, name="packed grad")
    ref_loss, ref_grad = reference_loss_and_grad(pred_masked, imgs, mask if with_mask else None, go_sel,
                                                 patch_size=p, reduction=reduction, ids_masked=ids_masked)
    assert_rel_close(sel_loss, ref_loss, torch.float32, name="masked-only loss vs reference")
    assert_rel_close(sel_grad, ref_grad, torch.float32, name="masked-only grad vs reference")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_are_read_in_place(device):
    batch, p = 2, 4
    _, imgs, mask, ids_masked = make_inputs(batch, 3, 16, 24, p, torch.bfloat16, device)  # L = 24
    decoder_out = torch.randn(batch, 25, 48, device=device, dtype=torch.bfloat16)
    pred = decoder_out[:, 1:]  # drop cls: not contiguous
    imgs = imgs.to(memory_format=torch.channels_last)
    mask = mask.t().contiguous().t()  # column-major (B, L)
    loss, grad = run_op(pred, imgs, mask, patch_size=p)
    ref_loss, ref_grad = reference_loss_and_grad(pred, imgs, mask, patch_size=p)
    assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    assert_rel_close(grad, ref_grad, torch.bfloat16, name="grad_pred")
    kwargs = dict(patch_size=p, ids_masked=ids_masked.int())
    pred_masked = pred.gather(1, ids_masked[..., None].expand(-1, -1, 48))
    sel_loss, _ = run_op(pred_masked, imgs, mask.bool(), **kwargs)
    assert_rel_close(sel_loss, ref_loss, torch.float32, name="int32 ids, bool mask")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_dtypes_and_no_grad(device, dtype):
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 16, 8, dtype, device)
    imgs = imgs.float()  # bf16 decoder output against fp32 images, as under autocast
    with use_backend("triton"):
        loss = masked_patch_mse(pred, imgs, mask, patch_size=8)
        with torch.no_grad():
            loss_no_grad = masked_patch_mse(pred.requires_grad_(True), imgs, mask, patch_size=8)
    ref_loss, _ = reference_loss_and_grad(pred, imgs, mask, patch_size=8)
    assert not loss.requires_grad and not loss_no_grad.requires_grad
    assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    assert_rel_close(loss_no_grad, ref_loss, torch.float32, name="loss under no_grad")


@pytest.mark.parametrize("device", DEVICES)
def test_triton_does_not_read_rows_of_weight_zero(device):
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 16, 4, torch.float32, device)
    clean_loss, clean_grad = run_op(pred, imgs, mask, patch_size=4)
    pred[mask == 0] = float("nan")  # documented: visible rows are not read, so NaN there is ignored
    loss, grad = run_op(pred, imgs, mask, patch_size=4)
    assert torch.equal(loss, clean_loss) and torch.equal(grad, clean_grad)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_second_backward_through_the_same_node_raises(backend):
    if backend == "triton" and not DEVICES:
        pytest.skip("no device runs the Triton kernels here")
    device = DEVICES[0] if backend == "triton" else "cpu"
    pred, imgs, mask, _ = make_inputs(2, 3, 8, 8, 2, torch.float32, device)
    pred.requires_grad_(True)
    with use_backend(backend):
        loss = masked_patch_mse(pred, imgs, mask, patch_size=2)
        loss.backward(retain_graph=True)
        # The saved gradient was scaled in place: autograd refuses to reuse it rather than give a wrong result.
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# --------------------------------------------------------------------------------------------
# The op on the reference backend, compile, validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_backend_closed_form_gradient(dtype, reduction):
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 24, 4, dtype, "cpu")
    grad_output = torch.tensor(0.5) if reduction == "mean" else torch.randn(2, 24)
    loss, grad = run_op(pred, imgs, mask, grad_output.to(pred.dtype if dtype == torch.float64 else torch.float32),
                        backend="reference", patch_size=4, reduction=reduction)
    ref_loss, ref_grad = reference_loss_and_grad(pred, imgs, mask, grad_output, patch_size=4, reduction=reduction)
    tol = TOLERANCES[torch.float64] if dtype == torch.float64 else TOLERANCES[torch.float32]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel_close(loss, ref_loss, tol=tol, name="loss")
    assert_rel_close(grad, ref_grad, dtype, name="grad_pred")


def test_compile_fullgraph():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 48)

        def forward(self, tokens, imgs, mask):
            pred = self.proj(tokens)
            return masked_patch_mse(pred, imgs, mask, patch_size=4)

    model = Head()
    tokens = torch.randn(2, 16, 16)
    _, imgs, mask, _ = make_inputs(2, 3, 16, 16, 4, torch.float32, "cpu")
    eager = model(tokens, imgs, mask)
    eager.backward()
    eager_grad = model.proj.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(tokens, imgs, mask)
    out.backward()
    assert_rel_close(out, eager, torch.float32, name="compiled loss")
    assert_rel_close(model.proj.weight.grad, eager_grad, torch.float32, name="compiled weight grad")


def _bad(**overrides):
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 16, 4, torch.float32, "cpu")
    args = dict(pred=pred, imgs=imgs, mask=mask, patch_size=4)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, match", [
    (dict(imgs=torch.randn(2, 3, 16, 18)), ValueError, r"divisible by patch_size=4, got 16x18"),
    (dict(imgs=torch.randn(2, 16, 16)), ValueError, r"imgs must have shape \(B, C, H, W\)"),
    (dict(pred=torch.randn(2, 15, 48)), ValueError, r"pred must have shape \(B, L, p\*p\*C\) = \(2, 16, 48\)"),
    (dict(pred=torch.randn(2, 16, 47)), ValueError, r"= \(2, 16, 48\).*got \(2, 16, 47\)"),
    (dict(pred=torch.randn(2, 48, 16).transpose(1, 2)), ValueError, "last dimension must be contiguous"),
    (dict(pred=torch.randint(0, 3, (2, 16, 48))), TypeError, "pred must be float16, bfloat16, float32 or float64"),
    (dict(mask=None), ValueError, r"mask \(B, L\) is required"),
    (dict(mask=torch.ones(2, 15)), ValueError, r"mask must have shape \(B, L\) = \(2, 16\), got \(2, 15\)"),
    (dict(mask=torch.ones(2, 16, dtype=torch.int64)), TypeError, "mask must be a float or bool tensor"),
    (dict(imgs=torch.randn(2, 3, 16, 16, device="meta")), ValueError, "imgs is on meta, expected pred's device cpu"),
    (dict(imgs=torch.randn(2, 3, 16, 16, requires_grad=True)), ValueError, r"pass imgs.detach\(\)"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(eps=-1.0), ValueError, "eps must be a float >= 0"),
    (dict(patch_size=0), ValueError, "patch_size must be a positive int"),
    (dict(pred=torch.randn(2, 16, 1), imgs=torch.randn(2, 1, 4, 4), mask=torch.ones(2, 16), patch_size=1),
     ValueError, "norm_pix needs at least 2 values per patch"),
    (dict(pred=torch.randn(2, 12, 48), ids_masked=torch.zeros(2, 12)), TypeError, "ids_masked must be int64 or int32"),
    (dict(pred=torch.randn(2, 12, 48), ids_masked=torch.zeros(2, 11, dtype=torch.long)), ValueError,
     r"ids_masked must have shape \(B, K\) = \(2, 12\)"),
    (dict(pred=torch.randn(2, 17, 48), ids_masked=torch.zeros(2, 17, dtype=torch.long)), ValueError,
     "more than L=16 patches"),
    (dict(pred=torch.randn(24, 48), ids_masked=torch.zeros(23, dtype=torch.long)), ValueError,
     r"ids_masked must have shape \(T,\) = \(24,\)"),
])
def test_bad_inputs(overrides, error, match):
    args = _bad(**overrides)
    with pytest.raises(error, match=match):
        masked_patch_mse(args.pop("pred"), args.pop("imgs"), args.pop("mask"), **args)
