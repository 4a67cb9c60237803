"""Backend selection for the fused ops.

Every op in ``fastmim.ops`` has up to three implementations:

- ``reference``: plain PyTorch, the definition of the result; runs anywhere.
- ``triton``: the Triton kernels in ``fastmim/kernels/``; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported (how the test suite runs them).
- ``csrc``: the compiled extension ``fastmim._C`` (CPU C++ and CUDA), when it was built.

Default choice per call: a CUDA tensor goes to the op's preferred GPU backend (Triton unless
benchmarks showed csrc winning for that op); a CPU tensor goes to the op's preferred CPU
backend (csrc where built and implemented, else the reference). ``FASTMIM_BACKEND`` (or
:func:`use_backend`) forces one backend for every op that implements it; ops that do not
implement the forced backend keep their default, so forcing ``csrc`` never disables the
attention kernels. Forcing a backend that cannot run here raises ``RuntimeError`` naming why.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator, Sequence

import torch

from fastmim import environment

BACKENDS = ("reference", "triton", "csrc")
# What FASTMIM_BACKEND / use_backend may name: the ops' implementations, and attention's peers
# (fastmim.ops.attention_router), which the other ops do not have and so ignore.
FORCEABLE = (*BACKENDS, "sdpa", "xformers")

_forced: str | None = None


def triton_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return environment.triton_interpret()


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # an import of triton can fail in many ways on odd machines
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _csrc_import_error() -> str | None:
    if environment.extension_disabled():
        return "disabled by FASTMIM_NO_EXT=1"
    try:
        from fastmim.ops import _csrc
    except ImportError as exc:
        return f"fastmim._C loader missing ({exc})"
    return _csrc.load_error()


def backend_error(backend: str, device: torch.device) -> str | None:
    """``None`` if ``backend`` can run on ``device`` here, else the reason why not.

    Only the asked backend is probed: asking about the reference or Triton never loads (or
    builds) the C++ extension.
    """
    if backend == "reference":
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error is None and device.type == "cuda" and not torch.cuda.is_available():
            error = "no CUDA device"
        if error is None and device.type == "cpu" and not triton_interpret():
            error = "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
        if error is None and device.type not in ("cpu", "cuda"):
            error = f"device type {device.type!r} is not supported"
        return error
    if backend == "csrc":
        error = _csrc_import_error()
        if error is None and device.type not in ("cpu", "cuda"):
            error = f"device type {device.type!r} is not supported"
        if error is None and device.type == "cuda":
            from fastmim.ops import _csrc

            if not _csrc.has_cuda():
                error = "fastmim._C was built without CUDA"
        return error
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def backend_status(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Map each backend to ``None`` if it can run on ``device`` here, else to the reason why not.

    ``device`` defaults to CUDA when available, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {backend: backend_error(backend, device) for backend in BACKENDS}


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``FASTMIM_BACKEND``, if any."""
    backend = _forced or environment.forced_backend_name()
    if backend is not None and backend not in FORCEABLE:
        raise ValueError(f"FASTMIM_BACKEND must be one of {FORCEABLE}, got {backend!r}")
    return backend


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Force ``backend`` for the ops called inside the block (``None`` restores the default)."""
    global _forced
    if backend is not None and backend not in FORCEABLE:
        raise ValueError(f"backend must be one of {FORCEABLE} or None, got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


def select_backend(
    op: str,
    device: torch.device,
    implemented: Sequence[str] = ("reference", "triton"),
    prefer_cuda: Sequence[str] = ("triton",),
    prefer_cpu: Sequence[str] = ("reference",),
) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``implemented`` lists the backends the op has; ``prefer_cuda`` / ``prefer_cpu`` list, best
    first, the backends to try by default on each device type (the reference is always the
    last resort).
    """
    forced = forced_backend()
    if forced is not None and forced in implemented:
        reason = backend_error(forced, device)
        if reason is not None:
            raise RuntimeError(f"fastmim op {op!r}: backend {forced!r} was forced but is unavailable: {reason}")
        return forced
    preferred = prefer_cuda if device.type == "cuda" else prefer_cpu
    for backend in preferred:
        if backend in implemented and backend_error(backend, device) is None:
            return backend
    return "reference"
