"""fastmim's environment variables, each read here and nowhere else.

- ``FASTMIM_BACKEND`` = ``triton | csrc | reference | sdpa | xformers``: forces that backend for
  every op that has it; the others keep their default (``sdpa`` and ``xformers`` concern
  attention only).
- ``FASTMIM_CHECK_INDICES=1``: checks the index values of accelerator tensors too (a device sync
  per op call: a debug mode; host tensors are always checked).
- ``FASTMIM_NO_EXT=1``: never loads or builds the C++/CUDA extension (``setup.py`` reads it too,
  at build time).
- ``FASTMIM_EXT_DIR``: where the just-in-time build of the extension is cached (default
  ``~/.cache/fastmim/torch_extensions``).
- ``FASTMIM_ATTN_BACKEND``: deprecated, the attention-only switch ``FASTMIM_BACKEND`` replaces.

Each function reads its variable when called, so a change (a test's ``monkeypatch.setenv``)
takes effect at once. Variables of other tools are read where those tools define them:
``TRITON_INTERPRET`` by the kernel modules (which import only torch and triton), torchrun's
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` by :mod:`fastmim.train.distributed`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["VARIABLES", "attention_backend_override", "check_indices", "extension_dir", "extension_disabled",
           "forced_backend_name", "triton_interpret"]

# Documented in the README's table (a test holds the two together).
VARIABLES = ("FASTMIM_BACKEND", "FASTMIM_CHECK_INDICES", "FASTMIM_NO_EXT", "FASTMIM_EXT_DIR", "FASTMIM_ATTN_BACKEND")


def forced_backend_name() -> str | None:
    """``FASTMIM_BACKEND`` (unchecked: the dispatcher validates it), else ``None``."""
    return os.environ.get("FASTMIM_BACKEND") or None


def attention_backend_override() -> str | None:
    """The deprecated ``FASTMIM_ATTN_BACKEND`` (with a warning), else ``None``."""
    name = os.environ.get("FASTMIM_ATTN_BACKEND") or None
    if name is not None:
        warnings.warn("FASTMIM_ATTN_BACKEND is deprecated: set FASTMIM_BACKEND, which forces attention's backend "
                      "too", FutureWarning, stacklevel=3)
    return name


def check_indices() -> bool:
    return os.environ.get("FASTMIM_CHECK_INDICES", "0") == "1"


def extension_disabled() -> bool:
    return os.environ.get("FASTMIM_NO_EXT", "0") == "1"


def extension_dir() -> Path:
    root = os.environ.get("FASTMIM_EXT_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fastmim" / "torch_extensions"


def triton_interpret() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (Triton's own ``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
