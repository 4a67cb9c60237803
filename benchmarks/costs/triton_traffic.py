"""The bytes Triton kernels really load and store, counted in Triton's CPU interpreter.

Under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` (and atomic) of a kernel goes
through the interpreter's builder with the addresses and the mask of the access. Inside
:func:`count_traffic` those calls are wrapped: each access adds the bytes of its unmasked
elements to the kernel argument whose storage holds the address. Per argument both the
total bytes (every access) and the distinct bytes (each address once) are kept: a small
operand read by every program (a position table, a weight) is read from HBM once and then
from cache, so a check of a kernel's HBM traffic takes the distinct bytes for such operands
and the total for the rest.

Needs ``TRITON_INTERPRET=1`` set before triton is imported (the test suite's conftest does).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

_IN_LAUNCH = False


@dataclasses.dataclass
class ArgTraffic:
    loaded: int = 0
    stored: int = 0
    addresses: list = dataclasses.field(default_factory=list)  # numpy arrays of byte addresses touched
    itemsizes: list = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return self.loaded + self.stored

    @property
    def distinct(self) -> int:
        """Bytes of the distinct elements loaded or stored (each address once)."""
        if not self.addresses:
            return 0
        total = 0
        for size in set(self.itemsizes):
            addrs = np.concatenate([a for a, s in zip(self.addresses, self.itemsizes, strict=True) if s == size])
            low = int(addrs.min())
            span = (int(addrs.max()) - low) // size + 1
            if span <= 1 << 28:  # a bitmap over the addressed range: linear time (np.unique sorts)
                seen = np.zeros(span, dtype=bool)
                seen[(addrs - np.uint64(low)) // np.uint64(size)] = True
                total += int(np.count_nonzero(seen)) * size
            else:
                total += np.unique(addrs).size * size
        return total


@dataclasses.dataclass
class Launch:
    kernel: str
    args: dict[str, ArgTraffic]
    ranges: list[tuple[int, int, str]]

    def arg_of(self, address: int) -> str:
        for start, end, name in self.ranges:
            if start <= address < end:
                return name
        return "?"


@dataclasses.dataclass
class Traffic:
    launches: list[Launch] = dataclasses.field(default_factory=list)

    def per_arg(self) -> dict[tuple[str, str], ArgTraffic]:
        return {(launch.kernel, name): t for launch in self.launches for name, t in launch.args.items()}

    def hbm_bytes(self, cached: set[str] = frozenset()) -> int:
        """Total bytes, with the arguments named in ``cached`` counted once per distinct element."""
        out = 0
        for launch in self.launches:
            for name, t in launch.args.items():
                out += t.distinct if name in cached else t.total
        return out


def _itemsize(tt_dtype) -> int:
    return max(1, tt_dtype.primitive_bitwidth // 8)


@contextlib.contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Counts the loads and stores of every Triton kernel launched inside the block."""
    from triton.runtime import interpreter

    traffic = Traffic()
    builder_cls = interpreter.InterpreterBuilder
    orig_load, orig_store = builder_cls.create_masked_load, builder_cls.create_masked_store
    orig_rmw, orig_init = builder_cls.create_atomic_rmw, interpreter.GridExecutor._init_args_hst
    current: list[Launch] = []

    def note(ptrs, mask, kind: str) -> None:
        if not current:
            return
        launch = current[-1]
        size = _itemsize(ptrs.get_element_ty())
        addrs = np.asarray(ptrs.data, dtype=np.uint64)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape) if mask is not None else None
        addrs = addrs[m] if m is not None else addrs.reshape(-1)
        if addrs.size == 0:
            return
        # Attribute by the first address; a single access never spans two arguments.
        name = launch.arg_of(int(addrs[0]))
        t = launch.args.setdefault(name, ArgTraffic())
        if kind == "load":
            t.loaded += addrs.size * size
        else:
            t.stored += addrs.size * size
        t.addresses.append(addrs)
        t.itemsizes.append(size)

    def load(self, ptrs, mask, other, *args, **kwargs):
        note(ptrs, mask, "load")
        return orig_load(self, ptrs, mask, other, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        note(ptrs, mask, "store")
        return orig_store(self, ptrs, value, mask, *args, **kwargs)

    def rmw(self, rmw_op, ptr, val, mask, *args, **kwargs):
        note(ptr, mask, "load")
        note(ptr, mask, "store")
        return orig_rmw(self, rmw_op, ptr, val, mask, *args, **kwargs)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        ranges = []
        for name, arg in [*zip(self.arg_names, args_hst, strict=False), *kwargs_hst.items()]:
            if isinstance(arg, torch.Tensor):
                storage = arg.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name))
        current.append(Launch(kernel=self.fn.__name__, args={}, ranges=ranges))
        traffic.launches.append(current[-1])
        return args_hst, kwargs_hst

    orig_call = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        # The interpreter copies arguments to and from the host around a launch: not the kernel's work.
        global _IN_LAUNCH
        previous, _IN_LAUNCH = _IN_LAUNCH, True
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _IN_LAUNCH = previous

    builder_cls.create_masked_load, builder_cls.create_masked_store = load, store
    builder_cls.create_atomic_rmw = rmw
    interpreter.GridExecutor._init_args_hst = init_args
    interpreter.GridExecutor.__call__ = call
    try:
        yield traffic
    finally:
        builder_cls.create_masked_load, builder_cls.create_masked_store = orig_load, orig_store
        builder_cls.create_atomic_rmw = orig_rmw
        interpreter.GridExecutor._init_args_hst = orig_init
        interpreter.GridExecutor.__call__ = orig_call


def _tensors_device(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


class ImplementationCounter:
    """Counts, for each ``fastmim::*`` op run inside, the kernels its implementation launches.

    A ``TorchDispatchMode`` sees a custom op as one op; to see what it runs, the mode enters
    itself again around the op's implementation and counts the aten ops inside that do work
    (views and allocations excluded, as the cost model does) and the Triton launches.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from costs.counter import NO_WORK_OPS, _is_view, qualified_name

        outer = self
        self.calls: list[tuple[str, int, Traffic]] = []  # (op name, launches, traffic of its Triton kernels)

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                namespace, name = qualified_name(func)
                if namespace == "fastmim":
                    with count_traffic() as traffic:
                        outer._stack.append(0)
                        # Run the op's kernel for this device directly, below the Python key that
                        # would send it back here, with this mode active for the ops inside it.
                        keyset = torch._C.DispatchKeySet(torch._C._parse_dispatch_key(
                            "CUDA" if _tensors_device(args) == "cuda" else "CPU"))
                        with self:
                            out = func.redispatch(keyset, *args, **kwargs)
                        inner = outer._stack.pop()
                    outer.calls.append((name, inner + len(traffic.launches), traffic))
                    return out
                out = func(*args, **kwargs)
                work = namespace == "aten" and name not in NO_WORK_OPS and not _is_view(func)
                if outer._stack and not _IN_LAUNCH and work:
                    outer._stack[-1] += 1
                return out

        self._stack: list[int] = []
        self.mode = _Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
