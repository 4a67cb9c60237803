"""What :func:`fastmim.patch` changes in each kind of model: the structure checks and the plans."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastmim.models.patching.core import (
    ATTENTION,
    BLOCK,
    CHAIN,
    LOSS,
    MASKING,
    UNSHUFFLE,
    _affine_layer_norm,
    _exact_gelu,
    _is_identity,
    _original_class,
    _Patch,
    _probe_tensor,
    _signature_fits,
    _Unit,
)
from fastmim.models.patching.forwards import (
    _ChainedBlocksPatch,
    _HFAttentionPatch,
    _HFLayerPatch,
    _HFViTMAEDecoderPatch,
    _HFViTMAEEmbeddingsPatch,
    _HFViTMAEForPreTrainingPatch,
    _OfficialMAEPatch,
    _PrenormBlockPatch,
    _QkvAttentionPatch,
    _TimmBlockPatch,
)

# ============================================================================================
# Structure checks (``None``: fits; otherwise why not)
# ============================================================================================

_QKV_ATTENTION_CHILDREN = {"qkv", "proj", "attn_drop", "proj_drop", "q_norm", "k_norm", "norm"}
_TIMM_BLOCK_CHILDREN = {"norm1", "attn", "norm2", "mlp", "ls1", "ls2", "drop_path1", "drop_path2", "drop_path"}
_MLP_CHILDREN = {"fc1", "act", "fc2", "drop1", "drop2", "drop", "norm"}
_HF_ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_HF_LAYER_CHILDREN = {"attention", "layernorm_before", "layernorm_after", "mlp", "dropout"}
_HF_MLP_CHILDREN = {"fc1", "activation_fn", "fc2"}


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _unknown_children(module: nn.Module, known: set[str]) -> str | None:
    extra = sorted(_children(module) - known)
    return f"unknown submodules {extra}" if extra else None


def _other_timm_class(cls: type, base_name: str) -> bool:
    """A timm class whose forward is not that of timm's ``base_name`` (``Block`` or ``Attention``): a
    variant with other math (post-norm, parallel, rope, ...) even where the submodules look alike."""
    if not cls.__module__.startswith("timm."):
        return False
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    return cls.forward is not {"Block": Block, "Attention": Attention}[base_name].forward


def _qkv_attention_misfit(attn: nn.Module) -> str | None:
    if _other_timm_class(_original_class(attn), "Attention"):
        return f"attention type {type(attn).__name__} not supported"
    if not (isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear)
            and isinstance(getattr(attn, "num_heads", None), int)):
        return f"custom attention ({type(attn).__name__})"
    if not (_is_identity(getattr(attn, "q_norm", None)) and _is_identity(getattr(attn, "k_norm", None))):
        return "qk-norm"
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    why = _unknown_children(attn, _QKV_ATTENTION_CHILDREN)
    if why:
        return f"custom attention ({type(attn).__name__}: {why})"
    own = {name for name, _ in attn.named_parameters(recurse=False)} | {n for n, _ in attn.named_buffers(recurse=False)}
    if own:
        return f"custom attention ({type(attn).__name__}: own tensors {sorted(own)})"
    if attn.qkv.out_features % (3 * attn.num_heads) != 0:
        return "qkv width not divisible by 3 x heads"
    if not _signature_fits(_original_class(attn).forward, [None], ("attn_mask", "is_causal")):
        return f"forward signature of {type(attn).__name__} not supported"
    return None


def _hf_attention_misfit(attn: nn.Module) -> str | None:
    if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in _HF_ATTENTION_CHILDREN):
        return f"custom attention ({type(attn).__name__})"
    why = _unknown_children(attn, _HF_ATTENTION_CHILDREN)
    if why:
        return f"custom attention ({type(attn).__name__}: {why})"
    if not isinstance(getattr(attn, "num_attention_heads", None), int) or getattr(attn, "scaling", None) is None:
        return f"custom attention ({type(attn).__name__}: no num_attention_heads / scaling)"
    biases = [getattr(attn, n).bias is None for n in ("q_proj", "k_proj", "v_proj")]
    if len(set(biases)) != 1:
        return "q/k/v projections with and without bias"
    if not _signature_fits(_original_class(attn).forward, ["hidden_states"], ("attention_mask",), var_keyword=None):
        return f"forward signature of {type(attn).__name__} not supported"
    return None


def _mlp_misfit(mlp: nn.Module, act_name: str, known: set[str]) -> str | None:
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and type(fc1) is nn.Linear
            and type(fc2) is nn.Linear):
        return f"MLP {type(mlp).__name__} without plain fc1 / fc2 linears"
    if fc1.bias is None:
        return "fc1 without bias"
    act = getattr(mlp, act_name, None)
    if not _exact_gelu(act):
        return f"activation {type(act).__name__}{'(tanh)' if getattr(act, 'approximate', '') == 'tanh' else ''}" \
               " is not the exact GELU"
    if not _is_identity(getattr(mlp, "norm", None)):
        return "a norm inside the MLP"
    return _unknown_children(mlp, known)


def _timm_block_misfit(blk: nn.Module) -> str | None:
    if _other_timm_class(_original_class(blk), "Block"):
        return f"block type {type(blk).__name__} not supported"
    if not all(hasattr(blk, n) for n in ("norm1", "attn", "norm2", "mlp")):
        return f"block type {type(blk).__name__} not supported"
    why = _unknown_children(blk, _TIMM_BLOCK_CHILDREN)
    if why:
        return f"block type {type(blk).__name__} not supported ({why})"
    if not (_affine_layer_norm(blk.norm1) and _affine_layer_norm(blk.norm2)):
        return f"norms {type(blk.norm1).__name__} / {type(blk.norm2).__name__} are not affine LayerNorms"
    why = _mlp_misfit(blk.mlp, "act", _MLP_CHILDREN)
    if why:
        return why
    if not _signature_fits(_original_class(blk).forward, [None], ("attn_mask", "is_causal")):
        return f"forward signature of {type(blk).__name__} not supported"
    return None


def _hf_layer_misfit(layer: nn.Module) -> str | None:
    why = _unknown_children(layer, _HF_LAYER_CHILDREN)
    if why:
        return f"layer type {type(layer).__name__} not supported ({why})"
    if not (_affine_layer_norm(layer.layernorm_before) and _affine_layer_norm(layer.layernorm_after)):
        return "norms are not affine LayerNorms"
    why = _mlp_misfit(layer.mlp, "activation_fn", _HF_MLP_CHILDREN)
    if why:
        return why
    if not _signature_fits(_original_class(layer).forward, ["hidden_states"], ("attention_mask",), var_keyword=None):
        return f"forward signature of {type(layer).__name__} not supported"
    return None


def _is_official_mae(model: nn.Module) -> bool:
    attrs = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "decoder_embed", "mask_token",
             "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "norm_pix_loss")
    methods = ("random_masking", "forward_encoder", "forward_decoder", "forward_loss")
    return all(hasattr(model, a) for a in attrs) and all(callable(getattr(model, m, None)) for m in methods)


# ============================================================================================
# Plans: the units of each model kind, and what is left
# ============================================================================================


@dataclasses.dataclass
class _Plan:
    kind: str
    units: list[_Unit] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _attention_unit(path: str, attn: nn.Module, attn_backend: str | None, hf: bool) -> _Unit:
    width = attn.q_proj.in_features if hf else attn.qkv.in_features
    return _Unit(path, attn, ATTENTION, mixin=_HFAttentionPatch if hf else _QkvAttentionPatch,
                 attrs={"_fastmim_attn_backend": attn_backend},
                 probe_args=lambda: (_probe_tensor(attn, 2, 5, width),),
                 probe_key=(_original_class(attn), "attention"))


def _plan_block(plan: _Plan, path: str, blk: nn.Module, attn_backend: str | None, hf: bool) -> None:
    """Units for a block and its attention; the block's fused path needs its attention patched."""
    attn_path, attn = (f"{path}.attention", blk.attention) if hf else (f"{path}.attn", getattr(blk, "attn", None))
    attn_why = (_hf_attention_misfit if hf else _qkv_attention_misfit)(attn) if attn is not None else "no attention"
    if attn is not None and attn_why is None:
        plan.units.append(_attention_unit(attn_path, attn, attn_backend, hf))
    elif attn is not None:
        plan.left.append((attn_path, attn_why))
    block_why = (_hf_layer_misfit if hf else _timm_block_misfit)(blk)
    if block_why is None and attn_why is not None:
        block_why = "its attention is left as it was"
    if block_why is not None:
        plan.left.append((path, block_why))
        return
    width = blk.layernorm_before.normalized_shape[0] if hf else blk.norm1.normalized_shape[0]
    plan.units.append(_Unit(path, blk, BLOCK, mixin=_HFLayerPatch if hf else _TimmBlockPatch,
                            probe_args=lambda: (_probe_tensor(blk, 2, 5, width),),
                            probe_key=(_original_class(blk), "block"),
                            requires=lambda: None if isinstance(attn, _Patch) else "its attention is left as it was"))


def _plan_blocks(plan: _Plan, prefix: str, blocks: nn.Module, attn_backend: str | None, chain: bool) -> None:
    for name, blk in blocks.named_children():
        _plan_block(plan, f"{prefix}.{name}", blk, attn_backend, hf=False)
    if chain and type(blocks) is nn.Sequential:
        width = next((b.norm1.normalized_shape[0] for b in blocks if hasattr(b, "norm1")), None)
        if width is not None:
            plan.units.append(_Unit(prefix, blocks, CHAIN, mixin=_ChainedBlocksPatch,
                                    probe_args=lambda: (_probe_tensor(blocks, 2, 5, width),),
                                    requires=lambda: None if any(isinstance(b, _PrenormBlockPatch) for b in blocks)
                                    else ""))


def _plan_official(model: nn.Module, attn_backend: str | None) -> _Plan:
    plan = _Plan("official MAE")
    for prefix in ("blocks", "decoder_blocks"):
        _plan_blocks(plan, prefix, getattr(model, prefix), attn_backend, chain=False)
    cls = _original_class(model)
    checks = {
        "forward_encoder": _signature_fits(cls.forward_encoder, [None, None], ("noise",)),
        "forward_decoder": _signature_fits(cls.forward_decoder, [None, None]),
        "forward_loss": _signature_fits(cls.forward_loss, [None, None, None]),
    }
    if not all(hasattr(model.patch_embed, n) for n in ("img_size", "num_patches")):
        checks["forward_encoder"] = checks["forward_loss"] = False
    plan.units.append(_Unit("", model, "", mixin=_OfficialMAEPatch))  # the swap itself (no method yet)
    labels = {"forward_encoder": MASKING, "forward_decoder": UNSHUFFLE, "forward_loss": LOSS}
    probes = _official_probes(model)
    for method, fits in checks.items():
        if fits:
            plan.units.append(_Unit(f":{method}", model, labels[method], method=method, probe_args=probes[method],
                                    probe_method=method))
        else:
            plan.left.append((f":{method}", "signature or attributes not the official ones"))
    return plan


def _official_probes(model: nn.Module) -> dict[str, Callable[[], tuple]]:
    def image():
        h, w = (model.patch_embed.img_size if isinstance(model.patch_embed.img_size, (tuple, list))
                else (model.patch_embed.img_size,) * 2)
        chans = model.patch_embed.proj.in_channels
        return _probe_tensor(model, 1, chans, h, w)

    def ratio() -> float:
        return 0.75 if model.patch_embed.num_patches >= 4 else 0.5

    def decoder_args():
        length = model.patch_embed.num_patches
        keep = int(length * (1 - ratio()))
        latent = _probe_tensor(model, 1, keep + 1, model.decoder_embed.in_features)
        return latent, torch.argsort(torch.rand(1, length), dim=1).to(latent.device)

    def loss_args():
        imgs = image()
        length = model.patch_embed.num_patches
        pred = _probe_tensor(model, 1, length, model.decoder_pred.out_features)
        mask = (torch.rand(1, length, device=imgs.device) < 0.75).to(torch.get_default_dtype())
        mask[0, 0] = 1
        return imgs, pred, mask

    return {"forward_encoder": lambda: (image(), ratio()), "forward_decoder": decoder_args, "forward_loss": loss_args}


def _hf_module(model: nn.Module) -> Any:
    return sys.modules[_original_class(model).__module__]


def _plan_hf(model: nn.Module, attn_backend: str | None) -> _Plan:
    name = _original_class(model).__name__
    plan = _Plan(f"transformers {name}")
    for path, module in model.named_modules():
        cname = _original_class(module).__name__
        if cname in ("ViTMAELayer", "ViTLayer"):
            _plan_block(plan, path, module, attn_backend, hf=True)
        elif cname == "ViTMAEEmbeddings":
            _plan_hf_embeddings(plan, path, module)
        elif cname == "ViTMAEDecoder":
            _plan_hf_decoder(plan, path, module)
    if name == "ViTMAEForPreTraining":
        output_cls = getattr(_hf_module(model), "ViTMAEForPreTrainingOutput", None)
        fits = _signature_fits(_original_class(model).forward, [],
                               ("pixel_values", "noise", "interpolate_pos_encoding", "attention_mask"),
                               var_keyword=True)
        if output_cls is None or not fits:
            plan.left.append(("", "forward of this transformers version not supported"))
        else:
            plan.units.append(_Unit("", model, LOSS, mixin=_HFViTMAEForPreTrainingPatch,
                                    attrs={"_fastmim_output_cls": output_cls},
                                    probe_args=lambda: (_hf_image(model, model.vit.embeddings),)))
    return plan


def _hf_image(model: nn.Module, embeddings: nn.Module) -> torch.Tensor:
    h, w = embeddings.patch_embeddings.image_size
    return _probe_tensor(model, 1, embeddings.patch_embeddings.num_channels, h, w)


def _plan_hf_embeddings(plan: _Plan, path: str, module: nn.Module) -> None:
    ok = (all(hasattr(module, n) for n in ("patch_embeddings", "position_embeddings", "cls_token", "config",
                                           "image_size", "interpolate_pos_encoding", "random_masking"))
          and _signature_fits(_original_class(module).forward, ["pixel_values"],
                              ("noise", "interpolate_pos_encoding")))
    if not ok:
        plan.left.append((path, "embeddings of this transformers version not supported"))
        return
    plan.units.append(_Unit(path, module, MASKING, mixin=_HFViTMAEEmbeddingsPatch,
                            probe_args=lambda: (_hf_image(module, module),)))


def _plan_hf_decoder(plan: _Plan, path: str, module: nn.Module) -> None:
    output_cls = getattr(_hf_module(module), "ViTMAEDecoderOutput", None)
    ok = (output_cls is not None
          and all(hasattr(module, n) for n in ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_layers",
                                               "decoder_norm", "decoder_pred"))
          and _signature_fits(_original_class(module).forward, ["hidden_states", "ids_restore"],
                              ("interpolate_pos_encoding",)))
    if not ok:
        plan.left.append((path, "decoder of this transformers version not supported"))
        return

    def args():
        length = module.decoder_pos_embed.shape[1] - 1
        keep = max(length // 4, 1)
        latent = _probe_tensor(module, 1, keep + 1, module.decoder_embed.in_features)
        return latent, torch.argsort(torch.rand(1, length), dim=1).to(latent.device)

    plan.units.append(_Unit(path, module, UNSHUFFLE, mixin=_HFViTMAEDecoderPatch,
                            attrs={"_fastmim_output_cls": output_cls}, probe_args=args))


def _plan_timm(model: nn.Module, attn_backend: str | None) -> _Plan:
    from timm.layers import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock

    cls = _original_class(model)
    if issubclass(cls, TimmAttention):
        plan = _Plan("timm Attention")
        why = _qkv_attention_misfit(model)
        if why is None:
            plan.units.append(_attention_unit("", model, attn_backend, hf=False))
        else:
            plan.left.append(("", why))
        return plan
    if issubclass(cls, TimmBlock):
        plan = _Plan("timm Block")
        _plan_block(plan, "", model, attn_backend, hf=False)
        for unit in plan.units:
            unit.path = unit.path.lstrip(".")
        plan.left = [(p.lstrip("."), why) for p, why in plan.left]
        return plan
    plan = _Plan("timm VisionTransformer")
    _plan_blocks(plan, "blocks", model.blocks, attn_backend, chain=True)
    return plan


_HF_MODELS = ("ViTMAEForPreTraining", "ViTMAEModel", "ViTModel", "ViTForImageClassification",
              "ViTForMaskedImageModeling")


def _plan(model: nn.Module, attn_backend: str | None) -> _Plan:
    cls = _original_class(model)
    if cls.__module__.startswith("fastmim."):
        raise TypeError(f"fastmim.patch: {cls.__name__} is one of fastmim's own models, which run fastmim's fused "
                        "ops already (build it with fused=True)")
    if cls.__module__.startswith("transformers."):
        if cls.__name__ in _HF_MODELS:
            return _plan_hf(model, attn_backend)
        raise TypeError(f"fastmim.patch: transformers model {cls.__name__} is not supported; supported: "
                        f"{', '.join(_HF_MODELS)}")
    timm_kind = _timm_kind(cls)
    if timm_kind is not None:
        return _plan_timm(model, attn_backend)
    if _is_official_mae(model):
        return _plan_official(model, attn_backend)
    raise TypeError(
        f"fastmim.patch: unsupported model type {cls.__module__}.{cls.__qualname__}. Supported: the official MAE "
        "(models_mae.MaskedAutoencoderViT, recognised by its attributes and methods), transformers "
        f"{' / '.join(_HF_MODELS)}, timm VisionTransformer / Block / Attention")


def _timm_kind(cls: type) -> str | None:
    try:
        from timm.layers import Attention as TimmAttention
        from timm.models.vision_transformer import Block as TimmBlock
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    for kind, base in (("vit", VisionTransformer), ("block", TimmBlock), ("attention", TimmAttention)):
        if issubclass(cls, base):
            return kind
    return None


