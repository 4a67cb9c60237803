"""Benchmark of masked_patch_mse (MAE's reconstruction loss), forward + backward.

Providers, per case, measured in the same run:
- ``fastmim-<backend>``: :func:`fastmim.ops.masked_patch_mse` (Triton on CUDA; on CPU the
  CPU path, or the Triton interpreter in ``--smoke`` runs under ``TRITON_INTERPRET=1``).
- ``eager``: the official MAE ``forward_loss`` (patchify, norm_pix, mean, mask) + autograd.
- ``compile``: ``torch.compile`` of that same function (inductor; ``aot_eager`` in smoke
  runs, which only check that the script works and time forward + backward only).

On CPU the providers of a case take turns call by call (``harness.time_providers``).

Cases: MAE ViT-B pretraining (B=256, 224x224, p=16) and small images (B=1024, 32x32, p=4),
mask ratio 0.75, decoder output ``pred`` in bf16 and images in fp32 on CUDA (as under
autocast), fp32 on CPU; each with every patch predicted (``full``) and with only the masked
patches predicted (``masked-only``: ``pred (B, K, N)`` + ``ids_masked``).

Bytes per case (the roofline figure, as the issue counts them): ``imgs`` and ``pred`` read
once (whole) and ``grad_pred`` written once; ``fwd`` cases (``pred`` not requiring grad) do
not count the gradient. ``extra.masked_rows_*``: the same figures counting only what a loss
must move at least: the image patches and ``pred`` rows of mask 1 (the fused kernel does not
read rows of weight 0), ``grad_pred`` and the mask. ``extra.speedup_vs_compile`` /
``extra.speedup_vs_eager`` of a fastmim record: the peer's time over ours in the same case.
Peak extra memory (CUDA): the most memory allocated during one call above what was allocated
before it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

from fastmim.ops import masked_patch_mse, masked_patch_mse_reference, patchify  # noqa: E402
from fastmim.ops._dispatch import backend_status, select_backend  # noqa: E402

MASK_RATIO = 0.75


def official_forward_loss(imgs, pred, mask, patch_size):
    """facebookresearch/mae ``forward_loss`` with ``norm_pix_loss=True``."""
    target = patchify(imgs, patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def selected_forward_loss(imgs, pred, ids_masked, patch_size):
    """The same loss with ``pred`` holding only the masked patches (eager gathers the target)."""
    return masked_patch_mse_reference(pred, imgs, None, patch_size=patch_size, ids_masked=ids_masked)


def make_case(batch, size, p, pred_dtype, imgs_dtype, device, masked_only):
    channels = 3
    num_patches = (size // p) ** 2
    num_masked = num_patches - int(num_patches * (1 - MASK_RATIO))
    n = p * p * channels
    imgs = torch.randn(batch, channels, size, size, device=device, dtype=imgs_dtype)
    ids_shuffle = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    ids_masked = ids_shuffle[:, num_patches - num_masked:]
    mask = torch.zeros(batch, num_patches, device=device).scatter_(1, ids_masked, 1.0)
    rows = num_masked if masked_only else num_patches
    pred = torch.randn(batch, rows, n, device=device, dtype=pred_dtype)
    grad_bytes = pred.numel() * pred.element_size()
    read_once = imgs.numel() * imgs.element_size() + pred.numel() * pred.element_size()
    masked_rows = batch * num_masked * n * (imgs.element_size() + pred.element_size()) \
        + mask.numel() * mask.element_size()
    return dict(pred=pred, imgs=imgs, mask=mask, ids_masked=ids_masked, read_once=read_once,
                masked_rows=masked_rows, grad_bytes=grad_bytes)


def providers(p, masked_only, smoke, device):
    def fastmim_fn(pred, imgs, mask, ids_masked):
        if masked_only:
            return masked_patch_mse(pred, imgs, None, patch_size=p, ids_masked=ids_masked)
        return masked_patch_mse(pred, imgs, mask, patch_size=p)

    def eager_fn(pred, imgs, mask, ids_masked):
        if masked_only:
            return selected_forward_loss(imgs, pred, ids_masked, p)
        return official_forward_loss(imgs, pred, mask, p)

    backend = select_backend("masked_patch_mse", torch.device(device), implemented=("reference", "triton"))
    if smoke and device == "cpu" and backend == "reference":
        if backend_status("cpu")["triton"] is None:  # the interpreter: exercise the kernel path
            backend = "triton"
    compile_backend = "aot_eager" if smoke else "inductor"
    csrc = {} if backend == "csrc" or backend_status(device)["csrc"] is not None else {
        "fastmim-csrc": (fastmim_fn, "csrc")}
    return {
        f"fastmim-{backend}": (fastmim_fn, backend),
        **csrc,  # the compiled C++/CUDA kernels, when fastmim._C is built
        "eager": (eager_fn, None),
        "compile": (torch.compile(eager_fn, backend=compile_backend, dynamic=False), None),
    }


def step(fn, with_grad):
    def run(pred, imgs, mask, ids_masked):
        if not with_grad:
            with torch.no_grad():
                return fn(pred, imgs, mask, ids_masked)
        loss = fn(pred, imgs, mask, ids_masked)
        return torch.autograd.grad(loss, pred)  # no accumulation into pred.grad

    return run


def peak_extra_mb(run, args, device):
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    pred_dtype = torch.bfloat16 if on_cuda else torch.float32
    imgs_dtype = torch.float32
    if args.smoke:
        shapes = [("vit-b-224-p16", 2, 32, 16), ("small-32-p4", 4, 16, 4)]
    elif on_cuda:
        shapes = [("vit-b-224-p16", 256, 224, 16), ("small-32-p4", 1024, 32, 4)]
    else:  # CPU timings at the tiny models' shapes
        shapes = [("vit-tiny-224-p16", 16, 224, 16), ("small-32-p4", 64, 32, 4)]
    ceilings = harness.measure_ceilings(device, smoke=args.smoke)
    records = []
    for label, batch, size, p in shapes:
        for masked_only in (False, True):
            arg_sets = []
            for _ in range(1 if on_cuda else 2):
                case = make_case(batch, size, p, pred_dtype, imgs_dtype, device, masked_only)
                arg_sets.append((case["pred"], case["imgs"], case["mask"], case["ids_masked"]))
            layout = "masked-only" if masked_only else "full"
            peers = providers(p, masked_only, args.smoke, device)
            for with_grad in (True,) if args.smoke else (True, False):
                name = f"{label}-{layout}-{'fwd+bwd' if with_grad else 'fwd'}"
                for pred, *_ in arg_sets:
                    pred.requires_grad_(with_grad)
                grad_bytes = case["grad_bytes"] if with_grad else 0
                bytes_moved = case["read_once"] + grad_bytes
                masked_rows_bytes = case["masked_rows"] + grad_bytes
                runs = {provider: harness.with_backend(step(fn, with_grad), backend)
                        for provider, (fn, backend) in peers.items()}
                times = harness.time_providers(runs, arg_sets, device=device, smoke=args.smoke, clock=args.clock)
                for provider, run in runs.items():
                    ms = times[provider]
                    peak = peak_extra_mb(run, arg_sets[0], device)
                    shape = dict(B=batch, C=3, H=size, W=size, p=p, mask_ratio=MASK_RATIO, layout=layout,
                                 pred_dtype=str(pred_dtype).removeprefix("torch."),
                                 imgs_dtype=str(imgs_dtype).removeprefix("torch."))
                    masked_rows_gbps = masked_rows_bytes / (ms * 1e-3) / 1e9
                    extra = {"peak_extra_mb": peak, "masked_rows_bytes": masked_rows_bytes,
                             "masked_rows_gbps": masked_rows_gbps,
                             "masked_rows_roofline_fraction": masked_rows_gbps / ceilings["copy_gbps"]}
                    records.append(harness.Record(name, provider, ms, shape, bytes_moved=bytes_moved, extra=extra))
    add_peer_speedups(records, peers=("compile", "eager"))
    notes = ("bytes = imgs and pred read once, grad_pred written once (fwd+bwd only); masked_rows_* count only the "
             "image patches and pred rows of mask 1, grad_pred and the mask; speedup_vs_<peer> = peer ms / fastmim "
             "ms in the same case; mask ratio 0.75; peak_extra_mb = peak allocation above the inputs during one call")
    harness.write_results("bench_loss", records, ceilings, args, notes=notes)


def add_peer_speedups(records, peers):
    """``extra["speedup_vs_<peer>"]`` of each fastmim record: the named peer's time over ours, same case."""
    by_case = {}
    for record in records:
        by_case.setdefault(record.name, {})[record.provider] = record
    for case in by_case.values():
        for provider, record in case.items():
            if not provider.startswith("fastmim"):
                continue
            for peer in peers:
                if peer in case:
                    record.extra[f"speedup_vs_{peer}"] = case[peer].ms / record.ms


if __name__ == "__main__":
    main()
