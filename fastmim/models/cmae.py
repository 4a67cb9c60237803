"""CMAE 2022 ("Improvements to Self-Supervised Representation Learning for Masked Image Modeling").

Not the momentum-encoder "Contrastive Masked Autoencoders" of Huang et al.: no pixel shifter,
no EMA. MAE plus, on the encoder, a contrastive task between two augmented views and a token
position task, with a smaller decoder. ``forward(view1, view2)`` returns
``{"loss", "loss_mim", "loss_con", "loss_pos"}`` with
``loss = w_mim * loss_mim + w_con * loss_con + w_pos * loss_pos``.

One step, both views in one batch of ``2B`` images:

1. Masking: the model's masks (:mod:`fastmim.models.masking`; default ``random_masking``) in
   one call over the ``2B`` rows (view ``v`` of image ``b`` is sample ``2 * (offset + b) + v`` of
   the seed, then reordered so that rows ``0..B-1`` are view 1), or a given ``mask`` /
   ``noise`` ``(2B, L)``.
2. Encoder input: the first ``num_free = int(pos_fraction * K)`` visible tokens of each row
   (in shuffled order, so a uniformly random subset) get **no** position embedding, the others
   do (two ``gather_visible`` calls, ``cls`` first). One encoder pass serves all three tasks.
3. MIM: the decoder (``unshuffle`` adds the decoder position embedding, so the decoder knows
   every position) reconstructs the masked patches of both views (``masked_patch_mse``
   over the ``2B`` rows).
4. Contrastive: global average of each row's visible tokens (cls excluded) -> projection MLP
   (``Linear-BN-ReLU-Linear``, BatchNorm over the ``2B`` rows, as SimCLR) -> symmetric InfoNCE
   between the views, temperature 0.2, negatives gathered across ranks under DDP.
5. Position: a linear head on the position-free tokens' encoder outputs, cross-entropy over
   the ``L`` patch indices.

Defaults chosen where the paper leaves the detail open (all constructor options): decoder
depth 2, width 256 (``create_model("cmae", preset)``: smaller than the preset's MAE decoder,
see :func:`small_decoder`); projection hidden 2048, out 256; temperature 0.2; position-free fraction
0.75; weights ``w_mim=1, w_con=0.1, w_pos=0.1``; MIM loss on both views; normalised-pixel
target. ContrastiveCrop (the data side) is :class:`fastmim.data.ContrastiveCrop`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastmim.models.heads import info_nce, mlp_head
from fastmim.models.mae import MaskedAutoencoderViT
from fastmim.models.presets import ViTPreset, register_method
from fastmim.models.vit import check_two_views, vit_layer_norm

__all__ = ["CMAE"]


class CMAE(MaskedAutoencoderViT):
    """MAE with a small decoder, a contrastive task and a token-position task on the encoder.

    Args: those of :class:`~fastmim.models.MaskedAutoencoderViT` (decoder defaults 256 wide, 2
    blocks, 8 heads; ``norm_pix_loss=True``), and, keyword only:

    - ``proj_hidden_dim`` (2048), ``proj_dim`` (256), ``proj_layers`` (2): the projection MLP;
    - ``temperature`` (0.2): InfoNCE temperature;
    - ``pos_fraction`` (0.75): fraction of the visible tokens fed without position embedding
      (their positions are the targets of the position head; 0 disables the task);
    - ``w_mim`` (1.0), ``w_con`` (0.1), ``w_pos`` (0.1): loss weights;
    - ``sync_bn`` (True): the projection's BatchNorm takes global-batch statistics under DDP.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 256, decoder_depth: int = 2, decoder_num_heads: int = 8,
                 mlp_ratio: float = 4., norm_layer: type[nn.Module] = vit_layer_norm, norm_pix_loss: bool = True,
                 *, proj_hidden_dim: int = 2048, proj_dim: int = 256, proj_layers: int = 2,
                 temperature: float = 0.2, pos_fraction: float = 0.75,
                 w_mim: float = 1.0, w_con: float = 0.1, w_pos: float = 0.1, sync_bn: bool = True,
                 **mae_options: Any):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim,
                         decoder_depth, decoder_num_heads, mlp_ratio, norm_layer, norm_pix_loss, **mae_options)
        self.temperature = float(temperature)
        self.pos_fraction = float(pos_fraction)
        self.w_mim, self.w_con, self.w_pos = float(w_mim), float(w_con), float(w_pos)
        self.projector = mlp_head(embed_dim, proj_hidden_dim, proj_dim, proj_layers, sync_bn=sync_bn)
        self.pos_head = nn.Linear(embed_dim, self.num_patches)
        for m in (*self.projector.modules(), self.pos_head):
            self._init_weights(m)

    # ------------------------------------------------------------------ masking
    def num_free(self, num_visible: int) -> int:
        """How many of ``num_visible`` tokens go in without position embedding."""
        return int(self.pos_fraction * num_visible)

    def two_view_masking(self, batch: int, device: torch.device, mask_ratio: float,
                         noise: torch.Tensor | None = None, seed: int | torch.Tensor | None = None,
                         offset: int | torch.Tensor | None = None, mask: torch.Tensor | None = None,
                         grid_size: tuple[int, int] | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids_keep (2B, K), ids_restore (2B, L), mask (2B, L))`` for both views at once
        (``batch`` = ``2B`` rows, view 1's first), from the model's masks
        (:meth:`~fastmim.models.MaskedAutoencoderViT.masks`).

        ``mask`` or ``noise`` ``(2B, L)`` (view 1's rows first) are taken as given. Otherwise
        the model's generator makes the ``2B`` rows in one call in which view ``v`` of image
        ``b`` is sample ``2 * (offset + b) + v`` of the seed (``offset`` default 0): a process
        holding images ``[offset, offset + B)`` of a global batch gets the masks one process with
        the whole batch would. Every row must keep the same number of patches.
        """
        if batch % 2:
            raise ValueError(f"batch must be 2B (the rows of both views), got {batch}")
        grid = self.grid_size if grid_size is None else grid_size
        for name, value in (("noise", noise), ("mask", mask)):
            if value is not None and tuple(value.shape) != (batch, grid[0] * grid[1]):
                raise ValueError(f"{name} must be (2B, L) = {(batch, grid[0] * grid[1])} (view 1 rows first), "
                                 f"got {tuple(value.shape)}")
        given = mask is not None or noise is not None or self.masking == "official"
        masks = self.masks(batch, grid, mask_ratio, noise=noise, mask=mask, seed=seed,
                           offset=None if offset is None else 2 * offset, device=device)
        if masks.cu_seqlens is not None:
            raise ValueError(f"CMAE needs the same number of visible patches in every row, got {masks.num_visible}")
        out = (masks.ids_keep, masks.ids_restore, masks.mask)
        if given:
            return out
        # Rows 2b + v -> v * B + b: view 1's rows first, as the model lays out the views.
        return tuple(t.unflatten(0, (batch // 2, 2)).transpose(0, 1).flatten(0, 1) for t in out)

    # ------------------------------------------------------------------ encoder
    def visible_tokens(self, x: torch.Tensor, ids_keep: torch.Tensor, num_free: int,
                       pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, K + 1, D)``: cls, then the visible tokens in ``ids_keep`` order; the first
        ``num_free`` without position embedding, the rest with it (``pos_embed``: the images'
        position embedding, default the model's)."""
        pos_embed = self.pos_embed if pos_embed is None else pos_embed
        cls = self.cls_token + pos_embed[:, :1, :]
        gather_visible = self.ops.gather_visible
        if num_free == 0:
            return gather_visible(x, ids_keep, pos_embed[0, 1:, :], cls_token=cls)
        free = gather_visible(x, ids_keep[:, :num_free], None, cls_token=cls)
        if num_free == ids_keep.shape[1]:
            return free
        placed = gather_visible(x, ids_keep[:, num_free:], pos_embed[0, 1:, :])
        return torch.cat([free, placed.to(free.dtype)], dim=1)

    # ------------------------------------------------------------------ forward
    def forward(self, imgs1: torch.Tensor, imgs2: torch.Tensor, mask_ratio: float = 0.75,
                noise: torch.Tensor | None = None, seed: int | torch.Tensor | None = None,
                offset: int | torch.Tensor | None = None, *,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"loss", "loss_mim", "loss_con", "loss_pos"}`` (scalars) for two views ``(B, C, H, W)``.

        ``mask`` or ``noise`` ``(2B, L)`` (view 1's rows first), or ``seed`` and ``offset`` (the
        index of image 0 in the global batch) fix the masks (see :meth:`two_view_masking`); a given
        ``mask`` lists each row's visible patches in patch order, so the position-free ones are
        the first in that order, not a random subset. Views of
        another size than the model's work when ``pos_fraction`` is 0 (the position task predicts
        one of the model's ``L`` patch indices).
        """
        grid = check_two_views(imgs1, imgs2, self.in_chans, self.patch_size)
        if grid != self.grid_size and self.pos_fraction > 0:
            raise ValueError(f"CMAE's position task predicts one of the {self.num_patches} patches of a "
                             f"{self.grid_size} grid: views of a {grid} grid need pos_fraction=0")
        batch = imgs1.shape[0]
        imgs = torch.cat([imgs1, imgs2], dim=0)
        ids_keep, ids_restore, mask = self.two_view_masking(2 * batch, imgs.device, mask_ratio, noise, seed, offset,
                                                            mask, grid)
        keep = ids_keep.shape[1]
        num_free = self.num_free(keep)

        x = self.visible_tokens(self.patch_embed(imgs), ids_keep, num_free, self.pos_embed_for(grid))
        latent = self.norm(self._run_blocks(x, self.blocks))

        ids_masked = self.masked_ids(mask, keep) if self.pred_masked_only else None
        pred = self.forward_decoder(latent, ids_restore, ids_masked, grid_size=grid)
        loss_mim = self.forward_loss(imgs, pred, mask, ids_masked)

        z = self.projector(latent[:, 1:, :].mean(dim=1))
        loss_con = info_nce(z[:batch], z[batch:], self.temperature)

        if num_free > 0:
            logits = self.pos_head(latent[:, 1:1 + num_free, :])
            loss_pos = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                       ids_keep[:, :num_free].reshape(-1))
        else:
            loss_pos = latent.new_zeros((), dtype=torch.float32)

        loss = self.w_mim * loss_mim.float() + self.w_con * loss_con + self.w_pos * loss_pos
        return {"loss": loss, "loss_mim": loss_mim.float(), "loss_con": loss_con, "loss_pos": loss_pos}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, pos_fraction={self.pos_fraction}, w_mim={self.w_mim}, "
                f"w_con={self.w_con}, w_pos={self.w_pos}")


def small_decoder(preset: ViTPreset) -> dict[str, int]:
    """CMAE's decoder at ``preset``: smaller than MAE's decoder of the same preset (docs/METHODS.md (a)).

    At most 2 blocks and 256 wide (MAE's ViT-B/L/H decoder is 8 x 512: 2 x 256 there, as before);
    where that is not smaller than the preset's MAE decoder (the small-image presets' 2 x 128),
    half its width. Head dim 32, as MAE's.
    """
    depth = min(2, preset.decoder_depth)
    width = min(256, preset.decoder_embed_dim)
    if (width, depth) == (preset.decoder_embed_dim, preset.decoder_depth):
        width = max(32, width // 2)
    return {"decoder_embed_dim": width, "decoder_depth": depth, "decoder_num_heads": max(1, width // 32)}


@register_method("cmae")
def _build_cmae(preset: ViTPreset, **overrides: Any) -> CMAE:
    """CMAE at ``preset``'s encoder size with CMAE's small decoder (:func:`small_decoder`: 256 wide,
    2 blocks at ViT-B scale; always smaller than the preset's MAE decoder)."""
    kwargs = {**preset.encoder_kwargs(), **small_decoder(preset)}
    return CMAE(**{**kwargs, **overrides})
