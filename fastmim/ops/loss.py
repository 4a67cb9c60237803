"""MAE's reconstruction loss as one fused op: :func:`masked_patch_mse`.

The official ``forward_loss`` (facebookresearch/mae, ``models_mae.py``) patchifies the image
into a copy, normalises every patch into another copy (``norm_pix_loss``), builds the
element-wise squared error, averages it per patch and weights it by the mask, then does as
much again in backward. :func:`masked_patch_mse` reads the image in place by index math and
computes the loss and the gradient with respect to ``pred`` in one pass; backward only scales
that saved gradient by ``grad_output``.

Also here: :func:`patchify` / :func:`unpatchify` (the official ``nchpwq -> nhwpqc`` layout,
non-square images allowed) and :func:`masked_patch_mse_reference`, the plain-PyTorch
definition of the op's result.

Registered ops (for ``torch.compile`` and for other backends to implement):

- ``fastmim::masked_patch_mse(Tensor pred, Tensor imgs, Tensor? mask, Tensor? ids_masked,
  int patch_size, bool norm_pix_loss, float eps, str reduction, bool compute_grad)
  -> (Tensor loss, Tensor grad_pred)``: ``grad_pred`` is the gradient of ``loss`` (summed
  over rows for ``"none"``) with respect to ``pred``, contiguous, dtype of ``pred``; an empty
  tensor when ``compute_grad`` is false. Inputs already validated, ``mask`` a float tensor,
  but not necessarily the values of ``ids_masked`` (accelerator tensors): the Triton and CUDA
  kernels give an out-of-range id a row that reads no patch (loss 0, gradient 0, no weight);
  the CPU csrc kernel, where reading them is free, raises. ``B``, ``K`` or ``T`` may be 0.
- ``fastmim::masked_patch_mse_backward(Tensor(a!) grad_pred, Tensor grad_output) -> ()``:
  multiplies the saved ``grad_pred`` in place by ``grad_output`` (a scalar, or one factor
  per row for ``"none"``); with a scalar 1 it may leave it untouched.
"""

from __future__ import annotations

import warnings

import torch

from fastmim.ops._dispatch import select_backend
from fastmim.ops._validate import check_image_geometry, validate_masked_patch_mse

__all__ = ["masked_patch_mse", "masked_patch_mse_reference", "patchify", "unpatchify"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Backends of the op; the compiled csrc kernel (fastmim._C) is the CPU default where
# benchmarks/bench_loss.py measured it at least as fast as the reference.
_BACKENDS = ("reference", "triton", "csrc")
_CPU_DEFAULT = ("csrc",)


# --------------------------------------------------------------------------------------------
# References (the spec)
# --------------------------------------------------------------------------------------------


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``imgs (B, C, H, W) -> (B, L, p*p*C)``, ``L = (H/p) * (W/p)``, patches in raster order.

    Within a patch the order is row, column, channel (the official ``nchpwq -> nhwpqc``).
    """
    check_image_geometry(imgs, patch_size, "imgs")
    batch, channels, height, width = imgs.shape
    p = patch_size
    h, w = height // p, width // p
    x = imgs.reshape(batch, channels, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, h * w, p * p * channels)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``x (B, L, p*p*C) -> (B, C, H, W)``."""
    p = patch_size
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if height % p or width % p:
        raise ValueError(f"height and width must be divisible by patch_size={p}, got {height}x{width}")
    h, w = height // p, width // p
    expected = (h * w, p * p * channels)
    if x.dim() != 3 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"x must have shape (B, {expected[0]}, {expected[1]}) for a {channels}x{height}x{width} "
                         f"image and patch_size={p}, got {tuple(x.shape)}")
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def _loss_dtype(pred: torch.Tensor, imgs: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(pred.dtype, imgs.dtype), torch.float32)


def _target_rows(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss, eps):
    """The target of each row of ``pred`` (official patchify and norm_pix_loss) and its weight."""
    compute_dtype = _loss_dtype(pred, imgs)
    target = patchify(imgs, patch_size).to(compute_dtype)           # (B, L, N)
    if norm_pix_loss and target.numel():  # an empty batch has nothing to normalise (torch.var warns on it)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)                        # unbiased (N - 1)
        target = (target - mean) / (var + eps) ** 0.5
    weight = None if mask is None else mask.to(compute_dtype)
    if ids_masked is not None and pred.dim() == 3:                    # pred (B, K, N)
        index = ids_masked.long()
        target = target.gather(1, index[..., None].expand(-1, -1, target.shape[-1]))
        weight = None if weight is None else weight.gather(1, index)
    elif ids_masked is not None:                                      # pred (T, N), flat ids
        index = ids_masked.long()
        target = target.reshape(-1, target.shape[-1])[index]
        weight = None if weight is None else weight.reshape(-1)[index]
    if weight is None:
        weight = torch.ones(pred.shape[:-1], dtype=compute_dtype, device=pred.device)
    return target, weight


def masked_patch_mse_reference(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor | None = None, *,
                               patch_size: int, norm_pix_loss: bool = True, eps: float = 1e-6,
                               reduction: str = "mean", ids_masked: torch.Tensor | None = None,
                               norm_pix: bool | None = None) -> torch.Tensor:
    """The definition of :func:`masked_patch_mse` in plain PyTorch (differentiable).

    The official MAE ``forward_loss``, computed in float32 (float64 if an input is float64)
    as the official code does under autocast with float32 images. Two defined extensions: the
    rows of ``pred`` may be a selection of patches (``ids_masked``), and an all-zero mask
    gives 0 instead of 0 / 0.
    """
    norm_pix_loss = _norm_pix_loss(norm_pix_loss, norm_pix)
    target, weight = _target_rows(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss, eps)
    loss = (pred.to(target.dtype) - target) ** 2
    loss = loss.mean(dim=-1)                                         # mean loss per patch
    loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    weight_sum = weight.sum()
    return loss.sum() / torch.where(weight_sum == 0, torch.ones_like(weight_sum), weight_sum)


# --------------------------------------------------------------------------------------------
# Backends, registration, autograd
# --------------------------------------------------------------------------------------------


def _norm_pix_loss(norm_pix_loss: bool, norm_pix: bool | None) -> bool:
    """``norm_pix_loss``, or the value given under its former name ``norm_pix`` (with a warning)."""
    if norm_pix is None:
        return norm_pix_loss
    warnings.warn("masked_patch_mse(norm_pix=...) is deprecated: pass norm_pix_loss=..., the models' and "
                  "fastmim train's name", DeprecationWarning, stacklevel=3)
    return norm_pix


def _reference_forward(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss, eps, reduction, compute_grad):
    """Loss and its closed-form gradient: d/dpred of w * mean_j (pred_j - t_j)^2 = 2 w (pred - t) / N."""
    target, weight = _target_rows(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss, eps)
    diff = pred.to(target.dtype) - target
    row_loss = (diff * diff).mean(dim=-1) * weight
    if reduction == "mean":
        weight_sum = weight.sum()
        scale = torch.where(weight_sum == 0, torch.zeros_like(weight_sum), 1.0 / weight_sum)
        loss = row_loss.sum() * scale
    else:
        scale = torch.ones((), dtype=target.dtype, device=pred.device)
        loss = row_loss.sum() if reduction == "sum" else row_loss
    if not compute_grad:
        return loss, pred.new_empty(0)
    coef = weight * scale * (2.0 / pred.shape[-1])
    grad = (diff * coef[..., None]).to(pred.dtype).contiguous()
    return loss, grad


def _triton_forward(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss, eps, reduction, compute_grad):
    from fastmim.kernels import loss as kernels

    if ids_masked is None:
        layout = kernels.LAYOUT_FULL
    elif pred.dim() == 3:
        layout = kernels.LAYOUT_SELECTED
    else:
        layout = kernels.LAYOUT_PACKED
    loss, grad = kernels.masked_patch_mse_forward(
        pred, imgs, mask, ids_masked, layout=layout, patch_size=patch_size, norm_pix_loss=norm_pix_loss, eps=eps,
        reduction=reduction, compute_grad=compute_grad)
    return loss, grad


@torch.library.custom_op("fastmim::masked_patch_mse", mutates_args=())
def _masked_patch_mse_op(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor | None,
                         ids_masked: torch.Tensor | None, patch_size: int, norm_pix_loss: bool, eps: float,
                         reduction: str, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    backend = select_backend("masked_patch_mse", pred.device, implemented=_BACKENDS, prefer_cpu=_CPU_DEFAULT)
    if backend == "csrc" and pred.dtype in _TRITON_DTYPES and imgs.dtype in _TRITON_DTYPES:
        return torch.ops.fastmim.csrc_masked_patch_mse(
            pred.contiguous(), imgs.contiguous(), mask, None if ids_masked is None else ids_masked.contiguous(),
            patch_size, norm_pix_loss, eps, reduction, compute_grad)
    if backend == "triton" and pred.dtype in _TRITON_DTYPES and imgs.dtype in _TRITON_DTYPES:
        return _triton_forward(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss, eps, reduction, compute_grad)
    # float64 inputs always take the reference (the kernels compute in fp32).
    return _reference_forward(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss, eps, reduction, compute_grad)


@_masked_patch_mse_op.register_fake
def _(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss, eps, reduction, compute_grad):
    loss_shape = pred.shape[:-1] if reduction == "none" else ()
    loss = pred.new_empty(loss_shape, dtype=_loss_dtype(pred, imgs))
    grad = pred.new_empty(pred.shape) if compute_grad else pred.new_empty(0)  # contiguous
    return loss, grad


@torch.library.custom_op("fastmim::masked_patch_mse_backward", mutates_args=("grad_pred",))
def _masked_patch_mse_backward_op(grad_pred: torch.Tensor, grad_output: torch.Tensor) -> None:
    if grad_pred.numel() == 0:  # no rows (B, K or T = 0): nothing to scale on any backend
        return
    backend = select_backend("masked_patch_mse", grad_pred.device, implemented=_BACKENDS, prefer_cpu=_CPU_DEFAULT)
    if backend == "csrc" and grad_pred.dtype in _TRITON_DTYPES:
        torch.ops.fastmim.csrc_masked_patch_mse_backward(grad_pred, grad_output)
        return
    if backend == "triton" and grad_pred.dtype in _TRITON_DTYPES:
        from fastmim.kernels import loss as kernels

        kernels.masked_patch_mse_scale_grad_(grad_pred, grad_output)
        return
    factor = grad_output if grad_output.dim() == 0 else grad_output[..., None]
    grad_pred.copy_(grad_pred * factor)


@_masked_patch_mse_backward_op.register_fake
def _(grad_pred, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    compute_grad = inputs[-1]
    ctx.compute_grad = compute_grad
    ctx.mark_non_differentiable(output[1])
    if compute_grad:
        ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_grad_pred):
    if not ctx.compute_grad:
        raise RuntimeError("fastmim::masked_patch_mse was called with compute_grad=False, so it saved no gradient; "
                           "call it through fastmim.ops.masked_patch_mse with pred requiring grad")
    (grad_pred,) = ctx.saved_tensors
    torch.ops.fastmim.masked_patch_mse_backward(grad_pred, grad_loss)
    return grad_pred, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastmim::masked_patch_mse", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public op (arguments checked by fastmim.ops._validate)
# --------------------------------------------------------------------------------------------


def masked_patch_mse(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor | None = None, *, patch_size: int,
                     norm_pix_loss: bool = True, eps: float = 1e-6, reduction: str = "mean",
                     ids_masked: torch.Tensor | None = None, norm_pix: bool | None = None) -> torch.Tensor:
    """MAE's reconstruction loss straight from the image, forward and backward in one pass.

    With ``N = patch_size**2 * C`` and ``L = (H / p) * (W / p)``, per patch ``l`` of sample
    ``b``: ``t`` = the patch of ``imgs`` (row, column, channel order, as :func:`patchify`);
    with ``norm_pix_loss``, ``t = (t - mean(t)) / sqrt(var(t) + eps)`` with the unbiased variance;
    ``patch_loss = mean_j (pred_j - t_j)**2``. Then ``"mean"`` gives
    ``sum(mask * patch_loss) / sum(mask)`` (the official loss), ``"sum"`` the numerator,
    ``"none"`` ``mask * patch_loss`` per row of ``pred``.

    Args:
        pred: predictions, one of three layouts:
            ``(B, L, N)``: every patch (the official decoder output); ``mask`` required.
            ``(B, K, N)`` with ``ids_masked (B, K)``: only the patches ``ids_masked[b, k]``
            in ``[0, L)``, so a decoder can skip its output projection on visible tokens (with
            MAE's random masking keeping ``len_keep`` patches: ``ids_shuffle[:, len_keep:]``,
            ``K = L - len_keep``).
            ``(T, N)`` with ``ids_masked (T,)``: packed rows, ``ids_masked[t] = b * L + l``.
            The last dimension must be contiguous; other strides are read as they are (e.g.
            ``decoder_out[:, 1:]`` needs no copy).
        imgs: ``(B, C, H, W)``, H and W divisible by ``patch_size``; any strides (read in
            place). float16, bfloat16, float32 or float64, like ``pred`` (may differ).
        mask: ``(B, L)`` patch weights, 1 = masked (loss counted), 0 = visible; float or bool
            (bool is converted to float32, a small copy). Any finite weights ``>= 0`` (a soft
            mask) are allowed; a negative, NaN or infinite one is a ``ValueError`` (its values
            are checked as ``ids_masked``'s, see there). With ``ids_masked`` it is optional:
            the weight of a row is ``mask[b, l]`` of its patch, or 1 without ``mask``.
        patch_size: ``p``.
        norm_pix_loss: normalise each target patch (the models' ``norm_pix_loss``, one name from
            ``fastmim train --norm-pix-loss`` to here). ``norm_pix``: its former name, deprecated.
        eps: added to the variance inside the square root (a constant patch gives a finite
            loss and gradient).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ids_masked: the patch indices of the rows of ``pred`` (int64 or int32), see ``pred``.
            Their values are checked as fastmim's other index arguments
            (:mod:`fastmim.ops._validate`): always for a CPU tensor, on every backend (a
            ``ValueError`` naming the first bad position, its value and the range ``[0, L)``,
            ``[0, B * L)`` packed); for an accelerator tensor only under
            :func:`fastmim.ops.check_indices` or ``FASTMIM_CHECK_INDICES=1`` (reading them
            back would sync with the device). Unchecked, an out-of-range index reads no patch:
            the Triton and csrc kernels give its row loss 0 and gradient 0 and leave its weight
            out of ``sum(mask)`` (without ``mask``, ``"mean"`` still divides by the number of
            rows); the reference backend's indexing raises (a device-side assert on CUDA).

    Returns:
        float32 (float64 if an input is float64): a scalar, or ``pred.shape[:-1]`` for
        ``"none"``. When the weights sum to 0 (e.g. ``mask_ratio=0``, no rows with ``K = 0``
        or ``T = 0``, or an empty batch ``B = 0``), ``"mean"`` returns 0 and a zero gradient
        on every backend (the official code returns NaN); ``"sum"`` is 0 for no rows. The
        kernels (Triton, csrc) do not read rows of weight 0, so non-finite values there do not
        propagate (the reference, like the official code, gives NaN).

    Gradient flows to ``pred`` only; ``imgs`` and ``mask`` must not require grad. When
    ``pred`` requires grad the forward also writes ``d loss / d pred`` (one tensor like
    ``pred``), kept for backward, which scales it in place by ``grad_output``: backward once
    per graph (``retain_graph`` re-use of this node raises autograd's in-place error).
    Statistics and sums are fp32 for bf16/fp16 inputs. No host sync (unless index checks are
    on for accelerator tensors, see ``ids_masked``).
    """
    norm_pix_loss = _norm_pix_loss(norm_pix_loss, norm_pix)
    mask = validate_masked_patch_mse(pred, imgs, mask, patch_size, norm_pix_loss, eps, reduction, ids_masked)
    compute_grad = pred.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.fastmim.masked_patch_mse(
        pred, imgs, mask, ids_masked, patch_size, norm_pix_loss, float(eps), reduction, compute_grad)
    return loss
