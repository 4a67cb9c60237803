"""Weights in and out: transformers' ViTMAE (both ways), timm ViTs into fastmim's encoders, and an
official main_pretrain.py checkpoint (model, AdamW state, epoch) continued in fastmim."""

import argparse
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from fastmim.models import MaskedAutoencoderViT, create_model, from_hf_vitmae, hf_vitmae_config, to_hf_vitmae
from fastmim.models.convert import hf_vitmae_layout, load_timm_vit_into
from fastmim.ops import use_backend
from fastmim.testing import assert_rel_close
from fastmim.train.official import init_from_official, read_official_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# Encoder and decoder MLP widths of different ratios (2 and 3), HF's LayerNorm eps, norm-pix loss.
HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8, num_channels=3, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2, decoder_intermediate_size=48, norm_pix_loss=True, mask_ratio=0.5)


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**HF_SMALL)).eval()
    with torch.no_grad():  # HF zero-inits biases and LayerNorm: random values test the mapping
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


# ---------------------------------------------------------------------------------- transformers

@pytest.mark.parametrize("fused", [False, True])
def test_from_hf_vitmae_gives_the_same_loss_and_pred_for_the_same_noise(hf_model, fused):
    model = from_hf_vitmae(hf_model, fused=fused).eval()
    assert model.norm.eps == hf_model.config.layer_norm_eps == 1e-12 and model.norm_pix_loss
    assert model.blocks[0].mlp.fc1.out_features == 64 and model.decoder_blocks[0].mlp.fc1.out_features == 48
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad(), use_backend("reference"):
        ref = hf_model(imgs, noise=noise)
        loss, pred, mask = model(imgs, hf_model.config.mask_ratio, noise=noise)
    assert torch.equal(mask, ref.mask)
    assert_rel_close(loss, ref.loss, tol=1e-5, name="loss")
    torch.testing.assert_close(pred, ref.logits, rtol=1e-4, atol=1e-5)


def test_to_hf_vitmae_loads_strictly_and_round_trips(hf_model):
    from transformers import ViTMAEForPreTraining

    model = from_hf_vitmae(hf_model)
    exported = to_hf_vitmae(model)  # the installed transformers' layout
    assert hf_vitmae_layout(exported) == hf_vitmae_layout()
    fresh = ViTMAEForPreTraining(hf_vitmae_config(model, mask_ratio=0.5))
    fresh.load_state_dict(exported, strict=True)
    original = hf_model.state_dict()
    assert set(fresh.state_dict()) == set(original)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, original[key]), key
    # The other layout, and back through a state dict with its config.
    for layout in ("v4", "v5"):
        sd = to_hf_vitmae(model, layout=layout)
        assert hf_vitmae_layout(sd) == layout
        again = from_hf_vitmae(sd, hf_model.config)
        for key, value in again.state_dict().items():
            assert torch.equal(value, model.state_dict()[key]), (layout, key)
    assert any(".encoder.layer.0.attention.attention.query." in k for k in to_hf_vitmae(model, "v4"))


def test_from_hf_vitmae_edge_cases(hf_model):
    from transformers import ViTMAEModel

    with pytest.raises(TypeError, match="config"):
        from_hf_vitmae(hf_model.state_dict())
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf_vitmae(hf_model.state_dict(), {**hf_model.config.to_dict(), "hidden_act": "relu"})
    encoder_only = ViTMAEModel(hf_model.config)
    encoder_only.load_state_dict({k[4:]: v for k, v in hf_model.state_dict().items() if k.startswith("vit.")})
    with pytest.warns(UserWarning, match="no decoder"):
        model = from_hf_vitmae(encoder_only)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight[32:64],
                               hf_model.vit.layers[1].attention.k_proj.weight, rtol=0, atol=0)
    # qkv_bias=False: the zero bias of fastmim's blocks is the same function.
    config = {**hf_model.config.to_dict(), "qkv_bias": False}
    sd = {k: v for k, v in to_hf_vitmae(from_hf_vitmae(hf_model)).items()
          if not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    assert torch.count_nonzero(from_hf_vitmae(sd, config).blocks[0].attn.qkv.bias) == 0


# ---------------------------------------------------------------------------------- timm

def _timm_vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                               "num_classes": 10, **kwargs}).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vit


TINY_MAE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6), fused=False)


def test_timm_vit_weights_load_into_fastmim_encoders():
    vit = _timm_vit()
    model = MaskedAutoencoderViT(**TINY_MAE).eval()
    decoder_before = model.decoder_pred.weight.clone()
    result = load_timm_vit_into(vit, model)
    assert "head.weight" in result.skipped and "blocks.1.attn.qkv.weight" in result.loaded
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(imgs), vit.forward_features(imgs), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.decoder_pred.weight, decoder_before)
    # Supervised + MIM takes the classifier too; LUT's teacher follows the loaded student.
    sup = create_model("supmim", "vit_tiny_patch4_32", **{k: v for k, v in TINY_MAE.items() if k != "fused"},
                       num_classes=10, pool="cls").eval()
    load_timm_vit_into(vit, sup)
    with torch.no_grad():
        torch.testing.assert_close(sup.classify(imgs), vit(imgs), rtol=1e-5, atol=1e-5)
    lut = create_model("lut", "vit_tiny_patch4_32", **{k: v for k, v in TINY_MAE.items() if k != "fused"},
                       head_hidden_dim=32)
    load_timm_vit_into(vit, lut)
    assert torch.equal(lut.teacher.state_dict()["blocks.0.attn.qkv.weight"], vit.blocks[0].attn.qkv.weight)


def test_timm_vit_adapted_to_another_grid_channels_and_layout():
    # A 64-px RGB ViT without qkv bias, its cls token without a position, into a grayscale 32-px model.
    vit = _timm_vit(img_size=64, qkv_bias=False, no_embed_class=True)
    model = MaskedAutoencoderViT(**{**TINY_MAE, "in_chans": 1})
    load_timm_vit_into(vit, model)
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.count_nonzero(model.pos_embed[0, 0]) == 0
    torch.testing.assert_close(model.patch_embed.proj.weight[:, 0], vit.patch_embed.proj.weight.sum(1))
    sincos = MaskedAutoencoderViT(**TINY_MAE).pos_embed.clone()
    kept = MaskedAutoencoderViT(**TINY_MAE)
    load_timm_vit_into(_timm_vit(), kept, pos_embed=False)
    assert torch.equal(kept.pos_embed, sincos)
    with pytest.raises(ValueError, match="depth"):
        load_timm_vit_into(_timm_vit(depth=1), MaskedAutoencoderViT(**TINY_MAE))
    with pytest.raises(ValueError, match="lacks"):
        load_timm_vit_into(_timm_vit(init_values=0.1), MaskedAutoencoderViT(**TINY_MAE))


# ---------------------------------------------------------------------------------- official checkpoints

def _official_run(tmp_path, steps=2):
    """An official MAE trained ``steps`` AdamW steps as main_pretrain.py does, saved as misc.save_model."""
    from peers.official_mae import MaskedAutoencoderViT as Official
    from timm.optim import param_groups_weight_decay

    torch.manual_seed(0)
    official = Official(**{k: v for k, v in TINY_MAE.items() if k != "fused"}, norm_pix_loss=True)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(official, 0.05), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(steps):
        loss, _, _ = official(torch.randn(4, 3, 32, 32), 0.75)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path / "checkpoint-1.pth"
    args = argparse.Namespace(model="mae_vit_base_patch16", blr=1e-3, weight_decay=0.05, norm_pix_loss=True,
                              output_dir=str(tmp_path), accum_iter=1, world_size=1)
    torch.save({"model": official.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 7}, "args": args}, path)
    return official, optimizer, path


def test_official_checkpoint_continues_in_fastmim_step_for_step(tmp_path):
    from timm.optim import param_groups_weight_decay

    official, official_opt, path = _official_run(tmp_path)
    model = MaskedAutoencoderViT(**TINY_MAE, norm_pix_loss=True)
    # fastmim train's optimizer: the same groups, fused AdamW.
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=True)
    start = init_from_official(path, model, optimizer)
    assert (start.step, start.epoch, start.optimizer_loaded) == (2, 2, True)
    assert start.scaler["_growth_tracker"] == 7 and start.args["blr"] == 1e-3
    # One more step of each on the same images and masks: the same parameters after it.
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    for m, opt in ((official, official_opt), (model, optimizer)):
        loss, _, _ = m(imgs, 0.75, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    theirs = dict(official.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("attn.qkv.bias"):
            # The key bias shifts every score of a query alike: its true gradient is 0, and Adam
            # scales the rounding noise left in it (1e-11) up to a step of about lr.
            q, k, v = p.chunk(3)
            q_ref, k_ref, v_ref = theirs[name].chunk(3)
            torch.testing.assert_close(torch.cat([q, v]), torch.cat([q_ref, v_ref]), rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(k, k_ref, rtol=0, atol=2e-3, msg=name)
            continue
        torch.testing.assert_close(p, theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert int(optimizer.state[model.cls_token]["step"]) == 3


def test_official_checkpoint_variants_and_refusals(tmp_path):
    official, _, path = _official_run(tmp_path, steps=1)
    # Released weights: the encoder only, no optimizer.
    encoder = {k: v for k, v in official.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    model = MaskedAutoencoderViT(**TINY_MAE, norm_pix_loss=True)
    decoder_before = model.decoder_pred.weight.clone()
    with pytest.warns(UserWarning, match="no decoder"):
        start = init_from_official({"model": encoder}, model)
    assert (start.step, start.epoch, start.optimizer_loaded) == (0, 0, False)
    assert torch.equal(model.blocks[0].attn.qkv.weight, official.blocks[0].attn.qkv.weight)
    assert torch.equal(model.decoder_pred.weight, decoder_before)
    with pytest.raises(ValueError, match="sizes"):
        init_from_official(path, MaskedAutoencoderViT(**{**TINY_MAE, "embed_dim": 64}))
    # Anything but tensors, plain values and the Namespace is not unpickled.
    bad = tmp_path / "bad.pth"
    torch.save({"model": official.state_dict(), "args": _Opaque()}, bad)
    with pytest.raises(ValueError, match="weights_only=False"):
        read_official_checkpoint(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_official_checkpoint(path).epoch == 1


class _Opaque:
    pass
