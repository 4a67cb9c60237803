"""Benchmark of the masking ops: MAE's per-sample random masking alone, forward (no gradient).

Case ``masking-L<L>`` (MAE pretraining shapes: B=256, L=196 patches of a 224x224 image, mask
ratio 0.75, K=49): fastmim's ``random_masking(B, L, 0.75)`` (counter-based noise, ranks, keep
set and mask in one kernel) against the official chain (``torch.rand`` noise, two ``argsort``,
the slice of the keep set, the mask built and ``gather``-ed with ``ids_restore``). The masking
with the gather of the visible tokens, as the official encoder runs it, is
``benchmarks/bench_gather.py``'s ``encoder`` case.

Providers measured in the same run: ``fastmim-<backend>`` (Triton on CUDA; on CPU the CPU path,
or the Triton interpreter in ``--smoke`` runs under ``TRITON_INTERPRET=1``), ``fastmim-csrc``
when built, ``eager`` (the official chain), ``compile`` (``torch.compile`` of that chain:
inductor; ``aot_eager`` in smoke runs, which only check that the script works).

Bytes: the outputs each provider must write, ``ids_keep`` (int64 ``B*K``), ``ids_restore``
(int64 ``B*L``) and ``mask`` (fp32 ``B*L``); the official chain also writes and reads its noise
and sort buffers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

from fastmim.ops import random_masking  # noqa: E402
from fastmim.ops._dispatch import backend_status, select_backend  # noqa: E402

MASK_RATIO = 0.75


def official_random_masking(batch: int, length: int, mask_ratio: float, device: torch.device):
    """facebookresearch/mae ``random_masking`` without the gather of the tokens."""
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(batch, length, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([batch, length], device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, mask, ids_restore


def providers(smoke: bool, device: str):
    backend = select_backend("random_masking", torch.device(device), implemented=("reference", "triton", "csrc"),
                             prefer_cpu=("csrc",))
    if smoke and torch.device(device).type == "cpu" and backend_status("cpu")["triton"] is None:
        backend = "triton"  # the interpreter: exercise the kernel path

    def fast(batch, length):
        return random_masking(batch, length, MASK_RATIO, device=device)

    def eager(batch, length):
        return official_random_masking(batch, length, MASK_RATIO, torch.device(device))

    return harness.op_providers(fast, eager, backend, device, smoke)


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    if args.smoke:
        batch, lengths = 2, (16,)
    elif on_cuda:
        batch, lengths = 256, (196, 256)
    else:  # the tiny models' shapes on CPU (ViT-Tiny/16 at 224 px, batch 16)
        batch, lengths = 16, (196,)
    ceilings = harness.measure_ceilings(device, smoke=args.smoke)
    records = []
    for length in lengths:
        keep = int(length * (1 - MASK_RATIO))
        bytes_moved = batch * keep * 8 + batch * length * 8 + batch * length * 4
        shape = dict(B=batch, L=length, K=keep, mask_ratio=MASK_RATIO)
        runs = {provider: harness.with_backend(fn, backend, no_grad=True)
                for provider, (fn, backend) in providers(args.smoke, device).items()}
        times = harness.time_providers(runs, [(batch, length)], device=device, smoke=args.smoke, clock=args.clock)
        for provider, ms in times.items():
            records.append(harness.Record(f"masking-L{length}", provider, ms, shape, bytes_moved=bytes_moved))
    notes = ("bytes = the outputs every provider writes (ids_keep, ids_restore int64; mask fp32); mask ratio 0.75; "
             "forward only (the masking has no gradient)")
    harness.write_results("bench_masking", records, ceilings, args, notes=notes)


if __name__ == "__main__":
    main()
