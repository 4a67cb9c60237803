"""The machinery of :func:`fastmim.patch`: the report, the patched classes, units and their probes."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from fastmim.ops import (
    forced_backend,
    select_backend,
)

logger = logging.getLogger("fastmim.patch")


logger = logging.getLogger("fastmim.patch")

# What a patched unit now runs (the report groups units by these labels).
ATTENTION = "packed-qkv attention"
BLOCK = "fused block (LayerNorm + residual, bias-GELU)"
CHAIN = "residual stream between blocks"
MASKING = "masking + gather + pos-embed"
UNSHUFFLE = "un-shuffle"
LOSS = "masked-patch loss"

_STATE_PREFIX = "_fastmim_"  # instance attributes the patch adds (none is a parameter, buffer or module)


# ============================================================================================
# Report
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class PatchReport:
    """What :func:`patch` did: ``patched`` and ``left`` as ``(module path, what / why)`` pairs
    (path ``""`` is the model itself; a method name follows ``:``). ``verified``: every patched
    forward was compared with the original on a probe input."""

    model: str
    kind: str
    patched: tuple[tuple[str, str], ...]
    left: tuple[tuple[str, str], ...]
    verified: bool

    def summary(self) -> str:
        """One line: the patched units counted by what they run, and everything left with its reason."""
        counts = Counter(what for _, what in self.patched)
        done = ", ".join(f"{n} x {what}" if n > 1 else what for what, n in counts.items()) or "nothing"
        left = "; ".join(f"{path or '<model>'} ({why})" for path, why in self.left) or "nothing"
        note = "" if self.verified else " [not verified against the original forwards]"
        return f"fastmim.patch({self.model}, {self.kind}): patched {done}; left as it was: {left}{note}"

    def __str__(self) -> str:
        return self.summary()


# ============================================================================================
# Shared helpers
# ============================================================================================


def _fused_kernels_on(x: torch.Tensor) -> bool:
    """Whether the fused block ops have kernels for ``x`` (the device rule of ``FusedBlock.fusable``:
    Triton on CUDA, or on CPU when forced / interpreted; meta models a GPU step)."""
    if torch.compiler.is_compiling():
        return x.device.type in ("cuda", "meta") or forced_backend() == "triton"
    return x.device.type == "meta" or select_backend("layer_norm", x.device) == "triton"


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _argsort_masking(noise: torch.Tensor, len_keep: int, device: torch.device,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official masking rule on ``noise`` ``(B, L)``: ``(ids_keep (B, K), ids_restore, mask)``, the
    mask 1 on removed patches in the default float dtype (as ``torch.ones`` gives it)."""
    ids_shuffle = torch.argsort(noise, dim=1).to(device)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())
    return ids_shuffle[:, :len_keep], ids_restore, mask


def _exact_gelu(act: Any) -> bool:
    """``nn.GELU()`` (erf), timm's ``GELU``, or transformers' ``GELUActivation`` on ``F.gelu``."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    name, module = type(act).__name__, type(act).__module__
    if name == "GELU" and module.startswith("timm."):
        return True
    return name == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _affine_layer_norm(norm: Any) -> bool:
    return (isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
            and len(norm.normalized_shape) == 1)


def _is_identity(module: Any) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _dropout_p(module: Any) -> float:
    return float(getattr(module, "p", 0.0)) if module is not None else 0.0


def _signature(fn: Callable) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return []


def _signature_fits(fn: Callable, required: Iterable[str | None], optional: Iterable[str] = (),
                    var_keyword: bool | None = False) -> bool:
    """``fn(self, *required, [optional...], [**kwargs])``: the required positional parameters in order
    (``None`` matches any name), then optional ones with defaults, each named in ``optional``."""
    params = _signature(fn)
    required = list(required)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(required) or any(p.kind == p.VAR_POSITIONAL for p in params):
        return False
    for p, name in zip(positional, required, strict=False):
        if p.default is not p.empty or (name is not None and p.name != name):
            return False
    extra = [p for p in params[len(required):] if p.kind != p.VAR_KEYWORD]
    if any(p.default is p.empty or p.name not in optional for p in extra):
        return False
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    return var_keyword is None or has_var_kw == var_keyword


def _first_float_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t
    return None


# ============================================================================================
# Patched classes: a subclass per (original class, mixin), created on first use
# ============================================================================================

_CLASSES: dict[tuple[type, type], type] = {}


class _Patch:
    """Base of the mixins. A patched module's class is ``type("Fastmim<Name>", (mixin, original), {})``."""

    _fastmim_original: type
    _fastmim_mixin: type

    def __reduce_ex__(self, protocol):  # pickle by the original class and the mixin (the subclass is made on load)
        reduced = super().__reduce_ex__(protocol)
        return (_new_patched, (type(self)._fastmim_original, type(self)._fastmim_mixin), *reduced[2:])


def _patched_class(original: type, mixin: type) -> type:
    cls = _CLASSES.get((original, mixin))
    if cls is None:
        name = f"Fastmim{original.__name__}"
        cls = type(name, (mixin, original), {"__module__": __name__, "__qualname__": name,
                                              "_fastmim_original": original, "_fastmim_mixin": mixin})
        _CLASSES[(original, mixin)] = cls
    return cls


def _new_patched(original: type, mixin: type) -> Any:
    cls = _patched_class(original, mixin)
    return cls.__new__(cls)


def _original_class(module: nn.Module) -> type:
    return getattr(type(module), "_fastmim_original", type(module))


# ============================================================================================
# Units: one change each, applied, probed, kept or reverted
# ============================================================================================


@dataclasses.dataclass
class _Unit:
    path: str
    module: nn.Module
    what: str
    mixin: type | None = None  # a class swap ...
    method: str | None = None  # ... or one more method enabled on an already swapped module
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    probe_args: Callable[[], tuple] | None = None
    probe_method: str = "forward"
    probe_key: Any = None  # units with the same key share one probe (one per class)
    requires: Callable[[], str | None] | None = None  # before applying: why it cannot apply now, or None

    def apply(self) -> None:
        if self.mixin is not None:
            for name, value in self.attrs.items():
                setattr(self.module, name, value)
            self.module.__class__ = _patched_class(_original_class(self.module), self.mixin)
        else:
            self.module._fastmim_methods = self.module._fastmim_methods | {self.method}

    def revert(self) -> None:
        if self.mixin is not None:
            self.module.__class__ = _original_class(self.module)
            for name in self.attrs:
                self.module.__dict__.pop(name, None)
        else:
            self.module._fastmim_methods = self.module._fastmim_methods - {self.method}


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _rng_get(devices: list[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _rng_set(devices: list[int], state: tuple) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, d)


@contextlib.contextmanager
def _probe_mode(module: nn.Module, devices: list[int]) -> Iterator[None]:
    """Evaluation mode, no gradient, and a forked RNG (the caller's RNG state is restored afterwards)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _leaves(out: Any) -> list[Any]:
    if isinstance(out, torch.Tensor) or out is None:
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in _leaves(item)]
    return [out]


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-2}.get(dtype, 5e-2)


def _differs(want: Any, got: Any) -> str | None:
    a, b = _leaves(want), _leaves(got)
    if len(a) != len(b):
        return f"{len(b)} outputs instead of {len(a)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return f"output {i} has shape {tuple(y.shape)} instead of {tuple(x.shape)}"
            if not x.is_floating_point():
                if not torch.equal(x, y):
                    return f"output {i} differs"
                continue
            ref = x.double()
            err = float((y.double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-6) if x.numel() else 0.0
            if not err <= _tolerance(x.dtype):
                return f"output {i} differs (max relative error {err:.2g})"
        elif type(x) is not type(y) or (x is not None and not isinstance(x, torch.Tensor) and x != y):
            return f"output {i} differs"
    return None


def _probe(unit: _Unit) -> str | None:
    """``None`` when the patched method computes what the original does on the unit's probe input,
    both runs starting from the same RNG state."""
    ref = _first_float_tensor(unit.module)
    devices = _rng_devices(ref.device if ref is not None else torch.device("cpu"))
    call = unit.probe_method
    with _probe_mode(unit.module, devices):
        args = unit.probe_args()
        state = _rng_get(devices)
        unit.revert()
        try:
            want = getattr(type(unit.module), call)(unit.module, *args)
        finally:
            unit.apply()
        _rng_set(devices, state)
        got = getattr(type(unit.module), call)(unit.module, *args)
    return _differs(want, got)


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _probe_tensor(module: nn.Module, *shape: int) -> torch.Tensor:
    ref = _first_float_tensor(module)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    return torch.randn(*shape, dtype=dtype, device=device)


