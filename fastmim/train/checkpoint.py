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

Neither format has a checksum of its own (safetensors none, ``torch.save``'s zip records go
unchecked on load), so the weights' metadata holds two: ``tensors_sha256`` over the tensors
(:func:`tensors_sha256`) and ``state_sha256`` over the bytes of the training state written
with them. Every load verifies them and refuses non-finite weights, naming the tensor;
checkpoints of older versions, without checksums, load with a warning.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "CHECKPOINT_NAME",
    "STATE_NAME",
    "PENDING_STATE_NAME",
    "CheckpointError",
    "atomic_write",
    "remove_partial_writes",
    "tensors_sha256",
    "save_weights",
    "save_weights_dict",
    "read_metadata",
    "read_weights",
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
    """A checkpoint that cannot be used: not fastmim's, another model's, torn, corrupt, mismatched
    or holding non-finite weights."""


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
        write(tmp_path)
        # mkstemp makes 0600 and safetensors writes 0600 whatever the umask; torch.save keeps the
        # mode: after the write, every file gets the ordinary permissions the umask gives.
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def remove_partial_writes(folder: str | Path, names: Iterable[str]) -> None:
    """Delete the temporary files of :func:`atomic_write` for ``names`` in ``folder``: a process
    killed during a write leaves them (checkpoint-sized), and nothing else ever reads them."""
    for name in names:
        for tmp in Path(folder).glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable, so the order of two renames survives a power cut."""
    if os.name != "posix":  # Windows cannot open a folder; NTFS journals renames itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order: what the
    checkpoint's ``tensors_sha256`` records (safetensors lays the data out in its own order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``model``'s state to ``path`` (safetensors). ``metadata`` values are JSON-encoded
    under the key ``"fastmim"`` with ``format`` and the ``tensors_sha256`` checksum added."""
    save_weights_dict(model.state_dict(), path, metadata)


def save_weights_dict(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any]) -> None:
    """:func:`save_weights` for a full state dict (e.g. gathered from FSDP shards)."""
    # Copies: the file holds no shared storage, and the checksum is of exactly what is written.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = {"fastmim": json.dumps({"format": FORMAT, **metadata, "tensors_sha256": tensors_sha256(tensors)},
                                  sort_keys=True)}
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


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a fastmim checkpoint (on the CPU), verified: they match the checkpoint's
    ``tensors_sha256`` (one without it, from an older version, loads with a warning) and every
    floating-point value is finite. :class:`CheckpointError` naming the file otherwise."""
    path = Path(path)
    expected = read_metadata(path).get("tensors_sha256")
    digest = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    nonfinite = None
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                tensor = tensors[name] = f.get_tensor(name)
                _hash_tensor(digest, name, tensor)
                if nonfinite is None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    nonfinite = name
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    # Corruption first: flipped bits can also read as nan.
    if expected is None:
        warnings.warn(f"{path} has no checksum (written by an older fastmim): its tensors cannot be verified",
                      stacklevel=2)
    elif digest.hexdigest() != expected:
        raise CheckpointError(f"{path} is corrupt: its tensor data does not match the checksum it was written with")
    if nonfinite is not None:
        raise CheckpointError(f"{path} holds non-finite weights (nan or inf) in {nonfinite}: the run that wrote "
                              f"it diverged")
    return tensors


def load_weights(model: nn.Module, path: str | Path, *, what: str = "the model") -> None:
    """Load ``path`` into ``model`` strictly, verified by :func:`read_weights`; a key or shape
    mismatch is a :class:`CheckpointError` naming the first few differences."""
    tensors = read_weights(path)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatch
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def save_state(path: str | Path, state: dict[str, Any]) -> str:
    """Write ``state`` atomically with ``torch.save``; returns the sha256 of the file's bytes."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return _file_sha256(Path(path))


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


def save_checkpoint(folder: str | Path, weights: dict[str, torch.Tensor], metadata: dict[str, Any],
                    state: dict[str, Any]) -> None:
    """Replace the pair in ``folder`` crash-safely (see the module docstring): ``state``, then
    ``weights`` (a full state dict) with ``metadata`` and the state's checksum.
    ``state["step"]`` must be the step in ``metadata``."""
    folder = Path(folder)
    pending = folder / PENDING_STATE_NAME
    state_sha256 = save_state(pending, state)
    save_weights_dict(weights, folder / CHECKPOINT_NAME, {**metadata, "state_sha256": state_sha256})
    os.replace(pending, folder / STATE_NAME)
    _fsync_folder(folder)


def load_checkpoint_state(folder: str | Path) -> dict[str, Any]:
    """The training state belonging to ``folder``'s weights: the file whose checksum the weights
    record, ``train_state.pt`` or the pending state of a save interrupted between its two
    renames. Reads only (every process of a distributed run calls it); the next save replaces a
    leftover pending state."""
    folder = Path(folder)
    meta = read_metadata(folder / CHECKPOINT_NAME)
    weights_step, expected = meta.get("step"), meta.get("state_sha256")
    state_path, pending_path = folder / STATE_NAME, folder / PENDING_STATE_NAME
    if expected is not None:
        for path in (state_path, pending_path):
            if path.is_file() and _file_sha256(path) == expected:
                return load_state(path)
    # No file matches (or the checkpoint predates checksums): say why from the steps they hold.
    state = load_state(state_path) if state_path.is_file() or not pending_path.is_file() else None
    candidates = [(state_path, state)] if state is not None else []
    if pending_path.is_file():
        candidates.append((pending_path, load_state(pending_path)))
    for path, candidate in candidates:
        if candidate["step"] == weights_step:
            if expected is not None:
                raise CheckpointError(f"{path} is corrupt: it does not match the checksum recorded in "
                                      f"{folder / CHECKPOINT_NAME}")
            return candidate
    found = f"{STATE_NAME} from step {state['step']}" if state is not None else f"no {STATE_NAME}"
    raise CheckpointError(f"{folder / CHECKPOINT_NAME} is from step {weights_step} but there is {found}: "
                          f"the pair is inconsistent")


def rng_state(device: torch.device) -> dict[str, Any]:
    # Plain containers and tensors only, so the state loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x
