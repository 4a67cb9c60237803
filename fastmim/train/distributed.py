"""Devices and processes: the ``--device`` choice, FSDP2 sharding, and the process-group
setup from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``): NCCL on GPUs, gloo on CPU. Without those variables the
run is a single process and nothing here does anything."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "all_reduce_mean", "all_gather", "resolve_device",
           "local_tensor", "shard_fsdp", "full_state", "load_full_weights", "load_optimizer_state"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (once); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def all_gather(obj: Any, info: DistInfo) -> Any:
    """Every rank's ``obj``, in rank order (a collective); ``obj`` itself in a single process."""
    if not info.enabled:
        return obj
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device name (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    try:
        torch.empty(0, device=device)
    except RuntimeError as exc:
        raise ValueError(f"--device {name} is not available here ({str(exc).strip().splitlines()[0]})") from None
    return device


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard when FSDP made it a DTensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_fsdp(module: nn.Module) -> None:
    """FSDP2: every block of every block list its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    fully_shard(module)


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer,
               fsdp: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole model's and optimizer's state dicts. Under FSDP a collective: every rank
    gathers the unsharded tensors, to the CPU."""
    if not fsdp:
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options), get_optimizer_state_dict(module, optimizer, options=options)


def load_full_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Whole (unsharded) weights into a module FSDP sharded: every rank loads all of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         fsdp: bool) -> None:
    """A whole optimizer state dict into ``optimizer``; under FSDP each rank takes its shards' part."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
