"""Op-by-op accounting of a training step, run on the meta device (no memory, no arithmetic).

:class:`StepCounter` runs a step's forward, backward and optimizer step under two modes:

- a ``TorchFunctionMode`` that sees each call before it decomposes: it sends
  ``F.scaled_dot_product_attention`` on meta tensors to the fused flash (or, with a mask,
  memory-efficient) attention op a GPU runs, instead of the math path it decomposes into on
  meta; and it tags the autograd nodes each call creates with the region it ran in (an
  attention module, the loss, the masking), so backward ops are classified like their
  forward op;
- a ``TorchDispatchMode`` that sees every aten op (and each ``fastmim::*`` custom op as one
  op) and records its FLOPs (``torch.utils.flop_counter`` formulas plus
  :data:`FLOP_FORMULAS`), the bytes it reads and writes, the kernels it launches and its
  op family.

Plus a ``saved_tensors_hooks`` pair that records the distinct storages saved for backward
during the forward (parameters excluded), and a live-bytes tally of every storage (weak
references to storages) for the peak.

Accounting rules (one op = one GPU kernel unless said otherwise):

- bytes: each distinct storage an op reads counts once, each it writes counts once; a
  storage both read and written (``add_``) counts twice, one written without being read
  (``copy_``, ``fill_``, ``out=``) once. A tensor's bytes are the elements it addresses
  (broadcast dimensions, stride 0, count once), capped at its storage. Views, ``empty``
  and metadata ops move nothing and launch nothing. :data:`BYTE_FORMULAS` overrides this for
  ops whose kernels read only part of an input (fastmim's gathers).
- launches: 1 per op that does work; the multi-tensor ops (``_foreach_*``,
  ``_fused_adamw_``) launch what ATen's ``multi_tensor_apply`` would for those tensors
  (chunks of 65536 elements, at most 320 blocks and 110/64/48/36/30 tensors per launch for
  1-5 tensor lists); the flash-attention backward launches 3 kernels (preprocess, main,
  dq conversion), as FlashAttention-2 does; PyTorch's LayerNorm backward 2 (the dX row kernel
  and the gamma/beta reduction, each reading dY and X), 3 past 64K rows of a narrow row.
- FLOPs: ``torch.utils.flop_counter`` formulas (matmuls, convolutions, attention); other ops
  count no FLOPs (they are bandwidth-bound). fastmim's Triton GEMMs count their product's FLOPs
  and compute at the device's stated Triton-vs-cuBLAS efficiency (:func:`project`); the
  elementwise work of their prologues and epilogues counts none. The flash backward's recomputation of ``QK^T``
  is not counted, as in ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

FAMILIES = ("gemm", "attention", "layernorm", "activation", "elementwise", "masking", "loss", "optimizer")
FAMILY_LABELS = {
    "gemm": "GEMM",
    "attention": "attention",
    "layernorm": "LayerNorm / norms",
    "activation": "activation (GELU)",
    "elementwise": "elementwise / residual",
    "masking": "masking and gathers",
    "loss": "loss",
    "optimizer": "optimizer",
}

# Ops that move no data and launch no kernel beyond views (views are found from the schema).
NO_WORK_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted", "detach",
    "lift_fresh", "_unsafe_view", "alias", "set_", "resize_", "_reshape_alias", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "_version",
    # A Python scalar written into a tensor (``x[:, :k] = 0``): on a GPU the scalar stays on the host and the
    # write is one fill kernel; on meta it becomes a meta tensor first.
    "scalar_tensor", "promote_types", "result_type",
}
IGNORED_NAMESPACES = {"profiler", "prim", "prims"}
# In-place ops whose mutated argument is only written, never read.
WRITE_ONLY_OPS = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_", "exponential_",
                  "geometric_", "cauchy_", "log_normal_"}

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "matmul", "_addmm_activation", "_scaled_mm",
            "convolution", "_convolution", "convolution_backward", "cudnn_convolution", "_slow_conv2d_forward",
            "_slow_conv2d_backward", "_int_mm"}
MASKING_OPS = {"gather", "scatter", "scatter_add", "scatter_add_", "scatter_", "index", "index_put", "index_put_",
               "_index_put_impl_", "index_select", "index_add", "index_add_", "index_copy", "sort", "argsort",
               "topk", "randperm", "rand", "rand_like", "uniform_", "normal_", "randn", "bernoulli_", "cat",
               "stack", "repeat", "gather_backward", "select_scatter", "slice_scatter", "masked_select",
               "nonzero", "searchsorted", "cumsum", "repeat_interleave"}
FIXED_FAMILY = {
    **dict.fromkeys(["native_layer_norm", "native_layer_norm_backward", "layer_norm", "native_batch_norm",
                     "native_batch_norm_backward", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                     "_native_batch_norm_legit_no_training", "batch_norm_backward", "_fused_rms_norm",
                     "_fused_rms_norm_backward", "cudnn_batch_norm", "cudnn_batch_norm_backward",
                     "native_group_norm", "native_group_norm_backward"], "layernorm"),
    **dict.fromkeys(["gelu", "gelu_backward", "relu", "relu_", "threshold_backward", "silu", "silu_backward",
                     "sigmoid", "sigmoid_backward", "tanh", "tanh_backward"], "activation"),
    **dict.fromkeys(["_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
                     "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
                     "_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
                     "_efficient_attention_backward", "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_flash_attention_for_cpu_backward", "_softmax", "_softmax_backward_data"],
                    "attention"),
    **dict.fromkeys(["_fused_adamw_", "_fused_adam_", "_fused_sgd_"], "optimizer"),
    **dict.fromkeys(["mse_loss", "mse_loss_backward", "nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward",
                     "nll_loss2d_backward", "_log_softmax", "_log_softmax_backward_data", "cross_entropy_loss"],
                    "loss"),
}
# Module classes that open a region: ops inside them that have no fixed family take the region's.
REGION_OF_MODULE: tuple[tuple[Callable[[nn.Module], bool], str | None], ...] = (
    (lambda m: isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GELU, nn.BatchNorm1d, nn.Dropout)), None),
    (lambda m: "Attention" in type(m).__name__, "attention"),
)
# Methods of the models that open a region (the official MAE's and fastmim's names).
REGION_OF_METHOD = {"random_masking": "masking", "forward_loss": "loss", "patchify": "loss", "attend": "attention"}
ABSORBING_REGIONS = {"attention", "loss", "masking", "optimizer"}

# FLOP, byte and launch formulas for ops the defaults get wrong. Keys: "namespace::name".
# FLOP/byte formulas take (args, kwargs, out) and return an int.
FLOP_FORMULAS: dict[str, Callable[[tuple, dict, Any], int]] = {}
BYTE_FORMULAS: dict[str, Callable[[tuple, dict, Any], int]] = {}
LAUNCH_FORMULAS: dict[str, Callable[[tuple, dict, Any], int]] = {
    "aten::_scaled_dot_product_flash_attention_backward": lambda a, k, o: 3,
    "aten::_flash_attention_backward": lambda a, k, o: 3,
    # zeros, then the gradient copied into the slice: two kernels
    "aten::slice_backward": lambda a, k, o: 2,
    "aten::select_backward": lambda a, k, o: 2,
}


def _zeros_then_copy_bytes(args: tuple, kwargs: dict, out: Any) -> int:
    return addressed_bytes(out) + 2 * addressed_bytes(args[0])


BYTE_FORMULAS["aten::slice_backward"] = _zeros_then_copy_bytes
BYTE_FORMULAS["aten::select_backward"] = _zeros_then_copy_bytes

# PyTorch's CUDA LayerNorm backward (aten/src/ATen/native/cuda/layer_norm_kernel.cu): one row kernel for
# dX (reads dY, X, mean, rstd, gamma), then the gamma/beta reduction, a second kernel that reads dY, X,
# mean and rstd again; with more than 64K rows and N / 32 below half the SM count it writes per-block
# partial sums and reduces them with a .sum(0) (a third kernel).
_LN_BACKWARD_SPLIT_ROWS = 64 * 1024
_H100_SMS = 132


def _layer_norm_backward_parts(args: tuple) -> tuple[int, int, bool, bool, bool]:
    grad_out, x, normalized_shape = args[:3]
    output_mask = args[7] if len(args) > 7 else (True, True, True)
    cols = math.prod(normalized_shape)
    rows = x.numel() // max(cols, 1)
    split = rows > _LN_BACKWARD_SPLIT_ROWS and cols // 32 < _H100_SMS // 2
    return rows, cols, bool(output_mask[0]), bool(output_mask[1] or output_mask[2]), split


def _native_layer_norm_backward_launches(args: tuple, kwargs: dict, out: Any) -> int:
    rows, cols, want_dx, want_params, split = _layer_norm_backward_parts(args)
    return max(1, int(want_dx) + (2 if split else 1) * int(want_params))


def _native_layer_norm_backward_bytes(args: tuple, kwargs: dict, out: Any) -> int:
    grad_out, x, _, mean, rstd, weight = args[:6]
    rows, cols, want_dx, want_params, split = _layer_norm_backward_parts(args)
    stats = addressed_bytes(mean) + addressed_bytes(rstd)
    operands = addressed_bytes(grad_out) + addressed_bytes(x) + stats
    dx, dgamma, dbeta = (list(out) + [None] * 3)[:3]
    total = 0
    if want_dx:
        total += operands + (addressed_bytes(weight) if weight is not None else 0) + addressed_bytes(dx)
    if want_params:
        params = sum(addressed_bytes(t) for t in (dgamma, dbeta) if t is not None and t.numel())
        total += operands + params
        if split:  # fp32 partial sums of 32-row blocks, written then read by the .sum(0)
            total += 2 * 2 * math.ceil(rows / 32) * cols * 4
    return total


LAUNCH_FORMULAS["aten::native_layer_norm_backward"] = _native_layer_norm_backward_launches
BYTE_FORMULAS["aten::native_layer_norm_backward"] = _native_layer_norm_backward_bytes
# Triton GEMMs (fastmim's fused ones), charged at the device's Triton-vs-cuBLAS efficiency.
TRITON_GEMM_OPS: set[str] = set()
# fastmim's ops: family by name (csrc_* variants share their op's family).
FASTMIM_FAMILY_RULES = (("gemm", "gemm"), ("attention", "attention"), ("mse", "loss"), ("loss", "loss"),
                        ("masking", "masking"),
                        ("permutation", "masking"), ("gather", "masking"), ("unshuffle", "masking"),
                        ("layer_norm", "layernorm"), ("gelu", "activation"), ("residual", "elementwise"))

_MTA_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MTA_MAX_BLOCKS = 320
_MTA_CHUNK = 65536


def multi_tensor_launches(numels: Iterable[int], depth: int) -> int:
    """Kernels ATen's ``multi_tensor_apply`` launches for tensors of these sizes and ``depth`` lists."""
    max_tensors = _MTA_MAX_TENSORS[min(max(depth, 1), 5)]
    launches = tensors = blocks = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = math.ceil(numel / _MTA_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            tensors_full = tensors == max_tensors and chunk == chunks - 1
            if tensors_full or blocks == _MTA_MAX_BLOCKS:
                launches += 1
                blocks = 0
                tensors = 0 if chunk == chunks - 1 else 1
    return launches + (1 if blocks else 0)


def qualified_name(func: Any) -> tuple[str, str]:
    """``("aten", "addmm")`` for ``aten.addmm.default``."""
    schema_name = func._schema.name  # "aten::addmm"
    namespace, _, name = schema_name.partition("::")
    return namespace, name


def _tensors(value: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def addressed_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements ``t`` addresses (stride-0 dimensions once), capped at its storage."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return min(n * t.element_size(), t.untyped_storage().nbytes())


def _is_view(func: Any) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


@dataclasses.dataclass
class OpRecord:
    op: str
    family: str
    phase: str
    flops: int
    bytes: int
    launches: int
    dtype: str
    tensor_core: bool
    time_s: float = 0.0


def _flops(func: Any, qname: str, args: tuple, kwargs: dict, out: Any) -> int:
    if qname in FLOP_FORMULAS:
        return int(FLOP_FORMULAS[qname](args, kwargs, out))
    formula = flop_registry.get(func.overloadpacket)
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))


def op_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes the op reads plus bytes it writes, by the rules in the module docstring."""
    namespace, name = qualified_name(func)
    qname = f"{namespace}::{name}"
    if qname in BYTE_FORMULAS:
        return int(BYTE_FORMULAS[qname](args, kwargs, out))
    return op_bytes_generic(args, kwargs, out, name, func._schema.arguments)


def op_bytes_generic(args: tuple, kwargs: dict, out: Any, name: str, schema_args: Any = None) -> int:
    """Each distinct storage read once, each written once (see the module docstring)."""
    reads: dict[int, dict[tuple, int]] = {}
    writes: dict[int, dict[tuple, int]] = {}

    def add(table: dict[int, dict[tuple, int]], t: torch.Tensor) -> None:
        # Views of one storage (q, k, v of one qkv tensor) add up; the same view twice counts once.
        view = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        table.setdefault(storage_key(t), {})[view] = addressed_bytes(t)

    def total(table: dict[int, dict[tuple, int]], capped_by: dict[int, int]) -> int:
        return sum(min(sum(views.values()), capped_by[key]) for key, views in table.items())

    storage_bytes: dict[int, int] = {}
    for t in _tensors((args, kwargs, out)):
        storage_bytes[storage_key(t)] = t.untyped_storage().nbytes()

    if schema_args is None:  # no schema at hand: every tensor argument is read, none written in place
        for t in _tensors((args, kwargs)):
            add(reads, t)
        schema_args = ()
    for i, arg in enumerate(schema_args):
        if i < len(args):
            value = args[i]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        else:
            continue
        written = arg.alias_info is not None and arg.alias_info.is_write
        for t in _tensors(value):
            if written:
                add(writes, t)
                if not (arg.is_out or name in WRITE_ONLY_OPS):
                    add(reads, t)
            else:
                add(reads, t)
    if name in ("index_put_", "_index_put_impl_", "index_put"):
        # Only the indexed elements are written: charge the values (broadcast to the index) once more.
        values = args[2]
        self_key = storage_key(args[0])
        reads.pop(self_key, None)
        writes[self_key] = {(): addressed_bytes(values)}
    # Outputs: every view counts (dq, dk, dv written into one buffer add up), except the storages
    # already charged as written through an in-place argument.
    written_in_place = set(writes)
    for t in _tensors(out):
        if storage_key(t) not in written_in_place:
            add(writes, t)
    return total(reads, storage_bytes) + total(writes, storage_bytes)


def op_launches(qname: str, name: str, args: tuple, kwargs: dict, out: Any) -> int:
    if qname in LAUNCH_FORMULAS:
        return int(LAUNCH_FORMULAS[qname](args, kwargs, out))
    if name.startswith("_foreach_") or name.startswith("_fused_"):
        # Tensor lists the kernel walks chunk by chunk (a fused optimizer's 0-d step counters are passed aside).
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)
                 and (a[0].ndim > 0 or name.startswith("_foreach_"))]
        if not lists:
            return 1
        return multi_tensor_launches((t.numel() for t in lists[0]), depth=len(lists))
    return 1


def fastmim_family(name: str) -> str:
    for key, family in FASTMIM_FAMILY_RULES:
        if key in name:
            return family
    return "elementwise"


def classify(namespace: str, name: str, region: str | None) -> str:
    if region == "optimizer" or name.startswith("_foreach_"):
        return "optimizer"
    if namespace == "fastmim":
        return fastmim_family(name)
    if name in FIXED_FAMILY:
        return FIXED_FAMILY[name]
    if region in ABSORBING_REGIONS:
        return region
    if name in GEMM_OPS:
        return "gemm"
    if name in MASKING_OPS:
        return "masking"
    return "elementwise"


@dataclasses.dataclass
class StepCost:
    """The counted step: op records and the memory figures."""

    ops: list[OpRecord]
    activation_bytes: int
    peak_bytes: int
    resident_bytes: int
    saved_tensors: int

    def total(self, field: str, phase: str | None = None, family: str | None = None) -> float:
        return sum(getattr(r, field) for r in self.ops
                   if (phase is None or r.phase == phase) and (family is None or r.family == family))

    def by_family(self, field: str) -> dict[str, float]:
        out = dict.fromkeys(FAMILIES, 0)
        for r in self.ops:
            out[r.family] += getattr(r, field)
        return out

    def by_op(self, field: str) -> dict[str, float]:
        out: dict[str, float] = collections.Counter()
        for r in self.ops:
            out[f"{r.family}:{r.op}"] += getattr(r, field)
        return dict(out)


class _CounterMode:
    """The counter a torch mode reports to (mixed in before ``TorchFunctionMode`` / ``TorchDispatchMode``)."""

    def __init__(self, counter: StepCounter):
        super().__init__()
        self.counter = counter


class _FunctionMode(_CounterMode, TorchFunctionMode):
    """Sends SDPA on meta tensors to the fused kernel a GPU runs; tags new autograd nodes with the region."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.counter.gpu_kernels and args[0].device.type == "meta":
            out = _fused_sdpa(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            self.counter.tag_new_nodes(out)
        return out


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is None and not enable_gqa and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                  scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                                  is_causal, scale=scale)[0]


class _DispatchMode(_CounterMode, TorchDispatchMode):
    """Hands every op the dispatcher runs to ``StepCounter.record``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.counter.record(func, args, kwargs, out)
        return out


class StepCounter:
    """Counts the ops run inside its phases (``with counter.phase("forward"): ...``).

    ``gpu_kernels``: count composite ops as the fused kernels a GPU runs (SDPA -> flash).
    """

    def __init__(self, model: nn.Module | None = None, gpu_kernels: bool = True):
        self.gpu_kernels = gpu_kernels
        self.ops: list[OpRecord] = []
        self.current_phase = "forward"
        self._region_stack: list[str | None] = []
        self._node_region: dict[Any, str | None] = {}
        self._param_keys: set[int] = set()
        self._saved: dict[int, int] = {}
        self._saved_count = 0
        self._live: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.resident_bytes = 0
        self._hooks: list[Any] = []
        self._patched: list[tuple[Any, str]] = []
        if model is not None:
            self.attach(model)

    # ---------------------------------------------------------------- regions
    @property
    def region(self) -> str | None:
        if self.current_phase == "optimizer":
            return "optimizer"
        for r in reversed(self._region_stack):
            if r != "inherit":
                return r
        return None

    def attach(self, model: nn.Module) -> None:
        """Region hooks on every module, region wrappers on the model's known methods; parameter storages."""
        for module in model.modules():
            region = "inherit"
            for predicate, r in REGION_OF_MODULE:
                if predicate(module):
                    region = r
                    break
            self._hooks.append(module.register_forward_pre_hook(
                lambda m, a, region=region: self._enter(region, a)))
            self._hooks.append(module.register_forward_hook(self._pop_region))
            for method, region_name in REGION_OF_METHOD.items():
                bound = getattr(module, method, None)
                if callable(bound) and not isinstance(bound, nn.Module) and method not in vars(module):
                    setattr(module, method, self._wrap(bound, region_name))
                    self._patched.append((module, method))
        self._param_keys |= {storage_key(p) for p in model.parameters()}

    def _enter(self, region: str | None, inputs: Any) -> None:
        # Nodes the function mode never saw (a custom autograd.Function's) belong to the region that
        # made them, not to the first region whose ops walk back to them: tag them before entering.
        if torch.is_grad_enabled():
            self.tag_new_nodes(inputs)
        self._region_stack.append(region)

    def _pop_region(self, module: nn.Module, args: Any, output: Any) -> None:
        self._region_stack.pop()

    def _wrap(self, fn: Callable, region: str) -> Callable:
        def wrapped(*args, **kwargs):
            self._enter(region, (args, kwargs))
            try:
                return fn(*args, **kwargs)
            finally:
                self._region_stack.pop()

        return wrapped

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        for module, method in self._patched:
            delattr(module, method)
        self._hooks.clear()
        self._patched.clear()

    def tag_new_nodes(self, out: Any) -> None:
        region = self.region
        stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in self._node_region or type(node).__name__ == "AccumulateGrad":
                continue
            self._node_region[node] = region
            stack.extend(n for n, _ in node.next_functions)

    # ---------------------------------------------------------------- memory
    def track(self, tensors: Iterable[torch.Tensor], resident: bool = False) -> None:
        for t in tensors:
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live:
                continue
            nbytes = storage.nbytes()
            self._live[key] = nbytes
            self.live_bytes += nbytes
            if resident:
                self.resident_bytes += nbytes
            weakref.finalize(storage, self._release, key)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _release(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        self._saved_count += 1
        if key not in self._param_keys and key not in self._saved:
            self._saved[key] = t.untyped_storage().nbytes()
        return t

    # ---------------------------------------------------------------- ops
    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        namespace, name = qualified_name(func)
        if namespace in IGNORED_NAMESPACES:
            return
        self.track(_tensors(out))
        if name in NO_WORK_OPS or _is_view(func):
            return
        qname = f"{namespace}::{name}"
        region = self.region
        if self.current_phase == "backward":
            node = torch._C._current_autograd_node()
            region = self._node_region.get(node) if node is not None else None
        tensors = _tensors(args)
        dtype = tensors[0].dtype if tensors else (_tensors(out) or [torch.empty(0)])[0].dtype
        family = classify(namespace, name, region)
        tensor_core = dtype in (torch.bfloat16, torch.float16) and (
            name in GEMM_OPS or family == "attention" and name not in ("_softmax", "_softmax_backward_data")
            or namespace == "fastmim" and family == "gemm")
        self.ops.append(OpRecord(
            op=qname, family=family, phase=self.current_phase,
            flops=_flops(func, qname, args, kwargs, out), bytes=op_bytes(func, args, kwargs, out),
            launches=op_launches(qname, name, args, kwargs, out), dtype=str(dtype).removeprefix("torch."),
            tensor_core=tensor_core))

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        """Count the ops run inside; ``forward`` also records the tensors saved for backward."""
        self.current_phase = phase
        with contextlib.ExitStack() as stack:
            stack.enter_context(_FunctionMode(self))
            stack.enter_context(_DispatchMode(self))
            if phase == "forward":
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
            yield

    def result(self) -> StepCost:
        return StepCost(ops=list(self.ops), activation_bytes=sum(self._saved.values()), peak_bytes=self.peak_bytes,
                        resident_bytes=self.resident_bytes, saved_tensors=len(self._saved))


def project(cost: StepCost, device: Any) -> float:
    """Fill each op's roofline time on ``device`` (a :class:`~costs.devices.DeviceSpec`); returns the step's seconds.

    A Triton GEMM (:data:`TRITON_GEMM_OPS`) computes at ``device.triton_gemm_efficiency`` of the
    (cuBLAS-measured) tensor-core rate."""
    total = 0.0
    for r in cost.ops:
        peak = device.peak_flops(r.dtype, r.tensor_core)
        if r.op in TRITON_GEMM_OPS and r.tensor_core:
            peak *= device.triton_gemm_efficiency
        compute = r.flops / peak if r.flops else 0.0
        memory = r.bytes / device.hbm_bytes_per_s
        r.time_s = max(compute, memory, r.launches * device.launch_floor_s)
        total += r.time_s
    return total

