"""What a training run reports while it runs: the records of ``metrics.jsonl``, the progress
bar and the lines on stderr.

A metrics record covers the optimizer steps since the previous one, its *window*. The
window's sums stay on the device, added to without a host sync; :meth:`MetricsWindow.record`
reads them once per record, together with the non-finite guard's counters: the training
loop's one host sync.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastmim.data import DataSource
from fastmim.train.config import TrainConfig
from fastmim.train.distributed import DistInfo, all_reduce_mean

__all__ = ["MetricsWindow", "ProgressBar", "Record", "format_time", "print_header", "print_summary"]


@dataclass
class Record:
    """One metrics record, with what the loop and the progress bar read from it."""

    values: dict[str, Any]  # the line of metrics.jsonl
    loss: float | None  # the window's mean loss; None when every step of the window was skipped
    img_per_s: float
    skipped: int  # steps skipped so far in the run (rolled-back ones included)
    streak: int  # steps skipped in a row up to the latest


class MetricsWindow:
    """The sums of the steps since the last metrics record (device tensors)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start the sums of the next record."""
        self.loss = torch.zeros((), device=self.device)  # over the steps not skipped
        self.kept = torch.zeros((), device=self.device)  # how many those are
        self.parts: dict[str, torch.Tensor] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, step_loss: torch.Tensor, parts: dict[str, torch.Tensor], skip: torch.Tensor) -> None:
        """One optimizer step: its loss and loss parts count unless it was skipped (``skip`` is
        the guard's device flag, 1.0 for a skipped step), without a host sync."""
        kept = skip == 0
        self.loss += torch.where(kept, step_loss, 0.0)
        self.kept += 1.0 - skip
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0) + torch.where(kept, v, 0.0)
        self.steps += 1

    def record(self, skipped: torch.Tensor, skip_streak: torch.Tensor, info: DistInfo, *, step: int, epoch: float,
               lr: float, global_batch: int) -> Record:
        """The window's record, averaged over the processes; ``skipped`` and ``skip_streak`` are
        the guard's device counters, read in the same transfer."""
        values = torch.stack([self.loss, self.kept, skipped, skip_streak, *self.parts.values()])
        values = all_reduce_mean(values, info).cpu()  # the only host sync of the loop, once per record
        kept, skipped_steps, streak = int(values[1]), int(values[2]), int(values[3])
        loss = float(values[0] / values[1]) if kept else None
        elapsed = time.perf_counter() - self.start
        img_per_s = self.steps * global_batch / max(elapsed, 1e-9)
        record: dict[str, Any] = {"step": step, "epoch": round(epoch, 4)}
        if loss is not None:
            record["loss"] = loss
        record.update(lr=lr, img_per_s=round(img_per_s, 2), skipped=skipped_steps)
        if self.parts and kept:
            record["parts"] = {k: float(v / values[1]) for k, v in zip(self.parts, values[4:], strict=True)}
        return Record(record, loss, img_per_s, skipped_steps, streak)


class ProgressBar:
    """The run's tqdm bar on stderr; a bar that is off (other ranks, ``progress=False``) does
    nothing, so the loop never has to ask."""

    def __init__(self, enabled: bool, *, total: int, initial: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, record: Record, lr: float) -> None:
        """The latest record's loss, lr, throughput and skipped steps, drawn with the next update."""
        if self.bar is None:
            return
        postfix = {"loss": "skipped" if record.loss is None else f"{record.loss:.4f}", "lr": f"{lr:.2e}",
                   "img_s": f"{record.img_per_s:.0f}"}
        if record.skipped:
            postfix["skipped"] = str(record.skipped)
        self.bar.set_postfix(postfix, refresh=False)

    def rewind(self, step: int) -> None:
        """Back to ``step`` (a rollback)."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def print_header(cfg: TrainConfig, info: DistInfo, *, num_params: int, source: DataSource, num_train: int,
                 image_size: int, global_batch: int, lr: float, max_steps: int, device: str, precision: str,
                 resumed_at: int | None) -> None:
    """The run's first line: what trains on what, the batch and its factors, lr and steps."""
    ch = source.channels
    accum = f" x accum {cfg.accum_steps}" if cfg.accum_steps > 1 else ""
    procs = f" x {info.world_size} processes" if info.enabled else ""
    resumed = f", resuming at step {resumed_at}" if resumed_at is not None else ""
    print(f"fastmim train: {cfg.method} {cfg.model} ({num_params / 1e6:.2f}M params) on {source.name} "
          f"({num_train} train images, {ch} channel{'s' if ch > 1 else ''}, {image_size}px); "
          f"batch {cfg.batch_size}{procs}{accum} = {global_batch}, lr {lr:.3g}, "
          f"{max_steps} steps on {device} ({precision}){resumed}", file=sys.stderr)


def print_summary(*, finished: bool, step: int, max_steps: int, seconds: float, skipped: int, loss: float | None,
                  files: dict[str, Path], out: Path) -> None:
    """The run's last line: how far it got, its time, skipped steps, last loss and what it wrote."""
    what = "finished" if finished else f"stopped at step {step} of {max_steps} (--resume continues)"
    loss_text = f", loss {loss:.4f}" if loss is not None else ""
    skipped_text = f", {skipped} skipped (non-finite loss or gradient)" if skipped else ""
    print(f"{what}: {step} steps in {format_time(seconds)}{skipped_text}{loss_text}; wrote "
          f"{', '.join(sorted(p.name for p in files.values()))} to {out}", file=sys.stderr)
