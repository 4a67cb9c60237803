"""ContrastiveCrop (Peng et al., CVPR 2022), the crop sampler of CMAE's views.

Random crops of two views often miss the object, or land on background in both views. After
a warm-up of plain RandomResizedCrop, ContrastiveCrop keeps one box per training image, the
region where the model's own features respond, and samples crop centres inside it, pushed
towards its edges (Beta(alpha, alpha) with alpha < 1) so the two views overlap less.

As the official code (``xyupeng/ContrastiveCrop``) does:

- heat map of an image = its last-layer patch features summed over channels, min-max
  normalised to [0, 1] per image, upsampled (bilinear) to the image size;
- box = the rows and columns holding a pixel above ``threshold`` (0.1), stored as fractions
  ``(top, left, bottom, right)`` of the image, so it applies to the full-size original;
- crop: size and aspect as RandomResizedCrop (``scale``, ``ratio``, 10 tries, then the central
  fallback); the top-left corner ranges over ``[box_edge * size - crop // 2]`` clamped into the
  image, and is placed at ``Beta(alpha, alpha)`` along that range, independently per axis;
- boxes refreshed every ``box_update_every`` epochs from epoch ``warmup`` on; before that,
  RandomResizedCrop. alpha = 0.1 and threshold = 0.1 are the paper's small-dataset defaults
  (alpha = 0.6 at ImageNet scale).

fastmim's ViT features: the last block's output *before* the final LayerNorm (after it, each
token's channel sum is ``sum(beta) + sum(gamma * x_hat)`` with ``sum(x_hat) = 0``: nearly the
same constant for every token, a flat heat map).

This module takes heat maps (or the features they are summed from) and never runs a model:
computing the features is the model's (:func:`fastmim.models.vit.patch_features`) and running it
over the training images is the ``cmae`` train adapter's
(:func:`fastmim.train.contrastive_boxes.compute_boxes`). Wiring (done by that adapter): the
sampler goes into every view's :class:`~fastmim.data.ViewTransform` (``crop_sampler=``); before
each epoch the loop's hook calls :meth:`ContrastiveCrop.on_epoch_start` with a function that
recomputes the boxes. DataLoader workers started after the hook see the new boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastmim.data.transforms import RandomResizedCropSampler, resized_crop
from fastmim.ops.resized_crop import resized_crop_rule

__all__ = ["ContrastiveCrop", "heatmap_boxes", "whole_image"]


def heatmap_boxes(features: torch.Tensor, image_size: int | Sequence[int], threshold: float = 0.1,
                  grid: Sequence[int] | None = None) -> torch.Tensor:
    """Boxes ``(B, 4)`` float32 ``(top, left, bottom, right)`` as fractions of the image.

    ``features``: ``(B, L, D)`` patch tokens (row-major ``grid``, square by default) or a
    ``(B, D, h, w)`` feature map. Heat map: channel sum, min-max normalised per image,
    bilinear upsampling to ``image_size``; the box spans the rows and columns with a pixel
    ``> threshold`` (``bottom``/``right`` exclusive). A flat heat map gives the whole image.
    """
    if features.dim() == 3:
        batch, length, _ = features.shape
        if grid is None:
            side = math.isqrt(length)
            if side * side != length:
                raise ValueError(f"features hold {length} patches, not a square grid: pass grid=(h, w)")
            grid = (side, side)
        heat = features.float().sum(-1).reshape(batch, 1, grid[0], grid[1])
    elif features.dim() == 4:
        batch = features.shape[0]
        heat = features.float().sum(1, keepdim=True)
    else:
        raise ValueError(f"features must be (B, L, D) or (B, D, h, w), got shape {tuple(features.shape)}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    flat = heat.reshape(batch, -1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    flat = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    heat = F.interpolate(flat.reshape_as(heat), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    rows = heat.amax(dim=2) > threshold  # (B, H)
    cols = heat.amax(dim=1) > threshold  # (B, W)

    def extent(hit: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = hit.int().argmax(dim=1)
        last = size - 1 - hit.flip(1).int().argmax(dim=1)
        found = hit.any(dim=1)
        return torch.where(found, first, 0).float() / size, torch.where(found, last + 1, size).float() / size

    top, bottom = extent(rows, height)
    left, right = extent(cols, width)
    return torch.stack([top, left, bottom, right], dim=1)


def whole_image(img: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8 (C, H, W)`` -> the whole image resized to ``(size, size)``, normalised (no crop,
    so box fractions computed on it hold for the original)."""
    x = img.float().div_(255)
    x = resized_crop(x, 0, 0, x.shape[-2], x.shape[-1], size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean_t) / std_t


def _beta(generator: torch.Generator, alpha: float) -> float:
    """One Beta(alpha, alpha) draw seeded from ``generator`` (reproducible per sample)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


class ContrastiveCrop:
    """Crop sampler ``(index, height, width, generator) -> (top, left, crop_h, crop_w)`` with one
    heat-map box per training image (see the module docstring).

    Args:
        num_images: size of the training set (boxes are indexed by dataset index).
        alpha: Beta(alpha, alpha) parameter of the crop position inside the box (0.1).
        threshold: heat-map level that bounds the box (0.1).
        warmup: epochs of plain RandomResizedCrop before the first box update; ``None``: 20% of
            the run, set by :meth:`set_run_length` (the paper: 100 of 500 epochs on small data).
        box_update_every: epochs between box updates; ``None``: 20% of the run, as ``warmup``.
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio ranges.
    """

    def __init__(self, num_images: int, *, alpha: float = 0.1, threshold: float = 0.1, warmup: int | None = None,
                 box_update_every: int | None = None, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        for name, value in (("warmup", warmup), ("box_update_every", box_update_every)):
            if value is not None and (not isinstance(value, int) or value < (0 if name == "warmup" else 1)):
                raise ValueError(f"{name} must be an int >= {0 if name == 'warmup' else 1} or None, got {value!r}")
        self.random_resized_crop = RandomResizedCropSampler(scale=scale, ratio=ratio)
        self.alpha = float(alpha)
        self.threshold = float(threshold)
        self.warmup = warmup
        self.box_update_every = box_update_every
        self.boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(num_images, 1)
        self.use_boxes = False
        self.boxes_epoch: int | None = None  # the epoch whose start computed the current boxes

    # ------------------------------------------------------------------ schedule
    @property
    def scheduled(self) -> bool:
        return self.warmup is not None and self.box_update_every is not None

    def set_run_length(self, epochs: int, fraction: float = 0.2) -> None:
        """Fill an unset ``warmup`` / ``box_update_every`` with ``fraction`` of ``epochs`` (at least 1)."""
        step = max(1, round(fraction * epochs))
        if self.warmup is None:
            self.warmup = step
        if self.box_update_every is None:
            self.box_update_every = step

    def is_update_epoch(self, epoch: int) -> bool:
        """Whether the boxes are recomputed at the start of ``epoch`` (0-based)."""
        if not self.scheduled or epoch < self.warmup:
            return False
        return (epoch - self.warmup) % self.box_update_every == 0

    def on_epoch_start(self, epoch: int, compute_boxes: Callable[[], torch.Tensor]) -> bool:
        """The box-update hook: before ``epoch``'s data loading, recompute the boxes if the
        schedule says so (or if the run resumed past an update without boxes), and switch from
        RandomResizedCrop to box crops from epoch ``warmup`` on. Returns whether it updated.

        Boxes already computed at this epoch's start are kept: a run resumed in the middle of
        an update epoch restores them from its checkpoint, and recomputing them from the
        mid-epoch weights would change the rest of the epoch's crops."""
        updated = False
        resumed_without_boxes = self.scheduled and epoch >= self.warmup and self.boxes_epoch is None
        if (self.is_update_epoch(epoch) or resumed_without_boxes) and self.boxes_epoch != epoch:
            boxes = compute_boxes()
            if tuple(boxes.shape) != tuple(self.boxes.shape):
                raise ValueError(f"compute_boxes returned shape {tuple(boxes.shape)}, expected "
                                 f"{tuple(self.boxes.shape)}")
            self.boxes = boxes.detach().float().cpu()
            self.boxes_epoch = epoch
            updated = True
        self.use_boxes = self.scheduled and epoch >= self.warmup
        return updated

    # ------------------------------------------------------------------ sampling
    def crop_in_box(self, box: Sequence[float], height: int, width: int,
                    generator: torch.Generator) -> tuple[int, int, int, int]:
        """``(top, left, crop_h, crop_w)``: RandomResizedCrop's size, position from the box."""
        top0, left0, top1, left1 = (float(v) for v in box)

        def place(t: int, h: int, w: int) -> tuple[int, int]:
            ch0 = min(max(int(height * top0) - h // 2, 0), height - h)
            ch1 = min(max(int(height * top1) - h // 2, 0), height - h)
            cw0 = min(max(int(width * left0) - w // 2, 0), width - w)
            cw1 = min(max(int(width * left1) - w // 2, 0), width - w)
            top = ch0 + int((ch1 - ch0) * _beta(generator, self.alpha))
            return top, cw0 + int((cw1 - cw0) * _beta(generator, self.alpha))

        rrc = self.random_resized_crop
        return resized_crop_rule(height, width, rrc.ratio, rrc.tries(generator), place)

    def __call__(self, index: int, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        if not self.use_boxes:
            return self.random_resized_crop(index, height, width, generator)
        return self.crop_in_box(self.boxes[index].tolist(), height, width, generator)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the crops exactly."""
        return {"boxes": self.boxes.clone(), "use_boxes": self.use_boxes, "boxes_epoch": self.boxes_epoch,
                "warmup": self.warmup, "box_update_every": self.box_update_every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        boxes = torch.as_tensor(state["boxes"], dtype=torch.float32)
        if boxes.shape != self.boxes.shape:
            raise ValueError(f"boxes of shape {tuple(boxes.shape)} do not fit {self.boxes.shape[0]} images")
        self.boxes = boxes.clone()
        self.use_boxes = bool(state["use_boxes"])
        self.boxes_epoch = state["boxes_epoch"]
        self.warmup = state["warmup"]
        self.box_update_every = state["box_update_every"]

    def __repr__(self) -> str:
        return (f"ContrastiveCrop(images={self.boxes.shape[0]}, alpha={self.alpha}, threshold={self.threshold}, "
                f"warmup={self.warmup}, box_update_every={self.box_update_every}, use_boxes={self.use_boxes})")

