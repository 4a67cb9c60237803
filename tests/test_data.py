"""fastmim.data: the bundled dataset, image folders, augmentations and the batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastmim.data import (
    DataError,
    EvalTransform,
    RandomResizedCropSampler,
    TrainBatchSampler,
    ViewTransform,
    build_views,
    open_data,
)
from fastmim.data.transforms import color_jitter, gaussian_blur, solarize


@pytest.fixture(scope="module")
def animal():
    return open_data("default")


def test_bundled_animal_mnist_split(animal):
    assert animal.channels == 1 and len(animal.classes) == 10 and animal.classes[0] == "bear"
    assert len(animal.train) == 9000 and len(animal.test) == 1000
    assert torch.equal(torch.bincount(animal.train.labels), torch.full((10,), 900))
    assert torch.equal(torch.bincount(animal.test.labels), torch.full((10,), 100))
    assert animal.train.images.shape[1:] == (1, 28, 28) and animal.train.images.dtype == torch.uint8
    with np.load(open_data.__globals__["ANIMAL_MNIST_PATH"]) as z:  # held-out rows are disjoint from train rows
        assert not set(z["train_source_index"].tolist()) & set(z["test_source_index"].tolist())
    mean = animal.train.images.float().mean() / 255
    assert abs(mean.item() - animal.mean[0]) < 1e-3  # the documented statistics are the data's


def test_random_resized_crop_sampler_bounds_and_determinism():
    sampler = RandomResizedCropSampler(scale=(0.2, 1.0))
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = sampler(0, 28, 37, g)
        assert 0 <= top and top + h <= 28 and 0 <= left and left + w <= 37 and h > 0 and w > 0
        assert h * w <= 28 * 37
        assert (top, left, h, w) == sampler(0, 28, 37, torch.Generator().manual_seed(seed))
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCropSampler(scale=(0.0, 1.0))


def test_view_transform_is_a_function_of_the_seed(animal):
    view = ViewTransform(32, animal.mean, animal.std)
    img = animal.train.images[3]
    a = view(img, 3, torch.Generator().manual_seed(1))
    b = view(img, 3, torch.Generator().manual_seed(1))
    c = view(img, 3, torch.Generator().manual_seed(2))
    assert a.shape == (1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("channels", [1, 3])
def test_photometric_view_on_gray_and_colour(channels):
    img = torch.randint(0, 256, (channels, 20, 24), dtype=torch.uint8)
    mean, std = (0.5,) * channels, (0.25,) * channels
    plain = ViewTransform(16, mean, std)
    photo = ViewTransform(16, mean, std, photometric=True)
    outs = [photo(img, 0, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(o.shape == (channels, 16, 16) and torch.isfinite(o).all() for o in outs)
    # Same seed, same crop and flip draws first: the photometric ops change the pixels.
    assert not torch.equal(outs[0], plain(img, 0, torch.Generator().manual_seed(0)))
    assert all(((o * 0.25 + 0.5) >= -1e-6).all() and ((o * 0.25 + 0.5) <= 1 + 1e-6).all() for o in outs)


def test_pixel_ops():
    x = torch.rand(3, 9, 11)
    assert torch.allclose(gaussian_blur(torch.full((1, 8, 8), 0.3), 1.0), torch.full((1, 8, 8), 0.3))
    assert gaussian_blur(x, 1.5).std() < x.std()
    assert torch.equal(solarize(torch.tensor([0.2, 0.5, 0.9])), torch.tensor([0.2, 0.5, 0.9]).where(
        torch.tensor([True, False, False]), 1 - torch.tensor([0.2, 0.5, 0.9])))
    y = color_jitter(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not torch.equal(x, y)


def test_eval_transform_resizes_and_centre_crops():
    t = EvalTransform(32, (0.0,), (1.0,))
    assert t(torch.zeros(1, 28, 28, dtype=torch.uint8), 0).shape == (1, 32, 32)
    t = EvalTransform(16, (0.0,) * 3, (1.0,) * 3, crop_pct=0.875)
    img = torch.zeros(3, 40, 60, dtype=torch.uint8)
    img[:, :, 30:] = 255  # right half white: the centre crop straddles the edge
    out = t(img, 0)
    assert out.shape == (3, 16, 16) and out[:, :, 0].max() < 0.1 and out[:, :, -1].min() > 0.9


def test_two_views(animal):
    views = build_views(animal, 32, num_views=2, second_view="photometric")
    item = animal.split("train", views)[(5, 123)]
    assert len(item["views"]) == 2 and item["views"][0].shape == (1, 32, 32)
    assert not torch.equal(item["views"][0], item["views"][1])
    assert animal.train.views == []  # split() attached views to a copy


def test_sampler_shards_a_global_order_and_resumes():
    one = TrainBatchSampler(50, 8, seed=3)
    assert one.batches_per_epoch == 6
    two = [TrainBatchSampler(50, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        full = list(one.epoch(epoch))
        halves = [list(s.epoch(epoch)) for s in two]
        assert [a + b for a, b in zip(*halves, strict=True)] == full  # same global batches, same aug seeds
        indices = [i for batch in full for i, _ in batch]
        assert len(set(indices)) == len(indices) == 48
        assert list(one.epoch(epoch, start=4)) == full[4:]
    assert list(one.epoch(0)) != list(one.epoch(1))
    assert list(TrainBatchSampler(50, 8, seed=4).epoch(0)) != list(one.epoch(0))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainBatchSampler(7, 4, seed=0, world_size=2)


def test_worker_count_does_not_change_batches(animal):
    dataset = animal.split("train", build_views(animal, 32))
    sampler = TrainBatchSampler(len(dataset), 4, seed=0)

    def first_batches(workers):
        loader = DataLoader(dataset, batch_sampler=sampler.epoch(0, start=2), num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(3)]

    for a, b in zip(first_batches(0), first_batches(2), strict=True):
        assert torch.equal(a["views"][0], b["views"][0]) and torch.equal(a["index"], b["index"])


def _write_images(folder, n, size=(20, 14), fmt="PNG", seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt)


def test_image_folder_with_holdout_and_corrupt_files(tmp_path):
    _write_images(tmp_path / "cat", 10, fmt="JPEG")
    _write_images(tmp_path / "dog", 10, seed=1)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="skipped 1 corrupt image"):
        source = open_data(str(tmp_path))
    assert source.classes == ["cat", "dog"] and source.channels == 3
    assert len(source.train) == 18 and len(source.test) == 2
    assert sorted(source.test.labels.tolist()) == [0, 1]
    item = source.split("test", [EvalTransform(8, source.mean, source.std, source.eval_crop_pct)])[0]
    assert item["views"][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match="corrupt image .*broken.png"):
        open_data(str(tmp_path), on_corrupt="error")
    with pytest.warns(UserWarning, match="skipped 1 corrupt image"):
        gray = open_data(str(tmp_path), channels=1, on_corrupt="skip")
    assert gray.train.load(0).shape == (1, 14, 20)


def test_image_folder_train_val_layout_and_truncated_file(tmp_path):
    for split in ("train", "val"):
        _write_images(tmp_path / split / "a", 3, size=(64, 64), fmt="JPEG")
        _write_images(tmp_path / split / "b", 3)
    source = open_data(str(tmp_path))
    assert len(source.train) == 6 and len(source.test) == 6
    # A JPEG whose header verifies but whose body is cut: skipped at load, next image used.
    path = tmp_path / "train" / "a" / "0.jpg"
    path.write_bytes(path.read_bytes()[:1500])
    source = open_data(str(tmp_path))
    with pytest.warns(UserWarning, match="skipping undecodable image"):
        img = source.train.load(0)
    assert img.shape == (3, 64, 64)
    strict = open_data(str(tmp_path), on_corrupt="error")
    with pytest.raises(DataError, match="corrupt image"):
        strict.train.load(0)


def test_undecodable_image_is_replaced_together_with_its_label(tmp_path):
    _write_images(tmp_path / "train" / "a", 3, size=(64, 64), fmt="JPEG")
    _write_images(tmp_path / "train" / "b", 3, seed=1)
    _write_images(tmp_path / "val" / "a", 1)
    path = tmp_path / "train" / "a" / "2.jpg"  # class a's last image: the next one is class b's first
    path.write_bytes(path.read_bytes()[:1500])
    source = open_data(str(tmp_path))
    assert source.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    dataset = source.split("train", [lambda img, index, generator: img])
    with pytest.warns(UserWarning, match="skipping undecodable image"):
        item = dataset[2]
    assert item["label"] == 1 and item["index"] == 2
    assert torch.equal(item["views"][0], dataset[3]["views"][0])  # b/0.png, 20 x 14
    assert dataset[1]["label"] == 0 and dataset[1]["views"][0].shape == (3, 64, 64)


def test_small_classes_keep_a_held_out_image(tmp_path):
    for name, count in (("one", 1), ("two", 2), ("four", 4), ("five", 5), ("many", 25)):
        _write_images(tmp_path / name, count)
    source = open_data(str(tmp_path))
    per_class = dict(zip(source.classes, torch.bincount(source.test.labels, minlength=5).tolist(), strict=True))
    assert per_class == {"five": 1, "four": 1, "many": 2, "one": 0, "two": 1}
    assert torch.bincount(source.train.labels, minlength=5).tolist() == [4, 3, 23, 1, 1]
    lonely = tmp_path / "lonely"
    for name in ("x", "y"):
        _write_images(lonely / name, 1)
    with pytest.raises(DataError, match="one image per class, so none can be held out"):
        open_data(str(lonely))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_data(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no class sub-folders"):
        open_data(str(tmp_path))
    _write_images(tmp_path, 2)
    with pytest.raises(DataError, match="must sit in class sub-folders"):
        open_data(str(tmp_path))
    with pytest.raises(DataError, match="not a folder"):
        open_data(str(tmp_path / "0.png"))
