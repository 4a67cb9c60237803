"""Where the models' masks come from (fastmim.models.masking), and images of other sizes.

The generators (random, official, block, grid, one's own), an explicit ``mask=`` on every
method, a subclass's ``random_masking`` honoured, and the position embeddings resampled for
another image size.
"""

from __future__ import annotations

import pytest
import torch

from fastmim.models import CMAE, LUT, MaskedAutoencoderViT, SupervisedMIM
from fastmim.models.masking import list_mask_generators, make_masks, register_mask_generator
from fastmim.models.vit import vit_layer_norm
from fastmim.ops import use_backend
from fastmim.testing import assert_rel_close, backend_devices

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2, norm_layer=vit_layer_norm)


def tiny(cls=MaskedAutoencoderViT, **kwargs):
    extra = {"sync_bn": False, "head_hidden_dim": 32} if cls is LUT else {"sync_bn": False} if cls is CMAE else {}
    return cls(**{**TINY, **extra, **kwargs})


# ---------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("masking", ["random", "block", "grid"])
def test_counter_based_generators_are_seeded_and_offset_and_the_same_on_every_backend(masking):
    grid, ratio = (6, 8), 0.75
    whole = make_masks(6, grid, ratio, masking=masking, seed=3)
    assert whole.mask.sum(1).tolist() == [36.0] * 6 and whole.ids_keep.shape == (6, 12)
    assert torch.equal(whole.mask.gather(1, whole.ids_keep), torch.zeros(6, 12))
    assert not torch.equal(whole.mask[0], whole.mask[1])
    assert not torch.equal(whole.mask, make_masks(6, grid, ratio, masking=masking, seed=4).mask)
    tail = make_masks(2, grid, ratio, masking=masking, seed=torch.tensor(3), offset=4)  # rows 4, 5 of the seed
    assert torch.equal(tail.mask, whole.mask[4:])
    for backend, device in backend_devices():
        for reference in (False, True):  # a model's fused=False
            with use_backend(backend):
                got = make_masks(6, grid, ratio, masking=masking, seed=3, device=device, reference=reference)
            assert torch.equal(got.mask.cpu(), whole.mask) and torch.equal(got.ids_restore.cpu(), whole.ids_restore)
    torch.manual_seed(0)
    drawn = make_masks(2, grid, ratio, masking=masking)  # no seed: one drawn from torch's generator
    torch.manual_seed(0)
    assert torch.equal(make_masks(2, grid, ratio, masking=masking).mask, drawn.mask)


def test_block_masks_are_rectangles_and_grid_masks_keep_one_patch_per_cell():
    block = make_masks(8, (14, 14), 0.4, masking="block", seed=1).mask.reshape(8, 14, 14)
    assert block.sum((1, 2)).tolist() == [196 - 117] * 8  # keep int(196 * 0.6) = 117
    # rectangles: a masked patch has a masked 4-neighbour far more often than under random masking
    def neighbours(m):
        right, down = m[:, :, 1:] * m[:, :, :-1], m[:, 1:, :] * m[:, :-1, :]
        return (right.sum() + down.sum()) / m.sum()
    random = make_masks(8, (14, 14), 0.4, seed=1).mask.reshape(8, 14, 14)
    assert neighbours(block) > 1.3 * neighbours(random)
    grid = make_masks(3, (4, 6), 0.75, masking="grid", seed=2).mask.reshape(3, 2, 2, 3, 2).transpose(2, 3)
    assert torch.equal(grid.sum((-1, -2)), torch.full((3, 2, 3), 3.0))  # one visible patch per 2x2 cell
    with pytest.raises(ValueError, match="one patch of every 2x2 cell"):
        make_masks(3, (4, 6), 0.5, masking="grid", seed=2)


def test_per_sample_ratios_and_one_s_own_generator():
    masks = make_masks(3, (4, 4), [0.25, 0.75, 0.5], masking="block", seed=5)
    assert masks.num_visible == (12, 4, 8) and masks.cu_seqlens.tolist() == [0, 12, 16, 24]
    assert masks.mask.sum(1).tolist() == [4.0, 12.0, 8.0]

    def first_patches(request):  # keeps the first K patches of every image
        keep = torch.arange(request.num_patches) < request.num_keep
        return (~keep).float().expand(request.batch, -1)

    register_mask_generator("first", first_patches)
    assert "first" in list_mask_generators()
    with pytest.raises(ValueError, match="already registered"):
        register_mask_generator("first", first_patches)
    model = tiny(masking="first")
    _, _, mask = model(torch.randn(2, 3, 32, 32), 0.75)
    assert torch.equal(mask, torch.tensor([[0.0] * 4 + [1.0] * 12] * 2))


# ---------------------------------------------------------------------------------- explicit masks, the hook


def _views(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


@pytest.mark.parametrize("cls", [MaskedAutoencoderViT, SupervisedMIM, CMAE, LUT])
def test_an_explicit_mask_gives_the_same_loss_fused_or_not(cls):
    torch.manual_seed(0)
    fused = tiny(cls, **({"num_classes": 3} if cls is SupervisedMIM else {}))
    plain = tiny(cls, fused=False, **({"num_classes": 3} if cls is SupervisedMIM else {}))
    plain.load_state_dict(fused.state_dict())
    a, b = _views()
    if cls in (CMAE, LUT):  # (2B, L), view 1's rows first; LUT's views disjoint
        ids = torch.randperm(16)
        mask = torch.ones(4, 16)
        mask[:2, ids[:4]], mask[2:, ids[4:8]] = 0, 0
        args, key = (a, b), "loss"
    else:
        mask = (torch.arange(16) % 4 != 0).float().expand(2, 16).clone()
        mask[1, 1] = 0  # image 1 keeps 5 patches, image 0 four: packed
        args, key = ((a, torch.tensor([0, 2])) if cls is SupervisedMIM else (a,)), None
    outs = [m(*args, mask=mask) for m in (fused, plain)]
    losses = [o[key] if key else (o["loss"] if isinstance(o, dict) else o[0]) for o in outs]
    assert_rel_close(losses[0], losses[1], tol=1e-5, name="loss")
    if cls in (MaskedAutoencoderViT, SupervisedMIM):
        got = outs[0]["mask"] if isinstance(outs[0], dict) else outs[0][2]
        assert torch.equal(got, mask)


@pytest.mark.parametrize("fused", [True, False])
def test_an_overridden_random_masking_is_used(fused):
    class CenterMasking(MaskedAutoencoderViT):
        calls = 0

        def random_masking(self, x, mask_ratio, noise=None):
            CenterMasking.calls += 1
            keep = torch.tensor([5, 6, 9, 10])  # the 2x2 centre of the 4x4 grid
            mask = torch.ones(x.shape[0], 16)
            mask[:, keep] = 0
            ids_shuffle = torch.cat([keep, torch.tensor([i for i in range(16) if i not in keep.tolist()])])
            ids_restore = torch.argsort(ids_shuffle).expand(x.shape[0], -1)
            return x[:, keep], mask, ids_restore

    model = tiny(CenterMasking, fused=fused)
    plain = tiny(fused=fused)
    plain.load_state_dict(model.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    loss, _, mask = model(imgs, 0.75, seed=1)
    assert CenterMasking.calls == 1 and mask[:, [5, 6, 9, 10]].sum() == 0 and mask.sum() == 24
    want, _, _ = plain(imgs, mask=mask)  # the same masks given explicitly
    assert_rel_close(loss, want, tol=1e-5)


# ---------------------------------------------------------------------------------- image size


@pytest.mark.parametrize("size", [(48, 48), (32, 48)])
def test_a_model_runs_images_of_another_size(size):
    import timm

    from fastmim.models import load_encoder_into_timm

    model = tiny(depth=2)
    imgs = torch.randn(2, 3, *size)
    loss, pred, mask = model(imgs, 0.75, seed=0)
    patches = size[0] // 8 * size[1] // 8
    assert torch.isfinite(loss) and pred.shape == (2, patches, 192) and mask.shape == (2, patches)
    # the encoder's position embedding resampled as for a timm ViT built for that size
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=0).eval()
    load_encoder_into_timm(model, vit)
    assert_rel_close(model.forward_features(imgs), vit.forward_features(imgs), tol=1e-5)
    latent, _, _ = model.forward_encoder(imgs, 0.5, seed=0)
    assert latent.shape == (2, patches // 2 + 1, 32) and model.encode(imgs).shape == (2, 32)


def test_a_learned_position_embedding_is_resampled_too():
    model = tiny()
    model.pos_embed.data.normal_()  # learned (e.g. from a timm checkpoint), not sin-cos
    imgs = torch.randn(1, 3, 48, 48)
    pos = model.pos_embed_for((6, 6))
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True)  # as timm resamples
    assert_rel_close(pos[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 36, 32), tol=1e-6)
    assert torch.equal(pos[:, :1], model.pos_embed[:, :1]) and model.pos_embed_for((4, 4)) is model.pos_embed
    a, b = _views(size=48)
    assert torch.isfinite(tiny(LUT)(a, b, 0.75, seed=1)["loss"])
    assert torch.isfinite(tiny(CMAE, pos_fraction=0.0)(a, b, 0.75, seed=1)["loss"])
    assert torch.isfinite(model(imgs)[0])
