"""Supervised + MIM (fastmim.models.SupervisedMIM): defaults, losses, eval path, gradients, compile."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmim.models import MaskedAutoencoderViT, SupervisedMIM, create_model
from fastmim.testing import assert_rel_close

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
            decoder_num_heads=2, num_classes=5)


def tiny(**kwargs) -> SupervisedMIM:
    return SupervisedMIM(**{**TINY, **kwargs})


def batch(n=3):
    return torch.randn(n, 3, 32, 32), torch.randint(0, 5, (n,))


def test_defaults_follow_the_method_spec():
    model = SupervisedMIM(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_classes=7)
    assert model.mask_ratio == 0.5 and model.w_mim == 1.0 and model.w_cls == 1.0
    assert model.label_smoothing == 0.1 and model.pool == "avg" and model.cls_input == "masked"
    assert len(model.decoder_blocks) == 2 and model.decoder_embed.out_features == 512
    assert model.norm_pix_loss and isinstance(model.head, nn.Linear) and model.head.out_features == 7
    supmae = SupervisedMIM(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, recipe="supmae")
    assert supmae.mask_ratio == 0.75 and supmae.w_cls == 0.01 and supmae.logit_temperature == 10.0
    assert len(supmae.decoder_blocks) == 1 and isinstance(supmae.head[1], nn.BatchNorm1d)
    assert SupervisedMIM(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, recipe="supmae",
                         mask_ratio=0.6).mask_ratio == 0.6  # explicit arguments override the recipe
    with pytest.warns(DeprecationWarning, match=r"recipe=\.\.\."):  # the recipe's former name still works
        old = SupervisedMIM(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, preset="supmae")
    assert old.recipe == "supmae" and old.mask_ratio == 0.75


def test_create_model_presets():
    model = create_model("supmim", "vit_tiny_patch4_32", in_chans=1, num_classes=10, depth=1)
    assert model.decoder_embed.out_features == 128 and len(model.decoder_blocks) == 2
    assert model.patch_embed.proj.in_channels == 1
    # docs/METHODS.md's width stays an option on the small presets
    wide = create_model("supmim", "vit_tiny_patch4_32", depth=1, decoder_embed_dim=512, decoder_num_heads=16)
    assert wide.decoder_embed.out_features == 512 and wide.decoder_blocks[0].attn.num_heads == 16
    assert create_model("supmae", "vit_tiny_patch4_32", depth=1).recipe == "supmae"
    with torch.device("meta"):
        base = create_model("supmim", "vit_base_patch16_224")
    assert base.decoder_embed.out_features == 512 and len(base.decoder_blocks) == 2


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_losses_are_the_documented_combination(fused, pool):
    model = tiny(fused=fused, pool=pool)
    imgs, labels = batch()
    noise = torch.rand(3, 16)
    out = model(imgs, labels, noise=noise)
    assert set(out) == {"loss", "loss_cls", "loss_mim", "logits", "pred", "mask"}
    assert out["logits"].shape == (3, 5) and out["mask"].sum(1).tolist() == [8.0, 8.0, 8.0]
    # The same pieces by hand through the MAE machinery.
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.5, noise=noise)
    feats = latent[:, 1:].mean(1) if pool == "avg" else latent[:, 0]
    logits = model.head(feats)
    loss_cls = F.cross_entropy(logits, labels, label_smoothing=0.1)
    loss_mim = MaskedAutoencoderViT.forward_loss(model, imgs, model.forward_decoder(latent, ids_restore), mask)
    assert_rel_close(out["logits"], logits, tol=1e-5)
    assert_rel_close(out["loss_cls"], loss_cls, tol=1e-5)
    assert_rel_close(out["loss_mim"], loss_mim, tol=1e-5)
    assert_rel_close(out["loss"], loss_cls + loss_mim, tol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_seed_and_offset_choose_the_masks(fused):
    from fastmim.ops import random_masking_reference

    model = tiny(fused=fused)
    imgs, labels = batch()
    out = model(imgs, labels, seed=21, offset=4)
    assert torch.equal(out["mask"], random_masking_reference(7, 16, 0.5, seed=21).mask[4:])
    tail = model(imgs[1:], labels[1:], seed=torch.tensor(21), offset=5)
    assert torch.equal(tail["mask"], out["mask"][1:])


def test_supmae_recipe_weights_and_temperature():
    model = tiny(recipe="supmae")
    model.eval()  # BatchNorm head: running statistics, so the hand computation below matches
    imgs, labels = batch()
    out = model(imgs, labels)
    loss_cls = F.cross_entropy(out["logits"] / 10.0, labels)
    assert_rel_close(out["loss_cls"], loss_cls, tol=1e-5)
    assert_rel_close(out["loss"], out["loss_mim"] + 0.01 * loss_cls, tol=1e-5)


def test_per_sample_mask_ratio_pools_each_sample_alone():
    model = tiny(fused=True)
    imgs, labels = batch()
    noise = torch.rand(3, 16)
    ratios = [0.25, 0.75, 0.5]
    out = model(imgs, labels, mask_ratio=ratios, noise=noise)
    for b, r in enumerate(ratios):
        alone = model(imgs[b:b + 1], labels[b:b + 1], mask_ratio=r, noise=noise[b:b + 1])
        assert_rel_close(out["logits"][b], alone["logits"][0], tol=1e-5, name=f"logits of sample {b}")


def test_full_cls_input_classifies_the_unmasked_image():
    model = tiny(cls_input="full")
    imgs, labels = batch()
    out = model(imgs, labels)
    assert_rel_close(out["logits"], model.classify(imgs), tol=1e-5)


def test_classify_is_the_plain_classifier_and_loads_into_timm():
    import timm

    from fastmim.models import load_encoder_into_timm

    model = tiny()
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                            depth=2, num_heads=4, num_classes=5, global_pool="avg", fc_norm=False)
    result = load_encoder_into_timm(model, vit)
    assert not result.missing_keys  # the linear head loads too
    imgs = torch.randn(2, 3, 32, 32)
    vit.eval()
    assert_rel_close(model.classify(imgs), vit(imgs), tol=1e-5)
    assert model.encode(imgs).shape == (2, 64)


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_reach_every_learnable_parameter(fused):
    model = tiny(fused=fused, pred_masked_only=fused)
    model(*batch())["loss"].backward()
    for name, p in model.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fused", [False, True])
def test_w_mim_zero_is_the_same_supervised_training_without_the_mim_branch(fused):
    """``w_mim=0`` (the baseline of benchmarks/reproduce_methods.py): the same masked pass, masks
    and classifier, and the reconstruction loss reaches no weight. The encoder and head get
    exactly the gradients of the classification loss alone; the decoder gets none."""
    torch.manual_seed(0)
    on = tiny(fused=fused)
    off = tiny(fused=fused, w_mim=0.0)
    off.load_state_dict(on.state_dict())
    imgs, labels = batch(4)
    out_off = off(imgs, labels, seed=5)
    out_on = on(imgs, labels, seed=5)
    assert torch.equal(out_off["mask"], out_on["mask"]) and torch.equal(out_off["logits"], out_on["logits"])
    assert out_off["loss"].item() == pytest.approx(out_off["loss_cls"].item())
    assert out_off["loss_mim"].item() > 0  # still computed and logged, only not trained on
    out_off["loss"].backward()
    on.zero_grad()
    out_on["loss_cls"].backward()  # the classification loss alone, through the same forward
    for (name, p_off), (_, p_on) in zip(off.named_parameters(), on.named_parameters(), strict=True):
        if name.startswith(("decoder_", "mask_token")):
            assert p_off.grad is None or not p_off.grad.any(), name
        elif p_on.grad is None:
            assert p_off.grad is None or not p_off.grad.any(), name
        else:
            assert torch.allclose(p_off.grad, p_on.grad, rtol=1e-5, atol=1e-7), name


def test_tokenizer_target_trains_with_cross_entropy():
    class PatchMeanTokenizer(nn.Module):  # a stand-in tokenizer: 4 ids from each patch's mean brightness
        def forward(self, imgs):
            means = F.avg_pool2d(imgs.mean(1, keepdim=True), 8).flatten(1)
            return torch.bucketize(means, torch.tensor([-0.1, 0.0, 0.1]))

    model = tiny(tokenizer=PatchMeanTokenizer(), tokenizer_vocab_size=4)
    model_m = tiny(tokenizer=PatchMeanTokenizer(), tokenizer_vocab_size=4, pred_masked_only=True)
    model_m.load_state_dict(model.state_dict())
    imgs, labels = batch()
    noise = torch.rand(3, 16)
    out, out_m = model(imgs, labels, noise=noise), model_m(imgs, labels, noise=noise)
    assert out["pred"].shape == (3, 16, 4) and out_m["pred"].shape == (3, 8, 4)
    assert_rel_close(out_m["loss_mim"], out["loss_mim"], tol=1e-5)
    out["loss"].backward()
    assert model.decoder_pred.weight.grad is not None


def test_bf16_autocast_and_compile():
    model = tiny(fused=True)
    imgs, labels = batch()
    noise = torch.rand(3, 16)
    ref = model(imgs, labels, noise=noise)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(imgs, labels, noise=noise)
    assert_rel_close(out["loss"], ref, tol=3e-2)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(imgs, labels, noise=noise)["loss"]
    loss.backward()
    assert_rel_close(loss, ref, tol=1e-5)
    torch._dynamo.reset()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="recipe must be one of"):
        tiny(recipe="mae")
    with pytest.raises(ValueError, match="pool must be"):
        tiny(pool="max")
    with pytest.raises(ValueError, match="cls_input must be"):
        tiny(cls_input="both")
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        tiny(mask_ratio=1.0)
    with pytest.raises(ValueError, match="tokenizer"):
        tiny(tokenizer=nn.Identity())
    model = tiny()
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 3, 36, 36), torch.zeros(1, dtype=torch.long))


@pytest.mark.cuda
def test_cuda_bf16_training_step():
    model = tiny(fused=True).cuda()
    imgs, labels = (t.cuda() for t in batch())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(imgs, labels)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
