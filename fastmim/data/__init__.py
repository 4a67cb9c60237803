"""Datasets, augmentations and the deterministic batch order of fastmim's training job.

- :func:`open_data` — ``"default"`` (the bundled Animal-MNIST, see ``animal_mnist.md``) or an
  image folder; returns a :class:`DataSource` with a train and a held-out split.
- :class:`ViewTransform` / :class:`EvalTransform` — augmented and evaluation views; a
  :class:`CropSampler` (default :class:`RandomResizedCropSampler`) chooses each crop, the
  hook where ContrastiveCrop plugs in.
- :class:`TrainBatchSampler` — per-epoch order and augmentation seeds from the run seed,
  sharded over processes, resumable at any batch.
- :func:`build_views` — the views a method trains on (one, or two for CMAE/LUT).
- :class:`ContrastiveCrop` — CMAE's crop sampler around heat-map boxes of the model's features.
- :mod:`fastmim.data.pipeline` — the input pipeline where workers only decode (``uint8``, packed
  batches) and :func:`views_on_device` makes the views on the training device with
  :func:`fastmim.ops.resized_crop_flip_normalize`.
"""

from __future__ import annotations

from fastmim.data.contrastive_crop import ContrastiveCrop
from fastmim.data.datasets import (
    ANIMAL_MNIST_PATH,
    ArrayImageDataset,
    DataError,
    DataSource,
    ImageDataset,
    ImageFolderDataset,
    open_data,
)
from fastmim.data.pipeline import DecodedImageFolder, collate_decoded, views_on_device
from fastmim.data.sampler import TrainBatchSampler, derive_seed
from fastmim.data.transforms import (
    CropSampler,
    EvalTransform,
    RandomResizedCropSampler,
    ViewTransform,
)

__all__ = [
    "ANIMAL_MNIST_PATH",
    "ArrayImageDataset",
    "ContrastiveCrop",
    "CropSampler",
    "DataError",
    "DataSource",
    "DecodedImageFolder",
    "EvalTransform",
    "ImageDataset",
    "ImageFolderDataset",
    "RandomResizedCropSampler",
    "TrainBatchSampler",
    "ViewTransform",
    "build_views",
    "collate_decoded",
    "derive_seed",
    "open_data",
    "views_on_device",
]


def build_views(source: DataSource, size: int, *, num_views: int = 1, second_view: str = "same",
                crop_sampler: CropSampler | None = None, scale: tuple[float, float] = (0.2, 1.0)) -> list:
    """The training views for ``source`` at ``size`` pixels.

    ``num_views=1``: MAE's RandomResizedCrop(scale) + flip + normalise. ``num_views=2``: two
    independent such views (CMAE); ``second_view="photometric"`` adds LUT's colour jitter /
    grayscale / solarize / blur to the second one. ``crop_sampler`` (e.g. ContrastiveCrop)
    replaces the random-resized-crop position sampling of every view.
    """
    if num_views not in (1, 2):
        raise ValueError(f"num_views must be 1 or 2, got {num_views}")
    if second_view not in ("same", "photometric"):
        raise ValueError(f"second_view must be 'same' or 'photometric', got {second_view!r}")
    sampler = crop_sampler if crop_sampler is not None else RandomResizedCropSampler(scale=scale)
    views = [ViewTransform(size, source.mean, source.std, crop_sampler=sampler)]
    if num_views == 2:
        views.append(ViewTransform(size, source.mean, source.std, crop_sampler=sampler,
                                   photometric=second_view == "photometric"))
    return views
