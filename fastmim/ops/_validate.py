"""Value checks of the ops' index and offset arguments: one policy for every op.

Shapes, dtypes and devices are always checked (free). Index *values* (``ids_keep``,
``ids_restore``, ``ids_masked``, integer ``key_visible``, ``cu_seqlens``) are checked as follows:

- **On the host** (CPU tensors, on every backend: reference, csrc, and Triton through its
  interpreter) they are always checked; a bad value raises ``ValueError`` naming the argument,
  the first bad position, the value and the expected range.
- **On an accelerator** reading them back would be a device sync on the hot path, so they are
  checked only while index checks are on (``FASTMIM_CHECK_INDICES=1`` in the environment, or
  :func:`check_indices` in code): the debug mode for a run that misbehaves. With checks off,
  every kernel still masks every access with the real extent of the tensor it reads or writes,
  so a bad index gives wrong values (an out-of-range id reads zeros, its gradient is dropped),
  never an access outside a tensor.
- **While torch.compile traces** they are never checked (a data-dependent check would break
  the graph); the compiled kernels keep their masked accesses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fastmim import environment

__all__ = ["check_cu_seqlens", "check_distinct_rows", "check_index_range", "check_indices", "check_permutation_rows",
           "values_checked"]

_checks_forced: bool | None = None


def _checks_on() -> bool:
    if _checks_forced is not None:
        return _checks_forced
    return environment.check_indices()


@contextlib.contextmanager
def check_indices(enabled: bool = True) -> Iterator[None]:
    """Check index values of accelerator tensors too (a device sync per op call) inside the block.

    ``FASTMIM_CHECK_INDICES=1`` turns the same checks on for a whole process. Host tensors are
    always checked.
    """
    global _checks_forced
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _checks_forced = _checks_forced, enabled
    try:
        yield
    finally:
        _checks_forced = previous


def values_checked(t: Tensor) -> bool:
    """Whether the values of ``t`` are checked under the policy above."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t):  # no values to read
        return False
    return t.device.type == "cpu" or _checks_on()


def _first_bad(bad: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def check_index_range(name: str, t: Tensor, high: int, *, low: int = 0, op: str | None = None) -> None:
    """Every value of ``t`` in ``[low, high)`` (when checked: see :func:`values_checked`)."""
    if t.numel() == 0 or not values_checked(t):
        return
    bad = (t < low) | (t >= high)
    if bool(bad.any()):
        where = _first_bad(bad)
        prefix = f"{op}: " if op else ""
        position = f"[{', '.join(map(str, where))}]" if where else ""
        raise ValueError(f"{prefix}{name}{position} = {int(t[where])} is outside the valid range [{low}, {high})")


def check_permutation_rows(name: str, t: Tensor, *, op: str | None = None) -> None:
    """Every row of the 2-D ``t`` a permutation of ``0..L-1`` (when checked)."""
    if t.numel() == 0 or not values_checked(t):
        return
    length = t.shape[-1]
    check_index_range(name, t, length, op=op)
    expected = torch.arange(length, device=t.device, dtype=t.dtype)
    wrong = (t.sort(dim=-1).values != expected).any(dim=-1)
    if bool(wrong.any()):
        row = int(wrong.nonzero()[0, 0])
        prefix = f"{op}: " if op else ""
        raise ValueError(f"{prefix}{name}[{row}] must be a permutation of 0..{length - 1} (each index once), "
                         f"got {t[row].tolist()[:16]}{' ...' if length > 16 else ''}")


def check_distinct_rows(name: str, t: Tensor, *, op: str | None = None) -> None:
    """No value twice in a row of the 2-D ``t`` (when checked): each index of a set at most once."""
    if t.numel() == 0 or not values_checked(t):
        return
    ordered = t.sort(dim=-1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        row, col = _first_bad(repeated)
        value = int(ordered[row, col])
        first, second = ((t[row] == value).nonzero()[:2, 0]).tolist()
        prefix = f"{op}: " if op else ""
        raise ValueError(f"{prefix}{name}[{row}, {second}] = {value} repeats {name}[{row}, {first}]: each index "
                         f"may appear at most once per row")


def check_cu_seqlens(name: str, cu_seqlens: Tensor, *, total: int | None = None, max_seqlen: int | None = None,
                     op: str | None = None) -> list[int] | None:
    """Offsets ``cu_seqlens`` valid (when checked): ``cu_seqlens[0] = 0``, non-decreasing,
    ``cu_seqlens[-1] = total`` (the packed length, when given) and every count ``<= max_seqlen``
    (when given). Returns the offsets as a list when they were checked, else ``None``."""
    if not values_checked(cu_seqlens):
        return None
    prefix = f"{op}: " if op else ""
    cu = cu_seqlens.tolist()
    if not cu:
        return cu
    if cu[0] != 0:
        raise ValueError(f"{prefix}{name}[0] = {cu[0]}, expected 0 (offsets start at 0)")
    for i in range(1, len(cu)):
        if cu[i] < cu[i - 1]:
            raise ValueError(f"{prefix}{name}[{i}] = {cu[i]} < {name}[{i - 1}] = {cu[i - 1]}: offsets must be "
                             f"non-decreasing")
    if total is not None and cu[-1] != total:
        raise ValueError(f"{prefix}{name}[-1] = {cu[-1]}, expected the packed length {total}")
    if max_seqlen is not None and len(cu) > 1:
        counts = [hi - lo for lo, hi in zip(cu[:-1], cu[1:], strict=True)]
        longest = max(counts)
        if longest > max_seqlen:
            b = counts.index(longest)
            raise ValueError(f"{prefix}max_seqlen = {max_seqlen} is smaller than sequence {b} of {name} "
                             f"({longest} tokens): it must bound every sequence length")
    return cu
