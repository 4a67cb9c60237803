"""Evaluation of a trained encoder on the dataset's held-out split (``fastmim eval``).

- k-NN (as in DINO / InstDisc): L2-normalised features, cosine similarity to every train
  feature, the ``k = 20`` nearest vote for their class with weight ``exp(sim / T)``,
  ``T = 0.07``; the class with the largest summed weight wins.
- Linear probe (as in MAE): the frozen encoder's features, ``BatchNorm1d(affine=False)``
  then a linear layer (weights ``trunc_normal(std=0.01)``), trained with cross-entropy.
  MAE uses LARS at batch 16384 for 90 epochs on augmented crops; here the features are
  extracted once from the un-augmented train images (seconds, not hours) and the head is
  trained with SGD + momentum 0.9, cosine lr ``0.1 * batch / 256``, 90 epochs.
- Fine-tune (supervised + MIM checkpoints, or any encoder with a new head): the whole
  network trained with labels on augmented views, MAE's recipe (layer-wise lr decay,
  mixup / cutmix, drop path, global pool); :func:`finetune` is
  :func:`fastmim.train.finetuning.finetune`.

Features come from ``adapter.encode(module, imgs)``, i.e. the model's ``encode`` (``(B, D)``:
MAE's cls token after the final norm unless ``pool="mean"``).

:func:`evaluate_checkpoint` runs the protocols ``fastmim eval`` asks for on a checkpoint and
gives one record per protocol (the lines of the eval log).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fastmim.data import EvalTransform, ImageDataset, RandomResizedCropSampler, ViewTransform, open_data
from fastmim.train.checkpoint import CHECKPOINT_NAME, CheckpointError, load_weights, read_metadata
from fastmim.train.distributed import resolve_device
from fastmim.train.finetuning import FinetuneConfig, finetune
from fastmim.train.methods import MethodAdapter, get_adapter

__all__ = [
    "LoadedCheckpoint",
    "load_checkpoint",
    "extract_features",
    "knn_predict",
    "knn_accuracy",
    "linear_probe",
    "subset_indices",
    "classifier_accuracy",
    "finetune",
    "evaluate_checkpoint",
]

# What evaluation reads from a checkpoint's metadata (fastmim train writes them all).
METADATA_KEYS = ("method", "preset", "model_kwargs", "data", "channels", "image_size", "mean", "std")
# The fine-tuning settings an eval record keeps.
FINETUNE_LOGGED = ("epochs", "batch_size", "blr", "layer_decay", "mixup", "cutmix", "label_smoothing", "drop_path")


@dataclass
class LoadedCheckpoint:
    path: Path
    module: nn.Module
    metadata: dict[str, Any]
    adapter: MethodAdapter


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Rebuild the model a fastmim checkpoint was trained as and load its weights, verified
    (:func:`fastmim.train.checkpoint.read_weights`: their checksum, finite values).

    ``path``: a ``checkpoint.safetensors`` or a run folder holding one.
    """
    from fastmim.train.methods import build_model

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    meta = read_metadata(path)
    missing = [key for key in METADATA_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the metadata {', '.join(missing)} needed to rebuild and "
                              f"evaluate its model")
    adapter = get_adapter(meta["method"])
    module = build_model(meta["method"], meta["preset"], meta["model_kwargs"])
    load_weights(module, path, what=f"{meta['method']} {meta['preset']}")
    return LoadedCheckpoint(path, module.to(device).eval(), meta, adapter)


def subset_indices(labels: torch.Tensor, limit: int | None) -> list[int]:
    """At most ``limit`` indices, the same share of every class (all of them when ``None``)."""
    n = labels.shape[0]
    if limit is None or limit >= n:
        return list(range(n))
    order = np.argsort(labels.numpy(), kind="stable")
    picks = np.linspace(0, n - 1, limit).round().astype(int)  # evenly over the class-sorted order
    return sorted(order[picks].tolist())


@torch.no_grad()
def extract_features(module: nn.Module, adapter: MethodAdapter, dataset: ImageDataset, *,
                     indices: list[int] | None = None, batch_size: int = 256, device: torch.device | str = "cpu",
                     num_workers: int = 0, pool: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features float32 (N, D), labels int64 (N,))`` of ``dataset`` (its first view)."""
    device = torch.device(device)
    subset = torch.utils.data.Subset(dataset, indices) if indices is not None else dataset
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    was_training = module.training
    module.eval()
    feats, labels = [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        for batch in loader:
            with autocast:
                f = adapter.encode(module, batch["views"][0].to(device, non_blocking=True), pool)
            feats.append(f.float().cpu())
            labels.append(batch["label"])
    finally:
        module.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, *,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Temperature-weighted cosine k-NN: the predicted class ``(M,)`` of each test feature."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, train_feats.shape[0])
    train_n = F.normalize(train_feats.float(), dim=1)
    preds = []
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ train_n.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes).scatter_add_(1, train_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    preds = knn_predict(train_feats, train_labels, test_feats, num_classes=num_classes, k=k, temperature=temperature)
    return float((preds == test_labels).float().mean())


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, num_classes: int, epochs: int = 90, batch_size: int = 256,
                 blr: float = 0.1, seed: int = 0) -> float:
    """Top-1 accuracy of ``BatchNorm1d(affine=False) + Linear`` trained on frozen features."""
    generator = torch.Generator().manual_seed(seed)
    dim = train_feats.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    with torch.no_grad():
        w = torch.empty_like(head[1].weight)
        head[1].weight.copy_(nn.init.trunc_normal_(w, std=0.01, generator=generator))
        head[1].bias.zero_()
    lr = blr * batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    n = train_feats.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if idx.numel() < 2:  # BatchNorm needs two samples
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(train_feats[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    head.eval()
    with torch.no_grad():
        preds = head(test_feats).argmax(dim=1)
    return float((preds == test_labels).float().mean())


def evaluation_data(meta: dict[str, Any], data: str | None = None, on_corrupt: str = "skip",
                    image_size: int | None = None):
    """The checkpoint's dataset (or ``data``) with its deterministic evaluation view, at the
    checkpoint's image size or ``image_size`` (the models resample their position embeddings)."""
    data = data if data is not None else meta["data"]
    source = open_data(data, channels=meta["channels"], on_corrupt=on_corrupt)
    if source.channels != meta["channels"]:
        raise ValueError(f"data {data} has {source.channels} channel(s) but the checkpoint expects {meta['channels']}")
    view = EvalTransform(image_size or meta["image_size"], meta["mean"], meta["std"], source.eval_crop_pct)
    return source, source.split("train", [view]), source.split("test", [view])


@torch.no_grad()
def classifier_accuracy(module: nn.Module, dataset: ImageDataset, *, indices: list[int] | None = None,
                        batch_size: int = 256, device: torch.device | str = "cpu", num_workers: int = 0) -> float:
    """Top-1 of a checkpoint's own classifier (``module.classify(imgs) -> logits``, e.g.
    supervised + MIM), on ``dataset``'s first view."""
    device = torch.device(device)
    subset = torch.utils.data.Subset(dataset, indices) if indices is not None else dataset
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    module.eval()
    correct = total = 0
    for batch in loader:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = module.classify(batch["views"][0].to(device, non_blocking=True))
        correct += int((logits.argmax(dim=1).cpu() == batch["label"]).sum())
        total += batch["label"].shape[0]
    return correct / max(1, total)


def evaluate_checkpoint(checkpoint: str | Path, protocols: list[str], *, data: str | None = None,
                        image_size: int | None = None, device: str = "auto", pool: str | None = None, k: int = 20,
                        temperature: float = 0.07, probe_epochs: int = 90,
                        finetune_config: FinetuneConfig | None = None, limit_train: int | None = None,
                        limit_test: int | None = None, batch_size: int = 256, num_workers: int = 0,
                        seed: int = 0) -> tuple[LoadedCheckpoint, list[dict[str, Any]]]:
    """``fastmim eval``: ``(the checkpoint, one result record per protocol)``; prints each accuracy.

    ``protocols``: ``knn``, ``linear``, ``classifier`` (left out for a checkpoint without a
    classifier, unless it is the only one asked for) and ``finetune`` (with ``finetune_config``).
    Scores the held-out split of the checkpoint's dataset, or of ``data``, at ``image_size``
    (default: the training size); ``ValueError`` for settings that cannot run on this checkpoint.
    """
    device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, device)
    meta = ckpt.metadata
    image_size = image_size or meta["image_size"]
    patch_size = ckpt.module.patch_embed.patch_size[0]
    if image_size <= 0 or image_size % patch_size:
        raise ValueError(f"--image-size must be a positive multiple of the model's patch size {patch_size}, "
                         f"got {image_size}")
    source, train_set, test_set = evaluation_data(meta, data, image_size=image_size)
    train_idx = subset_indices(train_set.labels, limit_train)
    test_idx = subset_indices(test_set.labels, limit_test)
    common = {"batch_size": batch_size, "device": device, "num_workers": num_workers, "pool": pool}
    has_classifier = callable(getattr(ckpt.module, "classify", None))
    if protocols == ["classifier"] and not has_classifier:
        raise ValueError(f"{meta['method']} checkpoints have no classifier; use knn, linear or finetune")
    protocols = [p for p in protocols if has_classifier or p != "classifier"]
    num_classes = len(source.classes)
    if meta.get("num_classes") not in (None, num_classes) and "classifier" in protocols:
        raise ValueError(f"the checkpoint's classifier has {meta['num_classes']} classes, the data {num_classes}")
    if any(p in protocols for p in ("knn", "linear")):
        train_f, train_y = extract_features(ckpt.module, ckpt.adapter, train_set, indices=train_idx, **common)
        test_f, test_y = extract_features(ckpt.module, ckpt.adapter, test_set, indices=test_idx, **common)
    num_train, num_test = len(train_idx), len(test_idx)
    results = []
    for protocol in protocols:
        if protocol == "classifier":
            acc = classifier_accuracy(ckpt.module, test_set, indices=test_idx, batch_size=batch_size, device=device,
                                      num_workers=num_workers)
            detail = "the checkpoint's own classifier, unmasked images"
        elif protocol == "finetune":
            recipe = finetune_config if finetune_config is not None else FinetuneConfig(pool=pool).validate()
            views = [ViewTransform(image_size, meta["mean"], meta["std"],
                                   crop_sampler=RandomResizedCropSampler(scale=(0.08, 1.0)))]
            acc = finetune(ckpt.module, ckpt.adapter, source.split("train", views), test_set,
                           num_classes=num_classes, config=recipe, device=device, seed=seed,
                           train_indices=train_idx, test_indices=test_idx, num_workers=num_workers).top1
            detail = (f"{recipe.epochs} epochs of fine-tuning, blr {recipe.blr:g}, layer decay "
                      f"{recipe.layer_decay:g}, mixup {recipe.mixup:g}, cutmix {recipe.cutmix:g}, smoothing "
                      f"{recipe.label_smoothing:g}, drop path {recipe.drop_path:g}")
        elif protocol == "knn":
            acc = knn_accuracy(train_f, train_y, test_f, test_y, num_classes=num_classes, k=k, temperature=temperature)
            detail = f"k={k}, T={temperature:g}"
        else:
            acc = linear_probe(train_f, train_y, test_f, test_y, num_classes=num_classes, epochs=probe_epochs,
                               seed=seed)
            detail = f"{probe_epochs} epochs, BN + linear on frozen features"
        print(f"{protocol} top-1: {100 * acc:.2f}% ({detail}) on {num_test} held-out images of {source.name}, "
              f"{num_train} train images; chance {100 / num_classes:.1f}%")
        results.append({"protocol": protocol, "top1": acc, "k": k if protocol == "knn" else None,
                        "temperature": temperature if protocol == "knn" else None,
                        "probe_epochs": probe_epochs if protocol == "linear" else None,
                        "checkpoint": str(ckpt.path), "step": meta.get("step"), "method": meta["method"],
                        "preset": meta["preset"], "data": source.name, "num_train": num_train,
                        "num_test": num_test, "pool": pool, "image_size": image_size})
        if protocol == "finetune":
            results[-1]["finetune"] = {name: getattr(recipe, name) for name in FINETUNE_LOGGED}
    return ckpt, results
