"""LUT ("Learning with Unmasked Tokens Drives Stronger Vision Learners", Kim et al., ECCV 2024).

MAE plus a contextualisation loss between the masked student and an EMA teacher that sees
the unmasked images. ``forward(view1, view2)`` returns ``{"loss", "loss_mae", "loss_bc"}``
with ``loss = w_mae * loss_mae + w_bc * loss_bc`` (defaults 1.0 and 0.25).

One step (as the reference code ``naver-ai/lut``, with fastmim's fused ops):

1. One random permutation per image (``random_permutation``, image ``b`` as sample ``offset +
   b`` of the seed, or the argsort of a given ``noise (B, L)``); view 1 keeps
   ``ids_shuffle[:, :K]``, view 2 ``ids_shuffle[:, K:2K]``: disjoint visible sets, hence
   ``mask_ratio >= 0.5``.
2. The student encoder runs on both views' visible tokens as one batch of ``2B`` rows (one
   ``gather_visible`` call); the decoder (``unshuffle``) reconstructs view 1's masked patches,
   MAE loss (``masked_patch_mse``, normalised pixels) on view 1 only.
3. For each view, the mean of its encoded patch tokens (cls excluded) -> projection head ->
   predictor (each ``Linear(no bias)-BN-ReLU-Linear(no bias)``, hidden 4096, out = encoder
   width; BatchNorm statistics per view, global under DDP); the EMA teacher encodes both
   *unmasked* views and applies its projection head; ``loss_bc`` = mean over the two
   cross-view pairs of ``2 - 2 cos(student_v, teacher_u)``, ``u != v``.

The teacher (:class:`~fastmim.models.ema.EMATeacher`, ``model.teacher``) is a copy of the student's encoder and
projection head whose weights are **buffers**, not parameters: ``model.parameters()`` (what an
optimizer is given) never contains them, they move with ``.to()`` and are saved in
``state_dict()`` (so checkpoints resume the teacher), they get no gradient, and the teacher
stays in eval mode (BatchNorm on its running statistics) whatever ``model.train()`` says;
DistributedDataParallel does not broadcast it (it is identical on every rank).
After each optimizer step call ``model.update_teacher(step, max_steps)``: one
``torch._foreach_lerp_`` over all its tensors (parameters and BatchNorm running statistics,
as timm's ``ModelEma``), momentum from 0.996 to 1 on a half-cosine schedule. The (teacher,
student) tensor lists are paired once and reused; moving or converting the model (``.to()``,
``.float()``), ``load_state_dict``, sharding it and ``reset_teacher()`` pair them again.

Under FSDP2 (``fully_shard``) the teacher stays whole on every rank while the student is
sharded: :mod:`fastmim.models.ema` holds that machinery (each rank lerps its shard's rows, one
all-gather spreads them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastmim.models.ema import EMAPairs, EMATeacher, ema_momentum
from fastmim.models.heads import cosine_loss, mlp_head
from fastmim.models.mae import MaskedAutoencoderViT
from fastmim.models.masking import keep_count, make_permutation
from fastmim.models.presets import ViTPreset, register_method
from fastmim.models.vit import check_two_views, vit_layer_norm
from fastmim.ops import check_mask_ratio

__all__ = ["LUT"]


class LUT(MaskedAutoencoderViT):
    """MAE on view 1 + contextualisation of both masked views against an EMA teacher.

    Args: those of :class:`~fastmim.models.MaskedAutoencoderViT` (``norm_pix_loss=True`` by
    default), and, keyword only:

    - ``head_hidden_dim`` (4096), ``head_layers`` (2), ``pred_layers`` (2): projection head and
      predictor (out = ``embed_dim``);
    - ``w_mae`` (1.0), ``w_bc`` (0.25): loss weights;
    - ``ema_momentum`` (0.996) and ``ema_final`` (1.0): the teacher's momentum schedule;
    - ``sync_bn`` (True): the heads' BatchNorm takes global-batch statistics under DDP;
    - ``masking``: ``"random"`` (default) or ``"official"``, the permutation's source.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4., norm_layer: type[nn.Module] = vit_layer_norm, norm_pix_loss: bool = True,
                 *, head_hidden_dim: int = 4096, head_layers: int = 2, pred_layers: int = 2,
                 w_mae: float = 1.0, w_bc: float = 0.25, ema_momentum: float = 0.996, ema_final: float = 1.0,
                 sync_bn: bool = True, **mae_options: Any):
        if not 0.0 <= ema_momentum <= ema_final <= 1.0:
            raise ValueError(f"need 0 <= ema_momentum <= ema_final <= 1, got {ema_momentum} and {ema_final}")
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim,
                         decoder_depth, decoder_num_heads, mlp_ratio, norm_layer, norm_pix_loss, **mae_options)
        if self.masking not in ("random", "official"):  # the two views cut one permutation (see forward)
            raise ValueError(f"LUT's views cut one random permutation per image: masking must be 'random' or "
                             f"'official', got {self.masking!r} (an explicit forward(mask=...) takes any masks)")
        self.w_mae, self.w_bc = float(w_mae), float(w_bc)
        self.ema_momentum, self.ema_final = float(ema_momentum), float(ema_final)
        self.projector = mlp_head(embed_dim, head_hidden_dim, embed_dim, head_layers, sync_bn=sync_bn)
        self.predictor = mlp_head(embed_dim, head_hidden_dim, embed_dim, pred_layers, sync_bn=sync_bn)
        for m in (*self.projector.modules(), *self.predictor.modules()):
            self._init_weights(m)
        self.teacher = EMATeacher(self)
        self._ignore_teacher_in_ddp()
        self._ema_cache: EMAPairs | None = None

    # ------------------------------------------------------------------ teacher
    def _ignore_teacher_in_ddp(self) -> None:
        # DistributedDataParallel would broadcast every buffer from rank 0 at each forward: an
        # encoder-sized copy per step for the teacher, which is identical on every rank anyway
        # (same initial weights, EMA of the synchronised student). DDP skips the names listed here.
        self._ddp_params_and_buffers_to_ignore = [f"teacher.{n}" for n, _ in self.teacher.named_buffers()]

    def _ema_pairs(self) -> EMAPairs:
        """The paired tensors of :meth:`update_teacher`, built on first use and kept until the
        model's tensors change (see the module docstring). ``fully_shard`` turns the class into
        an ``FSDP`` subclass: the cheap check that catches a model sharded after the pairing."""
        pairs = self._ema_cache
        if pairs is None or pairs.layout is not type(self):
            pairs = self._ema_cache = EMAPairs(self)
        return pairs

    def _apply(self, fn, recurse=True):
        self._ema_cache = None  # .to() / .float() give the module new tensor objects
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self._ema_cache = None  # assign=True replaces the tensors
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getstate__(self):
        # The pairs hold views and process groups: copies and pickles pair their own tensors again.
        state = super().__getstate__()
        state["_ema_cache"] = None
        return state

    @torch.no_grad()
    def update_teacher(self, step: int | None = None, max_steps: int | None = None,
                       momentum: float | None = None) -> float:
        """``teacher = m * teacher + (1 - m) * student`` in one ``torch._foreach_lerp_``; returns ``m``.

        ``m`` is ``momentum`` if given, else :func:`ema_momentum` ``(step, max_steps)`` from
        ``ema_momentum`` to ``ema_final`` (``step`` = optimizer steps done), else ``ema_momentum``.
        """
        if momentum is None:
            momentum = (self.ema_momentum if step is None or max_steps is None
                        else ema_momentum(step, max_steps, self.ema_momentum, self.ema_final))
        pairs = self._ema_pairs()
        torch._foreach_lerp_(pairs.teacher, pairs.student, 1.0 - momentum)
        for gather in pairs.gathers:
            gather()
        return momentum

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Rebuild the teacher as an exact copy of the student (e.g. after loading student weights,
        or after ``convert_sync_batchnorm``)."""
        device = self.cls_token.device
        self.teacher = EMATeacher(self).to(device)
        self._ignore_teacher_in_ddp()
        self._ema_cache = None

    def train(self, mode: bool = True) -> LUT:
        super().train(mode)
        self.teacher.train(False)
        return self

    # ------------------------------------------------------------------ masking
    def two_view_permutation(self, batch: int, device: torch.device, noise: torch.Tensor | None = None,
                             seed: int | torch.Tensor | None = None, offset: int | torch.Tensor | None = None,
                             num_patches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids_shuffle, ids_restore)``, ``(B, L)`` each (:func:`fastmim.models.masking.make_permutation`;
        ``L`` = ``num_patches``, default the model's): argsort of ``noise`` when given, else with the
        model's ``masking``: ``"random"``, the counter-based ``random_permutation`` (image ``b``
        permuted as sample ``offset + b``, default 0, of the seed), or ``"official"``, the
        ``torch.rand`` argsort."""
        return make_permutation(batch, num_patches or self.num_patches, masking=self.masking, noise=noise, seed=seed,
                                offset=offset, device=device, reference=not self.fused)

    def _visible_ids(self, batch: int, device: torch.device, mask_ratio: float, noise: torch.Tensor | None,
                     seed: int | torch.Tensor | None, offset: int | torch.Tensor | None,
                     mask: torch.Tensor | None, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids_keep (2B, K), ids_restore (B, L))``: both views' visible patches (disjoint) and view
        1's ranks, from one permutation per image or from a given ``mask (2B, L)``."""
        if mask is None:
            length = grid[0] * grid[1]
            keep = keep_count(length, mask_ratio)
            ids_shuffle, ids_restore = self.two_view_permutation(batch, device, noise, seed, offset, length)
            return torch.cat([ids_shuffle[:, :keep], ids_shuffle[:, keep:2 * keep]], dim=0), ids_restore
        masks = self.masks(2 * batch, grid, noise=noise, mask=mask, seed=seed, offset=offset, device=device)
        if masks.cu_seqlens is not None or bool(((masks.mask[:batch] == 0) & (masks.mask[batch:] == 0)).any()):
            raise ValueError("LUT's mask (2B, L) must keep the same number of patches in every row, and the two "
                             "views of an image disjoint sets")
        return masks.ids_keep, masks.ids_restore[:batch]

    def _visible_tokens(self, x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """``(2B, K + 1, D)``: cls, then each row's visible tokens, with their position embedding."""
        return self.ops.gather_visible(x, ids_keep, pos_embed, cls_token=self.cls_token)

    # ------------------------------------------------------------------ forward
    def forward(self, imgs1: torch.Tensor, imgs2: torch.Tensor, mask_ratio: float = 0.75,
                noise: torch.Tensor | None = None, seed: int | torch.Tensor | None = None,
                offset: int | torch.Tensor | None = None, *,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"loss", "loss_mae", "loss_bc"}`` (scalars) for two views ``(B, C, H, W)``.

        ``mask_ratio`` must be >= 0.5 (the two views' visible sets are disjoint). ``noise (B, L)``
        or ``seed`` and ``offset`` (the index of image 0 in the global batch) fix the permutation
        (see :meth:`two_view_permutation`); or ``mask (2B, L)`` (view 1's rows first, 1 = removed)
        gives both views' masks. The views may have another size than the model's (a multiple
        of the patch size).
        """
        grid = check_two_views(imgs1, imgs2, self.in_chans, self.patch_size)
        if check_mask_ratio(mask_ratio) < 0.5 and mask is None:
            raise ValueError(f"LUT needs mask_ratio >= 0.5 (the two views keep disjoint sets of K = int(L * (1 - "
                             f"mask_ratio)) patches each, so 2K <= L), got {mask_ratio}")
        batch = imgs1.shape[0]
        ids_keep, ids_restore = self._visible_ids(batch, imgs1.device, mask_ratio, noise, seed, offset, mask, grid)
        keep = ids_keep.shape[1]
        x = self._visible_tokens(self.patch_embed(torch.cat([imgs1, imgs2], dim=0)), ids_keep, self.pos_embed_for(grid))
        latent = self.norm(self._run_blocks(x, self.blocks))

        mask1 = (ids_restore >= keep).to(torch.float32)
        ids_masked = self.masked_ids(mask1, keep) if self.pred_masked_only else None
        pred = self.forward_decoder(latent[:batch], ids_restore, ids_masked, grid_size=grid)
        loss_mae = self.forward_loss(imgs1, pred, mask1, ids_masked)

        pooled = latent[:, 1:, :].mean(dim=1)
        q1 = self.predictor(self.projector(pooled[:batch]))  # BatchNorm statistics per view
        q2 = self.predictor(self.projector(pooled[batch:]))
        with torch.no_grad():
            targets = self.teacher(torch.cat([imgs1, imgs2], dim=0))  # eval mode: rows independent
        loss_bc = 0.5 * (cosine_loss(q1, targets[batch:]) + cosine_loss(q2, targets[:batch]))

        loss = self.w_mae * loss_mae.float() + self.w_bc * loss_bc
        return {"loss": loss, "loss_mae": loss_mae.float(), "loss_bc": loss_bc}

    def extra_repr(self) -> str:
        return (f"w_mae={self.w_mae}, w_bc={self.w_bc}, ema_momentum={self.ema_momentum} -> {self.ema_final}")


@register_method("lut")
def _build_lut(preset: ViTPreset, **overrides: Any) -> LUT:
    """LUT at ``preset``'s size (MAE's decoder of the preset)."""
    return LUT(**{**preset.mae_kwargs(), **overrides})
