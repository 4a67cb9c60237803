"""Supervised + MIM: a ViT classifier trained jointly with a shallow decoder that reconstructs masked patches.

Seed: "Improve Supervised Representation Learning with Masked Image Modeling" (Chen et al.,
arXiv 2312.00950). One masked pass of the encoder (visible tokens only) feeds both heads:

- the classifier: global average of the encoder's visible patch tokens after its final norm
  (``pool="avg"``, *default chosen*; ``pool="cls"`` takes the cls token) -> ``head``;
  ``cls_input="full"`` (*option*) classifies a second, unmasked pass instead;
- the MIM branch: MAE's decoder (*defaults chosen*: depth 2, width 512; 128 on the
  small-image presets, see :class:`SupervisedMIM`) reconstructing the masked patches,
  normalised pixels through fastmim's fused loss (*default chosen*), or the ids of a
  ``tokenizer`` (any module mapping ``(B, C, H, W)`` images to ``(B, L)`` integer ids per
  patch) with cross-entropy.

``loss = w_cls * CE(logits / logit_temperature, labels; label_smoothing) + w_mim * L_mim``.
Recipes (``recipe=``, explicit arguments override them; ``preset=`` is its deprecated name):

- ``"default"``: mask ratio 0.5, decoder depth 2, width 512, ``w_cls = w_mim = 1``, label
  smoothing 0.1, linear head (every value *chosen*: the paper's abstract fixes none).
- ``"supmae"``: SupMAE (Liang et al., 2022, official code): mask ratio 0.75, decoder depth 1,
  ``loss = L_mim + 0.01 * CE(logits / 10, labels)``, no label smoothing, head
  ``Linear(D, 3072) -> BatchNorm -> ReLU -> Linear``.

At evaluation the decoder is unused: :meth:`SupervisedMIM.classify` costs what the plain ViT
classifier costs, and the encoder + linear head load into
``timm.create_model(..., global_pool="avg", fc_norm=False)`` (``"token"`` for ``pool="cls"``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastmim.models.mae import MaskedAutoencoderViT, PackedTokens, take_rows, visible_counts
from fastmim.models.presets import ViTPreset, register_method
from fastmim.models.vit import init_mae_weights, vit_layer_norm
from fastmim.ops import check_mask_ratio

RECIPES: dict[str, dict[str, Any]] = {
    "default": dict(mask_ratio=0.5, decoder_depth=2, decoder_embed_dim=512, decoder_num_heads=16, w_cls=1.0,
                    w_mim=1.0, label_smoothing=0.1, logit_temperature=1.0, head_hidden_dim=0),
    "supmae": dict(mask_ratio=0.75, decoder_depth=1, decoder_embed_dim=512, decoder_num_heads=16, w_cls=0.01,
                   w_mim=1.0, label_smoothing=0.0, logit_temperature=10.0, head_hidden_dim=3072),
}


class SupervisedMIM(MaskedAutoencoderViT):
    """ViT classifier + shallow MIM decoder (see the module doc for the method and its defaults).

    Args: the encoder arguments of :class:`MaskedAutoencoderViT`, and
        num_classes: classifier outputs.
        recipe: ``"default"`` or ``"supmae"``: fills every argument left ``None`` below (``preset``:
            the former name of this argument, deprecated; a preset is a model size elsewhere).
        mask_ratio: default mask ratio of :meth:`forward`.
        pool: ``"avg"`` (mean of the patch tokens after the final norm) or ``"cls"``.
        cls_input: ``"masked"`` (classify the masked pass) or ``"full"`` (a second, unmasked pass).
        w_cls, w_mim, label_smoothing, logit_temperature: the loss (module doc).
        head_hidden_dim: 0 for a linear head, else ``Linear -> BatchNorm1d -> ReLU -> Linear``.
        tokenizer, tokenizer_vocab_size: reconstruct a frozen tokenizer's ids instead of pixels.
        fused, masking, attn_backend, pred_masked_only, drop_path_rate: as :class:`MaskedAutoencoderViT`.

    Decoder width *(default chosen)*: docs/METHODS.md's 512 (16 heads) is the width built here and by
    ``create_model("supmim", preset)`` for the 224-px presets. The small-image presets
    (``img_size < 224``: ``vit_tiny_patch4_32``, ``vit_tiny_patch8_64``, the CPU-scale runs) get
    the preset's 128-wide, 4-head decoder instead, depth still the recipe's: at 512 the decoder
    of ``vit_tiny_patch4_32`` would hold more parameters than its encoder (6.5M against 5.3M)
    and, running on all 64 tokens while the encoder sees the 32 visible ones, cost about 2.4
    times its compute, turning the shallow auxiliary head into most of each CPU step. Pass
    ``decoder_embed_dim=512, decoder_num_heads=16`` to ``create_model`` (``--model-arg`` in
    ``fastmim train``) for docs/METHODS.md's width at any size.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int | None = None,
                 decoder_depth: int | None = None, decoder_num_heads: int | None = None, mlp_ratio: float = 4.,
                 norm_layer: type[nn.Module] = vit_layer_norm, norm_pix_loss: bool = True, *,
                 num_classes: int = 1000, recipe: str = "default", mask_ratio: float | None = None,
                 pool: str = "avg", cls_input: str = "masked", w_cls: float | None = None,
                 w_mim: float | None = None, label_smoothing: float | None = None,
                 logit_temperature: float | None = None, head_hidden_dim: int | None = None,
                 tokenizer: nn.Module | None = None, tokenizer_vocab_size: int | None = None,
                 fused: bool = True, masking: Any = "random", attn_backend: str | None = None,
                 pred_masked_only: bool = False, drop_path_rate: float = 0.0, preset: str | None = None):
        if preset is not None:
            warnings.warn("SupervisedMIM(preset=...) is deprecated: the recipe is recipe=... (a preset is a model "
                          "size in fastmim)", DeprecationWarning, stacklevel=2)
            recipe = preset
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        given = dict(mask_ratio=mask_ratio, decoder_depth=decoder_depth, decoder_embed_dim=decoder_embed_dim,
                     decoder_num_heads=decoder_num_heads, w_cls=w_cls, w_mim=w_mim, label_smoothing=label_smoothing,
                     logit_temperature=logit_temperature, head_hidden_dim=head_hidden_dim)
        cfg = {k: (RECIPES[recipe][k] if v is None else v) for k, v in given.items()}
        if pool not in ("avg", "cls"):
            raise ValueError(f"pool must be 'avg' or 'cls', got {pool!r}")
        if cls_input not in ("masked", "full"):
            raise ValueError(f"cls_input must be 'masked' or 'full', got {cls_input!r}")
        if (tokenizer is None) != (tokenizer_vocab_size is None):
            raise ValueError("give both tokenizer and tokenizer_vocab_size, or neither")
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, cfg["decoder_embed_dim"],
                         cfg["decoder_depth"], cfg["decoder_num_heads"], mlp_ratio, norm_layer, norm_pix_loss,
                         fused=fused, masking=masking, attn_backend=attn_backend, pred_masked_only=pred_masked_only,
                         drop_path_rate=drop_path_rate)
        self.recipe = recipe
        self.mask_ratio = check_mask_ratio(cfg["mask_ratio"])
        self.pool = pool
        self.cls_input = cls_input
        self.w_cls, self.w_mim = float(cfg["w_cls"]), float(cfg["w_mim"])
        self.label_smoothing = float(cfg["label_smoothing"])
        self.logit_temperature = float(cfg["logit_temperature"])
        hidden = cfg["head_hidden_dim"]
        if hidden:
            self.head = nn.Sequential(nn.Linear(embed_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, num_classes))
        else:
            self.head = nn.Linear(embed_dim, num_classes)
        self.head.apply(init_mae_weights)
        self.tokenizer = tokenizer
        if tokenizer is not None:
            for p in tokenizer.parameters():
                p.requires_grad_(False)
            self.decoder_pred = nn.Linear(cfg["decoder_embed_dim"], tokenizer_vocab_size)
            init_mae_weights(self.decoder_pred)

    # ------------------------------------------------------------------ heads
    def _pooled(self, latent: torch.Tensor | PackedTokens) -> torch.Tensor:
        """``(B, D)`` from normalised encoder tokens (dense ``(B, N, D)`` or packed)."""
        if not isinstance(latent, PackedTokens):
            return latent[:, 0] if self.pool == "cls" else latent[:, 1:].mean(dim=1)
        cls_rows = latent.cu_seqlens[:-1].long()
        if self.pool == "cls":
            return latent.tokens.index_select(0, cls_rows)
        counts = torch.tensor(latent.num_visible)
        sample = torch.repeat_interleave(torch.arange(len(counts)), counts + 1).to(latent.tokens.device)
        sums = latent.tokens.new_zeros(len(counts), latent.tokens.shape[-1]).index_add(0, sample, latent.tokens)
        sums = sums - latent.tokens.index_select(0, cls_rows)
        return sums / counts.to(sums.device, sums.dtype)[:, None]

    def _mim_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                  ids_masked: torch.Tensor | None) -> torch.Tensor:
        if self.tokenizer is None:
            return self.forward_loss(imgs, pred, mask, ids_masked)
        with torch.no_grad():
            self.tokenizer.eval()
            target = self.tokenizer(imgs).long()  # (B, L)
        # Nothing masked (mask_ratio=0): loss 0 and zero gradients, as the pixel loss, not 0 / 0.
        if ids_masked is not None:  # pred rows are the masked patches
            target = take_rows(target.unsqueeze(-1), ids_masked).squeeze(-1)
            per_row = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1), reduction="none")
            return per_row.sum() / max(per_row.numel(), 1)
        per_patch = F.cross_entropy(pred.transpose(1, 2).float(), target, reduction="none")  # (B, L)
        total = mask.sum()
        return (per_patch * mask).sum() / torch.where(total == 0, torch.ones_like(total), total)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor, mask_ratio: Any = None,
                noise: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                seed: int | torch.Tensor | None = None, offset: int | torch.Tensor | None = None,
                ) -> dict[str, torch.Tensor]:
        """One training step's losses.

        Args:
            imgs: ``(B, C, H, W)``.
            labels: ``(B,)`` class indices, or ``(B, num_classes)`` class probabilities (mixup).
            mask_ratio: default ``self.mask_ratio``; a float in [0, 1) or one per image.
            noise, mask: optional ``(B, L)`` masking noise (the official rule) or masks (1 = removed).
            seed, offset: or the model's generator, image ``b`` as sample ``offset + b`` of ``seed``
                (see :meth:`MaskedAutoencoderViT.forward`).

        Returns a dict: ``loss`` (the total), ``loss_cls``, ``loss_mim``, ``logits`` ``(B, classes)``,
        ``pred`` (decoder output, as MAE's) and ``mask`` ``(B, L)``.
        """
        if mask_ratio is None:
            mask_ratio = self.mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise, mask=mask, seed=seed, offset=offset)
        ids_masked = self.masked_ids(mask, visible_counts(latent)) if self.pred_masked_only else None
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        pred = self.forward_decoder(latent, ids_restore, ids_masked, grid_size=grid)
        loss_mim = self._mim_loss(imgs, pred, mask, ids_masked)
        feats = self._pooled(latent) if self.cls_input == "masked" else self.encode(imgs)
        logits = self.head(feats)
        loss_cls = F.cross_entropy(logits.float() / self.logit_temperature, labels,
                                   label_smoothing=self.label_smoothing)
        loss = self.w_cls * loss_cls + self.w_mim * loss_mim
        return {"loss": loss, "loss_cls": loss_cls, "loss_mim": loss_mim, "logits": logits, "pred": pred,
                "mask": mask}

    # ------------------------------------------------------------------ evaluation (no decoder)
    def encode(self, imgs: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """``(B, D)`` features of the unmasked image, pooled as the classifier pools (``self.pool``)."""
        return super().encode(imgs, self.pool if pool is None else pool)

    def classify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of the unmasked image: the plain ViT classifier's cost."""
        return self.head(self.encode(imgs))


@register_method("supmim")
def _build_supmim(size: ViTPreset, /, **overrides: Any) -> SupervisedMIM:
    kwargs = size.encoder_kwargs()
    if size.img_size < 224:  # the preset's narrow decoder: see SupervisedMIM's docstring
        kwargs.update(decoder_embed_dim=size.decoder_embed_dim, decoder_num_heads=size.decoder_num_heads)
    return SupervisedMIM(**{**kwargs, **overrides})


@register_method("supmae")
def _build_supmae(size: ViTPreset, /, **overrides: Any) -> SupervisedMIM:
    """``create_model("supmae", size)``: :class:`SupervisedMIM` with ``recipe="supmae"``."""
    return _build_supmim(size, **{"recipe": "supmae", **overrides})


__all__ = ["RECIPES", "SupervisedMIM"]
