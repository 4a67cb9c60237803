"""The forwards a patch swaps in: attention, pre-norm blocks and their chain, and the MAE models' masking,
decoder input and loss, each calling :mod:`fastmim.ops`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastmim.models.patching.core import _argsort_masking, _dropout_p, _fused_kernels_on, _has_hooks, _Patch
from fastmim.ops import (
    add_layer_norm_linear,
    attention_qkvpacked,
    bias_gelu_linear,
    gather_visible,
    masked_patch_mse,
    unshuffle,
)

# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


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
                                norm_pix_loss=bool(self.norm_pix_loss))


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
                                norm_pix_loss=bool(self.config.norm_pix_loss))
        output = self._fastmim_output_cls(loss=loss, logits=logits, mask=mask, ids_restore=ids_restore,
                                          hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict else output.to_tuple()


