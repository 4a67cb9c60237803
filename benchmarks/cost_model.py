"""The cost model of a training step of each method (modelled figures, no GPU needed).

Runs one steady-state training step (forward, backward, fused AdamW step) of each
configuration at real size on the meta device and counts, op by op: FLOPs, HBM bytes read
and written, kernel launches, the activations saved for backward and the peak of live
bytes; then projects an H100 time with a roofline (``benchmarks/costs/devices.py`` holds
the device constants and says where each comes from). The accounting rules are in
``benchmarks/costs/counter.py``; what fastmim's own ops are charged, in
``benchmarks/costs/fastmim_ops.py`` (held to the Triton kernels by the tests).

Mixed precision is modelled as bf16 parameters and inputs (pure-bf16 training: weights,
gradients and AdamW state in bf16). With autocast over fp32 master weights every
configuration would add the same fp32 parameter copies and per-op weight casts.

Configurations (ViT-B/16 and ViT-L/16, 224 px, batch 256, mask ratio 0.75, norm_pix loss):

- ``official``: the official MAE model (``benchmarks/peers/official_mae.py``: attention
  materialising the N x N scores, argsort masking with index gathers, patchify loss);
- ``eager_sdpa``: the same on today's timm blocks with SDPA (``benchmarks/peers/eager_sdpa.py``);
- ``fastmim``: ``fastmim.models.MaskedAutoencoderViT`` with the fused ops, ``pred_masked_only``
  off and on;
- ``official_patched``: the official model after ``fastmim.patch`` (same masking RNG; fused
  gather, un-shuffle, loss, packed-qkv attention and blocks);
- ``hf_vitmae`` / ``hf_vitmae_patched``: Hugging Face's ``ViTMAEForPreTraining`` at the same
  sizes (``benchmarks/peers/hf_vitmae.py``), as transformers runs it (SDPA) and after
  ``fastmim.patch``. The patched rows count each block as one fused block: the counter's hooks on
  every module make ``fastmim.patch`` call hooked blocks one at a time, so the residual stream
  between blocks (one add per block) is not modelled for them;
- supervised + MIM, CMAE and LUT (:data:`METHODS`), each as ``eager_sdpa`` (the model's plain
  PyTorch path on timm's blocks with SDPA) and ``fastmim`` (its fused path), with the method's
  own views, heads and mask ratio (LUT's EMA teacher update counted after the optimizer step).

Usage: ``python benchmarks/cost_model.py [--smoke] [--output DIR]``. Writes
``cost_model.json``, ``cost_model.md`` and ``cost_model.png`` in ``benchmarks/results/``
(``--smoke``: tiny models, files named ``cost_model-smoke.*``; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

import harness  # noqa: E402
from costs import counter as cm  # noqa: E402
from costs.devices import H100_SXM  # noqa: E402
from costs.fastmim_ops import MASKED_FRACTION  # noqa: E402
from costs.step import count_step  # noqa: E402

DTYPE = torch.bfloat16
MASK_RATIO = 0.75

# (embed_dim, depth, heads), decoder (dim, depth, heads), image, patch
SIZES = {
    "vit_b16": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                    decoder_num_heads=16, img_size=224, patch_size=16),
    "vit_l16": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                    decoder_num_heads=16, img_size=224, patch_size=16),
    "smoke": dict(embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                  decoder_num_heads=2, img_size=32, patch_size=8),
}
TARGETS = (
    # (metric, peer, max ratio fastmim / peer); speed as peer time / fastmim time >= bound; a bound of
    # None is a figure reported next to the targets, not a target
    ("activation_bytes", "official", 0.6),
    ("activation_bytes", "eager_sdpa", 0.62),
    ("launches", "eager_sdpa", 0.55),
    ("non_gemm_bytes", "eager_sdpa", 0.55),
    ("hbm_bytes", "eager_sdpa", None),
    ("speedup", "official", 1.3),
    ("speedup", "eager_sdpa", 1.35),
)


def _official(size: dict[str, Any]) -> nn.Module:
    from peers import official_mae

    return official_mae.MaskedAutoencoderViT(mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                             norm_pix_loss=True, **size)


def _eager_sdpa(size: dict[str, Any]) -> nn.Module:
    from peers import eager_sdpa

    return eager_sdpa.MaskedAutoencoderViT(mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                           norm_pix_loss=True, **size)


def _fastmim(size: dict[str, Any], pred_masked_only: bool) -> nn.Module:
    from fastmim.models.mae import MaskedAutoencoderViT

    return MaskedAutoencoderViT(mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True,
                                fused=True, attn_backend="fastmim", pred_masked_only=pred_masked_only, **size)


def _hf_vitmae(size: dict[str, Any]) -> nn.Module:
    from peers import hf_vitmae

    return hf_vitmae.MaskedAutoencoderViT(mlp_ratio=4, eps=1e-6, norm_pix_loss=True, mask_ratio=MASK_RATIO, **size)


def _patched(build: Callable[[dict[str, Any]], nn.Module], size: dict[str, Any]) -> nn.Module:
    from peers import hf_vitmae

    import fastmim

    model = build(size)
    # fastmim's attention op, as the fastmim rows (on meta the automatic choice would be SDPA's).
    fastmim.patch(model.model if isinstance(model, hf_vitmae.MaskedAutoencoderViT) else model, attn_backend="fastmim")
    return model


CONFIGS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "official": _official,
    "eager_sdpa": _eager_sdpa,
    "fastmim": partial(_fastmim, pred_masked_only=False),
    "fastmim_pred_masked_only": partial(_fastmim, pred_masked_only=True),
    "official_patched": partial(_patched, _official),
    "hf_vitmae": _hf_vitmae,
    "hf_vitmae_patched": partial(_patched, _hf_vitmae),
}
# fastmim.patch's modelled gain: each patched configuration against the model it patches.
PATCHED = {"official_patched": "official", "hf_vitmae_patched": "hf_vitmae"}

# The other methods, on fastmim's own models: ``eager_sdpa`` is the model's plain-PyTorch path
# (``fused=False``: the ops' references, i.e. gathers and the patchify loss, timm's blocks) with SDPA
# and the official argsort masking (``masking="official"``), as a user would write the method on
# today's timm; ``fastmim`` its fused path. No published code of these
# methods is re-implemented in ``benchmarks/peers/``, so they have no ``official`` configuration.
METHOD_PRESETS = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224", "smoke": "vit_tiny_patch4_32"}
SMOKE_OVERRIDES = {k: v for k, v in SIZES["smoke"].items() if k not in ("img_size", "patch_size")}  # MAE's toy widths
METHOD_CONFIGS = {"eager_sdpa": dict(fused=False, attn_backend="sdpa", masking="official"),
                  "fastmim": dict(fused=True, attn_backend="fastmim")}
METHODS = ("supmim", "cmae", "lut")


def _method_step(method: str, model_name: str, config: str, batch: int):
    """(model, inputs, loss function, hook run after the optimizer step) of one method's training step."""
    from fastmim.models import create_model

    overrides = {**METHOD_CONFIGS[config], **(SMOKE_OVERRIDES if model_name == "smoke" else {})}
    if method == "lut" and model_name == "smoke":
        overrides["head_hidden_dim"] = 64
    if method == "cmae" and model_name == "smoke":
        overrides.update(proj_hidden_dim=64, proj_dim=32)
    with torch.device("meta"):
        model = create_model(method, METHOD_PRESETS[model_name], **overrides).to(DTYPE)
    size = model.patch_embed.img_size
    view = torch.empty(batch, 3, *size, device="meta", dtype=DTYPE)
    if method == "supmim":
        labels = torch.zeros(batch, dtype=torch.int64, device="meta")
        return model, [view, labels], lambda m, x, y: m(x, y)["loss"], None
    # Two views; LUT's step ends with the teacher's EMA update (one foreach kernel), outside the optimizer.
    after_step = model.update_teacher if method == "lut" else None
    return model, [view, torch.empty_like(view)], lambda m, a, b: m(a, b, MASK_RATIO)["loss"], after_step


@dataclasses.dataclass
class Record:
    method: str
    config: str
    model: str
    batch: int
    dtype: str
    mask_ratio: float
    flops: int
    hbm_bytes: int
    non_gemm_bytes: int
    launches: int
    activation_bytes: int
    peak_bytes: int
    resident_bytes: int
    projected_ms: float
    by_family: dict[str, dict[str, float]]
    by_phase: dict[str, dict[str, float]]
    top_ops: list[dict[str, Any]]
    count_seconds: float


def measure(config: str, model_name: str, batch: int, method: str = "mae") -> Record:
    start = time.perf_counter()
    MASKED_FRACTION["value"] = MASK_RATIO
    if method == "mae":
        size = SIZES[model_name]
        with torch.device("meta"):
            model = CONFIGS[config](size).to(DTYPE)
        imgs = torch.empty(batch, 3, size["img_size"], size["img_size"], device="meta", dtype=DTYPE)
        cost = count_step(model, [imgs], lambda m, x: m(x, mask_ratio=MASK_RATIO)[0])
    else:
        model, inputs, loss_fn, after_step = _method_step(method, model_name, config, batch)
        if method == "supmim":
            MASKED_FRACTION["value"] = model.mask_ratio
        cost = count_step(model, inputs, loss_fn, after_step=after_step)
    projected = cm.project(cost, H100_SXM)
    fields = ("flops", "bytes", "launches", "time_s")
    by_family = {f: {k: cost.by_family(k)[f] for k in fields} for f in cm.FAMILIES}
    by_phase = {p: {k: cost.total(k, phase=p) for k in fields} for p in ("forward", "backward", "optimizer")}
    op_time = cost.by_op("time_s")
    op_bytes = cost.by_op("bytes")
    op_launches = cost.by_op("launches")
    top = sorted(op_time, key=op_time.get, reverse=True)[:15]
    return Record(
        method=method, config=config, model=model_name, batch=batch, dtype=str(DTYPE).removeprefix("torch."),
        mask_ratio=MASK_RATIO if method != "supmim" else MASKED_FRACTION["value"],
        flops=int(cost.total("flops")), hbm_bytes=int(cost.total("bytes")),
        non_gemm_bytes=int(cost.total("bytes") - by_family["gemm"]["bytes"]), launches=int(cost.total("launches")),
        activation_bytes=cost.activation_bytes, peak_bytes=cost.peak_bytes, resident_bytes=cost.resident_bytes,
        projected_ms=projected * 1e3, by_family=by_family, by_phase=by_phase,
        top_ops=[{"op": k, "ms": op_time[k] * 1e3, "bytes": op_bytes[k], "launches": op_launches[k]} for k in top],
        count_seconds=time.perf_counter() - start)


def evaluate_targets(records: list[Record], model_name: str, method: str = "mae") -> list[dict[str, Any]]:
    by_config = {r.config: r for r in records if r.model == model_name and r.method == method}
    out = []
    for ours in ("fastmim", "fastmim_pred_masked_only"):
        if ours not in by_config:
            continue
        for metric, peer, bound in TARGETS:
            if peer not in by_config:
                continue
            mine, theirs = by_config[ours], by_config[peer]
            if metric == "speedup":
                value = theirs.projected_ms / mine.projected_ms
                met = None if bound is None else value >= bound
                rule = f"projected step time: {peer} / {ours}" + ("" if bound is None else f" >= {bound}")
            else:
                value = getattr(mine, metric) / getattr(theirs, metric)
                met = None if bound is None else value <= bound
                rule = f"{metric}: {ours} / {peer}" + ("" if bound is None else f" <= {bound}")
            out.append({"method": method, "model": model_name, "config": ours, "peer": peer, "metric": metric,
                        "value": value, "bound": bound, "met": met, "rule": rule})
    return out


def patch_gains(records: list[Record]) -> list[dict[str, Any]]:
    """``fastmim.patch``'s modelled gain: each patched configuration against the unpatched model."""
    by_key = {(r.method, r.model, r.config): r for r in records}
    out = []
    for r in records:
        peer = by_key.get((r.method, r.model, PATCHED.get(r.config, "")))
        if peer is None:
            continue
        out.append({"method": r.method, "model": r.model, "config": r.config, "peer": peer.config,
                    "speedup": peer.projected_ms / r.projected_ms,
                    "activation_ratio": r.activation_bytes / peer.activation_bytes,
                    "hbm_ratio": r.hbm_bytes / peer.hbm_bytes, "non_gemm_ratio": r.non_gemm_bytes / peer.non_gemm_bytes,
                    "launch_ratio": r.launches / peer.launches})
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def markdown(records: list[Record], targets: list[dict[str, Any]], env: dict[str, Any],
             gains: list[dict[str, Any]] = ()) -> str:
    lines = [
        "# Cost model of one training step per method (modelled, not measured)",
        "",
        f"Modelled on the meta device; roofline projection for {H100_SXM.name}: "
        f"{H100_SXM.tensor_core_flops['bfloat16'] / 1e12:.0f} TFLOP/s bf16 tensor-core (measured), "
        f"{H100_SXM.hbm_bytes_per_s / 1e12:.1f} TB/s HBM (measured, read + write), "
        f"{H100_SXM.launch_floor_s * 1e6:.1f} us per kernel launch floor (assumed); fastmim's Triton GEMMs at "
        f"{H100_SXM.triton_gemm_efficiency:.2f} of cuBLAS's throughput (published, see devices.py). "
        "Pure-bf16 parameters, inputs and optimizer state; fused AdamW. "
        f"torch {env['torch']}, triton {env['triton']}, commit {str(env['commit'])[:12]}"
        + (" (uncommitted changes)" if env.get("commit_dirty") else "") + f", {env['date']}.",
        "",
        "| method | model | config | batch | GFLOP | HBM GB | non-GEMM GB | launches | activations GB | peak GB "
        "| projected ms (H100) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r.method} | {r.model} | {r.config} | {r.batch} | {r.flops / 1e9:.0f} | {_gb(r.hbm_bytes)} | "
                     f"{_gb(r.non_gemm_bytes)} | {r.launches} | {_gb(r.activation_bytes)} | {_gb(r.peak_bytes)} | "
                     f"{r.projected_ms:.2f} |")
    family_tables = (("Bytes moved (GB)", lambda v: _gb(v["bytes"])),
                     ("Projected time (ms)", lambda v: f"{v['time_s'] * 1e3:.2f}"),
                     ("Launches", lambda v: f"{v['launches']:.0f}"))
    for title, cell in family_tables:
        lines += ["", f"## {title} by op family", "",
                  "| method | model | config | " + " | ".join(cm.FAMILY_LABELS[f] for f in cm.FAMILIES) + " |",
                  "|---|---|---|" + "---|" * len(cm.FAMILIES)]
        for r in records:
            lines.append(f"| {r.method} | {r.model} | {r.config} | "
                         + " | ".join(cell(r.by_family[f]) for f in cm.FAMILIES) + " |")
    if gains:
        lines += ["", "## fastmim.patch: modelled gain over the unpatched model", "",
                  "| method | model | config | over | projected speedup | activations | HBM bytes | non-GEMM bytes "
                  "| launches |", "|---|---|---|---|---|---|---|---|---|"]
        for g in gains:
            lines.append(f"| {g['method']} | {g['model']} | {g['config']} | {g['peer']} | {g['speedup']:.3f}x | "
                         f"{g['activation_ratio']:.3f}x | {g['hbm_ratio']:.3f}x | {g['non_gemm_ratio']:.3f}x | "
                         f"{g['launch_ratio']:.3f}x |")
    if targets:
        lines += ["", "## Targets", "",
                  "The bounds set for MAE ViT-B/16, applied to every row; `hbm_bytes` (all bytes, GEMMs "
                  "included) is reported, not a target. Triton GEMMs are charged at "
                  f"{H100_SXM.triton_gemm_efficiency:.2f} of cuBLAS's throughput (`benchmarks/costs/devices.py`).",
                  "", "| method | model | rule | value | met |", "|---|---|---|---|---|"]
        for t in targets:
            met = "(reported)" if t["met"] is None else ("yes" if t["met"] else "NO")
            lines.append(f"| {t['method']} | {t['model']} | {t['rule']} | {t['value']:.3f} | {met} |")
    return "\n".join(lines) + "\n"


def chart(records: list[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.method} {r.model}\n" + r.config.replace("_pred_masked_only", "\n+pred_masked_only") for r in records]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.9 * len(records)), 11))
    colors = plt.get_cmap("tab10").colors
    for ax, (field, scale, unit) in zip(axes, (("bytes", 1e9, "HBM GB moved"), ("time_s", 1e-3, "projected ms")),
                                        strict=True):
        bottom = [0.0] * len(records)
        for i, family in enumerate(cm.FAMILIES):
            values = [r.by_family[family][field] / scale for r in records]
            ax.bar(range(len(records)), values, bottom=bottom, label=cm.FAMILY_LABELS[family], color=colors[i])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xticks(range(len(records)), labels, fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(f"{unit} per training step (modelled, H100)" if field == "time_s" else
                     f"{unit} per training step (modelled)")
    axes[0].legend(fontsize=7)
    fig.suptitle("One training step per method, batch per model in the table, bf16: cost model (no GPU run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models (CI): checks the script runs")
    parser.add_argument("--output", type=Path, default=harness.RESULTS_DIR)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="MAE: comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--methods", default=",".join(("mae", *METHODS)),
                        help="comma-separated subset of mae," + ",".join(METHODS))
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    if importlib.util.find_spec("transformers") is None:  # the [hf] extra
        missing = [c for c in configs if c.startswith("hf_")]
        configs = [c for c in configs if c not in missing]
        if missing:
            print(f"transformers is not installed: skipping {', '.join(missing)}", flush=True)
    methods = [m for m in args.methods.split(",") if m]
    plan = [("smoke", 4)] if args.smoke else [("vit_b16", 256), ("vit_l16", 256)]
    records: list[Record] = []
    for model_name, batch in plan:
        runs = [("mae", c) for c in configs if "mae" in methods]
        runs += [(m, c) for m in METHODS if m in methods for c in METHOD_CONFIGS]
        for method, config in runs:
            record = measure(config, model_name, batch, method)
            records.append(record)
            print(f"{method} {model_name} {config}: {record.projected_ms:.2f} ms projected, {record.launches} "
                  f"launches, {_gb(record.hbm_bytes)} GB moved, {_gb(record.activation_bytes)} GB saved "
                  f"({record.count_seconds:.1f} s to count)", flush=True)
    targets = [t for model_name, _ in plan for method in methods for t in evaluate_targets(records, model_name, method)]
    gains = patch_gains(records)
    env = harness.environment("cpu")
    env.pop("device", None)
    env.pop("device_type", None)
    payload = {
        "benchmark": "cost_model",
        "kind": "smoke" if args.smoke else "modelled",
        "device_modelled": H100_SXM.name,
        "device_constants": dataclasses.asdict(H100_SXM),
        "precision": "bf16 parameters, inputs, gradients and AdamW state (pure bf16); activations as ops leave them",
        "optimizer": "AdamW fused (torch._fused_adamw_), two parameter groups (weight decay 0.05 / 0)",
        "environment": env,
        "records": [dataclasses.asdict(r) for r in records],
        "targets": targets,
        "patch_gains": gains,
    }
    stem = "cost_model-smoke" if args.smoke else "cost_model"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(records, targets, env, gains)
    (args.output / f"{stem}.md").write_text(table)
    chart(records, args.output / f"{stem}.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
