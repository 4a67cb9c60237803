"""The public fused ops of fastmim.

Each op has a plain-PyTorch reference (the definition of its result), a Triton kernel for
CUDA tensors, and optionally a compiled csrc kernel; :mod:`fastmim.ops._dispatch` picks one
per call (``FASTMIM_BACKEND`` or :func:`use_backend` force one).
"""

from fastmim.ops._dispatch import BACKENDS, backend_status, forced_backend, select_backend, use_backend
from fastmim.ops._validate import check_indices
from fastmim.ops.attention import visible_attention, visible_attention_qkvpacked, visible_attention_reference
from fastmim.ops.attention_router import ATTN_BACKENDS, attention, attention_qkvpacked, choose_attn_backend
from fastmim.ops.fused_block import (
    layer_norm_stats,
    linear_add,
    linear_add_reference,
    norm_linear,
    norm_linear_reference,
    norm_mlp_add,
    norm_mlp_add_reference,
)
from fastmim.ops.gather import gather_visible, gather_visible_reference, unshuffle, unshuffle_reference
from fastmim.ops.loss import masked_patch_mse, masked_patch_mse_reference, patchify, unpatchify
from fastmim.ops.masking import (
    Masking,
    PackedMasking,
    check_mask_ratio,
    masking_from_mask,
    masking_from_permutation,
    num_keep_from_ratio,
    random_masking,
    random_masking_reference,
    random_permutation,
    random_permutation_reference,
)
from fastmim.ops.norm_act import (
    add_layer_norm,
    add_layer_norm_linear,
    add_layer_norm_reference,
    bias_gelu,
    bias_gelu_linear,
    bias_gelu_reference,
    layer_norm,
    layer_norm_linear,
    layer_norm_reference,
)
from fastmim.ops.resized_crop import (
    CropBoxes,
    PackedImages,
    pack_images,
    random_resized_crop_box,
    random_resized_crop_boxes,
    resized_crop_flip_normalize,
    resized_crop_flip_normalize_reference,
)

__all__ = ["BACKENDS", "backend_status", "check_indices", "forced_backend", "select_backend", "use_backend"]
__all__ += ["ATTN_BACKENDS", "attention", "attention_qkvpacked", "choose_attn_backend", "visible_attention",
            "visible_attention_qkvpacked", "visible_attention_reference"]
__all__ += ["add_layer_norm", "add_layer_norm_linear", "add_layer_norm_reference", "bias_gelu", "bias_gelu_linear",
            "bias_gelu_reference", "layer_norm", "layer_norm_linear", "layer_norm_reference"]
__all__ += ["layer_norm_stats", "linear_add", "linear_add_reference", "norm_linear", "norm_linear_reference",
            "norm_mlp_add", "norm_mlp_add_reference"]
__all__ += ["masked_patch_mse", "masked_patch_mse_reference", "patchify", "unpatchify"]
__all__ += ["CropBoxes", "PackedImages", "pack_images", "random_resized_crop_box", "random_resized_crop_boxes",
            "resized_crop_flip_normalize", "resized_crop_flip_normalize_reference"]
__all__ += ["gather_visible", "gather_visible_reference", "unshuffle", "unshuffle_reference"]
__all__ += ["Masking", "PackedMasking", "check_mask_ratio", "masking_from_mask", "masking_from_permutation",
            "num_keep_from_ratio", "random_masking", "random_masking_reference", "random_permutation",
            "random_permutation_reference"]
