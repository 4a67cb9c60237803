"""Continuing an official MAE pretraining run (``main_pretrain.py`` of facebookresearch/mae) in fastmim.

The official script saves ``checkpoint-<epoch>.pth`` with ``torch.save``::

    {"model": state_dict, "optimizer": AdamW state_dict, "epoch": int, "scaler": GradScaler state_dict,
     "args": argparse.Namespace}

(the released pretrained weights hold ``"model"`` only, the encoder). fastmim's MAE has the
official parameter names, so the weights load as they are; the optimizer state is keyed by
position, in the order of the official parameter groups (``add_weight_decay``: the parameters
without weight decay, 1-D ones and biases, then the others, each in ``named_parameters`` order,
frozen ones left out), which :func:`official_parameter_order` rebuilds from the model state
dict so each Adam moment reaches the parameter of that name in fastmim's optimizer, whatever
its groups.

:func:`read_official_checkpoint` loads the file with ``weights_only=True``, allowing only the
``argparse.Namespace`` the official file holds besides tensors and plain values: a file with
any other object is refused (load it yourself if you trust it and pass the dict).
:func:`init_from_official` puts the weights into a fastmim model and the Adam state into its
optimizer and returns the position to go on from (optimizer steps taken, next epoch). The
``scaler`` (fp16 loss scaling) is returned as it was: fastmim trains in bf16 without one.
"""

from __future__ import annotations

import argparse
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmim.train.config import TrainError

__all__ = ["OfficialCheckpoint", "OfficialStart", "init_from_official", "official_optimizer_state",
           "official_parameter_order", "read_official_checkpoint", "start_run_from_official"]

# The official MAE's parameters that never train (fixed sin-cos embeddings): not in its optimizer.
FROZEN = ("pos_embed", "decoder_pos_embed")


@dataclass
class OfficialCheckpoint:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    epoch: int | None  # the last epoch finished
    scaler: dict[str, Any] | None
    args: dict[str, Any] | None  # vars() of the script's argparse Namespace


@dataclass
class OfficialStart:
    step: int  # optimizer steps the official run took (AdamW's step count; 0 without an optimizer)
    epoch: int  # the epoch the official run would start next (its checkpoint's epoch + 1)
    optimizer_loaded: bool
    scaler: dict[str, Any] | None
    args: dict[str, Any] | None


def read_official_checkpoint(source: str | Path | Mapping[str, Any]) -> OfficialCheckpoint:
    """An official ``checkpoint-*.pth`` (a path, or the dict ``torch.load`` gave) as a :class:`OfficialCheckpoint`."""
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"no official checkpoint at {path}")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path} holds objects besides tensors, plain values and an argparse Namespace, "
                             f"which fastmim does not unpickle ({str(exc).splitlines()[-1][:200]}); if you trust "
                             f"the file, load it with torch.load(path, weights_only=False) and pass the dict") from None
        except (RuntimeError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable torch checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("model"), Mapping):
        raise ValueError("not an official MAE checkpoint: no 'model' state dict")
    args = raw.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    epoch = raw.get("epoch")
    return OfficialCheckpoint(model=dict(raw["model"]), optimizer=raw.get("optimizer"),
                              epoch=None if epoch is None else int(epoch), scaler=raw.get("scaler"),
                              args=dict(args) if isinstance(args, Mapping) else None)


def official_parameter_order(model_state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``(no_decay, decay)``: the parameter names of ``main_pretrain.py``'s two AdamW groups, in
    optimizer-index order (``timm.optim.add_weight_decay`` on the official model; state-dict
    order is its ``named_parameters`` order; the fixed position embeddings are frozen)."""
    no_decay, decay = [], []
    for name, value in model_state.items():
        if name in FROZEN:
            continue
        (no_decay if value.dim() <= 1 or name.endswith(".bias") else decay).append(name)
    return no_decay, decay


def official_optimizer_state(checkpoint: OfficialCheckpoint, model: nn.Module,
                             optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The official AdamW state re-keyed for ``optimizer`` (built over ``model``'s parameters, any
    groups): a state dict for ``optimizer.load_state_dict``, keeping ``optimizer``'s group settings."""
    official = checkpoint.optimizer
    if not isinstance(official, Mapping) or "state" not in official or "param_groups" not in official:
        raise ValueError("the official checkpoint has no optimizer state")
    no_decay, decay = official_parameter_order(checkpoint.model)
    sizes = [len(g["params"]) for g in official["param_groups"]]
    if sizes == [len(no_decay), len(decay)]:
        names = no_decay + decay
    elif sizes == [len(no_decay) + len(decay)]:  # one group (a script without the weight-decay split)
        names = [n for n in checkpoint.model if n not in FROZEN]
    else:
        raise ValueError(f"the official optimizer's groups hold {sizes} parameters; main_pretrain.py's "
                         f"(no decay, decay) split of the model gives {[len(no_decay), len(decay)]}")
    index_names = {}
    for group, group_names in zip(official["param_groups"], _split(names, sizes), strict=True):
        index_names.update(zip(group["params"], group_names, strict=True))
    own_names = {id(p): n for n, p in model.named_parameters()}
    own_index = {}
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        if id(p) not in own_names:
            raise ValueError("the optimizer holds a parameter that is not the model's")
        own_index[own_names[id(p)]] = i
    target = optimizer.state_dict()
    state = {}
    for index, entry in official["state"].items():
        name = index_names.get(index)
        if name is None:
            raise ValueError(f"the official optimizer state has an entry {index} beyond its groups")
        expected = tuple(checkpoint.model[name].shape)
        moment = entry.get("exp_avg")
        if moment is not None and tuple(moment.shape) != expected:
            raise ValueError(f"official optimizer entry {index} has shape {tuple(moment.shape)}, its parameter "
                             f"{name} {expected}: the optimizer does not follow main_pretrain.py's groups")
        if name not in own_index:
            raise ValueError(f"{name} has optimizer state but is not a trained parameter of the fastmim model")
        state[own_index[name]] = dict(entry)
    return {"state": state, "param_groups": target["param_groups"]}


def _split(names: list[str], sizes: list[int]) -> list[list[str]]:
    out, start = [], 0
    for size in sizes:
        out.append(names[start:start + size])
        start += size
    return out


def init_from_official(source: str | Path | Mapping[str, Any] | OfficialCheckpoint, model: nn.Module,
                       optimizer: torch.optim.Optimizer | None = None) -> OfficialStart:
    """Start ``model`` (a fastmim MAE-family model) and ``optimizer`` from an official checkpoint.

    The weights load by name: every tensor of the checkpoint must fit the model (``ValueError``
    otherwise), and the model's MAE tensors must all be there, except the whole decoder for an
    encoder-only file (the released pretrained weights: the decoder keeps its init, with a
    warning). A subclass's extra modules (a classifier, projection heads) keep their init and an
    EMA teacher (LUT) is reset to the loaded student. With ``optimizer`` and an optimizer state
    in the file, AdamW's moments and step counts go to the parameters of the same names
    (:func:`official_optimizer_state`). Returns where the official run stood.
    """
    ckpt = source if isinstance(source, OfficialCheckpoint) else read_official_checkpoint(source)
    target = model.state_dict()
    unexpected = [k for k in ckpt.model if k not in target]
    if unexpected:
        raise ValueError(f"the official checkpoint has tensors the model lacks: {unexpected[:8]} "
                         f"(a different model class?)")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in ckpt.model.items()
             if tuple(v.shape) != tuple(target[k].shape)]
    if wrong:
        raise ValueError(f"the official checkpoint does not fit the model's sizes: {wrong[:4]}")
    core = [k for k in target if k.split(".")[0] in _MAE_PARTS]
    missing = [k for k in core if k not in ckpt.model]
    decoder_only = all(k.startswith(("decoder_", "mask_token")) for k in missing)
    if missing and not decoder_only:
        raise ValueError(f"the official checkpoint lacks encoder tensors of the model: {missing[:8]}")
    if missing:
        warnings.warn("the official checkpoint has no decoder (released encoder weights): the decoder keeps its "
                      "init", stacklevel=2)
    model.load_state_dict(ckpt.model, strict=False)
    reset = getattr(model, "reset_teacher", None)
    if callable(reset):
        reset()
    step, loaded = 0, False
    if optimizer is not None and ckpt.optimizer is not None:
        state = official_optimizer_state(ckpt, model, optimizer)
        optimizer.load_state_dict(state)
        steps = [int(s["step"]) for s in ckpt.optimizer["state"].values() if "step" in s]
        step, loaded = (max(steps) if steps else 0), True
    epoch = 0 if ckpt.epoch is None else ckpt.epoch + 1
    return OfficialStart(step=step, epoch=epoch, optimizer_loaded=loaded, scaler=ckpt.scaler, args=ckpt.args)


def start_run_from_official(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> OfficialStart:
    """``fastmim train --init-from-official PATH``: :func:`init_from_official` into the run's
    model and fused AdamW, a file that does not fit being a :class:`TrainError`. The optimizer
    stays fused, the implementation that takes the non-finite guard's ``found_inf``."""
    try:
        start = init_from_official(path, model, optimizer)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TrainError(f"--init-from-official {path}: {exc}") from None
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=None)
    return start


_MAE_PARTS = {"cls_token", "pos_embed", "patch_embed", "blocks", "norm", "decoder_embed", "mask_token",
              "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred"}
