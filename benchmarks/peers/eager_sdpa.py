"""The official MAE model on today's timm blocks (attention through PyTorch SDPA), run eagerly.

The strongest plain-PyTorch peer: the official ``models_mae.py`` steps (argsort masking,
gather, cat + gather un-shuffle, patchify-normalise loss) with timm's current ``Block``,
whose attention calls ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels on CUDA). ``torch.compile`` of this model is the "compile" peer.
Same ``state_dict`` keys as the official model.
"""

from __future__ import annotations

from functools import partial

from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

try:
    from peers import official_mae
except ImportError:  # imported as benchmarks.peers.eager_sdpa
    from . import official_mae


class SdpaBlock(TimmBlock):
    """timm's Block with SDPA attention forced on (timm may disable it by environment)."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, norm_layer=nn.LayerNorm):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer)
        self.attn.fused_attn = True


class MaskedAutoencoderViT(official_mae.MaskedAutoencoderViT):
    block_cls = SdpaBlock


def mae_vit_base_patch16(**kwargs):
    return MaskedAutoencoderViT(
        patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
