"""``fastmim.patch(model)``: fastmim's fused ops in a model you already have, in place.

Three kinds of models are recognised:

- the official MAE (``models_mae.py`` of facebookresearch/mae), by its structure (attributes
  ``patch_embed, cls_token, pos_embed, blocks, norm, decoder_embed, mask_token,
  decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred, norm_pix_loss`` and methods
  ``random_masking, forward_encoder, forward_decoder, forward_loss``), without importing it;
- Hugging Face ``transformers``: ``ViTMAEForPreTraining``, ``ViTMAEModel``, ``ViTModel`` (and the
  ViT heads built on it: ``ViTForImageClassification``, ``ViTForMaskedImageModeling``);
- timm: ``VisionTransformer``, or one ``Block`` or ``Attention``.

What runs afterwards (each through :mod:`fastmim.ops`, which dispatches as everywhere else:
Triton on CUDA, the CPU kernels or the references on CPU):

- the encoder's masking: the official rule on the same noise (``noise = torch.rand(B, L)``
  drawn at the same point from the same generator, or the ``noise=`` given; ``argsort``, keep
  the first ``K``), then ``gather_visible`` (gather + position embedding + cls token in one op);
- the decoder's input: ``unshuffle`` (mask tokens, un-shuffle and position embedding in one op);
- the loss: ``masked_patch_mse`` (patchify, per-patch normalisation and the masked mean in one op);
- attention: the qkv projection's output goes packed to ``attention_qkvpacked`` (Hugging Face's
  separate ``q_proj / k_proj / v_proj`` run as one matmul on their concatenated weights);
- each pre-norm block: the LayerNorm + residual add + linear and bias-GELU + linear fused ops of
  :class:`fastmim.models.vit.FusedBlock` where the fused ops have kernels (elsewhere, CPU, the
  block takes its own steps), and in the official MAE and timm's ``blocks`` the residual stream
  passed between blocks as two terms (blocks with hooks are called as modules, one at a time).

Nothing else changes: parameters, buffers and ``state_dict`` keys stay as they were (a patched
module is the same object with a subclass of its class that overrides ``forward``), and the
model computes the same function for the same RNG state. A module the patch does not fit (an
activation other than exact GELU, qk-norm, a gated or custom attention, an attention mask, a
forward signature it does not know) is left as it was and named in the report; with
``verify=True`` (default) every patched forward is also compared with the original on a small
probe input (same RNG state, evaluation mode, no gradient; the model's RNG state is restored
afterwards) and left as it was if they differ. Models on the meta device cannot be probed.

Modules whose behaviour depends on the training mode fall back at run time as they do in
fastmim's own models: attention dropout (``attn_drop`` / ``attention_probs_dropout_prob``) or an
MLP dropout between GELU and ``fc2`` in training, an attention mask, ``output_attentions``:
those calls take the original forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from fastmim.ops import (
    ATTN_BACKENDS,
    add_layer_norm_linear,
    attention_qkvpacked,
    bias_gelu_linear,
    forced_backend,
    gather_visible,
    masked_patch_mse,
    select_backend,
    unshuffle,
)

__all__ = ["PatchReport", "patch", "patch_report", "unpatch"]

logger = logging.getLogger("fastmim.patch")

# What a patched unit now runs (the report groups units by these labels).
ATTENTION = "packed-qkv attention"
BLOCK = "fused block (LayerNorm + residual, bias-GELU)"
CHAIN = "residual stream between blocks"
MASKING = "masking + gather + pos-embed"
UNSHUFFLE = "un-shuffle"
LOSS = "masked-patch loss"

_STATE_PREFIX = "_fastmim_"  # instance attributes the patch adds (none is a parameter, buffer or module)


# ============================================================================================
# Report
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class PatchReport:
    """What :func:`patch` did: ``patched`` and ``left`` as ``(module path, what / why)`` pairs
    (path ``""`` is the model itself; a method name follows ``:``). ``verified``: every patched
    forward was compared with the original on a probe input."""

    model: str
    kind: str
    patched: tuple[tuple[str, str], ...]
    left: tuple[tuple[str, str], ...]
    verified: bool

    def summary(self) -> str:
        """One line: the patched units counted by what they run, and everything left with its reason."""
        counts = Counter(what for _, what in self.patched)
        done = ", ".join(f"{n} x {what}" if n > 1 else what for what, n in counts.items()) or "nothing"
        left = "; ".join(f"{path or '<model>'} ({why})" for path, why in self.left) or "nothing"
        note = "" if self.verified else " [not verified against the original forwards]"
        return f"fastmim.patch({self.model}, {self.kind}): patched {done}; left as it was: {left}{note}"

    def __str__(self) -> str:
        return self.summary()


# ============================================================================================
# Shared helpers
# ============================================================================================


def _fused_kernels_on(x: torch.Tensor) -> bool:
    """Whether the fused block ops have kernels for ``x`` (the device rule of ``FusedBlock.fusable``:
    Triton on CUDA, or on CPU when forced / interpreted; meta models a GPU step)."""
    if torch.compiler.is_compiling():
        return x.device.type in ("cuda", "meta") or forced_backend() == "triton"
    return x.device.type == "meta" or select_backend("layer_norm", x.device) == "triton"


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``blocks`` in order, the same result as calling each in turn; runs of patched
    fusable blocks without hooks pass the residual stream as two terms (``FusedBlock`` / ``run_blocks``)."""
    hidden, residual = x, None
    for blk in blocks:
        if isinstance(blk, _PrenormBlockPatch) and not _has_hooks(blk) and blk.fusable(hidden):
            hidden, residual = blk.forward_residual(hidden, residual)
            continue
        if residual is not None:
            hidden, residual = residual + hidden, None
        hidden = blk(hidden)
    return hidden if residual is None else residual + hidden


def _argsort_masking(noise: torch.Tensor, len_keep: int, device: torch.device,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official masking rule on ``noise`` ``(B, L)``: ``(ids_keep (B, K), ids_restore, mask)``, the
    mask 1 on removed patches in the default float dtype (as ``torch.ones`` gives it)."""
    ids_shuffle = torch.argsort(noise, dim=1).to(device)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())
    return ids_shuffle[:, :len_keep], ids_restore, mask


def _exact_gelu(act: Any) -> bool:
    """``nn.GELU()`` (erf), timm's ``GELU``, or transformers' ``GELUActivation`` on ``F.gelu``."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    name, module = type(act).__name__, type(act).__module__
    if name == "GELU" and module.startswith("timm."):
        return True
    return name == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _affine_layer_norm(norm: Any) -> bool:
    return (isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
            and len(norm.normalized_shape) == 1)


def _is_identity(module: Any) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _dropout_p(module: Any) -> float:
    return float(getattr(module, "p", 0.0)) if module is not None else 0.0


def _signature(fn: Callable) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return []


def _signature_fits(fn: Callable, required: Iterable[str | None], optional: Iterable[str] = (),
                    var_keyword: bool | None = False) -> bool:
    """``fn(self, *required, [optional...], [**kwargs])``: the required positional parameters in order
    (``None`` matches any name), then optional ones with defaults, each named in ``optional``."""
    params = _signature(fn)
    required = list(required)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(required) or any(p.kind == p.VAR_POSITIONAL for p in params):
        return False
    for p, name in zip(positional, required, strict=False):
        if p.default is not p.empty or (name is not None and p.name != name):
            return False
    extra = [p for p in params[len(required):] if p.kind != p.VAR_KEYWORD]
    if any(p.default is p.empty or p.name not in optional for p in extra):
        return False
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    return var_keyword is None or has_var_kw == var_keyword


def _first_float_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t
    return None


# ============================================================================================
# Patched classes: a subclass per (original class, mixin), created on first use
# ============================================================================================

_CLASSES: dict[tuple[type, type], type] = {}


class _Patch:
    """Base of the mixins. A patched module's class is ``type("Fastmim<Name>", (mixin, original), {})``."""

    _fastmim_original: type
    _fastmim_mixin: type

    def __reduce_ex__(self, protocol):  # pickle by the original class and the mixin (the subclass is made on load)
        reduced = super().__reduce_ex__(protocol)
        return (_new_patched, (type(self)._fastmim_original, type(self)._fastmim_mixin), *reduced[2:])


def _patched_class(original: type, mixin: type) -> type:
    cls = _CLASSES.get((original, mixin))
    if cls is None:
        name = f"Fastmim{original.__name__}"
        cls = type(name, (mixin, original), {"__module__": __name__, "__qualname__": name,
                                              "_fastmim_original": original, "_fastmim_mixin": mixin})
        _CLASSES[(original, mixin)] = cls
    return cls


def _new_patched(original: type, mixin: type) -> Any:
    cls = _patched_class(original, mixin)
    return cls.__new__(cls)


def _original_class(module: nn.Module) -> type:
    return getattr(type(module), "_fastmim_original", type(module))


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


class _AttentionPatch(_Patch):
    """Common part: ``attend(qkv)`` from the packed projection ``(..., 3 * H * D)`` to the module's output."""

    _fastmim_attn_backend: str | None = None

    def _num_heads(self) -> int:
        raise NotImplementedError

    def qkv_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _after_attention(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _scale(self) -> float:
        raise NotImplementedError

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        lead = qkv.shape[:-1]
        heads = self._num_heads()
        packed = qkv.reshape(*lead, 3, heads, qkv.shape[-1] // (3 * heads))
        out = attention_qkvpacked(packed, backend=self._fastmim_attn_backend, scale=self._scale())
        return self._after_attention(out.reshape(*lead, qkv.shape[-1] // 3))


class _QkvAttentionPatch(_AttentionPatch):
    """timm's ``Attention`` and the official MAE's (one ``qkv`` linear, ``proj``)."""

    def _num_heads(self) -> int:
        return self.num_heads

    def _scale(self) -> float:
        scale = getattr(self, "scale", None)
        return float(scale) if scale is not None else float((self.qkv.out_features // (3 * self.num_heads)) ** -0.5)

    def qkv_params(self):
        return self.qkv.weight, self.qkv.bias

    def attends(self) -> bool:
        """Whether the fused attention runs now (attention dropout only in evaluation mode)."""
        return not (self.training and _dropout_p(getattr(self, "attn_drop", None)) > 0)

    def _after_attention(self, out):
        norm, proj_drop = getattr(self, "norm", None), getattr(self, "proj_drop", None)
        if norm is not None:
            out = norm(out)
        out = self.proj(out)
        return proj_drop(out) if proj_drop is not None else out

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal or not self.attends():
            kwargs = {} if attn_mask is None and not is_causal else {"attn_mask": attn_mask, "is_causal": is_causal}
            return super().forward(x, **kwargs)
        return self.attend(self.qkv(x))


class _HFAttentionPatch(_AttentionPatch):
    """transformers' ViT / ViTMAE attention (``q_proj, k_proj, v_proj, o_proj``): one matmul on the
    concatenated q/k/v weights, packed attention, ``o_proj``; returns ``(output, None)`` as SDPA does."""

    def _num_heads(self) -> int:
        return self.num_attention_heads

    def _scale(self) -> float:
        return float(self.scaling)

    def qkv_params(self):
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        if self.q_proj.bias is None:
            return weight, None
        return weight, torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    def attends(self, attention_mask=None, kwargs: dict | None = None) -> bool:
        if attention_mask is not None or getattr(self, "is_causal", False):
            return False
        if self.training and float(getattr(self, "attention_dropout", 0.0) or 0.0) > 0:
            return False
        config = getattr(self, "config", None)
        return not (kwargs or {}).get("output_attentions", getattr(config, "output_attentions", False))

    def _after_attention(self, out):
        return self.o_proj(out)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if not self.attends(attention_mask, kwargs):
            return super().forward(hidden_states, attention_mask, **kwargs)
        weight, bias = self.qkv_params()
        return self.attend(F.linear(hidden_states, weight, bias)), None


# --------------------------------------------------------------------------------------------
# Pre-norm blocks
# --------------------------------------------------------------------------------------------


class _PrenormBlockPatch(_Patch):
    """A pre-norm ViT block run as ``FusedBlock.forward_residual`` does, on this block's own modules:

        x, qkv = add_layer_norm_linear(hidden, residual, norm1, qkv projection)     # x = hidden + residual
        x, h = add_layer_norm_linear(x, post_attention(attn.attend(qkv)), norm2, fc1 without its bias)
        return post_mlp(bias_gelu_linear(h, fc1.bias, fc2)), x                     # (hidden, residual)

    where the fused ops have kernels (:meth:`fusable`); elsewhere the block's own forward runs (its
    attention patched). Subclasses name the parts."""

    def _parts(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:  # norm1, attn, norm2, mlp
        raise NotImplementedError

    def _post_attention(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _post_mlp(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _mlp_act_dropout(self) -> nn.Module | None:
        return None

    def _attention_runs_fused(self) -> bool:
        raise NotImplementedError

    def fusable(self, x: torch.Tensor) -> bool:
        if not _fused_kernels_on(x):
            return False
        if self.training and _dropout_p(self._mlp_act_dropout()) > 0:
            return False
        return self._attention_runs_fused()

    def forward_residual(self, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        norm1, attn, norm2, mlp = self._parts()
        weight, bias = attn.qkv_params()
        x, qkv = add_layer_norm_linear(hidden, residual, norm1.weight, norm1.bias, norm1.eps, weight, bias)
        branch = self._post_attention(attn.attend(qkv))
        x, h = add_layer_norm_linear(x, branch, norm2.weight, norm2.bias, norm2.eps, mlp.fc1.weight)
        h = bias_gelu_linear(h, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        return self._post_mlp(h), x


class _TimmBlockPatch(_PrenormBlockPatch):
    """timm's ``Block`` and the official MAE's (``norm1, attn, norm2, mlp``; optional ``ls1/ls2``,
    ``drop_path1/drop_path2`` or one ``drop_path``; MLP ``fc1, act, fc2`` with ``drop1/drop2`` or ``drop``)."""

    def _parts(self):
        return self.norm1, self.attn, self.norm2, self.mlp

    def _branch(self, x, scale_name: str, drop_name: str):
        for name in (scale_name, drop_name):
            module = getattr(self, name, None)
            if module is not None:
                x = module(x)
        if getattr(self, drop_name, None) is None and getattr(self, "drop_path", None) is not None:
            x = self.drop_path(x)
        return x

    def _post_attention(self, x):
        return self._branch(x, "ls1", "drop_path1")

    def _post_mlp(self, x):
        drop = getattr(self.mlp, "drop2", None)
        if drop is None:
            drop = getattr(self.mlp, "drop", None)
        if drop is not None:
            x = drop(x)
        return self._branch(x, "ls2", "drop_path2")

    def _mlp_act_dropout(self):
        drop = getattr(self.mlp, "drop1", None)
        return drop if drop is not None else getattr(self.mlp, "drop", None)

    def _attention_runs_fused(self):
        return self.attn.attends()

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal or not self.fusable(x):
            kwargs = {} if attn_mask is None and not is_causal else {"attn_mask": attn_mask, "is_causal": is_causal}
            return super().forward(x, **kwargs)
        hidden, residual = self.forward_residual(x, None)
        return residual + hidden


class _HFLayerPatch(_PrenormBlockPatch):
    """transformers' ``ViTLayer`` / ``ViTMAELayer`` (``layernorm_before, attention, layernorm_after,
    mlp``, one ``dropout`` after each branch)."""

    def _parts(self):
        return self.layernorm_before, self.attention, self.layernorm_after, self.mlp

    def _post_attention(self, x):
        return self.dropout(x)

    def _post_mlp(self, x):
        return self.dropout(x)

    def _attention_runs_fused(self):
        return self.attention.attends()

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if attention_mask is not None or not self.attention.attends(None, kwargs) or not self.fusable(hidden_states):
            return super().forward(hidden_states, attention_mask, **kwargs)
        hidden, residual = self.forward_residual(hidden_states, None)
        return residual + hidden


class _ChainedBlocksPatch(_Patch):
    """An ``nn.Sequential`` of blocks (timm's ``VisionTransformer.blocks``) run by :func:`_run_blocks`."""

    def forward(self, input):  # noqa: A002  (nn.Sequential's name)
        return _run_blocks(self, input)


# --------------------------------------------------------------------------------------------
# Model-level methods
# --------------------------------------------------------------------------------------------


class _OfficialMAEPatch(_Patch):
    """The official MAE's ``forward_encoder``, ``forward_decoder`` and ``forward_loss`` on fastmim's ops;
    each runs only if it is in ``_fastmim_methods`` (the others take the original method)."""

    _fastmim_methods: frozenset[str] = frozenset()

    def forward_encoder(self, x, mask_ratio, noise=None):
        if "forward_encoder" not in self._fastmim_methods:
            return super().forward_encoder(x, mask_ratio, *(() if noise is None else (noise,)))
        x = self.patch_embed(x)
        batch, length, _ = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(batch, length, device=x.device)
        ids_keep, ids_restore, mask = _argsort_masking(noise, len_keep, x.device)
        x = gather_visible(x, ids_keep, self.pos_embed, cls_token=self.cls_token)
        x = _run_blocks(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        if "forward_decoder" not in self._fastmim_methods:
            return super().forward_decoder(x, ids_restore)
        x = self.decoder_embed(x)
        x = unshuffle(x, ids_restore, self.mask_token, self.decoder_pos_embed, has_cls=True)
        x = _run_blocks(self.decoder_blocks, x)
        return self.decoder_pred(self.decoder_norm(x)[:, 1:, :])

    def forward_loss(self, imgs, pred, mask):
        if "forward_loss" not in self._fastmim_methods:
            return super().forward_loss(imgs, pred, mask)
        return masked_patch_mse(pred, imgs, mask, patch_size=_patch_size(self.patch_embed),
                                norm_pix=bool(self.norm_pix_loss))


def _patch_size(patch_embed: nn.Module) -> int:
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        size = patch_embed.proj.kernel_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class _HFViTMAEEmbeddingsPatch(_Patch):
    """``ViTMAEEmbeddings.forward``: patch embedding, the official masking on the same noise, then
    ``gather_visible`` (visible tokens + position embedding, cls token + its slot)."""

    def forward(self, pixel_values, noise=None, interpolate_pos_encoding=False):
        height, width = pixel_values.shape[2:]
        embeddings = self.patch_embeddings(pixel_values)
        if interpolate_pos_encoding:
            position_embeddings = self.interpolate_pos_encoding(embeddings, height, width)
        else:
            if height != self.image_size[0] or width != self.image_size[1]:
                raise ValueError(f"Input image size ({height}*{width}) doesn't match model"
                                 f" ({self.image_size[0]}*{self.image_size[1]}).")
            position_embeddings = self.position_embeddings
        batch, length, _ = embeddings.shape
        len_keep = int(length * (1 - self.config.mask_ratio))
        if noise is None:
            noise = torch.rand(batch, length, device=embeddings.device)
        ids_keep, ids_restore, mask = _argsort_masking(noise, len_keep, embeddings.device)
        embeddings = gather_visible(embeddings, ids_keep, position_embeddings, cls_token=self.cls_token)
        return embeddings, mask, ids_restore


class _HFViTMAEDecoderPatch(_Patch):
    """``ViTMAEDecoder.forward``: ``decoder_embed``, ``unshuffle``, the layers, norm, ``decoder_pred``
    (on the patch tokens only). ``interpolate_pos_encoding=True`` takes the original forward."""

    _fastmim_output_cls: type

    def forward(self, hidden_states, ids_restore, interpolate_pos_encoding=False):
        if interpolate_pos_encoding:
            return super().forward(hidden_states, ids_restore, interpolate_pos_encoding=interpolate_pos_encoding)
        x = self.decoder_embed(hidden_states)
        x = unshuffle(x, ids_restore.to(x.device), self.mask_token, self.decoder_pos_embed, has_cls=True)
        for layer in self.decoder_layers:
            x = layer(x)
        logits = self.decoder_pred(self.decoder_norm(x)[:, 1:, :])
        return self._fastmim_output_cls(logits=logits)


class _HFViTMAEForPreTrainingPatch(_Patch):
    """``ViTMAEForPreTraining.forward`` with the loss as ``masked_patch_mse`` (the encoder and decoder
    are their own patched modules); ``return_dict`` as transformers' ``can_return_tuple``."""

    _fastmim_output_cls: type

    def forward(self, pixel_values=None, noise=None, interpolate_pos_encoding=None, attention_mask=None, **kwargs):
        return_dict = getattr(self.config, "return_dict", True)
        passed = kwargs.pop("return_dict", return_dict)
        return_dict = return_dict if passed is None else passed
        outputs = self.vit(pixel_values, noise=noise, interpolate_pos_encoding=interpolate_pos_encoding,
                           attention_mask=attention_mask, **kwargs)
        latent, ids_restore, mask = outputs.last_hidden_state, outputs.ids_restore, outputs.mask
        logits = self.decoder(latent, ids_restore, interpolate_pos_encoding=interpolate_pos_encoding).logits
        patch_size = _patch_size(self.vit.embeddings.patch_embeddings)
        loss = masked_patch_mse(logits, pixel_values, mask, patch_size=patch_size,
                                norm_pix=bool(self.config.norm_pix_loss))
        output = self._fastmim_output_cls(loss=loss, logits=logits, mask=mask, ids_restore=ids_restore,
                                          hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


# ============================================================================================
# Units: one change each, applied, probed, kept or reverted
# ============================================================================================


@dataclasses.dataclass
class _Unit:
    path: str
    module: nn.Module
    what: str
    mixin: type | None = None  # a class swap ...
    method: str | None = None  # ... or one more method enabled on an already swapped module
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    probe_args: Callable[[], tuple] | None = None
    probe_method: str = "forward"
    probe_key: Any = None  # units with the same key share one probe (one per class)
    requires: Callable[[], str | None] | None = None  # before applying: why it cannot apply now, or None

    def apply(self) -> None:
        if self.mixin is not None:
            for name, value in self.attrs.items():
                setattr(self.module, name, value)
            self.module.__class__ = _patched_class(_original_class(self.module), self.mixin)
        else:
            self.module._fastmim_methods = self.module._fastmim_methods | {self.method}

    def revert(self) -> None:
        if self.mixin is not None:
            self.module.__class__ = _original_class(self.module)
            for name in self.attrs:
                self.module.__dict__.pop(name, None)
        else:
            self.module._fastmim_methods = self.module._fastmim_methods - {self.method}


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _rng_get(devices: list[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _rng_set(devices: list[int], state: tuple) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, d)


@contextlib.contextmanager
def _probe_mode(module: nn.Module, devices: list[int]) -> Iterator[None]:
    """Evaluation mode, no gradient, and a forked RNG (the caller's RNG state is restored afterwards)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _leaves(out: Any) -> list[Any]:
    if isinstance(out, torch.Tensor) or out is None:
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in _leaves(item)]
    return [out]


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-2}.get(dtype, 5e-2)


def _differs(want: Any, got: Any) -> str | None:
    a, b = _leaves(want), _leaves(got)
    if len(a) != len(b):
        return f"{len(b)} outputs instead of {len(a)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return f"output {i} has shape {tuple(y.shape)} instead of {tuple(x.shape)}"
            if not x.is_floating_point():
                if not torch.equal(x, y):
                    return f"output {i} differs"
                continue
            ref = x.double()
            err = float((y.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-6) if x.numel() else 0.0
            if not err <= _tolerance(x.dtype):
                return f"output {i} differs (max relative error {err:.2g})"
        elif type(x) is not type(y) or (x is not None and not isinstance(x, torch.Tensor) and x != y):
            return f"output {i} differs"
    return None


def _probe(unit: _Unit) -> str | None:
    """``None`` when the patched method computes what the original does on the unit's probe input,
    both runs starting from the same RNG state."""
    ref = _first_float_tensor(unit.module)
    devices = _rng_devices(ref.device if ref is not None else torch.device("cpu"))
    call = unit.probe_method
    with _probe_mode(unit.module, devices):
        args = unit.probe_args()
        state = _rng_get(devices)
        unit.revert()
        try:
            want = getattr(type(unit.module), call)(unit.module, *args)
        finally:
            unit.apply()
        _rng_set(devices, state)
        got = getattr(type(unit.module), call)(unit.module, *args)
    return _differs(want, got)


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _probe_tensor(module: nn.Module, *shape: int) -> torch.Tensor:
    ref = _first_float_tensor(module)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    return torch.randn(*shape, dtype=dtype, device=device)


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


# ============================================================================================
# Public API
# ============================================================================================


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / FSDP / ``torch.compile`` wrapper (patched in place, the wrapper kept)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel",
                                                       "FullyShardedDataParallel"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def patch(model: nn.Module, *, attn_backend: str | None = None, verify: bool = True,
          return_report: bool = False) -> nn.Module | tuple[nn.Module, PatchReport]:
    """Run fastmim's fused ops in ``model``, in place; returns ``model`` (with ``return_report=True``,
    ``(model, report)``).

    ``model``: the official MAE (recognised by its structure), a transformers ``ViTMAEForPreTraining``,
    ``ViTMAEModel`` or ``ViTModel`` (or a ViT head on it), a timm ``VisionTransformer``, ``Block`` or
    ``Attention``; a DDP / ``torch.compile`` wrapper is looked through. Any other type is a
    ``TypeError``. ``attn_backend``: the attention backend of the patched attentions (``None``:
    fastmim chooses per call, SDPA on CPU; or one of ``fastmim.ops.ATTN_BACKENDS``). ``verify``:
    compare every patched forward with the original on a probe input before keeping it (models on
    the meta device are not probed).

    Parameters, buffers and ``state_dict`` keys do not change, and the model computes the same
    function for the same RNG state. What could not be patched is left as it was; the report
    (:class:`PatchReport`, also :func:`patch_report`) lists both and one log line says it (a
    warning when something was left). Patching a patched model patches it again from its original
    forwards. :func:`unpatch` restores them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastmim.patch: expected a torch.nn.Module, got {type(model).__name__}")
    if attn_backend is not None and attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"fastmim.patch: attn_backend must be one of {ATTN_BACKENDS} or None, got {attn_backend!r}")
    target = _unwrap(model)
    plan = _plan(target, attn_backend)  # before unpatching: an unsupported type changes nothing
    if _is_patched(target):
        unpatch(target)
        plan = _plan(target, attn_backend)
    on_meta = _on_meta(target)
    probed: dict[Any, str | None] = {}
    patched, left = [], list(plan.left)
    verified = verify and not on_meta
    for unit in plan.units:
        why = unit.requires() if unit.requires is not None else None
        if why is not None:  # what it builds on was left (e.g. failed its probe); "" : nothing to report
            if why:
                left.append((unit.path, why))
            continue
        unit.apply()
        why = None
        if verified and unit.probe_args is not None:
            key = unit.probe_key if unit.probe_key is not None else id(unit)
            if key not in probed:
                try:
                    probed[key] = _probe(unit)
                except Exception as exc:  # noqa: BLE001 - a probe that cannot run keeps the original
                    probed[key] = f"probe failed: {type(exc).__name__}: {exc}"
            why = probed[key]
        if why is not None:
            unit.revert()
            left.append((unit.path, f"differs from the original forward on a probe input: {why}"))
        elif unit.what:
            patched.append((unit.path, unit.what))
    if isinstance(target, _OfficialMAEPatch) and not target._fastmim_methods:
        target.__class__ = _original_class(target)
    report = PatchReport(model=_original_class(target).__name__, kind=plan.kind, patched=tuple(patched),
                         left=tuple(left), verified=verified)
    target.__dict__["_fastmim_report"] = report
    (logger.warning if left else logger.info)("%s", report.summary())
    return (model, report) if return_report else model


def _is_patched(model: nn.Module) -> bool:
    return any(isinstance(m, _Patch) for m in model.modules()) or "_fastmim_report" in model.__dict__


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes (so the original forwards) of every module :func:`patch` changed,
    and drop what it added; returns ``model``. A model that is not patched is returned as it is."""
    target = _unwrap(model)
    for module in target.modules():
        if isinstance(module, _Patch):
            module.__class__ = _original_class(module)
        for name in [n for n in module.__dict__ if n.startswith(_STATE_PREFIX)]:
            del module.__dict__[name]
    return model


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of the last :func:`patch` of ``model`` (``None`` if it is not patched)."""
    return _unwrap(model).__dict__.get("_fastmim_report")
