"""Augmentations on image tensors, every random draw taken from an explicit ``torch.Generator``.

Images are float tensors ``(C, H, W)`` in ``[0, 1]`` (``C`` = 1 or 3) until the final
normalisation. Each sample's generator is seeded from ``(run seed, epoch, index)`` by the
sampler (:mod:`fastmim.data.sampler`), so the augmentations of a sample depend on neither
the number of DataLoader workers nor the number of processes, and a resumed run sees the
very same pixels.

The crop position comes from a *crop sampler*: ``sampler(index, height, width, generator)
-> (top, left, crop_height, crop_width)``. :class:`RandomResizedCropSampler` is the MAE one;
ContrastiveCrop (CMAE) plugs in here with its per-image boxes, keyed by ``index``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from fastmim.ops.resized_crop import resized_crop_rule

__all__ = [
    "CropSampler",
    "RandomResizedCropSampler",
    "ViewTransform",
    "EvalTransform",
    "resized_crop",
    "color_jitter",
    "solarize",
    "gaussian_blur",
    "to_grayscale",
]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class CropSampler(Protocol):
    """Chooses the crop of one image: ``(top, left, crop_height, crop_width)`` in pixels."""

    def __call__(self, index: int, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        ...


class RandomResizedCropSampler:
    """torchvision's RandomResizedCrop parameters: area fraction in ``scale``, aspect ratio
    log-uniform in ``ratio``, up to 10 tries, then a central crop clamped to ``ratio``.
    MAE pretrains with ``scale=(0.2, 1.0)``."""

    def __init__(self, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.scale = scale
        self.ratio = ratio

    def tries(self, generator: torch.Generator) -> Iterator[tuple[float, float]]:
        """The 10 tries' ``(area_fraction, aspect)`` draws from ``generator``, each drawn when asked
        for (the ``tries`` of :func:`~fastmim.ops.resized_crop.resized_crop_rule`)."""
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            yield _uniform(generator, *self.scale), math.exp(_uniform(generator, *log_ratio))

    def __call__(self, index: int, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        del index  # position-independent; ContrastiveCrop uses it

        def place(t: int, h: int, w: int) -> tuple[int, int]:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            return top, int(torch.randint(0, width - w + 1, (), generator=generator))

        return resized_crop_rule(height, width, self.ratio, self.tries(generator), place)

    def __repr__(self) -> str:
        return f"RandomResizedCropSampler(scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)})"


def resized_crop(img: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """Crop ``img (C, H, W)`` and resize the crop to ``(size, size)`` (bilinear, antialiased
    when shrinking, as torchvision's tensor path)."""
    crop = img[:, top:top + height, left:left + width]
    if crop.shape[-2:] == (size, size):
        return crop.clone()
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def to_grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, kept at ``img``'s channel count."""
    if img.shape[0] == 1:
        return img
    gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    return gray.expand_as(img).clone()


def _rotate_hue(img: torch.Tensor, turns: float) -> torch.Tensor:
    # Rotation of the chroma plane in YIQ space: a cheap, smooth stand-in for an HSV hue shift.
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=img.dtype)
    cos, sin = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
    rotation = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], dtype=img.dtype)
    matrix = torch.linalg.inv(yiq) @ rotation @ yiq
    return torch.einsum("ij,jhw->ihw", matrix, img).clamp(0, 1)


def color_jitter(img: torch.Tensor, generator: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> torch.Tensor:
    """torchvision-style ColorJitter (the SimCLR/BYOL strengths LUT uses): brightness,
    contrast, saturation and hue factors applied in a random order. Saturation and hue need
    colour and are skipped on one-channel images."""
    ops = ["brightness", "contrast"] + (["saturation", "hue"] if img.shape[0] == 3 else [])
    for k in torch.randperm(len(ops), generator=generator).tolist():
        op = ops[k]
        if op == "brightness":
            img = (img * _uniform(generator, 1 - brightness, 1 + brightness)).clamp(0, 1)
        elif op == "contrast":
            mean = to_grayscale(img).mean()
            img = (mean + (img - mean) * _uniform(generator, 1 - contrast, 1 + contrast)).clamp(0, 1)
        elif op == "saturation":
            gray = to_grayscale(img)
            img = (gray + (img - gray) * _uniform(generator, 1 - saturation, 1 + saturation)).clamp(0, 1)
        else:
            img = _rotate_hue(img, _uniform(generator, -hue, hue))
    return img


def solarize(img: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` (PIL's ``ImageOps.solarize`` at 128)."""
    return torch.where(img >= threshold, 1 - img, img)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, kernel radius ``ceil(3 sigma)``."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = img.shape[0]
    out = F.pad(img[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


class ViewTransform:
    """One augmented view: crop (from ``crop_sampler``) resized to ``size``, horizontal flip
    with probability ``flip``, optionally LUT's photometric set, then normalisation.

    ``photometric=True`` is LUT's second view (as in its reference code): ColorJitter with
    probability 0.8, then one of grayscale, solarize or Gaussian blur. On one-channel images
    grayscale is a no-op, so the choice is between solarize and blur. The blur sigma is
    0.1-2.0 px at 224 px, scaled with ``size`` (no smaller than at 64 px, so it stays
    visible on tiny images).
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], *,
                 crop_sampler: CropSampler | None = None, flip: float = 0.5, photometric: bool = False):
        self.size = size
        self.crop_sampler = crop_sampler if crop_sampler is not None else RandomResizedCropSampler()
        self.flip = flip
        self.photometric = photometric
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor, index: int, generator: torch.Generator) -> torch.Tensor:
        """``img``: ``uint8 (C, H, W)``; returns normalised ``float32 (C, size, size)``."""
        x = img.float().div_(255)
        top, left, h, w = self.crop_sampler(index, x.shape[-2], x.shape[-1], generator)
        x = resized_crop(x, top, left, h, w, self.size)
        if float(torch.rand((), generator=generator)) < self.flip:
            x = x.flip(-1)
        if self.photometric:
            x = self._photometric(x, generator)
        return (x - self.mean) / self.std

    def _photometric(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if float(torch.rand((), generator=generator)) < 0.8:
            x = color_jitter(x, generator)
        choices = ["solarize", "blur"] if x.shape[0] == 1 else ["grayscale", "solarize", "blur"]
        choice = choices[int(torch.randint(0, len(choices), (), generator=generator))]
        if choice == "grayscale":
            return to_grayscale(x)
        if choice == "solarize":
            return solarize(x)
        scale = max(self.size, 64) / 224
        return gaussian_blur(x, _uniform(generator, 0.1 * scale, 2.0 * scale))

    def __repr__(self) -> str:
        return (f"ViewTransform(size={self.size}, crop={self.crop_sampler!r}, flip={self.flip}, "
                f"photometric={self.photometric})")


class EvalTransform:
    """Deterministic evaluation view: resize the shorter side to ``size / crop_pct``, centre
    crop ``size``, normalise (MAE's eval transform; ``crop_pct=1`` resizes whole)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0):
        self.size = size
        self.crop_pct = crop_pct
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        del index, generator
        x = img.float().div_(255)
        height, width = x.shape[-2:]
        short = round(self.size / self.crop_pct)
        scale = short / min(height, width)
        new_h, new_w = max(self.size, round(height * scale)), max(self.size, round(width * scale))
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        x = x[:, top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std
