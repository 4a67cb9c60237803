"""The training job behind ``fastmim train``.

One function, :func:`train`, runs a :class:`TrainConfig`: data → model → AdamW with the MAE
recipe → steps with gradient accumulation, bf16 autocast on GPU, optional ``torch.compile``
and DistributedDataParallel (or FSDP2) under torchrun → metrics JSONL, progress bar, atomic
checkpoints, and at the end a loss plot and a reconstruction figure. The pieces around the
loop have modules of their own: the run folder and its metrics log
(:mod:`fastmim.train.run_folder`), checkpoints and RNG state (:mod:`fastmim.train.checkpoint`),
devices and processes (:mod:`fastmim.train.distributed`), the non-finite guard
(:mod:`fastmim.train.guard`), figures (:mod:`fastmim.train.plots`), and each method's steps
(:mod:`fastmim.train.methods`).

The checkpoint pair is replaced crash-safely (:func:`fastmim.train.checkpoint.save_checkpoint`):
a crash while saving leaves the previous pair or the new one, and ``--resume`` finds it; the
temporary files a kill during a write leaves are removed when the folder is next used.
``overwrite=True`` starts a new run in a folder holding one, removing that run's files first.

Non-finite values never reach the weights or a checkpoint. Each step whose loss or gradient
norm is nan/inf is skipped (no optimizer update, the optimizer's step count unchanged),
decided on the device without a host sync; records count the skipped steps. When
``max_skips`` steps in a row were skipped (read with each metrics record), ``on_nonfinite``
decides: ``skip`` goes on (a run that ends so fails), ``rollback`` reloads the last checkpoint
and retries with a fresh data order, ``stop`` ends with an error. A checkpoint is written only
when every weight and optimizer tensor is finite, and a periodic one only after a step that
was not skipped, so it never replaces the last good one; a run whose weights end non-finite
is an error, never a success.

Resuming (``resume=True``) reloads weights and state and continues exactly: the data order
and augmentations are a function of ``(seed, epoch, position)``, the masking noise of
``(seed, step)`` (``seed`` re-derived after each rollback, whose count the state keeps), the
schedule of the step, and the remaining RNG states are restored — on CPU the parameters
after N steps are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

import fastmim
from fastmim.data import (
    DataSource,
    DecodedImageFolder,
    ImageFolderDataset,
    TrainBatchSampler,
    build_views,
    collate_decoded,
    derive_seed,
    open_data,
    views_on_device,
)
from fastmim.train.checkpoint import (
    CHECKPOINT_NAME,
    STATE_NAME,
    CheckpointError,
    atomic_write,
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
    all_reduce_mean,
    init_distributed,
    resolve_device,
    shard_fsdp,
    shutdown_distributed,
)
from fastmim.train.guard import nonfinite_tensor, skip_flag
from fastmim.train.methods import StepContext, build_model, get_adapter, resolve_model
from fastmim.train.plots import held_out_images, plot_loss, plot_reconstruction, read_metrics, reconstruction_of
from fastmim.train.run_folder import (
    append_metrics,
    create_output,
    merge_resumed_config,
    prepare_output,
    truncate_metrics,
)
from fastmim.train.schedule import cosine_lr, default_warmup_steps, scaled_lr

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train", "build_model", "DEFAULT_MAX_STEPS"]

# Salts of the seeds derived from the run's seed (fastmim.data.derive_seed), one per use, so
# that no two streams of random numbers coincide: the DataLoader's generator of each epoch,
# the data seed after a rollback, the masks of the reconstruction figures.
LOADER_SALT, ROLLBACK_SALT, FIGURE_MASK_SALT = 7, 0xB0C, 0xF16
# Fresh data orders tried from one checkpoint (on_nonfinite="rollback") before the run gives up.
ROLLBACKS_PER_CHECKPOINT = 3


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


def _seed_worker(worker_id: int) -> None:
    # Augmentations use per-sample generators; this only keeps any stray numpy/random use seeded.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _format_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


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
        self.device_views = self._device_views()
        if self.device_views:  # workers decode, the views are made on the device (fastmim.data.pipeline)
            self.train_set = DecodedImageFolder(self.source.train, self.image_size, num_views=self.adapter.num_views,
                                                crop_sampler=crop_sampler, decode=cfg.decode)
        else:
            views = build_views(self.source, self.image_size, num_views=self.adapter.num_views,
                                second_view=self.adapter.second_view, crop_sampler=crop_sampler)
            self.train_set = self.source.split("train", views)
        try:
            self.sampler = TrainBatchSampler(len(self.train_set), cfg.batch_size, seed=cfg.seed,
                                             rank=self.info.rank, world_size=self.info.world_size)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        self.global_batch = cfg.batch_size * self.info.world_size * cfg.accum_steps
        micro_per_epoch = self.sampler.batches_per_epoch
        if cfg.max_steps is not None:
            self.max_steps = cfg.max_steps
        elif cfg.epochs is not None:
            self.max_steps = max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.accum_steps))
        else:
            self.max_steps = DEFAULT_MAX_STEPS
        self.lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, self.global_batch)
        check_lr(self.lr, cfg)
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup_steps(self.max_steps)

        from timm.optim import param_groups_weight_decay

        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.precision = "bf16" if use_bf16 else "fp32"
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        self.step, self.epoch, self.position = 0, 0, 0
        # The skipping guard's counters stay on the device; the loop reads them with each record.
        self.skipped = torch.zeros((), device=self.device)  # steps skipped so far (rolled-back ones included)
        self.skip_streak = torch.zeros((), device=self.device)  # steps skipped in a row up to the latest
        self.step_skipped = torch.zeros((), device=self.device)  # 1 when the latest step was skipped, else 0
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
        if cfg.num_workers is not None:
            self.num_workers = cfg.num_workers
        else:
            self.num_workers = 0 if self.device.type == "cpu" else min(8, (os.cpu_count() or 1) // max(
                1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        # Last: a run that cannot start leaves the folder (and, with --overwrite, the old run) as it was.
        create_output(self.out, self.info, cfg.overwrite)

    def _restore_weights(self) -> None:
        # load_checkpoint_state chose the state of these weights' step.
        path = self.out / CHECKPOINT_NAME
        if hasattr(self.module, "unshard"):  # sharded by FSDP (a rollback): every rank loads the full weights
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.module, read_weights(path), options=StateDictOptions(full_state_dict=True))
        else:
            load_weights(self.module, path, what=f"{self.cfg.method} {self.cfg.model}")

    def _restore_state(self, state: dict[str, Any]) -> None:
        # The groups' settings load with their state; the AdamW implementation stays this run's
        # (the fused one, which skips steps; older checkpoints name another).
        for group in state["optimizer"]["param_groups"]:
            group.update(fused=True, foreach=None)
        try:
            if self.cfg.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"optimizer state in {self.out} does not fit the model "
                                  f"({exc})") from None
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.skipped.fill_(state.get("skipped", 0))
        self._set_rollbacks(state.get("rollbacks", 0))
        self.adapter.load_state_dict(state.get("adapter", {}))
        rng = state["rng"]
        set_rng_state(rng[self.info.rank] if isinstance(rng, list) else rng, self.device)

    def _start_from_official(self, path: str) -> None:
        """Weights, AdamW moments and the optimizer step of an official ``main_pretrain.py``
        checkpoint; the cosine schedule goes on from that step of this run's ``max_steps``."""
        from fastmim.train.official import init_from_official

        try:
            start = init_from_official(path, self.module, self.optimizer)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise TrainError(f"--init-from-official {path}: {exc}") from None
        # The Adam moments keep fused AdamW, which takes the non-finite guard's found_inf.
        for group in self.optimizer.param_groups:
            group.update(fused=True, foreach=None)
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
    def _device_views(self) -> bool:
        """Whether the run takes the fastmim input pipeline: image folders under ``--input fastmim``,
        except LUT's photometric second view (colour jitter, blur, solarize), made on the CPU."""
        cfg = self.cfg
        folder = isinstance(self.source.train, ImageFolderDataset)
        if cfg.decode == "gpu":
            if not folder:
                raise TrainError("--decode gpu decodes image files: the bundled data is held decoded in memory")
            if self.device.type != "cuda":
                raise TrainError(f"--decode gpu decodes JPEGs with nvJPEG (torchvision.io.decode_jpeg on CUDA) and "
                                 f"needs a CUDA device; this run is on {self.device.type} (use --decode cpu)")
        if cfg.input != "fastmim" or not folder:
            return False
        if self.adapter.second_view == "photometric":
            if cfg.decode == "gpu":
                raise TrainError(f"--decode gpu: {cfg.method}'s photometric second view is made on the CPU, from "
                                 f"pixels decoded there (use --decode cpu)")
            if self.info.is_main:
                print(f"fastmim train: {cfg.method}'s photometric second view runs on the CPU: its views come from "
                      f"the float augmentations in the workers (as --input torchvision)", file=sys.stderr)
            return False
        return True

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches from the saved position on, across epochs; updates ``epoch``/``position``."""
        while True:
            if self.position >= self.sampler.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            self.adapter.before_epoch(self.module, self.epoch, self._ctx(0))
            generator = torch.Generator().manual_seed(derive_seed(self.data_seed, self.epoch, LOADER_SALT))
            loader = DataLoader(self.train_set, batch_sampler=self.sampler.epoch(self.epoch, self.position),
                                num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                                worker_init_fn=_seed_worker, generator=generator, persistent_workers=False,
                                collate_fn=collate_decoded if self.device_views else None)
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
            raise TrainError(self._diverged(f"{broken} is not finite at step {self.step}, so it was not saved"))
        self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        """Write the checkpoint pair (rank 0). Every rank's RNG state is gathered first."""
        rng = rng_state(self.device)
        if self.info.enabled:
            gathered: list[Any] = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        if self.cfg.fsdp:  # collectives: every rank gathers the full (unsharded) states, rank 0 writes them
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.module, options=options)
            optimizer_state = get_optimizer_state_dict(self.module, self.optimizer, options=options)
        else:
            weights, optimizer_state = self.module.state_dict(), self.optimizer.state_dict()
        if self.info.is_main:
            save_checkpoint(self.out, weights, self.metadata(), {
                "step": self.step, "epoch": self.epoch, "position": self.position, "max_steps": self.max_steps,
                "optimizer": optimizer_state, "scheduler": {"kind": "cosine", "lr": self.lr,
                                                            "warmup_steps": self.warmup, "step": self.step},
                "rng": rng, "config": self.cfg.to_json(), "world_size": self.info.world_size,
                "adapter": self.adapter.state_dict(), "skipped": int(self.skipped), "rollbacks": self.rollbacks,
                "fastmim_version": fastmim.__version__})
            self.files["checkpoint"] = self.out / CHECKPOINT_NAME
            self.files["state"] = self.out / STATE_NAME
        # On every rank: a rollback reloads it everywhere (the next step's collectives wait for the write).
        self.saved_step = self.step

    def _diverged(self, reason: str) -> str:
        kept = (f"the checkpoint of step {self.saved_step} in {self.out} is kept" if self.saved_step >= 0
                else "no checkpoint was written")
        return f"{reason}: training diverged (try a lower --blr, --clip-grad, or --precision fp32); {kept}"

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
        if info.is_main:
            atomic_write(self.out / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(
                {**cfg.to_json(), "resolved": {"max_steps": self.max_steps, "lr": self.lr,
                                               "warmup_steps": self.warmup, "mask_ratio": self.mask_ratio,
                                               "global_batch": self.global_batch, "world_size": info.world_size,
                                               "model_kwargs": self.model_kwargs}}, indent=2) + "\n"))
            if self.state is not None:
                truncate_metrics(self.out, self.step)
            elif (self.out / METRICS_NAME).exists():
                (self.out / METRICS_NAME).unlink()
            self._print_header()
        if info.is_main and self.step0_panels is not None:
            self.plot(self.step0_panels, "reconstruction_step0.png", 0)

        stop_at = self.max_steps if cfg.stop_after is None else min(self.max_steps, self.step + cfg.stop_after)
        self.batches = self._batches()
        progress = self._progress()
        self.module.train()
        self._new_window()
        last_loss = None
        self.rollback_target, self.rollback_attempts, self.warned_streak = -1, 0, 0
        previous_handler = self._catch_sigint()
        try:
            while self.step < stop_at:
                lr = cosine_lr(self.step, lr=self.lr, max_steps=self.max_steps, warmup_steps=self.warmup,
                               min_lr=cfg.min_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self._train_step()
                self.step += 1
                self.window_steps += 1
                # The skip streak is read with the record, the loop's one host sync: a read every step
                # would stall the GPU's queue; skipped steps change no weights, so acting up to
                # log_every steps late costs only their time.
                streak = 0
                if self.step % cfg.log_every == 0 or self.step == stop_at or self.step == 1:
                    loss, streak = self._log(lr, progress)
                    last_loss = loss if loss is not None else last_loss
                    self._new_window()
                if progress is not None:
                    progress.update(1)
                if streak >= cfg.max_skips:
                    self._diverging(streak, stop_at, progress)
                elif cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < stop_at:
                    self._periodic_save(progress)
                if self._interrupted:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if progress is not None:
                progress.close()
            # Only a deferred interrupt (first Ctrl-C, caught between steps) leaves a consistent state.
            if self._interrupted and self.step > self.saved_step:
                self.save()
                print(f"interrupted: saved step {self.step} to {self.out} (continue with --resume)", file=sys.stderr)
            raise
        finally:
            if progress is not None:
                progress.close()  # also before a TrainError's line
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if self.step > self.saved_step:
            self.save()
        finished = self.step >= self.max_steps
        if cfg.figures and (info.is_main or cfg.fsdp):
            panels = self.reconstruct()  # every rank under FSDP: it gathers the parameters
            if info.is_main:
                self._final_figures(panels)
        skipped = int(self.skipped)
        if info.is_main:
            self.files["metrics"] = self.out / METRICS_NAME
            self.files["config"] = self.out / CONFIG_NAME
            seconds = time.perf_counter() - start_time
            what = "finished" if finished else f"stopped at step {self.step} of {self.max_steps} (--resume continues)"
            loss_text = f", loss {last_loss:.4f}" if last_loss is not None else ""
            skipped_text = f", {skipped} skipped (non-finite loss or gradient)" if skipped else ""
            print(f"{what}: {self.step} steps in {_format_time(seconds)}{skipped_text}{loss_text}; wrote "
                  f"{', '.join(sorted(p.name for p in self.files.values()))} to {self.out}", file=sys.stderr)
        return TrainResult(self.out, self.step, self.max_steps, last_loss, time.perf_counter() - start_time,
                           dict(self.files), finished, skipped)

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
        kept = skip == 0
        self.step_skipped = skip
        self.skipped += skip
        self.skip_streak = (self.skip_streak + skip) * skip
        self.window_loss += torch.where(kept, step_loss, 0.0)
        self.window_kept += 1.0 - skip
        for k, v in parts.items():
            self.window_parts[k] = self.window_parts.get(k, 0) + torch.where(kept, v, 0.0)

    def _new_window(self) -> None:
        """Start the sums of the next metrics record (device tensors, added to without a sync)."""
        self.window_loss = torch.zeros((), device=self.device)  # over the steps not skipped
        self.window_kept = torch.zeros((), device=self.device)  # how many those are
        self.window_parts: dict[str, torch.Tensor] = {}
        self.window_steps, self.window_start = 0, time.perf_counter()

    def _periodic_save(self, progress: Any) -> None:
        """A checkpoint after a step that was not skipped (after a skipped one the weights are
        those of the last good step, whose checkpoint stays the one to go back to), if every
        tensor is finite; non-finite weights roll back (on_nonfinite="rollback") or end the run."""
        if self.step_skipped.item():  # a host sync, as the save's own
            return
        broken = nonfinite_tensor(self.module, self.optimizer, self.info)
        if broken is None:
            self._write_checkpoint()
        elif self.cfg.on_nonfinite == "rollback":
            self._rollback(f"{broken} is not finite at step {self.step}", progress)
        else:
            raise TrainError(self._diverged(f"{broken} is not finite at step {self.step}, so it was not saved"))

    def _diverging(self, streak: int, stop_at: int, progress: Any) -> None:
        """``max_skips`` or more steps in a row were skipped: act as ``on_nonfinite`` says."""
        reason = f"the last {streak} steps (to step {self.step}) had a non-finite loss or gradient and were skipped"
        if self.cfg.on_nonfinite == "rollback":
            self._rollback(reason, progress)
        elif self.cfg.on_nonfinite == "stop" or self.step >= stop_at:
            raise TrainError(self._diverged(reason))
        elif self.warned_streak != self.step - streak + 1:  # once per streak
            self.warned_streak = self.step - streak + 1
            if self.info.is_main:
                warnings.warn(f"{reason}; going on (--on-nonfinite skip: a run that ends so fails)", stacklevel=2)

    def _rollback(self, reason: str, progress: Any) -> None:
        """Reload the last checkpoint (weights, optimizer, position, RNG) and go on with a fresh
        data order; the run stops when it diverges again after ``ROLLBACKS_PER_CHECKPOINT``
        rollbacks to the same checkpoint."""
        if self.saved_step < 0:
            raise TrainError(self._diverged(f"{reason}; there is no checkpoint yet to roll back to"))
        if self.saved_step == self.rollback_target:
            self.rollback_attempts += 1
        else:
            self.rollback_target, self.rollback_attempts = self.saved_step, 1
        if self.rollback_attempts > ROLLBACKS_PER_CHECKPOINT:
            raise TrainError(self._diverged(f"{reason}, after {ROLLBACKS_PER_CHECKPOINT} rollbacks to step "
                                            f"{self.saved_step} with fresh data orders"))
        from_step, rollbacks, skipped = self.step, self.rollbacks, self.skipped.clone()
        state = load_checkpoint_state(self.out)
        self._restore_weights()
        self._restore_state(state)
        # The run's counts go on: the skipped steps were skipped, and each rollback needs a new seed.
        self.skipped.copy_(skipped)
        self._set_rollbacks(rollbacks + 1)
        self.skip_streak.zero_()
        self.step_skipped.zero_()
        self.batches.close()
        self.batches = self._batches()
        self._new_window()
        if progress is not None:
            progress.n = self.step
            progress.refresh()
        if self.info.is_main:
            truncate_metrics(self.out, self.step)
            append_metrics(self.out, {"step": self.step, "rolled_back_from": from_step, "rollbacks": self.rollbacks,
                                 "skipped": int(skipped)})
            warnings.warn(f"{reason}: rolled back to the checkpoint of step {self.step}, going on with a fresh "
                          f"data order (rollback {self.rollbacks})", stacklevel=2)

    def _catch_sigint(self) -> Any:
        """Defer a first Ctrl-C to the end of the current step (then save and stop); a second
        one aborts at once. Single-process runs in the main thread only: under DDP every
        rank would have to agree on the step, so there an interrupt just stops."""
        self._interrupted = False
        if self.info.enabled or threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            print("\ninterrupt: finishing this step and saving (Ctrl-C again to abort without saving)",
                  file=sys.stderr)

        return signal.signal(signal.SIGINT, handler)

    def _final_figures(self, panels: list[torch.Tensor] | None) -> None:
        records = read_metrics(self.out / METRICS_NAME)
        if records:
            plot_loss(records, self.out / "loss.png",
                      f"{self.cfg.method} {self.cfg.model} on {self.source.name}, global batch {self.global_batch}")
            self.files["loss"] = self.out / "loss.png"
        self.plot(panels, "reconstruction.png", self.step)

    def _log(self, lr: float, progress: Any) -> tuple[float | None, int]:
        """Write the window's metrics record; ``(its mean loss, None when every step of the window
        was skipped; the number of steps skipped in a row up to now)``."""
        info = self.info
        values = torch.stack([self.window_loss, self.window_kept, self.skipped, self.skip_streak,
                              *self.window_parts.values()])
        values = all_reduce_mean(values, info).cpu()  # the only host sync of the loop, once per log
        kept, skipped, streak = int(values[1]), int(values[2]), int(values[3])
        loss = float(values[0] / values[1]) if kept else None
        elapsed = time.perf_counter() - self.window_start
        img_per_s = self.window_steps * self.global_batch / max(elapsed, 1e-9)
        record: dict[str, Any] = {"step": self.step,
                                  "epoch": round(self.epoch + self.position / self.sampler.batches_per_epoch, 4)}
        if loss is not None:
            record["loss"] = loss
        record.update(lr=lr, img_per_s=round(img_per_s, 2), skipped=skipped)
        if self.window_parts and kept:
            record["parts"] = {k: float(v / values[1]) for k, v in zip(self.window_parts, values[4:], strict=True)}
        if info.is_main:
            append_metrics(self.out, record)
            if progress is not None:
                postfix = {"loss": "skipped" if loss is None else f"{loss:.4f}", "lr": f"{lr:.2e}",
                           "img_s": f"{img_per_s:.0f}"}
                if skipped:
                    postfix["skipped"] = str(skipped)
                progress.set_postfix(postfix, refresh=False)
        return loss, streak

    def _progress(self):
        if not (self.info.is_main and self.cfg.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.max_steps, initial=self.step, desc=f"{self.cfg.method} train", unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    def _print_header(self) -> None:
        cfg, info = self.cfg, self.info
        ch = self.source.channels
        accum = f" x accum {cfg.accum_steps}" if cfg.accum_steps > 1 else ""
        procs = f" x {info.world_size} processes" if info.enabled else ""
        resumed = f", resuming at step {self.step}" if self.state is not None else ""
        print(f"fastmim train: {cfg.method} {cfg.model} ({self.num_params / 1e6:.2f}M params) on {self.source.name} "
              f"({len(self.train_set)} train images, {ch} channel{'s' if ch > 1 else ''}, {self.image_size}px); "
              f"batch {cfg.batch_size}{procs}{accum} = {self.global_batch}, lr {self.lr:.3g}, "
              f"{self.max_steps} steps on {self.device.type} ({self.precision}){resumed}", file=sys.stderr)


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
