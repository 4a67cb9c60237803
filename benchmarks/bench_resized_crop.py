"""Benchmark of resized_crop_flip_normalize: a batch of decoded uint8 images to normalised training views.

Case ``views-<size>px``: ``B`` images of 500 x 375 / 375 x 500 pixels (``uint8``, packed ``HWC`` as
fastmim's loader delivers them), one RandomResizedCrop box (scale (0.2, 1)) and flip per image
from the counter RNG, resized to ``size`` (224; bicubic, antialiased), flipped, normalised with
the ImageNet statistics, float32 out. ``B`` = 256 on CUDA, 16 on the CPU.

Providers measured in the same run: ``fastmim-<backend>`` (Triton on CUDA; csrc on the CPU, or the
Triton interpreter in ``--smoke`` runs), ``fastmim-reference`` (the op's PyTorch definition: per
image, two ``interpolate`` passes) and ``torchvision`` (``transforms.v2.functional`` per image on the
``uint8`` tensor: ``resized_crop(BICUBIC, antialias=True)``, ``horizontal_flip``, ``to_dtype``,
``normalize``, then ``torch.stack``: what a loader that moved torchvision's transform onto the
device would run).

Bytes per case: what the op must move at least, the same for every provider: each crop's pixels
read once (``uint8``) and the output written once (float32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

from fastmim.ops import pack_images, random_resized_crop_boxes, resized_crop_flip_normalize, use_backend  # noqa: E402
from fastmim.ops._dispatch import backend_status, select_backend  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_case(batch: int, sizes: tuple[tuple[int, int], ...], out: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = []
    for b in range(batch):
        h, w = sizes[b % len(sizes)]
        # smooth content (a photo's range of values), stored HWC as decoders write it
        low = torch.rand(1, 3, h // 8, w // 8, generator=g) * 255
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        images.append(img.round().to(torch.uint8).permute(1, 2, 0).contiguous().permute(2, 0, 1))
    packed = pack_images(images)
    boxes = random_resized_crop_boxes(packed.layout[:, 1], packed.layout[:, 2], seed=seed)
    crop_pixels = int((boxes.boxes[:, 2].long() * boxes.boxes[:, 3].long()).sum())
    moved = 3 * crop_pixels + batch * 3 * out * out * 4
    packed = packed.to(device)
    return (packed, boxes.boxes.to(device), boxes.flip.to(device), [img.to(device) for img in images]), moved


def fastmim_views(packed, boxes, flip, images, out):
    return resized_crop_flip_normalize(packed, boxes, out, flip, MEAN, STD)


def torchvision_views(packed, boxes, flip, images, out):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    views = []
    for img, (top, left, h, w), flipped in zip(images, boxes.tolist(), flip.tolist(), strict=True):
        x = F.resized_crop(img, top, left, h, w, [out, out], InterpolationMode.BICUBIC, antialias=True)
        if flipped:
            x = F.horizontal_flip(x)
        views.append(F.normalize(F.to_dtype(x, torch.float32, scale=True), list(MEAN), list(STD)))
    return torch.stack(views)


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    if args.smoke:
        batch, sizes, out = 2, ((20, 15), (15, 20)), 8
    elif on_cuda:
        batch, sizes, out = 256, ((375, 500), (500, 375)), 224
    else:
        batch, sizes, out = 16, ((375, 500), (500, 375)), 224
    backend = select_backend("resized_crop_flip_normalize", torch.device(device),
                             implemented=("reference", "triton", "csrc") if not on_cuda else ("reference", "triton"),
                             prefer_cpu=("csrc",))
    if args.smoke and not on_cuda and backend_status("cpu")["triton"] is None:
        backend = "triton"  # the interpreter: exercise the kernel path
    providers = {f"fastmim-{backend}": (fastmim_views, backend), "fastmim-reference": (fastmim_views, "reference"),
                 "torchvision": (torchvision_views, None)}
    ceilings = harness.measure_ceilings(device, smoke=args.smoke)
    arg_sets, moved = [], []
    for seed in range(1 if on_cuda else 2):
        case, nbytes = make_case(batch, sizes, out, device, seed)
        arg_sets.append((*case, out))
        moved.append(nbytes)
    records = []
    for provider, (fn, forced) in providers.items():
        with use_backend(forced):
            ms = harness.time_ms(fn, arg_sets, device=device, smoke=args.smoke, warmup=5, rep=30)
        shape = dict(B=batch, image_sizes=[list(s) for s in sizes], size=out, dtype="float32", layout="packed HWC")
        records.append(harness.Record(f"views-{out}px", provider, ms, shape, bytes_moved=sum(moved) / len(moved)))
    notes = ("bytes = each crop's uint8 pixels read once + the float32 output written once (the minimum, the same "
             "for every provider); boxes: RandomResizedCrop scale (0.2, 1) from the counter RNG, half flipped")
    harness.write_results("bench_resized_crop", records, ceilings, args, notes=notes)


if __name__ == "__main__":
    main()
