"""Hugging Face ``transformers``' MAE (``ViTMAEForPreTraining``) behind the official MAE's call.

The peer of the "HF ViTMAE" rows of the cost model: the model as transformers builds it (SDPA
attention, separate q/k/v projections, argsort masking, patchify loss written inline in its
``forward``), wrapped so that ``forward(imgs, mask_ratio) -> (loss, pred, mask)`` as the
official model's. The mask ratio is the config's (``ViTMAEConfig.mask_ratio``); another one is
an error. Built from a config, never from downloaded weights.
"""

from __future__ import annotations

from torch import nn


def config(*, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads, img_size,
           patch_size, in_chans=3, mlp_ratio=4.0, norm_pix_loss=True, mask_ratio=0.75, eps=1e-6):
    """A ``ViTMAEConfig`` with the official model's sizes (SDPA attention, no dropout)."""
    from transformers import ViTMAEConfig

    return ViTMAEConfig(hidden_size=embed_dim, num_hidden_layers=depth, num_attention_heads=num_heads,
                        intermediate_size=int(embed_dim * mlp_ratio), decoder_hidden_size=decoder_embed_dim,
                        decoder_num_hidden_layers=decoder_depth, decoder_num_attention_heads=decoder_num_heads,
                        decoder_intermediate_size=int(decoder_embed_dim * mlp_ratio), image_size=img_size,
                        patch_size=patch_size, num_channels=in_chans, qkv_bias=True, hidden_act="gelu",
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=eps,
                        norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio, attn_implementation="sdpa")


class MaskedAutoencoderViT(nn.Module):
    """``ViTMAEForPreTraining`` (as ``self.model``) called as the official MAE is."""

    def __init__(self, **sizes):
        super().__init__()
        from transformers import ViTMAEForPreTraining

        self.model = ViTMAEForPreTraining(config(**sizes))

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        if mask_ratio != self.model.config.mask_ratio:
            raise ValueError(f"this model masks {self.model.config.mask_ratio} of the patches (its config), "
                             f"got mask_ratio={mask_ratio}")
        out = self.model(pixel_values=imgs, noise=noise)
        return out.loss, out.logits, out.mask
