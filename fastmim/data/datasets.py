"""Datasets: the bundled Animal-MNIST and image folders, with train / held-out splits.

Every dataset stores or decodes images as ``uint8 (C, H, W)`` and applies a list of view
transforms (one view for MAE/supervised+MIM, two for CMAE/LUT). An item is a dict
``{"views": [tensor, ...], "label": int, "index": int}``; the default collate turns a
batch into ``{"views": [(B, C, S, S), ...], "label": (B,), "index": (B,)}``.

Items are addressed either by ``index`` (deterministic views: evaluation) or by
``(index, seed)`` pairs from :class:`fastmim.data.sampler.TrainBatchSampler`; the seed drives
every random draw of that item's augmentations.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "ImageDataset",
    "ArrayImageDataset",
    "ImageFolderDataset",
    "DataSource",
    "open_data",
    "ANIMAL_MNIST_PATH",
    "IMAGE_EXTENSIONS",
]

ANIMAL_MNIST_PATH = Path(__file__).with_name("animal_mnist.npz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = (0.449,), (0.226,)
# Train-split pixel statistics of the bundled Animal-MNIST (see animal_mnist.md).
ANIMAL_MNIST_MEAN, ANIMAL_MNIST_STD = (0.2728,), (0.4057,)

ViewFn = Callable[[torch.Tensor, int, "torch.Generator | None"], torch.Tensor]


class DataError(ValueError):
    """Unusable data (missing or empty folder, corrupt image with ``on_corrupt="error"``)."""


class ImageDataset(Dataset):
    """Base class: subclasses define ``__len__``, ``load(index) -> uint8 (C, H, W)`` and
    ``labels``/``classes``; one that may load another image than ``index``'s overrides
    :meth:`load_item` so the label follows the image. ``views`` are callables
    ``(img, index, generator) -> tensor``."""

    classes: Sequence[str]
    labels: torch.Tensor

    def __init__(self, views: Sequence[ViewFn] = ()):
        self.views = list(views)

    def load(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def load_item(self, index: int) -> tuple[torch.Tensor, int]:
        """``(image, label)`` of ``index``, both of the same file."""
        return self.load(index), int(self.labels[index])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        img, label = self.load_item(index)
        views = [view(img, index, generator) for view in self.views]
        return {"views": views, "label": label, "index": index}


class ArrayImageDataset(ImageDataset):
    """Images held in memory: ``images uint8 (N, C, H, W)``, ``labels int64 (N,)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 views: Sequence[ViewFn] = ()):
        super().__init__(views)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _verify_image(path: Path) -> str | None:
    """``None`` if PIL can parse ``path``'s header and structure, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return f"{type(exc).__name__}: {exc}"
    return None


class ImageFolderDataset(ImageDataset):
    """Images in class sub-folders (``root/<class>/<image>.jpg``), decoded on access with PIL.

    Files are checked when the folder is scanned (``PIL.Image.verify``). A corrupt file is
    skipped with one warning counting them all (``on_corrupt="skip"``, the default) or
    raises :class:`DataError` naming it (``on_corrupt="error"``). A file that passes the scan
    but fails to decode later (e.g. a truncated JPEG body) is handled the same way at load
    time: skipped means the next image in the folder order is used instead, with its label.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], classes: Sequence[str], *, channels: int = 3,
                 on_corrupt: str = "skip", views: Sequence[ViewFn] = ()):
        super().__init__(views)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        self.samples = list(samples)
        self.classes = list(classes)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.channels = channels
        self.on_corrupt = on_corrupt
        self._warned_load = False

    @staticmethod
    def scan(root: str | Path, on_corrupt: str = "skip") -> tuple[list[tuple[Path, int]], list[str]]:
        """List ``(path, label)`` of the valid images under ``root``'s class sub-folders."""
        root = Path(root)
        if not root.exists():
            raise DataError(f"data folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"data path {root} is not a folder (expected class sub-folders of JPEG/PNG images)")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_class = [(d.name, sorted(f for f in d.rglob("*") if _is_image_file(f))) for d in class_dirs]
        per_class = [(name, files) for name, files in per_class if files]
        if not per_class:
            loose = [f for f in root.iterdir() if _is_image_file(f)]
            hint = " (images must sit in class sub-folders, e.g. root/cat/1.jpg)" if loose else ""
            raise DataError(f"data folder {root} holds no class sub-folders with JPEG/PNG images{hint}")
        classes = [name for name, _ in per_class]
        samples, corrupt = [], []
        for label, (_, files) in enumerate(per_class):
            for f in files:
                reason = _verify_image(f)
                if reason is None:
                    samples.append((f, label))
                elif on_corrupt == "error":
                    raise DataError(f"corrupt image {f} ({reason}); pass --on-corrupt skip to skip such files")
                else:
                    corrupt.append(f)
        if corrupt:
            warnings.warn(f"skipped {len(corrupt)} corrupt image file(s) under {root} (first: {corrupt[0]})",
                          stacklevel=2)
        if not samples:
            raise DataError(f"data folder {root} holds no readable images")
        return samples, classes

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, path: Path) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            array = np.asarray(im, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def load(self, index: int) -> torch.Tensor:
        return self.load_item(index)[0]

    def load_item(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                return self._decode(path), label
            except Exception as exc:  # any decoder failure of this file
                if self.on_corrupt == "error":
                    raise DataError(f"corrupt image {path} ({type(exc).__name__}: {exc})") from None
                if not self._warned_load:
                    warnings.warn(f"skipping undecodable image {path} ({type(exc).__name__}); "
                                  f"using the next image instead", stacklevel=2)
                    self._warned_load = True
        raise DataError("no image of the dataset could be decoded")


@dataclass
class DataSource:
    """A dataset's two splits (without views; :meth:`split` attaches them) and its facts."""

    name: str
    train: ImageDataset
    test: ImageDataset
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_crop_pct: float  # centre-crop fraction of the evaluation transform
    classes: list[str]

    def split(self, name: str, views: Sequence[ViewFn]) -> ImageDataset:
        """``name`` in ``("train", "test")``: a shallow copy of that split with ``views``."""
        dataset = copy.copy({"train": self.train, "test": self.test}[name])
        dataset.views = list(views)
        return dataset


def _load_animal_mnist() -> DataSource:
    with np.load(ANIMAL_MNIST_PATH, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    classes = [str(c) for c in arrays["classes"]]

    def make(split: str) -> ArrayImageDataset:
        images = torch.from_numpy(arrays[f"{split}_images"]).unsqueeze(1)  # (N, 1, 28, 28)
        return ArrayImageDataset(images, torch.from_numpy(arrays[f"{split}_labels"]), classes)

    return DataSource("animal-mnist", make("train"), make("test"), channels=1, mean=ANIMAL_MNIST_MEAN,
                      std=ANIMAL_MNIST_STD, eval_crop_pct=1.0, classes=classes)


def _stratified_holdout(samples: list[tuple[Path, int]], fraction: float, root: Path,
                        seed: int = 0) -> tuple[list, list]:
    """``fraction`` of each class held out, at least one image of every class that has two (and
    at least one left to train on); :class:`DataError` if nothing can be held out."""
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in samples])
    test_index = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = min(len(members) - 1, max(1, int(round(len(members) * fraction))))
        test_index.extend(members[:n_test].tolist())
    if not test_index:
        raise DataError(f"data folder {root} has one image per class, so none can be held out for evaluation; "
                        f"add images or give train/ and val/ sub-folders")
    test_set = set(test_index)
    train = [s for i, s in enumerate(samples) if i not in test_set]
    test = [s for i, s in enumerate(samples) if i in test_set]
    return train, test


def open_data(data: str, *, channels: int = 3, on_corrupt: str = "skip", holdout_fraction: float = 0.1) -> DataSource:
    """Open ``data``: ``"default"`` (the bundled Animal-MNIST: 9,000 train / 1,000 held-out,
    one channel) or a folder.

    A folder either has ``train/`` and ``val/`` (or ``test/``) sub-folders, each with class
    sub-folders, or class sub-folders directly; then a fixed stratified ``holdout_fraction``
    of each class (``numpy.random.default_rng(0)``) is held out, at least one image of each
    class with two or more.
    """
    if data == "default":
        return _load_animal_mnist()
    root = Path(data)
    held_out_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and held_out_dir is not None:
        train_samples, classes = ImageFolderDataset.scan(root / "train", on_corrupt)
        test_samples, test_classes = ImageFolderDataset.scan(held_out_dir, on_corrupt)
        index = {name: i for i, name in enumerate(classes)}
        unknown = [c for c in test_classes if c not in index]
        if unknown:
            raise DataError(f"{held_out_dir} has classes missing from {root / 'train'}: {', '.join(unknown[:5])}")
        test_samples = [(p, index[test_classes[label]]) for p, label in test_samples]
    else:
        samples, classes = ImageFolderDataset.scan(root, on_corrupt)
        train_samples, test_samples = _stratified_holdout(samples, holdout_fraction, root)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD)

    def make(samples: list) -> ImageFolderDataset:
        return ImageFolderDataset(samples, classes, channels=channels, on_corrupt=on_corrupt)

    return DataSource(str(root), make(train_samples), make(test_samples), channels=channels, mean=mean, std=std,
                      eval_crop_pct=0.875, classes=classes)
