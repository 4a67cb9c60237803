"""The training job behind ``fastmim train``.

One function, :func:`train`, runs a :class:`TrainConfig`: data → model → AdamW with the MAE
recipe → steps with gradient accumulation, bf16 autocast on GPU, optional ``torch.compile``
and DistributedDataParallel (or FSDP2) under torchrun → metrics JSONL, progress bar, atomic
checkpoints, and at the end a loss plot and a reconstruction figure. The pieces around the
loop have modules of their own: the run folder and its metrics log
(:mod:`fastmim.train.run_folder`), checkpoints and RNG state (:mod:`fastmim.train.checkpoint`),
the train set and the loader of each epoch (:mod:`fastmim.train.inputs`), devices, processes
and full state dicts (:mod:`fastmim.train.distributed`), the non-finite guard and what a run
does when it diverges (:mod:`fastmim.train.guard`), the metrics records, progress bar and
lines on stderr (:mod:`fastmim.train.progress`), a deferred Ctrl-C
(:mod:`fastmim.train.interrupt`), figures (:mod:`fastmim.train.plots`), and each method's
steps (:mod:`fastmim.train.methods`).

The checkpoint pair is replaced crash-safely (:func:`fastmim.train.checkpoint.save_checkpoint`):
a crash while saving leaves the previous pair or the new one, and ``--resume`` finds it; the
temporary files a kill during a write leaves are removed when the folder is next used.
``overwrite=True`` starts a new run in a folder holding one, removing that run's files first.

Non-finite values never reach the weights or a checkpoint: a step whose loss or gradient norm
is nan/inf is skipped, decided on the device without a host sync, records count the skipped
steps, and ``on_nonfinite`` says what a run does when they go on (:mod:`fastmim.train.guard`).

Resuming (``resume=True``) reloads weights and state and continues exactly: the data order
and augmentations are a function of ``(seed, epoch, position)``, the masking noise of
``(seed, step)`` (``seed`` re-derived after each rollback, whose count the state keeps), the
schedule of the step, and the remaining RNG states are restored — on CPU the parameters
after N steps are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import fastmim
from fastmim.data import DataSource, TrainBatchSampler, derive_seed, open_data, views_on_device
from fastmim.train.checkpoint import (
    CHECKPOINT_NAME,
    STATE_NAME,
    CheckpointError,
    load_checkpoint_state,
    load_weights,
    read_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastmim.train.config import (
    CONFIG_NAME,
    DEFAULT_MAX_STEPS,
    METRICS_NAME,
    NUM_FIGURE_IMAGES,
    TrainConfig,
    TrainError,
    check_config,
    check_lr,
)
from fastmim.train.distributed import (
    DistInfo,
    all_gather,
    full_state,
    init_distributed,
    load_full_weights,
    load_optimizer_state,
    resolve_device,
    shard_fsdp,
    shutdown_distributed,
)
from fastmim.train.guard import DivergencePolicy, SkipCounters, nonfinite_tensor, skip_flag
from fastmim.train.inputs import default_num_workers, epoch_loader, takes_device_views, train_dataset
from fastmim.train.interrupt import DeferredInterrupt
from fastmim.train.methods import StepContext, build_model, get_adapter, resolve_model
from fastmim.train.plots import held_out_images, plot_loss, plot_reconstruction, read_metrics, reconstruction_of
from fastmim.train.progress import MetricsWindow, ProgressBar, Record, print_header, print_summary
from fastmim.train.run_folder import (
    append_metrics,
    create_output,
    merge_resumed_config,
    prepare_output,
    start_run_files,
    truncate_metrics,
)
from fastmim.train.schedule import cosine_lr, default_warmup_steps, scaled_lr, total_steps

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train", "build_model", "DEFAULT_MAX_STEPS"]

# Salts of the seeds derived from the run's seed (fastmim.data.derive_seed), one per use, so
# that no two streams of random numbers coincide (the DataLoader's is fastmim.train.inputs'
# LOADER_SALT): the data seed after a rollback, the masks of the reconstruction figures.
ROLLBACK_SALT, FIGURE_MASK_SALT = 0xB0C, 0xF16


@dataclass
class TrainResult:
    output: Path
    step: int
    max_steps: int
    loss: float | None
    seconds: float
    files: dict[str, Path]
    finished: bool
    skipped: int  # optimizer steps skipped for a non-finite loss or gradient


class _Run:
    """State of one invocation of :func:`train` (kept together to keep :func:`train` readable)."""

    def __init__(self, cfg: TrainConfig, explicit: set[str]):
        self.info = DistInfo()
        self.cfg = cfg
        self.explicit = explicit
        self.out = Path(cfg.output)
        self.files: dict[str, Path] = {}

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        check_config(cfg)
        try:
            self.device = resolve_device(cfg.device)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        self.info = init_distributed(self.device.type)
        if self.info.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.info.local_rank)
        prepare_output(self.out, cfg, self.info)
        self.state: dict[str, Any] | None = None
        if cfg.resume:
            self.state = load_checkpoint_state(self.out)
            cfg = self.cfg = merge_resumed_config(cfg, self.state["config"], self.explicit)
            if self.state.get("world_size", 1) != self.info.world_size:
                raise TrainError(f"the run in {self.out} used {self.state.get('world_size', 1)} process(es); "
                                 f"resume it with the same number (now {self.info.world_size})")
        try:
            self.adapter = get_adapter(cfg.method)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        from fastmim.models import get_preset

        try:
            get_preset(cfg.model)
        except ValueError as exc:
            raise TrainError(str(exc)) from None

        self.source: DataSource = open_data(cfg.data, channels=cfg.channels, on_corrupt=cfg.on_corrupt)
        self.model_kwargs, self.image_size, self.patch_size = resolve_model(
            cfg, self.adapter, self.source.channels, len(self.source.classes))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.module = build_model(cfg.method, cfg.model, self.model_kwargs).to(self.device)
        self.num_params = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        # The run's mask ratio: given, else the model's own default (SupervisedMIM recipes), else the method's.
        model_ratio = getattr(self.module, "mask_ratio", None)
        self.mask_ratio = (cfg.mask_ratio if cfg.mask_ratio is not None
                           else model_ratio if isinstance(model_ratio, float) else self.adapter.default_mask_ratio)

        crop_sampler = self.adapter.crop_sampler(self.module, self.source)
        self.device_views = takes_device_views(cfg, self.source, self.adapter, self.device, self.info.is_main)
        self.train_set = train_dataset(self.source, self.image_size, self.adapter, crop_sampler,
                                       device_views=self.device_views, decode=cfg.decode)
        try:
            self.sampler = TrainBatchSampler(len(self.train_set), cfg.batch_size, seed=cfg.seed,
                                             rank=self.info.rank, world_size=self.info.world_size)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        self.global_batch = cfg.batch_size * self.info.world_size * cfg.accum_steps
        self.max_steps = total_steps(cfg.max_steps, cfg.epochs, micro_per_epoch=self.sampler.batches_per_epoch,
                                     accum_steps=cfg.accum_steps, default=DEFAULT_MAX_STEPS)
        self.lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, self.global_batch)
        check_lr(self.lr, cfg)
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup_steps(self.max_steps)

        from timm.optim import param_groups_weight_decay

        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.precision = "bf16" if use_bf16 else "fp32"
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        self.step, self.epoch, self.position = 0, 0, 0
        # The skipping guard's counters stay on the device; the loop reads them with each record.
        self.skips = SkipCounters(self.device)
        self._set_rollbacks(0)
        if self.state is not None:
            self._restore_weights()
        step0_figure = cfg.figures and self.state is None and self.info.is_main
        # The step-0 figure comes before sharding: FSDP must first run through the root's forward.
        # (An official start draws it once its weights are in.)
        self.step0_panels = self.reconstruct() if step0_figure and cfg.init_from_official is None else None
        if cfg.fsdp:
            if not self.info.enabled:
                raise TrainError("--fsdp needs several processes (launch with torchrun --nproc_per_node=N)")
            shard_fsdp(self.module)
        groups = param_groups_weight_decay(self.module, cfg.weight_decay)
        # Fused: the AdamW implementation that takes a device-side found_inf (as GradScaler sets
        # it) and then leaves parameters, moments and step count alone, on CPU and GPU alike.
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=cfg.betas, fused=True)
        if self.state is not None:
            self._restore_state(self.state)
        elif cfg.init_from_official is not None:
            self._start_from_official(cfg.init_from_official)
            self.step0_panels = self.reconstruct() if step0_figure else None
        self.model: nn.Module = self.module
        if self.info.enabled and not cfg.fsdp:
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model = nn.parallel.DistributedDataParallel(self.module, **ddp_kwargs)
        if cfg.compile:
            self.model = torch.compile(self.model, backend=cfg.compile)
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(self.device)
        # Last: a run that cannot start leaves the folder (and, with --overwrite, the old run) as it was.
        create_output(self.out, self.info, cfg.overwrite)

    def _restore_weights(self) -> None:
        # load_checkpoint_state chose the state of these weights' step.
        path = self.out / CHECKPOINT_NAME
        if hasattr(self.module, "unshard"):  # sharded by FSDP (a rollback): every rank loads the full weights
            load_full_weights(self.module, read_weights(path))
        else:
            load_weights(self.module, path, what=f"{self.cfg.method} {self.cfg.model}")

    def _restore_state(self, state: dict[str, Any]) -> None:
        # The groups' settings load with their state; the AdamW implementation stays this run's
        # (the fused one, which skips steps; older checkpoints name another).
        for group in state["optimizer"]["param_groups"]:
            group.update(fused=True, foreach=None)
        try:
            load_optimizer_state(self.module, self.optimizer, state["optimizer"], self.cfg.fsdp)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"optimizer state in {self.out} does not fit the model "
                                  f"({exc})") from None
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.skips.total.fill_(state.get("skipped", 0))
        self._set_rollbacks(state.get("rollbacks", 0))
        self.adapter.load_state_dict(state.get("adapter", {}))
        rng = state["rng"]
        set_rng_state(rng[self.info.rank] if isinstance(rng, list) else rng, self.device)

    def _start_from_official(self, path: str) -> None:
        """Weights, AdamW moments and the optimizer step of an official ``main_pretrain.py``
        checkpoint; the cosine schedule goes on from that step of this run's ``max_steps``."""
        from fastmim.train.official import start_run_from_official

        start = start_run_from_official(path, self.module, self.optimizer)
        self.step = start.step
        if self.info.is_main:
            loaded = "weights and optimizer state" if start.optimizer_loaded else "weights (no optimizer state)"
            print(f"fastmim train: starting from the official checkpoint {path}: {loaded}, step {start.step}, "
                  f"official epoch {start.epoch}", file=sys.stderr)

    def _set_rollbacks(self, count: int) -> None:
        """After a rollback the data order, augmentations and masks come from a new seed, so the
        retried steps see other batches; the state keeps the count, so a resume derives it too."""
        self.rollbacks = count
        self.data_seed = self.cfg.seed if count == 0 else derive_seed(self.cfg.seed, count, ROLLBACK_SALT)
        self.sampler.seed = self.data_seed

    # ---------------------------------------------------------------- data
    def _batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches from the saved position on, across epochs; updates ``epoch``/``position``."""
        while True:
            if self.position >= self.sampler.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            self.adapter.before_epoch(self.module, self.epoch, self._ctx(0))
            loader = epoch_loader(self.train_set, self.sampler, epoch=self.epoch, position=self.position,
                                  seed=self.data_seed, num_workers=self.num_workers, device=self.device,
                                  device_views=self.device_views)
            for batch in loader:
                self.position += 1
                yield batch

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.device_views:  # uint8 batch: crop, resize, flip and normalise here
            return views_on_device(batch, self.device, self.image_size, self.source.mean, self.source.std,
                                   on_corrupt=self.cfg.on_corrupt)
        nb = self.device.type == "cuda"
        return {"views": [v.to(self.device, non_blocking=nb) for v in batch["views"]],
                "label": batch["label"].to(self.device, non_blocking=nb), "index": batch["index"]}

    def _ctx(self, micro: int) -> StepContext:
        return StepContext(step=self.step, max_steps=self.max_steps, micro_step=micro, mask_ratio=self.mask_ratio,
                           seed=self.data_seed, rank=self.info.rank, world_size=self.info.world_size,
                           num_classes=len(self.source.classes),
                           epochs=math.ceil(self.max_steps * self.cfg.accum_steps / self.sampler.batches_per_epoch))

    # ---------------------------------------------------------------- outputs
    def metadata(self) -> dict[str, Any]:
        return {"fastmim_version": fastmim.__version__, "method": self.cfg.method, "preset": self.cfg.model,
                "model_kwargs": self.model_kwargs, "step": self.step, "max_steps": self.max_steps,
                "data": self.cfg.data, "channels": self.source.channels, "image_size": self.image_size,
                "patch_size": self.patch_size, "mean": list(self.source.mean), "std": list(self.source.std),
                "mask_ratio": self.mask_ratio, "num_classes": len(self.source.classes),
                "eval_crop_pct": self.source.eval_crop_pct}

    def save(self) -> None:
        """Write the checkpoint pair when every weight and optimizer tensor is finite, else a
        :class:`TrainError` (the last pair stays). Every rank calls it."""
        broken = nonfinite_tensor(self.module, self.optimizer, self.info)
        if broken is not None:
            raise self.divergence.error(f"{broken} is not finite at step {self.step}, so it was not saved",
                                        self.saved_step)
        self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        """Write the checkpoint pair (rank 0). Every rank's RNG state is gathered first, and under
        FSDP every rank gathers the full (unsharded) states, which rank 0 writes."""
        rng = all_gather(rng_state(self.device), self.info)
        weights, optimizer_state = full_state(self.module, self.optimizer, self.cfg.fsdp)
        if self.info.is_main:
            save_checkpoint(self.out, weights, self.metadata(), {
                "step": self.step, "epoch": self.epoch, "position": self.position, "max_steps": self.max_steps,
                "optimizer": optimizer_state, "scheduler": {"kind": "cosine", "lr": self.lr,
                                                            "warmup_steps": self.warmup, "step": self.step},
                "rng": rng, "config": self.cfg.to_json(), "world_size": self.info.world_size,
                "adapter": self.adapter.state_dict(), "skipped": int(self.skips.total), "rollbacks": self.rollbacks,
                "fastmim_version": fastmim.__version__})
            self.files["checkpoint"] = self.out / CHECKPOINT_NAME
            self.files["state"] = self.out / STATE_NAME
        # On every rank: a rollback reloads it everywhere (the next step's collectives wait for the write).
        self.saved_step = self.step

    def reconstruct(self) -> list[torch.Tensor] | None:
        """Panels of the fixed held-out images at the current weights (``None`` without a pixel
        decoder). Under FSDP every rank must call it (the root's parameters are gathered)."""
        imgs = held_out_images(self.source, self.image_size, NUM_FIGURE_IMAGES).to(self.device)
        num_patches = (self.image_size // self.patch_size) ** 2
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, FIGURE_MASK_SALT))
        noise = torch.rand(imgs.shape[0], num_patches, generator=generator).to(self.device)

        def reconstruct(images):
            with self.autocast:
                return self.adapter.reconstruct(self.module, images, self.mask_ratio, noise)

        return reconstruction_of(self.module, reconstruct, imgs, self.patch_size, self.source.mean, self.source.std)

    def plot(self, panels: list[torch.Tensor] | None, name: str, step: int) -> None:
        if panels is None:
            return
        title = (f"{self.cfg.method} {self.cfg.model} step {step}/{self.max_steps}, "
                 f"mask ratio {self.mask_ratio:g} (held-out images)")
        if getattr(self.module, "norm_pix_loss", False):
            title += "\nnormalised-pixel target: shown with each patch's own mean/std"
        plot_reconstruction(panels, self.out / name, title)
        self.files[name.removesuffix(".png")] = self.out / name

    # ---------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        start_time = time.perf_counter()
        self.saved_step = self.step if self.state is not None else -1
        resumed_at = self.step if self.state is not None else None
        if info.is_main:
            start_run_files(self.out, cfg, {"max_steps": self.max_steps, "lr": self.lr, "warmup_steps": self.warmup,
                                            "mask_ratio": self.mask_ratio, "global_batch": self.global_batch,
                                            "world_size": info.world_size, "model_kwargs": self.model_kwargs},
                            resumed_at)
            print_header(cfg, info, num_params=self.num_params, source=self.source, num_train=len(self.train_set),
                         image_size=self.image_size, global_batch=self.global_batch, lr=self.lr,
                         max_steps=self.max_steps, device=self.device.type, precision=self.precision,
                         resumed_at=resumed_at)
        if info.is_main and self.step0_panels is not None:
            self.plot(self.step0_panels, "reconstruction_step0.png", 0)

        stop_at = self.max_steps if cfg.stop_after is None else min(self.max_steps, self.step + cfg.stop_after)
        self.batches = self._batches()
        self.progress = ProgressBar(info.is_main and cfg.progress, total=self.max_steps, initial=self.step,
                                    desc=f"{cfg.method} train")
        self.module.train()
        self.window = MetricsWindow(self.device)
        self.divergence = DivergencePolicy(cfg.on_nonfinite, self.out, info.is_main)
        with DeferredInterrupt(enabled=not info.enabled) as interrupt:
            try:
                last_loss = self._steps(stop_at, interrupt)
            except KeyboardInterrupt:
                self.progress.close()
                # Only a deferred interrupt (first Ctrl-C, caught between steps) leaves a consistent state.
                if interrupt.requested and self.step > self.saved_step:
                    self.save()
                    print(f"interrupted: saved step {self.step} to {self.out} (continue with --resume)",
                          file=sys.stderr)
                raise
            finally:
                self.progress.close()  # also before a TrainError's line
        if self.step > self.saved_step:
            self.save()
        finished = self.step >= self.max_steps
        if cfg.figures and (info.is_main or cfg.fsdp):
            panels = self.reconstruct()  # every rank under FSDP: it gathers the parameters
            if info.is_main:
                self._final_figures(panels)
        skipped = int(self.skips.total)
        if info.is_main:
            self.files["metrics"] = self.out / METRICS_NAME
            self.files["config"] = self.out / CONFIG_NAME
            print_summary(finished=finished, step=self.step, max_steps=self.max_steps,
                          seconds=time.perf_counter() - start_time, skipped=skipped, loss=last_loss, files=self.files,
                          out=self.out)
        return TrainResult(self.out, self.step, self.max_steps, last_loss, time.perf_counter() - start_time,
                           dict(self.files), finished, skipped)

    def _steps(self, stop_at: int, interrupt: DeferredInterrupt) -> float | None:
        """Train up to ``stop_at``; the last loss recorded (``None`` when every step was skipped).
        A deferred Ctrl-C stops after the step it came in."""
        cfg = self.cfg
        last_loss = None
        while self.step < stop_at:
            lr = cosine_lr(self.step, lr=self.lr, max_steps=self.max_steps, warmup_steps=self.warmup,
                           min_lr=cfg.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._train_step()
            self.step += 1
            # The skip streak is read with the record, the loop's one host sync: a read every step
            # would stall the GPU's queue; skipped steps change no weights, so acting up to
            # log_every steps late costs only their time.
            streak = 0
            if self.step % cfg.log_every == 0 or self.step == stop_at or self.step == 1:
                record = self._log(lr)
                last_loss = record.loss if record.loss is not None else last_loss
                streak = record.streak
            self.progress.update()
            if streak >= cfg.max_skips:
                reason = self.divergence.after_skips(streak, self.step, stop_at, self.saved_step)
                if reason is not None:
                    self._rollback(reason)
            elif cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < stop_at:
                self._periodic_save()
            if interrupt.requested:
                raise KeyboardInterrupt
        return last_loss

    def _train_step(self) -> None:
        """One optimizer step: the micro-steps' forwards and backwards, then AdamW unless the loss
        or the gradient norm is not finite. The decision stays on the device, without a host
        sync: fused AdamW takes it as ``found_inf`` and on a skipped step leaves parameters,
        moments and its step count (so the bias correction) as they were."""
        cfg, info = self.cfg, self.info
        step_loss = torch.zeros((), device=self.device)
        parts: dict[str, torch.Tensor] = {}
        for micro in range(cfg.accum_steps):
            batch = self._to_device(next(self.batches))
            sync = micro == cfg.accum_steps - 1 or not info.enabled
            if cfg.fsdp:
                self.module.set_requires_gradient_sync(sync)
            with (nullcontext() if sync or cfg.fsdp else self.model.no_sync()), self.autocast:
                out = self.adapter.loss(self.model, batch, self._ctx(micro))
            loss = out["loss"]
            (loss / cfg.accum_steps).backward()
            step_loss += loss.detach().float() / cfg.accum_steps
            for k, v in out.items():
                if k != "loss" and isinstance(v, torch.Tensor) and v.numel() == 1:
                    parts[k] = parts.get(k, 0) + v.detach().float() / cfg.accum_steps
        params = [p for p in self.module.parameters() if p.grad is not None]
        if cfg.clip_grad is not None:  # clipping computes the total norm anyway
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(grad_norm, DTensor):  # FSDP: the norm of every rank's shards
            grad_norm = grad_norm.full_tensor()
        skip = skip_flag(step_loss, grad_norm, info)
        self.optimizer.found_inf = skip
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # After a skipped step the student is unchanged: an EMA teacher moving towards it takes in nothing non-finite.
        self.adapter.after_step(self.module, self._ctx(cfg.accum_steps - 1))
        self.skips.count(skip)
        self.window.add(step_loss, parts, skip)

    def _log(self, lr: float) -> Record:
        """Write the window's metrics record (rank 0), show it on the bar and start the next window."""
        epoch = self.epoch + self.position / self.sampler.batches_per_epoch
        record = self.window.record(self.skips.total, self.skips.streak, self.info, step=self.step, epoch=epoch, lr=lr,
                                    global_batch=self.global_batch)
        if self.info.is_main:
            append_metrics(self.out, record.values)
            self.progress.show(record, lr)
        self.window.reset()
        return record

    def _periodic_save(self) -> None:
        """A checkpoint after a step that was not skipped (after a skipped one the weights are
        those of the last good step, whose checkpoint stays the one to go back to), if every
        tensor is finite; non-finite weights roll back (on_nonfinite="rollback") or end the run."""
        if self.skips.latest.item():  # a host sync, as the save's own
            return
        broken = nonfinite_tensor(self.module, self.optimizer, self.info)
        if broken is None:
            self._write_checkpoint()
        elif self.cfg.on_nonfinite == "rollback":
            self._rollback(f"{broken} is not finite at step {self.step}")
        else:
            raise self.divergence.error(f"{broken} is not finite at step {self.step}, so it was not saved",
                                        self.saved_step)

    def _rollback(self, reason: str) -> None:
        """Reload the last checkpoint (weights, optimizer, position, RNG) and go on with a fresh
        data order; the run stops when it diverges again after ``ROLLBACKS_PER_CHECKPOINT``
        rollbacks to the same checkpoint (:class:`fastmim.train.guard.DivergencePolicy`)."""
        self.divergence.count_rollback(reason, self.saved_step)
        from_step, rollbacks, skipped = self.step, self.rollbacks, self.skips.total.clone()
        state = load_checkpoint_state(self.out)
        self._restore_weights()
        self._restore_state(state)
        # The run's counts go on: the skipped steps were skipped, and each rollback needs a new seed.
        self.skips.total.copy_(skipped)
        self._set_rollbacks(rollbacks + 1)
        self.skips.streak.zero_()
        self.skips.latest.zero_()
        self.batches.close()
        self.batches = self._batches()
        self.window.reset()
        self.progress.rewind(self.step)
        if self.info.is_main:
            truncate_metrics(self.out, self.step)
            append_metrics(self.out, {"step": self.step, "rolled_back_from": from_step, "rollbacks": self.rollbacks,
                                      "skipped": int(skipped)})
            warnings.warn(f"{reason}: rolled back to the checkpoint of step {self.step}, going on with a fresh "
                          f"data order (rollback {self.rollbacks})", stacklevel=2)

    def _final_figures(self, panels: list[torch.Tensor] | None) -> None:
        records = read_metrics(self.out / METRICS_NAME)
        if records:
            plot_loss(records, self.out / "loss.png",
                      f"{self.cfg.method} {self.cfg.model} on {self.source.name}, global batch {self.global_batch}")
            self.files["loss"] = self.out / "loss.png"
        self.plot(panels, "reconstruction.png", self.step)


def train(cfg: TrainConfig, *, explicit: set[str] | None = None) -> TrainResult:
    """Run (or, with ``cfg.resume``, continue) a training run; see the module docstring.

    ``explicit``: names of the settings the user gave explicitly (the CLI passes them), so a
    resumed run can reject changed settings; with ``None`` every non-runtime field counts.
    """
    if explicit is None:
        defaults = TrainConfig()
        explicit = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    run = _Run(cfg, explicit)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            run.setup()
            return run.run()
    finally:
        shutdown_distributed()
