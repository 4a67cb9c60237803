"""Where a model's masks come from: one choice and one keep count for every method.

``mask_ratio`` goes from ``fastmim train --mask-ratio`` (checked there by
:func:`fastmim.ops.check_mask_ratio`, the one check of a ratio) through the model's ``forward``
to :func:`make_masks`, which turns it into a keep count (:func:`keep_count`: the official
``int(L * (1 - mask_ratio))``, at least one patch) and asks a generator for the masks; the
``"random"`` generator is the fused op :func:`fastmim.ops.random_masking` and its kernel.

Sources, in the order :func:`make_masks` looks at them:

- ``mask``: a ``(B, L)`` mask given by the caller (1 = removed, the official convention;
  samples may remove different numbers of patches, which the models run packed);
- ``noise``: a ``(B, L)`` noise, masked by the official rule (``argsort(noise)``, keep the first);
- the model's generator (its ``masking`` argument), by name or as a callable:

  - ``"random"`` (default): :func:`fastmim.ops.random_masking`, the counter-based RNG (image
    ``b`` is sample ``offset + b`` of ``seed``), the same masks on every backend;
  - ``"official"``: ``torch.rand`` noise and ``argsort``, the official ``models_mae.py`` draw:
    for the same ``torch.manual_seed`` the masks are those of an official run, bit for bit,
    fused or not (no ``seed`` / ``offset``: it draws from torch's generator);
  - ``"block"``: BEiT's block-wise masking, rectangles of random area and aspect ratio until the
    ratio is reached (then the patches of lowest random rank), from the counter-based RNG;
  - ``"grid"``: one visible patch per 2x2 cell (MAE's grid-wise sampling, mask ratio 0.75),
    its place in the cell drawn per sample from the counter-based RNG;
  - a name given to :func:`register_mask_generator`, or any callable taking a
    :class:`MaskRequest`.

Per-sample ratios (a sequence of ``B`` ratios) work with every generator that honours
:attr:`MaskRequest.num_keep` per sample (all the built-in ones). ``"block"`` and ``"grid"`` are
plain PyTorch and Python on the host (no kernel): deterministic and device-independent, the
same masks on every backend, but not traceable by ``torch.compile(fullgraph=True)``, and a
``seed`` tensor on an accelerator is read back (a device sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

import fastmim.ops as ops
from fastmim.ops.masking import (
    Masking,
    PackedMasking,
    check_mask_ratio,
    masking_from_mask,
    masking_from_permutation,
    masking_noise_reference,
    num_keep_from_ratio,
    seed_tensor,
)

__all__ = ["MaskRequest", "Masks", "keep_count", "list_mask_generators", "make_masks", "make_permutation",
           "mask_ratios", "register_mask_generator"]


@dataclass(frozen=True)
class MaskRequest:
    """What a mask generator is asked for: ``batch`` masks of a ``grid_size`` patch grid with
    ``mask_ratio`` (a float, or one per sample), i.e. keeping ``num_keep`` patches each (its
    :func:`keep_count`: one int, or one per sample), from ``seed`` (``None``: draw one from torch's
    default generator, as :func:`fastmim.ops.random_masking` does) with image ``b`` as sample
    ``offset + b``, on ``device``. ``reference``: the model runs its plain-PyTorch path
    (``fused=False``), so a generator with a fused op takes its reference instead."""

    batch: int
    grid_size: tuple[int, int]
    mask_ratio: float | tuple[float, ...]
    num_keep: int | tuple[int, ...]
    seed: int | Tensor | None
    offset: int | Tensor
    device: torch.device
    reference: bool = False

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def keep_counts(self) -> list[int]:
        """The keep count of every sample."""
        return [self.num_keep] * self.batch if isinstance(self.num_keep, int) else list(self.num_keep)


#: A generator returns a :class:`~fastmim.ops.Masking` / :class:`~fastmim.ops.PackedMasking` or a
#: ``(B, L)`` mask (1 = removed).
MaskGenerator = Callable[[MaskRequest], Masking | PackedMasking | Tensor]


class Masks(NamedTuple):
    """The masks a model runs with (what :func:`make_masks` returns)."""

    ids_keep: Tensor  #: (B, K) kept patch indices, or packed (T,) with cu_seqlens
    ids_restore: Tensor  #: (B, L) rank of each patch: visible ones first
    mask: Tensor  #: (B, L) float32, 1 = removed
    cu_seqlens: Tensor | None  #: (B + 1,) int32 cumulative keep counts when the counts differ
    num_visible: int | tuple[int, ...]  #: K, or the per-sample counts (host ints) when packed

    @property
    def max_seqlen(self) -> int | None:
        return None if self.cu_seqlens is None else max(self.num_visible, default=0)


# ============================================================================ keep counts


def mask_ratios(mask_ratio: Any, batch: int) -> float | list[float]:
    """A mask ratio, or one per sample (a sequence or a 1-D tensor, read on the host), each checked."""
    if isinstance(mask_ratio, Tensor):
        if mask_ratio.dim() == 0:
            return check_mask_ratio(float(mask_ratio))
        mask_ratio = mask_ratio.detach().cpu().tolist()
    if isinstance(mask_ratio, Sequence) and not isinstance(mask_ratio, str):
        if len(mask_ratio) != batch:
            raise ValueError(f"a per-sample mask_ratio must have one value per image ({batch}), got {len(mask_ratio)}")
        return [check_mask_ratio(r, "mask_ratio[i]") for r in mask_ratio]
    return check_mask_ratio(mask_ratio)


def keep_count(num_patches: int, mask_ratio: float) -> int:
    """The visible patches of a sample, ``int(L * (1 - mask_ratio))`` (the official ``len_keep``):
    at least one, since the encoder needs a patch to see."""
    keep = num_keep_from_ratio(num_patches, mask_ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return keep


# ============================================================================ generators

_GENERATORS: dict[str, MaskGenerator] = {}


def register_mask_generator(name: str, generator: MaskGenerator, *, overwrite: bool = False) -> MaskGenerator:
    """Make ``generator`` a model's ``masking=name`` (and ``fastmim train --mask-type name``)."""
    if name in _GENERATORS and not overwrite:
        raise ValueError(f"a mask generator {name!r} is already registered (pass overwrite=True)")
    _GENERATORS[name] = generator
    return generator


def list_mask_generators() -> list[str]:
    return sorted(_GENERATORS)


def mask_generator(masking: str | MaskGenerator) -> MaskGenerator:
    """The generator a model's ``masking`` argument names (or is)."""
    if callable(masking):
        return masking
    if masking not in _GENERATORS:
        raise ValueError(f"masking must be one of {list_mask_generators()} or a callable, got {masking!r}")
    return _GENERATORS[masking]


def _random(request: MaskRequest) -> Masking | PackedMasking:
    random_masking = ops.random_masking_reference if request.reference else ops.random_masking
    if isinstance(request.num_keep, tuple):
        return random_masking(request.batch, request.num_patches, num_keep=list(request.num_keep), seed=request.seed,
                              offset=request.offset, device=request.device)
    return random_masking(request.batch, request.num_patches, request.mask_ratio, seed=request.seed,
                          offset=request.offset, device=request.device)


def _official_permutation(batch: int, num_patches: int, device: torch.device,
                          noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``models_mae.random_masking``'s ``ids_shuffle, ids_restore``: argsort of ``noise`` (default
    ``torch.rand(B, L)`` from torch's generator, the official draw)."""
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    return ids_shuffle, torch.argsort(ids_shuffle, dim=1)


def _official(request: MaskRequest) -> Masking | PackedMasking:
    ids_shuffle, ids_restore = _official_permutation(request.batch, request.num_patches, request.device)
    return masking_from_permutation(ids_shuffle, ids_restore, request.num_keep)


def _host_words(request: MaskRequest, count: int) -> list[list[int]]:
    """``count`` 32-bit words per sample from the counter-based RNG (words of sample ``offset + b``
    of the seed, as :func:`fastmim.ops.masking.masking_noise_reference` numbers them)."""
    seed = seed_tensor(request.seed).cpu()
    offset = request.offset.cpu() if isinstance(request.offset, Tensor) else request.offset
    return masking_noise_reference(seed, request.batch, count, offset=offset).tolist()


# BEiT's MaskingGenerator (its defaults at 14 x 14 patches): rectangles of at least 16/196 of the
# patches, aspect ratio log-uniform in [0.3, 1/0.3], 10 tries per rectangle.
_BLOCK_MIN_FRACTION = 16 / 196
_BLOCK_ASPECT = (math.log(0.3), math.log(1 / 0.3))
_BLOCK_TRIES = 10
_BLOCK_MAX_TRIES = 100  # per sample; the patches still missing then are those of lowest rank
_WORD = 2.0**-32


def _block_mask(words: list[int], height: int, width: int, num_masked: int) -> list[int]:
    """One sample's block-wise mask as row bitmasks (bit ``j`` of row ``i``: patch ``(i, j)`` removed).

    Words ``0..L-1`` rank the patches (the fill order); from word ``L`` on, four per try: area,
    aspect ratio, top, left."""
    rows, masked, tries = [0] * height, 0, 0
    min_area = max(1, round(_BLOCK_MIN_FRACTION * height * width))
    draws = iter(words[height * width:])
    while masked < num_masked and tries < _BLOCK_MAX_TRIES:
        budget = num_masked - masked
        added = 0
        for _ in range(min(_BLOCK_TRIES, _BLOCK_MAX_TRIES - tries)):
            tries += 1
            u_area, u_aspect, u_top, u_left = (next(draws) * _WORD for _ in range(4))
            area = min_area + u_area * (budget - min_area)  # BEiT's uniform(min_num_patches, budget)
            aspect = math.exp(_BLOCK_ASPECT[0] + u_aspect * (_BLOCK_ASPECT[1] - _BLOCK_ASPECT[0]))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (1 <= h < height and 1 <= w < width):  # BEiT's bounds
                continue
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            span = ((1 << w) - 1) << left
            new = sum(w - (rows[i] & span).bit_count() for i in range(top, top + h))
            if 0 < new <= budget:
                for i in range(top, top + h):
                    rows[i] |= span
                added = new
                break
        if added == 0:
            break
        masked += added
    if masked < num_masked:  # what the rectangles left: the unmasked patches of lowest random rank
        free = sorted((words[i * width + j], i * width + j) for i in range(height) for j in range(width)
                      if not rows[i] >> j & 1)
        for _, patch in free[:num_masked - masked]:
            rows[patch // width] |= 1 << (patch % width)
    return rows


def _block(request: MaskRequest) -> Tensor:
    height, width = request.grid_size
    counts = request.keep_counts()
    words = _host_words(request, request.num_patches + 4 * _BLOCK_MAX_TRIES)
    rows = [_block_mask(w, height, width, request.num_patches - k) for w, k in zip(words, counts, strict=True)]
    bits = torch.tensor(rows, dtype=torch.int64).reshape(request.batch, height, 1)
    mask = (bits >> torch.arange(width)) & 1
    return mask.reshape(request.batch, request.num_patches).to(request.device, torch.float32)


def _grid(request: MaskRequest) -> Tensor:
    height, width = request.grid_size
    if height % 2 or width % 2 or any(k != request.num_patches // 4 for k in request.keep_counts()):
        raise ValueError(f"grid masking keeps one patch of every 2x2 cell: it needs an even patch grid and "
                         f"mask_ratio 0.75, got a {height}x{width} grid keeping {request.num_keep}")
    corner = torch.tensor([w[0] % 4 for w in _host_words(request, 1)])  # the kept place in each cell
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    kept = (rows % 2 == (corner // 2)[:, None, None]) & (cols % 2 == (corner % 2)[:, None, None])
    return (~kept).reshape(request.batch, -1).to(request.device, torch.float32)


register_mask_generator("random", _random)
register_mask_generator("official", _official)
register_mask_generator("block", _block)
register_mask_generator("grid", _grid)


# ============================================================================ the choice


def _check_sources(noise: Tensor | None, mask: Tensor | None, seed: Any, offset: Any, masking: Any,
                   shape: tuple[int, int]) -> None:
    given = [name for name, value in (("mask", mask), ("noise", noise)) if value is not None]
    if len(given) == 2 or (given and (seed is not None or offset is not None)):
        raise ValueError(f"give {' or '.join(given)} or seed / offset, not both" if len(given) == 1
                         else "give mask or noise, not both")
    for name, value in (("mask", mask), ("noise", noise)):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} must be (B, L) = {shape}, got {tuple(value.shape)}")
    if masking == "official" and not given and (seed is not None or offset is not None):
        raise ValueError("masking='official' draws from torch's generator (torch.manual_seed): seed and offset "
                         "need the counter-based masking ('random', 'block', 'grid')")


def _as_masks(result: Masking | PackedMasking | Tensor, counts: Sequence[int] | None = None) -> Masks:
    if isinstance(result, Tensor):
        result = masking_from_mask(result)
    if isinstance(result, Masking):
        return Masks(result.ids_keep, result.ids_restore, result.mask, None, result.ids_keep.shape[1])
    counts = tuple(counts) if counts is not None else tuple(result.cu_seqlens.diff().tolist())
    return Masks(result.ids_keep, result.ids_restore, result.mask, result.cu_seqlens, counts)


def make_masks(batch: int, grid_size: tuple[int, int], mask_ratio: Any = 0.75, *,
               masking: str | MaskGenerator = "random", noise: Tensor | None = None, mask: Tensor | None = None,
               seed: int | Tensor | None = None, offset: int | Tensor | None = None,
               device: torch.device | str = "cpu", reference: bool = False) -> Masks:
    """The masks of ``batch`` images of a ``grid_size`` patch grid (see the module doc for the sources).

    ``mask_ratio``: a float in [0, 1), or one per image; ignored when ``mask`` is given.
    ``reference``: the plain-PyTorch path (a model's ``fused=False``). Masks whose keep counts
    differ come packed (``cu_seqlens``, ``num_visible`` per sample).
    """
    shape = (batch, grid_size[0] * grid_size[1])
    _check_sources(noise, mask, seed, offset, masking, shape)
    if mask is not None:
        return _as_masks(mask.to(device))
    ratios = mask_ratios(mask_ratio, batch)
    counts = tuple(keep_count(shape[1], r) for r in ratios) if isinstance(ratios, list) else None
    num_keep = counts if counts is not None else keep_count(shape[1], ratios)
    if noise is not None:
        return _as_masks(masking_from_permutation(*_official_permutation(*shape, device, noise), num_keep), counts)
    request = MaskRequest(batch, tuple(grid_size), tuple(ratios) if counts else ratios, num_keep, seed,
                          0 if offset is None else offset, torch.device(device), reference)
    return _as_masks(mask_generator(masking)(request), counts)


def make_permutation(batch: int, num_patches: int, *, masking: str | MaskGenerator = "random",
                     noise: Tensor | None = None, seed: int | Tensor | None = None,
                     offset: int | Tensor | None = None, device: torch.device | str = "cpu",
                     reference: bool = False) -> tuple[Tensor, Tensor]:
    """``(ids_shuffle, ids_restore)``, one random permutation of the patches per image, for a
    method that cuts it more than once (LUT's two disjoint views): ``argsort(noise)``, the
    counter-based :func:`fastmim.ops.random_permutation` (``"random"``), or the official
    ``torch.rand`` draw (``"official"``). Other generators make masks, not permutations."""
    _check_sources(noise, None, seed, offset, masking, (batch, num_patches))
    if noise is not None or masking == "official":
        return _official_permutation(batch, num_patches, torch.device(device), noise)
    if masking != "random":
        raise ValueError(f"this method cuts one random permutation per image into its views: masking must be "
                         f"'random' or 'official', got {masking!r}")
    random_permutation = ops.random_permutation_reference if reference else ops.random_permutation
    return random_permutation(batch, num_patches, seed=seed, offset=0 if offset is None else offset, device=device)
