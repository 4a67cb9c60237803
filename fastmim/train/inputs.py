"""A training run's input: which pipeline it takes, its train set, and the loader of each epoch.

Image folders take the fastmim input pipeline by default (``--input fastmim``): the workers
only decode to uint8 and the views are made on the training device
(:func:`fastmim.data.views_on_device`, which the loop calls on each batch). The bundled data,
``--input torchvision`` and LUT's photometric second view take the float augmentations in
the workers. The data order of an epoch is a function of ``(seed, epoch, position)``, so a
resumed run goes on with the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastmim.data import (
    DataSource,
    DecodedImageFolder,
    ImageFolderDataset,
    TrainBatchSampler,
    build_views,
    collate_decoded,
    derive_seed,
)
from fastmim.train.config import TrainConfig, TrainError
from fastmim.train.methods import MethodAdapter

__all__ = ["LOADER_SALT", "default_num_workers", "epoch_loader", "takes_device_views", "train_dataset"]

# Salt of the DataLoader generator's seed of each epoch (fastmim.data.derive_seed).
LOADER_SALT = 7


def takes_device_views(cfg: TrainConfig, source: DataSource, adapter: MethodAdapter, device: torch.device,
                       is_main: bool) -> bool:
    """Whether the run takes the fastmim input pipeline: image folders under ``--input fastmim``,
    except LUT's photometric second view (colour jitter, blur, solarize), made on the CPU."""
    folder = isinstance(source.train, ImageFolderDataset)
    if cfg.decode == "gpu":
        if not folder:
            raise TrainError("--decode gpu decodes image files: the bundled data is held decoded in memory")
        if device.type != "cuda":
            raise TrainError(f"--decode gpu decodes JPEGs with nvJPEG (torchvision.io.decode_jpeg on CUDA) and "
                             f"needs a CUDA device; this run is on {device.type} (use --decode cpu)")
    if cfg.input != "fastmim" or not folder:
        return False
    if adapter.second_view == "photometric":
        if cfg.decode == "gpu":
            raise TrainError(f"--decode gpu: {cfg.method}'s photometric second view is made on the CPU, from "
                             f"pixels decoded there (use --decode cpu)")
        if is_main:
            print(f"fastmim train: {cfg.method}'s photometric second view runs on the CPU: its views come from "
                  f"the float augmentations in the workers (as --input torchvision)", file=sys.stderr)
        return False
    return True


def train_dataset(source: DataSource, image_size: int, adapter: MethodAdapter, crop_sampler: Any, *,
                  device_views: bool, decode: str) -> Dataset:
    """The train split as the method's views: decoded uint8 images and their crop boxes with
    ``device_views`` (the views are then made on the device), else the augmented float views."""
    if device_views:
        return DecodedImageFolder(source.train, image_size, num_views=adapter.num_views, crop_sampler=crop_sampler,
                                  decode=decode)
    views = build_views(source, image_size, num_views=adapter.num_views, second_view=adapter.second_view,
                        crop_sampler=crop_sampler)
    return source.split("train", views)


def default_num_workers(device: torch.device) -> int:
    """0 on CPU (the main process loads the data); on GPUs up to 8 per process of this node."""
    if device.type == "cpu":
        return 0
    return min(8, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _seed_worker(worker_id: int) -> None:
    # Augmentations use per-sample generators; this only keeps any stray numpy/random use seeded.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def epoch_loader(train_set: Dataset, sampler: TrainBatchSampler, *, epoch: int, position: int, seed: int,
                 num_workers: int, device: torch.device, device_views: bool) -> DataLoader:
    """The micro-batches of ``epoch`` from ``position`` on, in the order ``seed`` gives it."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, LOADER_SALT))
    return DataLoader(train_set, batch_sampler=sampler.epoch(epoch, position), num_workers=num_workers,
                      pin_memory=device.type == "cuda", worker_init_fn=_seed_worker, generator=generator,
                      persistent_workers=False, collate_fn=collate_decoded if device_views else None)
