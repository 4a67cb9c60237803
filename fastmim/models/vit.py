"""ViT building blocks shared by every fastmim model.

timm's ``PatchEmbed``, ``Block`` and ``Mlp`` with timm's ``Attention`` swapped for
:class:`Attention`, which sends ``q, k, v`` to the attention backend chosen per call
(fastmim's ``visible_attention``, PyTorch SDPA, xformers, or the plain math path). The
parameter names are timm's (``attn.qkv``, ``attn.proj``, ``mlp.fc1`` ...), so state dicts
of the official MAE code and of timm's ``VisionTransformer`` load unchanged.

A block runs on a dense batch ``(B, N, C)`` or on packed variable-length sequences
``(total, C)`` with ``cu_seqlens`` (``(S + 1,)`` int32 offsets) and a static ``max_seqlen``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import Mlp, PatchEmbed  # noqa: F401  (re-exported: the models build on them)
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

import fastmim.ops as ops
from fastmim.ops._dispatch import forced_backend, select_backend
from fastmim.ops.attention_router import ATTN_BACKENDS, attention_qkvpacked
from fastmim.ops.fused_block import linear_add, norm_linear, norm_mlp_add
from fastmim.ops.norm_act import add_layer_norm_linear, bias_gelu_linear

# --------------------------------------------------------------------------------------------
# The ops a model calls, its LayerNorm
# --------------------------------------------------------------------------------------------

#: timm's and MAE's ViT LayerNorm (eps 1e-6; ``nn.LayerNorm``'s default is 1e-5).
vit_layer_norm = partial(nn.LayerNorm, eps=1e-6)


class ModelOps:
    """The token ops a model calls: fastmim's fused ops (``fused=True``) or their plain-PyTorch
    references (``fused=False``), which define the same results, with the same arguments. Looked
    up in :mod:`fastmim.ops` at each call. The masks are chosen in :mod:`fastmim.models.masking`."""

    def __init__(self, fused: bool):
        self.fused = fused

    @property
    def gather_visible(self):
        return ops.gather_visible if self.fused else ops.gather_visible_reference

    @property
    def unshuffle(self):
        return ops.unshuffle if self.fused else ops.unshuffle_reference

    @property
    def masked_patch_mse(self):
        return ops.masked_patch_mse if self.fused else ops.masked_patch_mse_reference


# --------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embeddings (MAE's util/pos_embed.py, computed in float64)
# --------------------------------------------------------------------------------------------

def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``(M, embed_dim)``: ``[sin(pos * w_d), cos(pos * w_d)]`` with ``w_d = 10000^(-2d / embed_dim)``."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even for a sin-cos embedding, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | Sequence[int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, ``(gh * gw [+ 1], embed_dim)`` float32, row-major over the grid.

    Same values as the official MAE ``get_2d_sincos_pos_embed``: the first half of the
    channels encodes the column index, the second half the row index (MAE builds the grid
    with ``np.meshgrid(grid_w, grid_h)``, so its "h" half is the column); a zero row first
    when ``cls_token``.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    rows = torch.arange(gh, dtype=torch.float64)[:, None].expand(gh, gw)
    cols = torch.arange(gw, dtype=torch.float64)[None, :].expand(gh, gw)
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)],
                    dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------------------------
# Attention with a selectable backend
# --------------------------------------------------------------------------------------------

def _check_backend(backend: str | None) -> str | None:
    if backend is not None and backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS} or None, got {backend!r}")
    return backend


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter layout (``qkv``, ``proj``) and a backend switch.

    ``attn_backend`` is read at every call, so it can be changed on a built model
    (see :func:`set_attn_backend`).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_backend: str | None = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_backend = _check_backend(attn_backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                ) -> torch.Tensor:
        return self.attend(self.qkv(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def attend(self, qkv: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
               ) -> torch.Tensor:
        """Attention and ``proj`` from the ``qkv`` projection ``(B, N, 3C)`` (packed: ``(total, 3C)``).

        The projection's output goes to the backend packed, ``(B, N, 3, H, D)``: fastmim's kernels
        read q, k, v from it in place and write the output token-major, so neither the reshape
        before ``proj`` nor the gradient of ``qkv`` needs a copy."""
        lead = qkv.shape[:-1]  # (B, N), or (total,) packed
        packed = qkv.reshape(*lead, 3, self.num_heads, self.head_dim)
        out = attention_qkvpacked(packed, backend=self.attn_backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.proj(out.reshape(*lead, qkv.shape[-1] // 3))


class Block(TimmBlock):
    """timm's pre-norm ViT block with :class:`Attention` in place of timm's; also runs packed sequences."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: type[nn.Module] = nn.LayerNorm, drop_path: float = 0.0, attn_backend: str | None = None):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer,
                         drop_path=drop_path)
        # Replaced rather than passed as timm's attn_layer: that argument only exists in recent timm.
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_backend=attn_backend)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class FusedBlock(Block):
    """:class:`Block` whose memory-bound steps run fused into its GEMMs (fastmim's ``fused_block`` ops).

    Same parameters and names as timm's block (``norm1``, ``attn``, ``norm2``, ``mlp.fc1``,
    ``mlp.fc2``: the state dict does not change) and the same function. The residual stream travels
    with its per-row statistics (:meth:`forward_stream`)::

        x, qkv = norm_linear(x, stats, norm1, attn.qkv)        # LayerNorm in the qkv GEMM's prologue
        s, stats = linear_add(attention(qkv), attn.proj, x)     # bias, residual add, row statistics: epilogue
        return norm_mlp_add(s, stats, norm2, mlp.fc1, mlp.fc2)  # fc1: LN prologue, bias + GELU epilogue;
                                                                # fc2: bias, residual, statistics epilogue

    No LayerNorm, GELU, bias or residual-add kernel is left in the forward pass, and in the backward
    pass only the LayerNorm row kernels (GELU's derivative, the activation and LayerNorm outputs, and the
    bias and LayerNorm parameter reductions all run inside the GEMMs: see ``fastmim.ops.fused_block``).
    Each block saves for backward the residual stream, the row ``mean``/``rstd``, fc1's pre-activation
    and the attention's own tensors. :func:`run_blocks` passes ``(x, stats)`` from block to block.

    A block with LayerScale or an active drop-path runs the earlier fusion (:meth:`forward_residual`:
    LayerNorm kernels with the residual add inside, cuBLAS GEMMs); a block whose norms are not affine
    ``nn.LayerNorm``, whose activation is not the exact ``nn.GELU``, or whose attention or MLP has other
    layers runs the unfused steps (timm's), and so does every block on a device where the fused ops have
    no kernel (CPU, unless Triton's interpreter runs them): see :meth:`fusable` and :meth:`stream_fusable`.
    """

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether the fused steps run for ``x``: the block has the layers they replace, and the fused
        ops have kernels on ``x``'s device (Triton: CUDA, or CPU under the interpreter; or meta, whose
        shape-only runs model a GPU step). Elsewhere their reference path would only add the backward
        pass's recomputation to timm's steps: on CPU that measured slower than the plain block."""
        if torch.compiler.is_compiling():  # the full backend choice is not traceable: CUDA defaults to Triton
            if x.device.type not in ("cuda", "meta") and forced_backend() != "triton":
                return False
        elif x.device.type != "meta" and select_backend("layer_norm", x.device) != "triton":
            return False
        mlp = self.mlp
        norms_ok = all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None
                       and len(n.normalized_shape) == 1 for n in (self.norm1, self.norm2))
        act_ok = isinstance(getattr(mlp, "act", None), nn.GELU) and mlp.act.approximate == "none"
        mlp_ok = (isinstance(getattr(mlp, "fc1", None), nn.Linear) and mlp.fc1.bias is not None
                  and isinstance(getattr(mlp, "norm", None), nn.Identity)
                  and not (self.training and getattr(mlp.drop1, "p", 0.0) > 0))
        return norms_ok and act_ok and mlp_ok and isinstance(self.attn, Attention)

    def stream_fusable(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_stream` runs for ``x``: :meth:`fusable`, and nothing sits between the
        GEMMs and the residual adds (no LayerScale, no active drop-path or dropout after fc2)."""
        if not self.fusable(x):
            return False

        def inactive(m: nn.Module) -> bool:
            return isinstance(m, nn.Identity) or not self.training or float(
                getattr(m, "p", getattr(m, "drop_prob", 1.0)) or 0.0) == 0.0

        return (isinstance(self.ls1, nn.Identity) and isinstance(self.ls2, nn.Identity)
                and all(inactive(m) for m in (self.drop_path1, self.drop_path2, self.mlp.drop2))
                and isinstance(self.attn.proj, nn.Linear) and isinstance(self.mlp.fc2, nn.Linear))

    def forward_stream(self, x: torch.Tensor, stats: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on ``x`` with its row statistics ``stats`` (``None``: computed); returns the output
        and its row statistics. Needs :meth:`stream_fusable` (it runs the fused ops on any backend)."""
        norm1, norm2, attn, mlp = self.norm1, self.norm2, self.attn, self.mlp
        x, qkv = norm_linear(x, stats, norm1.weight, norm1.bias, norm1.eps, attn.qkv.weight, attn.qkv.bias)
        lead = qkv.shape[:-1]
        packed = qkv.reshape(*lead, 3, attn.num_heads, attn.head_dim)
        out = attention_qkvpacked(packed, backend=attn.attn_backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        s, stats = linear_add(out.reshape(*lead, qkv.shape[-1] // 3), attn.proj.weight, attn.proj.bias, x)
        return norm_mlp_add(s, stats, norm2.weight, norm2.bias, norm2.eps, mlp.fc1.weight, mlp.fc1.bias,
                            mlp.fc2.weight, mlp.fc2.bias)

    def forward_residual(self, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                         cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on ``x = hidden + residual`` (``residual=None``: ``x = hidden``); returns the
        output as ``(hidden, residual)`` terms. Needs :meth:`fusable` (it runs the fused ops on any backend)."""
        norm1, norm2, attn, mlp = self.norm1, self.norm2, self.attn, self.mlp
        x, qkv = add_layer_norm_linear(hidden, residual, norm1.weight, norm1.bias, norm1.eps, attn.qkv.weight,
                                       attn.qkv.bias)
        branch = self.drop_path1(self.ls1(attn.attend(qkv, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)))
        x, h = add_layer_norm_linear(x, branch, norm2.weight, norm2.bias, norm2.eps, mlp.fc1.weight)
        h = mlp.drop2(bias_gelu_linear(h, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias))
        return self.drop_path2(self.ls2(h)), x

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                ) -> torch.Tensor:
        if self.stream_fusable(x):
            return self.forward_stream(x, None, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)[0]
        if not self.fusable(x):
            return super().forward(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        hidden, residual = self.forward_residual(x, None, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return residual + hidden


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
               max_seqlen: int | None = None) -> torch.Tensor:
    """``x`` through ``blocks`` in order: the same result as calling each block in turn.

    Runs of :class:`FusedBlock` on the fused-GEMM path (:meth:`FusedBlock.stream_fusable`) pass the
    residual stream with its row statistics, which each block's last GEMM computes for the next block's
    first LayerNorm; blocks on the earlier fusion (:meth:`FusedBlock.forward_residual`) pass it as two
    terms whose add happens inside the next LayerNorm kernel (one add joins them at the end of a run)."""
    hidden, residual, stats = x, None, None
    for blk in blocks:
        if isinstance(blk, FusedBlock) and blk.stream_fusable(hidden):
            if residual is not None:
                hidden, residual, stats = residual + hidden, None, None
            hidden, stats = blk.forward_stream(hidden, stats, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            continue
        stats = None
        if isinstance(blk, FusedBlock) and blk.fusable(hidden):
            hidden, residual = blk.forward_residual(hidden, residual, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            continue
        if residual is not None:
            hidden, residual = residual + hidden, None
        hidden = blk(hidden, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return hidden if residual is None else residual + hidden


def patch_features(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """``(B, L, D)``: the last block's patch tokens of the unmasked images, before the final norm.

    Works for any fastmim MAE-family model (``patch_embed``, ``cls_token``, ``pos_embed``,
    ``blocks``), at any image size that is a multiple of the patch size (:func:`resize_pos_embed`).
    ContrastiveCrop's heat maps are their channel sums: after the final LayerNorm
    each token's channel sum is ``sum(beta) + sum(gamma * x_hat)`` with ``sum(x_hat) = 0``,
    nearly the same constant for every token, a flat map."""
    pos_embed = resize_pos_embed(model.pos_embed, image_grid(imgs, model.patch_embed.patch_size[0]),
                                 model.patch_embed.grid_size)
    x = model.patch_embed(imgs) + pos_embed[:, 1:, :]
    cls = (model.cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    return run_blocks(model.blocks, x)[:, 1:, :]


def set_drop_path(blocks: Sequence[nn.Module], rate: float) -> None:
    """Stochastic depth on built blocks: block ``i`` of ``n`` drops its branches with probability
    ``rate * i / (n - 1)`` (timm's and MAE's ``linspace(0, rate, depth)`` rule; ``rate=0`` removes it)."""
    from timm.layers import DropPath

    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
    n = len(blocks)
    for i, blk in enumerate(blocks):
        p = rate * i / max(n - 1, 1)
        blk.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        blk.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


def set_attn_backend(module: nn.Module, backend: str | None) -> None:
    """Set the attention backend of every :class:`Attention` inside ``module``."""
    _check_backend(backend)
    for m in module.modules():
        if isinstance(m, Attention):
            m.attn_backend = backend


# --------------------------------------------------------------------------------------------
# Shared checks and init
# --------------------------------------------------------------------------------------------

def to_2tuple(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value


def check_patch_grid(img_size: int | Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, int]:
    """Grid ``(H / p, W / p)``; ``ValueError`` when the image size is not a multiple of the patch size."""
    h, w = to_2tuple(img_size, "img_size")
    ph, pw = to_2tuple(patch_size, "patch_size")
    if ph != pw:
        raise ValueError(f"patch_size must be square, got {(ph, pw)}")
    if h <= 0 or w <= 0 or h % ph != 0 or w % pw != 0:
        raise ValueError(f"img_size {(h, w)} is not divisible by patch_size {ph}: "
                         "the image height and width must be positive multiples of the patch size")
    return h // ph, w // pw


def check_images(imgs: torch.Tensor, in_chans: int, patch_size: int) -> tuple[int, int]:
    """The patch grid of ``imgs``; ``ValueError`` unless they are ``(B, in_chans, H, W)`` with ``H`` and
    ``W`` multiples of the patch size (any size: the models resample their position embeddings)."""
    if not isinstance(imgs, torch.Tensor):
        raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
    if imgs.dim() != 4 or imgs.shape[0] == 0:
        raise ValueError(f"imgs must be (B, C, H, W) with B >= 1, got shape {tuple(imgs.shape)}")
    h, w = imgs.shape[-2:]
    if h % patch_size != 0 or w % patch_size != 0:
        raise ValueError(f"image size {(h, w)} is not divisible by the patch size {patch_size}")
    if imgs.shape[1] != in_chans:
        raise ValueError(f"imgs must be (B, {in_chans}, H, W) for this model (in_chans={in_chans}), "
                         f"got {tuple(imgs.shape)}")
    if not imgs.is_floating_point():
        raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype}")
    return h // patch_size, w // patch_size


def check_two_views(imgs1: torch.Tensor, imgs2: torch.Tensor, in_chans: int, patch_size: int) -> tuple[int, int]:
    """The patch grid of two views of the same images (as :func:`check_images`, each error naming
    the view, ``imgs1`` or ``imgs2``); ``ValueError`` unless the two have the same shape."""
    grids = []
    for name, imgs in (("imgs1", imgs1), ("imgs2", imgs2)):
        try:
            grids.append(check_images(imgs, in_chans, patch_size))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from None
    if imgs1.shape != imgs2.shape:
        raise ValueError(f"the two views must have the same shape, got {tuple(imgs1.shape)} and "
                         f"{tuple(imgs2.shape)}")
    return grids[0]


def image_grid(imgs: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """``(H / p, W / p)``: the patch grid of ``(B, C, H, W)`` images."""
    return imgs.shape[-2] // patch_size, imgs.shape[-1] // patch_size


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int], base_grid: tuple[int, int],
                     ) -> torch.Tensor:
    """``pos_embed`` ``(1, 1 + gh * gw, D)`` (cls slot first), built for a ``base_grid`` of patches,
    for images of a ``grid_size`` grid: itself when the grids agree, else its patch rows resampled
    by bicubic interpolation (square or not; fixed sin-cos or learned alike), the cls slot kept.
    timm's ``resample_abs_pos_embed``, as :func:`~fastmim.models.load_encoder_into_timm` resamples
    for a timm ViT of another size, so both give the same features."""
    if tuple(grid_size) == tuple(base_grid):
        return pos_embed
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, new_size=list(grid_size), old_size=list(base_grid), num_prefix_tokens=1)


def init_mae_weights(module: nn.Module) -> None:
    """MAE's ``_init_weights``: linears xavier-uniform with zero bias, LayerNorm weight 1 bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm):
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
        if module.weight is not None:
            nn.init.constant_(module.weight, 1.0)
