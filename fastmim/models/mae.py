"""MAE (He et al., 2021): a drop-in for the official ``models_mae.py`` with fastmim's fused ops.

:class:`MaskedAutoencoderViT` keeps the official constructor arguments and defaults, the
method names (``patchify``, ``unpatchify``, ``random_masking``, ``forward_encoder``,
``forward_decoder``, ``forward_loss``, ``forward``), ``forward(imgs, mask_ratio=0.75) ->
(loss, pred, mask)`` and the ``state_dict`` keys and shapes, so official checkpoints load
and official training scripts run unchanged. What it adds:

- ``fused=True`` (default): masking, the visible-token gather, the decoder's un-shuffle and
  the loss are fastmim ops (``random_masking``, ``gather_visible``, ``unshuffle``,
  ``masked_patch_mse``), attention goes to ``attn_backend``, and the blocks are
  :class:`~fastmim.models.vit.FusedBlock` (fused LayerNorm, residual add and bias + GELU,
  their outputs recomputed in backward instead of saved; where the fused ops have a kernel),
  chained by :func:`~fastmim.models.vit.run_blocks` so that every residual add runs inside a
  LayerNorm kernel. ``fused=False`` runs the
  official plain-PyTorch steps. Both compute the same function; with the same ``noise`` (or
  the same ``seed``) they give the same loss.
- ``forward(imgs, mask_ratio, seed=..., offset=...)``: masks from the counter-based RNG of
  ``fastmim.ops.random_masking`` (image ``b`` is sample ``offset + b`` of ``seed``), so a
  process holding images ``[offset, offset + B)`` of a global batch masks them as one process
  holding the whole batch would.
- ``pred_masked_only=True``: the decoder's output projection and the loss see the masked
  tokens only; ``pred`` is then ``(B, L - K, p*p*C)``, the masked patches in increasing
  patch index (``pred`` fills ``mask.bool()`` in order). Same loss.
- a per-sample mask ratio (a sequence of ``B`` floats): the encoder runs on packed
  variable-length sequences (``cu_seqlens``), no padding.
- ``encode(imgs)``: features of the unmasked image for k-NN / linear probing.
- ``reconstruct(imgs, pred, mask)``: the prediction as images in pixel space (norm-pix undone
  with each target patch's own mean and variance); ``unpatchify`` for any patch grid.
- :func:`load_encoder_into_timm`: the encoder into a timm ``VisionTransformer``; weights from
  and to transformers' ViTMAE and from timm ViTs in :mod:`fastmim.models.convert`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from fastmim.models.presets import ViTPreset, register_method
from fastmim.models.vit import (
    Block,
    FusedBlock,
    PatchEmbed,
    check_images,
    check_mask_ratio,
    check_patch_grid,
    get_2d_sincos_pos_embed,
    init_mae_weights,
    run_blocks,
)


class PackedTokens(NamedTuple):
    """Variable-length token sequences packed along one axis (the per-sample mask ratio path).

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


class _Masking(NamedTuple):
    ids_keep: torch.Tensor  # (B, K), or packed (T,) with cu_seqlens
    ids_restore: torch.Tensor  # (B, L)
    mask: torch.Tensor  # (B, L) float32, 1 = removed
    cu_seqlens: torch.Tensor | None  # (B + 1,) int32 cumulative keep counts: packed only
    num_visible: tuple[int, ...] | None  # per sample: packed only


def _num_visible(num_patches: int, mask_ratio: float) -> int:
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return keep


def _normalize_mask_ratio(mask_ratio: Any, batch: int) -> float | list[float]:
    """A float, or one float per sample (a sequence or a 1-D tensor, read on the host)."""
    if isinstance(mask_ratio, torch.Tensor):
        if mask_ratio.dim() == 0:
            return check_mask_ratio(float(mask_ratio))
        mask_ratio = mask_ratio.detach().cpu().tolist()
    if isinstance(mask_ratio, Sequence) and not isinstance(mask_ratio, str):
        if len(mask_ratio) != batch:
            raise ValueError(f"a per-sample mask_ratio must have one value per image ({batch}), got {len(mask_ratio)}")
        return [check_mask_ratio(r, "mask_ratio[i]") for r in mask_ratio]
    return check_mask_ratio(mask_ratio)


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT backbone (official MAE arguments, plus fastmim's options).

    Args (official): ``img_size, patch_size, in_chans, embed_dim, depth, num_heads,
    decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_layer,
    norm_pix_loss`` with the official defaults (ViT-L encoder, 512x8 decoder, ``nn.LayerNorm``
    with eps 1e-5: the factories pass eps 1e-6).

    Args (fastmim, keyword only): ``fused`` (fastmim ops vs the official plain steps),
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
                 drop_path_rate: float = 0.0, decoder_mlp_ratio: float | None = None):
        super().__init__()
        grid = check_patch_grid(img_size, patch_size)
        if not isinstance(patch_size, int):
            patch_size = patch_size[0]
        self.fused = fused
        self.pred_masked_only = pred_masked_only
        self.in_chans = in_chans
        block_backend = attn_backend if (attn_backend is not None or fused) else "sdpa"
        block_cls = FusedBlock if fused else Block  # same parameters, same function

        # ----- encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
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

    def _fused_op(self, name: str):
        """The fastmim op ``name`` when this model runs fused (``None``: take the plain step)."""
        if not self.fused:
            return None
        import fastmim.ops

        return getattr(fastmim.ops, name, None)

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
    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Official per-sample random masking by argsort of noise: ``(x_masked, mask, ids_restore)``.

        ``x``: ``(B, L, D)``; keeps ``K = int(L * (1 - mask_ratio))`` tokens per sample; ``mask``
        is 1 on removed patches. ``noise`` (``(B, L)``) replaces ``torch.rand`` when given.
        """
        n, length, d = x.shape
        len_keep = _num_visible(length, check_mask_ratio(mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def _masking(self, batch: int, device: torch.device, mask_ratio: float | list[float],
                 noise: torch.Tensor | None, seed: int | torch.Tensor | None = None,
                 offset: int | torch.Tensor | None = None) -> _Masking:
        """Keep indices, ``ids_restore`` and mask.

        ``noise`` given: ``argsort(noise)`` (the official rule, both paths). Otherwise the
        counter-based RNG of fastmim's ``random_masking`` with ``seed`` (default: drawn from the
        default torch generator) and ``offset`` (image ``b`` is sample ``offset + b``): the fused
        op, or, not fused with a ``seed``, its reference (the same bits). Not fused and no seed:
        the argsort of ``torch.rand`` noise (the official rule).
        """
        length = self.num_patches
        _check_masking_source(noise, seed, offset, self.fused)
        if noise is not None and tuple(noise.shape) != (batch, length):
            raise ValueError(f"noise must be (B, L) = {(batch, length)}, got {tuple(noise.shape)}")
        per_sample = not isinstance(mask_ratio, float)
        counts = [_num_visible(length, r) for r in mask_ratio] if per_sample else _num_visible(length, mask_ratio)
        offset = 0 if offset is None else offset
        random_masking = self._fused_op("random_masking")
        if noise is None and random_masking is not None:
            if per_sample:
                m = random_masking(batch, length, num_keep=counts, seed=seed, offset=offset, device=device)
                return _Masking(m.ids_keep, m.ids_restore, m.mask, m.cu_seqlens, tuple(counts))
            m = random_masking(batch, length, mask_ratio, seed=seed, offset=offset, device=device)
            return _Masking(m.ids_keep, m.ids_restore, m.mask, None, None)
        if noise is None and seed is not None:
            from fastmim.ops.masking import random_permutation_reference

            ids_shuffle, ids_restore = random_permutation_reference(batch, length, seed=seed, offset=offset,
                                                                    device=device)
        else:
            if noise is None:
                noise = torch.rand(batch, length, device=device)
            ids_shuffle = torch.argsort(noise, dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
        if not per_sample:
            mask = (ids_restore >= counts).to(torch.float32)
            return _Masking(ids_shuffle[:, :counts], ids_restore, mask, None, None)
        keep = torch.tensor(counts, device=device)
        mask = (ids_restore >= keep[:, None]).to(torch.float32)
        # Packed keep indices built from host-known counts: no device sync.
        rows = torch.cat([torch.arange(k) + b * length for b, k in enumerate(counts)]).to(device)
        cu_seqlens = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=device)
        return _Masking(ids_shuffle.reshape(-1)[rows], ids_restore, mask, cu_seqlens, tuple(counts))

    # ------------------------------------------------------------------ encoder
    def _check_inputs(self, imgs: torch.Tensor) -> None:
        check_images(imgs, self.in_chans, self.patch_embed.img_size, self.patch_size)

    def _run_blocks(self, x: torch.Tensor | PackedTokens, blocks: nn.ModuleList) -> torch.Tensor | PackedTokens:
        if isinstance(x, PackedTokens):
            return x._replace(tokens=run_blocks(blocks, x.tokens, cu_seqlens=x.cu_seqlens, max_seqlen=x.max_seqlen))
        return run_blocks(blocks, x)

    def _gather_visible(self, x: torch.Tensor, masking: _Masking) -> torch.Tensor:
        """``[cls + pos, visible tokens + pos]`` per sample: ``(B, K + 1, D)``, or packed ``(B + T, D)``."""
        gather_visible = self._fused_op("gather_visible")
        if gather_visible is not None:
            max_seqlen = None if masking.num_visible is None else max(masking.num_visible)
            return gather_visible(x, masking.ids_keep, self.pos_embed, cls_token=self.cls_token,
                                  cu_seqlens=masking.cu_seqlens, max_seqlen=max_seqlen)
        batch, length, dim = x.shape
        x = x + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).to(x.dtype)
        if masking.num_visible is None:
            x = torch.gather(x, 1, masking.ids_keep.unsqueeze(-1).expand(-1, -1, dim))
            return torch.cat((cls.expand(batch, -1, -1), x), dim=1)
        # Packed: sample b's rows are [cls, x[b, its kept ids]]; one index into the rows [cls; x].
        counts = torch.tensor(masking.num_visible)
        batch_of_row = torch.repeat_interleave(torch.arange(batch), counts).to(x.device)
        out_rows = torch.arange(batch_of_row.shape[0], device=x.device) + batch_of_row + 1  # after b + 1 cls rows
        src = torch.zeros(batch_of_row.shape[0] + batch, dtype=torch.long, device=x.device)
        src = src.index_put((out_rows,), masking.ids_keep + batch_of_row * length + 1)
        return torch.cat([cls.reshape(1, dim), x.reshape(batch * length, dim)]).index_select(0, src)

    def _encode_masked(self, imgs: torch.Tensor, mask_ratio: Any, noise: torch.Tensor | None,
                       seed: int | torch.Tensor | None = None, offset: int | torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor | PackedTokens, torch.Tensor, torch.Tensor]:
        """Encoder on the visible tokens, before the final norm: ``(x, mask, ids_restore)``."""
        self._check_inputs(imgs)
        mask_ratio = _normalize_mask_ratio(mask_ratio, imgs.shape[0])
        x = self.patch_embed(imgs)
        if isinstance(mask_ratio, float) and not self.fused and seed is None and offset is None:
            # The official steps, in the official order (the same RNG draws as models_mae.py).
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
            cls = self.cls_token + self.pos_embed[:, :1, :]
            x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
            return self._run_blocks(x, self.blocks), mask, ids_restore
        masking = self._masking(imgs.shape[0], imgs.device, mask_ratio, noise, seed, offset)
        x = self._gather_visible(x, masking)
        if masking.num_visible is not None:
            with_cls = masking.cu_seqlens + torch.arange(imgs.shape[0] + 1, device=imgs.device, dtype=torch.int32)
            x = PackedTokens(x, with_cls, max(masking.num_visible) + 1, masking.cu_seqlens, masking.num_visible)
        return self._run_blocks(x, self.blocks), masking.mask, masking.ids_restore

    def _apply_norm(self, x: torch.Tensor | PackedTokens, norm: nn.Module) -> torch.Tensor | PackedTokens:
        return x._replace(tokens=norm(x.tokens)) if isinstance(x, PackedTokens) else norm(x)

    def forward_encoder(self, x: torch.Tensor, mask_ratio: Any, noise: torch.Tensor | None = None, *,
                        seed: int | torch.Tensor | None = None, offset: int | torch.Tensor | None = None):
        """``imgs -> (latent, mask, ids_restore)``; ``latent`` is ``(B, K + 1, D)`` after the final norm.

        With a per-sample ``mask_ratio`` the latent is a :class:`PackedTokens`. ``noise`` or
        ``seed`` / ``offset`` choose the masks (see :meth:`forward`).
        """
        latent, mask, ids_restore = self._encode_masked(x, mask_ratio, noise, seed, offset)
        return self._apply_norm(latent, self.norm), mask, ids_restore

    # ------------------------------------------------------------------ decoder
    def _decoder_input(self, x: torch.Tensor | PackedTokens, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decoder tokens ``(B, L + 1, Dd)``: visible tokens back in place, mask tokens elsewhere, + pos embed."""
        packed = isinstance(x, PackedTokens)
        tokens = self.decoder_embed(x.tokens if packed else x)
        unshuffle = self._fused_op("unshuffle")
        if unshuffle is not None:
            return unshuffle(tokens, ids_restore, self.mask_token, self.decoder_pos_embed, has_cls=True,
                             cu_seqlens=x.visible_cu_seqlens if packed else None)
        if packed:  # scatter each sample's [cls, visible] rows into a (B, L + 1) shuffled sequence first
            batch, length = ids_restore.shape
            dim = tokens.shape[-1]
            rows = torch.cat([torch.arange(k + 1) + b * (length + 1) for b, k in enumerate(x.num_visible)])
            filler = self.mask_token.reshape(1, dim).to(tokens.dtype).expand(batch * (length + 1), dim)
            full = filler.index_copy(0, rows.to(tokens.device), tokens).reshape(batch, length + 1, dim)
            body = torch.gather(full[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
            return torch.cat([full[:, :1], body], dim=1) + self.decoder_pos_embed
        x = tokens
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        return x + self.decoder_pos_embed

    def forward_decoder(self, x: torch.Tensor | PackedTokens, ids_restore: torch.Tensor,
                        ids_masked: torch.Tensor | None = None) -> torch.Tensor:
        """``latent -> pred`` ``(B, L, p*p*C)``.

        With ``ids_masked`` (see :meth:`masked_ids`; ``forward`` passes it when
        ``pred_masked_only``) only those tokens reach ``decoder_pred``: ``(B, L - K, p*p*C)``, or
        ``(total masked, p*p*C)`` for a packed latent, in ``mask.bool()`` order.
        """
        tokens = self._decoder_input(x, ids_restore)
        tokens = self._run_blocks(tokens, self.decoder_blocks)
        tokens = self.decoder_norm(tokens)[:, 1:, :]
        if ids_masked is not None:
            tokens = _take_rows(tokens, ids_masked)
        return self.decoder_pred(tokens)

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
        """Mean squared error on the removed patches (normalised per patch when ``norm_pix_loss``).

        ``pred``: ``(B, L, p*p*C)``, or the rows at ``ids_masked`` only (``pred_masked_only``;
        when ``ids_masked`` is not given it is recomputed from ``mask``).
        """
        if ids_masked is None and not (pred.dim() == 3 and pred.shape[1] == mask.shape[1]):
            ids_masked = self.masked_ids(mask, mask.shape[1] - pred.shape[1] if pred.dim() == 3 else None)
        masked_patch_mse = self._fused_op("masked_patch_mse")
        if masked_patch_mse is not None:
            return masked_patch_mse(pred, imgs, None if ids_masked is not None else mask, patch_size=self.patch_size,
                                    norm_pix=self.norm_pix_loss, ids_masked=ids_masked)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6)**.5
        # Nothing masked (mask_ratio=0) gives loss 0 and zero gradients, as the fused op, where the
        # official code divides 0 by 0 (NaN).
        if ids_masked is not None:  # every row of pred is a masked patch
            loss = (pred - _take_rows(target, ids_masked)) ** 2
            return loss.sum() / max(loss.numel(), 1)
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)
        return _masked_mean(loss, mask)

    def forward(self, imgs: torch.Tensor, mask_ratio: Any = 0.75, noise: torch.Tensor | None = None, *,
                seed: int | torch.Tensor | None = None, offset: int | torch.Tensor | None = None):
        """``(loss, pred, mask)`` as in the official model.

        ``mask_ratio``: a float in [0, 1), or one per image (packed encoder). The masks, for
        reproducible ones across models (give ``noise`` or ``seed`` / ``offset``, not both):

        - ``noise`` (``(B, L)``): the official rule, the argsort of the noise;
        - ``seed`` (an int in ``[0, 2**63)`` or an int64 scalar tensor; no device sync either way)
          and ``offset`` (default 0): fastmim's counter-based ``random_masking``, image ``b``
          masked as sample ``offset + b`` of ``seed``; the same masks fused or not;
        - neither: fused, ``random_masking`` seeded from the default torch generator; not fused,
          the official ``torch.rand`` draw.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise, seed=seed, offset=offset)
        ids_masked = self.masked_ids(mask, _visible_counts(latent)) if self.pred_masked_only else None
        pred = self.forward_decoder(latent, ids_restore, ids_masked)
        loss = self.forward_loss(imgs, pred, mask, ids_masked)
        return loss, pred, mask

    # ------------------------------------------------------------------ evaluation
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """All tokens of the unmasked image after the final norm: ``(B, L + 1, D)``."""
        self._check_inputs(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self._run_blocks(torch.cat((cls, x), dim=1), self.blocks)
        return self.norm(x)

    def encode(self, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """``(B, D)`` features of the unmasked image for k-NN / linear probing: the cls token after
        the final norm (``pool="cls"``) or the mean of the normalised patch tokens (``"mean"`` or ``"avg"``)."""
        if pool not in ("cls", "mean", "avg"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'avg', got {pool!r}")
        x = self.forward_features(imgs)
        return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)


def _check_masking_source(noise: torch.Tensor | None, seed: Any, offset: Any, fused: bool) -> None:
    """``noise`` excludes ``seed`` / ``offset``; an ``offset`` numbers the samples of the counter-based
    RNG, which the unfused model uses only with a ``seed`` (its official draw has no offset)."""
    if noise is not None and (seed is not None or offset is not None):
        raise ValueError("give noise or seed / offset, not both")
    if offset is not None and seed is None and not fused:
        raise ValueError("offset needs a seed when fused=False (the official torch.rand masking has no sample offset)")


def _masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(per_patch * mask) / sum(mask)``, and 0 (zero gradients) when the mask is all zero, as
    :func:`fastmim.ops.masked_patch_mse`: the official ``/ mask.sum()`` gives NaN there."""
    total = mask.sum()
    return (per_patch * mask).sum() / torch.where(total == 0, torch.ones_like(total), total)


def _take_rows(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``t[b, ids[b, k]]`` for ``(B, K)`` ids, or ``t.flatten(0, 1)[ids]`` for packed ``(T,)`` ids."""
    if ids.dim() == 2:
        return torch.gather(t, 1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    return t.reshape(-1, t.shape[-1]).index_select(0, ids)


def _visible_counts(latent: torch.Tensor | PackedTokens) -> int | list[int]:
    """Visible patches per sample, from the latent's shape (dense) or its host-side lengths (packed)."""
    if isinstance(latent, PackedTokens):
        return list(latent.num_visible)
    return latent.shape[1] - 1


# ---------------------------------------------------------------------------------- factories

_ln = partial(nn.LayerNorm, eps=1e-6)


def mae_vit_base_patch16_dec512d8b(**kwargs: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_ln, **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_ln, **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512,
                                decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_ln, **kwargs)


mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b


@register_method("mae")
def _build_mae(size: ViTPreset, /, **overrides: Any) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**size.mae_kwargs(), "norm_layer": _ln, **overrides})


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
