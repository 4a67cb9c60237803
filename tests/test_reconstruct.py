"""MaskedAutoencoderViT.reconstruct and unpatchify: predictions back in pixel space, any patch grid."""

from functools import partial

import pytest
import torch
from torch import nn

from fastmim.models import MaskedAutoencoderViT

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6), fused=False)


def _normalised_patches(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> torch.Tensor:
    """The loss's target: each patch normalised with its own mean and unbiased variance."""
    t = model.patchify(imgs)
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5


def test_reconstruct_undoes_norm_pix_with_each_patch_statistics():
    model = MaskedAutoencoderViT(**TINY, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32) * 3 + 1
    _, _, mask = model(imgs, 0.75, noise=torch.rand(2, 16))
    perfect = _normalised_patches(model, imgs)  # the prediction of zero loss
    torch.testing.assert_close(model.reconstruct(imgs, perfect, mask), imgs, rtol=0, atol=1e-4)
    # Without norm_pix the prediction already is pixels.
    plain = MaskedAutoencoderViT(**TINY)
    torch.testing.assert_close(plain.reconstruct(imgs, plain.patchify(imgs)), imgs, rtol=0, atol=0)


def test_reconstruct_of_a_forward_pass_and_paste_visible():
    model = MaskedAutoencoderViT(**TINY, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, pred, mask = model(imgs, 0.75, noise=torch.rand(2, 16))
        recon = model.reconstruct(imgs, pred, mask)
        pasted = model.reconstruct(imgs, pred, mask, paste_visible=True)
    assert recon.shape == imgs.shape and recon.dtype == torch.float32
    visible = model.unpatchify((1 - mask)[..., None].expand(-1, -1, 8 * 8 * 3)).bool()
    assert torch.equal(pasted[visible], imgs[visible])  # the visible patches are the image's
    assert torch.equal(pasted[~visible], recon[~visible])  # the masked ones the reconstruction


def test_reconstruct_takes_the_masked_rows_of_pred_masked_only():
    model = MaskedAutoencoderViT(**TINY, norm_pix_loss=True, pred_masked_only=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, pred, mask = model(imgs, 0.75, noise=torch.rand(2, 16))
    assert pred.shape == (2, 12, 192)
    perfect = _normalised_patches(model, imgs)[mask.bool()].reshape(2, 12, 192)
    torch.testing.assert_close(model.reconstruct(imgs, perfect, mask), imgs, rtol=0, atol=1e-4)
    # Per-sample mask ratios: packed rows.
    with torch.no_grad():
        _, packed, mask = model(imgs, [0.5, 0.75], seed=3)
    assert packed.shape == (8 + 12, 192)
    recon = model.reconstruct(imgs, packed, mask)
    visible = model.unpatchify((1 - mask)[..., None].expand(-1, -1, 192)).bool()
    assert torch.equal(recon[visible], imgs[visible])
    with pytest.raises(ValueError, match="mask"):
        model.reconstruct(imgs, perfect)


def test_patchify_and_unpatchify_on_non_square_grids():
    model = MaskedAutoencoderViT(**{**TINY, "img_size": (32, 48)}, norm_pix_loss=True)
    assert model.grid_size == (4, 6) and tuple(model.patch_embed.grid_size) == (4, 6)
    imgs = torch.randn(2, 3, 32, 48)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 24, 192)
    assert torch.equal(model.unpatchify(patches), imgs)
    _, pred, mask = model(imgs, 0.5, noise=torch.rand(2, 24))
    assert model.reconstruct(imgs, pred, mask).shape == imgs.shape
    # Another grid than the model's: give it, or reconstruct infers it from the images.
    small = torch.randn(1, 3, 16, 40)
    assert torch.equal(model.unpatchify(model.patchify(small), grid_size=(2, 5)), small)
    torch.testing.assert_close(model.reconstruct(small, _normalised_patches(model, small)), small, rtol=0,
                               atol=1e-4)
    with pytest.raises(ValueError, match="4\\*6"):
        model.unpatchify(model.patchify(small))


def test_the_trainer_figure_uses_the_public_reconstruct_with_the_same_result():
    import sys
    from pathlib import Path

    from fastmim.train.methods import MethodAdapter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from peers.official_mae import MaskedAutoencoderViT as Official

    model = MaskedAutoencoderViT(**TINY, norm_pix_loss=True).eval()
    official = Official(**{k: v for k, v in TINY.items() if k != "fused"}, norm_pix_loss=True).eval()
    official.load_state_dict(model.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        recon, mask = MethodAdapter().reconstruct(model, imgs, 0.75, noise)
        _, pred, mask_fwd = model(imgs, 0.75, noise=noise)
        # The official model has no reconstruct: the adapter's own de-normalisation, the same formula.
        recon_official, mask_official = MethodAdapter().reconstruct(official, imgs, 0.75, noise)
    assert torch.equal(mask, mask_fwd) and torch.equal(mask, mask_official)
    torch.testing.assert_close(recon, model.reconstruct(imgs, pred, mask))
    torch.testing.assert_close(recon, recon_official, rtol=1e-4, atol=1e-5)
