"""How the training loop drives each method: one small adapter per method.

An adapter says what the data must provide (one view or two, the second plain or with
LUT's photometric augmentations, labels or not), turns a batch into the model's inputs and
returns ``{"loss": scalar, <part>: scalar, ...}`` (the parts are logged), and may act at
epoch starts (ContrastiveCrop box refresh) and after each optimizer step (an EMA teacher).
The loop never looks inside a model.

Adding a method: subclass :class:`MethodAdapter`, then ``register_adapter(MyAdapter())``
(here, next to the others, so ``fastmim train --method NAME`` finds it). The model itself
comes from ``fastmim.models.create_model(name, preset, **overrides)``.

Masks: the adapters hand the model :meth:`StepContext.masking_seed`, one seed per
``(seed, step, micro-step)`` shared by every rank, and ``offset`` =
:meth:`StepContext.masking_offset`, the index of this rank's first image in the global batch.
fastmim's models then mask with the fused ``fastmim.ops.random_masking`` /
``random_permutation`` (counter-based RNG, no host sync), image ``b`` as sample ``offset + b``
of the seed: each image gets the same mask whatever the number of processes, and a resumed
run replays the same masks. A model whose forward takes ``noise`` but no ``seed`` (the
official MAE's) gets :meth:`StepContext.masking_noise` instead, this rank's rows of uniform
noise drawn for the whole global batch, which has the same two properties.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastmim.data.sampler import derive_seed
from fastmim.train.config import TrainConfig, TrainError

__all__ = [
    "StepContext",
    "MethodAdapter",
    "MAEAdapter",
    "SupervisedMIMAdapter",
    "TwoViewAdapter",
    "CMAEAdapter",
    "LUTAdapter",
    "register_adapter",
    "get_adapter",
    "list_adapters",
]


# The last key of the masks' seeds, derive_seed(run seed, step, micro-step, MASKING_SALT): it keeps
# their stream apart from the other streams derived from the run seed (the data order's, the loader's).
MASKING_SALT = 0x3A5C


@dataclass
class StepContext:
    """What an adapter may need besides the batch."""

    step: int  # optimizer step being computed, 0-based
    max_steps: int
    micro_step: int  # index within gradient accumulation
    mask_ratio: float
    seed: int
    rank: int = 0
    world_size: int = 1
    num_classes: int | None = None
    epochs: int | None = None  # epochs the whole run spans (rounded up), for epoch-based schedules

    def masking_seed(self) -> torch.Tensor:
        """The seed of this micro-step's masks, the same on every rank: an int64 CPU scalar.

        A tensor rather than an int: a compiled model specialises on an int argument, and a new
        one at every step would recompile it; a host tensor also costs the op no device sync.
        """
        return torch.tensor(derive_seed(self.seed, self.step, self.micro_step, MASKING_SALT), dtype=torch.int64)

    def masking_offset(self, batch_size: int) -> int:
        """Index of this rank's first image in the global batch (ranks hold consecutive shares of
        ``batch_size`` images): the sample offset of the masking RNG."""
        return self.rank * batch_size

    def masking_noise(self, batch_size: int, num_patches: int, device: torch.device | str) -> torch.Tensor:
        """``float32 (batch_size, num_patches)`` uniform noise: this rank's rows of the global batch's noise."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.step, self.micro_step, MASKING_SALT))
        noise = torch.rand(batch_size * self.world_size, num_patches, generator=generator)
        rows = noise[self.rank * batch_size:(self.rank + 1) * batch_size]
        return rows.to(device, non_blocking=True)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _masking_kwargs(module: nn.Module, ctx: StepContext, batch_size: int, device: torch.device | str,
                    noise_rows: int | None = None) -> dict[str, Any]:
    """How ``module`` is told its masks: ``seed`` and ``offset`` when its forward takes them
    (fastmim's counter-based masking), else ``noise`` (``noise_rows`` rows, default one per image)
    when it takes that or masks by the official rule (``masking="official"``: the argsort of
    noise, here the step's noise rather than torch's generator), else nothing."""
    official = getattr(module, "masking", None) == "official"
    if not official and _accepts(module.forward, "seed") and _accepts(module.forward, "offset"):
        return {"seed": ctx.masking_seed(), "offset": ctx.masking_offset(batch_size)}
    if _accepts(module.forward, "noise"):
        return {"noise": ctx.masking_noise(noise_rows or batch_size, module.patch_embed.num_patches, device)}
    return {}


def unwrap(model: nn.Module) -> nn.Module:
    """The user module under DistributedDataParallel / FSDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class MethodAdapter:
    """Base adapter. Class attributes describe the data; methods run the model.

    ``model`` passed to :meth:`loss` is what the loop calls (maybe wrapped in DDP or
    compiled): call it, do not read attributes from it; :func:`unwrap` gives the module.
    """

    name: str = ""
    num_views: int = 1
    second_view: str = "same"  # "same" or "photometric" (LUT)
    uses_labels: bool = False
    default_mask_ratio: float = 0.75

    def model_overrides(self, channels: int, image_size: int | None, num_classes: int) -> dict[str, Any]:
        """Constructor overrides the data imposes (channels, image size, classes if supervised)."""
        del num_classes
        overrides: dict[str, Any] = {"in_chans": channels}
        if image_size is not None:
            overrides["img_size"] = image_size
        return overrides

    def crop_sampler(self, module: nn.Module, source: Any) -> Any:
        """A :class:`fastmim.data.CropSampler` for the training views, or ``None`` for
        RandomResizedCrop. ContrastiveCrop returns its box-driven sampler here."""
        del module, source
        return None

    def before_epoch(self, module: nn.Module, epoch: int, ctx: StepContext) -> None:
        """Called before each epoch's DataLoader starts (its workers see changes made here)."""

    def loss(self, model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, module: nn.Module, ctx: StepContext) -> None:
        """Called after each optimizer step (e.g. an EMA teacher update)."""

    def state_dict(self) -> dict[str, Any]:
        """Per-run state the adapter keeps outside the model, saved with each checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` on ``--resume``."""
        del state

    def reconstruct(self, module: nn.Module, imgs: torch.Tensor, mask_ratio: float,
                    noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(reconstruction (B, C, H, W), mask (B, L))`` for the figure, or ``None`` when the
        method has no pixel decoder. Works for any model with MAE's ``forward_encoder`` /
        ``forward_decoder`` / ``unpatchify``; the prediction is de-normalised with each
        patch's own mean and std when the model trains on normalised pixels (fastmim's models:
        their public ``reconstruct``)."""
        if not all(hasattr(module, a) for a in ("forward_encoder", "forward_decoder", "unpatchify", "patchify")):
            return None
        latent, mask, ids_restore = module.forward_encoder(imgs, mask_ratio, noise)
        pred = module.forward_decoder(latent, ids_restore)
        if pred.shape[1] != mask.shape[1]:
            return None  # masked-rows-only decoders: nothing to paste
        if callable(getattr(module, "reconstruct", None)):
            return module.reconstruct(imgs, pred, mask), mask
        if getattr(module, "norm_pix_loss", False):
            target = module.patchify(imgs)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        return module.unpatchify(pred.float()), mask

    def encode(self, module: nn.Module, imgs: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """``(B, D)`` features for k-NN / linear probing."""
        if pool is not None:
            return module.encode(imgs, pool=pool)
        return module.encode(imgs)


class MAEAdapter(MethodAdapter):
    """MAE: ``model(imgs, mask_ratio, seed=, offset=) -> (loss, pred, mask)`` (or ``noise=``
    for a model that takes only that)."""

    name = "mae"

    def loss(self, model, batch, ctx):
        imgs = batch["views"][0]
        loss, _, _ = model(imgs, ctx.mask_ratio, **_masking_kwargs(unwrap(model), ctx, imgs.shape[0], imgs.device))
        return {"loss": loss}


class SupervisedMIMAdapter(MethodAdapter):
    """Supervised + MIM: ``model(imgs, labels[, mask_ratio][, seed=, offset= | noise=]) ->
    {"loss": ..., parts}``; the classifier gets the dataset's number of classes. ``supmae`` is
    the same model with SupMAE's recipe (its mask ratio comes from the model)."""

    uses_labels = True

    def __init__(self, name: str = "supmim", default_mask_ratio: float = 0.5):
        self.name = name
        self.default_mask_ratio = default_mask_ratio

    def model_overrides(self, channels, image_size, num_classes):
        return {**super().model_overrides(channels, image_size, num_classes), "num_classes": num_classes}

    def loss(self, model, batch, ctx):
        imgs, labels = batch["views"][0], batch["label"]
        module = unwrap(model)
        kwargs = _masking_kwargs(module, ctx, imgs.shape[0], imgs.device)
        if _accepts(module.forward, "mask_ratio"):
            kwargs["mask_ratio"] = ctx.mask_ratio
        return _as_dict(model(imgs, labels, **kwargs))


class TwoViewAdapter(MethodAdapter):
    """Methods on two augmented views (CMAE, LUT): ``model(view1, view2[, mask_ratio]) ->
    {"loss": ..., parts}``; after each step, ``update_teacher(step, max_steps)`` if the model
    has one (LUT's EMA teacher). A placeholder until the methods' authors refine it."""

    num_views = 2

    def __init__(self, name: str, second_view: str = "same", default_mask_ratio: float = 0.75):
        self.name = name
        self.second_view = second_view
        self.default_mask_ratio = default_mask_ratio

    def loss(self, model, batch, ctx):
        view1, view2 = batch["views"]
        kwargs = {"mask_ratio": ctx.mask_ratio} if _accepts(unwrap(model).forward, "mask_ratio") else {}
        return _as_dict(model(view1, view2, **kwargs))

    def after_step(self, module, ctx):
        update = getattr(module, "update_teacher", None)
        if callable(update):
            update(ctx.step + 1, ctx.max_steps)


class CMAEAdapter(TwoViewAdapter):
    """CMAE: ``model(view1, view2, mask_ratio, seed=, offset=) -> {"loss", "loss_mim", "loss_con",
    "loss_pos"}`` (both views' masks from one ``random_masking`` call); the views' crops come
    from :class:`fastmim.data.ContrastiveCrop`, whose boxes this adapter refreshes from the
    model before the epochs its schedule names.

    ContrastiveCrop options (``alpha``, ``threshold``, ``warmup`` and ``box_update_every`` in
    epochs; unset: 20% of the run each) are the constructor's ``ccrop`` dict; ``ccrop=None``
    disables it (RandomResizedCrop throughout)."""

    def __init__(self, ccrop: dict[str, Any] | None = None, box_batch_size: int = 256):
        super().__init__("cmae")
        self.ccrop_options = {} if ccrop is None else dict(ccrop)
        self.use_ccrop = ccrop is not None
        self.box_batch_size = box_batch_size
        self.contrastive_crop = None
        self._source = None

    def crop_sampler(self, module, source):
        if not self.use_ccrop:
            return None
        from fastmim.data.contrastive_crop import ContrastiveCrop

        self._source = source
        self.contrastive_crop = ContrastiveCrop(len(source.train), **self.ccrop_options)
        return self.contrastive_crop

    def before_epoch(self, module, epoch, ctx):
        crop = self.contrastive_crop
        if crop is None:
            return
        if not crop.scheduled:
            epochs = getattr(ctx, "epochs", None)
            if epochs is None and epoch > 0 and ctx.step > 0:
                epochs = math.ceil(ctx.max_steps / max(1, round(ctx.step / epoch)))
            if epochs is None:
                return  # epoch 0: RandomResizedCrop (the warm-up) until the run length is known
            crop.set_run_length(epochs)
        source = self._source

        def boxes_now():
            from fastmim.train.contrastive_boxes import compute_boxes

            return compute_boxes(module, source.train, image_size=module.patch_embed.img_size[0], mean=source.mean,
                                 std=source.std, threshold=crop.threshold, batch_size=self.box_batch_size)

        crop.on_epoch_start(epoch, boxes_now)

    def state_dict(self) -> dict[str, Any]:
        """The ContrastiveCrop boxes and schedule, for an exact resume after the warm-up (without
        them a resumed run recomputes the boxes from the resumed model)."""
        return {} if self.contrastive_crop is None else {"contrastive_crop": self.contrastive_crop.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.contrastive_crop is not None and "contrastive_crop" in state:
            self.contrastive_crop.load_state_dict(state["contrastive_crop"])

    def loss(self, model, batch, ctx):
        view1, view2 = batch["views"]
        masks = _masking_kwargs(unwrap(model), ctx, view1.shape[0], view1.device, noise_rows=2 * view1.shape[0])
        return _as_dict(model(view1, view2, ctx.mask_ratio, **masks))


class LUTAdapter(TwoViewAdapter):
    """LUT: ``model(view1, view2, mask_ratio, seed=, offset=) -> {"loss", "loss_mae", "loss_bc"}``
    (one ``random_permutation`` row per image serves both views); after each optimizer step the
    EMA teacher moves (``update_teacher(step, max_steps)``: momentum 0.996 -> 1 over the run).
    The teacher's weights are buffers, so the optimizer never sees them."""

    def __init__(self):
        super().__init__("lut", second_view="photometric")

    def loss(self, model, batch, ctx):
        view1, view2 = batch["views"]
        masks = _masking_kwargs(unwrap(model), ctx, view1.shape[0], view1.device)
        return _as_dict(model(view1, view2, ctx.mask_ratio, **masks))


def _as_dict(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"loss": out}
    if isinstance(out, dict) and "loss" in out:
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return {"loss": out[0]}
    raise TypeError(f"a model's forward must return a loss tensor or a dict with 'loss', got {type(out).__name__}")


_ADAPTERS: dict[str, MethodAdapter] = {}


def register_adapter(adapter: MethodAdapter, *, overwrite: bool = False) -> MethodAdapter:
    if not adapter.name:
        raise ValueError("an adapter needs a name")
    if adapter.name in _ADAPTERS and not overwrite:
        raise ValueError(f"an adapter for {adapter.name!r} is already registered (pass overwrite=True)")
    _ADAPTERS[adapter.name] = adapter
    return adapter


def get_adapter(name: str) -> MethodAdapter:
    if name not in _ADAPTERS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(list_adapters())}")
    return _ADAPTERS[name]


def list_adapters() -> list[str]:
    return sorted(_ADAPTERS)


register_adapter(MAEAdapter())
register_adapter(SupervisedMIMAdapter())
register_adapter(SupervisedMIMAdapter("supmae", default_mask_ratio=0.75))
register_adapter(CMAEAdapter(ccrop={}))
register_adapter(LUTAdapter())


def build_model(method: str, preset: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """``fastmim.models.create_model`` with user-facing errors."""
    from fastmim.models import create_model

    try:
        return create_model(method, preset, **model_kwargs)
    except TypeError as exc:
        raise TrainError(f"cannot build {method} {preset} with {model_kwargs}: {exc}") from None
    except ValueError as exc:
        raise TrainError(str(exc)) from None


def resolve_model(cfg: TrainConfig, adapter: MethodAdapter, channels: int,
                  num_classes: int) -> tuple[dict[str, Any], int, int]:
    """``(model_kwargs, image_size, patch_size)`` of the run; checks the image size fits the patches."""
    from fastmim.models import get_preset

    try:
        preset = get_preset(cfg.model)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    image_size = cfg.image_size or preset.img_size
    if image_size % preset.patch_size != 0:
        raise TrainError(f"image size {image_size} is not divisible by the patch size {preset.patch_size} "
                         f"of {preset.name}; pick --image-size as a multiple of {preset.patch_size}")
    kwargs = adapter.model_overrides(channels, image_size if image_size != preset.img_size else None, num_classes)
    if cfg.norm_pix_loss is not None:
        kwargs["norm_pix_loss"] = cfg.norm_pix_loss
    if cfg.masking != "random":
        kwargs["masking"] = cfg.masking
    kwargs.update(cfg.model_overrides)
    return kwargs, image_size, preset.patch_size
