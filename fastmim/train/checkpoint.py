"""Checkpoints: model weights in safetensors (with the metadata to rebuild the model) and the
training state (optimizer, schedule, RNG, step, data position) with ``torch.save``.

Every file is written atomically: to a temporary file in the same folder, flushed and
fsynced, then ``os.replace``d over the old one, so a crash leaves either the previous file
or the new one, never a torn file.

A run folder holds one pair, ``checkpoint.safetensors`` and ``train_state.pt``; the state
records the step of the weights it belongs to. :func:`save_checkpoint` makes the pair
crash-safe: it first writes the new state completely under a side name
(``.train_state.pt.pending``), then replaces the weights, then renames the pending state
over the old one. A crash before the weights are replaced leaves the previous pair; a crash
between the two renames leaves the new weights beside the complete new pending state, which
:func:`load_checkpoint_state` then uses. It refuses a pair that disagrees otherwise.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

__all__ = [
    "CHECKPOINT_NAME",
    "STATE_NAME",
    "PENDING_STATE_NAME",
    "CheckpointError",
    "atomic_write",
    "save_weights",
    "save_weights_dict",
    "read_metadata",
    "load_weights",
    "save_state",
    "load_state",
    "save_checkpoint",
    "load_checkpoint_state",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
STATE_NAME = "train_state.pt"
PENDING_STATE_NAME = f".{STATE_NAME}.pending"
# What resuming reads from a training state; a state without one of them is not fastmim's.
STATE_KEYS = ("step", "epoch", "position", "optimizer", "rng", "config")
FORMAT = "fastmim-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not fastmim's, another model's, torn or mismatched."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then move ``tmp_path`` over ``path`` (same folder, so atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable, so the order of two renames survives a power cut."""
    if os.name != "posix":  # Windows cannot open a folder; NTFS journals renames itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``model``'s state to ``path`` (safetensors). ``metadata`` values are JSON-encoded
    under the key ``"fastmim"`` with ``format`` added."""
    meta = {"fastmim": json.dumps({"format": FORMAT, **metadata}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata=meta))


def save_weights_dict(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any]) -> None:
    """:func:`save_weights` for a full state dict (e.g. gathered from FSDP shards)."""
    from safetensors.torch import save_file

    meta = {"fastmim": json.dumps({"format": FORMAT, **metadata}, sort_keys=True)}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The fastmim metadata of a checkpoint; :class:`CheckpointError` if it has none."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if "fastmim" not in meta:
        raise CheckpointError(f"{path} is a safetensors file without fastmim metadata (not written by fastmim train)")
    try:
        data = json.loads(meta["fastmim"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has unreadable fastmim metadata ({exc})") from None
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {data.get('format')!r}, expected {FORMAT!r}")
    return data


def load_weights(model: nn.Module, path: str | Path, *, what: str = "the model") -> None:
    """Load ``path`` into ``model`` strictly; a key or shape mismatch is a :class:`CheckpointError`
    naming the first few differences."""
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as exc:  # shape mismatch from load_state_dict
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        detail = lines[0] if lines else str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit {what}: {detail}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {', '.join(sorted(missing)[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(sorted(unexpected)[:3])}")
        raise CheckpointError(f"checkpoint {path} does not fit {what}: {'; '.join(parts)}")


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} does not exist")
    try:
        # The state holds RNG states (tensors), optimizer state and plain Python containers.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of many kinds
        raise CheckpointError(f"training state {path} is unreadable ({type(exc).__name__}: {exc})") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"training state {path} lacks {', '.join(missing)} (not written by fastmim train)")
    return state


def save_checkpoint(folder: str | Path, write_weights: Callable[[Path], None], state: dict[str, Any]) -> None:
    """Replace the pair in ``folder`` crash-safely (see the module docstring).

    ``write_weights(path)`` writes the weights atomically (:func:`save_weights` or
    :func:`save_weights_dict`); ``state["step"]`` must be the step in their metadata."""
    folder = Path(folder)
    pending = folder / PENDING_STATE_NAME
    save_state(pending, state)
    write_weights(folder / CHECKPOINT_NAME)
    os.replace(pending, folder / STATE_NAME)
    _fsync_folder(folder)


def load_checkpoint_state(folder: str | Path) -> dict[str, Any]:
    """The training state belonging to ``folder``'s weights: ``train_state.pt``, or the pending
    state of a save interrupted between its two renames. Reads only (every process of a
    distributed run calls it); the next save replaces a leftover pending state."""
    folder = Path(folder)
    weights_step = read_metadata(folder / CHECKPOINT_NAME).get("step")
    state_path, pending_path = folder / STATE_NAME, folder / PENDING_STATE_NAME
    state = load_state(state_path) if state_path.is_file() or not pending_path.is_file() else None
    if state is not None and state["step"] == weights_step:
        return state
    if pending_path.is_file():
        pending = load_state(pending_path)
        if pending["step"] == weights_step:
            return pending
    found = f"{STATE_NAME} from step {state['step']}" if state is not None else f"no {STATE_NAME}"
    raise CheckpointError(f"{folder / CHECKPOINT_NAME} is from step {weights_step} but there is {found}: "
                          f"the pair is inconsistent")
