"""Input pipeline benchmark: images/s on one CPU core, and the cores one GPU needs to be fed.

Pipelines, each on the same images (one core: ``torch.set_num_threads(1)``, no DataLoader
workers: what one worker process does), batches of ``--batch-size`` including collation:

- ``torchvision``: the official MAE training transform on Pillow images (``pil_loader``,
  ``RandomResizedCrop(size, scale=(0.2, 1), interpolation=BICUBIC)``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize``), ``default_collate``: what the official MAE scripts run in every
  worker.
- ``fastmim-cpu-stage``: what stays on the CPU when training on a GPU with fastmim's pipeline
  (``fastmim.data.pipeline``): read the file, its size from the header, the crop box and flip from
  the counter RNG, decode to ``uint8`` (libjpeg-turbo through ``torchvision.io``; Pillow's
  scaled-DCT ``draft`` where the crop allows), pack the batch into one buffer.
- ``fastmim-cpu-full``: the whole fastmim pipeline on the CPU: the stage above, then
  ``resized_crop_flip_normalize`` on the CPU (the csrc kernel, one thread).

The pipelines take turns batch by batch (interleaved), over ``--rounds`` passes; each figure is
the median over the passes of images per second of the process's CPU time (``time.process_time``:
one core's throughput even on a machine other processes share; the wall-clock figures are
recorded beside them). The table converts them into the cores one GPU
needs at the step rate the cost model projects (``benchmarks/results/cost_model.json``: batch
256 / projected ms, H100) for MAE ViT-B/16 and ViT-L/16. The last stdout line is a JSON object
(``fastmim_cpu_img_s``, ``torchvision_img_s``, ``fastmim_full_cpu_img_s``, ``ratio``, ...).

``--data DIR``: an image folder (class sub-folders); without it, ``--images`` synthetic 500 x 375
JPEGs (quality 90; smooth colour fields, shapes and grain) are written to a temporary folder
first. ``--smoke``: a few tiny images, one pass (checks the script runs).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

from fastmim.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset  # noqa: E402
from fastmim.data.pipeline import DecodedImageFolder, collate_decoded, views_on_device  # noqa: E402

COST_MODEL = Path(__file__).resolve().parent / "results" / "cost_model.json"
# Used when the cost model's results are absent: MAE ViT-B/16 and ViT-L/16, fastmim, batch 256 (ms).
PROJECTED_MS = {"MAE ViT-B/16": 32.96, "MAE ViT-L/16": 63.10}


def make_jpeg_folder(root: Path, count: int, size: tuple[int, int] = (500, 375), seed: int = 0,
                     classes: int = 4) -> Path:
    """``count`` synthetic JPEGs (``size`` = (long side, short side), alternately landscape and
    portrait; quality 90) in ``classes`` class folders under ``root``: smooth colour fields, a dozen
    ellipses and Gaussian grain, so the files decode like photographs rather than noise or flat
    colour."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = size if i % 3 else size[::-1]
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        img = np.zeros((h, w, 3))
        for c in range(3):
            for _ in range(4):
                fx, fy = rng.uniform(0.5, 12, 2)
                img[..., c] += rng.uniform(0.2, 1) * np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 6.3))
        img = (img - img.min()) / (img.max() - img.min() + 1e-9) * 255
        im = Image.fromarray(img.astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            draw.ellipse([x0, y0, x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 200))],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        grain = np.asarray(im).astype(np.int16) + rng.normal(0, 8, (h, w, 3)).astype(np.int16)
        Image.fromarray(grain.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def torchvision_pipeline(size: int):
    from torch.utils.data import default_collate
    from torchvision import transforms
    from torchvision.datasets.folder import pil_loader

    transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])

    def run(samples, seeds):
        return default_collate([(transform(pil_loader(str(path))), label) for (path, label), _ in
                                zip(samples, seeds, strict=True)])

    return run


def fastmim_pipelines(samples, size: int):
    folder = ImageFolderDataset(samples, ["x"], channels=3)
    dataset = DecodedImageFolder(folder, size)

    def stage(indices, seeds):
        return collate_decoded([dataset[(i, s)] for i, s in zip(indices, seeds, strict=True)])

    def full(indices, seeds):
        return views_on_device(stage(indices, seeds), "cpu", size, IMAGENET_MEAN, IMAGENET_STD)["views"][0]

    return stage, full


def cores_table(rates: dict[str, float]) -> tuple[list[dict], str]:
    """Cores per GPU each pipeline needs at the cost model's projected step rates."""
    projected = dict(PROJECTED_MS)
    source = "fallback figures"
    if COST_MODEL.exists():
        payload = json.loads(COST_MODEL.read_text())
        for record in payload["records"]:
            name = {"vit_b16": "MAE ViT-B/16", "vit_l16": "MAE ViT-L/16"}.get(record["model"])
            if record["method"] == "mae" and record["config"] == "fastmim" and name:
                projected[name] = record["projected_ms"] * 256 / record["batch"]
        source = f"{COST_MODEL.name} (modelled, H100)"
    rows = []
    for model, ms in projected.items():
        step_rate = 256 / (ms * 1e-3)
        rows.append({"model": model, "projected_ms": round(ms, 2), "images_per_s": round(step_rate),
                     **{f"cores_{name}": round(step_rate / rate, 1) for name, rate in rates.items()}})
    return rows, source


def main(argv=None):
    def extra(parser):
        parser.add_argument("--data", type=Path, default=None, help="image folder (default: synthetic JPEGs)")
        parser.add_argument("--images", type=int, default=200, help="images per pass (default: 200)")
        parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
        parser.add_argument("--rounds", type=int, default=5, help="passes over the images (default: 5)")
        parser.add_argument("--size", type=int, default=224, help="output size (default: 224)")

    args = harness.parse_args(__doc__.splitlines()[0], argv, extra)
    torch.set_num_threads(1)
    tmp = None
    if args.smoke:
        args.images, args.batch_size, args.rounds, args.size = 6, 3, 1, 32
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory()
        size = (48, 36) if args.smoke else (500, 375)
        data = make_jpeg_folder(Path(tmp.name), args.images, size=size)
    samples, _ = ImageFolderDataset.scan(data)
    if len(samples) < args.images:
        raise SystemExit(f"{data} holds {len(samples)} readable images, fewer than --images {args.images}")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(samples))[:args.images].tolist()
    samples = [samples[i] for i in order]
    seeds = rng.integers(0, 2**62, len(samples)).tolist()
    baseline = torchvision_pipeline(args.size)
    stage, full = fastmim_pipelines(samples, args.size)
    batches = [list(range(i, min(i + args.batch_size, len(samples)))) for i in range(0, len(samples), args.batch_size)]
    providers = {
        "torchvision": lambda idx: baseline([samples[i] for i in idx], [seeds[i] for i in idx]),
        "fastmim-cpu-stage": lambda idx: stage(idx, [seeds[i] for i in idx]),
        "fastmim-cpu-full": lambda idx: full(idx, [seeds[i] for i in idx]),
    }
    for fn in providers.values():  # warm-up: file cache, the extension, the first calls
        fn(batches[0])
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    per_round: dict[str, list[float]] = {name: [] for name in providers}
    wall_per_round: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(args.rounds):
        cpu = dict.fromkeys(providers, 0.0)
        wall = dict.fromkeys(providers, 0.0)
        for idx in batches:
            for name, fn in providers.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(idx)
                cpu[name] += time.process_time() - start_cpu
                wall[name] += time.perf_counter() - start
        for name in providers:
            per_round[name].append(len(samples) / cpu[name])
            wall_per_round[name].append(len(samples) / wall[name])
    rates = {name: statistics.median(values) for name, values in per_round.items()}
    wall_rates = {name: statistics.median(values) for name, values in wall_per_round.items()}
    table, source = cores_table({"torchvision": rates["torchvision"], "fastmim": rates["fastmim-cpu-stage"]})

    ceilings = harness.measure_ceilings("cpu", smoke=args.smoke)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    shape = {"images": len(samples), "batch": args.batch_size, "size": args.size, "rounds": args.rounds,
             "data": "synthetic 500x375 JPEGs, quality 90" if args.data is None else str(args.data),
             "load_average_1min": [load_before, load_after], "cpu_count": os.cpu_count()}
    records = [harness.Record(f"input-{args.size}px-per-image", name, 1e3 / rate, shape,
                              extra={"img_s": rate, "img_s_per_round": per_round[name],
                                     "wall_img_s": wall_rates[name], "wall_img_s_per_round": wall_per_round[name]})
               for name, rate in rates.items()]
    notes = ("one core (torch.set_num_threads(1)), no DataLoader workers; images per second of the process's CPU "
             "time (time.process_time: what one core does, whatever else shares the machine; wall-clock figures in "
             "extra.wall_img_s); ms = CPU milliseconds per image, median over "
             "interleaved passes; fastmim-cpu-stage is what a worker does when training on a GPU (decode to uint8 + "
             f"collate), fastmim-cpu-full adds the op on the CPU; cores per GPU at step rates from {source}; the "
             f"machine's 1-minute load average before and after the passes is in each record's shape (other "
             f"processes share the cores: absolute figures drop under load, the interleaved ratios much less)")
    path = harness.write_results("bench_input", records, ceilings, args, notes=notes)
    payload = json.loads(path.read_text())
    payload["cores_per_gpu"] = table
    path.write_text(json.dumps(payload, indent=2) + "\n")

    print("\n| pipeline | img/s per core (CPU time) | vs torchvision | img/s (wall clock) | vs torchvision |")
    print("|---|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / rates['torchvision']:.2f}x | {wall_rates[name]:.0f} | "
              f"{wall_rates[name] / wall_rates['torchvision']:.2f}x |")
    print(f"\ncores per GPU at the projected step rate ({source}):")
    print("| model | projected ms / 256 images | images/s | torchvision cores | fastmim cores |")
    print("|---|---|---|---|---|")
    for row in table:
        print(f"| {row['model']} | {row['projected_ms']} | {row['images_per_s']} | {row['cores_torchvision']} | "
              f"{row['cores_fastmim']} |")
    if tmp is not None:
        tmp.cleanup()
    summary = {"fastmim_cpu_img_s": round(rates["fastmim-cpu-stage"], 1),
               "torchvision_img_s": round(rates["torchvision"], 1),
               "fastmim_full_cpu_img_s": round(rates["fastmim-cpu-full"], 1),
               "ratio": round(rates["fastmim-cpu-stage"] / rates["torchvision"], 2), "target_ratio": 2.5,
               "fastmim_cpu_wall_img_s": round(wall_rates["fastmim-cpu-stage"], 1),
               "torchvision_wall_img_s": round(wall_rates["torchvision"], 1),
               "wall_ratio": round(wall_rates["fastmim-cpu-stage"] / wall_rates["torchvision"], 2),
               "cores_per_gpu": table, "results": str(path)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
