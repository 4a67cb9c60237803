"""fastmim's training job: the loop, checkpoints, evaluation and the ``train``/``eval`` commands.

- :func:`train` runs a :class:`TrainConfig` (``fastmim train``);
- :mod:`fastmim.train.methods` holds one adapter per method (how a batch becomes a loss);
- :mod:`fastmim.train.evaluate` has k-NN and linear-probe evaluation (``fastmim eval``);
- :func:`finetune` / :class:`FinetuneConfig` (:mod:`fastmim.train.finetuning`): MAE's fine-tuning
  recipe (layer-wise lr decay, mixup / cutmix, drop path, global pool);
- :func:`init_from_official` (:mod:`fastmim.train.official`): a model and its AdamW state from an
  official ``main_pretrain.py`` checkpoint;
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
    "FinetuneConfig": "fastmim.train.finetuning",
    "FinetuneResult": "fastmim.train.finetuning",
    "finetune": "fastmim.train.finetuning",
    "param_groups_lrd": "fastmim.train.finetuning",
    "init_from_official": "fastmim.train.official",
    "read_official_checkpoint": "fastmim.train.official",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastmim.train' has no attribute {name!r}")
