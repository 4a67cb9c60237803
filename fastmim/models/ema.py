"""The EMA teacher of the two-view methods (LUT) and its update under FSDP2.

:class:`EMATeacher` is a copy of a student's encoder and projection head whose weights are
**buffers**, not parameters: an optimizer given ``model.parameters()`` never sees them, they
move with ``.to()`` and are saved in ``state_dict()``, they get no gradient, and the teacher
stays in eval mode (BatchNorm on its running statistics). :class:`EMAPairs` pairs the teacher's
tensors with the student's, by name, for the one ``torch._foreach_lerp_`` of an EMA step.

Under FSDP2 (``fully_shard``) the student's parameters are ``DTensor`` shards (dim 0) while
the teacher stays whole on every rank (its forward needs every weight, as the student's
forward does after FSDP's all-gather). Each rank lerps its shard's rows of the teacher, in the
same one ``_foreach_lerp_`` as the unsharded tensors, then one all-gather per process group
copies every rank's updated rows into every rank's teacher: the teacher's step of one
process holding the whole student.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastmim.models.heads import FrozenBatchNorm1d
from fastmim.models.vit import patch_features

__all__ = ["EMAPairs", "EMATeacher", "ema_momentum"]


def ema_momentum(step: int, max_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """``final - (final - base) * (1 + cos(pi * step / max_steps)) / 2``: ``base`` at step 0,
    ``final`` at ``max_steps`` (BYOL's schedule; LUT's default 0.996 -> 1)."""
    if max_steps <= 0:
        return final
    progress = min(max(step / max_steps, 0.0), 1.0)
    return final - (final - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _freeze_into_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` (recursively) into a buffer of the same name, and every
    BatchNorm into a :class:`FrozenBatchNorm1d` (eval-only, buffers only)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, FrozenBatchNorm1d.from_batchnorm(child))
        else:
            _freeze_into_buffers(child)
    for name, param in list(module.named_parameters(recurse=False)):
        delattr(module, name)
        module.register_buffer(name, param.detach().clone())


class EMATeacher(nn.Module):
    """The EMA teacher of a two-view student (:class:`~fastmim.models.LUT`): the student's
    encoder (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``, ``norm``) and projection
    head (``projector``), same names, all weights held as buffers; always in eval mode;
    ``forward`` runs under ``no_grad``."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.patch_embed = copy.deepcopy(student.patch_embed)
        self.blocks = copy.deepcopy(student.blocks)
        self.norm = copy.deepcopy(student.norm)
        self.projector = copy.deepcopy(student.projector)
        self.register_buffer("cls_token", student.cls_token.detach().clone())
        self.register_buffer("pos_embed", student.pos_embed.detach().clone())
        _freeze_into_buffers(self)
        self.train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        del mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, E)``: projection of the mean of the unmasked image's encoded patch tokens."""
        # LayerNorm is per token: normalising the patch tokens alone equals dropping cls after it.
        return self.projector(self.norm(patch_features(self, imgs)).mean(dim=1))


def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _shard_rows(length: int, world: int) -> list[tuple[int, int]]:
    """``(start, rows)`` of each rank's dim-0 shard of ``length`` rows: ``torch.chunk``'s split,
    FSDP2's (the last ranks may hold fewer rows, or none)."""
    chunk = -(-length // world)
    return [(min(r * chunk, length), max(0, min(chunk, length - r * chunk))) for r in range(world)]


class _RowGather:
    """After the lerp, every rank's updated rows of the teacher's sharded tensors (one process
    group, one dtype) copied into every rank's teacher: one all-gather into one flat buffer.

    Each rank sends its rows of every tensor in one flat segment, each tensor padded to its
    largest shard so that all segments have the same layout; the received buffer is split
    back with one ``split`` (data and padding pieces alternate) and copied into the teacher's
    rows (flat views) with one ``_foreach_copy_``."""

    def __init__(self, group: Any, rank: int, world: int, dtype: torch.dtype, device: torch.device):
        self.group, self.rank, self.world, self.dtype, self.device = group, rank, world, dtype, device
        # Newer torch deprecates all_gather_into_tensor for all_gather_single; older ones lack the latter.
        self.all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
        self.segment = 0
        self.sizes: list[list[int]] = [[] for _ in range(world)]  # per rank: data, padding, data, ...
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(world)]

    def add(self, teacher: torch.Tensor, shards: list[tuple[int, int]]) -> None:
        flat = teacher.view(-1)
        row = flat.numel() // max(1, teacher.shape[0])
        padded = max(rows for _, rows in shards) * row
        for r, (start, rows) in enumerate(shards):
            self.sizes[r] += [rows * row, padded - rows * row]
            self.rows[r].append(flat[start * row:(start + rows) * row])
        self.segment += padded

    def finish(self) -> _RowGather:
        self.own_sizes, self.own_rows = self.sizes[self.rank], self.rows[self.rank]
        self.all_sizes = [s for sizes in self.sizes for s in sizes]
        self.all_rows = [t for rows in self.rows for t in rows]
        del self.sizes, self.rows
        return self

    def __call__(self) -> None:
        received = torch.empty(self.world * self.segment, dtype=self.dtype, device=self.device)
        send = received[self.rank * self.segment:(self.rank + 1) * self.segment]  # in place: no second buffer
        torch._foreach_copy_(list(send.split(self.own_sizes)[0::2]), self.own_rows)
        self.all_gather(received, send, group=self.group)
        torch._foreach_copy_(self.all_rows, list(received.split(self.all_sizes)[0::2]))


class EMAPairs:
    """The tensors of ``model.teacher`` paired with ``model``'s own (the student's) by name.

    ``teacher`` and ``student``: the tensor lists of the EMA's one ``_foreach_lerp_`` (floating
    point teacher buffers, paired with the student's tensors by name); ``gathers``: what spreads
    the rows updated from FSDP shards (empty without sharded parameters); ``layout``: the
    model's class when paired."""

    def __init__(self, model: nn.Module):
        self.layout = type(model)
        dtensor = _dtensor_type()
        if dtensor is not None:
            from torch.distributed.fsdp import FSDPModule

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()  # pair the sharded parameters, not gathered copies FSDP frees again
        student = dict(model.named_parameters())
        student.update(model.named_buffers())
        named_teacher = [(n, t) for n, t in model.teacher.named_buffers() if t.is_floating_point()]
        missing = [n for n, _ in named_teacher if n not in student]
        if missing:
            raise RuntimeError(f"the student has no tensors for teacher entries {missing[:4]}: rebuild the teacher "
                               "with reset_teacher() after changing the model's structure")
        self.teacher: list[torch.Tensor] = []
        self.student: list[torch.Tensor] = []
        gathers: dict[Any, _RowGather] = {}
        for name, teacher in named_teacher:
            # The parameter itself, not a detached alias: `param.data = ...` keeps the object.
            source = student[name]
            if dtensor is not None and isinstance(source, dtensor):
                teacher, source = self._shard_pair(name, teacher, source, gathers)
            self.teacher.append(teacher)
            self.student.append(source)
        self.gathers = [g.finish() for g in gathers.values()]

    @staticmethod
    def _shard_pair(name: str, teacher: torch.Tensor, source: Any,
                    gathers: dict[Any, _RowGather]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(this rank's rows of the teacher, the local shard)`` of an FSDP-sharded parameter."""
        from torch.distributed.tensor import Shard

        mesh = source.device_mesh
        if mesh.ndim != 1 or tuple(source.placements) != (Shard(0),):
            raise NotImplementedError(f"the EMA teacher supports student parameters sharded on dim 0 of a 1-D "
                                      f"mesh (fully_shard's default); {name} has placements {source.placements} "
                                      f"on a {mesh.ndim}-D mesh")
        if tuple(teacher.shape) != tuple(source.shape) or not teacher.is_contiguous():
            raise RuntimeError(f"teacher entry {name} {tuple(teacher.shape)} does not match the student's "
                               f"{tuple(source.shape)}: rebuild the teacher with reset_teacher()")
        rank, world = mesh.get_local_rank(), mesh.size()
        shards = _shard_rows(teacher.shape[0], world)
        start, rows = shards[rank]
        local = source.to_local()
        if local.shape[0] != rows or local.shape[1:] != teacher.shape[1:]:
            raise RuntimeError(f"{name}: this rank's shard is {tuple(local.shape)}, expected {rows} rows of "
                               f"{tuple(teacher.shape)} (torch.chunk over {world} ranks, as fully_shard)")
        key = (mesh, teacher.dtype, teacher.device)
        if key not in gathers:
            gathers[key] = _RowGather(mesh.get_group(), rank, world, teacher.dtype, teacher.device)
        gathers[key].add(teacher, shards)
        return teacher.narrow(0, start, rows), local
