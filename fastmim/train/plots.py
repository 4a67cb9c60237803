"""The end-of-run figures: loss curve and MAE-style reconstructions (PNG, matplotlib Agg)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastmim.train.checkpoint import atomic_write

__all__ = ["held_out_images", "read_metrics", "plot_loss", "plot_reconstruction", "reconstruction_of",
           "reconstruction_panels"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSONL file (a torn last line, from a crash, is ignored)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss(records: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Loss (and its logged parts) against the optimizer step, learning rate on a second axis."""
    plt = _pyplot()
    train = [r for r in records if "loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], label="loss", color="C0", lw=1.8)
    parts = sorted({k for r in train for k in r.get("parts", {})})
    for i, name in enumerate(parts):
        ax.plot(steps, [r.get("parts", {}).get(name, float("nan")) for r in train], label=name, lw=1, color=f"C{i + 2}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train and "lr" in train[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in train], color="C1", lw=1, ls="--", label="lr")
        ax2.set_ylabel("learning rate", color="C1")
        ax2.tick_params(axis="y", colors="C1")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(loc="upper right")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def reconstruction_panels(imgs: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor, patch_size: int,
                          mean: Sequence[float], std: Sequence[float]) -> list[torch.Tensor]:
    """Four ``(B, H, W, C)`` arrays in ``[0, 1]``: original, masked (removed patches grey),
    reconstruction, reconstruction with the visible patches pasted from the original."""
    b, c, h, w = imgs.shape
    grid_w = w // patch_size
    pixel_mask = mask.reshape(b, h // patch_size, grid_w).repeat_interleave(patch_size, 1)
    pixel_mask = pixel_mask.repeat_interleave(patch_size, 2)[:, None].to(imgs.dtype)  # 1 = removed
    m = torch.tensor(mean, dtype=imgs.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=imgs.dtype).view(1, -1, 1, 1)

    def show(x: torch.Tensor) -> torch.Tensor:
        return (x * s + m).clamp(0, 1).permute(0, 2, 3, 1)

    original = show(imgs)
    masked = original * (1 - pixel_mask.permute(0, 2, 3, 1)) + 0.5 * pixel_mask.permute(0, 2, 3, 1)
    reconstruction = show(recon)
    pasted = show(imgs * (1 - pixel_mask) + recon * pixel_mask)
    return [original, masked, reconstruction, pasted]


def plot_reconstruction(panels: Sequence[torch.Tensor], path: str | Path, title: str = "") -> None:
    """A grid: one column per image, rows original / masked / reconstruction / + visible.

    The grid is composed as one mosaic (white 2-px gutters) and drawn with a single
    ``imshow``: one axes instead of 4 x B keeps plotting fast."""
    plt = _pyplot()
    names = ["original", "masked", "reconstruction", "reconstruction\n+ visible"]
    rows, n = len(panels), panels[0].shape[0]
    h, w, c = panels[0].shape[1:]
    gap = max(1, h // 16)
    mosaic = torch.ones(rows * (h + gap) - gap, n * (w + gap) - gap, c)
    for r, panel in enumerate(panels):
        for col in range(n):
            y, x = r * (h + gap), col * (w + gap)
            mosaic[y:y + h, x:x + w] = panel[col].detach().cpu().float()
    image = mosaic.numpy()
    scale = 0.9 / max(h, w) * 32  # about 0.9 inch per 32 px image
    fig, ax = plt.subplots(figsize=(n * w / 32 * scale + 1.4, rows * h / 32 * scale + 0.6), dpi=120)
    if c == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (h + gap) + h / 2 for r in range(rows)], names[:rows], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def held_out_images(source: Any, image_size: int, count: int) -> torch.Tensor:
    """``count`` images of ``source``'s test split (evaluation transform), spread over its classes:
    the fixed images of a run's reconstruction figures."""
    from fastmim.data import EvalTransform

    test = source.split("test", [EvalTransform(image_size, source.mean, source.std, source.eval_crop_pct)])
    n = min(count, len(test))
    indices = np.linspace(0, len(test) - 1, n).round().astype(int).tolist()
    return torch.stack([test[i]["views"][0] for i in indices])


def reconstruction_of(module: nn.Module, reconstruct: Callable[[torch.Tensor], Any], imgs: torch.Tensor,
                      patch_size: int, mean: Sequence[float], std: Sequence[float]) -> list[torch.Tensor] | None:
    """Panels of ``imgs`` reconstructed by ``reconstruct(imgs) -> (recon, mask) | None`` with
    ``module`` in eval mode and no gradient (``None`` without a pixel decoder). An FSDP-sharded
    root is gathered around the call (it calls the root's methods, not its forward): every rank
    must call it then."""
    was_training = module.training
    sharded = hasattr(module, "unshard")
    module.eval()
    if sharded:
        module.unshard()
    try:
        with torch.no_grad():
            out = reconstruct(imgs)
    finally:
        if sharded:
            module.reshard()
        module.train(was_training)
    if out is None:
        return None
    recon, mask = out
    return reconstruction_panels(imgs.float().cpu(), recon.float().cpu(), mask.float().cpu(), patch_size, mean, std)
