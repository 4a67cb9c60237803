"""fastmim.models: presets and create_model, the ViT blocks, MAE as a drop-in for the official model."""

import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from fastmim.models import (
    PRESETS,
    MaskedAutoencoderViT,
    create_model,
    get_2d_sincos_pos_embed,
    get_preset,
    list_methods,
    register_method,
)
from fastmim.models.presets import ViTPreset
from fastmim.testing import assert_rel_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, mlp_ratio=4.0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6))


def tiny_mae(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**TINY, **kwargs})


# ---------------------------------------------------------------------------------- presets


def test_presets_have_the_documented_sizes():
    base = get_preset("vit_base_patch16_224")
    assert (base.embed_dim, base.depth, base.num_heads, base.num_patches) == (768, 12, 12, 196)
    assert (base.decoder_embed_dim, base.decoder_depth, base.decoder_num_heads) == (512, 8, 16)
    assert get_preset("vit_large").embed_dim == 1024 and get_preset("vit_huge").depth == 32
    small = get_preset("vit_tiny_patch4_32")
    assert (small.img_size, small.patch_size, small.num_patches, small.decoder_embed_dim) == (32, 4, 64, 128)
    assert small.decoder_embed_dim // small.decoder_num_heads == 32
    for preset in PRESETS.values():
        assert preset.img_size % preset.patch_size == 0
        assert preset.embed_dim % preset.num_heads == 0


def test_create_model_builds_each_method_with_overrides():
    model = create_model("mae", "vit_tiny_patch4_32", in_chans=1, depth=1, decoder_depth=1)
    assert isinstance(model, MaskedAutoencoderViT)
    assert model.patch_embed.proj.weight.shape == (192, 1, 4, 4)
    assert len(model.blocks) == 1 and model.decoder_pred.out_features == 16
    assert {"mae", "supmim", "supmae"} <= set(list_methods())


def test_create_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown method 'maee'.*did you mean 'mae'"):
        create_model("maee")
    with pytest.raises(ValueError, match="unknown preset 'vit_tiny_patch4_23'"):
        create_model("mae", "vit_tiny_patch4_23")


def test_register_method_refuses_silent_replacement():
    def build(preset: ViTPreset, **kw):
        return nn.Identity()

    register_method("test-only-method", build)
    try:
        assert isinstance(create_model("test-only-method", "vit_tiny"), nn.Identity)
        with pytest.raises(ValueError, match="already registered"):
            register_method("test-only-method", lambda preset: nn.Identity())
    finally:
        from fastmim.models import presets

        presets._METHODS.pop("test-only-method")


# ---------------------------------------------------------------------------------- pos embed


def test_sincos_pos_embed_matches_the_official_formula():
    # Official MAE: grid = meshgrid(w, h); the first half of the channels encodes grid[0] (the
    # column index), the second half grid[1] (the row), each [sin(pos*w_d) | cos(pos*w_d)].
    dim, grid = 16, 3
    emb = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert emb.shape == (grid * grid + 1, dim) and emb.dtype == torch.float32
    assert torch.all(emb[0] == 0)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    row, col = 1, 2  # patch index row * grid + col
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega),
                          torch.cos(row * omega)]).float()
    torch.testing.assert_close(emb[1 + row * grid + col], expected)


# ---------------------------------------------------------------------------------- MAE vs official

def _official_block_keys(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    """The state dict of a timm 0.3.2 ``Block`` of width ``dim`` (mlp ratio 4, qkv bias) at ``prefix``."""
    shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
              "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
              "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (4 * dim, dim),
              "mlp.fc1.bias": (4 * dim,), "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
    return {f"{prefix}.{key}": shape for key, shape in shapes.items()}


# The official models_mae.py state dict (timm 0.3.2 blocks) for img 32, patch 8, 3 channels,
# embed 64, depth 1, 4 heads, decoder 32 wide, depth 1, mlp ratio 4: every key and shape.
OFFICIAL_KEYS_TINY = {
    "cls_token": (1, 1, 64),
    "pos_embed": (1, 17, 64),
    "patch_embed.proj.weight": (64, 3, 8, 8),
    "patch_embed.proj.bias": (64,),
    **_official_block_keys("blocks.0", 64),
    "norm.weight": (64,),
    "norm.bias": (64,),
    "mask_token": (1, 1, 32),
    "decoder_pos_embed": (1, 17, 32),
    "decoder_embed.weight": (32, 64),
    "decoder_embed.bias": (32,),
    **_official_block_keys("decoder_blocks.0", 32),
    "decoder_norm.weight": (32,),
    "decoder_norm.bias": (32,),
    "decoder_pred.weight": (192, 32),
    "decoder_pred.bias": (192,),
}


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_state_dict_has_the_official_keys_and_shapes():
    from peers.official_mae import MaskedAutoencoderViT as Official

    kwargs = {**TINY, "depth": 1, "decoder_depth": 1}
    assert _shapes(Official(**kwargs)) == OFFICIAL_KEYS_TINY
    assert _shapes(tiny_mae(**kwargs)) == OFFICIAL_KEYS_TINY


def test_factories_match_the_official_ones():
    from peers import official_mae

    import fastmim.models as fm

    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
                 "mae_vit_base_patch16_dec512d8b"):
        with torch.device("meta"):
            ours, theirs = getattr(fm, name)(), getattr(official_mae, name)()
        assert _shapes(ours) == _shapes(theirs), name
        assert ours.blocks[0].norm1.eps == 1e-6
        assert ours.patch_embed.proj.kernel_size == theirs.patch_embed.proj.kernel_size
    official_defaults = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                             decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                             norm_layer=nn.LayerNorm, norm_pix_loss=False)
    import inspect

    params = inspect.signature(MaskedAutoencoderViT.__init__).parameters
    assert {k: params[k].default for k in official_defaults} == official_defaults


def test_init_matches_the_official_init():
    from peers.official_mae import MaskedAutoencoderViT as Official

    ours, theirs = tiny_mae(), Official(**TINY)
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.decoder_pos_embed, theirs.decoder_pos_embed, rtol=0, atol=1e-7)
    assert not ours.pos_embed.requires_grad and not ours.decoder_pos_embed.requires_grad
    assert torch.all(ours.blocks[0].attn.qkv.bias == 0) and torch.all(ours.norm.weight == 1)
    assert 0.01 < ours.cls_token.std() < 0.04  # normal(std=0.02)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_official_weights_give_the_official_loss(fused, norm_pix_loss):
    from peers.official_mae import MaskedAutoencoderViT as Official

    official = Official(**TINY, norm_pix_loss=norm_pix_loss)
    ours = tiny_mae(norm_pix_loss=norm_pix_loss, fused=fused)
    ours.load_state_dict(official.state_dict())  # strict: same keys and shapes
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    loss_ref, pred_ref, mask_ref = official(imgs, 0.75, noise=noise)
    loss, pred, mask = ours(imgs, 0.75, noise=noise)
    assert torch.equal(mask, mask_ref)
    assert_rel_close(loss, loss_ref, tol=1e-5, name="loss")
    assert_rel_close(pred, pred_ref, tol=1e-5, name="pred")


@pytest.mark.parametrize("fused", [False, True])
def test_official_masking_draws_the_official_mask_from_the_torch_rng(fused):
    from peers.official_mae import MaskedAutoencoderViT as Official

    official = Official(**TINY)
    ours = tiny_mae(fused=fused, masking="official")
    ours.load_state_dict(official.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    for step in range(2):  # the same draws step after step: an official run's masks, bit for bit
        torch.manual_seed(5 + step)
        loss_ref, _, mask_ref = official(imgs)
        torch.manual_seed(5 + step)
        loss, _, mask = ours(imgs)
        assert torch.equal(mask, mask_ref)
        assert_rel_close(loss, loss_ref, tol=1e-5)


def _loss_and_grads(model, imgs, mask_ratio, noise):
    model.zero_grad()
    loss, pred, mask = model(imgs, mask_ratio, noise=noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred.detach(), mask, grads


@pytest.mark.parametrize("mask_ratio", [0.75, [0.5, 0.75, 0.6]])
@pytest.mark.parametrize("pred_masked_only", [False, True])
def test_fused_and_unfused_paths_compute_the_same_function(mask_ratio, pred_masked_only):
    unfused = tiny_mae(fused=False, norm_pix_loss=True)
    fused = tiny_mae(fused=True, norm_pix_loss=True, pred_masked_only=pred_masked_only)
    fused.load_state_dict(unfused.state_dict())
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    loss_u, pred_u, mask_u, grads_u = _loss_and_grads(unfused, imgs, mask_ratio, noise)
    loss_f, pred_f, mask_f, grads_f = _loss_and_grads(fused, imgs, mask_ratio, noise)
    assert torch.equal(mask_u, mask_f)
    assert_rel_close(loss_f, loss_u, tol=1e-5, name="loss")
    if pred_masked_only:  # pred holds the masked rows, in mask.bool() order
        pred_u = pred_u[mask_u.bool()].reshape(pred_f.shape)
    assert_rel_close(pred_f, pred_u, tol=1e-5, name="pred")
    assert grads_u.keys() == grads_f.keys()
    for name in grads_u:
        assert_rel_close(grads_f[name], grads_u[name], tol=1e-4, name=f"grad {name}")


def test_pred_masked_only_unfused_gives_the_same_loss():
    full = tiny_mae(fused=False)
    masked_only = tiny_mae(fused=False, pred_masked_only=True)
    masked_only.load_state_dict(full.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, pred, mask = full(imgs, 0.75, noise=noise)
    loss_m, pred_m, mask_m = masked_only(imgs, 0.75, noise=noise)
    assert pred_m.shape == (2, 12, 192)
    assert_rel_close(loss_m, loss, tol=1e-5)
    assert_rel_close(pred_m, pred[mask.bool()].reshape(2, 12, 192), tol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_per_sample_mask_ratio_equals_each_sample_run_alone(fused):
    model = tiny_mae(fused=fused, norm_pix_loss=True)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    ratios = [0.25, 0.75, 0.5]
    loss, pred, mask = model(imgs, ratios, noise=noise)
    assert mask.sum(dim=1).tolist() == [4.0, 12.0, 8.0]
    total, weight = 0.0, 0.0
    for b, r in enumerate(ratios):
        loss_b, pred_b, mask_b = model(imgs[b:b + 1], r, noise=noise[b:b + 1])
        assert torch.equal(mask_b[0], mask[b])
        assert_rel_close(pred[b], pred_b[0], tol=1e-5, name=f"pred of sample {b}")
        total, weight = total + loss_b * mask_b.sum(), weight + mask_b.sum()
    assert_rel_close(loss, total / weight, tol=1e-5)


def test_fused_masking_uses_fastmim_random_masking_and_the_torch_seed(monkeypatch):
    import fastmim.ops

    calls = []
    real = fastmim.ops.random_masking
    monkeypatch.setattr(fastmim.ops, "random_masking", lambda *a, **k: calls.append(a) or real(*a, **k))
    model = tiny_mae(fused=True)
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    loss_a, _, mask_a = model(imgs)
    assert calls == [(2, 16, 0.75)]
    # The mask is the op's, seeded from the default torch generator: the op called alone after the
    # same manual_seed gives it (an argsort of torch.rand noise would not).
    torch.manual_seed(3)
    want = real(2, 16, 0.75)
    assert torch.equal(mask_a, want.mask)
    torch.manual_seed(3)
    assert not torch.equal(torch.argsort(torch.argsort(torch.rand(2, 16), dim=1), dim=1) >= 4, mask_a.bool())
    torch.manual_seed(3)
    loss_b, _, mask_b = model(imgs)
    assert torch.equal(mask_a, mask_b) and torch.equal(loss_a, loss_b)
    assert mask_a.sum(dim=1).tolist() == [12.0, 12.0]
    _, _, mask_c = model(imgs)
    assert not torch.equal(mask_a, mask_c)


@pytest.mark.parametrize("fused", [True, False])
def test_seed_and_offset_mask_image_b_as_sample_offset_plus_b(fused, monkeypatch):
    import fastmim.ops
    from fastmim.ops import random_masking_reference

    calls = []
    real = fastmim.ops.random_masking
    monkeypatch.setattr(fastmim.ops, "random_masking", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = tiny_mae(fused=fused)
    imgs = torch.randn(3, 3, 32, 32)
    _, _, mask = model(imgs, 0.75, seed=11, offset=5)
    assert torch.equal(mask, random_masking_reference(8, 16, 0.75, seed=11).mask[5:])
    # a process holding images 1..2 of the batch masks them as one holding the whole batch
    _, _, whole = model(imgs, 0.75, seed=torch.tensor(11))
    _, _, tail = model(imgs[1:], 0.75, seed=torch.tensor(11), offset=torch.tensor(1))
    assert torch.equal(tail, whole[1:]) and not torch.equal(whole[0], whole[1])
    # per-sample ratios keep a prefix of the same permutations
    ratios = [0.5, 0.75, 0.25]
    _, _, varied = model(imgs, ratios, seed=11, offset=5)
    ids_restore = random_masking_reference(8, 16, 0.75, seed=11).ids_restore[5:]
    assert torch.equal(varied, (ids_restore >= torch.tensor([8, 4, 12])[:, None]).float())
    assert len(calls) == (4 if fused else 0)
    assert all(k["seed"] is not None and "offset" in k for k in calls)


def test_seed_gives_the_same_function_fused_or_not():
    unfused = tiny_mae(fused=False, norm_pix_loss=True)
    fused = tiny_mae(fused=True, norm_pix_loss=True)
    fused.load_state_dict(unfused.state_dict())
    imgs = torch.randn(3, 3, 32, 32)
    for ratio in (0.75, [0.5, 0.75, 0.6]):
        loss_u, _, mask_u = unfused(imgs, ratio, seed=2**40 + 1, offset=9)
        loss_f, _, mask_f = fused(imgs, ratio, seed=2**40 + 1, offset=9)
        assert torch.equal(mask_u, mask_f)
        assert_rel_close(loss_f, loss_u, tol=1e-5, name="loss")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("pred_masked_only", [False, True])
def test_gradients_reach_every_learnable_parameter(fused, pred_masked_only):
    model = tiny_mae(fused=fused, pred_masked_only=pred_masked_only, norm_pix_loss=True)
    loss, _, _ = model(torch.randn(2, 3, 32, 32), [0.5, 0.75] if fused else 0.75)
    loss.backward()
    for name, p in model.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert not p.requires_grad and p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_on_cpu_stays_close_to_fp32(fused):
    model = tiny_mae(fused=fused, norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss32, _, _ = model(imgs, 0.75, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, pred16, _ = model(imgs, 0.75, noise=noise)
    loss16.backward()
    assert pred16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert_rel_close(loss16, loss32, tol=3e-2)  # a few bf16 matmuls deep: 8-bit mantissa, well under 3%
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("pred_masked_only", [False, True])
def test_fused_model_compiles_fullgraph(pred_masked_only):
    model = tiny_mae(fused=True, pred_masked_only=pred_masked_only, norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    eager_loss, _, _ = model(imgs, 0.75, noise=noise)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, _, _ = compiled(imgs, 0.75, noise=noise)
    loss.backward()
    assert_rel_close(loss, eager_loss, tol=1e-5)
    assert model.cls_token.grad is not None
    torch._dynamo.reset()


def test_encode_gives_pooled_features_of_the_unmasked_image():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    feats = model.encode(imgs)
    tokens = model.forward_features(imgs)
    assert feats.shape == (2, 64) and tokens.shape == (2, 17, 64)
    torch.testing.assert_close(feats, tokens[:, 0])
    torch.testing.assert_close(model.encode(imgs, pool="mean"), tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="pool must be"):
        model.encode(imgs, pool="max")


def test_encoder_loads_into_a_timm_vit():
    import timm

    from fastmim.models import load_encoder_into_timm

    model = tiny_mae()
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                            depth=2, num_heads=4, num_classes=5)
    result = load_encoder_into_timm(model, vit)
    assert set(result.missing_keys) == {"head.weight", "head.bias"} and not result.unexpected_keys
    imgs = torch.randn(2, 3, 32, 32)
    vit.eval()
    assert_rel_close(vit.forward_features(imgs), model.forward_features(imgs), tol=1e-5)
    # MAE fine-tuning pools with fc_norm: the encoder's final norm is not used there.
    vit_avg = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                                depth=2, num_heads=4, num_classes=5, global_pool="avg")
    result = load_encoder_into_timm(model.state_dict(), vit_avg)
    assert set(result.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    wrong = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4)
    with pytest.raises(ValueError, match="does not fit"):
        load_encoder_into_timm(model, wrong)


# ---------------------------------------------------------------------------------- errors


def test_bad_masking_sources_raise_clear_errors():
    imgs = torch.randn(2, 3, 32, 32)
    for fused in (True, False):
        with pytest.raises(ValueError, match="give noise or seed / offset, not both"):
            tiny_mae(fused=fused)(imgs, 0.75, noise=torch.rand(2, 16), seed=1)
        with pytest.raises(ValueError, match="give noise or seed / offset, not both"):
            tiny_mae(fused=fused)(imgs, 0.75, noise=torch.rand(2, 16), offset=2)
    with pytest.raises(ValueError, match="masking='official' draws from torch's generator"):
        tiny_mae(masking="official")(imgs, 0.75, offset=2)
    with pytest.raises(ValueError, match="give mask or seed / offset, not both"):
        tiny_mae()(imgs, mask=torch.zeros(2, 16), seed=1)
    with pytest.raises(ValueError, match="masking must be one of"):
        tiny_mae(masking="checkerboard")
    for fused in (True, False):
        with pytest.raises(ValueError, match=r"offset must be in \[0, 2\*\*63\), got -1"):
            tiny_mae(fused=fused)(imgs, 0.75, seed=1, offset=-1)
        with pytest.raises(TypeError, match="offset must be an int or an int64 tensor, got float"):
            tiny_mae(fused=fused)(imgs, 0.75, seed=1, offset=1.0)


def test_bad_sizes_and_ratios_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny_mae(img_size=30)
    model = tiny_mae()
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="must be \\(B, C, H, W\\)"):
        model(torch.randn(3, 32, 32))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
            model(torch.randn(1, 3, 32, 32), bad)
    with pytest.raises(ValueError, match="leaves no visible patch"):
        model(torch.randn(1, 3, 32, 32), 0.99)
    with pytest.raises(ValueError, match="one value per image"):
        model(torch.randn(2, 3, 32, 32), [0.5])
    with pytest.raises(ValueError, match=r"mask_ratio\[i\] must be in \[0, 1\)"):
        model(torch.randn(2, 3, 32, 32), [0.5, 1.0])
    with pytest.raises(ValueError, match="noise must be"):
        model(torch.randn(2, 3, 32, 32), 0.5, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        tiny_mae(attn_backend="flash")


def test_mask_ratio_zero_keeps_every_patch():
    model = tiny_mae(fused=True)
    loss, pred, mask = model(torch.randn(2, 3, 32, 32), 0.0)
    assert mask.sum() == 0 and pred.shape == (2, 16, 192)


def test_patchify_roundtrip_and_layout():
    model = tiny_mae(in_chans=1)
    imgs = torch.randn(2, 1, 32, 32)
    x = model.patchify(imgs)
    assert x.shape == (2, 16, 64)
    torch.testing.assert_close(x[0, 5], imgs[0, 0, 8:16, 8:16].reshape(-1))  # patch (row 1, col 1)
    torch.testing.assert_close(model.unpatchify(x), imgs)


@pytest.mark.cuda
@pytest.mark.parametrize("mask_ratio", [0.75, [0.5, 0.75, 0.6]])
def test_cuda_fused_matches_unfused_in_bf16(mask_ratio):
    unfused = tiny_mae(fused=False, norm_pix_loss=True).cuda()
    fused = tiny_mae(fused=True, norm_pix_loss=True).cuda()
    fused.load_state_dict(unfused.state_dict())
    imgs, noise = torch.randn(3, 3, 32, 32, device="cuda"), torch.rand(3, 16, device="cuda")
    loss32, _, _ = unfused(imgs, mask_ratio, noise=noise)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss16, _, _ = fused(imgs, mask_ratio, noise=noise)
    loss16.backward()
    assert_rel_close(loss16, loss32, tol=3e-2)


def test_train_step_benchmark_counts_the_flops_a_real_step_runs():
    from bench_train_step import mae_step_flops
    from peers.official_mae import MaskedAutoencoderViT as Official
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=2)
    model = Official(**cfg, norm_pix_loss=True)
    imgs = torch.randn(3, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model(imgs, 0.75)
        loss.backward()
    assert mae_step_flops(cfg, batch=3, mask_ratio=0.75) == counter.get_total_flops()


@pytest.mark.parametrize("attn_backend", ["reference", "sdpa", "fastmim"])
def test_attention_backends_give_the_same_model(attn_backend):
    base = tiny_mae(fused=False)
    model = tiny_mae(fused=True, attn_backend=attn_backend)
    model.load_state_dict(base.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    for ratio in (0.75, [0.5, 0.25]):
        assert_rel_close(model(imgs, ratio, noise=noise)[0], base(imgs, ratio, noise=noise)[0], tol=1e-5)


def test_triton_kernels_run_the_whole_model():
    # Every fused op on its Triton kernel (the interpreter on CPU, the GPU when there is one).
    from fastmim.ops import use_backend
    from fastmim.testing import kernel_devices

    device = kernel_devices()[0] if kernel_devices() else pytest.skip("no Triton device here")
    base = tiny_mae(fused=False, depth=1, decoder_depth=1, norm_pix_loss=True).to(device)
    model = tiny_mae(fused=True, depth=1, decoder_depth=1, norm_pix_loss=True, attn_backend="fastmim").to(device)
    model.load_state_dict(base.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    loss_ref, _, _ = base(imgs, [0.75, 0.5], noise=noise)
    loss_ref.backward()
    with use_backend("triton"):
        loss, _, _ = model(imgs, [0.75, 0.5], noise=noise)
        loss.backward()
    assert_rel_close(loss, loss_ref, tol=1e-5)
    for (name, p), p_ref in zip(model.named_parameters(), base.parameters(), strict=True):
        if p.grad is not None:
            assert_rel_close(p.grad, p_ref.grad, tol=1e-4, name=name)
