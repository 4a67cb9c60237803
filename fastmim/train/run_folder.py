"""A run's folder: what a run writes there, the checks before anything is written, the
resumed configuration, and the metrics log.

Output folder::

    config.json                 the resolved configuration
    metrics.jsonl               one record per logged step (loss, parts, lr, img/s, epoch, skipped steps)
    checkpoint.safetensors      model weights + metadata to rebuild it (fastmim eval reads it)
    train_state.pt              optimizer, step, data position, RNG states, config
    .train_state.pt.pending     only during a save (or after a crash in one): the next state
    loss.png                    loss (and parts) and lr against the step
    reconstruction_step0.png    fixed held-out images reconstructed before training
    reconstruction.png          the same images at the end
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastmim.train.checkpoint import (
    CHECKPOINT_NAME,
    PENDING_STATE_NAME,
    STATE_NAME,
    atomic_write,
    remove_partial_writes,
)
from fastmim.train.config import CONFIG_NAME, EVAL_LOG_NAME, METRICS_NAME, RUNTIME_FIELDS, TrainConfig, TrainError
from fastmim.train.distributed import DistInfo
from fastmim.train.plots import read_metrics

__all__ = ["RUN_FILES", "append_metrics", "create_output", "merge_resumed_config", "prepare_output", "start_run_files",
           "truncate_metrics"]


# Everything a run (and fastmim eval's default log) writes in its folder: what --overwrite removes.
RUN_FILES = (CHECKPOINT_NAME, STATE_NAME, PENDING_STATE_NAME, METRICS_NAME, CONFIG_NAME, "loss.png",
             "reconstruction_step0.png", "reconstruction.png", EVAL_LOG_NAME)


def prepare_output(out: Path, cfg: TrainConfig, info: DistInfo) -> None:
    """Checks before anything is written: never overwrite a run unless resuming or told to."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"output {out} exists and is not a folder")
    has_run = (out / CHECKPOINT_NAME).exists() or (out / STATE_NAME).exists()
    if cfg.resume and not has_run:
        raise TrainError(f"nothing to resume in {out} (no {CHECKPOINT_NAME} and {STATE_NAME})")
    if not cfg.resume and not cfg.overwrite and has_run:
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it, --overwrite to "
                         f"replace it, or choose another --output")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TrainError(f"output folder {out} is not writable ({ancestor} is a file)")


def create_output(out: Path, info: DistInfo, overwrite: bool) -> None:
    """Create ``out`` (rank 0) and check that files can be written in it; with ``overwrite``,
    remove a previous run's files (only those: the folder may hold the user's own). The
    temporary files of writes a kill interrupted go in any case."""
    if not info.is_main:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        remove_partial_writes(out, RUN_FILES)
        if overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
    except OSError as exc:
        raise TrainError(f"output folder {out} is not writable ({exc.strerror or exc})") from None


def merge_resumed_config(cfg: TrainConfig, saved: dict[str, Any], explicit: set[str]) -> TrainConfig:
    """The saved run's config with this invocation's runtime settings; an explicitly given
    setting that would change the run is an error."""
    saved_cfg = TrainConfig.from_json(saved)
    for name in sorted(explicit - RUNTIME_FIELDS):
        mine, theirs = getattr(cfg, name), getattr(saved_cfg, name)
        if isinstance(theirs, tuple):
            mine = tuple(mine)
        if mine != theirs:
            raise TrainError(f"--{name.replace('_', '-')} {mine} differs from the run being resumed ({theirs}); "
                             f"resume with the same settings or start a new --output")
    for name in RUNTIME_FIELDS:
        setattr(saved_cfg, name, getattr(cfg, name))
    return saved_cfg


def start_run_files(out: Path, cfg: TrainConfig, resolved: dict[str, Any], resumed_at: int | None) -> None:
    """Write ``config.json`` (the settings and what they resolved to) and start the metrics log:
    a resumed run drops the records past its checkpoint's step ``resumed_at``, a new one starts
    without any."""
    atomic_write(out / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(
        {**cfg.to_json(), "resolved": resolved}, indent=2) + "\n"))
    if resumed_at is not None:
        truncate_metrics(out, resumed_at)
    elif (out / METRICS_NAME).exists():
        (out / METRICS_NAME).unlink()


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    with open(out / METRICS_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
    """Drop the records past ``step`` (logged by an interrupted run after its last checkpoint)."""
    path = out / METRICS_NAME
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in keep)))
