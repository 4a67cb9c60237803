"""End-to-end benchmark: one MAE pretraining step (forward, backward, AdamW step).

Case on CUDA: MAE ViT-B/16 (decoder 512 wide, 8 blocks), batch 256, 224x224, mask ratio 0.75,
norm_pix_loss, bf16 autocast, AdamW (betas 0.9/0.95, wd 0.05). Providers, same weights, same
run:

- ``fastmim-fused``: :class:`fastmim.models.MaskedAutoencoderViT` with ``fused=True`` (fastmim's
  masking / gather / unshuffle / loss ops, attention backend chosen by fastmim).
- ``fastmim-fused-masked-only``: the same with ``pred_masked_only=True``.
- ``official``: the official ``models_mae.py`` re-implemented (``benchmarks/peers/official_mae.py``:
  timm-0.3 attention that materialises the N x N scores).
- ``eager``: the official model on today's timm blocks (SDPA attention), eager
  (``benchmarks/peers/eager_sdpa.py``).
- ``compile``: ``torch.compile`` of ``eager`` (inductor; the ``eager`` backend in smoke runs).
- ``fastmim-compile``: ``torch.compile`` of ``fastmim-fused``: fastmim's ops are registered custom ops,
  so the compiled graph keeps them whole and inductor fuses what is left around them (the block's
  LayerNorm, GELU and adds where the fused block takes timm's steps, as on CPU).

Figures per provider: median step time, images/s, peak memory (CUDA: the most allocated during
a step), and MFU: model FLOPs counted from the shapes (:func:`mae_step_flops`: every matmul and
attention product of forward + backward, backward = 2x forward) over the step time, as a
fraction of the matmul throughput the harness measured in the same run (``roofline``) and of the
device's dense bf16 spec where known (``extra.mfu_vs_spec``).

``--device cpu`` runs a small preset (``vit_tiny_patch4_32``, batch 32, fp32; ``--config
mae_vit_tiny_p16_224 --batch 16`` for ViT-Tiny/16 at 224 px), timing the providers interleaved:
after a warm-up, ``--rounds`` rounds of one step each, the median per provider; ``--threads 1 --clock
cpu`` times the process's CPU time on one thread, which the load of other processes on a shared
machine disturbs far less than wall time. Each fastmim provider's record also carries its speed-up
over ``eager`` and ``compile`` computed round by round (``extra.paired_speedup``: geometric mean and
95% interval, :func:`harness.paired_speedup`), which says whether a difference is more than noise.
``--smoke`` runs a 2-block toy model.
"""

from __future__ import annotations

import copy
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from peers import eager_sdpa, official_mae  # noqa: E402

from fastmim.models import MaskedAutoencoderViT  # noqa: E402

MASK_RATIO = 0.75
PAIRED_PEERS = ("eager", "compile")  # CPU: fastmim's providers' speed-up over these, with a 95% interval
LN = partial(nn.LayerNorm, eps=1e-6)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
SPEC_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.0, "A100": 312.0}

CONFIGS = {
    "mae_vit_b16": dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_tiny_p16_224": dict(img_size=224, patch_size=16, in_chans=3, embed_dim=192, depth=12, num_heads=3,
                                 decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "mae_vit_tiny_p4_32": dict(img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=12, num_heads=3,
                               decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "smoke": dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
}


def mae_step_flops(cfg: dict, batch: int, mask_ratio: float = MASK_RATIO, mlp_ratio: float = 4.0) -> float:
    """FLOPs of one MAE training step from the shapes (2 per multiply-add; backward = 2x forward).

    Equals ``torch.utils.flop_counter.FlopCounterMode`` on a real step of the official model
    (tested in ``tests/test_models.py``).

    Counted: patch embedding (all L patches), every block's qkv / proj / MLP linears and its two
    attention products (``q k^T`` and ``p v``) on the tokens the official model runs (encoder
    ``K + 1``, decoder ``L + 1``), ``decoder_embed`` and ``decoder_pred``. Not counted: norms,
    softmax, elementwise ops, the loss (all O(tokens x width)).
    """
    p, c = cfg["patch_size"], cfg["in_chans"]
    length = (cfg["img_size"] // p) ** 2
    keep = int(length * (1 - mask_ratio))
    d, dd = cfg["embed_dim"], cfg["decoder_embed_dim"]

    def blocks(n: int, width: int, depth: int) -> float:
        linears = 2 * n * width * width * (4 + 2 * mlp_ratio)  # qkv (3), proj (1), fc1 + fc2 (2 x ratio)
        attention = 2 * 2 * n * n * width
        return depth * (linears + attention)

    patch_embed = 2 * length * p * p * c * d
    rest = (blocks(keep + 1, d, cfg["depth"])
            + 2 * (keep + 1) * d * dd
            + blocks(length + 1, dd, cfg["decoder_depth"])
            + 2 * (length + 1) * dd * p * p * c)
    # Backward: two products per forward product (input and weight gradients); the patch
    # embedding needs no input gradient (the images do not require grad).
    return float(batch * (2 * patch_embed + 3 * rest))


def make_step(model: nn.Module, device: torch.device, dtype: torch.dtype | None):
    fused_adam = device.type == "cuda"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4,
                                  betas=(0.9, 0.95), weight_decay=0.05, fused=fused_adam)

    def step(imgs: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _, _ = model(imgs, MASK_RATIO)
        loss.backward()
        optimizer.step()

    return step


def peak_memory_gb(step, imgs: torch.Tensor, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(imgs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e9


def spec_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in SPEC_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def main(argv=None) -> None:
    def extra_args(parser) -> None:
        parser.add_argument("--batch", type=int, default=None,
                            help="batch size (default: 256 on CUDA, 32 on CPU, 4 with --smoke)")
        parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                            help="model (default: mae_vit_b16 on CUDA, mae_vit_tiny_p4_32 on CPU)")
        parser.add_argument("--rounds", type=int, default=10,
                            help="CPU: interleaved rounds (each provider one step per round); the median is reported")

    args = harness.parse_args(__doc__.splitlines()[0], argv, extra=extra_args)
    device = torch.device(args.device)
    if args.smoke:
        name, batch = "smoke", 4
    elif device.type == "cuda":
        name, batch = "mae_vit_b16", 256
    else:
        name, batch = "mae_vit_tiny_p4_32", 32
    name = args.config or name
    batch = args.batch or batch
    cfg = CONFIGS[name]
    dtype = torch.bfloat16 if device.type == "cuda" else None
    ceilings = harness.measure_ceilings(device, smoke=args.smoke)
    torch.manual_seed(0)

    official = official_mae.MaskedAutoencoderViT(**cfg, norm_layer=LN, norm_pix_loss=True)
    state = official.state_dict()
    eager = eager_sdpa.MaskedAutoencoderViT(**cfg, norm_layer=LN, norm_pix_loss=True)
    eager.load_state_dict(state)
    models = {
        "fastmim-fused": MaskedAutoencoderViT(**cfg, norm_layer=LN, norm_pix_loss=True, fused=True),
        "fastmim-fused-masked-only": MaskedAutoencoderViT(**cfg, norm_layer=LN, norm_pix_loss=True, fused=True,
                                                          pred_masked_only=True),
        "official": official,
        "eager": eager,
    }
    for key in ("fastmim-fused", "fastmim-fused-masked-only"):
        models[key].load_state_dict(state)
    if args.smoke:  # keep the CI run short: one fastmim variant, dynamo without a code generator
        del models["fastmim-fused-masked-only"]
    compile_backend = "eager" if args.smoke else "inductor"
    models["compile"] = torch.compile(copy.deepcopy(eager), backend=compile_backend)
    models["fastmim-compile"] = torch.compile(copy.deepcopy(models["fastmim-fused"]), backend=compile_backend)

    imgs = [torch.randn(batch, cfg["in_chans"], cfg["img_size"], cfg["img_size"], device=device) for _ in range(2)]
    flops = mae_step_flops(cfg, batch)
    spec = spec_tflops(device)
    case = f"{name}_b{batch}_{'bf16' if dtype is not None else 'fp32'}_step"
    shape = {**cfg, "batch": batch, "mask_ratio": MASK_RATIO, "dtype": str(dtype or torch.float32),
             "threads": torch.get_num_threads(), "clock": args.clock if device.type == "cpu" else "cuda events"}
    records = []

    def record(provider: str, ms: float, peak: float | None, paired: dict | None = None) -> None:
        extra = {"img_per_s": batch / (ms * 1e-3), "peak_mem_gb": peak}
        if paired:
            extra["paired_speedup"] = paired
        if spec is not None:
            extra["mfu_vs_spec"] = flops / (ms * 1e-3) / (spec * 1e12)
        records.append(harness.Record(case, provider, ms, shape, flops=flops, extra=extra))

    arg_sets = [(x,) for x in imgs]
    if device.type == "cpu" and not args.smoke:
        # CPU: every model stays in memory and the providers take turns step by step (interleaved)
        steps = {}
        for provider, model in models.items():
            model.train()
            steps[provider] = make_step(model, device, dtype)
            steps[provider](imgs[0])  # first call: compilation
        samples = harness.time_interleaved_samples(steps, arg_sets, rounds=args.rounds, clock=args.clock)
        for provider, values in samples.items():
            # fastmim's providers against the eager model and its compiled form, round by round
            paired = {peer: harness.paired_speedup(samples[peer], values) for peer in PAIRED_PEERS
                      if provider.startswith("fastmim") and peer in samples}
            record(provider, statistics.median(values), None, paired)
    else:
        for provider, model in models.items():
            model.to(device).train()
            step = make_step(model, device, dtype)
            step(imgs[0])  # first call: compilation, autotuning, the attention backend choice
            ms = harness.time_ms(step, arg_sets, device=device, warmup=100, rep=1000, smoke=args.smoke)
            record(provider, ms, peak_memory_gb(step, imgs[0], device))
            model.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in records:
        mem = r.extra["peak_mem_gb"]
        print(f"{r.provider:28s} {r.extra['img_per_s']:10.1f} img/s" + (f"  peak {mem:.2f} GB" if mem else ""))
    harness.write_results("bench_train_step", records, ceilings, args,
                          notes="MFU = roofline (counted model FLOPs / time / measured matmul TFLOP/s); "
                                "extra.mfu_vs_spec against the data-sheet dense bf16 peak")


if __name__ == "__main__":
    main()
