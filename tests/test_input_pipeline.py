"""fastmim.data.pipeline: decode-only workers, the packed uint8 batch, the views made on the device,
and `fastmim train` on a JPEG folder through it (training, resume, corrupt files, --decode gpu)."""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastmim.data import DataError, ImageFolderDataset, open_data
from fastmim.data.pipeline import (
    DecodedImageFolder,
    _decode_encoded,
    collate_decoded,
    decode_image,
    image_size,
    views_on_device,
)
from fastmim.ops import random_resized_crop_box, resized_crop_flip_normalize_reference
from fastmim.testing import TINY_TRAIN_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo(h, w, rng):
    """A smooth colour field with an edge and grain: JPEG-friendly, photo-like content."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([127 + 100 * np.sin(xx / (7 + 5 * c) + yy / (11 + 3 * c) + c) for c in range(3)], -1)
    img[h // 3:h // 2] = rng.integers(0, 255, 3)
    return (img + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)


def _jpeg_folder(root, sizes, classes=2, seed=0, fmt="jpeg"):
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(h, w, rng)).save(folder / f"{i:03d}.{'jpg' if fmt == 'jpeg' else fmt}",
                                                **({"quality": 90} if fmt == "jpeg" else {}))
    return root


def _encode(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


# ----------------------------------------------------------------------------- headers and decoding


def test_image_size_reads_jpeg_and_png_headers():
    rng = np.random.default_rng(0)
    array = _photo(37, 53, rng)
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a long APP1 segment before the frame header
    for data in (_encode(array, "jpeg"), _encode(array, "jpeg", progressive=True), _encode(array, "jpeg", exif=exif),
                 _encode(array, "png"), _encode(array[:, :, 0], "png")):
        assert image_size(data) == (37, 53)
    assert image_size(_encode(array, "bmp")) is None
    assert image_size(torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0garbage"), dtype=torch.uint8)) is None


@pytest.mark.parametrize("fmt", ["jpeg", "png", "bmp"])
def test_decode_image_gives_pillows_pixels_as_hwc(fmt):
    rng = np.random.default_rng(1)
    array = _photo(21, 30, rng)
    data = _encode(array, fmt)
    for channels, mode in ((3, "RGB"), (1, "L")):
        img = decode_image(data, channels)
        assert img.shape == (channels, 21, 30) and img.dtype == torch.uint8
        assert img.permute(1, 2, 0).is_contiguous()  # HWC storage, as packed
        want = torch.from_numpy(np.array(Image.open(io.BytesIO(data.numpy().tobytes())).convert(mode)))
        got = img.permute(1, 2, 0).reshape(want.shape)
        # colour to gray: libpng's and Pillow's luma round differently (libjpeg's is Pillow's)
        assert (got.int() - want.int()).abs().max() <= (1 if (fmt, mode) == ("png", "L") else 0)
    # 16-bit PNG (torchvision decodes it to uint16): Pillow's 8-bit conversion
    deep = _encode((rng.integers(0, 65535, (9, 8))).astype(np.uint16), "png")
    assert decode_image(deep, 3).dtype == torch.uint8
    with pytest.raises(RuntimeError):
        decode_image(_encode(array, "jpeg")[:200].clone(), 3)  # truncated


def test_draft_decode_reduces_large_crops_and_scales_their_boxes(tmp_path):
    """Crops at least 4x the output size in both directions: decoded at 1/2 .. 1/8 by libjpeg (the
    crops stay at least twice the output size) and the boxes mapped onto the smaller image; the views
    stay close to the full decode's."""
    _jpeg_folder(tmp_path, [(240, 320)] * 4)
    folder = open_data(str(tmp_path)).train
    drafted = DecodedImageFolder(folder, 16, scale=(0.9, 1.0))
    exact = DecodedImageFolder(folder, 16, scale=(0.9, 1.0), draft=False)
    item, full = drafted[(0, 5)], exact[(0, 5)]
    assert full["image"].shape == (3, 240, 320) and item["image"].shape == (3, 60, 80)  # 1/4
    top, left, h, w = full["boxes"][0]
    t4, l4, h4, w4 = item["boxes"][0]
    assert abs(t4 - top / 4) <= 1 and abs(l4 - left / 4) <= 1 and abs(h4 - h / 4) <= 1 and abs(w4 - w / 4) <= 1
    a = views_on_device(collate_decoded([item]), "cpu", 16, MEAN, STD)["views"][0]
    b = views_on_device(collate_decoded([full]), "cpu", 16, MEAN, STD)["views"][0]
    std = torch.tensor(STD)[:, None, None]
    assert ((a - b) * std).abs().mean() < 4 / 255  # another downscaling filter, the same picture
    # crops under 4x the output size are decoded whole
    assert DecodedImageFolder(folder, 64, scale=(0.9, 1.0))[(0, 5)]["image"].shape == (3, 240, 320)


# ----------------------------------------------------------------------------- items, batches, views


def test_items_and_views_follow_the_seed_and_the_reference(tmp_path):
    _jpeg_folder(tmp_path, [(40, 50), (50, 33), (45, 45), (31, 60)])
    source = open_data(str(tmp_path))
    dataset = DecodedImageFolder(source.train, 16, num_views=2)
    items = [dataset[(i, 100 + i)] for i in range(3)]
    for i, item in enumerate(items):
        h, w = item["image"].shape[1:]
        for v in range(2):
            draw = random_resized_crop_box(h, w, seed=100 + i, counter=v)
            assert tuple(item["boxes"][v]) == draw[:4] and item["flip"][v] == draw[4]
    assert dataset[(1, 101)]["boxes"] == items[1]["boxes"]
    assert dataset[(1, 102)]["boxes"] != items[1]["boxes"]
    batch = collate_decoded(items)
    assert batch["boxes"].shape == (2, 3, 4) and batch["flip"].shape == (2, 3)
    assert batch["images"].data.numel() == sum(it["image"].numel() for it in items)
    out = views_on_device(batch, "cpu", 16, source.mean, source.std)
    assert len(out["views"]) == 2 and out["views"][0].shape == (3, 3, 16, 16)
    for v in range(2):
        want = resized_crop_flip_normalize_reference([it["image"] for it in items], batch["boxes"][v], 16,
                                                     batch["flip"][v], source.mean, source.std)
        torch.testing.assert_close(out["views"][v], want, atol=5e-5, rtol=0)
    assert torch.equal(out["label"], batch["label"]) and torch.equal(out["index"], torch.tensor([0, 1, 2]))


def test_a_crop_sampler_gives_the_boxes(tmp_path):
    """ContrastiveCrop (or any CropSampler) decides the boxes; the op makes the views."""
    from fastmim.data import ContrastiveCrop

    _jpeg_folder(tmp_path, [(40, 50)] * 4)
    source = open_data(str(tmp_path))
    crop = ContrastiveCrop(len(source.train), warmup=0, box_update_every=1)
    crop.on_epoch_start(0, lambda: torch.tensor([[0.25, 0.25, 0.5, 0.5]]).repeat(len(source.train), 1))
    dataset = DecodedImageFolder(source.train, 16, num_views=2, crop_sampler=crop)
    item = dataset[(1, 9)]
    g = torch.Generator().manual_seed(9)
    first = crop(1, 40, 50, g)
    assert tuple(item["boxes"][0]) == tuple(first)


def test_worker_count_does_not_change_the_batches(tmp_path):
    _jpeg_folder(tmp_path, [(30 + i, 40 - i) for i in range(8)])
    dataset = DecodedImageFolder(open_data(str(tmp_path)).train, 12)
    keys = [[(i, 7 * i) for i in range(j, j + 3)] for j in (0, 3)]
    runs = []
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_sampler=keys, num_workers=workers, collate_fn=collate_decoded)
        runs.append([views_on_device(b, "cpu", 12, MEAN, STD)["views"][0] for b in loader])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_corrupt_files_follow_on_corrupt(tmp_path):
    _jpeg_folder(tmp_path, [(30, 30)] * 6)
    source = open_data(str(tmp_path))
    skipping = DecodedImageFolder(source.train, 8)
    failing = DecodedImageFolder(open_data(str(tmp_path), on_corrupt="error").train, 8)
    victim = source.train.samples[0][0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated after the scan
    with pytest.warns(UserWarning, match="skipping undecodable image"):
        item = skipping[(0, 3)]
    assert item["label"] == source.train.samples[1][1]  # the next image, with its own label
    assert item["image"].shape == (3, 30, 30)
    with pytest.raises(DataError, match="corrupt image"):
        failing[(0, 3)]


def test_encoded_batches_need_a_gpu_and_replace_undecodable_images(tmp_path):
    """decode='gpu': JPEGs stay encoded in the workers. Without CUDA the batch cannot be decoded (a
    clear error); the decoding logic itself runs here with a CPU decoder in nvJPEG's place."""
    _jpeg_folder(tmp_path, [(30, 40), (33, 41), (35, 30)], classes=3)
    Image.fromarray(_photo(20, 25, np.random.default_rng(3))).save(tmp_path / "class2" / "zz.png")
    dataset = DecodedImageFolder(ImageFolderDataset(*ImageFolderDataset.scan(tmp_path)), 8, decode="gpu")
    items = [dataset[(i, i)] for i in range(len(dataset))]
    assert sum("encoded" in it for it in items) == 3 and sum("image" in it for it in items) == 1
    batch = collate_decoded(items)
    with pytest.raises(DataError, match="need a CUDA device"):
        views_on_device(batch, "cpu", 8, MEAN, STD)

    def cpu_decode(datas):
        return [decode_image(d, 3) for d in datas]

    images, replaced = _decode_encoded(batch, torch.device("cpu"), 3, "skip", decode_fn=cpu_decode)
    assert replaced == [] and [tuple(img.shape[1:]) for img in images] == [
        tuple(it["size"]) if "size" in it else tuple(it["image"].shape[1:]) for it in items]
    batch["encoded"][1] = batch["encoded"][1][:100].clone()  # corrupt after the scan
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        images, replaced = _decode_encoded(batch, torch.device("cpu"), 3, "skip", decode_fn=cpu_decode)
    assert replaced == [1] and images[1] is images[0]
    with pytest.raises(DataError, match="corrupt image"):
        _decode_encoded(batch, torch.device("cpu"), 3, "error", decode_fn=cpu_decode)


# ----------------------------------------------------------------------------- fastmim train


TINY = {**TINY_TRAIN_MODEL, "patch_size": 4}


def _train_config(tmp_path, data, **kw):
    from fastmim.train.config import TrainConfig

    base = {"data": str(data), "output": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4, "num_workers": 0,
            "progress": False, "figures": False, "model_overrides": dict(TINY), "image_size": 16, "log_every": 1}
    return TrainConfig(**{**base, **kw})


def _counting_views(monkeypatch):
    import fastmim.train.loop as loop

    calls = []
    real = loop.views_on_device

    def counting(batch, *args, **kwargs):
        out = real(batch, *args, **kwargs)
        calls.append((tuple(batch["boxes"].shape), [tuple(v.shape) for v in out["views"]]))
        return out

    monkeypatch.setattr(loop, "views_on_device", counting)
    return calls


@pytest.mark.parametrize("method", ["mae", "cmae"])
def test_train_on_a_jpeg_folder_makes_the_views_on_the_device(tmp_path, monkeypatch, method):
    """`fastmim train` on a JPEG folder takes the pipeline by default; CMAE's two views (and its
    ContrastiveCrop boxes after the warm-up) go through one op call per batch."""
    from fastmim.train.loop import train

    data = _jpeg_folder(tmp_path / "data", [(40 + i % 5, 50 - i % 7) for i in range(20)])
    calls = _counting_views(monkeypatch)
    result = train(_train_config(tmp_path, data, method=method, max_steps=6))
    assert result.finished and math.isfinite(result.loss)
    views = 2 if method == "cmae" else 1
    assert len(calls) == 6 and all(c == ((views, 4, 4), [(4, 3, 16, 16)] * views) for c in calls)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["input"] == "fastmim" and config["decode"] == "cpu"
    if method == "cmae":  # 18 train images / 4 = 4 batches an epoch: boxes from the model after epoch 1's start
        from fastmim.train.checkpoint import STATE_NAME, load_state

        crop = load_state(tmp_path / "run" / STATE_NAME)["adapter"]["contrastive_crop"]
        assert crop["use_boxes"] and crop["boxes_epoch"] == 1


def test_resume_is_bit_exact_with_the_pipeline(tmp_path):
    """Stopped after 2 of 5 steps and resumed with 2 DataLoader workers (batches packed in shared
    memory): the same parameters as an uninterrupted run."""
    from safetensors.torch import load_file

    from fastmim.train.loop import train

    data = _jpeg_folder(tmp_path / "data", [(30 + i % 4, 36 - i % 3) for i in range(12)])
    common = {"max_steps": 5, "accum_steps": 2, "batch_size": 2}
    full = train(_train_config(tmp_path, data, output=str(tmp_path / "full"), **common))
    part = train(_train_config(tmp_path, data, output=str(tmp_path / "part"), stop_after=2, **common))
    assert full.finished and part.step == 2
    resumed = train(_train_config(tmp_path, data, output=str(tmp_path / "part"), resume=True, num_workers=2,
                                  **common))
    assert resumed.finished and resumed.step == 5
    a = load_file(str(tmp_path / "full" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the torchvision input path is another run: other crops, other weights
    other = train(_train_config(tmp_path, data, output=str(tmp_path / "tv"), input="torchvision", **common))
    c = load_file(str(tmp_path / "tv" / "checkpoint.safetensors"))
    assert other.finished and not torch.equal(a["blocks.0.mlp.fc1.weight"], c["blocks.0.mlp.fc1.weight"])


def test_cli_corrupt_files_and_decode_gpu(tmp_path, capsys):
    from fastmim.cli import main

    data = _jpeg_folder(tmp_path / "data", [(30, 40)] * 10)
    (data / "class0" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")  # fails the scan
    argv = ["train", "--data", str(data), "--max-steps", "2", "--batch-size", "4", "--image-size", "16",
            "--no-progress", "--no-figures", "--num-workers", "0",
            *[a for k, v in TINY.items() for a in ("--model-arg", f"{k}={v}")]]
    with pytest.warns(UserWarning, match="skipped 1 corrupt image file"):
        assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    assert main([*argv, "--output", str(tmp_path / "b"), "--on-corrupt", "error"]) == 2
    assert "corrupt image" in capsys.readouterr().err
    (data / "class0" / "bad.jpg").unlink()
    # a JPEG whose header verifies but whose body is cut: found when the worker decodes it
    noise = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "class1" / "000_cut.jpg", quality=90)
    cut = data / "class1" / "000_cut.jpg"
    cut.write_bytes(cut.read_bytes()[:1500])
    with pytest.warns(UserWarning, match="skipping undecodable image"):
        assert main([*argv, "--output", str(tmp_path / "c"), "--max-steps", "3"]) == 0
    assert main([*argv, "--output", str(tmp_path / "c2"), "--max-steps", "3", "--on-corrupt", "error"]) == 2
    assert "000_cut.jpg" in capsys.readouterr().err
    msg = main([*argv, "--output", str(tmp_path / "d"), "--decode", "gpu", "--device", "cpu"])
    err = capsys.readouterr().err
    assert msg == 2 and "--decode gpu decodes JPEGs with nvJPEG" in err and "needs a CUDA device" in err
    assert main([*argv, "--output", str(tmp_path / "e"), "--decode", "gpu", "--input", "torchvision"]) == 2
    assert "--decode gpu is part of the fastmim input pipeline" in capsys.readouterr().err


def test_lut_keeps_its_photometric_view_on_the_cpu(tmp_path, monkeypatch, capsys):
    from fastmim.train.loop import train

    data = _jpeg_folder(tmp_path / "data", [(30, 40)] * 10)
    calls = _counting_views(monkeypatch)
    result = train(_train_config(tmp_path, data, method="lut", max_steps=1, mask_ratio=0.75))
    assert result.finished and calls == []
    assert "photometric second view runs on the CPU" in capsys.readouterr().err
