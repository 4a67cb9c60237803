"""The configuration of a training run (no torch import: the CLI builds its parser from it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "TrainError", "DEFAULT_MAX_STEPS", "RUNTIME_FIELDS"]

# The README's demo (`fastmim train --method mae --output DIR`): 300 steps of 64 images (2 epochs
# of the bundled data), about 250 CPU-seconds for the default tiny model: a few minutes on 2 cores.
DEFAULT_MAX_STEPS = 300
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
EVAL_LOG_NAME = "eval.jsonl"  # fastmim eval's default log, beside the checkpoint
NUM_FIGURE_IMAGES = 8

# Settings that may differ between a run and its resumption (they do not change the math).
RUNTIME_FIELDS = frozenset({"output", "resume", "num_workers", "compile", "progress", "stop_after", "log_every",
                            "ckpt_every", "figures", "device", "on_corrupt", "overwrite", "on_nonfinite", "max_skips"})


class TrainError(ValueError):
    """A training run that cannot start or go on for a reason the user can fix."""


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` means "the default for this method / preset"."""

    method: str = "mae"
    model: str = "vit_tiny_patch4_32"
    data: str = "default"
    output: str = "runs/fastmim"
    max_steps: int | None = None  # optimizer steps; default DEFAULT_MAX_STEPS unless epochs is set
    epochs: float | None = None
    batch_size: int = 64  # per process and micro-step
    accum_steps: int = 1
    # The official MAE script's default base lr; its 800-epoch batch-4096 command passes 1.5e-4,
    # which at small batches and short runs barely moves (the demo's loss: 0.70 vs 0.54 at 300 steps).
    blr: float = 1e-3
    lr: float | None = None  # absolute lr; default blr * global batch / 256
    min_lr: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None
    mask_ratio: float | None = None
    image_size: int | None = None
    channels: int = 3  # image folders; the bundled data has 1
    norm_pix_loss: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    num_workers: int | None = None  # default: 0 on CPU, up to 8 per GPU
    compile: str | None = None  # a torch.compile backend ("inductor", "aot_eager", ...)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32"
    device: str = "auto"
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end (and when interrupted)
    stop_after: int | None = None  # stop this invocation after this many steps; resume later
    on_corrupt: str = "skip"
    # A step whose loss or gradient norm is nan/inf is always skipped; after max_skips of them in a
    # row (seen at a metrics record): "skip" goes on, "rollback" reloads the last checkpoint with
    # a fresh data order, "stop" ends the run with an error.
    on_nonfinite: str = "skip"
    max_skips: int = 10
    progress: bool = True
    figures: bool = True
    resume: bool = False
    overwrite: bool = False  # start afresh in an output folder that holds a run, removing its files

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


