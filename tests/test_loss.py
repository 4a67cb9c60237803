"""masked_patch_mse: Triton kernels and the op against the official MAE forward_loss; index safety and
edge cases (bad ids and weights, empty batches, nothing masked) the same on every backend, with property
tests over tiny shapes."""

import contextlib
import itertools
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmim import testing
from fastmim.ops import (
    check_indices,
    masked_patch_mse,
    masked_patch_mse_reference,
    patchify,
    unpatchify,
    use_backend,
)
from fastmim.ops._dispatch import backend_status

DEVICES = testing.kernel_devices()

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

    with testing.poison_allocations(kernels), \
            testing.count_calls(kernels, {"forward": "masked_patch_mse_forward",
                                  "backward": "masked_patch_mse_scale_grad_"}) as calls:
        yield calls


def run_op(pred, imgs, mask, grad_output=None, backend="triton", **kwargs):
    """Forward and backward on ``backend``: the backward op picks its backend when autograd calls it, so
    both run inside the block (on "triton" the kernels' launches are asserted)."""
    pred = pred.detach().clone().requires_grad_(True)
    with use_backend(backend), _kernel_calls(backend) as calls:
        loss = masked_patch_mse(pred, imgs, mask, **kwargs)
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    if backend == "triton":  # with no rows (B, K or T = 0) there is no gradient to scale
        expected = {"forward": 1, "backward": 1 if pred.numel() else 0}
        assert calls == expected, f"the Triton kernels did not run forward and backward: {calls}"
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
    ours = masked_patch_mse_reference(pred, imgs, mask, patch_size=8, norm_pix_loss=norm_pix)
    official = official_forward_loss(imgs, pred, mask, 8, norm_pix)
    assert torch.equal(ours, official)
    for loss in (masked_patch_mse, masked_patch_mse_reference):  # the former keyword: the same loss, a warning
        with pytest.warns(DeprecationWarning, match="norm_pix_loss"):
            assert torch.equal(loss(pred, imgs, mask, patch_size=8, norm_pix=norm_pix),
                               loss(pred, imgs, mask, patch_size=8, norm_pix_loss=norm_pix))


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("selected", [False, True])
def test_reference_gradcheck_float64(norm_pix, selected):
    pred, imgs, mask, ids_masked = make_inputs(2, 2, 8, 12, 2, torch.float64, "cpu", mask_ratio=0.5)
    imgs.requires_grad_(True)
    if selected:
        pred = pred.gather(1, ids_masked[..., None].expand(-1, -1, pred.shape[-1]))
    pred.requires_grad_(True)
    kwargs = dict(patch_size=2, norm_pix_loss=norm_pix, ids_masked=ids_masked if selected else None)
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
@pytest.mark.parametrize("dtype", testing.KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "B{}C{}_{}x{}_p{}".format(*g))
@pytest.mark.parametrize("norm_pix", [True, False])
def test_triton_matches_reference(device, dtype, geometry, norm_pix):
    batch, channels, height, width, p = geometry
    pred, imgs, mask, _ = make_inputs(batch, channels, height, width, p, dtype, device)
    kwargs = dict(patch_size=p, norm_pix_loss=norm_pix)
    grad_output = torch.tensor(3.0, device=device)  # not 1, so backward really scales
    loss, grad = run_op(pred, imgs, mask, grad_output, **kwargs)
    ref_loss, ref_grad = reference_loss_and_grad(pred, imgs, mask, grad_output, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == pred.shape
    # Same input values, fp32 statistics and sums: the loss is as exact as an fp32 computation.
    testing.assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    testing.assert_rel_close(grad, ref_grad, dtype, name="grad_pred")
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
    testing.assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    testing.assert_rel_close(grad, ref_grad, torch.float32, name="grad_pred")
    if mask_ratio == 0.0:
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", testing.KERNEL_DTYPES, ids=str)
def test_triton_constant_patches_are_finite(device, dtype):
    pred, imgs, mask, _ = make_inputs(2, 3, 16, 16, 4, dtype, device, mask_ratio=1.0)
    # Patch values k/4 sum exactly in every dtype: the centred patch is exactly 0 on both sides.
    exact = (torch.randint(-8, 8, (2, 3, 4, 4), device=device) / 4).to(dtype)
    imgs[:, :, :8] = exact.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)[:, :, :8]
    imgs[:, :, 8:, :8] = 0.3  # constant, but its mean is not exact in fp32
    loss, grad = run_op(pred, imgs, mask, patch_size=4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad = reference_loss_and_grad(pred, imgs, mask, patch_size=4)
    testing.assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    # A constant patch's target is the mean's rounding error times 1/sqrt(eps) = 1000, in the
    # official fp32 code too: on the 0.3 patches fp32 and fp64 differ by about 1e-4.
    testing.assert_rel_close(grad, ref_grad, dtype, tol=max(testing.TOLERANCES[dtype], 1e-3), name="grad_pred")
    exact_rows = slice(0, 8)  # the patches of the first two patch rows
    testing.assert_rel_close(grad[:, exact_rows], ref_grad[:, exact_rows], dtype, name="grad_pred (exact patches)")


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
    testing.assert_rel_close(loss, official, torch.float32, name="loss")
    testing.assert_rel_close(grad, official_grad, dtype, name="grad_pred")
    eps = 1e-6
    near_misses = {
        "sqrt(var) + eps": lambda t, mean, var: (t - mean) / (var.sqrt() + eps),
        "biased variance": lambda t, mean, var: (t - mean) / (var * (47 / 48) + eps).sqrt(),
    }
    for name, normalise in near_misses.items():
        other = _loss_with_normalisation(imgs.double(), pred.double(), mask.double(), 4, normalise)
        assert testing.rel_error(other, official) > 100 * testing.TOLERANCES[torch.float32], name


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
    testing.assert_rel_close(sel_loss, full_loss, torch.float32, name="masked-only loss")
    testing.assert_rel_close(packed_loss.reshape(sel_loss.shape), full_loss, torch.float32, name="packed loss")
    testing.assert_rel_close(sel_grad, full_grad_masked, torch.float32, name="masked-only grad")
    testing.assert_rel_close(packed_grad.reshape(sel_grad.shape), full_grad_masked, torch.float32, name="packed grad")
    ref_loss, ref_grad = reference_loss_and_grad(pred_masked, imgs, mask if with_mask else None, go_sel,
                                                 patch_size=p, reduction=reduction, ids_masked=ids_masked)
    testing.assert_rel_close(sel_loss, ref_loss, torch.float32, name="masked-only loss vs reference")
    testing.assert_rel_close(sel_grad, ref_grad, torch.float32, name="masked-only grad vs reference")


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
    testing.assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    testing.assert_rel_close(grad, ref_grad, torch.bfloat16, name="grad_pred")
    kwargs = dict(patch_size=p, ids_masked=ids_masked.int())
    pred_masked = pred.gather(1, ids_masked[..., None].expand(-1, -1, 48))
    sel_loss, _ = run_op(pred_masked, imgs, mask.bool(), **kwargs)
    testing.assert_rel_close(sel_loss, ref_loss, torch.float32, name="int32 ids, bool mask")


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
    testing.assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    testing.assert_rel_close(loss_no_grad, ref_loss, torch.float32, name="loss under no_grad")


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
    tol = testing.TOLERANCES[torch.float64] if dtype == torch.float64 else testing.TOLERANCES[torch.float32]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    testing.assert_rel_close(loss, ref_loss, tol=tol, name="loss")
    testing.assert_rel_close(grad, ref_grad, dtype, name="grad_pred")


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
    testing.assert_rel_close(out, eager, torch.float32, name="compiled loss")
    testing.assert_rel_close(model.proj.weight.grad, eager_grad, torch.float32, name="compiled weight grad")


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
     ValueError, "norm_pix_loss needs at least 2 values per patch"),
    (dict(pred=torch.randn(2, 12, 48), ids_masked=torch.zeros(2, 12)), TypeError, "ids_masked must be int64 or int32"),
    (dict(pred=torch.randn(2, 12, 48), ids_masked=torch.zeros(2, 11, dtype=torch.long)), ValueError,
     r"ids_masked must have shape \(B, K\) = \(2, 12\)"),
    (dict(pred=torch.randn(2, 17, 48), ids_masked=torch.zeros(2, 17, dtype=torch.long)), ValueError,
     "more than L=16 patches"),
    (dict(pred=torch.randn(24, 48), ids_masked=torch.zeros(23, dtype=torch.long)), ValueError,
     r"ids_masked must have shape \(T,\) = \(24,\)"),
    (dict(imgs=torch.randn(2, 0, 16, 16)), ValueError, r"imgs must have C, H and W >= 1 .*got \(2, 0, 16, 16\)"),
    (dict(mask=torch.ones(2, 16).index_fill(1, torch.tensor([3]), -1.0)), ValueError,
     r"masked_patch_mse: mask\[0, 3\] = -1.0 is not a finite weight >= 0"),
    (dict(mask=torch.ones(2, 16, dtype=torch.float64).index_put((torch.tensor([1]), torch.tensor([5])),
                                                                torch.tensor(float("nan"), dtype=torch.float64))),
     ValueError, r"mask\[1, 5\] = nan is not a finite weight"),
    (dict(mask=torch.zeros(2, 16).index_fill(0, torch.tensor([1]), float("inf"))), ValueError,
     r"mask\[1, 0\] = inf is not a finite weight"),
])
def test_bad_inputs(overrides, error, match):
    args = _bad(**overrides)
    with pytest.raises(error, match=match):
        masked_patch_mse(args.pop("pred"), args.pop("imgs"), args.pop("mask"), **args)


# --------------------------------------------------------------------------------------------
# Index safety and edge cases: the same behaviour on every backend
# --------------------------------------------------------------------------------------------

BACKENDS = ["reference", "triton", "csrc"]


def _backend_device(backend):
    """The device ``backend`` runs on in these tests; skips when it cannot run here."""
    if backend == "triton":
        if not DEVICES:
            pytest.skip("no device runs the Triton kernels here")
        return DEVICES[0]
    if backend == "csrc" and backend_status("cpu")["csrc"] is not None:
        pytest.skip(f"csrc backend unavailable: {backend_status('cpu')['csrc']}")
    return "cpu"


def _runnable_backends():
    """The backends that run on CPU tensors here (the host checks are tested on each)."""
    status = backend_status("cpu")
    return [backend for backend in BACKENDS if status[backend] is None]


def _layout_inputs(layout, batch, num_masked, device, dtype=torch.float32, channels=3, p=4, grid=(2, 2)):
    """``(pred, imgs, mask, ids_masked)`` in ``layout`` ("full", "selected" or "packed") with ``num_masked``
    masked patches per sample (``L = grid[0] * grid[1]``)."""
    num_patches, n = grid[0] * grid[1], p * p * channels
    imgs = torch.randn(batch, channels, grid[0] * p, grid[1] * p, device=device).to(dtype)
    ids_masked, mask = random_masking_ids(batch, num_patches, num_masked, device)
    if layout == "full":
        return torch.randn(batch, num_patches, n, device=device).to(dtype), imgs, mask, None
    if layout == "packed":
        ids_masked = (ids_masked + torch.arange(batch, device=device)[:, None] * num_patches).reshape(-1)
    return torch.randn(*ids_masked.shape, n, device=device).to(dtype), imgs, mask, ids_masked


# L = 16 (selected) and B * L = 32 (packed): 2**32 + 3 and 2**40 wrap to valid patches in int32.
_BAD_IDS = {"selected": [16, -1, 2**32 + 3, 2**40, -(2**40)], "packed": [32, -1, 2**32 + 3, 2**40, -(2**40)]}


@pytest.mark.parametrize("layout", ["selected", "packed"])
@pytest.mark.parametrize("bad", range(5))
def test_out_of_range_ids_masked_raise_the_same_value_error_on_every_backend(layout, bad):
    """The issue's case (an id of 2**40 read a real patch on Triton) and its neighbours: rejected on the host
    before dispatch, with one message naming the argument, the position and the range."""
    pred, imgs, mask, ids_masked = _layout_inputs(layout, 2, 12, "cpu", grid=(4, 4))
    value, limit = _BAD_IDS[layout][bad], 16 if layout == "selected" else 32
    position = (1, 5) if layout == "selected" else (17,)
    ids_masked[position] = value
    expected = (rf"masked_patch_mse: ids_masked\[{', '.join(map(str, position))}\] = {value} "
                rf"is outside the valid range \[0, {limit}\)")
    for backend in _runnable_backends():
        for with_mask in (True, False):
            with use_backend(backend), pytest.raises(ValueError, match=expected):
                masked_patch_mse(pred, imgs, mask if with_mask else None, patch_size=4, ids_masked=ids_masked)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["full", "selected", "packed"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_batch_gives_loss_zero_and_an_empty_gradient(backend, layout, reduction):
    device = _backend_device(backend)
    pred, imgs, mask, ids_masked = _layout_inputs(layout, 0, 3, device)
    assert pred.shape[0] == 0
    loss, grad = run_op(pred, imgs, mask, backend=backend, patch_size=4, reduction=reduction,
                        ids_masked=ids_masked)
    assert loss.dtype == torch.float32 and grad.shape == pred.shape
    if reduction == "none":
        assert loss.shape == pred.shape[:-1]
    else:
        assert loss.shape == () and loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout, with_mask", [("full", True), ("selected", True), ("packed", True),
                                               ("selected", False), ("packed", False)])
def test_nothing_masked_gives_loss_zero_and_zero_gradients(backend, layout, with_mask):
    """mask_ratio = 0: an all-zero mask, or no rows at all (K = T = 0) with ids_masked. The official code
    returns 0 / 0 = NaN; every backend returns 0 and a zero gradient."""
    device = _backend_device(backend)
    if with_mask:  # the rows' weights are all zero: K = 3 rows for the selected layouts
        pred, imgs, _, ids_masked = _layout_inputs(layout, 2, 3, device)
        mask = torch.zeros(2, 4, device=device)
    else:
        pred, imgs, mask, ids_masked = _layout_inputs(layout, 2, 0, device)
        mask = None
        assert pred.shape[-2 if layout == "selected" else 0] == 0
    for reduction in ("mean", "sum"):
        loss, grad = run_op(pred, imgs, mask, backend=backend, patch_size=4, reduction=reduction,
                            ids_masked=ids_masked)
        assert loss.item() == 0.0 and grad.shape == pred.shape and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("pred_masked_only", [False, True])
def test_fused_and_unfused_models_give_loss_zero_when_nothing_is_masked(pred_masked_only):
    from fastmim.models import MaskedAutoencoderViT

    config = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                  decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True, pred_masked_only=pred_masked_only)
    unfused = MaskedAutoencoderViT(**config, fused=False)
    fused = MaskedAutoencoderViT(**config, fused=True)
    fused.load_state_dict(unfused.state_dict())
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    for model in (unfused, fused):
        loss, _, mask = model(imgs, 0.0, noise=noise)
        loss.backward()
        assert mask.sum() == 0 and loss.item() == 0.0, f"fused={model.fused}: loss {loss.item()}"
        for name, param in model.named_parameters():
            assert param.grad is None or torch.count_nonzero(param.grad) == 0, f"fused={model.fused}: {name}"


@pytest.mark.parametrize("device", DEVICES)
def test_scale_grad_launcher_checks_the_shapes_it_indexes_with(device):
    from fastmim.kernels import loss as kernels

    grad = torch.ones(2, 3, 4, device=device)
    with pytest.raises(ValueError, match=r"grad_output must be a scalar or have grad_pred's row shape \(2, 3\)"):
        kernels.masked_patch_mse_scale_grad_(grad, torch.ones(7, device=device))
    with pytest.raises(ValueError, match=r"row shape \(2, 3\), got \(6,\)"):
        kernels.masked_patch_mse_scale_grad_(grad, torch.ones(6, device=device))
    with pytest.raises(ValueError, match="grad_pred must be contiguous"):
        kernels.masked_patch_mse_scale_grad_(grad.transpose(0, 1), torch.ones(3, 2, device=device))


# ---- out-of-range ids past the host check: no access outside a tensor

_GUARD = 64  # elements around each tensor of the unchecked-ids check
_SENTINEL = 1234.0


def _guarded_copy(t):
    """``t``'s values inside a larger buffer whose extra elements are NaN (int max): a kernel that reads
    outside ``t`` gets them into its result."""
    buf = testing.poison_like(torch.empty(t.numel() + 2 * _GUARD, dtype=t.dtype, device=t.device))
    inner = buf[_GUARD:_GUARD + t.numel()].view(t.shape)
    inner.copy_(t)
    return inner


class _GuardedTorch(types.SimpleNamespace):
    """``torch`` as a launcher module sees it, but ``empty`` hands out tensors inside larger buffers whose
    extra elements hold a sentinel; :meth:`check` asserts no kernel wrote over one."""

    def __init__(self):
        super().__init__(buffers=[])

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *size, dtype=None, device=None):
        shape = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)
        buf = torch.full((shape.numel() + 2 * _GUARD,), _SENTINEL, dtype=dtype, device=device)
        self.buffers.append(buf)
        return buf[_GUARD:_GUARD + shape.numel()].view(shape)

    def check(self):
        for buf in self.buffers:
            guards = torch.cat([buf[:_GUARD], buf[-_GUARD:]])
            assert torch.equal(guards, torch.full_like(guards, _SENTINEL)), "a kernel wrote outside its output"


def _unchecked_ids_cases(layout, dtype):
    """Out-of-range values for ``ids_masked`` (``L = 24``, ``B * L = 48``) including those that wrap to a valid
    patch when narrowed to int32 (2**32 + 3, 2**40) or that overflow an offset computation."""
    limit = 24 if layout == "selected" else 48
    if dtype == torch.int32:
        return [-1, limit, 2**31 - 1, -(2**31)]
    return [-1, limit, 2**31, 2**32 + 3, 2**40, -(2**40), 2**63 - 1, -(2**63)]


def _check_unchecked_ids(device):
    """Out-of-range ids given straight to the registered op, past the public op's value checks: the Triton
    kernels (and the CUDA csrc kernel) give their rows loss 0, gradient 0 and no weight, the CPU csrc
    kernel raises; no kernel reads or writes outside a tensor (inputs and Triton's outputs sit between
    guard elements). Runs in its own process: a stray access could crash it."""
    from fastmim.kernels import loss as kernels
    from fastmim.ops import _csrc
    from fastmim.ops import loss as loss_ops

    op = torch.ops.fastmim.masked_patch_mse
    backward = torch.ops.fastmim.masked_patch_mse_backward
    kernel_backends = ["triton"] + (["csrc"] if device == "cuda" and _csrc.has_cuda() else [])
    torch.manual_seed(0)
    for layout in ("selected", "packed"):
        clean_pred, clean_imgs, clean_mask, clean_ids = _layout_inputs(layout, 2, 8, device, p=2, grid=(4, 6))
        pred, imgs = _guarded_copy(clean_pred), _guarded_copy(clean_imgs)
        for ids_dtype in (torch.int64, torch.int32):
            values = _unchecked_ids_cases(layout, ids_dtype)
            ids = _guarded_copy(clean_ids.to(ids_dtype))
            rows = ids.view(-1)
            bad = torch.zeros(rows.shape, dtype=torch.bool, device=device)
            bad[:2 * len(values):2] = True
            rows[bad] = torch.tensor(values, dtype=ids_dtype, device=device)
            good = ~bad.view(ids.shape)
            if device == "cpu" and _csrc.load_error() is None:
                for value in values:  # the CPU csrc kernel checks every id on the host
                    one = _guarded_copy(clean_ids.to(ids_dtype))
                    one.view(-1)[3] = value
                    with use_backend("csrc"):
                        try:
                            op(pred, imgs, clean_mask, one, 2, True, 1e-6, "none", True)
                        except RuntimeError as exc:
                            assert f"= {value} is out of range" in str(exc), exc
                        else:
                            raise AssertionError(f"csrc accepted ids_masked value {value}")
            for with_mask in (True, False):
                mask = _guarded_copy(clean_mask) if with_mask else None
                ref_rows, ref_grad = loss_ops._reference_forward(clean_pred, clean_imgs, mask, clean_ids, 2, True,
                                                                 1e-6, "none", True)
                # "mean" divides by the weights of the in-range rows, or without a mask by the number of rows.
                if not with_mask:
                    divisor = good.numel()
                elif layout == "selected":
                    divisor = clean_mask.gather(1, clean_ids)[good].sum()
                else:
                    divisor = clean_mask.view(-1)[clean_ids][good].sum()
                for backend, reduction in itertools.product(kernel_backends, ("none", "mean")):
                    where = f"{backend}, {layout}, {ids_dtype}, mask={with_mask}, {reduction}"
                    guarded = _GuardedTorch()
                    real_torch, kernels.torch = kernels.torch, guarded
                    try:
                        with use_backend(backend):
                            loss, grad = op(pred, imgs, mask, ids, 2, True, 1e-6, reduction, True)
                            grad_output = torch.rand(loss.shape, device=device) + 0.5
                            backward(grad, grad_output)
                        if device == "cuda":
                            torch.cuda.synchronize()
                    finally:
                        kernels.torch = real_torch
                    guarded.check()
                    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), where
                    expected_loss = torch.where(good, ref_rows, 0.0)
                    expected_grad = torch.where(good[..., None], ref_grad, 0.0)
                    if reduction == "none":
                        expected_grad = expected_grad * grad_output[..., None]
                    else:
                        expected_loss = expected_loss.sum() / divisor
                        expected_grad = expected_grad * grad_output / divisor
                    testing.assert_rel_close(loss, expected_loss, torch.float32, tol=2e-5, name=f"loss ({where})")
                    testing.assert_rel_close(grad, expected_grad, torch.float32, name=f"grad_pred ({where})")


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_ids_past_the_host_check_read_and_write_nothing_outside_the_tensors(device):
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_loss; "
              f"test_loss._check_unchecked_ids({device!r}); print('ok')")
    proc = testing.run_until_stalled([sys.executable, "-c", script])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.mark.cuda
def test_cuda_ids_masked_are_checked_under_check_indices():
    pred, imgs, mask, ids_masked = _layout_inputs("selected", 2, 3, "cuda")
    ids_masked[1, 2] = 2**40
    with check_indices(), pytest.raises(ValueError, match=r"ids_masked\[1, 2\] = 1099511627776 is outside"):
        masked_patch_mse(pred, imgs, mask, patch_size=4, ids_masked=ids_masked)


# ---- property tests: every layout and edge case, on every backend that runs here

_PROPERTY_DTYPES = {"reference": [torch.float64, torch.float32, torch.bfloat16],
                    "triton": [torch.float32, torch.bfloat16, torch.float16],
                    "csrc": [torch.float32, torch.bfloat16, torch.float16]}


@st.composite
def _loss_cases(draw, dtypes):
    """One call of the op, as plain values: tiny patches (p = 2..4, L <= 12 with odd grids and L = 1),
    batch 1..3, mask ratios 0 and 0.95 or any count (per sample when packed, K = 0 included), soft and
    bool masks, constant patches, strided inputs."""
    grid_h = draw(st.integers(1, 4))
    grid_w = draw(st.integers(1, 12 // grid_h))
    num_patches, batch = grid_h * grid_w, draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["full", "selected", "packed"]))
    ratio = draw(st.sampled_from([0.0, 0.95, None]))
    if ratio is not None:
        counts = [round(ratio * num_patches)] * batch
    elif layout == "packed":
        counts = draw(st.lists(st.integers(0, num_patches), min_size=batch, max_size=batch))
    else:
        counts = [draw(st.integers(0, num_patches))] * batch
    return dict(
        batch=batch, channels=draw(st.sampled_from([1, 3])), p=draw(st.integers(2, 4)), grid=(grid_h, grid_w),
        layout=layout, counts=counts, dtype=draw(st.sampled_from(dtypes)), norm_pix=draw(st.booleans()),
        constant=draw(st.booleans()), strided=draw(st.booleans()),
        mask=draw(st.sampled_from(["float", "bool", "soft"] + ([] if layout == "full" else [None]))),
        ids_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])), seed=draw(st.integers(0, 2**16)),
    )


def _build_case(case, device):
    """``(pred_leaf, pred, imgs, mask, grad_output, kwargs)`` of ``case``; ``pred`` is a view of the leaf
    (with strides when ``case["strided"]``)."""
    gen = torch.Generator().manual_seed(case["seed"])
    batch, channels, p, (grid_h, grid_w) = case["batch"], case["channels"], case["p"], case["grid"]
    num_patches, n, dtype = grid_h * grid_w, p * p * channels, case["dtype"]
    imgs = torch.randn(batch, channels, grid_h * p, grid_w * p, generator=gen)
    if case["constant"]:  # every other patch constant at k/4, exact in every dtype: variance 0, the eps path
        for patch in range(0, num_patches, 2):
            top, left = (patch // grid_w) * p, (patch % grid_w) * p
            imgs[:, :, top:top + p, left:left + p] = torch.randint(-8, 8, (batch, 1, 1, 1), generator=gen) / 4
    order = torch.stack([torch.randperm(num_patches, generator=gen) for _ in range(batch)])
    mask = torch.zeros(batch, num_patches)
    for b, count in enumerate(case["counts"]):
        mask[b, order[b, :count]] = 1.0
    if case["layout"] == "selected":
        ids_masked = order[:, :case["counts"][0]]  # a column slice: strided
    elif case["layout"] == "packed":
        ids_masked = torch.cat([order[b, :count] + b * num_patches for b, count in enumerate(case["counts"])])
    else:
        ids_masked = None
    rows = (batch, num_patches) if ids_masked is None else tuple(ids_masked.shape)
    leaf = torch.randn(*rows, 2 * n if case["strided"] else n, generator=gen).to(dtype).requires_grad_(True)
    pred = leaf[..., :n]
    if case["mask"] == "soft":
        mask = mask * (torch.rand(mask.shape, generator=gen) * 1.5 + 0.5)
    elif case["mask"] == "bool":
        mask = mask.bool()
    if case["strided"]:
        imgs = torch.cat([imgs, imgs], dim=3)[..., grid_w * p:]
        mask = mask.t().contiguous().t()
        if ids_masked is not None:
            ids_masked = torch.stack([ids_masked, ids_masked], dim=-1)[..., 0]
    if ids_masked is not None:
        ids_masked = ids_masked.to(case["ids_dtype"]).to(device)
    grad_output = (torch.randn(rows, generator=gen) if case["reduction"] == "none"
                   else torch.rand((), generator=gen) + 0.5)
    kwargs = dict(patch_size=p, norm_pix_loss=case["norm_pix"], reduction=case["reduction"], ids_masked=ids_masked)
    return (leaf, pred, imgs.to(dtype).to(device), None if case["mask"] is None else mask.to(device),
            grad_output.to(device), kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.data())
def test_property_matches_the_reference(backend, data):
    """Forward and gradient against the float64 reference, on every layout and edge case above."""
    device = _backend_device(backend)
    case = data.draw(_loss_cases(_PROPERTY_DTYPES[backend]))
    leaf, pred, imgs, mask, grad_output, kwargs = _build_case(case, device)
    with use_backend(backend), _kernel_calls(backend) as calls:
        loss = masked_patch_mse(pred, imgs, mask, **kwargs)
        loss.backward(grad_output)
    assert calls["forward"] == (1 if backend == "triton" else 0)
    n = pred.shape[-1]
    grad = leaf.grad[..., :n]
    assert torch.count_nonzero(leaf.grad[..., n:]) == 0
    ref_loss, ref_grad = reference_loss_and_grad(pred, imgs, mask, grad_output, **kwargs)
    dtype = case["dtype"]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ref_loss.shape
    assert grad.dtype == dtype and torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # The loss is computed in fp32 (fp64) from the same input values, summed in another order.
    tol = testing.TOLERANCES[torch.float64] if dtype == torch.float64 else 2e-5
    testing.assert_rel_close(loss, ref_loss, tol=tol, name="loss")
    testing.assert_rel_close(grad, ref_grad, dtype, name="grad_pred")


@st.composite
def _bad_value_cases(draw):
    """A call whose ``ids_masked`` or ``mask`` holds one bad value (B = 2, L = 6)."""
    kind = draw(st.sampled_from(["selected", "packed", "mask"]))
    ids_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    info = torch.iinfo(ids_dtype)
    limit = 6 if kind == "selected" else 12
    if kind == "mask":
        value = draw(st.one_of(st.floats(max_value=-(2.0**-100), width=32),
                               st.sampled_from([float("nan"), float("inf"), float("-inf")])))
    else:
        value = draw(st.one_of(st.integers(info.min, -1), st.integers(limit, info.max)))
    return dict(kind=kind, ids_dtype=ids_dtype, value=value, position=draw(st.integers(0, 7)),
                with_mask=draw(st.booleans()))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=_bad_value_cases())
def test_property_bad_values_raise_the_same_value_error_on_every_backend(case):
    layout = "full" if case["kind"] == "mask" else case["kind"]
    pred, imgs, mask, ids_masked = _layout_inputs(layout, 2, 4, "cpu", p=2, grid=(2, 3))
    if case["kind"] == "mask":
        b, patch = divmod(case["position"] % 12, 6)
        mask[b, patch] = case["value"]  # a float32 value: printed as it is stored
        stored = re.escape(str(float(mask[b, patch])))
        expected = rf"masked_patch_mse: mask\[{b}, {patch}\] = {stored} is not a finite weight"
    else:
        ids_masked = ids_masked.to(case["ids_dtype"])
        position = divmod(case["position"], 4) if layout == "selected" else (case["position"],)
        ids_masked[position] = case["value"]
        mask = mask if case["with_mask"] else None
        limit = 6 if layout == "selected" else 12
        expected = (rf"masked_patch_mse: ids_masked\[{', '.join(map(str, position))}\] = {case['value']} "
                    rf"is outside the valid range \[0, {limit}\)")
    messages = {}
    for backend in _runnable_backends():
        with use_backend(backend), pytest.raises(ValueError, match=expected) as error:
            masked_patch_mse(pred, imgs, mask, patch_size=2, ids_masked=ids_masked)
        messages[backend] = str(error.value)
    assert len(set(messages.values())) == 1, messages
