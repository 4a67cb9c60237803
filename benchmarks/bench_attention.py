"""Benchmark of visible_attention: forward and forward+backward against SDPA and xformers.

Providers, per case, measured in the same run (a provider that cannot run a case, e.g. an
SDPA backend without a kernel for that dtype/head dim/mask, is skipped and listed in the notes):
- ``fastmim-<backend>``: :func:`fastmim.ops.visible_attention` (Triton on CUDA; on CPU the
  reference, or the Triton interpreter in ``--smoke`` runs under ``TRITON_INTERPRET=1``).
- ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``: PyTorch SDPA pinned to one
  backend with ``torch.nn.attention.sdpa_kernel``. Varlen cases run them padded (pad to
  ``(B, H, max_seqlen, D)``, key-padding mask, unpad; the pad/unpad copies are counted);
  key-visibility cases pass a boolean key mask.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` when importable (dense; varlen with a
  ``BlockDiagonalMask`` built once outside the timed region, which favours it).

Cases (bf16 on CUDA, fp32 on CPU): MAE ViT-B encoder over visible tokens (B=256, H=12, N=50,
D=64), MAE decoder (B=256, H=16, N=197, D=32), ViT-L encoder (B=256, H=16, N=50, D=64), a
varlen packed batch with about 45% padding (B=256, H=12, D=64, lengths 7..64, max_seqlen 64),
and decoder key-visibility (B=256, H=16, L=197, D=32, 49 visible keys, given as an index set).

FLOPs: ``4 * B * H * Nq * Nk * D`` forward (Nk = visible keys; for varlen the sum over the
sequences of ``4 * H * n_b^2 * D``), backward 2.5x that, so fwd+bwd counts 3.5x. Bytes: q, k, v
read and out written once forward; fwd+bwd adds q, k, v, out, dout read and dq, dk, dv written.
Targets on H100: >= 1.2x the best peer at the MAE shapes, >= 1.8x padded SDPA for varlen.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

from fastmim.ops import use_backend, visible_attention  # noqa: E402
from fastmim.ops._dispatch import backend_status, select_backend  # noqa: E402
from fastmim.ops.attention_router import sdpa_varlen  # noqa: E402

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = sdpa_kernel = None

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def _xformers():
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


def make_case(kind, batch, heads, n, head_dim, dtype, device, generator, num_visible=None):
    """Inputs and the FLOP count of one case; ``kind`` is dense, varlen or keys."""
    case = dict(kind=kind, B=batch, H=heads, D=head_dim, dtype=str(dtype).removeprefix("torch."))
    if kind == "varlen":
        lengths = torch.randint(max(1, n // 9), n + 1, (batch,), generator=generator)
        cu = torch.zeros(batch + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        total = int(cu[-1])
        tensors = [torch.randn(total, heads, head_dim, device=device, dtype=dtype) for _ in range(3)]
        case.update(max_seqlen=n, T=total, padding=round(1 - total / (batch * n), 3))
        kwargs = dict(cu_seqlens=cu.to(device), max_seqlen=n)
        flops = 4 * heads * head_dim * float((lengths.double() ** 2).sum())
        rows = total
    else:
        tensors = [torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype) for _ in range(3)]
        kwargs, keys = {}, n
        case.update(N=n)
        if kind == "keys":
            ids = torch.rand(batch, n, generator=generator).argsort(1)[:, :num_visible].to(device)
            kwargs, keys = dict(key_visible=ids), num_visible
            case.update(K=num_visible)
        flops = 4 * batch * heads * n * keys * head_dim
        rows = batch * n
    case["bytes_per_tensor"] = rows * heads * head_dim * tensors[0].element_size()
    return tensors, kwargs, flops, case


def providers(kind, kwargs, device, smoke):
    """name -> (fn(q, k, v) -> out, fastmim backend or None)."""
    backend = select_backend("visible_attention", torch.device(device), implemented=("reference", "triton"))
    if smoke and device == "cpu" and backend == "reference" and backend_status("cpu")["triton"] is None:
        backend = "triton"  # the interpreter: exercise the kernel path
    result = {f"fastmim-{backend}": (lambda q, k, v: visible_attention(q, k, v, **kwargs), backend)}
    if sdpa_kernel is not None:
        for name, member in SDPA_BACKENDS.items():
            if not hasattr(SDPBackend, member):
                continue
            pinned = _pinned_sdpa(kind, kwargs, getattr(SDPBackend, member))
            result[name + ("-padded" if kind == "varlen" else "")] = (pinned, None)
    xops = _xformers()
    if xops is not None and kind != "keys":
        if kind == "varlen":
            cu = kwargs["cu_seqlens"]
            bias = xops.fmha.BlockDiagonalMask.from_seqlens((cu[1:] - cu[:-1]).tolist())
            result["xformers"] = (lambda q, k, v: xops.memory_efficient_attention(
                q[None], k[None], v[None], attn_bias=bias)[0], None)
        else:
            result["xformers"] = (lambda q, k, v: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), None)
    return result


def _pinned_sdpa(kind, kwargs, member):
    def run(q, k, v):
        with sdpa_kernel(member):
            if kind == "varlen":
                return sdpa_varlen(q, k, v, kwargs["cu_seqlens"], kwargs["max_seqlen"])
            if kind == "keys":
                mask = torch.zeros(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device)
                mask.scatter_(1, kwargs["key_visible"], True)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
            return F.scaled_dot_product_attention(q, k, v)
    return run


def step(fn, with_grad):
    def run(q, k, v, grad_out):
        if not with_grad:
            with torch.no_grad():
                return fn(q, k, v)
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)
    return run


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = args.device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if args.smoke:
        cases = [("mae-b-encoder", "dense", 2, 2, 50, 64, None), ("varlen-45pct-pad", "varlen", 3, 2, 17, 32, None),
                 ("decoder-keys", "keys", 2, 2, 20, 32, 5)]
    else:
        cases = [("mae-b-encoder", "dense", 256, 12, 50, 64, None),
                 ("mae-decoder", "dense", 256, 16, 197, 32, None),
                 ("vit-l-encoder", "dense", 256, 16, 50, 64, None),
                 ("varlen-45pct-pad", "varlen", 256, 12, 64, 64, None),
                 ("decoder-keys", "keys", 256, 16, 197, 32, 49)]
    generator = torch.Generator().manual_seed(0)
    ceilings = harness.measure_ceilings(device, smoke=args.smoke)
    records, skipped = [], []
    for label, kind, batch, heads, n, head_dim, num_visible in cases:
        tensors, kwargs, flops, case = make_case(kind, batch, heads, n, head_dim, dtype, device, generator, num_visible)
        grad_out = torch.randn_like(tensors[0])
        peers = providers(kind, kwargs, device, args.smoke)
        for with_grad in (False, True):
            name = f"{label}-{'fwd+bwd' if with_grad else 'fwd'}"
            for t in tensors:
                t.requires_grad_(with_grad)
            tensor_bytes = case["bytes_per_tensor"] * (12 if with_grad else 4)
            for provider, (fn, backend) in peers.items():
                run = step(fn, with_grad)
                try:
                    with use_backend(backend):
                        ms = harness.time_ms(run, [(*tensors, grad_out)], device=device, smoke=args.smoke)
                except RuntimeError as exc:  # this SDPA backend has no kernel for the case
                    skipped.append(f"{name}/{provider}: {str(exc).splitlines()[0][:120]}")
                    continue
                records.append(harness.Record(name, provider, ms, dict(case), bytes_moved=tensor_bytes,
                                              flops=flops * (3.5 if with_grad else 1.0)))
    notes = ("FLOPs 4*B*H*Nq*Nk*D forward (varlen: sum of per-sequence n^2), x3.5 for fwd+bwd; bytes = q,k,v,out "
             "(fwd) and + q,k,v,out,dout,dq,dk,dv (fwd+bwd) once each. Skipped: " + ("; ".join(skipped) or "none"))
    harness.write_results("bench_attention", records, ceilings, args, notes=notes)


if __name__ == "__main__":
    main()
