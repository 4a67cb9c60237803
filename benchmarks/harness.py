"""The harness every benchmark script shares.

- ``parse_args``: common flags (``--smoke`` for tiny sizes, ``--device``, ``--output``; on CPU
  ``--threads`` and ``--clock cpu``, the process's CPU time instead of wall time).
- ``measure_ceilings``: the device's ceilings measured in the same run: a large copy in
  GB/s (read + write counted) and a large matmul in TFLOP/s (bf16 on CUDA, fp32 on CPU).
- ``time_ms``: median milliseconds; on CUDA ``triton.testing.do_bench`` (warm-up, the L2
  cache flushed between repetitions); on CPU a perf-counter median over repetitions. Pass
  several argument sets and the calls rotate through them, so a small working set does not
  sit in cache between calls.
- ``time_providers``: every provider of a case; on CPU interleaved, the providers taking turns
  call by call (a slow moment of the machine hits all of them), on CUDA each in turn.
- ``op_providers`` / ``with_backend``: the providers of a fastmim op's case (fastmim on its
  backend and on csrc when built, the eager peer chain, its ``torch.compile``), each called
  under its backend.
- ``Record`` / ``write_results``: one JSON per run in ``benchmarks/results/`` with the
  device, torch/triton/CUDA versions, git commit, and each figure with its roofline
  fraction and its ratio to the best peer measured in the same run.

Scripts run as ``python benchmarks/bench_<op>.py [--smoke]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, a few repetitions: checks the script runs (CI); figures mean nothing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="folder for the results JSON")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="CPU: wall time, or the process's CPU time (with --threads 1: the load of other "
                             "processes on a shared machine counts less)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.smoke and args.device == "cpu":
        print("note: running on CPU; these figures are CPU timings, not GPU ones")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[..., Any], arg_sets: Sequence[tuple] = ((),), *, device: torch.device | str,
            warmup: int = 25, rep: int = 100, smoke: bool = False) -> float:
    """Median time in milliseconds of ``fn(*args)``, rotating through ``arg_sets``."""
    device = torch.device(device)
    counter = iter(range(1 << 62))

    def call() -> Any:
        return fn(*arg_sets[next(counter) % len(arg_sets)])

    if smoke:
        warmup, rep = 1, 3
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(max(1, warmup // 10)):
        call()
    samples = []
    for _ in range(max(3, rep // 10)):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_interleaved_samples(fns: dict[str, Callable[..., Any]], arg_sets: Sequence[tuple] = ((),), *,
                             rounds: int = 10, warmup: int = 2, clock: str = "wall") -> dict[str, list[float]]:
    """CPU: milliseconds of each ``fns[name](*args)`` in every round, the providers taking turns call by call.

    Round after round every provider runs once, so a slow phase of the machine (another process, a
    frequency change) lands on all of them alike instead of on whichever ran then. ``clock="cpu"``
    measures the process's CPU time instead of wall time: with one thread, the time the work took
    without the time other processes held the cores (a shared machine's load counts less)."""
    timer = {"wall": time.perf_counter, "cpu": time.process_time}[clock]
    for fn in fns.values():
        for i in range(warmup):
            fn(*arg_sets[i % len(arg_sets)])
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(rounds):
        for name, fn in fns.items():
            start = timer()
            fn(*arg_sets[i % len(arg_sets)])
            samples[name].append((timer() - start) * 1e3)
    return samples


def time_interleaved_ms(fns: dict[str, Callable[..., Any]], arg_sets: Sequence[tuple] = ((),), *,
                        rounds: int = 10, warmup: int = 2, clock: str = "wall") -> dict[str, float]:
    """CPU: median milliseconds of each provider, interleaved (:func:`time_interleaved_samples`)."""
    samples = time_interleaved_samples(fns, arg_sets, rounds=rounds, warmup=warmup, clock=clock)
    return {name: statistics.median(values) for name, values in samples.items()}


# Student's t 97.5% quantiles (two-sided 95%) for 1 to 30 degrees of freedom (scipy.stats.t.ppf).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile (two-sided 95%): a table to 30 degrees of freedom, then the
    Cornish-Fisher expansion (within 1e-3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_speedup(baseline_ms: Sequence[float], provider_ms: Sequence[float]) -> dict[str, float | int]:
    """How much faster a provider is than a baseline timed in the same rounds: ``baseline / provider``
    round by round (both ran back to back, so the machine's state is shared), summarised as the
    geometric mean with a 95% t-interval over the rounds' log-ratios. An interval that contains 1
    means the two are not told apart by this run."""
    if len(baseline_ms) != len(provider_ms) or len(baseline_ms) < 2:
        raise ValueError(f"need the same number (>= 2) of rounds for both, got {len(baseline_ms)} and "
                         f"{len(provider_ms)}")
    logs = [math.log(b / p) for b, p in zip(baseline_ms, provider_ms, strict=True)]
    n = len(logs)
    mean = statistics.fmean(logs)
    half = t_quantile_975(n - 1) * statistics.stdev(logs) / math.sqrt(n)
    return {"speedup": math.exp(mean), "ci95_low": math.exp(mean - half), "ci95_high": math.exp(mean + half),
            "rounds": n}


def time_providers(fns: dict[str, Callable[..., Any]], arg_sets: Sequence[tuple] = ((),), *,
                   device: torch.device | str, smoke: bool = False, rounds: int = 30,
                   clock: str = "wall") -> dict[str, float]:
    """Median milliseconds of each provider ``fns[name](*args)`` in one case.

    CPU (full runs): interleaved, the providers taking turns call by call (:func:`time_interleaved_ms`);
    CUDA and smoke runs: each in turn with :func:`time_ms` (on CUDA ``do_bench`` flushes the L2 cache
    between calls, so one provider's data is not left in cache for another)."""
    if torch.device(device).type == "cpu" and not smoke:
        return time_interleaved_ms(fns, arg_sets, rounds=rounds, clock=clock)
    return {name: time_ms(fn, arg_sets, device=device, smoke=smoke) for name, fn in fns.items()}


def with_backend(fn: Callable[..., Any], backend: str | None, *, no_grad: bool = False) -> Callable[..., Any]:
    """``fn`` called under ``fastmim.ops.use_backend(backend)`` (and ``torch.no_grad()``), for the timers."""
    import contextlib

    from fastmim.ops import use_backend

    def call(*args):
        with use_backend(backend), (torch.no_grad() if no_grad else contextlib.nullcontext()):
            return fn(*args)

    return call


def op_providers(fast: Callable[..., Any], eager: Callable[..., Any], backend: str, device: torch.device | str,
                 smoke: bool = False) -> dict[str, tuple[Callable[..., Any], str | None]]:
    """The providers of a fastmim op's case, ``{name: (fn, backend)}`` for :func:`with_backend`.

    ``fastmim-<backend>`` runs ``fast`` on the chosen backend; ``fastmim-csrc`` runs it on the
    compiled C++/CUDA kernels too, when ``fastmim._C`` is built and csrc is not already the chosen
    backend; ``eager`` is the peer's chain and ``compile`` its ``torch.compile`` (inductor;
    ``aot_eager`` in smoke runs, which only check that the script works)."""
    from fastmim.ops._dispatch import backend_status

    compile_backend = "aot_eager" if smoke else "inductor"
    csrc = {} if backend == "csrc" or backend_status(device)["csrc"] is not None else {"fastmim-csrc": (fast, "csrc")}
    return {
        f"fastmim-{backend}": (fast, backend),
        **csrc,
        "eager": (eager, None),
        "compile": (torch.compile(eager, backend=compile_backend, dynamic=False), None),
    }


def measure_ceilings(device: torch.device | str, smoke: bool = False) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and matmul throughput (TFLOP/s) measured now."""
    device = torch.device(device)
    numel = (1 << 20) if smoke else (1 << 28 if device.type == "cuda" else 1 << 25)
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device=device, smoke=smoke)
    copy_gbps = 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9
    n = 256 if smoke else (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = time_ms(lambda: a @ b, device=device, smoke=smoke)
    tflops = 2 * n**3 / (mm_ms * 1e-3) / 1e12
    return {"copy_gbps": copy_gbps, "matmul_tflops": tflops, "matmul_dtype": str(dtype).removeprefix("torch.")}


@dataclasses.dataclass
class Record:
    """One measured figure: ``name`` (the case), ``provider`` (fastmim-triton, eager, compile, ...)."""

    name: str
    provider: str
    ms: float
    shape: dict[str, Any]
    bytes_moved: float | None = None
    flops: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    gbps: float | None = None
    tflops: float | None = None
    roofline_fraction: float | None = None
    speedup_vs_best_peer: float | None = None
    best_peer: str | None = None

    def finish(self, ceilings: dict[str, float]) -> None:
        seconds = self.ms * 1e-3
        if self.bytes_moved is not None:
            self.gbps = self.bytes_moved / seconds / 1e9
            self.roofline_fraction = self.gbps / ceilings["copy_gbps"]
        if self.flops is not None:
            self.tflops = self.flops / seconds / 1e12
            flop_fraction = self.tflops / ceilings["matmul_tflops"]
            if self.roofline_fraction is None or flop_fraction > self.roofline_fraction:
                self.roofline_fraction = flop_fraction


def compare_to_peers(records: list[Record], ours_prefix: str = "fastmim") -> None:
    """Fill ``speedup_vs_best_peer`` of each fastmim record: best peer time / our time, per case."""
    by_case: dict[str, list[Record]] = {}
    for record in records:
        by_case.setdefault(record.name, []).append(record)
    for case in by_case.values():
        peers = [r for r in case if not r.provider.startswith(ours_prefix)]
        if not peers:
            continue
        best = min(peers, key=lambda r: r.ms)
        for record in case:
            if record.provider.startswith(ours_prefix):
                record.speedup_vs_best_peer = best.ms / record.ms
                record.best_peer = best.provider


def environment(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional on some CPU platforms
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).resolve().parent).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        device_name = f"CPU {device_name} ({torch.get_num_threads()} threads)"
    return {
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "commit_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(bench: str, records: list[Record], ceilings: dict[str, float], args: argparse.Namespace,
                  notes: str = "") -> Path:
    """Finish every record, write the run's JSON and print a table; returns the JSON's path."""
    for record in records:
        record.finish(ceilings)
    compare_to_peers(records)
    env = environment(args.device)
    kind = "smoke" if args.smoke else ("measured-gpu" if env["device_type"] == "cuda" else "measured-cpu")
    payload = {
        "benchmark": bench,
        "kind": kind,
        "environment": env,
        "ceilings": ceilings,
        "notes": notes,
        "records": [dataclasses.asdict(r) for r in records],
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = args.output / f"{bench}-{kind}-{env['device_type']}-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(format_table(records))
    print(f"[{kind}] {env['device']}  copy {ceilings['copy_gbps']:.1f} GB/s  "
          f"matmul {ceilings['matmul_tflops']:.2f} TFLOP/s  -> {path}")
    return path


def format_table(records: list[Record]) -> str:
    header = "| case | provider | ms (median) | GB/s | TFLOP/s | roofline | vs best peer |"
    lines = [header, "|" + "---|" * 7]
    for r in records:
        lines.append(
            f"| {r.name} | {r.provider} | {r.ms:.4f} | {_fmt(r.gbps, '.1f')} | {_fmt(r.tflops, '.2f')} | "
            f"{_fmt(r.roofline_fraction, '.1%')} | "
            + (f"{r.speedup_vs_best_peer:.2f}x vs {r.best_peer}" if r.speedup_vs_best_peer else "") + " |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)
