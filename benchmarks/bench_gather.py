"""Benchmark of the gather ops: MAE's encoder masking + gather and decoder un-shuffle, forward and forward + backward.

Cases (MAE pretraining shapes, B=256, L=196 patches of a 224x224 image, mask ratio 0.75, K=49):
- ``encoder-D<D>`` (D = 768 ViT-B, 1024 ViT-L): random masking + gather of the visible tokens +
  position embedding + cls token. fastmim: ``random_masking`` + ``gather_visible(x, ids_keep,
  pos_embed, cls_token=cls_token)``; peers: the official MAE chain (``x + pos_embed[:, 1:]``,
  ``torch.rand`` noise, two ``argsort``, ``gather``, mask ``gather``, cls ``cat``). The masking
  alone is ``benchmarks/bench_masking.py``; here it is counted as the official chain does it.
- ``decoder-D<D>`` (D = 512, the MAE decoder width, and 768/1024): the decoder input,
  ``unshuffle(x, ids_restore, mask_token, decoder_pos_embed, has_cls=True)``; peer: the official
  ``cat`` with mask tokens, ``gather`` with ``ids_restore``, ``cat`` cls, ``+ decoder_pos_embed``.

Providers measured in the same run: ``fastmim-<backend>`` (Triton on CUDA; on CPU the CPU path,
or the Triton interpreter in ``--smoke`` runs under ``TRITON_INTERPRET=1``), ``eager`` (the
official chain), ``compile`` (``torch.compile`` of that chain: inductor; ``aot_eager`` in smoke
runs, which only check that the script works). Tensors are bf16 on CUDA (activations and the
parameters, so every provider moves the same bytes), fp32 on CPU. ``fwd+bwd`` takes the
gradient of the tokens and of every parameter (pos_embed, cls_token / mask_token).

Bytes per case: what the op must move at least, the same figure for every provider: encoder
forward reads the kept rows of ``x`` (``B*K*D``), ``pos_embed`` and ``cls_token`` once, writes
``(B, K+1, D)`` and the masking outputs (``ids_keep`` int64, ``ids_restore`` int64, ``mask``
fp32); its backward reads ``grad_out (B, K+1, D)`` and ``ids_keep``, writes ``grad_x (B, L, D)``
(zeros included: the gradient is dense) and the parameter gradients. Decoder forward reads
``(B, K+1, D)``, ``ids_restore``, ``pos_embed``, ``mask_token``, writes ``(B, L+1, D)``; its
backward reads ``grad_out (B, L+1, D)`` and ``ids_restore``, writes ``grad_x (B, K+1, D)`` and
the parameter gradients. The eager chain moves several times more (``x + pos`` over all L
rows, the noise, the sorts, the concatenations).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from peers.official_mae import MaskedAutoencoderViT as OfficialMAE  # noqa: E402

from fastmim.ops import gather_visible, random_masking, unshuffle  # noqa: E402
from fastmim.ops._dispatch import backend_status, select_backend  # noqa: E402

MASK_RATIO = 0.75


# ----------------------------------------------------------------------------- the official chains


def official_encoder_masking(x, pos_embed, cls_token, mask_ratio):
    """facebookresearch/mae ``forward_encoder`` from ``x + pos_embed`` to the cls ``cat``."""
    x = x + pos_embed[:, 1:, :]
    # the peer's random_masking (torch.rand noise, argsort, gather) reads nothing from the model
    x, mask, ids_restore = OfficialMAE.random_masking(None, x, mask_ratio)
    cls = cls_token + pos_embed[:, :1, :]
    x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
    return x, mask, ids_restore


def official_decoder_unshuffle(x, ids_restore, mask_token, decoder_pos_embed):
    """facebookresearch/mae ``forward_decoder`` from the mask tokens to ``+ decoder_pos_embed``."""
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + decoder_pos_embed


def fastmim_encoder(x, pos_embed, cls_token, mask_ratio):
    B, L, _ = x.shape
    m = random_masking(B, L, mask_ratio, device=x.device)
    return gather_visible(x, m.ids_keep, pos_embed, cls_token=cls_token), m.mask, m.ids_restore


def fastmim_decoder(x, ids_restore, mask_token, decoder_pos_embed):
    return unshuffle(x, ids_restore, mask_token, decoder_pos_embed, has_cls=True)


# ----------------------------------------------------------------------------- cases


def encoder_case(B, L, D, dtype, device):
    K = int(L * (1 - MASK_RATIO))
    e = torch.empty((), dtype=dtype).element_size()
    fwd = (B * K * D + (L + 1) * D + D + B * (K + 1) * D) * e + B * K * 8 + B * L * 8 + B * L * 4
    bwd = (B * (K + 1) * D + B * L * D + (L + 1) * D + D) * e + B * K * 8

    def make():
        return (torch.randn(B, L, D, device=device, dtype=dtype), torch.randn(1, L + 1, D, device=device, dtype=dtype),
                torch.randn(1, 1, D, device=device, dtype=dtype))

    return make, fwd, bwd


def decoder_case(B, L, D, dtype, device):
    K = int(L * (1 - MASK_RATIO))
    e = torch.empty((), dtype=dtype).element_size()
    fwd = (B * (K + 1) * D + (L + 1) * D + D + B * (L + 1) * D) * e + B * L * 8
    bwd = (B * (L + 1) * D + B * (K + 1) * D + (L + 1) * D + D) * e + B * L * 8

    def make():
        ids_restore = random_masking(B, L, MASK_RATIO, device=device).ids_restore
        return (torch.randn(B, K + 1, D, device=device, dtype=dtype), ids_restore,
                torch.randn(1, 1, D, device=device, dtype=dtype), torch.randn(1, L + 1, D, device=device, dtype=dtype))

    return make, fwd, bwd


def step(fn, kind, with_grad):
    """One call: forward only (no_grad) or forward + backward of the tokens and parameters."""
    def run(*args):
        if not with_grad:
            with torch.no_grad():
                return fn(*args)
        out = fn(*args)
        out = out[0] if kind == "encoder" else out
        leaves = [a for a in args if a.is_floating_point()]
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def providers(kind, smoke, device):
    op = "gather_visible" if kind == "encoder" else "unshuffle"
    backend = select_backend(op, torch.device(device))
    if smoke and torch.device(device).type == "cpu" and backend_status("cpu")["triton"] is None:
        backend = "triton"  # the interpreter: exercise the kernel path
    ours = fastmim_encoder if kind == "encoder" else fastmim_decoder
    if kind == "encoder":
        def eager(x, pos, cls):
            return official_encoder_masking(x, pos, cls, MASK_RATIO)

        def fast(x, pos, cls):
            return ours(x, pos, cls, MASK_RATIO)
    else:
        eager, fast = official_decoder_unshuffle, ours
    return harness.op_providers(fast, eager, backend, device, smoke)


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    if args.smoke:
        B, L, enc_dims, dec_dims = 2, 16, (32,), (32,)
    elif on_cuda:
        B, L, enc_dims, dec_dims = 256, 196, (768, 1024), (512, 768, 1024)
    else:  # CPU timings at the tiny model's shapes (ViT-Tiny/16 at 224 px, batch 16)
        B, L, enc_dims, dec_dims = 16, 196, (192,), (128,)
    ceilings = harness.measure_ceilings(device, smoke=args.smoke)
    records = []
    cases = [("encoder", D) for D in enc_dims] + [("decoder", D) for D in dec_dims]
    for kind, D in cases:
        make, fwd_bytes, bwd_bytes = (encoder_case if kind == "encoder" else decoder_case)(B, L, D, dtype, device)
        arg_sets = [make() for _ in range(1 if on_cuda else 2)]
        for with_grad in (False, True):
            for args_ in arg_sets:
                for a in args_:
                    if a.is_floating_point():
                        a.requires_grad_(with_grad)
            name = f"{kind}-D{D}-{'fwd+bwd' if with_grad else 'fwd'}"
            bytes_moved = fwd_bytes + (bwd_bytes if with_grad else 0)
            runs = {provider: harness.with_backend(step(fn, kind, with_grad), backend)
                    for provider, (fn, backend) in providers(kind, args.smoke, device).items()}
            times = harness.time_providers(runs, arg_sets, device=device, smoke=args.smoke, clock=args.clock)
            for provider, ms in times.items():
                shape = dict(B=B, L=L, D=D, K=int(L * (1 - MASK_RATIO)), mask_ratio=MASK_RATIO,
                             dtype=str(dtype).removeprefix("torch."), cls=True)
                records.append(harness.Record(name, provider, ms, shape, bytes_moved=bytes_moved))
    notes = ("bytes = the minimum each op must move (kept rows read, outputs and gradients written once, "
             "indices and mask), the same for every provider; mask ratio 0.75, cls token and (1, L+1, D) "
             "pos_embed as in the official MAE; fwd+bwd = forward + gradients of tokens and parameters")
    harness.write_results("bench_gather", records, ceilings, args, notes=notes)


if __name__ == "__main__":
    main()
