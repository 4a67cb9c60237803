"""The configuration of a training run (no torch import: the CLI builds its parser from it)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "TrainError", "DEFAULT_MAX_STEPS", "RUNTIME_FIELDS", "check_config", "check_lr"]

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
    # None: the method's default (the model's: off for MAE, as the official model; on for supmim,
    # supmae, CMAE and LUT); True / False: the model's norm_pix_loss either way.
    norm_pix_loss: bool | None = None
    masking: str = "random"  # where the masks come from (fastmim.models.masking): random, block, grid, official
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # An official MAE main_pretrain.py checkpoint-*.pth to start from: its weights, AdamW state and
    # step (fastmim.train.official); a new run only (--resume continues fastmim's own checkpoints).
    init_from_official: str | None = None
    num_workers: int | None = None  # default: 0 on CPU, up to 8 per GPU
    compile: str | None = None  # a torch.compile backend ("inductor", "aot_eager", ...)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32"
    device: str = "auto"
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end (and when interrupted)
    stop_after: int | None = None  # stop this invocation after this many steps; resume later
    on_corrupt: str = "skip"
    # Image folders: "fastmim" (workers decode to uint8, the views are made on the training device by
    # fastmim.ops.resized_crop_flip_normalize) or "torchvision" (the float augmentations in the workers).
    input: str = "fastmim"
    decode: str = "cpu"  # "fastmim" input: decode in the workers ("cpu") or JPEGs with nvJPEG ("gpu")
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
        d.setdefault("input", "torchvision")  # saved before the option existed: the runs of that path
        if "masking" not in d and d.get("norm_pix_loss") is False:
            # Saved before --no-norm-pix-loss existed (with --masking): False meant "not asked for",
            # which built each method's default.
            d["norm_pix_loss"] = None
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# AdamW's arithmetic is float32 (the parameters' dtype): a larger step size overflows at once.
FLOAT32_MAX = 3.4028234663852886e38


def check_config(cfg: TrainConfig) -> None:
    def positive(name: str, value: Any, allow_none: bool = True) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be positive, got {value}")

    for name in ("epochs", "blr", "lr", "min_lr", "weight_decay", "clip_grad", "mask_ratio"):
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise TrainError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("max_steps", "epochs", "accum_steps", "lr", "blr", "image_size", "clip_grad"):
        positive(name, getattr(cfg, name))
    positive("batch_size", cfg.batch_size, allow_none=False)
    positive("log_every", cfg.log_every, allow_none=False)
    positive("stop_after", cfg.stop_after)
    positive("max_skips", cfg.max_skips, allow_none=False)
    for name in ("min_lr", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if len(cfg.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in cfg.betas):
        raise TrainError(f"AdamW's betas must be two numbers in [0, 1), got {cfg.betas}")
    if cfg.on_nonfinite not in ("skip", "rollback", "stop"):
        raise TrainError(f"--on-nonfinite must be skip, rollback or stop, got {cfg.on_nonfinite!r}")
    if cfg.on_nonfinite == "rollback" and not cfg.ckpt_every:
        raise TrainError("--on-nonfinite rollback goes back to the last checkpoint: pass --ckpt-every N too")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise TrainError(f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.ckpt_every < 0:
        raise TrainError(f"--ckpt-every must be >= 0, got {cfg.ckpt_every}")
    if cfg.mask_ratio is not None:
        from fastmim.ops import check_mask_ratio  # the one check of a mask ratio (torch: imported when a run starts)

        try:
            check_mask_ratio(cfg.mask_ratio, "--mask-ratio")
        except (TypeError, ValueError) as exc:
            raise TrainError(str(exc)) from None
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise TrainError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.channels not in (1, 3):
        raise TrainError(f"--channels must be 1 or 3, got {cfg.channels}")
    if cfg.on_corrupt not in ("skip", "error"):
        raise TrainError(f"--on-corrupt must be skip or error, got {cfg.on_corrupt!r}")
    if cfg.input not in ("fastmim", "torchvision"):
        raise TrainError(f"--input must be fastmim or torchvision, got {cfg.input!r}")
    if cfg.decode not in ("cpu", "gpu"):
        raise TrainError(f"--decode must be cpu or gpu, got {cfg.decode!r}")
    if cfg.decode == "gpu" and cfg.input != "fastmim":
        raise TrainError("--decode gpu is part of the fastmim input pipeline: drop --input torchvision")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise TrainError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --output and --overwrite replaces it: pass one of them")
    if cfg.init_from_official is not None:
        if cfg.method != "mae":
            raise TrainError(f"--init-from-official continues an official MAE run: --method mae, got {cfg.method}")
        if cfg.fsdp:
            raise TrainError("--init-from-official loads the official weights and optimizer state into one "
                             "process's model: run it without --fsdp (DDP is fine)")


def check_lr(lr: float, cfg: TrainConfig) -> None:
    """A learning rate that overflows AdamW's float32 arithmetic on its first step (a step of
    ``lr / (1 - beta1)`` before the bias correction meets it, a decay of ``lr * weight_decay``)."""
    largest = max(lr, cfg.min_lr) * max(1 / (1 - cfg.betas[0]), cfg.weight_decay)
    if largest > FLOAT32_MAX:
        given = f"--lr {cfg.lr:g}" if cfg.lr is not None else f"--blr {cfg.blr:g} (lr {lr:g})"
        raise TrainError(f"{given} overflows AdamW's float32 arithmetic (its first step computes "
                         f"{largest:.3g}, above {FLOAT32_MAX:.3g})")
