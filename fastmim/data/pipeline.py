"""fastmim's input pipeline: the CPU only decodes, the training device crops, resizes, flips and normalises.

The standard pipeline (Pillow decode, ``RandomResizedCrop(bicubic)``, flip, ``ToTensor``,
``Normalize`` per image in a worker) spends most of each worker's time on float work after the
decode. Here a worker does, per image:

1. read the file (``torchvision.io.read_file``) and its size from the header (JPEG ``SOF`` or PNG
   ``IHDR``: :func:`image_size`, microseconds; Pillow's header parser for other formats);
2. draw each view's crop box and flip *before* decoding: RandomResizedCrop's rule from the
   counter-based RNG keyed by ``(the image's augmentation seed, view)``
   (:func:`fastmim.ops.random_resized_crop_box`), or a :class:`~fastmim.data.CropSampler` such as
   ContrastiveCrop with a generator seeded by the same seed;
3. decode to ``uint8``: JPEG and PNG through ``torchvision.io`` (libjpeg-turbo, libpng), other
   formats through Pillow. Where every view's crop is at least 4, 8 or 16 times the output size
   in both directions (``draft=True``), a JPEG is decoded at 1/2, 1/4 or 1/8 size by libjpeg's
   scaled DCT (Pillow's ``draft``; the crops stay at least twice the output size) and the boxes
   are scaled to it: the one place the pixels are not torchvision's (libjpeg's DCT-domain
   downscale, then the bicubic one, instead of the bicubic one alone; boxes rounded onto the
   smaller image);

and :func:`collate_decoded` packs a batch into one ``uint8`` buffer (each image ``HWC``, the
decoders' order: one copy; in a worker, straight into shared memory) with its layout, boxes,
flips, labels and indices. The DataLoader pins it (``pin_memory=True``). No float work on the
CPU. On the training device :func:`views_on_device` turns a batch into the views with one
:func:`fastmim.ops.resized_crop_flip_normalize` call for all views (``(V * B, C, S, S)``).

``decode="gpu"`` keeps JPEGs encoded in the workers (header, boxes and the file's bytes only)
and decodes each batch's JPEGs with nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``
in the training process (other formats are still decoded by the workers); it needs a CUDA
device. A JPEG nvJPEG rejects is decoded again on the CPU; one that fails there too follows
``on_corrupt``: ``"error"`` raises :class:`~fastmim.data.DataError`, ``"skip"`` reuses the
batch's previous image (and its label) in its place.

Determinism: a batch's pixels are a function of the images, their augmentation seeds (from
:class:`~fastmim.data.TrainBatchSampler`: ``(run seed, epoch, index)``) and the view number,
whatever the number of workers or processes, so a resumed run sees the same batches. A corrupt
file is handled as :class:`~fastmim.data.ImageFolderDataset` does (``on_corrupt``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fastmim.data.datasets import DataError, ImageFolderDataset
from fastmim.ops.resized_crop import PackedImages, pack_images, random_resized_crop_box, resized_crop_flip_normalize

__all__ = ["DecodedImageFolder", "collate_decoded", "decode_image", "image_size", "views_on_device"]

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame; not DHT, JPG, DAC
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DECODE_MODES = ("cpu", "gpu")


@contextlib.contextmanager
def _torchvision_io() -> Iterator[None]:
    """``torchvision.io`` warns on every call since 0.29 (its codecs move to TorchCodec): silenced
    here, where the warning would otherwise repeat for every image of a run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        yield


def _format(data: memoryview) -> str | None:
    if len(data) >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF:
        return "jpeg"
    if len(data) >= 24 and bytes(data[:8]) == _PNG_SIGNATURE:
        return "png"
    return None


def image_size(data: bytes | np.ndarray | torch.Tensor) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's start-of-frame or a PNG's header, or ``None`` (another
    format, or a header this parser does not follow)."""
    view = memoryview(data.numpy() if isinstance(data, torch.Tensor) else data).cast("B")
    kind = _format(view)
    if kind == "png":
        if bytes(view[12:16]) != b"IHDR":
            return None
        width = int.from_bytes(view[16:20], "big")
        height = int.from_bytes(view[20:24], "big")
        return (height, width) if height > 0 and width > 0 else None
    if kind != "jpeg":
        return None
    pos, end = 2, len(view)
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = (view[pos + 2] << 8) | view[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            height = (view[pos + 5] << 8) | view[pos + 6]
            width = (view[pos + 7] << 8) | view[pos + 8]
            return (height, width) if height > 0 and width > 0 else None
        if marker == 0xDA or length < 2:  # scan data before any frame header: give up
            return None
        pos += 2 + length
    return None


def _pil_image(data: np.ndarray):
    from PIL import Image

    return Image.open(io.BytesIO(data.tobytes()))


def _pil_to_tensor(im, channels: int) -> torch.Tensor:
    im = im.convert("L" if channels == 1 else "RGB")
    array = np.asarray(im, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W) view of HWC pixels


def decode_image(data: torch.Tensor, channels: int = 3, *, reduce: int = 1) -> torch.Tensor:
    """``uint8 (C, H, W)`` pixels of an encoded image (a 1-D ``uint8`` tensor of the file's bytes),
    stored ``HWC`` (a permuted view). JPEG and 8-bit PNG through ``torchvision.io``, the rest through
    Pillow. ``reduce`` in ``{2, 4, 8}``: a JPEG decoded at that fraction of its size by libjpeg's
    scaled DCT (Pillow's ``draft``; the size is rounded up). Raises on an undecodable file."""
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    kind = _format(memoryview(data.numpy()))
    if kind == "jpeg" and reduce == 1:
        with _torchvision_io():
            return decode_jpeg(data, mode=mode)
    if kind == "png":
        with _torchvision_io():
            img = decode_png(data, mode=mode)
        if img.dtype == torch.uint8:
            return img
    im = _pil_image(data.numpy())
    if kind == "jpeg" and reduce > 1:
        width, height = im.size
        im.draft("L" if channels == 1 else "RGB", (max(1, width // reduce), max(1, height // reduce)))
    return _pil_to_tensor(im, channels)


def _draft_factor(boxes: Sequence[tuple[int, int, int, int]], out_h: int, out_w: int) -> int:
    """The largest of 8, 4, 2 that leaves every crop at least twice the output size, else 1: the
    bicubic filter still shrinks what the DCT scaling left (and a box's rounding onto the smaller
    image moves it by at most a quarter of an output pixel)."""
    for factor in (8, 4, 2):
        if all(h >= 2 * factor * out_h and w >= 2 * factor * out_w for _, _, h, w in boxes):
            return factor
    return 1


def _scale_box(box: tuple[int, int, int, int], height: int, width: int, new_h: int,
               new_w: int) -> tuple[int, int, int, int]:
    """A box of a ``height x width`` image on the same image decoded at ``new_h x new_w``."""
    top, left, h, w = box
    sy, sx = new_h / height, new_w / width
    t0, l0 = min(round(top * sy), new_h - 1), min(round(left * sx), new_w - 1)
    t1, l1 = min(max(round((top + h) * sy), t0 + 1), new_h), min(max(round((left + w) * sx), l0 + 1), new_w)
    return t0, l0, t1 - t0, l1 - l0


class DecodedImageFolder(Dataset):
    """The decode-only training set of an :class:`~fastmim.data.ImageFolderDataset` (see the module doc).

    Items are addressed by ``(index, aug_seed)`` (:class:`~fastmim.data.TrainBatchSampler`; a
    plain index uses itself as the seed). An item is ``{"image": uint8 (C, H, W) (HWC storage),
    "boxes": [(top, left, h, w)] * views, "flip": [bool] * views, "label", "index"}``, or with
    ``decode="gpu"`` for a JPEG ``{"encoded": uint8 (N,), "size": (H, W), ...}`` instead of
    ``"image"``.

    Args:
        folder: the image folder (its samples, classes, channels and ``on_corrupt``).
        size: the output size of the views (for the draft decision).
        num_views: views per image (CMAE: 2).
        crop_sampler: ``None`` for RandomResizedCrop from the counter-based RNG with ``scale`` and
            ``ratio``; else a :class:`~fastmim.data.CropSampler` (e.g. ContrastiveCrop), called
            with a generator seeded by the image's augmentation seed (the flip drawn after it).
        decode: ``"cpu"`` or ``"gpu"`` (JPEGs left encoded for nvJPEG).
        draft: allow libjpeg's scaled decode where every crop allows it.
    """

    def __init__(self, folder: ImageFolderDataset, size: int | tuple[int, int], *, num_views: int = 1,
                 crop_sampler: Any = None, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), decode: str = "cpu", draft: bool = True):
        if not isinstance(folder, ImageFolderDataset):
            raise TypeError(f"folder must be an ImageFolderDataset, got {type(folder).__name__}")
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.samples = folder.samples
        self.classes = folder.classes
        self.labels = folder.labels
        self.channels = folder.channels
        self.on_corrupt = folder.on_corrupt
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.num_views = num_views
        self.crop_sampler = crop_sampler
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.decode = decode
        self.draft = draft
        self._warned = False

    def __len__(self) -> int:
        return len(self.samples)

    def _views(self, index: int, seed: int, height: int, width: int) -> tuple[list, list]:
        if self.crop_sampler is None:
            draws = [random_resized_crop_box(height, width, seed=seed, counter=v, scale=self.scale, ratio=self.ratio)
                     for v in range(self.num_views)]
            return [d[:4] for d in draws], [d[4] for d in draws]
        generator = torch.Generator().manual_seed(seed)
        boxes, flips = [], []
        for _ in range(self.num_views):
            boxes.append(tuple(int(v) for v in self.crop_sampler(index, height, width, generator)))
            flips.append(bool(torch.rand((), generator=generator) < 0.5))
        return boxes, flips

    def _read(self, path: Path) -> tuple[torch.Tensor, tuple[int, int]]:
        """The file's bytes and its ``(height, width)``."""
        from torchvision.io import read_file

        with _torchvision_io():
            data = read_file(str(path))
        size = image_size(data)
        if size is None:  # a format (or a header) the parser does not read: Pillow's
            with _pil_image(data.numpy()) as im:
                size = (im.size[1], im.size[0])
        return data, size

    def _decode(self, path: Path, data: torch.Tensor, size: tuple[int, int], boxes: list) -> dict[str, Any]:
        height, width = size
        is_jpeg = _format(memoryview(data.numpy())) == "jpeg"
        if self.decode == "gpu" and is_jpeg:
            return {"encoded": data, "size": size, "boxes": boxes}
        factor = _draft_factor(boxes, *self.size) if (self.draft and is_jpeg) else 1
        img = decode_image(data, self.channels, reduce=factor)
        if tuple(img.shape[1:]) != (height, width):
            if factor == 1:
                raise DataError(f"{path}: the header says {height}x{width}, the decoder gave {tuple(img.shape[1:])}")
            boxes = [_scale_box(b, height, width, img.shape[1], img.shape[2]) for b in boxes]
        return {"image": img, "boxes": boxes}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        index, seed = int(index), int(seed)
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                data, size = self._read(path)
            except Exception as exc:  # any failure to read or parse this file
                self._corrupt(path, exc)
                continue
            boxes, flips = self._views(index, seed, *size)  # the crop sampler's errors are not the file's
            try:
                item = self._decode(path, data, size, boxes)
            except Exception as exc:  # any decoder failure of this file
                self._corrupt(path, exc)
                continue
            item.update(flip=flips, label=label, index=index)
            return item
        raise DataError("no image of the dataset could be decoded")

    def _corrupt(self, path: Path, exc: Exception) -> None:
        """``on_corrupt``: raise, or warn (once) and let the caller take the next image."""
        if self.on_corrupt == "error":
            raise DataError(f"corrupt image {path} ({type(exc).__name__}: {exc})") from None
        if not self._warned:
            warnings.warn(f"skipping undecodable image {path} ({type(exc).__name__}); using the next image instead",
                          stacklevel=3)
            self._warned = True


def _shared_buffer(numel: int) -> torch.Tensor | None:
    """A ``uint8`` buffer in shared memory when called in a DataLoader worker (as default_collate
    does: the batch then reaches the main process without another copy), else ``None``."""
    if torch.utils.data.get_worker_info() is None:
        return None
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=torch.uint8).new(storage).resize_(numel)


def collate_decoded(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch of :class:`DecodedImageFolder` items: ``{"images": PackedImages | None, "boxes": int32
    (V, B, 4), "flip": bool (V, B), "label": (B,), "index": (B,), "encoded": [uint8 (N,) | None] * B}``
    (``encoded`` only when some images are still encoded; ``images`` then packs the others, in
    batch order, and ``"encoded_size"`` holds the encoded ones' ``(H, W)``)."""
    decoded = [item["image"] for item in items if "image" in item]
    images = None
    if decoded:
        images = pack_images(decoded, out=_shared_buffer(sum(img.numel() for img in decoded)))
    batch = {
        "images": images,
        "boxes": torch.tensor([item["boxes"] for item in items], dtype=torch.int32).transpose(0, 1).contiguous(),
        "flip": torch.tensor([item["flip"] for item in items], dtype=torch.bool).transpose(0, 1).contiguous(),
        "label": torch.tensor([int(item["label"]) for item in items], dtype=torch.int64),
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.int64),
    }
    if len(decoded) < len(items):
        batch["encoded"] = [item.get("encoded") for item in items]
        batch["encoded_size"] = torch.tensor([item.get("size", (0, 0)) for item in items], dtype=torch.int64)
    return batch


def _decode_encoded(batch: dict[str, Any], device: torch.device, channels: int, on_corrupt: str,
                    decode_fn=None) -> tuple[list[torch.Tensor], list[int]]:
    """The batch's images as a list of ``(C, H, W)`` tensors on ``device``, the encoded ones decoded
    there (nvJPEG through ``torchvision.io.decode_jpeg(device=...)``, or ``decode_fn``), and the
    positions whose image could not be decoded and took the previous position's image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    if decode_fn is None:
        def decode_fn(datas):
            with _torchvision_io():
                return decode_jpeg(datas, mode=mode, device=device)

    encoded = batch["encoded"]
    positions = [b for b, e in enumerate(encoded) if e is not None]
    try:
        decoded = list(decode_fn([encoded[b] for b in positions]))
    except RuntimeError:  # one bad file fails the whole call: one by one, then on the CPU
        decoded = []
        for b in positions:
            try:
                decoded.append(decode_fn([encoded[b]])[0])
            except RuntimeError:
                try:
                    decoded.append(decode_image(encoded[b].cpu(), channels).to(device))
                except Exception as exc:
                    if on_corrupt == "error":
                        raise DataError(f"corrupt image (dataset index {int(batch['index'][b])}): "
                                        f"{type(exc).__name__}: {exc}") from None
                    decoded.append(None)
    by_position = dict(zip(positions, decoded, strict=True))
    cpu_views = []
    if batch["images"] is not None:  # the images the workers decoded (formats nvJPEG does not read)
        host = batch["images"]
        data = host.data.to(device, non_blocking=device.type == "cuda")
        cpu_views = [data.as_strided((host.channels, h, w), (sc, sh, sw), data.storage_offset() + offset)
                     for offset, h, w, sc, sh, sw in host.layout.tolist()]
    images, replaced, k = [], [], 0
    for b, e in enumerate(encoded):
        if e is None:
            images.append(cpu_views[k])
            k += 1
        elif by_position[b] is not None:
            images.append(by_position[b])
        else:
            if not images:
                raise DataError(f"the first image of a batch (dataset index {int(batch['index'][b])}) could not be "
                                f"decoded: no previous image can take its place")
            warnings.warn(f"skipping an undecodable image (dataset index {int(batch['index'][b])}): the batch's "
                          f"previous image takes its place", stacklevel=2)
            images.append(images[-1])
            replaced.append(b)
    return images, replaced


@functools.lru_cache(maxsize=8)
def _device_stats(mean: tuple[float, ...], std: tuple[float, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation statistics on ``device``, copied there once per run, not every step."""
    return (torch.tensor(mean, dtype=torch.float32).to(device), torch.tensor(std, dtype=torch.float32).to(device))


def views_on_device(batch: dict[str, Any], device: torch.device | str, size: int | tuple[int, int],
                    mean: Sequence[float], std: Sequence[float], *, dtype: torch.dtype = torch.float32,
                    on_corrupt: str = "skip") -> dict[str, Any]:
    """A :func:`collate_decoded` batch -> ``{"views": [(B, C, S, S)] * V, "label", "index"}`` on
    ``device``: one :func:`~fastmim.ops.resized_crop_flip_normalize` call for every view of every
    image (the CPU's copies are asynchronous from pinned memory)."""
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    boxes, flip = batch["boxes"], batch["flip"]
    views = boxes.shape[0]
    labels = batch["label"]
    if "encoded" in batch:
        if device.type != "cuda":
            raise DataError(f"encoded images (decode='gpu') need a CUDA device to decode on, got {device}")
        images, replaced = _decode_encoded(batch, device, len(mean), on_corrupt)
        if replaced:  # a replacing image brings its label, boxes and flips
            labels, boxes, flip = labels.clone(), boxes.clone(), flip.clone()
            for b in replaced:
                labels[b], boxes[:, b], flip[:, b] = labels[b - 1], boxes[:, b - 1], flip[:, b - 1]
        packed = pack_images(images)
        layout = packed.layout
    else:
        packed = batch["images"].to(device, non_blocking=non_blocking)
        layout = packed.layout
    batch_size = layout.shape[0]
    if views > 1:  # every view of every image in one call: the layout repeats per view
        packed = PackedImages(packed.data, layout.repeat(views, 1), packed.channels)
    mean_t, std_t = _device_stats(tuple(float(m) for m in mean), tuple(float(s) for s in std), device)
    out = resized_crop_flip_normalize(packed, boxes.reshape(-1, 4).to(device, non_blocking=non_blocking),
                                      size, flip.reshape(-1).to(device, non_blocking=non_blocking), mean_t, std_t,
                                      dtype=dtype)
    return {"views": list(out.split(batch_size)), "label": labels.to(device, non_blocking=non_blocking),
            "index": batch["index"]}
