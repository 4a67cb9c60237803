"""The end-of-run figures: loss curve and MAE-style reconstructions (PNG, matplotlib Agg)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from fastmim.train.checkpoint import atomic_write

__all__ = ["read_metrics", "plot_loss", "plot_reconstruction", "reconstruction_panels"]


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
    """A grid: one column per image, rows original / masked / reconstruction / + visible."""
    plt = _pyplot()
    names = ["original", "masked", "reconstruction", "reconstruction\n+ visible"]
    n = panels[0].shape[0]
    fig, axes = plt.subplots(len(panels), n, figsize=(1.1 * n + 1.2, 1.1 * len(panels) + 0.5), dpi=120,
                             squeeze=False)
    for r, panel in enumerate(panels):
        for col in range(n):
            ax = axes[r][col]
            img = panel[col].detach().cpu().float().numpy()
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(names[r], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
