"""ContrastiveCrop: heat-map boxes, crops inside them (Beta-distributed), the warm-up fallback,
the update schedule and hook, box updates from a model, and the cmae adapter's wiring."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastmim.data import ArrayImageDataset, RandomResizedCropSampler, ViewTransform
from fastmim.data.contrastive_crop import ContrastiveCrop, heatmap_boxes, whole_image
from fastmim.models import CMAE
from fastmim.models.vit import patch_features
from fastmim.train import contrastive_boxes
from fastmim.train.contrastive_boxes import compute_boxes

# ---------------------------------------------------------------------------------- heat-map boxes


def test_box_bounds_the_hot_region_of_the_heat_map():
    features = torch.zeros(2, 16, 8)  # 4 x 4 grid
    hot = torch.zeros(4, 4)
    hot[1:3, 2:4] = 1.0  # rows 1-2, columns 2-3
    features[0] = hot.reshape(16, 1).expand(16, 8) / 8
    features[1, 0] = 1.0  # only the top-left patch
    boxes = heatmap_boxes(features, 32, threshold=0.1)
    top, left, bottom, right = boxes[0].tolist()
    # bilinear upsampling spreads the hot patches by under half a patch (4 px of 32) on each side
    assert 0.25 - 0.125 <= top < 0.25 and 0.75 < bottom <= 0.75 + 0.125
    assert 0.5 - 0.125 <= left < 0.5 and right == 1.0
    t, lf, b, r = boxes[1].tolist()
    assert t == 0.0 and lf == 0.0 and 0.25 <= b <= 0.375 and 0.25 <= r <= 0.375


def test_heat_map_is_min_max_normalised_and_thresholded():
    # a ramp over columns: only columns whose normalised value exceeds the threshold count
    ramp = torch.arange(4.0).repeat(4)  # column index per patch, (16,)
    features = ramp.reshape(1, 16, 1) * 3.0 + 5.0  # scale and offset do not matter after min-max
    low = heatmap_boxes(features, 4, threshold=0.1)[0]
    high = heatmap_boxes(features, 4, threshold=0.7)[0]
    assert low.tolist() == [0.0, 0.25, 1.0, 1.0]
    assert high.tolist() == [0.0, 0.75, 1.0, 1.0]


def test_flat_heat_map_gives_the_whole_image_and_map_layout_is_accepted():
    assert heatmap_boxes(torch.ones(1, 9, 4), 12).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    fmap = torch.zeros(1, 3, 4, 4)
    fmap[0, :, 3, 3] = 1.0
    assert heatmap_boxes(fmap, 8)[0].tolist() == [0.625, 0.625, 1.0, 1.0]  # bilinear spill: pixel 5 reads 0.25
    with pytest.raises(ValueError, match="square grid"):
        heatmap_boxes(torch.ones(1, 12, 4), 12)
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        heatmap_boxes(torch.ones(12, 4), 12)


# ---------------------------------------------------------------------------------- crops


def test_warmup_crops_are_exactly_random_resized_crops():
    crop = ContrastiveCrop(10, warmup=2, box_update_every=2)
    rrc = RandomResizedCropSampler()
    for seed in range(20):
        expected = rrc(3, 28, 28, torch.Generator().manual_seed(seed))
        assert crop(3, 28, 28, torch.Generator().manual_seed(seed)) == expected


def test_crops_stay_in_the_image_and_are_reproducible():
    crop = ContrastiveCrop(4, warmup=0, box_update_every=1)
    crop.boxes[1] = torch.tensor([0.1, 0.5, 0.6, 0.9])
    crop.use_boxes = True
    for seed in range(200):
        top, left, h, w = crop(1, 40, 30, torch.Generator().manual_seed(seed))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 30 and h > 0 and w > 0
        assert (top, left, h, w) == crop(1, 40, 30, torch.Generator().manual_seed(seed))


def test_crop_centres_follow_the_box_and_small_alpha_pushes_them_to_its_edges():
    crop = ContrastiveCrop(2, alpha=0.1, warmup=0, box_update_every=1, scale=(0.04, 0.04), ratio=(1.0, 1.0))
    crop.use_boxes = True
    crop.boxes[0] = torch.tensor([0.5, 0.25, 1.0, 0.75])  # lower half, middle columns
    size = 100
    centres = []
    for seed in range(300):
        top, left, h, w = crop(0, size, size, torch.Generator().manual_seed(seed))
        assert (h, w) == (20, 20)
        centres.append((top + h // 2, left + w // 2))
    rows = torch.tensor([c[0] for c in centres], dtype=torch.float32)
    cols = torch.tensor([c[1] for c in centres], dtype=torch.float32)
    # centre ranges: rows [50, 90] (clamped so the crop stays inside), columns [25, 75]
    assert rows.min() >= 50 and rows.max() <= 90 and cols.min() >= 25 and cols.max() <= 75
    # Beta(0.1, 0.1): most positions within 10% of either end of the range
    near_edge = ((cols - 25) / 50 < 0.1) | ((cols - 25) / 50 > 0.9)
    assert near_edge.float().mean() > 0.6
    wide = ContrastiveCrop(2, alpha=5.0, warmup=0, box_update_every=1, scale=(0.04, 0.04), ratio=(1.0, 1.0))
    wide.use_boxes, wide.boxes = True, crop.boxes.clone()
    cols_wide = torch.tensor([float(wide(0, size, size, torch.Generator().manual_seed(s))[1] + 10)
                              for s in range(300)])
    assert (((cols_wide - 25) / 50 < 0.1) | ((cols_wide - 25) / 50 > 0.9)).float().mean() < 0.2


# ---------------------------------------------------------------------------------- schedule and hook


def test_update_schedule_and_the_epoch_hook():
    crop = ContrastiveCrop(3, warmup=2, box_update_every=3)
    assert [e for e in range(12) if crop.is_update_epoch(e)] == [2, 5, 8, 11]
    calls = []

    def compute():
        calls.append(len(calls))
        return torch.full((3, 4), 0.5)

    for epoch in range(7):
        crop.on_epoch_start(epoch, compute)
        assert crop.use_boxes == (epoch >= 2)
    assert len(calls) == 2 and crop.boxes_epoch == 5
    with pytest.raises(ValueError, match="shape"):
        crop.on_epoch_start(8, lambda: torch.zeros(2, 4))


def test_run_length_fills_an_unset_schedule_and_resuming_past_warmup_recomputes():
    crop = ContrastiveCrop(3)
    assert not crop.scheduled and not crop.is_update_epoch(0)
    crop.set_run_length(50)
    assert (crop.warmup, crop.box_update_every) == (10, 10)
    resumed = ContrastiveCrop(3, warmup=2, box_update_every=10)
    assert resumed.on_epoch_start(4, lambda: torch.zeros(3, 4)) and resumed.boxes_epoch == 4


def test_boxes_restored_mid_epoch_are_not_recomputed():
    """A run resumed inside update epoch 3 keeps the boxes of that epoch's start (the ones its
    checkpoint holds), instead of recomputing them from the mid-epoch weights."""
    crop = ContrastiveCrop(3, warmup=1, box_update_every=2)
    crop.on_epoch_start(3, lambda: torch.rand(3, 4, generator=torch.Generator().manual_seed(0)))
    resumed = ContrastiveCrop(3)
    resumed.load_state_dict(crop.state_dict())

    def mid_epoch_boxes():
        raise AssertionError("boxes recomputed on resume")

    assert not resumed.on_epoch_start(3, mid_epoch_boxes)
    assert torch.equal(resumed.boxes, crop.boxes) and resumed.use_boxes and resumed.boxes_epoch == 3
    assert not resumed.on_epoch_start(4, mid_epoch_boxes)  # not an update epoch
    fresh = torch.full((3, 4), 0.25)
    assert resumed.on_epoch_start(5, lambda: fresh) and torch.equal(resumed.boxes, fresh)  # the next update


def test_cmae_adapter_resumed_inside_an_update_epoch_keeps_its_boxes(monkeypatch):
    from fastmim.train.methods import CMAEAdapter, StepContext

    source = SimpleNamespace(train=tiny_dataset(4), mean=(0.5,), std=(0.5,))
    ctx = StepContext(step=3, max_steps=50, micro_step=0, mask_ratio=0.75, seed=0)
    first, second = (CMAEAdapter(ccrop={"warmup": 1, "box_update_every": 2}) for _ in range(2))
    model = tiny_model()
    first.crop_sampler(model, source)
    first.before_epoch(model, 1, ctx)
    with torch.no_grad():  # the weights move during the epoch: recomputed boxes would differ
        model.blocks[0].mlp.fc2.weight.add_(torch.randn_like(model.blocks[0].mlp.fc2.weight))
    second.crop_sampler(model, source)
    second.load_state_dict(first.state_dict())
    calls = []
    original = contrastive_boxes.compute_boxes

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(contrastive_boxes, "compute_boxes", counted)
    second.before_epoch(model, 1, ctx)
    assert calls == [] and torch.equal(second.contrastive_crop.boxes, first.contrastive_crop.boxes)
    second.before_epoch(model, 3, ctx)
    assert calls == [1] and second.contrastive_crop.boxes_epoch == 3


def test_state_dict_round_trip_and_bad_options():
    crop = ContrastiveCrop(3, warmup=1, box_update_every=1)
    crop.on_epoch_start(1, lambda: torch.rand(3, 4))
    other = ContrastiveCrop(3)
    other.load_state_dict(crop.state_dict())
    assert torch.equal(other.boxes, crop.boxes) and other.use_boxes and other.warmup == 1
    with pytest.raises(ValueError, match="do not fit"):
        ContrastiveCrop(4).load_state_dict(crop.state_dict())
    for kwargs, match in (({"alpha": 0.0}, "alpha"), ({"threshold": 1.0}, "threshold"),
                          ({"warmup": -1}, "warmup"), ({"box_update_every": 0}, "box_update_every")):
        with pytest.raises(ValueError, match=match):
            ContrastiveCrop(3, **kwargs)
    with pytest.raises(ValueError, match="num_images"):
        ContrastiveCrop(0)


# ---------------------------------------------------------------------------------- boxes from a model


def tiny_model() -> CMAE:
    torch.manual_seed(0)
    return CMAE(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                proj_hidden_dim=32, proj_dim=8)


def tiny_dataset(n: int = 5) -> ArrayImageDataset:
    images = torch.zeros(n, 1, 24, 20, dtype=torch.uint8)
    for i in range(n):
        images[i, 0, 2 + 3 * i:8 + 3 * i, 3:12] = 255  # a bright rectangle moving down
    return ArrayImageDataset(images, torch.zeros(n, dtype=torch.long), ["x"])


def test_patch_features_are_the_last_block_before_the_final_norm():
    model = tiny_model().eval()
    imgs = torch.randn(2, 1, 16, 16)
    feats = patch_features(model, imgs)
    assert feats.shape == (2, 16, 32)
    torch.testing.assert_close(model.norm(feats), model.forward_features(imgs)[:, 1:])


def test_compute_boxes_runs_the_model_over_every_image_in_eval_mode_and_restores_it():
    model = tiny_model().train()
    data = tiny_dataset()
    seen = []

    def features(m, imgs):
        seen.append((m.training, imgs.shape))
        return patch_features(m, imgs)

    boxes = compute_boxes(model, data, image_size=16, mean=(0.5,), std=(0.5,), batch_size=2, features=features)
    assert boxes.shape == (5, 4) and boxes.dtype == torch.float32
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert seen == [(False, (2, 1, 16, 16)), (False, (2, 1, 16, 16)), (False, (1, 1, 16, 16))]
    assert model.training
    # with features that are the image itself, the box is the bright rectangle
    def pixels(m, imgs):
        return imgs.reshape(imgs.shape[0], 1, 16, 16)

    boxes = compute_boxes(model, data, image_size=16, mean=(0.0,), std=(1.0,), features=pixels)
    torch.testing.assert_close(boxes[0], torch.tensor([2 / 24, 3 / 20, 8 / 24, 12 / 20]), atol=1 / 16, rtol=0)
    assert (boxes[1:, 0] > boxes[:-1, 0]).all()  # the rectangle moves down
    with pytest.raises(ValueError, match="compute_boxes returned shape"):
        ContrastiveCrop(3, warmup=0, box_update_every=1).on_epoch_start(
            0, lambda: compute_boxes(model, data, image_size=16, mean=(0.5,), std=(0.5,)))


def test_whole_image_resizes_without_cropping():
    img = torch.zeros(1, 24, 20, dtype=torch.uint8)
    img[0, :, :10] = 255
    out = whole_image(img, 16, (0.0,), (1.0,))
    assert out.shape == (1, 16, 16)
    assert out[0, :, :7].min() > 0.99 and out[0, :, 9:].max() < 0.01


def test_cmae_adapter_wires_contrastive_crop_into_the_views_and_refreshes_boxes():
    from fastmim.data import build_views
    from fastmim.train.methods import StepContext, get_adapter

    adapter = get_adapter("cmae")
    data = tiny_dataset(6)
    source = SimpleNamespace(train=data, mean=(0.5,), std=(0.5,))
    model = tiny_model()
    crop = adapter.crop_sampler(model, source)
    assert isinstance(crop, ContrastiveCrop) and crop.alpha == 0.1 and crop.threshold == 0.1
    views = build_views(SimpleNamespace(mean=(0.5,), std=(0.5,)), 16, num_views=2, crop_sampler=crop)
    assert all(v.crop_sampler is crop for v in views)
    assert isinstance(views[0], ViewTransform)

    ctx = StepContext(step=0, max_steps=50, micro_step=0, mask_ratio=0.75, seed=0)
    adapter.before_epoch(model, 0, ctx)  # run length unknown at epoch 0: warm-up
    assert not crop.use_boxes and not crop.scheduled
    ctx.step = 5  # 5 steps per epoch -> 10 epochs -> warm-up and refresh every 2 epochs
    adapter.before_epoch(model, 1, ctx)
    assert (crop.warmup, crop.box_update_every) == (2, 2) and not crop.use_boxes
    ctx.step = 10
    adapter.before_epoch(model, 2, ctx)
    assert crop.use_boxes and crop.boxes_epoch == 2
    assert crop.boxes.shape == (6, 4) and ((crop.boxes >= 0) & (crop.boxes <= 1)).all()
    top, left, h, w = views[0].crop_sampler(0, 24, 20, torch.Generator().manual_seed(0))
    assert 0 <= top and top + h <= 24 and 0 <= left and left + w <= 20


def test_cmae_adapter_state_round_trip_restores_the_boxes():
    from fastmim.train.methods import CMAEAdapter

    source = SimpleNamespace(train=tiny_dataset(4), mean=(0.5,), std=(0.5,))
    first, second = CMAEAdapter(ccrop={"warmup": 1, "box_update_every": 2}), CMAEAdapter(ccrop={})
    crop = first.crop_sampler(tiny_model(), source)
    crop.on_epoch_start(1, lambda: torch.rand(4, 4))
    second.crop_sampler(tiny_model(), source)
    second.load_state_dict(first.state_dict())
    restored = second.contrastive_crop
    assert torch.equal(restored.boxes, crop.boxes) and restored.use_boxes and restored.boxes_epoch == 1
    assert (restored.warmup, restored.box_update_every) == (1, 2)
    assert CMAEAdapter(ccrop=None).crop_sampler(tiny_model(), source) is None
