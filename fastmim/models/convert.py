"""Weights in and out of fastmim's models: transformers' ViTMAE and timm's ViTs.

- :func:`from_hf_vitmae` builds the :class:`~fastmim.models.MaskedAutoencoderViT` equivalent to a
  transformers ``ViTMAEForPreTraining`` (or ``ViTMAEModel``, or a state dict with its config):
  same sizes, LayerNorm eps, MLP widths (encoder and decoder each their own) and ``norm_pix_loss``,
  so that ``model(imgs, config.mask_ratio, noise=noise)`` gives HF's loss and prediction for the
  same ``noise`` (both keep ``argsort(noise)``'s first patches, as the official code).
- :func:`to_hf_vitmae` is the inverse: a state dict that loads strictly into the installed
  transformers' ``ViTMAEForPreTraining`` (built from :func:`hf_vitmae_config`), or into either
  key layout on request.
- :func:`load_timm_vit_into` loads a timm ``VisionTransformer``'s weights (or its state dict)
  into the encoder of any fastmim model (MAE, supervised + MIM, CMAE, LUT), e.g. to start
  supervised + MIM training from a pretrained ViT.

The two transformers key layouts (both read, either written):

- ``"v5"`` (transformers >= 5): ``vit.layers.N.attention.{q,k,v,o}_proj``, ``vit.layers.N.mlp.fc{1,2}``;
- ``"v4"`` (earlier versions, and the files on the Hub, which transformers 5's ``from_pretrained``
  converts): ``vit.encoder.layer.N.attention.attention.{query,key,value}``,
  ``...attention.output.dense``, ``...intermediate.dense``, ``...output.dense``.

The decoder's blocks (``decoder.decoder_layers.N``) take the same block names. HF has separate
``q``, ``k``, ``v`` projections where fastmim (and timm, and the official MAE) has one fused
``qkv``: they are concatenated (and split) in that order. fastmim's MAE has no dropout: HF's
``hidden_dropout_prob`` / ``attention_probs_dropout_prob`` (0 in every released MAE) are not
carried, so the two models agree in eval mode or with those at 0.

No function here downloads anything: a Hub model is ``ViTMAEForPreTraining.from_pretrained(...)``,
run by the caller.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from fastmim.models.mae import MaskedAutoencoderViT

__all__ = [
    "HF_LAYOUTS",
    "TimmLoadResult",
    "fastmim_config_from_hf",
    "from_hf_vitmae",
    "hf_vitmae_config",
    "hf_vitmae_layout",
    "load_timm_vit_into",
    "to_hf_vitmae",
]

# fastmim block parameter -> HF block parameter, per layout (q, k, v are the three thirds of qkv).
_BLOCK_NAMES = {
    "v5": {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
           "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
           "norm1": "layernorm_before", "norm2": "layernorm_after"},
    "v4": {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
           "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
           "norm1": "layernorm_before", "norm2": "layernorm_after"},
}
_ENCODER_LAYERS = {"v5": "vit.layers", "v4": "vit.encoder.layer"}
HF_LAYOUTS = tuple(_BLOCK_NAMES)

# Parameters outside the blocks: fastmim name -> HF name (the same in both layouts).
_TOP_NAMES = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}


# ---------------------------------------------------------------------------------- HF config

def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        raise TypeError("a ViTMAE state dict needs its config (config=model.config, a ViTMAEConfig or its dict): "
                        "the number of heads is not in the weights")
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a transformers ViTMAEConfig or a dict, got {type(config).__name__}")


def _mlp_ratio(dim: int, hidden: int) -> float:
    """A ratio timm's ``Mlp`` turns back into ``hidden`` (it builds ``int(dim * ratio)`` units)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def fastmim_config_from_hf(config: Any) -> dict[str, Any]:
    """:class:`~fastmim.models.MaskedAutoencoderViT` constructor arguments equivalent to a
    transformers ``ViTMAEConfig`` (or its dict). ``ValueError`` for what fastmim's MAE cannot
    express (an activation other than exact GELU)."""
    c = _config_dict(config)
    act = c.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act {act!r}: fastmim's ViT blocks use the exact GELU ('gelu')")
    dim, dec = int(c["hidden_size"]), int(c["decoder_hidden_size"])
    return {
        "img_size": c.get("image_size", 224), "patch_size": c.get("patch_size", 16),
        "in_chans": int(c.get("num_channels", 3)), "embed_dim": dim, "depth": int(c["num_hidden_layers"]),
        "num_heads": int(c["num_attention_heads"]), "decoder_embed_dim": dec,
        "decoder_depth": int(c["decoder_num_hidden_layers"]),
        "decoder_num_heads": int(c["decoder_num_attention_heads"]),
        "mlp_ratio": _mlp_ratio(dim, int(c["intermediate_size"])),
        "decoder_mlp_ratio": _mlp_ratio(dec, int(c["decoder_intermediate_size"])),
        "norm_layer": partial(nn.LayerNorm, eps=float(c.get("layer_norm_eps", 1e-12))),
        "norm_pix_loss": bool(c.get("norm_pix_loss", False)),
    }


def hf_vitmae_config(model: MaskedAutoencoderViT, mask_ratio: float = 0.75, **extra: Any):
    """The transformers ``ViTMAEConfig`` of ``model`` (``mask_ratio``: the ratio HF's forward
    uses, a forward argument in fastmim). Needs transformers."""
    from transformers import ViTMAEConfig

    if not model.decoder_blocks:
        raise ValueError("ViTMAE needs at least one decoder block")
    h, w = model.patch_embed.img_size
    enc, dec = model.blocks[0], model.decoder_blocks[0]
    return ViTMAEConfig(
        image_size=h if h == w else [h, w], patch_size=model.patch_size, num_channels=model.in_chans,
        hidden_size=model.cls_token.shape[-1], num_hidden_layers=len(model.blocks),
        num_attention_heads=enc.attn.num_heads, intermediate_size=enc.mlp.fc1.out_features,
        decoder_hidden_size=model.mask_token.shape[-1], decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=dec.attn.num_heads, decoder_intermediate_size=dec.mlp.fc1.out_features,
        layer_norm_eps=model.norm.eps, norm_pix_loss=bool(model.norm_pix_loss), mask_ratio=mask_ratio,
        hidden_act="gelu", qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)


# ---------------------------------------------------------------------------------- HF keys

def hf_vitmae_layout(state_dict: Mapping[str, Any] | None = None) -> str:
    """``"v4"`` or ``"v5"``: the key layout of ``state_dict``, or (``None``) the one the installed
    transformers' ``ViTMAEForPreTraining`` has (``"v4"`` when transformers is not installed: the
    layout of the files on the Hub, which every version's ``from_pretrained`` reads)."""
    if state_dict is not None:
        keys = list(state_dict)
        if any(".encoder.layer." in k or ".attention.attention." in k for k in keys):
            return "v4"
        if any(".layers." in k or ".q_proj." in k for k in keys):
            return "v5"
        raise ValueError("not a ViTMAE state dict: no encoder layer in its keys")
    return _installed_layout()


@functools.cache
def _installed_layout() -> str:
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError:
        return "v4"
    config = ViTMAEConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4,
                          decoder_hidden_size=4, decoder_num_hidden_layers=1, decoder_num_attention_heads=1,
                          decoder_intermediate_size=4, image_size=2, patch_size=1, num_channels=1)
    return hf_vitmae_layout(ViTMAEForPreTraining(config).state_dict())


def _block_pairs(layout: str, fastmim_prefix: str, hf_prefix: str) -> list[tuple[str, str]]:
    names = _BLOCK_NAMES[layout]
    pairs = []
    for ours in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        for leaf in ("weight", "bias"):
            pairs.append((f"{fastmim_prefix}.{ours}.{leaf}", f"{hf_prefix}.{names[ours]}.{leaf}"))
    return pairs


def _hf_to_fastmim_keys(sd: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """fastmim-named tensors from an HF state dict, and the HF keys left over."""
    names = _BLOCK_NAMES[layout]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs in _TOP_NAMES.items():
        if theirs in sd:
            out[ours] = sd[theirs]
            used.add(theirs)
    for ours_list, theirs_list in (("blocks", _ENCODER_LAYERS[layout]), ("decoder_blocks", "decoder.decoder_layers")):
        i = 0
        while f"{theirs_list}.{i}.{names['q']}.weight" in sd:
            ours_p, theirs_p = f"{ours_list}.{i}", f"{theirs_list}.{i}"
            for ours, theirs in _block_pairs(layout, ours_p, theirs_p):
                if theirs in sd:
                    out[ours] = sd[theirs]
                    used.add(theirs)
            qkv = [f"{theirs_p}.{names[p]}.weight" for p in "qkv"]
            out[f"{ours_p}.attn.qkv.weight"] = torch.cat([sd[k] for k in qkv], dim=0)
            used.update(qkv)
            biases = [f"{theirs_p}.{names[p]}.bias" for p in "qkv"]
            if all(b in sd for b in biases):  # qkv_bias=False: fastmim's zero bias is the same function
                out[f"{ours_p}.attn.qkv.bias"] = torch.cat([sd[k] for k in biases], dim=0)
                used.update(biases)
            else:
                out[f"{ours_p}.attn.qkv.bias"] = sd[qkv[0]].new_zeros(3 * sd[qkv[0]].shape[0])
            i += 1
    return out, sorted(set(sd) - used)


def _fastmim_to_hf_keys(sd: Mapping[str, torch.Tensor], layout: str, depth: int,
                        decoder_depth: int) -> dict[str, torch.Tensor]:
    names = _BLOCK_NAMES[layout]
    out = {theirs: sd[ours] for ours, theirs in _TOP_NAMES.items()}
    for ours_list, theirs_list, n in (("blocks", _ENCODER_LAYERS[layout], depth),
                                      ("decoder_blocks", "decoder.decoder_layers", decoder_depth)):
        for i in range(n):
            ours_p, theirs_p = f"{ours_list}.{i}", f"{theirs_list}.{i}"
            for ours, theirs in _block_pairs(layout, ours_p, theirs_p):
                out[theirs] = sd[ours]
            for leaf in ("weight", "bias"):
                for part, tensor in zip("qkv", sd[f"{ours_p}.attn.qkv.{leaf}"].chunk(3, dim=0), strict=True):
                    out[f"{theirs_p}.{names[part]}.{leaf}"] = tensor.clone()
    return out


# ---------------------------------------------------------------------------------- HF in and out

def from_hf_vitmae(hf_model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], config: Any = None,
                   **overrides: Any) -> MaskedAutoencoderViT:
    """The :class:`~fastmim.models.MaskedAutoencoderViT` equivalent to a transformers ViTMAE.

    ``hf_model_or_state_dict``: a ``ViTMAEForPreTraining`` (its config is read from it), a
    ``ViTMAEModel`` (no decoder: the fastmim decoder keeps its fresh MAE init, with a warning), or
    either's state dict in either key layout with ``config`` (a ``ViTMAEConfig`` or its dict).
    ``overrides``: further constructor arguments (``fused``, ``attn_backend``,
    ``pred_masked_only``, ``drop_path_rate``).

    The model carries HF's ``layer_norm_eps``, ``intermediate_size`` and
    ``decoder_intermediate_size`` and ``norm_pix_loss``; HF's ``mask_ratio`` is
    ``forward``'s argument in fastmim (``model(imgs, config.mask_ratio, noise=noise)`` gives HF's
    ``loss``, ``logits`` as ``pred``, and ``mask`` for the same ``noise``).
    """
    if isinstance(hf_model_or_state_dict, nn.Module):
        config = hf_model_or_state_dict.config if config is None else config
        sd = hf_model_or_state_dict.state_dict()
    else:
        sd = dict(hf_model_or_state_dict)
    if sd and not any(k.startswith("vit.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {f"vit.{k}": v for k, v in sd.items()}  # a ViTMAEModel's keys
    kwargs = {**fastmim_config_from_hf(config), **overrides}
    layout = hf_vitmae_layout(sd)
    weights, leftover = _hf_to_fastmim_keys(sd, layout)
    if leftover:
        raise ValueError(f"ViTMAE weights fastmim's MAE has no place for: {leftover[:8]}"
                         f"{' ...' if len(leftover) > 8 else ''}")
    model = MaskedAutoencoderViT(**kwargs)
    target = model.state_dict()
    missing = sorted(set(target) - set(weights))
    no_decoder = all(k.startswith(("decoder_", "mask_token")) for k in missing)
    if missing and not no_decoder:
        raise ValueError(f"the ViTMAE weights lack encoder tensors: {missing[:8]}")
    for key, value in weights.items():
        if key not in target or tuple(value.shape) != tuple(target[key].shape):
            shape = tuple(target[key].shape) if key in target else None
            raise ValueError(f"{key}: the ViTMAE tensor has shape {tuple(value.shape)}, the model built from its "
                             f"config {shape} (config and weights disagree)")
    if missing:
        warnings.warn("the ViTMAE weights have no decoder (a ViTMAEModel): the decoder keeps its fresh init",
                      stacklevel=2)
    model.load_state_dict(weights, strict=not missing)
    return model


def to_hf_vitmae(model: MaskedAutoencoderViT, layout: str | None = None) -> dict[str, torch.Tensor]:
    """``model``'s encoder and pixel decoder as a transformers ``ViTMAEForPreTraining`` state dict.

    It loads strictly (``load_state_dict(sd)``) into ``ViTMAEForPreTraining(hf_vitmae_config(model))``.
    ``layout``: ``"v5"`` or ``"v4"`` (module doc); default the installed transformers' (``"v4"``
    without transformers: the Hub's files, which ``from_pretrained`` of every version reads).
    A subclass's other modules (a classifier, projection heads, an EMA teacher) are left out.
    """
    layout = hf_vitmae_layout() if layout is None else layout
    if layout not in HF_LAYOUTS:
        raise ValueError(f"layout must be one of {HF_LAYOUTS}, got {layout!r}")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return _fastmim_to_hf_keys(sd, layout, len(model.blocks), len(model.decoder_blocks))


# ---------------------------------------------------------------------------------- timm in

class TimmLoadResult(NamedTuple):
    loaded: list[str]  # fastmim keys set from the timm weights
    skipped: list[str]  # timm keys not used (a classifier that does not fit, fc_norm, ...)


_UNSUPPORTED = ("reg_token", "dist_token", "ls1.", "ls2.", "q_norm.", "k_norm.", "norm_pre.", "attn_pool.")


def load_timm_vit_into(timm_vit: nn.Module | Mapping[str, torch.Tensor], model: nn.Module, *,
                       pos_embed: bool = True, head: bool = True) -> TimmLoadResult:
    """Load a timm ``VisionTransformer`` (or its state dict) into the encoder of ``model``.

    ``model``: any fastmim model with MAE's encoder (``patch_embed``, ``cls_token``,
    ``pos_embed``, ``blocks``, ``norm``): MAE, supervised + MIM, CMAE, LUT. The decoder and the
    method's heads keep their init, except a classifier ``head`` of the same shape (supervised
    + MIM) when ``head=True``. An EMA teacher (LUT) is reset to the loaded student.

    Adapted on the way: ``pos_embed`` resampled to the model's patch grid (timm's
    ``resample_abs_pos_embed``), with a zero cls slot for timm models that give the cls token no
    position (``no_embed_class``); ``pos_embed=False`` keeps the model's fixed sin-cos one
    instead. The patch embedding is resampled to another patch size (FlexiViT's
    ``resample_patch_embed``) and summed or repeated to the model's channels (timm's
    ``adapt_input_conv``: a grayscale model from an RGB ViT). A missing ``qkv`` bias
    (``qkv_bias=False``) loads as zeros. A ViT whose final norm is ``fc_norm`` (global pool)
    loads it into ``norm``. Register tokens, layer scale, q/k norms and the like have no place in
    fastmim's encoder: ``ValueError``.
    """
    grid = None
    if isinstance(timm_vit, nn.Module):
        patch_embed = getattr(timm_vit, "patch_embed", None)
        grid = tuple(patch_embed.grid_size) if patch_embed is not None else None
        sd = timm_vit.state_dict()
    else:
        sd = dict(timm_vit)
    unsupported = sorted(k for k in sd if any(k.startswith(u) or f".{u}" in k for u in _UNSUPPORTED))
    if unsupported:
        raise ValueError(f"the timm ViT has parts fastmim's encoder lacks: {unsupported[:6]}")
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    skipped = []
    if "norm.weight" not in sd and "fc_norm.weight" in sd:
        sd = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in sd.items()}
    for key, value in sd.items():
        if key == "pos_embed":
            if pos_embed:
                out[key] = _fit_pos_embed(value, target[key], model.patch_embed.grid_size, grid)
            else:
                skipped.append(key)
            continue
        if key == "patch_embed.proj.weight":
            out[key] = _fit_patch_embed(value, target[key])
            continue
        if key.startswith("head.") and not (head and key in target and target[key].shape == value.shape):
            skipped.append(key)
            continue
        if key not in target or key.startswith(("decoder_", "mask_token", "teacher.")):
            skipped.append(key)
            continue
        if value.shape != target[key].shape:
            raise ValueError(f"{key}: the timm ViT's shape {tuple(value.shape)} does not fit the model's "
                             f"{tuple(target[key].shape)} (a different width or depth?)")
        out[key] = value
    for i in range(len(model.blocks)):
        key = f"blocks.{i}.attn.qkv.bias"
        if key not in out and f"blocks.{i}.attn.qkv.weight" in out:
            out[key] = torch.zeros_like(target[key])
    encoder = [k for k in target if k.startswith(("patch_embed.", "blocks.", "norm.")) or k == "cls_token"]
    missing = [k for k in encoder if k not in out]
    if missing:
        raise ValueError(f"the timm ViT lacks encoder weights of the model: {missing[:8]} (a different depth?)")
    model.load_state_dict(out, strict=False)
    reset = getattr(model, "reset_teacher", None)
    if callable(reset):
        reset()
    return TimmLoadResult(sorted(out), sorted(skipped))


def _fit_pos_embed(value: torch.Tensor, target: torch.Tensor, grid: tuple[int, int],
                   source_grid: tuple[int, int] | None) -> torch.Tensor:
    value = value.detach()
    n = value.shape[1]
    if source_grid is not None:
        with_cls = n == source_grid[0] * source_grid[1] + 1
    else:  # a state dict alone: a square grid, with a cls slot when n - 1 is a square
        with_cls = math.isqrt(n - 1) ** 2 == n - 1
    if not with_cls:  # no_embed_class: the cls token gets no position, a zero slot here
        value = torch.cat([value.new_zeros(1, 1, value.shape[-1]), value], dim=1)
    if value.shape[-1] != target.shape[-1]:
        raise ValueError(f"pos_embed: width {value.shape[-1]} does not fit the model's {target.shape[-1]}")
    if value.shape != target.shape:
        from timm.layers import resample_abs_pos_embed

        value = resample_abs_pos_embed(value, new_size=list(grid), old_size=list(source_grid) if source_grid else None,
                                       num_prefix_tokens=1)
    return value


def _fit_patch_embed(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    value = value.detach()
    if value.shape[0] != target.shape[0]:
        raise ValueError(f"patch_embed.proj.weight: width {value.shape[0]} does not fit the model's {target.shape[0]}")
    if value.shape[2:] != target.shape[2:]:
        from timm.layers import resample_patch_embed

        value = resample_patch_embed(value, list(target.shape[2:]))
    if value.shape[1] != target.shape[1]:
        from timm.models import adapt_input_conv

        value = adapt_input_conv(target.shape[1], value)
    return value
