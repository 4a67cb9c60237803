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
    assert "mae" in list_methods()


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
