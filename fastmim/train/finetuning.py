"""Fine-tuning an encoder with labels: the official MAE recipe (``main_finetune.py``), short or full.

:func:`finetune` trains the whole encoder with a classifier on a labelled dataset and scores its
held-out split (``fastmim eval --protocol finetune``); :class:`FinetuneConfig` holds the recipe:

- AdamW (betas 0.9/0.999), lr ``blr * batch / 256``, linear warmup then half-cycle cosine to
  ``min_lr``, set per step;
- **layer-wise lr decay** (``layer_decay``; :func:`param_groups_lrd`, the official
  ``util/lr_decay.py``): layer id 0 for ``cls_token``, ``pos_embed`` and ``patch_embed``, ``i + 1``
  for block ``i``, ``depth + 1`` for everything after the blocks (final norm, ``fc_norm``,
  classifier); each group's lr is scaled by ``layer_decay ** (depth + 1 - layer_id)``; no weight
  decay on 1-D parameters (biases, norms) and on ``cls_token`` / ``pos_embed``;
- **mixup / cutmix** with label smoothing through timm's ``Mixup`` (``mixup``, ``cutmix``
  alphas, ``cutmix_minmax``, ``mixup_prob``, ``mixup_switch_prob``, ``mixup_mode``) and
  ``SoftTargetCrossEntropy``; without them, cross-entropy with ``label_smoothing``;
- **drop path** (``drop_path``) on the encoder's blocks, ``rate * i / (depth - 1)`` for block ``i``;
- **global pool vs cls** (``pool``), as the official ``models_vit.py``: ``"avg"`` averages the
  last block's patch tokens and normalises them with a new ``fc_norm`` (the pretrained final
  norm is left out); ``"cls"`` takes the cls token after the final norm; ``None`` the method's
  own features (``adapter.encode``; MAE: the cls token).
- ``pos_embed`` is trained (``train_pos_embed``), as the official fine-tuning, where the
  pretrained fixed sin-cos embedding becomes a learnt one.

``FinetuneConfig()`` is a short CPU-scale default (5 epochs, no layer decay, mixup or drop path);
``FinetuneConfig.official()`` is the paper's ViT-B recipe (100 epochs, blr 5e-4, layer decay
0.65, drop path 0.1, mixup 0.8, cutmix 1.0, smoothing 0.1, global pool, 5 warmup epochs). Not
included: RandAugment and random erasing (the train views are the dataset's crops and flips)
and the EMA of weights.

A model with its own classifier for the dataset's classes (supervised + MIM: ``classify``) is
fine-tuned through it; any other gets a new linear head (``trunc_normal(std=2e-5)``, as MAE).
The model is trained in place; its ``requires_grad`` flags and drop path are restored after.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fastmim.train.methods import MethodAdapter

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "layer_id_for_vit", "param_groups_lrd"]

POOLS = (None, "cls", "avg", "mean")


@dataclass
class FinetuneConfig:
    """The fine-tuning recipe (module doc). Defaults: a short run; :meth:`official` for MAE's."""

    epochs: int = 5
    batch_size: int = 64
    blr: float = 5e-4  # lr = blr * batch / 256
    lr: float | None = None  # absolute lr, overrides blr
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # 1: off
    label_smoothing: float = 0.1
    mixup: float = 0.0  # mixup alpha; 0: off
    cutmix: float = 0.0  # cutmix alpha; 0: off
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    drop_path: float = 0.0
    pool: str | None = None  # None | "cls" | "avg" (global pool + fc_norm) | "mean" (the model's mean features)
    train_pos_embed: bool = True
    clip_grad: float | None = None

    @classmethod
    def official(cls, **overrides: Any) -> FinetuneConfig:
        """MAE's ViT-B fine-tuning (FINETUNE.md): 100 epochs, blr 5e-4 (effective batch 1024),
        layer decay 0.65 (0.75 for ViT-L and H), weight decay 0.05, drop path 0.1 (0.2, 0.3 for
        L, H), mixup 0.8, cutmix 1.0, smoothing 0.1, global pool, 5 warmup epochs, min lr 1e-6."""
        base = dict(epochs=100, batch_size=1024, blr=5e-4, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
                    layer_decay=0.65, label_smoothing=0.1, mixup=0.8, cutmix=1.0, drop_path=0.1, pool="avg")
        return cls(**{**base, **overrides})

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def validate(self) -> FinetuneConfig:
        """``ValueError`` naming the first setting that cannot run; returns ``self``."""
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.blr > 0, f"blr must be positive, got {self.blr}"),
            (self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.mixup >= 0, f"mixup alpha must be >= 0, got {self.mixup}"),
            (self.cutmix >= 0, f"cutmix alpha must be >= 0, got {self.cutmix}"),
            (0 <= self.mixup_prob <= 1, f"mixup_prob must be in [0, 1], got {self.mixup_prob}"),
            (0 <= self.mixup_switch_prob <= 1, f"mixup_switch_prob must be in [0, 1], got {self.mixup_switch_prob}"),
            (self.mixup_mode in ("batch", "pair", "elem"), f"mixup_mode must be batch, pair or elem, "
                                                           f"got {self.mixup_mode!r}"),
            (0 <= self.drop_path < 1, f"drop path must be in [0, 1), got {self.drop_path}"),
            (self.pool in POOLS, f"pool must be 'cls', 'avg', 'mean' or None, got {self.pool!r}"),
            (self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be positive, got {self.clip_grad}"),
            (not self.mixes or self.batch_size % 2 == 0,
             f"mixup / cutmix need an even batch size, got {self.batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


@dataclass
class FinetuneResult:
    top1: float  # held-out top-1 accuracy
    losses: list[float]  # training loss per step (soft-target cross-entropy under mixup / cutmix)
    lrs: list[float]  # the schedule's lr per step (each group's is this times its lr_scale)
    param_groups: list[dict[str, Any]]  # per optimizer group: names, lr_scale, weight_decay, layer_id
    config: FinetuneConfig
    net: nn.Module = field(repr=False)  # the fine-tuned classifier (the model inside, in place)
    optimizer: torch.optim.Optimizer = field(repr=False)  # its groups hold the last step's lrs


# ---------------------------------------------------------------------------------- layer decay

def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The official ``get_layer_id_for_vit`` for an encoder parameter name (``num_layers``: the
    number of blocks): 0 for ``cls_token``, ``pos_embed`` and ``patch_embed.*``, ``i + 1`` for
    ``blocks.i.*``, ``num_layers + 1`` for the rest (final norm, ``fc_norm``, head)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups_lrd(named_parameters: Iterable[tuple[str, nn.Parameter]], num_layers: int, *,
                     weight_decay: float = 0.05, layer_decay: float = 0.75,
                     no_weight_decay_list: Iterable[str] = ("cls_token", "pos_embed")) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay (the official ``param_groups_lrd``).

    ``named_parameters``: ``(name, parameter)`` with encoder names (``blocks.3.attn.qkv.weight``;
    anything not an encoder name counts as after the blocks). Each group has ``lr_scale =
    layer_decay ** (num_layers + 1 - layer_id)`` (set ``lr = base_lr * lr_scale`` each step),
    ``weight_decay`` (0 for 1-D parameters and ``no_weight_decay_list``), ``layer_id`` and
    ``names``. Parameters that do not require grad are left out.
    """
    no_wd = set(no_weight_decay_list)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name in no_wd)
        layer_id = layer_id_for_vit(name, num_layers)
        group = groups.setdefault((layer_id, decay), {
            "params": [], "names": [], "layer_id": layer_id, "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - layer_id)})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


# ---------------------------------------------------------------------------------- the network

def _is_vit_encoder(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm"))


class FinetuneNet(nn.Module):
    """The encoder with a classifier (module doc): ``forward(imgs) -> logits``.

    ``encoder_parameters()`` names the parameters the classifier depends on with the encoder's
    names (a MAE-family model's decoder and auxiliary heads are left out)."""

    def __init__(self, module: nn.Module, adapter: MethodAdapter, num_classes: int, feature_dim: int,
                 pool: str | None):
        super().__init__()
        self.encoder = module
        self.adapter = adapter
        self.pool = pool
        self.vit = _is_vit_encoder(module)
        if pool in ("cls", "avg") and not self.vit:
            raise ValueError(f"pool={pool!r} needs a ViT encoder (patch_embed, cls_token, pos_embed, blocks, norm)")
        self.own_head = hasattr(module, "classify") and getattr(getattr(module, "head", None), "out_features",
                                                                 None) == num_classes
        self.fc_norm = None
        if pool == "avg" and not self.own_head:
            norm = module.norm
            self.fc_norm = nn.LayerNorm(feature_dim, eps=getattr(norm, "eps", 1e-6))
        self.head = None if self.own_head else nn.Linear(feature_dim, num_classes)
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            from fastmim.models.vit import patch_features

            return self.fc_norm(patch_features(self.encoder, imgs).mean(dim=1))
        if self.pool == "cls":
            return self.encoder.forward_features(imgs)[:, 0]
        return self.adapter.encode(self.encoder, imgs, self.pool)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if self.own_head:
            return self.encoder.classify(imgs)
        return self.head(self.features(imgs))

    def encoder_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of what the logits depend on; encoder parameters by their encoder name."""
        out = []
        for name, p in self.encoder.named_parameters():
            if self.vit and name.startswith(("decoder_", "mask_token", "teacher.", "projector.", "predictor.",
                                             "pos_head.")):
                continue
            if self.vit and self.pool == "avg" and not self.own_head and name.startswith("norm."):
                continue  # replaced by fc_norm, as the official global-pool model
            out.append((name, p))
        for name, p in self.named_parameters():
            if not name.startswith("encoder."):
                out.append((name, p))
        return out


# ---------------------------------------------------------------------------------- the loop

def _mixup(config: FinetuneConfig, num_classes: int):
    if not config.mixes:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, cutmix_minmax=config.cutmix_minmax,
                 prob=config.mixup_prob, switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                 label_smoothing=config.label_smoothing, num_classes=num_classes)


def finetune(module: nn.Module, adapter: MethodAdapter | None, train_set: Any, test_set: Any, *, num_classes: int,
             config: FinetuneConfig | None = None, device: torch.device | str = "cpu", seed: int = 0,
             train_indices: list[int] | None = None, test_indices: list[int] | None = None, num_workers: int = 0,
             **options: Any) -> FinetuneResult:
    """Fine-tune ``module`` with labels on ``train_set``, then its top-1 on ``test_set``.

    ``adapter``: the method's :class:`~fastmim.train.methods.MethodAdapter` (its ``encode``
    gives the features when ``pool`` is ``None``; ``None``: the model's own ``encode``).
    ``train_set`` / ``test_set``: :class:`fastmim.data.ImageDataset` splits (train views
    augmented); ``train_indices`` / ``test_indices`` restrict them. ``config`` (default
    :class:`FinetuneConfig`) with ``options`` replacing its fields, e.g.
    ``finetune(model, None, train, test, num_classes=10, layer_decay=0.75, mixup=0.8, cutmix=1.0)``.
    """
    from fastmim.data import TrainBatchSampler
    from fastmim.models.vit import set_drop_path

    config = dataclasses.replace(config or FinetuneConfig(), **options).validate()
    adapter = adapter if adapter is not None else MethodAdapter()
    device = torch.device(device)
    torch.manual_seed(seed)
    vit = _is_vit_encoder(module)
    saved_flags = {name: p.requires_grad for name, p in module.named_parameters()}
    saved_drop = [(blk, blk.drop_path1, blk.drop_path2) for blk in module.blocks] if vit else []
    numpy_state = np.random.get_state()  # timm's Mixup draws from numpy's global generator
    try:
        np.random.seed(seed % 2**32)
        if vit and config.train_pos_embed:
            module.pos_embed.requires_grad_(True)
        if vit:
            set_drop_path(module.blocks, config.drop_path)
        elif config.drop_path > 0:
            raise ValueError("drop_path needs a ViT encoder (blocks)")
        with torch.no_grad():
            probe = test_set[0]["views"][0][None].to(device)
            dim = (module.cls_token.shape[-1] if vit and config.pool in ("cls", "avg")
                   else adapter.encode(module, probe, config.pool).shape[1])
        net = FinetuneNet(module, adapter, num_classes, dim, config.pool).to(device)
        num_layers = len(module.blocks) if vit else 0
        groups = param_groups_lrd(net.encoder_parameters(), num_layers, weight_decay=config.weight_decay,
                                  layer_decay=config.layer_decay)
        num_train = len(train_set) if train_indices is None else len(train_indices)
        batch = min(config.batch_size, num_train)
        if config.mixes and batch % 2:
            batch -= 1
        sampler = TrainBatchSampler(num_train, batch, seed=seed)
        lr = config.lr if config.lr is not None else config.blr * sampler.batch_size / 256
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr,
                                      weight_decay=config.weight_decay)
        mixup = _mixup(config, num_classes)
        if mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            soft_target_ce = SoftTargetCrossEntropy()
        steps_per_epoch = sampler.batches_per_epoch
        total = config.epochs * steps_per_epoch
        warmup = round(config.warmup_epochs * steps_per_epoch)
        params = [p for g in groups for p in g["params"]]
        losses, lrs = [], []
        step = 0
        net.train()
        for epoch in range(config.epochs):
            for batch_keys in sampler.epoch(epoch):
                items = [train_set[(i if train_indices is None else train_indices[i], aug_seed)]
                         for i, aug_seed in batch_keys]
                imgs = torch.stack([it["views"][0] for it in items]).to(device)
                labels = torch.tensor([it["label"] for it in items], device=device)
                if step < warmup:
                    now = lr * (step + 1) / warmup
                else:
                    progress = (step - warmup) / max(1, total - warmup)
                    now = config.min_lr + (lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
                for group in optimizer.param_groups:
                    group["lr"] = now * group["lr_scale"]
                if mixup is not None:
                    imgs, targets = mixup(imgs, labels)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = net(imgs)
                if mixup is not None:
                    loss = soft_target_ce(logits.float(), targets)
                else:
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
                optimizer.step()
                losses.append(float(loss.detach()))
                lrs.append(now)
                step += 1
        top1 = _accuracy(net, test_set, test_indices, device, num_workers)
    finally:
        np.random.set_state(numpy_state)
        for name, p in module.named_parameters():
            p.requires_grad_(saved_flags.get(name, p.requires_grad))
        for blk, dp1, dp2 in saved_drop:
            blk.drop_path1, blk.drop_path2 = dp1, dp2
    summary = [{"names": g["names"], "layer_id": g["layer_id"], "lr_scale": g["lr_scale"],
                "weight_decay": g["weight_decay"]} for g in groups]
    return FinetuneResult(top1, losses, lrs, summary, config, net, optimizer)


@torch.no_grad()
def _accuracy(net: nn.Module, test_set: Any, indices: list[int] | None, device: torch.device,
              num_workers: int) -> float:
    net.eval()
    test = torch.utils.data.Subset(test_set, indices) if indices is not None else test_set
    loader = DataLoader(test, batch_size=256, num_workers=num_workers)
    correct = count = 0
    for batch in loader:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(batch["views"][0].to(device))
        correct += int((logits.argmax(dim=1).cpu() == batch["label"]).sum())
        count += batch["label"].shape[0]
    return correct / max(1, count)
