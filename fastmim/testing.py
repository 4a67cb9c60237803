"""Helpers for comparing a fast path with its reference (used by fastmim's tests).

The rule: relative error ``||out - ref|| / ||ref||`` (Frobenius norm, computed in float64)
against a per-dtype tolerance; outputs are poisoned with NaN before the fast path runs so a
kernel that skips an element cannot pass by inheriting a correct value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import subprocess
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from functools import partial

import torch

# Tolerances on the relative error of a whole tensor. They sit a small factor above the
# rounding error of one pass through the dtype (bf16 has 8 mantissa bits, fp16 11), so an
# off-by-one index or a missing term (errors of order 1) cannot hide under them.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

# The floating dtypes the kernels are compared with their references in.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# A model small enough that a training step takes milliseconds (the training tests check the
# job, not the model): model overrides for the default preset, and as `fastmim train` arguments.
TINY_TRAIN_MODEL = {"depth": 1, "embed_dim": 32, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
                    "decoder_num_heads": 2}
TINY_TRAIN_MODEL_ARGS = [a for k, v in TINY_TRAIN_MODEL.items() for a in ("--model-arg", f"{k}={v}")]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are zero; inf if ``out`` has NaN)."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: got {tuple(out.shape)}, expected {tuple(ref.shape)}")
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                     tol: float | None = None, name: str = "output") -> None:
    """Assert the relative error of ``out`` against ``ref`` is within the tolerance of ``dtype``."""
    if tol is None:
        tol = TOLERANCES[dtype if dtype is not None else out.dtype]
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} exceeds tolerance {tol:.1e} ({out.dtype})"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` filled with NaN (or the dtype's max for integers)."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, torch.iinfo(t.dtype).max)


class _PoisonedTorch(types.SimpleNamespace):
    """``torch`` as a launcher module sees it, but ``empty`` / ``empty_like`` hand out NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return poison_like(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return poison_like(torch.empty_like(*args, **kwargs))


@contextlib.contextmanager
def poison_allocations(module: types.ModuleType) -> Iterator[None]:
    """Inside the block, the buffers ``module`` allocates with ``torch.empty`` / ``torch.empty_like`` are
    NaN-poisoned, so a kernel that skips writing an element of an output it allocated is caught.

    Only ``module``'s name ``torch`` is replaced (the rest of torch keeps its allocator): meant for a
    launcher module that imports ``torch`` and allocates its outputs itself.
    """
    real = module.torch
    module.torch = _PoisonedTorch()
    try:
        yield
    finally:
        module.torch = real


def is_poison(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` still holds :func:`poison_like`'s value."""
    return bool(torch.isnan(t).all()) if t.dtype.is_floating_point else bool((t == torch.iinfo(t.dtype).max).all())


class _GuardedTorch(types.SimpleNamespace):
    """``torch`` whose ``empty`` hands out the poisoned middle of a buffer with ``guard`` more
    poisoned elements on each side; the buffers are kept to check the bands afterwards."""

    def __init__(self, guard: int):
        super().__init__(guard=guard, buffers=[])

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, size, **kwargs):
        size = torch.Size(size)
        base = poison_like(torch.empty(size.numel() + 2 * self.guard, **kwargs))
        self.buffers.append(base)
        return base[self.guard: self.guard + size.numel()].view(size)


@contextlib.contextmanager
def guarded_allocations(module: types.ModuleType, guard: int = 1024) -> Iterator[None]:
    """As :func:`poison_allocations` for ``module``'s ``torch.empty``, and each buffer lies between
    two poisoned bands of ``guard`` elements, checked when the block ends: a kernel that writes
    before the start or past the end of an output it allocated fails the test."""
    real, guarded = module.torch, _GuardedTorch(guard)
    module.torch = guarded
    try:
        yield
    finally:
        module.torch = real
    for base in guarded.buffers:
        assert is_poison(base[:guard]), f"a kernel of {module.__name__} wrote before the start of its buffer"
        assert is_poison(base[base.numel() - guard:]), f"a kernel of {module.__name__} wrote past the end of its buffer"


@contextlib.contextmanager
def count_calls(module: types.ModuleType, names: dict[str, str]) -> Iterator[dict[str, int]]:
    """Inside the block, each function ``module.<names[label]>`` counts its calls in the yielded
    ``{label: calls}``: shows that a test really ran the launchers it means to check."""
    calls = dict.fromkeys(names, 0)
    real = {label: getattr(module, name) for label, name in names.items()}

    def counting(label):
        def launch(*args, **kwargs):
            calls[label] += 1
            return real[label](*args, **kwargs)
        return launch

    for label, name in names.items():
        setattr(module, name, counting(label))
    try:
        yield calls
    finally:
        for label, name in names.items():
            setattr(module, name, real[label])


def kernel_devices() -> list[str]:
    """Devices the Triton kernels can be tested on here: CUDA if present, CPU under the interpreter."""
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        devices.append("cpu")
    return devices


def backend_devices() -> list[tuple[str, str]]:
    """``(backend, device)`` pairs of fastmim's ops that run here: the reference on CPU, Triton on
    every :func:`kernel_devices` device, csrc on CPU when the extension is built."""
    from fastmim.ops import backend_status

    pairs = [("reference", "cpu")] + [("triton", d) for d in kernel_devices()]
    return pairs + ([("csrc", "cpu")] if backend_status("cpu")["csrc"] is None else [])


def _process_tree_cpu_ticks(root: int) -> int | None:
    """CPU time (clock ticks, children included) of ``root`` and its live descendants, from
    ``/proc``; ``None`` where there is no ``/proc`` to read."""
    if not os.path.isdir("/proc"):
        return None
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited while we looked
            continue
        # Fields after the parenthesised command name (which may hold spaces): state, ppid, ...
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    return sum(ticks.get(pid, 0) for pid in tree)


def run_until_stalled(args: list[str], *, stall_seconds: float = 180.0, env: dict[str, str] | None = None,
                      cwd: str | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)`` with no wall-clock limit: the
    process is killed (with its children) only once it has made no progress for
    ``stall_seconds``, progress being new output or CPU time used by it or a descendant.

    A slow run on a busy machine keeps using CPU and so is never cut short; a hung one (a
    deadlocked collective, a process waiting on a lock) stops using CPU and is ended with an
    error saying so, instead of hanging the test suite.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env, cwd=cwd, start_new_session=True)
        last_progress, last_seen = time.monotonic(), None
        while proc.poll() is None:
            time.sleep(1.0)
            seen = (os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size, _process_tree_cpu_ticks(proc.pid))
            if seen != last_seen:
                last_progress, last_seen = time.monotonic(), seen
            elif time.monotonic() - last_progress > stall_seconds:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                out.seek(0)
                err.seek(0)
                raise AssertionError(f"{' '.join(args[:6])} ... made no progress (no output, no CPU time) for "
                                     f"{stall_seconds:.0f} s and was killed\nstdout:\n{out.read()[-2000:]}\n"
                                     f"stderr:\n{err.read()[-4000:]}")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter gradient of ``model``, by parameter name."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_compiled_step_matches_eager(model: torch.nn.Module, *args, **kwargs) -> None:
    """``torch.compile(model, fullgraph=True)`` (aot_eager: traces the ops' registrations, no
    graph break allowed) gives the same dict of losses and the same gradients as eager."""
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out_c = compiled(*args, **kwargs)
    out_c["loss"].backward()
    g_c = grads(model)
    model.zero_grad(set_to_none=True)
    out_e = model(*args, **kwargs)
    out_e["loss"].backward()
    for key in out_e:
        assert_rel_close(out_c[key], out_e[key], torch.float32, name=key)
    for name, g in grads(model).items():
        assert_rel_close(g_c[name], g, torch.float32, name=name)


def assert_bf16_autocast_close(model: torch.nn.Module, *args, **kwargs) -> None:
    """Under CPU bf16 autocast every loss of ``model(*args, **kwargs)`` stays fp32, finite and
    within a few percent of fp32 (bf16 matmuls through encoder, decoder and heads), and every
    gradient is finite."""
    ref = {k: float(v.detach()) for k, v in model(*args, **kwargs).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*args, **kwargs)
    out["loss"].backward()
    for key, value in ref.items():
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), key
        assert abs(float(out[key].detach()) - value) <= 0.05 * abs(value) + 0.02, key
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def assert_every_loss_falls(history: list[dict[str, float]], keys: tuple[str, ...], factor: float = 0.8) -> None:
    """Each loss in ``keys`` finite throughout ``history`` (one dict per step) and its mean over
    the last 3 steps below ``factor`` times its mean over the first 3."""
    for key in keys:
        first = sum(h[key] for h in history[:3]) / 3
        last = sum(h[key] for h in history[-3:]) / 3
        assert all(math.isfinite(h[key]) for h in history), key
        assert last < factor * first, (key, first, last)


def assert_same_losses_and_grads(model: torch.nn.Module, reference: torch.nn.Module, keys: tuple[str, ...],
                                 *args, **kwargs) -> None:
    """``model`` and ``reference`` (the same weights, e.g. ``fused=True`` and ``fused=False``)
    give the same losses ``keys`` and, after backward of ``"loss"``, the same gradients (fp32
    tolerance), for the inputs ``*args, **kwargs``."""
    out, out_ref = model(*args, **kwargs), reference(*args, **kwargs)
    for key in keys:
        assert_rel_close(out[key], out_ref[key], torch.float32, name=key)
    out["loss"].backward()
    out_ref["loss"].backward()
    g, g_ref = grads(model), grads(reference)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert_rel_close(g[name], g_ref[name], torch.float32, name=name)


def parameter_groups(model: torch.nn.Module, **prefixes: str | tuple[str, ...]) -> dict[str, set[str]]:
    """The names of ``model``'s trainable parameters, by group: each keyword names a group and the
    name prefixes of its parameters; ``"rest"`` holds the parameters of no group, ``"all"`` all."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    groups = {group: {n for n in names if n.startswith(prefix)} for group, prefix in prefixes.items()}
    return {**groups, "rest": names.difference(*groups.values()), "all": names}


def params_with_grad(model: torch.nn.Module, loss: torch.Tensor) -> set[str]:
    """The names of the parameters of ``model`` that ``loss`` (alone: earlier gradients are cleared)
    gives a nonzero gradient."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def assert_each_loss_reaches(model: torch.nn.Module, expected: dict[str, set[str]], *args, **kwargs) -> None:
    """For each loss ``key`` of ``expected``, a fresh ``model(*args, **kwargs)[key]`` gives a nonzero
    gradient to exactly the parameters ``expected[key]``."""
    for key, names in expected.items():
        reached = params_with_grad(model, model(*args, **kwargs)[key])
        assert reached == names, (key, sorted(reached ^ names))


def overfit_history(model: torch.nn.Module, *args, steps: int = 25, lr: float = 2e-3,
                    after_step: Callable[[int], object] | None = None, **kwargs) -> list[dict[str, float]]:
    """``steps`` AdamW steps (``lr``, no weight decay) on ``model(*args, **kwargs)["loss"]``, the same
    inputs every step; ``after_step(step)`` runs after each. Returns every step's losses, as floats."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history = []
    for step in range(steps):
        out = model(*args, **kwargs)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        history.append({k: float(v.detach()) for k, v in out.items()})
    return history


# ---------------------------------------------------------------------------------- two-view methods

# What the tiny models of the two-view methods (CMAE, LUT) share: 20 px / patch 4 gives L = 25 patches
# (odd), and mask ratio 0.75 keeps K = 6 per view.
TINY_TWO_VIEW = dict(img_size=20, patch_size=4, in_chans=3, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def two_views(batch: int = 4, seed: int = 1, size: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of ``batch`` random 3-channel ``size`` x ``size`` images, the views of a two-view
    method, from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


@dataclasses.dataclass(frozen=True)
class TwoViewMethod:
    """A two-view method under test (CMAE, LUT): ``model(imgs1, imgs2, mask_ratio, seed=... | noise=...)``
    returns a dict of its ``losses``, ``"loss"`` their weighted sum.

    ``make_model(**overrides)`` builds a tiny model of :data:`TINY_TWO_VIEW`'s size from a fixed seed
    (``fused=False``: the reference path); an image takes ``noise_rows`` rows of masking noise (2: one
    per view, 1: one permutation the views share); ``mask_seed`` seeds the masks of the fused ==
    reference check. :meth:`checks` are what every such method passes.
    """

    make_model: Callable[..., torch.nn.Module]
    losses: tuple[str, ...]
    noise_rows: int
    mask_seed: int

    def noise(self, model: torch.nn.Module, batch: int) -> torch.Tensor:
        return torch.rand(self.noise_rows * batch, model.num_patches)

    def fused_and_reference(self, device: str | torch.device = "cpu", fused_only: dict | None = None,
                            **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``make_model(**kwargs, **fused_only)`` and the reference path ``make_model(fused=False,
        **kwargs)`` with its weights, both on ``device``."""
        fused = self.make_model(**kwargs, **(fused_only or {})).to(device)
        ref = self.make_model(fused=False, **kwargs).to(device)
        ref.load_state_dict(fused.state_dict())
        return fused, ref

    def assert_triton_step_matches_reference(self, fused: torch.nn.Module, ref: torch.nn.Module,
                                             imgs1: torch.Tensor, imgs2: torch.Tensor, seed: int) -> None:
        """A training step (forward, backward of ``"loss"``) of ``fused`` with its token ops on the
        Triton backend and one of ``ref``, on the same views masked by ``seed``: the same losses (fp32
        tolerance). The gradients are left in the models for the caller's rule."""
        from fastmim.ops import use_backend

        with use_backend("triton"):
            out_f = fused(imgs1, imgs2, 0.75, seed=seed)
            out_f["loss"].backward()
        out_r = ref(imgs1, imgs2, 0.75, seed=seed)
        out_r["loss"].backward()
        for key in self.losses:
            assert_rel_close(out_f[key], out_r[key], torch.float32, name=key)

    def assert_fused_matches_reference(self, masks: str, pred_masked_only: bool) -> None:
        """The fused and the reference path give the same losses and gradients, the masks drawn from
        ``mask_seed`` (``masks="seed"``) or from given noise (``"noise"``)."""
        fused, ref = self.fused_and_reference(pred_masked_only=pred_masked_only)
        a, b = two_views(batch=3)
        kwargs = {"seed": self.mask_seed} if masks == "seed" else {"noise": self.noise(fused, 3)}
        assert_same_losses_and_grads(fused, ref, self.losses, a, b, 0.75, **kwargs)

    def assert_bf16_autocast_close(self) -> None:
        model = self.make_model()
        assert_bf16_autocast_close(model, *two_views(batch=4), 0.75, noise=self.noise(model, 4))

    def assert_compiled_step_matches_eager(self) -> None:
        model = self.make_model()
        assert_compiled_step_matches_eager(model, *two_views(batch=4), 0.75, noise=self.noise(model, 4))

    def checks(self) -> dict[str, Callable[[], None]]:
        """The checks every two-view method passes, by name: fused == reference (seeded masks or noise,
        every patch predicted or the masked ones only), bf16 autocast close to fp32, torch.compile ==
        eager."""
        checks = {f"fused_matches_reference-{masks}-pred_masked_only={only}":
                  partial(self.assert_fused_matches_reference, masks, only)
                  for only in (False, True) for masks in ("seed", "noise")}
        return {**checks, "bf16_autocast_close_to_fp32": self.assert_bf16_autocast_close,
                "compiled_step_matches_eager": self.assert_compiled_step_matches_eager}
