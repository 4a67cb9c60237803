"""Loader of the compiled extension ``fastmim._C`` (CPU C++ and CUDA ops from ``csrc/``).

Importing ``fastmim._C`` registers the ``torch.ops.fastmim.*`` kernels it holds; the package
works without it (the dispatcher falls back and ``fastmim info`` says why).
"""

from __future__ import annotations

import functools
import importlib


@functools.cache
def load_error() -> str | None:
    """``None`` once ``fastmim._C`` is loaded, else why it could not be."""
    try:
        importlib.import_module("fastmim._C")
    except ImportError as exc:
        return f"fastmim._C is not built ({exc})"
    return None


def has_cuda() -> bool:
    """True when the loaded extension holds CUDA kernels."""
    if load_error() is not None:
        return False
    from fastmim import _C

    return bool(getattr(_C, "WITH_CUDA", False))
