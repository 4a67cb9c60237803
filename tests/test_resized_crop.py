"""resized_crop_flip_normalize (reference, Triton through the interpreter, csrc) and the counter-RNG
crop boxes: against torchvision, against each other, and their argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from fastmim import ops
from fastmim.ops import use_backend
from fastmim.ops._dispatch import backend_status

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _backend_or_skip(backend: str) -> None:
    reason = backend_status("cpu")[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _images(sizes, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def _smooth_images(sizes, seed=0):
    """Photo-like content (smooth, some edges): where resamplers' rounding, not overshoot, dominates."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        low = torch.rand(1, 3, max(2, h // 6), max(2, w // 6), generator=g) * 255
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        img[:, h // 3:h // 2] = 255 * (torch.rand(3, 1, 1, generator=g) > 0.5)  # a hard edge
        out.append(img.round().clamp(0, 255).to(torch.uint8))
    return out


def _torchvision(img, box, size, flip, mean=MEAN, std=STD):
    """torchvision's v2 pipeline on a uint8 tensor: resized_crop (bicubic, antialias), flip, to [0, 1], normalise."""
    top, left, height, width = (int(v) for v in box)
    x = TF.resized_crop(img, top, left, height, width, [size, size], InterpolationMode.BICUBIC, antialias=True)
    if flip:
        x = TF.horizontal_flip(x)
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, list(mean), list(std))


def _random_boxes(sizes, g):
    rows = []
    for k, (h, w) in enumerate(sizes):
        if k % 4 == 0:
            rows.append((0, 0, h, w))  # the whole image
        elif k % 4 == 1:
            rows.append((int(torch.randint(0, h, (), generator=g)), int(torch.randint(0, w, (), generator=g)), 1, 1))
        else:
            ch = int(torch.randint(1, h + 1, (), generator=g))
            cw = int(torch.randint(1, w + 1, (), generator=g))
            rows.append((int(torch.randint(0, h - ch + 1, (), generator=g)),
                         int(torch.randint(0, w - cw + 1, (), generator=g)), ch, cw))
    return torch.tensor(rows, dtype=torch.int32)


# ----------------------------------------------------------------------------- against torchvision


@pytest.mark.parametrize("content", ["noise", "smooth"])
def test_reference_matches_torchvision(content):
    """Odd sizes, whole-image and 1-pixel crops, up- and downscaling, flips: within 0.5/255 mean absolute
    error of torchvision's uint8 result (measured in [0, 1] pixels, before normalisation)."""
    g = torch.Generator().manual_seed(1)
    sizes = [(int(torch.randint(1, 90, (), generator=g)), int(torch.randint(1, 90, (), generator=g)))
             for _ in range(24)] + [(375, 500), (1, 1), (224, 224)]
    images = _images(sizes) if content == "noise" else _smooth_images(sizes)
    boxes = _random_boxes(sizes, g)
    flip = torch.rand(len(sizes), generator=g) < 0.5
    size = 24
    ours = ops.resized_crop_flip_normalize_reference(images, boxes, size, flip, MEAN, STD)
    std = torch.tensor(STD)[:, None, None]
    errors = []
    for b, img in enumerate(images):
        want = _torchvision(img, boxes[b], size, bool(flip[b]))
        diff = ((ours[b] - want) * std).abs()  # back to [0, 1] pixel units
        errors.append(diff.mean())
        assert diff.max() <= 16 / 255, (b, sizes[b], boxes[b].tolist(), diff.max() * 255)
    mean_error = torch.stack(errors).mean()
    assert mean_error < 0.5 / 255, mean_error * 255
    # torchvision's own rounding (to uint8, after each of its passes) is most of the difference
    assert mean_error > 0.1 / 255


def test_same_size_crop_is_the_crop_itself_normalised():
    img = _images([(30, 40)])[0]
    box = torch.tensor([[3, 5, 16, 16]], dtype=torch.int32)
    out = ops.resized_crop_flip_normalize_reference([img], box, 16, torch.tensor([True]))
    assert torch.allclose(out[0], img[:, 3:19, 5:21].flip(-1).float() / 255, atol=1e-6)


# ----------------------------------------------------------------------------- backends against the reference


def _cases():
    sizes = [(37, 53), (20, 9), (11, 16), (48, 30)]
    boxes = torch.tensor([[3, 5, 30, 40], [0, 0, 20, 9], [2, 2, 5, 7], [0, 1, 48, 29]], dtype=torch.int32)
    return sizes, boxes


@pytest.mark.parametrize("backend", ["triton", "csrc"])
@pytest.mark.parametrize("form", ["list", "dense_channels_last", "packed"])
def test_backend_matches_reference(backend, form):
    _backend_or_skip(backend)
    sizes, boxes = _cases()
    flip = torch.tensor([True, False, True, False])
    if form == "dense_channels_last":  # decoders' HWC pixels seen as (B, C, H, W): read in place
        g = torch.Generator().manual_seed(2)
        images = torch.randint(0, 256, (4, 48, 53, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    else:
        images = _images(sizes)
        if form == "packed":
            images = ops.pack_images(images)
    size = (16, 12) if backend == "triton" else 16
    want = ops.resized_crop_flip_normalize_reference(images, boxes, size, flip, MEAN, STD)
    with use_backend(backend):
        got = ops.resized_crop_flip_normalize(images, boxes, size, flip, MEAN, STD)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "csrc"])
def test_backend_low_precision_and_gray(backend):
    _backend_or_skip(backend)
    images = _images([(19, 23), (7, 30)], channels=1, seed=3)
    boxes = torch.tensor([[1, 2, 17, 20], [0, 3, 7, 21]])
    for dtype in (torch.bfloat16, torch.float16):
        want = ops.resized_crop_flip_normalize_reference(images, boxes, 8, None, (0.45,), (0.22,), dtype=dtype)
        with use_backend(backend):
            got = ops.resized_crop_flip_normalize(images, boxes, 8, None, (0.45,), (0.22,), dtype=dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2 if dtype == torch.bfloat16 else 2e-3, rtol=0)


def test_triton_large_downscale_takes_the_blocked_taps_path():
    """A crop shrunk more than 3.5x: its taps do not fit one block of the kernel."""
    _backend_or_skip("triton")
    images = _images([(40, 44)], channels=1, seed=4)
    boxes = torch.tensor([[0, 2, 40, 42]], dtype=torch.int32)
    want = ops.resized_crop_flip_normalize_reference(images, boxes, 6, torch.tensor([True]))
    with use_backend("triton"):
        got = ops.resized_crop_flip_normalize(images, boxes, 6, torch.tensor([True]))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_csrc_matches_reference_at_training_size():
    _backend_or_skip("csrc")
    g = torch.Generator().manual_seed(5)
    sizes = [(375, 500), (500, 333), (64, 300), (1, 1)]
    images = _smooth_images(sizes, seed=5)
    boxes = ops.random_resized_crop_boxes([h for h, _ in sizes], [w for _, w in sizes], seed=7)
    want = ops.resized_crop_flip_normalize_reference(images, boxes.boxes, 224, boxes.flip, MEAN, STD)
    with use_backend("csrc"):
        got = ops.resized_crop_flip_normalize(images, boxes.boxes, 224, boxes.flip, MEAN, STD)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)
    del g


def test_triton_kernel_clamps_unchecked_bad_boxes_into_the_image():
    """Values on an accelerator are not checked by default: the kernel clamps a box into its image
    (and every read into the buffer) instead of reading outside it."""
    _backend_or_skip("triton")
    from fastmim.kernels.resized_crop import resized_crop_flip_normalize_forward

    images = ops.pack_images(_images([(12, 10), (9, 14)], channels=1))
    bad = torch.tensor([[-3, 4, 50, 3], [8, 13, 5, 0]], dtype=torch.int32)
    clamped = torch.tensor([[0, 4, 12, 3], [8, 13, 1, 1]], dtype=torch.int32)
    mean, std = torch.zeros(1), torch.ones(1)
    got = resized_crop_flip_normalize_forward(images.data, images.layout, bad, None, 1, 4, 4, mean, std,
                                              images.data.numel(), torch.float32)
    want = ops.resized_crop_flip_normalize_reference(images, clamped, 4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_empty_batch():
    empty = torch.empty(0, 3, 8, 8, dtype=torch.uint8)
    for backend in ("reference", "csrc"):
        with use_backend(backend if backend_status("cpu")[backend] is None else "reference"):
            out = ops.resized_crop_flip_normalize(empty, torch.empty(0, 4, dtype=torch.int32), 5)
        assert out.shape == (0, 3, 5, 5)


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    images = _images([(20, 24)] * 2)
    dense = torch.stack(images)
    boxes = torch.tensor([[1, 2, 15, 20], [0, 0, 20, 24]], dtype=torch.int32)
    flip = torch.tensor([False, True])

    def fn(x, b, f):
        return ops.resized_crop_flip_normalize(x, b, 8, f, MEAN, STD) * 2

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(dense, boxes, flip), fn(dense, boxes, flip))


# ----------------------------------------------------------------------------- argument checks


def test_bad_arguments():
    images = _images([(10, 12), (8, 8)])
    ok = torch.tensor([[0, 0, 10, 12], [1, 1, 4, 4]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"boxes\[1\] = \(top 5, left 1, height 4, width 4\) is not inside image 1 "
                                         r"of 8x8"):
        ops.resized_crop_flip_normalize(images, torch.tensor([[0, 0, 10, 12], [5, 1, 4, 4]]), 8)
    with pytest.raises(ValueError, match="is not inside image 0"):
        ops.resized_crop_flip_normalize(images, torch.tensor([[0, 0, 0, 12], [1, 1, 4, 4]]), 8)
    with pytest.raises(TypeError, match="boxes must be an int32 or int64"):
        ops.resized_crop_flip_normalize(images, ok.float(), 8)
    with pytest.raises(ValueError, match=r"boxes must have shape \(B, 4\) = \(2, 4\)"):
        ops.resized_crop_flip_normalize(images, ok[:1], 8)
    with pytest.raises(TypeError, match="flip must be a bool tensor"):
        ops.resized_crop_flip_normalize(images, ok, 8, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="size must be >= 1"):
        ops.resized_crop_flip_normalize(images, ok, 0)
    with pytest.raises(TypeError, match="size must be an int or a pair"):
        ops.resized_crop_flip_normalize(images, ok, (8, 8, 8))
    with pytest.raises(ValueError, match="mean must have one value per channel"):
        ops.resized_crop_flip_normalize(images, ok, 8, mean=(0.5,))
    with pytest.raises(ValueError, match="std must be non-zero"):
        ops.resized_crop_flip_normalize(images, ok, 8, std=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        ops.resized_crop_flip_normalize(images, ok, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"images\[1\] must be a uint8"):
        ops.resized_crop_flip_normalize([images[0], images[1].float()], ok, 8)
    with pytest.raises(ValueError, match="same channels"):
        ops.resized_crop_flip_normalize([images[0], images[1][:1]], ok, 8)
    with pytest.raises(ValueError, match="empty list"):
        ops.resized_crop_flip_normalize([], ok[:0], 8)
    with pytest.raises(TypeError, match="images must be uint8"):
        ops.resized_crop_flip_normalize(torch.zeros(2, 3, 8, 8), ok, 8)
    packed = ops.pack_images(images)
    bad_layout = packed.layout.clone()
    bad_layout[1, 1] = 100  # a height reaching past the buffer
    with pytest.raises(ValueError, match=r"PackedImages.layout\[1\]"):
        ops.resized_crop_flip_normalize(ops.PackedImages(packed.data, bad_layout, 3), ok, 8)


def test_pack_images_layout_and_out_buffer():
    images = _images([(3, 4), (2, 5)])
    images[1] = images[1].permute(0, 2, 1).contiguous().permute(0, 2, 1)  # any strides
    buffer = torch.full((100,), 7, dtype=torch.uint8)
    packed = ops.pack_images(images, out=buffer)
    assert packed.data.numel() == 3 * (12 + 10) and packed.data.data_ptr() == buffer.data_ptr()
    assert packed.layout.tolist() == [[0, 3, 4, 1, 12, 3], [36, 2, 5, 1, 15, 3]]
    for b, img in enumerate(images):
        assert torch.equal(packed.image(b), img)


# ----------------------------------------------------------------------------- crop boxes


def test_box_sampler_one_image_equals_the_batch_rows():
    g = torch.Generator().manual_seed(6)
    H = torch.randint(1, 700, (300,), generator=g)
    W = torch.randint(1, 700, (300,), generator=g)
    H[:4], W[:4] = torch.tensor([1, 2, 1000, 375]), torch.tensor([1, 900, 3, 500])  # fallbacks, the usual size
    batch = ops.random_resized_crop_boxes(H, W, seed=2**62 + 11, offset=5)
    rows = [ops.random_resized_crop_box(h, w, seed=2**62 + 11, counter=5 + i)
            for i, (h, w) in enumerate(zip(H.tolist(), W.tolist(), strict=True))]
    assert batch.boxes.dtype == torch.int32 and batch.flip.dtype == torch.bool
    assert batch.boxes.tolist() == [list(r[:4]) for r in rows]
    assert batch.flip.tolist() == [r[4] for r in rows]
    top, left, h, w = batch.boxes.long().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    # a per-row seed and sample number (a loader's per-image seed, the view as the sample)
    seeds = torch.randint(0, 2**62, (300,), generator=g)
    per_row = ops.random_resized_crop_boxes(H, W, seed=seeds, offset=torch.full((300,), 1))
    assert per_row.boxes[7].tolist() == list(ops.random_resized_crop_box(int(H[7]), int(W[7]), seed=int(seeds[7]),
                                                                     counter=1)[:4])
    # row b of offset o is row o + b of offset 0; another seed, other boxes
    assert torch.equal(ops.random_resized_crop_boxes(H[5:], W[5:], seed=2**62 + 11, offset=10).boxes, batch.boxes[5:])
    assert not torch.equal(ops.random_resized_crop_boxes(H, W, seed=12, offset=5).boxes, batch.boxes)


def test_box_sampler_fallback_is_the_clamped_central_crop():
    # Aspect ratios no try can meet: RandomResizedCrop's central crop clamped to the ratio range.
    assert ops.random_resized_crop_box(1, 900, seed=0)[:4] == (0, 449, 1, 1)
    assert ops.random_resized_crop_box(1000, 3, seed=0)[:4] == (498, 0, 4, 3)
    assert ops.random_resized_crop_box(1, 1, seed=0)[:4] == (0, 0, 1, 1)
    for seed in range(50):  # a tiny image whose tries round to nothing also ends there
        top, left, h, w, _ = ops.random_resized_crop_box(2, 2, seed=seed)
        assert 0 <= top and 0 <= left and top + h <= 2 and left + w <= 2


def test_box_sampler_follows_random_resized_crop_distribution():
    """Crop height, width, area fraction, aspect ratio and position against torchvision's
    RandomResizedCrop.get_params on a 375 x 500 image (two-sample Kolmogorov-Smirnov distance)."""
    n = 6000
    torch.manual_seed(0)
    theirs = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, 375, 500), (0.2, 1.0), (3 / 4, 4 / 3))
                           for _ in range(n)], dtype=torch.float64)
    ours = ops.random_resized_crop_boxes(torch.full((n,), 375), torch.full((n,), 500), seed=99).boxes.double()

    def features(b):
        top, left, h, w = b.unbind(1)
        return {"height": h, "width": w, "area": h * w / (375 * 500), "aspect": w / h,
                "top": top / (375 - h + 1), "left": left / (500 - w + 1)}

    critical = 1.63 * math.sqrt(2 / n)  # the 1% level
    for name, a in features(theirs).items():
        b = features(ours)[name]
        grid = torch.cat([a, b]).unique()
        cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / n
        cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / n
        assert (cdf_a - cdf_b).abs().max() < critical, name


def test_box_sampler_flips_and_arguments():
    H, W = torch.full((4000,), 100), torch.full((4000,), 80)
    flips = ops.random_resized_crop_boxes(H, W, seed=1).flip.float().mean()
    assert abs(flips - 0.5) < 0.03
    assert not ops.random_resized_crop_boxes(H, W, seed=1, flip_p=0.0).flip.any()
    assert ops.random_resized_crop_boxes(H, W, seed=1, flip_p=1.0).flip.all()
    with pytest.raises(ValueError, match="scale must be"):
        ops.random_resized_crop_boxes(H, W, seed=1, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio must be"):
        ops.random_resized_crop_box(10, 10, seed=1, ratio=(0, 1))
    with pytest.raises(ValueError, match="seed must be in"):
        ops.random_resized_crop_box(10, 10, seed=-1)
    with pytest.raises(ValueError, match="seed must be an int"):
        ops.random_resized_crop_boxes(H, W, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="height and width must be"):
        ops.random_resized_crop_box(0, 10, seed=1)
