"""fastmim's training job: the loop, checkpoints, evaluation and the ``train``/``eval`` commands.

- :func:`train` runs a :class:`TrainConfig` (``fastmim train``);
- :mod:`fastmim.train.methods` holds one adapter per method (how a batch becomes a loss);
- :mod:`fastmim.train.evaluate` has k-NN and linear-probe evaluation (``fastmim eval``);
- :mod:`fastmim.train.checkpoint` reads and writes checkpoints atomically.

Attributes load lazily, so importing the CLI module does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "fastmim.train.config",
    "TrainError": "fastmim.train.config",
    "TrainResult": "fastmim.train.loop",
    "train": "fastmim.train.loop",
    "MethodAdapter": "fastmim.train.methods",
    "StepContext": "fastmim.train.methods",
    "register_adapter": "fastmim.train.methods",
    "get_adapter": "fastmim.train.methods",
    "load_checkpoint": "fastmim.train.evaluate",
    "knn_accuracy": "fastmim.train.evaluate",
    "linear_probe": "fastmim.train.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastmim.train' has no attribute {name!r}")
