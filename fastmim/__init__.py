"""fastmim: fast masked image modeling with fused Triton and CUDA kernels.

Layers: ``fastmim.ops`` (fused ops with plain-PyTorch references), ``fastmim.models``
(MAE, supervised + MIM, CMAE, LUT), ``fastmim.data`` and ``fastmim.train`` (the training
job behind the ``fastmim`` command).

``fastmim.patch(model)`` runs the fused ops in a model you already have (the official MAE,
transformers' ViTMAE / ViT, timm's VisionTransformer), in place; ``fastmim.unpatch(model)``
restores it (``fastmim.models.patching``, imported on first use).
"""

__version__ = "0.1.0"

_PATCHING = ("PatchReport", "patch", "patch_report", "unpatch")


def __getattr__(name: str):
    if name in _PATCHING:
        from fastmim.models import patching

        return getattr(patching, name)
    raise AttributeError(f"module 'fastmim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PATCHING])
