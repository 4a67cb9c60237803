"""Benchmark of the extension's two CPU builds: the x86-64 baseline (``fastmim._C``) against AVX2 + FMA
(``fastmim._C_avx2``), on the CPU ops' loops.

Both builds register the same ops, so one process holds one of them: each build runs in its own
subprocess (``fastmim.ops._csrc.cpu_variant`` set before the extension loads; a missing build is
compiled once, cached), the subprocesses alternating build after build for ``--runs`` runs, and each
case's figure is the median over the runs of a run's median. One thread, the process's CPU time
(``time.process_time``): on a shared machine the load of other processes counts far less than in wall
time. Cases, forward + backward, fp32, at the tiny models' CPU shapes: ``masked_patch_mse`` (224 px,
p = 16, B = 16; 32 px, p = 4, B = 64), masking + ``gather_visible`` with position embedding and cls
token (B = 16, L = 196, D = 192), ``unshuffle`` (D = 128).

``--smoke`` runs the build this CPU loads only, once, with a few calls (CI: no second build).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[3])
torch.set_num_threads(1)
from fastmim.ops import _csrc
_csrc.cpu_variant = lambda: sys.argv[1]
error = _csrc.load_error()
assert error is None and _csrc.loaded_variant() == sys.argv[1], (error, _csrc.loaded_variant())
from fastmim.ops import gather_visible, masked_patch_mse, random_masking, unshuffle, use_backend
reps = int(sys.argv[2])
torch.manual_seed(0)
out = {}

def bench(name, fn, calls):
    for _ in range(3):
        fn()
    times = []
    for _ in range(max(3, calls * reps // 100)):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    out[name] = statistics.median(times) * 1e3

for label, batch, size, p in (("224px-p16", 16, 224, 16), ("32px-p4", 64, 32, 4)):
    patches = (size // p) ** 2
    imgs = torch.randn(batch, 3, size, size)
    mask = (torch.rand(batch, patches) < 0.75).float()
    pred = torch.randn(batch, patches, p * p * 3, requires_grad=True)

    def loss_step(pred=pred, imgs=imgs, mask=mask, p=p):
        with use_backend("csrc"):
            torch.autograd.grad(masked_patch_mse(pred, imgs, mask, patch_size=p), pred)

    bench(f"masked_patch_mse-{label}-fwd+bwd", loss_step, 60 if size == 224 else 300)

B, L = 16, 196
x = torch.randn(B, L, 192, requires_grad=True)
pos = torch.randn(1, L + 1, 192, requires_grad=True)
cls = torch.randn(1, 1, 192, requires_grad=True)

def encoder_step():
    with use_backend("csrc"):
        m = random_masking(B, L, 0.75)
        y = gather_visible(x, m.ids_keep, pos, cls_token=cls)
        torch.autograd.grad(y, (x, pos, cls), torch.ones_like(y))

bench("masking+gather_visible-D192-fwd+bwd", encoder_step, 300)
xd = torch.randn(B, 50, 128, requires_grad=True)
token = torch.randn(1, 1, 128, requires_grad=True)
dpos = torch.randn(1, L + 1, 128, requires_grad=True)
ids_restore = random_masking(B, L, 0.75).ids_restore

def decoder_step():
    with use_backend("csrc"):
        y = unshuffle(xd, ids_restore, token, dpos, has_cls=True)
        torch.autograd.grad(y, (xd, token, dpos), torch.ones_like(y))

bench("unshuffle-D128-fwd+bwd", decoder_step, 300)
print(json.dumps(out))
"""


def run_build(variant: str, reps: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, variant, str(reps), str(REPO)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {variant} build's run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> None:
    def extra(parser):
        parser.add_argument("--runs", type=int, default=5, help="subprocess runs per build, alternating")

    args = harness.parse_args(__doc__.splitlines()[0], argv, extra=extra)
    from fastmim.ops import _csrc

    if _csrc.load_error() is not None:
        print(f"the extension cannot load here ({_csrc.load_error()}): nothing to compare")
        return
    variants = [_csrc.cpu_variant()] if args.smoke else list(_csrc.CPU_VARIANTS)
    runs, reps = (1, 5) if args.smoke else (args.runs, 100)
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(runs):
        for variant in variants:
            results[variant].append(run_build(variant, reps))
    ceilings = harness.measure_ceilings("cpu", smoke=args.smoke)
    records = []
    for variant in variants:
        for case in results[variant][0]:
            ms = statistics.median(run[case] for run in results[variant])
            records.append(harness.Record(case, f"csrc-{variant}", ms, {"threads": 1, "clock": "cpu", "runs": runs}))
    harness.write_results("bench_cpu_builds", records, ceilings, args,
                          notes="one thread, process CPU time; each build in its own subprocess, builds alternating "
                                "run after run; the median over runs of each run's median")


if __name__ == "__main__":
    main()
