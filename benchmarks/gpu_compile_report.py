"""GPU compile report: every Triton kernel as the training step launches it, compiled for sm_80 and sm_90a.

No GPU needed. The launches are captured, not listed by hand: fastmim's MAE training step
(forward and backward, ``pred_masked_only`` off and on, ViT-B/16 and ViT-L/16 at 224 px,
batch 256, bf16; and its input, the views ``resized_crop_flip_normalize`` makes from the packed
``uint8`` batch), the training steps of supervised + MIM, CMAE and LUT at ViT-B/16, and the launch
paths no default step takes (the per-row loss's gradient scaling; the single-pass LayerNorm and
bias + GELU kernels of blocks off the fused-GEMM path) run on the meta device with every fastmim op
sent to its Triton path, and ``JITFunction.run`` records each launch (argument types, constexprs,
``num_warps``, ``num_stages``) instead of running it. A kernel that a new op or model launches joins
the report by itself; ``tests/test_gpu_compile_report.py`` checks that every Triton kernel of
``fastmim.kernels`` is in it. On the meta device an autotuned launcher launches every configuration
it may choose on a GPU, so each of them is compiled.

Each distinct launch configuration is compiled ahead of time with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``
for sm_80 (A100) and sm_90a (H100). The signature follows Triton's own specialisation:
pointers and integers divisible by 16 carry ``tt.divisibility=16`` (every pointer is taken as
16-byte aligned, as PyTorch allocations are), integers equal to 1 become constants. The PTX
goes through the ``ptxas`` bundled with Triton (``-v``): registers per thread, spill stores and
loads; shared memory is Triton's (``metadata.shared``). Theoretical occupancy follows from
registers, shared memory and warps against each SM's limits (:data:`SM_LIMITS`). Compiles run in
parallel (``--jobs``); Triton caches them and ``ptxas``'s logs are cached by the PTX's hash
(``~/.cache/fastmim/ptxas``), so a rerun with unchanged kernels takes seconds. Integer arguments a
kernel declares ``do_not_specialize`` are typed as Triton does (no constant 1, no divisibility).

The CUDA sources in ``csrc/`` are compiled by ``csrc/check_cuda_compile.sh`` (``nvcc -Xptxas -v``
for sm_80 and sm_90) and its figures parsed into the same table.

Usage: ``python benchmarks/gpu_compile_report.py [--smoke] [--output DIR]``; exits non-zero when
a kernel fails to compile or a training-step kernel spills. Writes ``gpu_compile_report.json``
and ``.md`` in ``benchmarks/results/`` (``--smoke``: a tiny model's launches, sm_90a only,
files named ``gpu_compile_report-smoke.*``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # as a script only: importing this module must not change its importer's environment
    os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not the interpreter's
    os.environ.setdefault("FASTMIM_NO_EXT", "1")  # the Triton path is captured, not the compiled extension

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for p in (str(BENCH_DIR), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import harness  # noqa: E402

# Per-SM limits (CUDA C Programming Guide, "Compute capabilities" table).
SM_LIMITS = {
    "sm_80": dict(gpu="A100", regs=65536, max_warps=64, max_blocks=32, smem=167936, smem_per_block=166912,
                  reserved_smem_per_block=1024, reg_unit=256, max_regs_per_thread=255),
    "sm_90a": dict(gpu="H100", regs=65536, max_warps=64, max_blocks=32, smem=233472, smem_per_block=232448,
                   reserved_smem_per_block=1024, reg_unit=256, max_regs_per_thread=255),
}
TARGETS = {"sm_80": 80, "sm_90a": 90}
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str
    module: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    divisible: tuple[int, ...]
    num_warps: int
    num_stages: int

    def label(self) -> str:
        keys = [f"{k}={v}" for k, v in self.constexprs if k.isupper() and k != "INTERPRET"]
        dtypes = sorted({t for _, t in self.signature if t.startswith("*") and t[1:] in ("bf16", "fp16", "fp32")})
        # The specialisation (integer arguments divisible by 16, constants) tells apart launches whose
        # constexprs agree (ViT-B's and ViT-L's strides).
        spec = hashlib.sha1(repr((self.signature, self.divisible)).encode()).hexdigest()[:6]
        return f"{' '.join(keys)} {'/'.join(dtypes)} w{self.num_warps} s{self.num_stages} #{spec}"


# ----------------------------------------------------------------------------- capture
def _describe(fn, args: tuple, kwargs: dict) -> Launch:
    params = fn.params
    values: dict[str, Any] = {}
    for param, value in zip(params, args, strict=False):
        values[param.name] = value
    for k, v in kwargs.items():
        if k in {p.name for p in params}:
            values[k] = v
    signature, constexprs, divisible = [], [], []
    for index, param in enumerate(params):
        value = values.get(param.name, param.default if hasattr(param, "default") else None)
        if param.is_constexpr or value is None:
            signature.append((param.name, "constexpr"))
            constexprs.append((param.name, value))
        elif isinstance(value, torch.Tensor):
            signature.append((param.name, "*" + _DTYPES[value.dtype]))
            divisible.append(index)
        elif isinstance(value, bool):
            signature.append((param.name, "i1"))
        elif isinstance(value, int) and getattr(param, "do_not_specialize", False):
            signature.append((param.name, "i32" if -(2**31) <= value < 2**31 else "i64"))
        elif isinstance(value, int):
            if value == 1:  # Triton specialises an integer equal to 1 as a constant
                signature.append((param.name, "constexpr"))
                constexprs.append((param.name, 1))
                continue
            signature.append((param.name, "i32" if -(2**31) <= value < 2**31 else "i64"))
            if value % 16 == 0:
                divisible.append(index)
        elif isinstance(value, float):
            signature.append((param.name, "fp32"))
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {param.name}={value!r}")
    return Launch(kernel=fn.__name__, module=fn.__module__, signature=tuple(signature),
                  constexprs=tuple(constexprs), divisible=tuple(divisible),
                  num_warps=int(kwargs.get("num_warps", 4)), num_stages=int(kwargs.get("num_stages", 3)))


class _TritonPath(TorchDispatchMode):
    """Sends each fastmim op on meta tensors to its implementation (with the Triton backend)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastmim":
            keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
            return func.redispatch(keyset, *args, **kwargs)
        return func(*args, **kwargs)


def capture_launches(model_kwargs: list[dict[str, Any]], batch: int, methods: tuple[str, ...] = (),
                     other_paths: bool = False) -> list[Launch]:
    """Distinct launches of fastmim's MAE training step (forward + backward) for each model, of the
    other ``methods``' steps (ViT-B/16, their own views, heads and losses) and, with ``other_paths``,
    of the launches a default step does not make (see :func:`_other_paths`)."""
    from triton.runtime.jit import JITFunction

    import fastmim.ops  # noqa: F401  (registers the ops)
    from fastmim.models.mae import MaskedAutoencoderViT

    seen: dict[Launch, None] = {}

    def record(self, *args, grid, warmup, **kwargs):
        seen.setdefault(_describe(self, args, kwargs), None)

    patched = [(name, mod) for name, mod in sys.modules.items()
               if name.startswith("fastmim.ops.") and hasattr(mod, "select_backend")]
    saved = [(mod, mod.select_backend) for _, mod in patched]
    original_run = JITFunction.run
    JITFunction.run = record
    for _, mod in patched:
        mod.select_backend = lambda *a, **k: "triton"
    try:
        for kwargs in model_kwargs:
            with torch.device("meta"):
                model = MaskedAutoencoderViT(mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                             norm_pix_loss=True, fused=True, attn_backend="fastmim",
                                             **kwargs).to(torch.bfloat16)
            imgs = torch.empty(batch, 3, kwargs["img_size"], kwargs["img_size"], device="meta", dtype=torch.bfloat16)
            with _TritonPath():
                model(imgs, mask_ratio=0.75)[0].backward()
            _input_views(batch, kwargs["img_size"])
        for method in methods:
            _method_step(method, batch)
        if other_paths:
            _other_paths(batch, model_kwargs[0]["embed_dim"], model_kwargs[0]["img_size"],
                         model_kwargs[0]["patch_size"])
    finally:
        JITFunction.run = original_run
        for mod, fn in saved:
            mod.select_backend = fn
    return list(seen)


def _method_step(method: str, batch: int) -> None:
    """One training step (forward + backward) of supervised + MIM, CMAE or LUT at ViT-B/16, bf16."""
    from fastmim.models import create_model

    with torch.device("meta"):
        model = create_model(method, "vit_base_patch16_224", fused=True, attn_backend="fastmim").to(torch.bfloat16)
    view = torch.empty(batch, 3, 224, 224, device="meta", dtype=torch.bfloat16)
    with _TritonPath():
        if method == "supmim":
            out = model(view, torch.zeros(batch, dtype=torch.int64, device="meta"))
        else:
            out = model(view, torch.empty_like(view), 0.75)
        out["loss"].backward()


def _other_paths(batch: int, width: int, img_size: int, patch_size: int) -> None:
    """Launches no default training step makes, at a step's shapes: the per-row loss (``reduction="none"``:
    its backward scales the saved gradient row by row), the single-pass LayerNorm and bias + GELU
    kernels around cuBLAS GEMMs that blocks off the fused-GEMM path take (LayerScale, drop-path), and the
    three-kernel attention backward of sequences longer than one key block (the encoder on whole images:
    fine-tuning, 197 tokens at head dim 64)."""
    from fastmim.ops import (
        add_layer_norm,
        add_layer_norm_linear,
        bias_gelu,
        bias_gelu_linear,
        layer_norm,
        masked_patch_mse,
        visible_attention_qkvpacked,
    )

    bf16 = torch.bfloat16
    patches = (img_size // patch_size) ** 2
    pred = torch.empty(batch, patches, patch_size * patch_size * 3, device="meta", dtype=bf16, requires_grad=True)
    imgs = torch.empty(batch, 3, img_size, img_size, device="meta", dtype=bf16)
    mask = torch.empty(batch, patches, device="meta", dtype=bf16)
    tokens = batch * (patches // 4 + 1)
    x, r = (torch.empty(tokens, width, device="meta", dtype=bf16, requires_grad=True) for _ in range(2))
    w, b = (torch.empty(width, device="meta", dtype=bf16, requires_grad=True) for _ in range(2))
    w1 = torch.empty(4 * width, width, device="meta", dtype=bf16, requires_grad=True)
    b1 = torch.empty(4 * width, device="meta", dtype=bf16, requires_grad=True)
    w2 = torch.empty(width, 4 * width, device="meta", dtype=bf16, requires_grad=True)
    with _TritonPath():
        loss = masked_patch_mse(pred, imgs, mask, patch_size=patch_size, reduction="none")
        loss.backward(torch.empty_like(loss))
        s, h = add_layer_norm_linear(x, r, w, b, 1e-6, w1)
        out = bias_gelu_linear(h, b1, w2, b)
        (out + s).backward(torch.empty_like(out))
        y = layer_norm(x, w, b) + add_layer_norm(x, r, w, b)[1]
        y.backward(torch.empty_like(y))
        z = bias_gelu(h.detach().requires_grad_(), b1)
        z.backward(torch.empty_like(z))
        heads = max(1, width // 64)
        qkv = torch.empty(batch, patches + 1, 3, heads, width // heads, device="meta", dtype=bf16, requires_grad=True)
        attn = visible_attention_qkvpacked(qkv)
        attn.backward(torch.empty_like(attn))


def _input_views(batch: int, size: int) -> None:
    """The step's input on the device: ``resized_crop_flip_normalize`` of a packed ``uint8`` batch
    (500 x 375 images; the kernel's configuration depends on neither their sizes nor the boxes)."""
    from fastmim.ops import PackedImages, resized_crop_flip_normalize

    data = torch.empty(batch * 500 * 375 * 3, dtype=torch.uint8, device="meta")
    layout = torch.empty(batch, 6, dtype=torch.int64, device="meta")
    boxes = torch.empty(batch, 4, dtype=torch.int32, device="meta")
    flip = torch.empty(batch, dtype=torch.bool, device="meta")
    with _TritonPath():
        resized_crop_flip_normalize(PackedImages(data, layout, 3), boxes, size, flip, (0.485, 0.456, 0.406),
                                    (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------- compile
def ptxas_path() -> str:
    import triton

    from_env = os.environ.get("TRITON_PTXAS_PATH")
    if from_env:
        return from_env
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


_USAGE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def occupancy(arch: str, regs: int, smem: int, warps: int) -> dict[str, Any]:
    lim = SM_LIMITS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by_regs = (lim["regs"] // regs_per_warp) // warps
    by_warps = lim["max_warps"] // warps
    by_smem = lim["smem"] // (smem + lim["reserved_smem_per_block"]) if smem else lim["max_blocks"]
    blocks = min(by_regs, by_warps, by_smem, lim["max_blocks"])
    limiter = min((by_regs, "registers"), (by_warps, "warps"), (by_smem, "shared memory"),
                  (lim["max_blocks"], "blocks"))[1]
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps / lim["max_warps"], "limited_by": limiter,
            "fits": smem <= lim["smem_per_block"] and blocks > 0}


def _ptxas_cache_dir() -> Path:
    return Path(os.environ.get("FASTMIM_COMPILE_REPORT_CACHE", Path.home() / ".cache" / "fastmim" / "ptxas"))


def _ptxas(ptx: str, arch: str) -> tuple[int, str]:
    """``ptxas -v`` of ``ptx`` for ``arch``: (return code, log), cached by the PTX's hash (Triton caches the
    compile itself, so a rerun with unchanged kernels costs neither)."""
    key = hashlib.sha256((ptxas_path() + arch + ptx).encode()).hexdigest()
    cached = _ptxas_cache_dir() / f"{key}.json"
    if cached.exists():
        try:
            entry = json.loads(cached.read_text())
            return int(entry["returncode"]), str(entry["log"])
        except (OSError, ValueError, KeyError):
            pass
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = Path(tmp) / "k.ptx"
        ptx_file.write_text(ptx)
        proc = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch}", str(ptx_file), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode == 0:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp_path.write_text(json.dumps({"returncode": proc.returncode, "log": log}))
            tmp_path.replace(cached)
        except OSError:
            pass
    return proc.returncode, log


def compile_launch(launch: Launch, arch: str) -> dict[str, Any]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    signature = dict(launch.signature)
    constexprs = dict(launch.constexprs)
    attrs = {(i,): [["tt.divisibility", 16]] for i in launch.divisible}
    start = time.perf_counter()
    row: dict[str, Any] = {"kernel": launch.kernel, "module": launch.module, "config": launch.label(), "arch": arch,
                           "gpu": SM_LIMITS[arch]["gpu"], "num_warps": launch.num_warps,
                           "num_stages": launch.num_stages,
                           "constexprs": {k: v for k, v in constexprs.items() if isinstance(v, (int, float, bool))}}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[arch], 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as exc:  # a compile error is a result, reported and failing the run
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
        return row
    ptx = compiled.asm["ptx"]
    smem = int(compiled.metadata.shared)
    returncode, log = _ptxas(ptx, arch)
    if returncode != 0:
        row.update(ok=False, error="ptxas: " + log[-2000:])
        return row
    regs = int(_USAGE.search(log).group(1)) if _USAGE.search(log) else 0
    spill = _SPILL.search(log)
    stack = _STACK.search(log)
    row.update(ok=True, registers=regs, spill_stores=int(spill.group(1)) if spill else 0,
               spill_loads=int(spill.group(2)) if spill else 0, stack_bytes=int(stack.group(1)) if stack else 0,
               shared_bytes=smem, compile_s=time.perf_counter() - start,
               **occupancy(arch, regs, smem, launch.num_warps))
    return row


# ----------------------------------------------------------------------------- csrc
def csrc_report() -> dict[str, Any]:
    """Runs ``csrc/check_cuda_compile.sh`` (nvcc -Xptxas -v, sm_80 and sm_90) and parses its figures."""
    script = REPO / "csrc" / "check_cuda_compile.sh"
    if not script.exists():
        return {"status": "absent", "kernels": []}
    proc = subprocess.run(["bash", str(script), sys.executable], capture_output=True, text=True, cwd=REPO)
    log = proc.stdout + proc.stderr
    kernels, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if m:
            current = {"kernel": _demangle(m.group(1)), "arch": m.group(2)}
            kernels.append(current)
            continue
        if current is None:
            continue
        if (u := _USAGE.search(line)) is not None:
            current["registers"] = int(u.group(1))
            if (smem := re.search(r"(\d+) bytes smem", line)) is not None:
                current["shared_bytes"] = int(smem.group(1))
        if (s := _SPILL.search(line)) is not None:
            current["spill_stores"], current["spill_loads"] = int(s.group(1)), int(s.group(2))
    status = "ok" if proc.returncode == 0 else "error"
    if "nvcc not found" in log:
        status = "nvcc absent"
    return {"status": status, "returncode": proc.returncode, "kernels": kernels,
            "log_tail": log[-3000:] if proc.returncode != 0 else ""}


def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip()
        return out or name
    except (OSError, subprocess.SubprocessError):
        return name


# ----------------------------------------------------------------------------- report
def markdown(rows: list[dict[str, Any]], csrc: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [
        "# GPU compile report (compiled ahead of time, no GPU run)",
        "",
        f"Triton {env['triton']} (its bundled ptxas), torch {env['torch']}, commit {str(env['commit'])[:12]}"
        + (" (uncommitted changes)" if env.get("commit_dirty") else "") + f", {env['date']}. "
        "Each row: a kernel with a configuration fastmim's MAE training step launches (captured, bf16, "
        "ViT-B/16 and ViT-L/16, batch 256; the views of its input from the packed uint8 batch, float32). "
        "Occupancy is theoretical (registers, shared memory, warps).",
        "",
        "| kernel | configuration | arch | regs | spill st/ld (B) | smem (B) | blocks/SM | occupancy | limited by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['kernel']} | {r['config']} | {r['arch']} | COMPILE ERROR | | | | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['config']} | {r['arch']} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | {r['blocks_per_sm']} | "
                     f"{r['occupancy']:.0%} | {r['limited_by']} |")
    lines += ["", f"## CUDA sources (csrc/, nvcc -Xptxas -v): {csrc['status']}", ""]
    if csrc["kernels"]:
        lines += ["| kernel | arch | regs | spill st/ld (B) | smem (B) |", "|---|---|---|---|---|"]
        for k in csrc["kernels"]:
            lines.append(f"| `{k['kernel'][:90]}` | {k['arch']} | {k.get('registers', '')} | "
                         f"{k.get('spill_stores', 0)}/{k.get('spill_loads', 0)} | {k.get('shared_bytes', 0)} |")
    return "\n".join(lines) + "\n"


def _compile_job(job: tuple[Launch, str]) -> dict[str, Any]:
    return compile_launch(*job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model's launches, sm_90a only (CI)")
    parser.add_argument("--output", type=Path, default=harness.RESULTS_DIR)
    parser.add_argument("--no-csrc", action="store_true", help="skip the nvcc check of csrc/")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    if args.smoke:
        models = [dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32,
                       decoder_depth=1, decoder_num_heads=2)]
        batch, archs = 4, ["sm_90a"]
    else:
        base = dict(img_size=224, patch_size=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
        models = [dict(base, embed_dim=768, depth=12, num_heads=12),
                  dict(base, embed_dim=1024, depth=24, num_heads=16)]
        batch, archs = 256, list(TARGETS)
    models = [dict(m, pred_masked_only=p) for m in models for p in (False, True)]
    methods = () if args.smoke else ("supmim", "cmae", "lut")
    launches = capture_launches(models, batch, methods=methods, other_paths=True)
    print(f"{len(launches)} distinct kernel launches captured", flush=True)
    rows = []
    jobs = [(launch, arch) for launch in sorted(launches, key=lambda lc: (lc.module, lc.kernel, lc.label()))
            for arch in archs]
    with concurrent.futures.ProcessPoolExecutor(max(1, min(args.jobs, len(jobs)))) as pool:
        results = pool.map(_compile_job, jobs)
        for row in results:
            rows.append(row)
            if row["ok"]:
                print(f"{row['kernel']:32s} {row['config'][:60]:60s} {row['arch']:7s} regs {row['registers']:3d} "
                      f"spill {row['spill_stores']}/{row['spill_loads']} smem {row['shared_bytes']} "
                      f"occ {row['occupancy']:.0%}", flush=True)
            else:
                print(f"{row['kernel']} {row['config']} {row['arch']}: COMPILE ERROR {row['error'][:400]}", flush=True)
    csrc = {"status": "skipped", "kernels": []} if args.no_csrc else csrc_report()
    env = harness.environment("cpu")
    env.pop("device", None)
    env.pop("device_type", None)
    failures = [f"{r['kernel']} [{r['config']}] {r['arch']}: compile error" for r in rows if not r["ok"]]
    failures += [f"{r['kernel']} [{r['config']}] {r['arch']}: spills {r['spill_stores']}/{r['spill_loads']} B"
                 for r in rows if r["ok"] and (r["spill_stores"] or r["spill_loads"])]
    if csrc["status"] == "error":
        failures.append("csrc: nvcc compile error")
    payload = {"benchmark": "gpu_compile_report", "kind": "smoke" if args.smoke else "compiled",
               "environment": env, "sm_limits": SM_LIMITS, "triton_kernels": rows, "csrc": csrc,
               "failures": failures}
    stem = "gpu_compile_report-smoke" if args.smoke else "gpu_compile_report"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (args.output / f"{stem}.md").write_text(markdown(rows, csrc, env))
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
