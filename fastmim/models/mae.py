"""MAE (He et al., 2021): a drop-in for the official ``models_mae.py`` with fastmim's fused ops.

:class:`MaskedAutoencoderViT` keeps the official constructor arguments and defaults, the
method names (``patchify``, ``unpatchify``, ``random_masking``, ``forward_encoder``,
``forward_decoder``, ``forward_loss``, ``forward``), ``forward(imgs, mask_ratio=0.75) ->
(loss, pred, mask)`` and the ``state_dict`` keys and shapes, so official checkpoints load
and official training scripts run unchanged. The steps are the paper's, each one op:
``random_masking`` (the masks), ``gather_visible`` (visible tokens + position embedding + cls),
the encoder blocks, ``unshuffle`` (mask tokens, un-shuffle, decoder position embedding), the
decoder blocks and ``masked_patch_mse`` (the loss). What it adds:

- ``fused=True`` (default): those ops are fastmim's fused ops, attention goes to
  ``attn_backend``, and the blocks are :class:`~fastmim.models.vit.FusedBlock` (fused LayerNorm,
  residual add and bias + GELU, their outputs recomputed in backward instead of saved; where
  the fused ops have a kernel), chained by :func:`~fastmim.models.vit.run_blocks` so that every
  residual add runs inside a LayerNorm kernel. ``fused=False`` calls the same ops' plain-PyTorch
  references (:class:`~fastmim.models.vit.ModelOps`) and timm's blocks: the same function, the
  same masks and loss for the same inputs.
- Where the masks come from (:mod:`fastmim.models.masking`, one module for every method):
  ``masking="random"`` (default; the counter-based RNG of ``fastmim.ops.random_masking``:
  ``forward(imgs, mask_ratio, seed=..., offset=...)`` masks image ``b`` as sample ``offset + b``
  of ``seed``, so a process holding images ``[offset, offset + B)`` of a global batch masks
  them as one process holding the whole batch would), ``"official"`` (``torch.rand`` and
  ``argsort``: an official run's masks, bit for bit, for the same ``torch.manual_seed``),
  ``"block"``, ``"grid"`` or a generator of one's own; ``forward(imgs, mask=...)`` takes a mask
  (1 = removed); a subclass overriding ``random_masking(x, mask_ratio, noise=None)`` (the hook
  the official code offers) gets its masks used, fused or not.
- ``pred_masked_only=True``: the decoder's output projection and the loss see the masked
  tokens only; ``pred`` is then ``(B, L - K, p*p*C)``, the masked patches in increasing
  patch index (``pred`` fills ``mask.bool()`` in order). Same loss.
- a per-sample mask ratio (a sequence of ``B`` floats), or a mask removing a different number
  of patches per image: the encoder runs on packed variable-length sequences (``cu_seqlens``).
- images of another size than ``img_size`` (any multiple of the patch size, square or not):
  the position embeddings are resampled (bicubic, :func:`~fastmim.models.vit.resize_pos_embed`)
  in ``forward``, ``forward_encoder``, ``forward_features`` and ``encode``.
- ``encode(imgs)``: features of the unmasked image for k-NN / linear probing.
- ``reconstruct(imgs, pred, mask)``: the prediction as images in pixel space (norm-pix undone
  with each target patch's own mean and variance); ``unpatchify`` for any patch grid.
- :func:`load_encoder_into_timm`: the encoder into a timm ``VisionTransformer``; weights from
  and to transformers' ViTMAE and from timm ViTs in :mod:`fastmim.models.convert`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from fastmim.models.masking import MaskGenerator, Masks, make_masks, mask_generator
from fastmim.models.presets import ViTPreset, register_method
from fastmim.models.vit import (
    Block,
    FusedBlock,
    ModelOps,
    PatchEmbed,
    check_images,
    check_patch_grid,
    get_2d_sincos_pos_embed,
    init_mae_weights,
    resize_pos_embed,
    run_blocks,
    vit_layer_norm,
)


class PackedTokens(NamedTuple):
    """Variable-length token sequences packed along one axis (samples keeping different numbers of patches).

    ``tokens``: ``(B + T, D)``; sample ``b`` at rows ``cu_seqlens[b]:cu_seqlens[b + 1]``: its cls
    token, then its ``K_b`` visible tokens in shuffled order (the layout of
    ``fastmim.ops.gather_visible`` with ``cls_token`` and ``cu_seqlens``). ``max_seqlen``: the
    longest sequence (cls included), a Python int. ``visible_cu_seqlens``: the same offsets
    without the cls rows (``(B + 1,)`` int32, cumulative ``K_b``). ``num_visible``: the ``K_b``
    on the host.
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    visible_cu_seqlens: torch.Tensor
    num_visible: tuple[int, ...]

    @classmethod
    def of(cls, tokens: torch.Tensor, masks: Masks) -> PackedTokens:
        """``gather_visible``'s packed output (cls rows included) for packed ``masks``."""
        cls_rows = torch.arange(len(masks.num_visible) + 1, device=tokens.device, dtype=torch.int32)
        return cls(tokens, masks.cu_seqlens + cls_rows, masks.max_seqlen + 1, masks.cu_seqlens, masks.num_visible)


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT backbone (official MAE arguments, plus fastmim's options).

    Args (official): ``img_size, patch_size, in_chans, embed_dim, depth, num_heads,
    decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_layer,
    norm_pix_loss`` with the official defaults (ViT-L encoder, 512x8 decoder, ``nn.LayerNorm``
    with eps 1e-5: the factories pass eps 1e-6).

    Args (fastmim, keyword only): ``fused`` (fastmim's fused ops, or their plain-PyTorch
    references), ``masking`` (where the masks come from: ``"random"``, ``"official"``, ``"block"``,
    ``"grid"``, a registered name or a generator; see :mod:`fastmim.models.masking`),
    ``attn_backend`` (``"fastmim" | "sdpa" | "xformers" | "reference" | None``; ``None``
    lets fastmim choose when fused, SDPA otherwise), ``pred_masked_only``, ``drop_path_rate``,
    ``decoder_mlp_ratio`` (the decoder blocks' MLP width over their width; default ``mlp_ratio``,
    as the official model, which has one ratio for both).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4., norm_layer: type[nn.Module] = nn.LayerNorm, norm_pix_loss: bool = False,
                 *, fused: bool = True, attn_backend: str | None = None, pred_masked_only: bool = False,
                 drop_path_rate: float = 0.0, decoder_mlp_ratio: float | None = None,
                 masking: str | MaskGenerator = "random"):
        super().__init__()
        grid = check_patch_grid(img_size, patch_size)
        if not isinstance(patch_size, int):
            patch_size = patch_size[0]
        self.fused = fused
        self.ops = ModelOps(fused)
        mask_generator(masking)  # an unknown name fails here, not at the first forward
        self.masking = masking
        self.pred_masked_only = pred_masked_only
        self.in_chans = in_chans
        block_backend = attn_backend if (attn_backend is not None or fused) else "sdpa"
        block_cls = FusedBlock if fused else Block  # same parameters, same function

        # ----- encoder
        # strict_img_size=False: other image sizes run too (resize_pos_embed fits the position embeddings).
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)  # fixed
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rule of timm
        self.blocks = nn.ModuleList([
            block_cls(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, drop_path=dpr[i],
                      attn_backend=block_backend)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)

        # ----- decoder
        decoder_mlp_ratio = mlp_ratio if decoder_mlp_ratio is None else decoder_mlp_ratio
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            block_cls(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                      attn_backend=block_backend)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.grid_size = grid
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Official MAE init: sin-cos position embeddings, xavier-uniform linears and patch embed, tokens N(0, .02)."""
        self.pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size, cls_token=True)[None])
        self.decoder_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=.02)
        nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        init_mae_weights(m)

    # ------------------------------------------------------------------ shapes
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, L, p*p*C)``, within a patch row, column, channel (``nchpwq -> nhwpqc``)."""
        p = self.patch_size
        if imgs.dim() != 4 or imgs.shape[2] % p != 0 or imgs.shape[3] % p != 0:
            raise ValueError(f"imgs must be (B, C, H, W) with H and W multiples of the patch size {p}, "
                             f"got {tuple(imgs.shape)}")
        n, c, hp, wp = imgs.shape
        h, w = hp // p, wp // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor, grid_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """``(B, L, p*p*C) -> (B, C, H, W)``, the inverse of :meth:`patchify`.

        ``grid_size``: the patch grid ``(H / p, W / p)`` of the images (an int for a square one);
        default the model's own (``patch_embed.grid_size``, which need not be square).
        """
        p = self.patch_size
        if grid_size is None:
            grid_size = self.grid_size
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        c = x.shape[-1] // (p * p)
        if x.dim() != 3 or x.shape[1] != h * w or c * p * p != x.shape[-1]:
            raise ValueError(f"x must be (B, {h}*{w}, {p}*{p}*C) for a {h}x{w} grid of {p}-pixel patches, "
                             f"got {tuple(x.shape)}")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None = None, *,
                    paste_visible: bool = False) -> torch.Tensor:
        """The decoder's prediction as images ``(B, C, H, W)`` in the pixel space of ``imgs``.

        ``imgs``: the images the model saw; ``pred`` and ``mask``: what :meth:`forward` returned
        for them. With ``norm_pix_loss`` the model predicts each patch normalised by the
        target patch's own mean and variance; they are undone here with those of the
        matching patch of ``imgs``: ``pred * sqrt(var + 1e-6) + mean`` (unbiased variance, as
        the loss). ``pred`` may hold every patch ``(B, L, p*p*C)`` or, from a
        ``pred_masked_only`` model, only the masked ones (``(B, L - K, p*p*C)``, or packed
        ``(T, p*p*C)`` with a per-sample mask ratio, in ``mask.bool()`` order): the visible
        patches are then those of ``imgs``, and ``mask`` is needed. ``paste_visible=True``
        takes the visible patches (``mask == 0``) from ``imgs`` in every case, as the MAE
        demo's "reconstruction + visible" panel. Any patch grid of the model's patch size
        works (``imgs`` need not be the model's image size). Returns float32 for a lower
        precision ``pred``.
        """
        if imgs.dim() != 4:
            raise ValueError(f"imgs must be (B, C, H, W), got {tuple(imgs.shape)}")
        target = self.patchify(imgs).float()
        batch, length, width = target.shape
        grid = (imgs.shape[2] // self.patch_size, imgs.shape[3] // self.patch_size)
        pred = pred.float()
        full = pred.dim() == 3 and tuple(pred.shape[:2]) == (batch, length)
        if pred.shape[-1] != width or not (full or mask is not None):
            raise ValueError(f"pred must be (B, L, p*p*C) = {(batch, length, width)}, or its masked rows with the "
                             f"mask, got {tuple(pred.shape)}" + ("" if mask is not None else " and no mask"))
        if mask is not None and tuple(mask.shape) != (batch, length):
            raise ValueError(f"mask must be (B, L) = {(batch, length)}, got {tuple(mask.shape)}")
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.e-6) ** .5
        if full:
            out = pred * std + mean if self.norm_pix_loss else pred
            if paste_visible and mask is not None:
                removed = mask.to(out.dtype).unsqueeze(-1)
                out = out * removed + target * (1 - removed)
        else:  # the masked rows only: scatter them into the image's patches
            rows = mask.reshape(-1).bool()
            if int(rows.sum()) != pred.reshape(-1, width).shape[0]:
                raise ValueError(f"pred has {pred.reshape(-1, width).shape[0]} rows, the mask {int(rows.sum())} "
                                 f"masked patches")
            flat = pred.reshape(-1, width)
            if self.norm_pix_loss:
                flat = flat * std.reshape(-1, 1)[rows] + mean.reshape(-1, 1)[rows]
            out = target.reshape(-1, width).clone()
            out[rows] = flat
            out = out.reshape(batch, length, width)
        return self.unpatchify(out, grid)

    # ------------------------------------------------------------------ masking
    def masks(self, batch: int, grid_size: tuple[int, int], mask_ratio: Any = 0.75, *,
              noise: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              seed: int | torch.Tensor | None = None, offset: int | torch.Tensor | None = None,
              device: torch.device | str = "cpu") -> Masks:
        """This model's masks for ``batch`` images of a ``grid_size`` patch grid:
        :func:`fastmim.models.masking.make_masks` with the model's ``masking`` (the sources: see
        :meth:`forward`)."""
        return make_masks(batch, grid_size, mask_ratio, masking=self.masking, noise=noise, mask=mask, seed=seed,
                          offset=offset, device=device, reference=not self.fused)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """The official hook: ``x (B, L, D) -> (x_masked (B, K, D), mask (B, L), ids_restore (B, L))``.

        The model's masks of the ``L`` tokens (``argsort(noise)`` when ``noise`` is given, the
        official rule) and the kept tokens, ``mask`` 1 on removed ones. A subclass may override it
        (as the official code invites): :meth:`forward_encoder` then masks with its output,
        called as the official encoder calls it (on ``patch_embed(imgs) + pos_embed``), fused or not.
        """
        masks = self.masks(x.shape[0], self._grid_of(x.shape[1]), mask_ratio, noise=noise, device=x.device)
        x_masked = self.ops.gather_visible(x, masks.ids_keep, cu_seqlens=masks.cu_seqlens, max_seqlen=masks.max_seqlen)
        return x_masked, masks.mask, masks.ids_restore

    def _masks_from_hook(self) -> bool:
        """A subclass overrides :meth:`random_masking`: its output is the masking."""
        return type(self).random_masking is not MaskedAutoencoderViT.random_masking

    def _grid_of(self, num_patches: int) -> tuple[int, int]:
        """The patch grid of ``num_patches`` tokens: the model's own, else a square one, else one row."""
        if num_patches == self.num_patches:
            return self.grid_size
        side = math.isqrt(num_patches)
        return (side, side) if side * side == num_patches else (1, num_patches)

    # ------------------------------------------------------------------ encoder
    def pos_embed_for(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """``pos_embed`` for images of a ``grid_size`` patch grid (resampled when it is not the model's)."""
        return resize_pos_embed(self.pos_embed, grid_size, self.grid_size)

    def _run_blocks(self, x: torch.Tensor | PackedTokens, blocks: nn.ModuleList) -> torch.Tensor | PackedTokens:
        if isinstance(x, PackedTokens):
            return x._replace(tokens=run_blocks(blocks, x.tokens, cu_seqlens=x.cu_seqlens, max_seqlen=x.max_seqlen))
        return run_blocks(blocks, x)

    def _apply_norm(self, x: torch.Tensor | PackedTokens, norm: nn.Module) -> torch.Tensor | PackedTokens:
        return x._replace(tokens=norm(x.tokens)) if isinstance(x, PackedTokens) else norm(x)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: Any, noise: torch.Tensor | None = None, *,
                        mask: torch.Tensor | None = None, seed: int | torch.Tensor | None = None,
                        offset: int | torch.Tensor | None = None):
        """``imgs -> (latent, mask, ids_restore)``; ``latent`` is ``(B, K + 1, D)`` after the final norm,
        a :class:`PackedTokens` when the images keep different numbers of patches. The masks: see
        :meth:`forward`."""
        grid = check_images(imgs, self.in_chans, self.patch_size)
        pos_embed = self.pos_embed_for(grid)
        x = self.patch_embed(imgs)
        if mask is None and self._masks_from_hook():  # as the official forward_encoder calls it
            x, mask, ids_restore = self.random_masking(x + pos_embed[:, 1:, :], mask_ratio, noise)
            cls = (self.cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls.to(x.dtype), x], dim=1)
        else:
            masks = self.masks(imgs.shape[0], grid, mask_ratio, noise=noise, mask=mask, seed=seed, offset=offset,
                               device=imgs.device)
            x = self.ops.gather_visible(x, masks.ids_keep, pos_embed, cls_token=self.cls_token,
                                        cu_seqlens=masks.cu_seqlens, max_seqlen=masks.max_seqlen)
            x = x if masks.cu_seqlens is None else PackedTokens.of(x, masks)
            mask, ids_restore = masks.mask, masks.ids_restore
        x = self._run_blocks(x, self.blocks)
        return self._apply_norm(x, self.norm), mask, ids_restore

    # ------------------------------------------------------------------ decoder
    def forward_decoder(self, x: torch.Tensor | PackedTokens, ids_restore: torch.Tensor,
                        ids_masked: torch.Tensor | None = None, *,
                        grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``latent -> pred`` ``(B, L, p*p*C)``.

        With ``ids_masked`` (see :meth:`masked_ids`; ``forward`` passes it when
        ``pred_masked_only``) only those tokens reach ``decoder_pred``: ``(B, L - K, p*p*C)``, or
        ``(total masked, p*p*C)`` for a packed latent, in ``mask.bool()`` order. ``grid_size``: the
        images' patch grid (default: the model's, or a square one of ``L`` patches).
        """
        cu_seqlens = x.visible_cu_seqlens if isinstance(x, PackedTokens) else None
        pos_embed = resize_pos_embed(self.decoder_pos_embed, grid_size or self._grid_of(ids_restore.shape[1]),
                                     self.grid_size)
        x = self.decoder_embed(x if cu_seqlens is None else x.tokens)
        x = self.ops.unshuffle(x, ids_restore, self.mask_token, pos_embed, has_cls=True, cu_seqlens=cu_seqlens)
        x = self._run_blocks(x, self.decoder_blocks)
        x = self.decoder_norm(x)[:, 1:, :]
        if ids_masked is not None:
            x = take_rows(x, ids_masked)
        return self.decoder_pred(x)

    @staticmethod
    def masked_ids(mask: torch.Tensor, num_visible: int | Sequence[int] | None = None) -> torch.Tensor:
        """Indices of the masked patches, in ``mask.bool()`` order (sample by sample, increasing patch index).

        ``num_visible`` (host ints, so no device sync): one count for a dense batch ->
        ``(B, L - K)`` patch indices; one per sample -> packed ``(sum(L - K_b),)`` indices
        ``b * L + l``. ``None`` reads the counts from ``mask`` (a device sync).
        """
        batch, length = mask.shape
        if num_visible is None:
            counts = (length - mask.sum(dim=1)).round().long().tolist()
            num_visible = counts[0] if len(set(counts)) == 1 else counts
        order = torch.argsort(mask, dim=1, stable=True)  # visible first, then masked, each by patch index
        if isinstance(num_visible, int):
            return order[:, num_visible:]
        rows = torch.cat([torch.arange(k, length) + b * length for b, k in enumerate(num_visible)]).to(mask.device)
        return (order + torch.arange(batch, device=mask.device)[:, None] * length).reshape(-1)[rows]

    # ------------------------------------------------------------------ loss
    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     ids_masked: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error on the removed patches (normalised per patch when ``norm_pix_loss``):
        ``fastmim.ops.masked_patch_mse``. Nothing masked (``mask_ratio=0``) gives 0 with zero
        gradients, where the official code divides 0 by 0.

        ``pred``: ``(B, L, p*p*C)``, or the rows at ``ids_masked`` only (``pred_masked_only``;
        when ``ids_masked`` is not given it is recomputed from ``mask``).
        """
        if ids_masked is None and not (pred.dim() == 3 and pred.shape[1] == mask.shape[1]):
            ids_masked = self.masked_ids(mask, mask.shape[1] - pred.shape[1] if pred.dim() == 3 else None)
        mask = None if ids_masked is not None else mask
        return self.ops.masked_patch_mse(pred, imgs, mask, patch_size=self.patch_size,
                                         norm_pix_loss=self.norm_pix_loss, ids_masked=ids_masked)

    def forward(self, imgs: torch.Tensor, mask_ratio: Any = 0.75, noise: torch.Tensor | None = None, *,
                mask: torch.Tensor | None = None, seed: int | torch.Tensor | None = None,
                offset: int | torch.Tensor | None = None):
        """``(loss, pred, mask)`` as in the official model.

        ``imgs``: ``(B, C, H, W)``, ``H`` and ``W`` any multiples of the patch size.
        ``mask_ratio``: a float in [0, 1), or one per image (packed encoder). The masks, first given
        first taken:

        - ``mask`` (``(B, L)``, 1 = removed, bool or 0/1 floats): these masks (``mask_ratio`` unused);
          images removing different numbers of patches run packed;
        - ``noise`` (``(B, L)``): the official rule, the argsort of the noise;
        - the model's ``masking`` generator, with ``seed`` (an int in ``[0, 2**63)`` or an int64
          scalar tensor; no device sync either way; default: drawn from torch's generator) and
          ``offset`` (default 0): image ``b`` masked as sample ``offset + b`` of ``seed``, the same
          masks fused or not. ``masking="official"`` takes neither (it draws ``torch.rand``).

        A subclass's own ``random_masking`` replaces the last two (it gets ``noise``).
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise, mask=mask, seed=seed, offset=offset)
        ids_masked = self.masked_ids(mask, visible_counts(latent)) if self.pred_masked_only else None
        pred = self.forward_decoder(latent, ids_restore, ids_masked, grid_size=(imgs.shape[-2] // self.patch_size,
                                                                                imgs.shape[-1] // self.patch_size))
        loss = self.forward_loss(imgs, pred, mask, ids_masked)
        return loss, pred, mask

    # ------------------------------------------------------------------ evaluation
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """All tokens of the unmasked image after the final norm: ``(B, L + 1, D)`` (any image size)."""
        pos_embed = self.pos_embed_for(check_images(imgs, self.in_chans, self.patch_size))
        x = self.patch_embed(imgs) + pos_embed[:, 1:, :]
        cls = (self.cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self._run_blocks(torch.cat((cls, x), dim=1), self.blocks)
        return self.norm(x)

    def encode(self, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """``(B, D)`` features of the unmasked image for k-NN / linear probing: the cls token after
        the final norm (``pool="cls"``) or the mean of the normalised patch tokens (``"mean"`` or ``"avg"``)."""
        if pool not in ("cls", "mean", "avg"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'avg', got {pool!r}")
        x = self.forward_features(imgs)
        return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)


def take_rows(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``t[b, ids[b, k]]`` for ``(B, K)`` ids, or ``t.flatten(0, 1)[ids]`` for packed ``(T,)`` ids."""
    if ids.dim() == 2:
        return torch.gather(t, 1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    return t.reshape(-1, t.shape[-1]).index_select(0, ids)


def visible_counts(latent: torch.Tensor | PackedTokens) -> int | list[int]:
    """Visible patches per sample, from the latent's shape (dense) or its host-side lengths (packed)."""
    if isinstance(latent, PackedTokens):
        return list(latent.num_visible)
    return latent.shape[1] - 1


# ---------------------------------------------------------------------------------- factories

def mae_vit_base_patch16_dec512d8b(**kwargs: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=vit_layer_norm, **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=vit_layer_norm, **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=vit_layer_norm, **kwargs)


mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b


@register_method("mae")
def _build_mae(size: ViTPreset, /, **overrides: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**size.mae_kwargs(), "norm_layer": vit_layer_norm, **overrides})


# ---------------------------------------------------------------------------------- timm export

def encoder_state_dict_for_timm(state_dict: dict[str, torch.Tensor], timm_model: nn.Module,
                                ) -> dict[str, torch.Tensor]:
    """The encoder entries of a fastmim / official MAE ``state_dict``, shaped for ``timm_model``.

    Decoder entries and the mask token are dropped; ``pos_embed`` is resampled when the timm
    model's grid differs; ``norm.*`` is dropped when the timm model pools with ``fc_norm``
    (``global_pool="avg"``: MAE fine-tuning); ``head.*`` is kept only if its shape matches.
    """
    target = timm_model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.startswith("decoder_") or key == "mask_token" or key not in target:
            continue
        if key == "pos_embed" and value.shape != target[key].shape:
            from timm.layers import resample_abs_pos_embed

            grid = timm_model.patch_embed.grid_size
            value = resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=1)
        if value.shape != target[key].shape:
            if key.startswith("head."):
                continue
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit the timm model's "
                             f"{tuple(target[key].shape)} (different width, depth or patch size?)")
        out[key] = value
    return out


def load_encoder_into_timm(model: nn.Module | dict[str, torch.Tensor], timm_model: nn.Module):
    """Load a MAE encoder (a fastmim / official MAE model or its ``state_dict``) into a timm ViT.

    Example (fine-tuning a fastmim MAE ViT-B/16)::

        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000, global_pool="avg")
        load_encoder_into_timm(mae, vit)

    Returns the ``load_state_dict`` result; raises ``ValueError`` if anything besides the
    classifier (``head``, ``fc_norm``) is left unloaded.
    """
    state_dict = model.state_dict() if isinstance(model, nn.Module) else model
    result = timm_model.load_state_dict(encoder_state_dict_for_timm(state_dict, timm_model), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("head.", "fc_norm."))]
    if missing:
        raise ValueError(f"the timm model has encoder weights the MAE state dict lacks: {missing}")
    return result


__all__ = [
    "MaskedAutoencoderViT",
    "PackedTokens",
    "encoder_state_dict_for_timm",
    "load_encoder_into_timm",
    "mae_vit_base_patch16",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_large_patch16",
    "mae_vit_large_patch16_dec512d8b",
]
