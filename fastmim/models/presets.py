"""Model sizes by name and the ``create_model(method, preset, **overrides)`` entry point.

A preset fixes the encoder (and a default decoder) of a ViT; a method (``"mae"``,
``"supmim"``, ...) is a builder that turns a preset plus keyword overrides into a model.
New methods register themselves with :func:`register_method`::

    @register_method("cmae")
    def _build_cmae(size: ViTPreset, /, **overrides) -> nn.Module:
        return CMAE(**{**size.mae_kwargs(), "decoder_depth": 2, **overrides})

and ``fastmim.models.__init__`` imports the module that does so. (Take the preset
positional-only, so a model argument may itself be called ``preset``.)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from torch import nn


@dataclasses.dataclass(frozen=True)
class ViTPreset:
    """Encoder and default decoder sizes (decoder heads chosen so the head dim is 32, as in MAE)."""

    name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    in_chans: int = 3

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def encoder_kwargs(self) -> dict[str, Any]:
        return {"img_size": self.img_size, "patch_size": self.patch_size, "in_chans": self.in_chans,
                "embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio}

    def mae_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`~fastmim.models.MaskedAutoencoderViT` for this preset."""
        return {**self.encoder_kwargs(), "decoder_embed_dim": self.decoder_embed_dim,
                "decoder_depth": self.decoder_depth, "decoder_num_heads": self.decoder_num_heads}


def _preset(name: str, img: int, patch: int, dim: int, depth: int, heads: int, dec: tuple[int, int, int]) -> ViTPreset:
    return ViTPreset(name, img, patch, dim, depth, heads, dec[0], dec[1], dec[2])


# MAE's decoder (512 wide, 8 blocks, 16 heads) for B/L/H; the official code has no tiny/small
# models, so these get the lighter 256-wide decoder that small-model MAE studies use. The
# small-image presets are for CPU-scale runs (64 tokens): a 128-wide, 2-block decoder.
PRESETS: dict[str, ViTPreset] = {p.name: p for p in (
    _preset("vit_tiny_patch16_224", 224, 16, 192, 12, 3, (256, 8, 8)),
    _preset("vit_small_patch16_224", 224, 16, 384, 12, 6, (256, 8, 8)),
    _preset("vit_base_patch16_224", 224, 16, 768, 12, 12, (512, 8, 16)),
    _preset("vit_large_patch16_224", 224, 16, 1024, 24, 16, (512, 8, 16)),
    _preset("vit_huge_patch16_224", 224, 16, 1280, 32, 16, (512, 8, 16)),
    _preset("vit_huge_patch14_224", 224, 14, 1280, 32, 16, (512, 8, 16)),  # MAE's ViT-H
    _preset("vit_tiny_patch4_32", 32, 4, 192, 12, 3, (128, 2, 4)),
    _preset("vit_tiny_patch8_64", 64, 8, 192, 12, 3, (128, 2, 4)),
)}

PRESET_ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch16_224",
}

DEFAULT_PRESET = "vit_tiny_patch4_32"

MethodBuilder = Callable[..., nn.Module]
_METHODS: dict[str, MethodBuilder] = {}


def _unknown(kind: str, name: object, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}")


def get_preset(name: str | ViTPreset) -> ViTPreset:
    """The preset called ``name`` (a :class:`ViTPreset` passes through)."""
    if isinstance(name, ViTPreset):
        return name
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise _unknown("preset", name, list_presets())
    return PRESETS[key]


def list_presets() -> list[str]:
    return sorted(PRESETS) + sorted(PRESET_ALIASES)


def register_method(name: str, builder: MethodBuilder | None = None, *, overwrite: bool = False):
    """Register ``builder(size: ViTPreset, /, **overrides) -> nn.Module`` under ``name``.

    Usable as a decorator (``@register_method("lut")``) or a call. Registering a name twice
    raises unless ``overwrite=True``.
    """

    def decorate(fn: MethodBuilder) -> MethodBuilder:
        if not overwrite and name in _METHODS and _METHODS[name] is not fn:
            raise ValueError(f"method {name!r} is already registered (pass overwrite=True to replace it)")
        _METHODS[name] = fn
        return fn

    return decorate if builder is None else decorate(builder)


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_model(method: str, preset: str | ViTPreset = DEFAULT_PRESET, **overrides: Any) -> nn.Module:
    """Build the model of ``method`` (``"mae"``, ``"supmim"``, ...) at the size ``preset``.

    ``overrides`` replace any constructor argument of the method's model, e.g.
    ``create_model("mae", "vit_tiny_patch4_32", in_chans=1, norm_pix_loss=True)``.
    """
    if method not in _METHODS:
        raise _unknown("method", method, list_methods())
    return _METHODS[method](get_preset(preset), **overrides)
