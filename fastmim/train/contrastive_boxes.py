"""ContrastiveCrop's boxes from the model being trained (the ``cmae`` adapter's hook).

:class:`fastmim.data.ContrastiveCrop` turns heat maps into boxes and boxes into crops; this
module runs the model over the training images to get them: every image resized whole, the
model's :func:`~fastmim.models.vit.patch_features`, :func:`~fastmim.data.contrastive_crop.heatmap_boxes`. It lives
with the training loop because it needs what only a run has: the model, its process group and
its FSDP sharding.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fastmim.data.contrastive_crop import heatmap_boxes, whole_image
from fastmim.models.vit import patch_features

__all__ = ["compute_boxes"]


@contextmanager
def _as_root_forward(model: nn.Module, features: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                     ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """``imgs -> features(model, imgs)``; under FSDP2 (``model`` the ``fully_shard`` root) run as
    a forward of the root, so FSDP gathers the root's parameters (``patch_embed``, ``pos_embed``,
    ...) and sets up its sharded blocks as in a training forward. Calling them outside the root's
    forward would meet sharded ``DTensor`` parameters, or, before the first training step, make
    a block FSDP's root. The root is resharded afterwards, as the pass found it."""
    fsdp_module = None
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        fsdp_module = FSDPModule
    if fsdp_module is None or not isinstance(model, fsdp_module):
        yield lambda imgs: features(model, imgs)
        return
    name = "_contrastive_crop_features"
    setattr(model, name, types.MethodType(features, model))
    register_fsdp_forward_method(model, name)
    try:
        yield getattr(model, name)
    finally:
        delattr(model, name)
        model.reshard()


@torch.no_grad()
def compute_boxes(model: nn.Module, dataset: Any, *, image_size: int, mean: Sequence[float], std: Sequence[float],
                  threshold: float = 0.1, batch_size: int = 256, device: torch.device | str | None = None,
                  features: Callable[[nn.Module, torch.Tensor], torch.Tensor] = patch_features) -> torch.Tensor:
    """Boxes ``(N, 4)`` of every image of ``dataset`` (``load(index) -> uint8 (C, H, W)``) from
    ``model``'s heat maps (:func:`~fastmim.data.contrastive_crop.heatmap_boxes` with ``threshold``), each image
    resized whole to ``image_size``.

    The model runs in eval mode (restored afterwards). Under an initialised process group
    each rank computes a contiguous share of ``ceil(N / world)`` images and the shares are
    all-gathered (on ``device``, so NCCL gets CUDA tensors); the last ranks fill their share
    with the last image (rows dropped after the gather), so that every rank runs the same
    batches: under FSDP2 each one is collectives all ranks join, and ``features`` runs as a
    forward of the ``fully_shard`` root (see :func:`_as_root_forward`).
    """
    num = len(dataset)
    if device is None:
        device = next(model.parameters()).device
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    share = -(-num // world)
    indices = [min(i, num - 1) for i in range(rank * share, (rank + 1) * share)]
    was_training = model.training
    model.eval()
    try:
        parts = []
        with _as_root_forward(model, features) as run:
            for start in range(0, share, batch_size):
                imgs = torch.stack([whole_image(dataset.load(i), image_size, mean, std)
                                    for i in indices[start:start + batch_size]]).to(device)
                parts.append(heatmap_boxes(run(imgs), image_size, threshold))
    finally:
        model.train(was_training)
    local = torch.cat(parts)
    if world == 1:
        return local.cpu()
    gathered = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local)
    return torch.cat(gathered)[:num].cpu()
