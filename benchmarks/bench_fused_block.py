"""Benchmark of the fused transformer block: one ViT block, forward + backward.

Cases (MAE pretraining, batch 256, bf16 activations and parameters on CUDA): the ViT-B/16 encoder
block (width 768, 12 heads, 50 tokens: 49 visible patches and the cls token), the MAE decoder block
(width 512, 16 heads, 197 tokens) and the ViT-L/16 encoder block (width 1024, 16 heads, 50 tokens).
MLP ratio 4, qkv bias, LayerNorm eps 1e-6.

Providers, same weights, measured in the same run:

- ``fastmim-fused``: :class:`fastmim.models.vit.FusedBlock` (on CUDA its fused-GEMM path: LayerNorm in
  the qkv and fc1 GEMMs' prologues, bias + GELU and bias + residual + row statistics in epilogues,
  GELU's derivative and the bias and LayerNorm-parameter reductions inside the backward GEMMs; fastmim's
  flash attention). On CPU the block takes timm's steps (the fused ops have no CPU kernel), except in
  ``--smoke`` runs under ``TRITON_INTERPRET=1``, which run the Triton path through the interpreter.
- ``eager``: timm's ``Block`` (SDPA attention), eager.
- ``compile``: ``torch.compile`` of that block (inductor; ``aot_eager`` in smoke runs).
- ``compile-max-autotune``: ``torch.compile(mode="max-autotune")`` (inductor's Triton GEMM templates
  tried against cuBLAS; not in smoke runs).

Per call: the block's output and the gradients of its input and every parameter (parameter gradients
set to ``None`` before each call, as ``zero_grad(set_to_none=True)`` leaves them). FLOPs: the block's
matmuls and attention products, forward plus backward (backward = 2x forward); the roofline fraction is
against the matmul throughput the harness measures in the same run (the block is GEMM-bound). The
modelled bytes of each provider are in ``benchmarks/results/cost_model.md`` (no GPU has run this
script yet: figures in ``benchmarks/results/`` from a CPU are CPU timings).

Usage: ``python benchmarks/bench_fused_block.py [--smoke] [--device cuda|cpu]``.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from timm.models.vision_transformer import Block as TimmBlock  # noqa: E402

from fastmim.models.vit import FusedBlock  # noqa: E402

# name: (width, heads, tokens), batch 256
CASES = {
    "vit_b16_encoder": (768, 12, 50),
    "mae_decoder": (512, 16, 197),
    "vit_l16_encoder": (1024, 16, 50),
}
SMOKE_CASES = {"smoke": (64, 2, 9)}
LN = partial(nn.LayerNorm, eps=1e-6)


def block_flops(width: int, tokens: int, batch: int, mlp_ratio: float = 4.0) -> float:
    """Matmul and attention FLOPs of one block, forward + backward (2 per multiply-add)."""
    rows = batch * tokens
    linears = 2 * rows * width * width * (4 + 2 * mlp_ratio)  # qkv (3), proj (1), fc1 + fc2
    attention = 2 * 2 * batch * tokens * tokens * width  # q k^T and p v
    return 3.0 * (linears + attention)


def make_blocks(width: int, heads: int, dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    timm_block = TimmBlock(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LN)
    fused = FusedBlock(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LN, attn_backend="fastmim")
    # timm's attention keeps qkv/proj under the same names: the state dicts match
    fused.load_state_dict(timm_block.state_dict())
    return {"fastmim-fused": fused.to(device, dtype), "eager": timm_block.to(device, dtype)}


def step_fn(block: nn.Module):
    params = [p for p in block.parameters() if p.requires_grad]

    def step(x: torch.Tensor, grad: torch.Tensor) -> None:
        for p in params:
            p.grad = None
        x = x.detach().requires_grad_(True)
        block(x).backward(grad)

    return step


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = SMOKE_CASES if args.smoke else CASES
    batch = 2 if args.smoke else (256 if device.type == "cuda" else 8)
    ceilings = harness.measure_ceilings(device, smoke=args.smoke)
    records = []
    for name, (width, heads, tokens) in cases.items():
        blocks = make_blocks(width, heads, dtype, device)
        providers = {"fastmim-fused": step_fn(blocks["fastmim-fused"]), "eager": step_fn(blocks["eager"])}
        compile_backend = "aot_eager" if args.smoke else "inductor"
        compiled = torch.compile(blocks["eager"], backend=compile_backend, dynamic=False)
        providers["compile"] = step_fn(compiled)
        if not args.smoke:
            providers["compile-max-autotune"] = step_fn(torch.compile(blocks["eager"], mode="max-autotune",
                                                                      dynamic=False))
        arg_sets = [(torch.randn(batch, tokens, width, device=device, dtype=dtype),
                     torch.randn(batch, tokens, width, device=device, dtype=dtype)) for _ in range(2)]
        shape = {"batch": batch, "tokens": tokens, "width": width, "heads": heads, "dtype": str(dtype)}
        flops = block_flops(width, tokens, batch)
        for fn in providers.values():  # compilation, autotuning, the attention backend's choice
            fn(*arg_sets[0])
        times = harness.time_providers(providers, arg_sets, device=device, smoke=args.smoke, rounds=10,
                                       clock=args.clock)
        fused_path = blocks["fastmim-fused"].stream_fusable(arg_sets[0][0])
        for provider, ms in times.items():
            extra = {"fused_gemm_path": fused_path} if provider.startswith("fastmim") else {}
            records.append(harness.Record(f"{name}_b{batch}_fwd+bwd", provider, ms, shape, flops=flops, extra=extra))
    harness.write_results("bench_fused_block", records, ceilings, args,
                          notes="one ViT block, forward + backward (input and parameter gradients); roofline: "
                                "counted matmul + attention FLOPs over the measured matmul throughput")


if __name__ == "__main__":
    main()
