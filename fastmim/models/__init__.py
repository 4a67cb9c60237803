"""fastmim's models: thin modules on timm blocks that call the fused ops.

- :func:`create_model` (``method``, ``preset``, ``**overrides``) builds any registered method
  (:func:`list_methods`) at any preset size (:func:`list_presets`).
- :class:`MaskedAutoencoderViT`: a drop-in for the official MAE model (``models_mae.py``).
- :class:`SupervisedMIM`: a classifier ViT trained jointly with a shallow MIM decoder.
- :class:`CMAE`, :class:`LUT`: the two-view self-supervised variants (``forward(view1, view2)``).
- :mod:`fastmim.models.masking`: where every model's masks come from (:func:`make_masks`; the
  generators ``random``, ``official``, ``block``, ``grid`` and one's own, :func:`register_mask_generator`).
- :func:`from_hf_vitmae`, :func:`to_hf_vitmae`: MAE weights from and to transformers' ViTMAE;
  :func:`load_timm_vit_into`: a timm ViT's weights into any model's encoder
  (:mod:`fastmim.models.convert`).
"""

from fastmim.models import mae
from fastmim.models.cmae import CMAE
from fastmim.models.convert import from_hf_vitmae, hf_vitmae_config, load_timm_vit_into, to_hf_vitmae
from fastmim.models.ema import EMATeacher
from fastmim.models.lut import LUT
from fastmim.models.mae import *  # noqa: F403  (the names of mae.__all__)
from fastmim.models.masking import MaskRequest, list_mask_generators, make_masks, register_mask_generator
from fastmim.models.presets import (
    DEFAULT_PRESET,
    PRESETS,
    ViTPreset,
    create_model,
    get_preset,
    list_methods,
    list_presets,
    register_method,
)
from fastmim.models.supmim import RECIPES, SupervisedMIM
from fastmim.models.vit import Attention, Block, get_2d_sincos_pos_embed, set_attn_backend

__all__ = [
    "Attention",
    "Block",
    "CMAE",
    "DEFAULT_PRESET",
    "EMATeacher",
    "LUT",
    "MaskRequest",
    "PRESETS",
    "RECIPES",
    "SupervisedMIM",
    "ViTPreset",
    "create_model",
    "from_hf_vitmae",
    "get_2d_sincos_pos_embed",
    "get_preset",
    "hf_vitmae_config",
    "list_mask_generators",
    "list_methods",
    "list_presets",
    "load_timm_vit_into",
    "make_masks",
    "register_mask_generator",
    "register_method",
    "set_attn_backend",
    "to_hf_vitmae",
] + mae.__all__
