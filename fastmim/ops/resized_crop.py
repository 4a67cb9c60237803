"""The input pipeline's augmentation as one op: :func:`resized_crop_flip_normalize`, and its crop boxes.

MAE's training views are ``RandomResizedCrop(size, scale=(0.2, 1), bicubic)`` + horizontal flip
+ ``ToTensor`` + ``Normalize``. Done per image on the CPU in floating point (the official
scripts, and torchvision), that costs several times the JPEG decode. Here the CPU only decodes
to ``uint8`` and the training device does the rest in one pass per batch:

- :func:`resized_crop_flip_normalize`: ``uint8`` images (one ``(B, C, H, W)`` tensor, a list of
  differently sized ``(C, H_b, W_b)`` images, or :class:`PackedImages`, the loader's layout),
  one crop box and flip per image -> ``(B, C, size, size)`` float32 / bf16 / fp16, normalised.
  The resampling is PyTorch's (and Pillow's) antialiased bicubic: Keys' cubic with ``a = -0.5``,
  its support stretched by the scale when shrinking, weights normalised per output pixel,
  separable, horizontal pass first, clamped to ``[0, 255]`` after each pass as Pillow's and
  torchvision's two ``uint8`` passes are. The result is
  ``torchvision.transforms.v2.functional.resized_crop(img, top, left, height, width, size,
  InterpolationMode.BICUBIC, antialias=True)`` without its rounding to ``uint8`` between and
  after the passes, then flip and ``(x / 255 - mean) / std``: within 0.5/255 mean absolute error
  of torchvision's ``uint8`` result (whose own rounding is up to ~1/255 per pixel).
- :func:`random_resized_crop_boxes` (a batch, tensors) and :func:`random_resized_crop_box` (one
  image, Python ints, what a data-loader worker calls): RandomResizedCrop's rule
  (:func:`resized_crop_rule`: area fraction uniform in ``scale``, aspect ratio log-uniform in
  ``ratio``, 10 tries, then the central crop clamped to ``ratio``) and a flip, drawn from the
  counter-based RNG of :mod:`fastmim.ops.masking` keyed by ``(seed, sample)``. See "Crop boxes" below.

Backends of :func:`resized_crop_flip_normalize`: the reference (per image: crop view, PyTorch's
``interpolate(mode="bicubic", antialias=True)``, clamp, flip, normalise; any device), Triton
(``fastmim/kernels/resized_crop.py``: one program per image, channel and output tile; CUDA, or
CPU through the interpreter) and csrc (``csrc/cpu/resized_crop.cpp``: separable passes with
precomputed weights, images in parallel; the CPU default, measured faster than the reference by
``benchmarks/bench_resized_crop.py``). The op is registered as ``fastmim::resized_crop_flip_normalize``
so ``torch.compile(fullgraph=True)`` traces it. It has no gradient (its input is ``uint8``).

Image layout. Every backend reads image ``b`` at element offset ``layout[b, 0]`` of one ``uint8``
tensor, with height ``layout[b, 1]``, width ``layout[b, 2]`` and element strides
``layout[b, 3:6]`` for channel, row and column. A ``(B, C, H, W)`` tensor is read in place with
its own strides (no copy: a ``channels_last`` tensor, or decoders' ``HWC`` pixels seen as ``CHW``,
cost nothing); a list is packed into one buffer first (one copy); :class:`PackedImages` (what
:func:`pack_images` and fastmim's loader produce) is read as is.

Index values (under the policy of :mod:`fastmim.ops._validate`: always on the host, on an
accelerator only under ``FASTMIM_CHECK_INDICES=1`` / :func:`~fastmim.ops.check_indices`, never while
compiling): every box must lie inside its image (``0 <= top``, ``1 <= height``,
``top + height <= H_b``, the same across), and a :class:`PackedImages` layout inside its buffer.
Unchecked bad values never make a kernel read outside the buffer: the Triton kernel clamps each
box into its image and masks every read with the buffer's extent (a wrong box gives wrong
pixels, not a fault).

Crop boxes. Sample ``(seed, n)`` draws 32-bit words ``k = 0..40`` of the counter RNG: try ``t``
(0..9) uses words ``4t .. 4t+3`` for the area fraction, the aspect ratio, the top and the left
offset, word 40 decides the flip. Every step is integer arithmetic or one correctly rounded
float64 operation (``*``, ``/``, ``sqrt``, round half to even), so the PyTorch version (on any
device), the per-image Python version and any kernel compute the same bits: the area fraction
and the aspect ratio are read from 4096-entry tables (``(i + 0.5) / 4096`` of the way through
``scale``, and through ``log(ratio)`` exponentiated once on the host), a 12-bit index from the
word's high bits, which discretises the two continuous draws to 4096 levels (adjacent aspect
ratios differ by 0.014%, under 0.07 px of a 500-px crop); positions are
``(word * (H - h + 1)) >> 32``, exactly uniform up to 2**-32. Samples need not be consecutive:
``seed`` and ``offset`` may each be one value or one per row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fastmim.ops._dispatch import select_backend
from fastmim.ops._validate import values_checked
from fastmim.ops.masking import _M32, _MIX_MULTIPLIER_1, _MIX_MULTIPLIER_2, PATCH_STRIDE, SEED_HIGH_SALT, _mix32

__all__ = ["CropBoxes", "PackedImages", "central_crop", "pack_images", "random_resized_crop_box",
           "random_resized_crop_boxes", "resized_crop_flip_normalize", "resized_crop_flip_normalize_reference",
           "resized_crop_rule"]

_OP = "resized_crop_flip_normalize"
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# The compiled C++ kernel is the CPU default: benchmarks/bench_resized_crop.py measured it faster
# than the reference (a per-image interpolate) at every size it runs.
_BACKENDS = ("reference", "triton", "csrc")
_CPU_DEFAULT = ("csrc",)


class PackedImages(NamedTuple):
    """Images of any sizes in one ``uint8`` buffer (fastmim's loader collates batches so).

    Image ``b`` is ``data.as_strided((channels, H, W), (sc, sh, sw), offset)`` with
    ``layout[b] = (offset, H, W, sc, sh, sw)`` (elements, relative to ``data``'s first element).
    :func:`pack_images` stores each image ``HWC`` (``sc = 1, sh = W * C, sw = C``), the decoders'
    own order.
    """

    data: Tensor  #: (N,) uint8
    layout: Tensor  #: (B, 6) int64: offset, height, width, stride_c, stride_h, stride_w
    channels: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedImages:
        return PackedImages(self.data.to(device, non_blocking=non_blocking),
                            self.layout.to(device, non_blocking=non_blocking), self.channels)

    def pin_memory(self) -> PackedImages:
        return PackedImages(self.data.pin_memory(), self.layout.pin_memory(), self.channels)

    def image(self, b: int) -> Tensor:
        """Image ``b`` as a ``(C, H, W)`` view (reads the layout: a device sync on an accelerator)."""
        offset, height, width, sc, sh, sw = (int(v) for v in self.layout[b].tolist())
        return self.data.as_strided((self.channels, height, width), (sc, sh, sw),
                                    self.data.storage_offset() + offset)


class CropBoxes(NamedTuple):
    """Result of :func:`random_resized_crop_boxes`."""

    boxes: Tensor  #: (B, 4) int32: top, left, height, width
    flip: Tensor  #: (B,) bool


def pack_images(images: Sequence[Tensor], *, out: Tensor | None = None) -> PackedImages:
    """Pack ``uint8`` images ``(C, H_b, W_b)`` (any strides, one device) into one buffer, each ``HWC``.

    ``out``: an optional ``uint8`` buffer of at least the total size to write into (e.g. pinned
    memory); the result's ``data`` is its first ``sum(C * H_b * W_b)`` elements.
    """
    if isinstance(images, Tensor) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list of uint8 (C, H, W) tensors, got {type(images).__name__}")
    channels, device = _check_image_list(images)
    sizes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
    numels = [channels * h * w for h, w in sizes]
    total = sum(numels)
    if out is None:
        data = torch.empty(total, dtype=torch.uint8, device=device)
    else:
        if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < total or out.device != device:
            raise ValueError(f"out must be a 1-D uint8 tensor on {device} of at least {total} elements, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
        data = out[:total]
    rows, offset = [], 0
    for img, (h, w), n in zip(images, sizes, numels, strict=True):
        data[offset:offset + n].view(h, w, channels).copy_(img.permute(1, 2, 0))
        rows.append((offset, h, w, 1, w * channels, channels))
        offset += n
    layout = torch.tensor(rows, dtype=torch.int64).reshape(len(images), 6)
    return PackedImages(data, layout.to(device, non_blocking=True), channels)


# ============================================================================ reference


def _image_views(images: Tensor, layout: Tensor, channels: int) -> list[Tensor]:
    base = images.storage_offset()
    views = []
    for offset, height, width, sc, sh, sw in layout.tolist():
        views.append(images.as_strided((channels, height, width), (sc, sh, sw), base + offset))
    return views


def _interpolate(x: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def resized_crop_flip_normalize_reference(images: Tensor | Sequence[Tensor] | PackedImages, boxes: Tensor,
                                          size: int | Sequence[int], flip: Tensor | None = None,
                                          mean: Sequence[float] | Tensor | None = None,
                                          std: Sequence[float] | Tensor | None = None, *,
                                          dtype: torch.dtype = torch.float32) -> Tensor:
    """The definition of :func:`resized_crop_flip_normalize`, image by image with PyTorch's ops:
    ``interpolate(crop.float(), mode="bicubic", align_corners=False, antialias=True)`` along the
    width (to ``(height, out_w)``), clamped to ``[0, 255]``, then along the height (to
    ``(out_h, out_w)``), clamped, flipped where ``flip``, ``(x / 255 - mean) / std``, cast to ``dtype``."""
    if isinstance(images, PackedImages):
        views, channels = _image_views(images.data, images.layout, images.channels), images.channels
    elif isinstance(images, Tensor):
        views, channels = list(images.unbind(0)), images.shape[1]
    else:
        views = list(images)
        channels, _ = _check_image_list(views)
    out_h, out_w = _out_size(size)
    device = boxes.device
    mean_t, std_t = _stats(mean, std, channels, device)
    flips = [False] * len(views) if flip is None else [bool(f) for f in flip.tolist()]
    outs = []
    for img, (top, left, height, width), flipped in zip(views, boxes.tolist(), flips, strict=True):
        x = img[:, top:top + height, left:left + width].to(torch.float32)[None]
        # Horizontal pass, clamp, vertical pass (a pass at scale 1 is the identity).
        x = _interpolate(x, (height, out_w)).clamp(0, 255)
        x = _interpolate(x, (out_h, out_w))[0].clamp(0, 255) / 255
        if flipped:
            x = x.flip(-1)
        outs.append(((x - mean_t[:, None, None]) / std_t[:, None, None]).to(dtype))
    if not outs:
        return torch.empty((0, channels, out_h, out_w), dtype=dtype, device=device)
    return torch.stack(outs)


# ============================================================================ the registered op


@torch.library.custom_op("fastmim::resized_crop_flip_normalize", mutates_args=())
def _resized_crop_op(images: Tensor, layout: Tensor, boxes: Tensor, flip: Tensor | None, channels: int, out_h: int,
                     out_w: int, mean: Tensor, std: Tensor, extent: int, dtype: torch.dtype) -> Tensor:
    """``images``: the uint8 tensor every ``layout`` offset is relative to (``extent`` elements
    addressable from its first one); ``layout (B, 6)`` int64, ``boxes (B, 4)``, ``flip (B,)`` bool,
    ``mean``/``std (C,)`` float32, all on one device and validated by the public op."""
    # The compiled kernel is CPU-only: on an accelerator forcing csrc keeps the default backend.
    implemented = _BACKENDS if images.device.type == "cpu" else ("reference", "triton")
    backend = select_backend(_OP, images.device, implemented=implemented, prefer_cpu=_CPU_DEFAULT)
    if backend == "triton":
        from fastmim.kernels import resized_crop as kernels

        return kernels.resized_crop_flip_normalize_forward(images, layout, boxes, flip, channels, out_h, out_w,
                                                           mean, std, extent, dtype)
    if backend == "csrc":
        return torch.ops.fastmim.csrc_resized_crop_flip_normalize(images, layout, boxes, flip, out_h, out_w, mean,
                                                                  std, dtype)
    packed = PackedImages(images.as_strided((max(extent, 1),), (1,)) if extent else images.reshape(-1)[:0],
                          layout, channels)
    return resized_crop_flip_normalize_reference(packed, boxes, (out_h, out_w), flip, mean, std, dtype=dtype)


@_resized_crop_op.register_fake
def _(images, layout, boxes, flip, channels, out_h, out_w, mean, std, extent, dtype):
    return images.new_empty((layout.shape[0], channels, out_h, out_w), dtype=dtype)


# ============================================================================ the public op


def resized_crop_flip_normalize(images: Tensor | Sequence[Tensor] | PackedImages, boxes: Tensor,
                                size: int | Sequence[int], flip: Tensor | None = None,
                                mean: Sequence[float] | Tensor | None = None,
                                std: Sequence[float] | Tensor | None = None, *,
                                dtype: torch.dtype = torch.float32) -> Tensor:
    """Crop, resize (antialiased bicubic), flip and normalise a batch of ``uint8`` images in one pass.

    Args:
        images: ``uint8`` ``(B, C, H, W)`` (any strides: read in place), a list of ``B`` ``uint8``
            ``(C, H_b, W_b)`` tensors of any sizes (packed into one buffer first: a copy), or
            :class:`PackedImages`. One device.
        boxes: ``(B, 4)`` int32/int64 ``(top, left, height, width)`` in pixels of each image; each
            must lie inside its image (checked on the host; see the module doc for accelerators).
        size: the output size, an int (square) or ``(height, width)``.
        flip: optional ``(B,)`` bool: mirror image ``b``'s output horizontally.
        mean, std: optional per-channel statistics of ``[0, 1]`` pixels (``C`` floats or a ``(C,)``
            tensor; default 0 and 1): the output is ``(x / 255 - mean) / std``.
        dtype: float32 (default), bfloat16 or float16.

    Returns:
        ``(B, C, out_h, out_w)`` contiguous on the images' device: the crop of each image resized
        as ``torchvision.transforms.v2.functional.resized_crop(..., InterpolationMode.BICUBIC,
        antialias=True)`` computes it before rounding to ``uint8`` (see the module doc), flipped,
        normalised.
    """
    data, layout, channels, heights, widths, extent = _as_layout(images)
    device = data.device
    out_h, out_w = _out_size(size)
    if not isinstance(boxes, Tensor) or boxes.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{_OP}: boxes must be an int32 or int64 tensor, got "
                        f"{boxes.dtype if isinstance(boxes, Tensor) else type(boxes).__name__}")
    batch = layout.shape[0]
    if boxes.shape != (batch, 4):
        raise ValueError(f"{_OP}: boxes must have shape (B, 4) = ({batch}, 4) (top, left, height, width), got "
                         f"{tuple(boxes.shape)}")
    if boxes.device != device:
        raise ValueError(f"{_OP}: boxes are on {boxes.device} but the images are on {device}")
    if flip is not None:
        if not isinstance(flip, Tensor) or flip.dtype != torch.bool or flip.shape != (batch,):
            raise TypeError(f"{_OP}: flip must be a bool tensor of shape (B,) = ({batch},), got "
                            f"{flip.dtype if isinstance(flip, Tensor) else type(flip).__name__} "
                            f"{tuple(flip.shape) if isinstance(flip, Tensor) else ''}")
        if flip.device != device:
            raise ValueError(f"{_OP}: flip is on {flip.device} but the images are on {device}")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"{_OP}: dtype must be float32, bfloat16 or float16, got {dtype}")
    mean_t, std_t = _stats(mean, std, channels, device)
    _check_boxes(boxes, heights, widths)
    return torch.ops.fastmim.resized_crop_flip_normalize(
        data, layout, boxes.contiguous(), flip, channels, out_h, out_w, mean_t, std_t, extent, dtype)


def _out_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, bool):
        raise TypeError(f"{_OP}: size must be an int or (height, width), got bool")
    if isinstance(size, int):
        size = (size, size)
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        raise TypeError(f"{_OP}: size must be an int or a pair of ints (height, width), got {size!r}")
    if min(size) < 1:
        raise ValueError(f"{_OP}: size must be >= 1, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _stats(mean, std, channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    out = []
    for name, value, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        if value is None:
            t = torch.full((channels,), default, dtype=torch.float32, device=device)
        else:
            # No device sync: a host value is copied asynchronously (staged, as it is not pinned).
            t = torch.as_tensor(value, dtype=torch.float32).to(device, non_blocking=True).reshape(-1)
            if t.numel() != channels:
                raise ValueError(f"{_OP}: {name} must have one value per channel ({channels}), got {t.numel()}")
        out.append(t.contiguous())
    if std is not None and values_checked(out[1]) and bool((out[1] == 0).any()):
        raise ValueError(f"{_OP}: std must be non-zero, got {out[1].tolist()}")
    return out[0], out[1]


def _check_image_list(images: Sequence[Tensor]) -> tuple[int, torch.device]:
    if not images:
        raise ValueError(f"{_OP}: an empty list of images has no channel count; pass a (0, C, H, W) tensor")
    channels, device = None, None
    for b, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dtype != torch.uint8 or img.dim() != 3:
            raise TypeError(f"{_OP}: images[{b}] must be a uint8 (C, H, W) tensor, got "
                            f"{img.dtype if isinstance(img, Tensor) else type(img).__name__} "
                            f"{tuple(img.shape) if isinstance(img, Tensor) else ''}")
        if channels is None:
            channels, device = int(img.shape[0]), img.device
        if img.shape[0] != channels or img.device != device:
            raise ValueError(f"{_OP}: images[{b}] has {img.shape[0]} channels on {img.device}, images[0] "
                             f"{channels} on {device}: every image needs the same channels and device")
        if img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"{_OP}: images[{b}] is empty ({tuple(img.shape)})")
    return channels, device


def _extent(t: Tensor) -> int:
    """Elements addressable from ``t``'s first element with its strides (non-negative ones)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))


def _as_layout(images) -> tuple[Tensor, Tensor, int, Tensor, Tensor, int]:
    """``(data, layout (B, 6) int64, channels, heights, widths, extent)`` of any accepted form."""
    if isinstance(images, PackedImages):
        data, layout, channels = images
        if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            raise TypeError(f"{_OP}: PackedImages.data must be a 1-D uint8 tensor, got "
                            f"{getattr(data, 'dtype', type(data).__name__)} {tuple(getattr(data, 'shape', ()))}")
        if not isinstance(layout, Tensor) or layout.dtype != torch.int64 or layout.dim() != 2 \
                or layout.shape[1] != 6:
            raise TypeError(f"{_OP}: PackedImages.layout must be an int64 (B, 6) tensor, got "
                            f"{getattr(layout, 'dtype', type(layout).__name__)} "
                            f"{tuple(getattr(layout, 'shape', ()))}")
        if layout.device != data.device:
            raise ValueError(f"{_OP}: PackedImages.layout is on {layout.device}, its data on {data.device}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{_OP}: PackedImages.channels must be a positive int, got {channels!r}")
        layout = layout.contiguous()
        _check_layout(layout, channels, data.numel())
        return data, layout, channels, layout[:, 1], layout[:, 2], data.numel()
    if isinstance(images, Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"{_OP}: images must be uint8 (B, C, H, W), a list of uint8 (C, H, W) tensors or "
                            f"PackedImages, got a {images.dtype} tensor of shape {tuple(images.shape)}")
        B, C, H, W = images.shape
        if C < 1 or H < 1 or W < 1:
            raise ValueError(f"{_OP}: images must have C, H and W >= 1 (only the batch may be empty), got "
                             f"{tuple(images.shape)}")
        if any(s < 0 for s in images.stride()):
            raise ValueError(f"{_OP}: images with negative strides are not supported")
        s0, s1, s2, s3 = images.stride()
        layout = torch.stack([torch.arange(B, dtype=torch.int64) * s0]
                             + [torch.full((B,), v, dtype=torch.int64) for v in (H, W, s1, s2, s3)], dim=1)
        layout = layout.to(images.device, non_blocking=True)
        sizes = torch.tensor([H, W], dtype=torch.int64).expand(B, 2)
        return images, layout, C, sizes[:, 0], sizes[:, 1], _extent(images)
    if isinstance(images, Sequence):
        packed = pack_images(images)
        return packed.data, packed.layout, packed.channels, packed.layout[:, 1], packed.layout[:, 2], \
            packed.data.numel()
    raise TypeError(f"{_OP}: images must be uint8 (B, C, H, W), a list of uint8 (C, H, W) tensors or PackedImages, "
                    f"got {type(images).__name__}")


def _check_layout(layout: Tensor, channels: int, numel: int) -> None:
    """Each packed image inside the buffer (when checked; see the module doc)."""
    if layout.numel() == 0 or not values_checked(layout):
        return
    offset, height, width, sc, sh, sw = layout.unbind(1)
    bad = (height < 1) | (width < 1) | (offset < 0) | (sc < 0) | (sh < 0) | (sw < 0)
    last = offset + (channels - 1) * sc + (height - 1) * sh + (width - 1) * sw
    bad |= last >= numel
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"{_OP}: PackedImages.layout[{b}] = {layout[b].tolist()} (offset, height, width, strides) "
                         f"does not describe a {channels}-channel image inside the buffer of {numel} elements")


def _check_boxes(boxes: Tensor, heights: Tensor, widths: Tensor) -> None:
    """Every box inside its image (when checked; see the module doc)."""
    if boxes.numel() == 0 or not values_checked(boxes):
        return
    heights, widths = heights.to(boxes.device), widths.to(boxes.device)
    top, left, height, width = boxes.long().unbind(1)
    bad = (top < 0) | (left < 0) | (height < 1) | (width < 1) | (top + height > heights) | (left + width > widths)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        t, l_, h, w = boxes[b].tolist()
        raise ValueError(f"{_OP}: boxes[{b}] = (top {t}, left {l_}, height {h}, width {w}) is not inside image {b} "
                         f"of {int(heights[b])}x{int(widths[b])} pixels (need top, left >= 0, height, width >= 1, "
                         f"top + height <= H, left + width <= W)")


# ============================================================================ crop boxes

_TABLE_BITS = 12
_WORDS = 41  # 10 tries x (area, aspect, top, left) + the flip
_SEED_LIMIT = 2**63


def _mix32_int(x: int) -> int:
    """The RNG's 32-bit avalanche (:func:`fastmim.ops.masking._mix32`) on one Python int."""
    x ^= x >> 16
    x = (x * _MIX_MULTIPLIER_1) & _M32
    x ^= x >> 15
    x = (x * _MIX_MULTIPLIER_2) & _M32
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=16)
def _tables(scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The 4096 area fractions and aspect ratios a 12-bit index selects (float64, computed once)."""
    n = 1 << _TABLE_BITS
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    areas = tuple(scale[0] + (scale[1] - scale[0]) * ((i + 0.5) / n) for i in range(n))
    aspects = tuple(math.exp(lo + (hi - lo) * ((i + 0.5) / n)) for i in range(n))
    return areas, aspects


def _check_ranges(scale, ratio, flip_p) -> tuple[tuple[float, float], tuple[float, float]]:
    scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {scale}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {ratio}")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    return scale, ratio


@functools.lru_cache(maxsize=16)
def _prepared(scale: tuple[float, ...], ratio: tuple[float, ...], flip_p: float):
    """Checked ranges, their tables and the flip threshold (cached: one image's box costs microseconds)."""
    scale, ratio = _check_ranges(scale, ratio, flip_p)
    areas, aspects = _tables(scale, ratio)
    return areas, aspects, _flip_threshold(flip_p), ratio


def _flip_threshold(flip_p: float) -> int:
    return min(int(round(flip_p * 2**32)), 2**32)


def _check_key(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < _SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


def random_resized_crop_box(height: int, width: int, *, seed: int, counter: int = 0,
                            scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                            flip_p: float = 0.5) -> tuple[int, int, int, int, bool]:
    """One image's ``(top, left, crop_height, crop_width, flip)``: row ``counter`` of
    :func:`random_resized_crop_boxes` for ``seed`` (the same bits), in Python ints (microseconds,
    for a data-loader worker that needs the box before it decodes)."""
    areas, aspects, threshold, ratio = _prepared(tuple(scale), tuple(ratio), flip_p)
    if (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT
            or isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter < _SEED_LIMIT):
        _check_key("seed", seed)
        _check_key("counter", counter)
    if isinstance(height, bool) or isinstance(width, bool) or height < 1 or width < 1:
        raise ValueError(f"height and width must be ints >= 1, got {height}x{width}")
    seed_key = _mix32_int(seed & _M32) ^ _mix32_int(((seed >> 32) & _M32) ^ SEED_HIGH_SALT)
    row_key = _mix32_int(seed_key ^ _mix32_int(counter & _M32))

    def word(k: int) -> int:
        return _mix32_int(row_key ^ ((k * PATCH_STRIDE) & _M32))

    flip = word(_WORDS - 1) < threshold
    shift = 32 - _TABLE_BITS
    tries = ((areas[word(4 * t) >> shift], aspects[word(4 * t + 1) >> shift]) for t in range(10))
    place = lambda t, h, w: ((word(4 * t + 2) * (height - h + 1)) >> 32, (word(4 * t + 3) * (width - w + 1)) >> 32)
    return (*resized_crop_rule(height, width, ratio, tries, place), flip)


def resized_crop_rule(height: int, width: int, ratio: Sequence[float], tries: Iterable[tuple[float, float]],
                      place: Callable[[int, int, int], tuple[int, int]]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, crop_height, crop_width)``, whatever the random source (the
    counter RNG here, a ``torch.Generator`` in :mod:`fastmim.data`'s crop samplers). ``tries``: the
    ``(area_fraction, aspect)`` draws (10), consumed lazily: try ``t`` is ``w = round(sqrt(A * aspect))``,
    ``h = round(sqrt(A / aspect))``, ``A = height * width * area_fraction``; the first inside the image
    is placed at ``place(t, h, w) -> (top, left)``; if none fits, :func:`central_crop`."""
    area = float(height * width)
    for t, (fraction, aspect) in enumerate(tries):
        target = area * fraction
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = place(t, h, w)
            return top, left, h, w
    return central_crop(height, width, ratio)


def central_crop(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback ``(top, left, crop_height, crop_width)``: the central crop clamped to ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _key_tensor(name: str, value: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """A scalar or ``(B,)`` key as an int64 tensor on ``device`` (values checked on the host)."""
    if isinstance(value, Tensor):
        if value.dtype != torch.int64 or not (value.numel() == 1 or value.shape == (batch,)):
            raise ValueError(f"{name} must be an int, an int64 scalar tensor or an int64 tensor of shape (B,) = "
                             f"({batch},), got {value.dtype} {tuple(value.shape)}")
        if values_checked(value) and value.numel() and int(value.min()) < 0:
            raise ValueError(f"{name} must be in [0, 2**63), got a minimum of {int(value.min())}")
        return value.reshape(-1).to(device)
    return torch.tensor([_check_key(name, value)], dtype=torch.int64, device=device)


def random_resized_crop_boxes(heights: Tensor | Sequence[int], widths: Tensor | Sequence[int], *,
                              seed: int | Tensor, offset: int | Tensor = 0,
                              scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                              flip_p: float = 0.5) -> CropBoxes:
    """RandomResizedCrop boxes and flips of a batch from the counter-based RNG (see the module doc).

    Args:
        heights, widths: ``(B,)`` image sizes (integer tensors on the output device, or lists).
        seed: an int in ``[0, 2**63)``, or an int64 tensor: one value, or one per row.
        offset: sample numbers: an int / one value (row ``b`` is sample ``offset + b``), or an int64
            ``(B,)`` tensor (row ``b`` is sample ``offset[b]``). Taken mod ``2**32``.
        scale, ratio: RandomResizedCrop's area-fraction and aspect-ratio ranges (MAE: ``(0.2, 1)``).
        flip_p: probability of a horizontal flip.

    Returns:
        :class:`CropBoxes` ``(boxes (B, 4) int32 (top, left, height, width), flip (B,) bool)``, the
        same bits on every device and as :func:`random_resized_crop_box` row by row.
    """
    scale, ratio = _check_ranges(scale, ratio, flip_p)
    device = heights.device if isinstance(heights, Tensor) else torch.device("cpu")
    H = torch.as_tensor(heights, dtype=torch.int64).to(device).reshape(-1)
    W = torch.as_tensor(widths, dtype=torch.int64).to(device).reshape(-1)
    batch = H.shape[0]
    if W.shape != (batch,):
        raise ValueError(f"heights and widths must have the same length, got {batch} and {W.shape[0]}")
    if values_checked(H) and batch and int(torch.minimum(H, W).min()) < 1:
        raise ValueError("heights and widths must be >= 1")
    seeds = _key_tensor("seed", seed, batch, device)
    counters = _key_tensor("offset", offset, batch, device)
    if counters.numel() == 1:  # row b is sample offset + b (for B = 1 the same as a per-row offset)
        counters = counters + torch.arange(batch, dtype=torch.int64, device=device)
    seed_key = _mix32(seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ SEED_HIGH_SALT)
    row_key = _mix32(seed_key ^ _mix32(counters & _M32))  # (B,) or broadcast (1,) with (B,)
    k = torch.arange(_WORDS, dtype=torch.int64, device=device)
    words = _mix32(row_key.reshape(-1, 1) ^ ((k * PATCH_STRIDE) & _M32)).expand(batch, _WORDS)
    areas, aspects = _tables(scale, ratio)
    area_table = torch.tensor(areas, dtype=torch.float64, device=device)
    aspect_table = torch.tensor(aspects, dtype=torch.float64, device=device)
    tries = words[:, :40].reshape(batch, 10, 4)
    shift = 32 - _TABLE_BITS
    Hc, Wc = H[:, None], W[:, None]
    target = (H * W).to(torch.float64)[:, None] * area_table[tries[..., 0] >> shift]
    aspect = aspect_table[tries[..., 1] >> shift]
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    ok = (w > 0) & (w <= Wc) & (h > 0) & (h <= Hc)
    top = (tries[..., 2] * (Hc - h + 1).clamp_min(0)) >> 32
    left = (tries[..., 3] * (Wc - w + 1).clamp_min(0)) >> 32
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # the first successful try
    pick = lambda t: t.gather(1, first)[:, 0]  # noqa: E731
    # RandomResizedCrop's fallback: the central crop, clamped to the ratio range.
    in_ratio = W.to(torch.float64) / H.to(torch.float64)
    narrow, wide = in_ratio < ratio[0], in_ratio > ratio[1]
    fh = torch.where(narrow, torch.round(W.to(torch.float64) / ratio[0]).to(torch.int64), H)
    fw = torch.where(wide, torch.round(H.to(torch.float64) * ratio[1]).to(torch.int64), W)
    found = ok.any(dim=1)
    boxes = torch.stack([
        torch.where(found, pick(top), (H - fh) // 2),
        torch.where(found, pick(left), (W - fw) // 2),
        torch.where(found, pick(h), fh),
        torch.where(found, pick(w), fw),
    ], dim=1).to(torch.int32)
    flip = words[:, _WORDS - 1] < _flip_threshold(flip_p)
    return CropBoxes(boxes, flip)
