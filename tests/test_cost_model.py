"""The cost model of a training step, held to reality on CPU.

- FLOPs and activation bytes counted on the meta device equal those of a real CPU run of
  the same step, measured independently (``torch.utils.flop_counter.FlopCounterMode`` and a
  ``saved_tensors_hooks`` pair keyed by storage address);
- the accounting rules (bytes, launches, families, multi-tensor launches) on small cases
  worked out by hand.
"""

import sys
from pathlib import Path

import pytest
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from fastmim.testing import run_until_stalled

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from costs import counter as cm  # noqa: E402
from costs.devices import H100_SXM  # noqa: E402
from costs.step import FusedAdamW, count_step, mae_loss  # noqa: E402

aten = torch.ops.aten


class ToyMAE(nn.Module):
    """A tiny MAE as the official code writes it: argsort masking, timm blocks (SDPA), norm-pix loss."""

    def __init__(self, img=32, patch=8, dim=32, depth=2, heads=2, dec_dim=16, dec_depth=1):
        super().__init__()
        self.patch = patch
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dec_dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dec_dim) * 0.02, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, 2, 4.0, qkv_bias=True) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)

    def patchify(self, imgs):
        p = self.patch
        h = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, h, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * h, p * p * 3)

    def random_masking(self, x, mask_ratio):
        n, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(n, length, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_masked = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, :keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        return self.forward_loss(imgs, pred, mask), pred, mask


def _cpu_flash_flops(query, key, value, *args, out_val=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _measure_cpu_step(model, imgs):
    """FLOPs and saved-for-backward bytes of a real CPU step, with PyTorch's own instruments."""
    optimizer = FusedAdamW(model)
    mae_loss(model, imgs).backward()
    optimizer.step()
    optimizer.zero_grad()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    # PyTorch's CPU SDPA runs its flash kernel, which the flop counter has no entry for: give it torch's formula.
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as flop_counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = mae_loss(model, imgs)
        loss.backward()
        optimizer.step()
    return flop_counter.get_total_flops(), sum(saved.values())


@pytest.mark.parametrize("batch,depth", [(4, 2), (3, 1)])
def test_meta_flops_and_activation_bytes_equal_a_real_cpu_step(batch, depth):
    model = ToyMAE(depth=depth)
    imgs = torch.randn(batch, 3, 32, 32)
    with torch.device("meta"):
        meta_model = ToyMAE(depth=depth)
    cost = count_step(meta_model, [torch.empty_like(imgs, device="meta")])
    flops, activation_bytes = _measure_cpu_step(model, imgs)
    assert flops > 0
    assert cost.total("flops") == flops
    # The CUDA flash kernel also saves its RNG seed and offset (16 bytes each) that the CPU one does not.
    assert cost.activation_bytes == pytest.approx(activation_bytes, rel=0.01)


def test_sdpa_is_counted_as_the_flash_kernel_and_families_follow_the_regions():
    with torch.device("meta"):
        model = ToyMAE().to(torch.bfloat16)
    cost = count_step(model, [torch.empty(4, 3, 32, 32, device="meta", dtype=torch.bfloat16)])
    ops = {(r.phase, r.op): r for r in cost.ops}
    assert ("forward", "aten::_scaled_dot_product_flash_attention") in ops
    flash_bwd = ops[("backward", "aten::_scaled_dot_product_flash_attention_backward")]
    assert flash_bwd.launches == 3 and flash_bwd.family == "attention" and flash_bwd.tensor_core
    assert not any("bmm" in r.op or "_softmax" in r.op for r in cost.ops)
    families = {(r.phase, r.op.split("::")[1]): r.family for r in cost.ops}
    assert families[("forward", "sort")] == "masking"
    assert families[("forward", "var")] == "loss"  # inside forward_loss
    assert families[("backward", "pow")] == "loss"  # its backward, through the autograd node's region
    assert families[("forward", "native_layer_norm")] == "layernorm"
    assert families[("backward", "gelu_backward")] == "activation"
    assert families[("forward", "addmm")] == "gemm"
    assert families[("backward", "stack")] == "attention"  # timm's q, k, v unbind, in backward
    assert {r.family for r in cost.ops if r.phase == "optimizer"} == {"optimizer"}
    assert cost.activation_bytes > 0 and cost.peak_bytes > cost.resident_bytes > 0


def test_bytes_rules_on_hand_worked_ops():
    x = torch.empty(8, 16, device="meta")
    y = torch.empty(8, 16, device="meta")
    bias = torch.empty(16, device="meta")
    counter = cm.StepCounter()
    with counter.phase("forward"):
        z = x + y  # read 2, write 1
        z.add_(bias)  # read z and the bias, write z
        z.copy_(x)  # write-only destination
        w = x.t()  # a view: nothing
        z2 = x + bias.expand(8, 16)  # the broadcast bias is read once
        del w, z2
    b = 8 * 16 * 4
    assert [(r.op, r.bytes, r.launches) for r in counter.ops] == [
        ("aten::add", 3 * b, 1), ("aten::add_", 2 * b + 64, 1), ("aten::copy_", 2 * b, 1),
        ("aten::add", 2 * b + 64, 1)]


def test_multi_tensor_launches_follow_aten_limits():
    assert cm.multi_tensor_launches([10] * 36, depth=4) == 1
    assert cm.multi_tensor_launches([10] * 37, depth=4) == 2
    assert cm.multi_tensor_launches([65536 * 320], depth=4) == 1
    assert cm.multi_tensor_launches([65536 * 320 + 1], depth=4) == 2
    assert cm.multi_tensor_launches([0, 0], depth=1) == 0


def test_roofline_takes_the_slowest_of_compute_memory_and_launch():
    ops = [cm.OpRecord("aten::mm", "gemm", "forward", flops=int(790e12), bytes=0, launches=1, dtype="bfloat16",
                       tensor_core=True),
           cm.OpRecord("aten::add", "elementwise", "forward", flops=0, bytes=int(3e12), launches=1,
                       dtype="bfloat16", tensor_core=False),
           cm.OpRecord("aten::fill_", "elementwise", "forward", flops=0, bytes=4, launches=2, dtype="float32",
                       tensor_core=False)]
    cost = cm.StepCost(ops=ops, activation_bytes=0, peak_bytes=0, resident_bytes=0, saved_tensors=0)
    total = cm.project(cost, H100_SXM)
    assert ops[0].time_s == pytest.approx(1.0)
    assert ops[1].time_s == pytest.approx(1.0)
    assert ops[2].time_s == pytest.approx(2 * H100_SXM.launch_floor_s)
    assert total == pytest.approx(2.0 + 2 * H100_SXM.launch_floor_s)


def test_layer_norm_backward_is_charged_as_pytorch_runs_it_and_triton_gemms_at_their_efficiency():
    """PyTorch's CUDA LayerNorm backward: the dX row kernel, then the gamma/beta reduction reading dY and X
    again (two kernels; three, with partial sums, past 64K rows of a narrow row). A fastmim Triton GEMM
    computes at the stated fraction of the cuBLAS rate."""
    rows, cols = 64, 48
    x = torch.empty(rows, cols, device="meta", requires_grad=True)
    w = torch.empty(cols, device="meta", requires_grad=True)
    b = torch.empty(cols, device="meta", requires_grad=True)
    counter = cm.StepCounter()
    with counter.phase("forward"):
        y = torch.nn.functional.layer_norm(x, (cols,), w, b)
    with counter.phase("backward"):
        y.backward(torch.empty_like(y))
    (rec,) = [r for r in counter.ops if r.op == "aten::native_layer_norm_backward"]
    act, stats, param = rows * cols * 4, rows * 4, cols * 4
    row_kernel = 2 * act + 2 * stats + param + act  # dY, X, mean, rstd, gamma -> dX
    gamma_beta_kernel = 2 * act + 2 * stats + 2 * param  # dY, X, mean, rstd -> dgamma, dbeta
    assert (rec.launches, rec.bytes) == (2, row_kernel + gamma_beta_kernel)
    big = torch.empty(70000, 256, device="meta")
    args = (big, big, [256], torch.empty(70000, device="meta"), torch.empty(70000, device="meta"),
            torch.empty(256, device="meta"), torch.empty(256, device="meta"), [True, True, True])
    assert cm.LAUNCH_FORMULAS["aten::native_layer_norm_backward"](args, {}, None) == 3
    ops = [cm.OpRecord(op, "gemm", "forward", flops=int(790e12), bytes=0, launches=1, dtype="bfloat16",
                       tensor_core=True) for op in ("aten::mm", "fastmim::gemm_forward")]
    cm.project(cm.StepCost(ops=ops, activation_bytes=0, peak_bytes=0, resident_bytes=0, saved_tensors=0), H100_SXM)
    assert "fastmim::gemm_forward" in cm.TRITON_GEMM_OPS and 0 < H100_SXM.triton_gemm_efficiency <= 1
    assert ops[0].time_s == pytest.approx(1.0)
    assert ops[1].time_s == pytest.approx(1.0 / H100_SXM.triton_gemm_efficiency)
    assert "triton_gemm_efficiency" in H100_SXM.sources


# --------------------------------------------------------------------------------------------
# Each fused Triton kernel against what the cost model charges it
# --------------------------------------------------------------------------------------------
# One row per use of a fastmim op as the models call it: a builder of the call on small CPU
# tensors (forward, then backward with a random gradient), and the kernel arguments that
# every program re-reads and that therefore come from cache after the first read (counted
# once per distinct element). Add a row when a kernel lands.

B, L, K, D = 3, 16, 4, 32  # L patches of 8x8x3 in a 32x32 image; K visible


def _masking():
    from fastmim.ops import random_masking

    return random_masking(B, L, 0.75, seed=1)


def _call_random_masking():
    return _masking().mask, []


def _call_gather_visible():
    from fastmim.ops import gather_visible

    x = torch.randn(B, L, D, requires_grad=True)
    cls = torch.randn(1, 1, D, requires_grad=True)
    pos = torch.randn(1, L + 1, D)
    return gather_visible(x, _masking().ids_keep, pos, cls_token=cls), [x, cls]


def _call_unshuffle():
    from fastmim.ops import unshuffle

    m = _masking()
    x = torch.randn(B, K + 1, D, requires_grad=True)
    mask_token = torch.randn(1, 1, D, requires_grad=True)
    return unshuffle(x, m.ids_restore, mask_token, torch.randn(1, L + 1, D), has_cls=True), [x, mask_token]


def _call_masked_patch_mse_dense():
    from fastmim.ops import masked_patch_mse

    pred = torch.randn(B, L, 8 * 8 * 3, requires_grad=True)
    return masked_patch_mse(pred, torch.randn(B, 3, 32, 32), _masking().mask, patch_size=8), [pred]


def _call_masked_patch_mse_masked_only():
    from fastmim.models.mae import MaskedAutoencoderViT
    from fastmim.ops import masked_patch_mse

    m = _masking()
    ids_masked = MaskedAutoencoderViT.masked_ids(m.mask, K)
    pred = torch.randn(B, L - K, 8 * 8 * 3, requires_grad=True)
    return masked_patch_mse(pred, torch.randn(B, 3, 32, 32), None, patch_size=8, ids_masked=ids_masked), [pred]


def _call_visible_attention_strided():
    """q, k, v strided views of one qkv tensor, the output transposed back."""
    from fastmim.ops.attention import visible_attention

    qkv = torch.randn(2, K + 1, 3, 2, 16, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return visible_attention(q, k, v).transpose(1, 2).reshape(2, K + 1, 32), [qkv]


def _call_visible_attention_qkvpacked(varlen=False):
    """As the models' attention module calls it: the qkv projection packed, the output token-major."""
    from fastmim.ops.attention import visible_attention_qkvpacked

    if varlen:
        qkv = torch.randn(11, 3, 2, 16, requires_grad=True)
        cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
        return visible_attention_qkvpacked(qkv, cu_seqlens=cu, max_seqlen=7).reshape(11, 32), [qkv]
    qkv = torch.randn(2, K + 1, 3, 2, 16, requires_grad=True)
    return visible_attention_qkvpacked(qkv).reshape(2, K + 1, 32), [qkv]


def _call_visible_attention(n=K + 1, head_dim=16, dtype=torch.float32):
    from fastmim.ops.attention import visible_attention

    q, k, v = (torch.randn(2, 2, n, head_dim).to(dtype).requires_grad_() for _ in range(3))
    return visible_attention(q, k, v), [q, k, v]


def _call_layer_norm():
    from fastmim.ops import layer_norm

    x, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((B, K + 1, D), (D,), (D,)))
    return layer_norm(x, w, b, 1e-6), [x, w, b]


def _call_add_layer_norm():
    from fastmim.ops import add_layer_norm

    x, r, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((B, K + 1, D), (B, K + 1, D), (D,), (D,)))
    s, y = add_layer_norm(x, r, w, b, 1e-6)
    return 2 * s + y, [x, r, w, b]  # both outputs reach the loss with their own gradients, as in the block


def _call_bias_gelu():
    from fastmim.ops import bias_gelu

    x, b = torch.randn(B, K + 1, 4 * D, requires_grad=True), torch.randn(4 * D, requires_grad=True)
    return bias_gelu(x, b), [x, b]


def _call_bias_gelu_linear():
    from fastmim.ops import bias_gelu_linear

    x, b = torch.randn(B, K + 1, 4 * D, requires_grad=True), torch.randn(4 * D, requires_grad=True)
    w, wb = torch.randn(D, 4 * D, requires_grad=True), torch.randn(D, requires_grad=True)
    return bias_gelu_linear(x, b, w, wb), [x, b, w, wb]  # backward recomputes the activation


def _call_add_layer_norm_linear():
    from fastmim.ops import add_layer_norm_linear

    x, r, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((B, K + 1, D), (B, K + 1, D), (D,), (D,)))
    lw = torch.randn(4 * D, D, requires_grad=True)
    s, out = add_layer_norm_linear(x, r, w, b, 1e-6, lw)
    return out, [x, r, w, b, lw]  # backward recomputes the normalised tensor


def _block_half_params(c, hidden):
    """The affine and linear parameters of a block's half at width ``c`` (hidden ``hidden``), requiring grad."""
    def p(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).requires_grad_()
    return p(c), p(c), p(hidden, c, scale=c**-0.5), p(hidden), p(c, hidden, scale=hidden**-0.5), p(c)


def _call_norm_mlp_add(c=D, hidden=4 * D, rows=(B, K + 1)):
    """A block's second half: fc1 (LayerNorm prologue, bias + GELU epilogue), fc2 (bias, residual and
    row-statistics epilogue); backward: dGELU epilogue, two weight gradients with prologues, LayerNorm rows."""
    from fastmim.ops import norm_mlp_add

    x = torch.randn(*rows, c, requires_grad=True)
    params = _block_half_params(c, hidden)
    return norm_mlp_add(x, None, params[0], params[1], 1e-6, *params[2:])[0], [x, *params]


def _call_norm_linear_linear_add(c=D, rows=(B, K + 1)):
    """A block's first half around the attention: qkv (LayerNorm prologue), proj (bias, residual, statistics)."""
    from fastmim.ops import linear_add, norm_linear

    x = torch.randn(*rows, c, requires_grad=True)
    nw, nb, qw, qb, pw, pb = _block_half_params(c, 3 * c)
    xv, qkv = norm_linear(x, None, nw, nb, 1e-6, qw, qb)
    return linear_add(qkv, pw, pb, xv)[0], [x, nw, nb, qw, qb, pw, pb]


# Small operands every program reads (a seed, a position table, a token, a scalar).
SHARED = {"seed_ptr", "offset_ptr", "pos_ptr", "cls_ptr", "mask_token_ptr", "weight_sum_ptr", "grad_output_ptr"}
# The affine parameters and the bias every row program of a fused_block kernel reads; a GEMM's operand
# tiles, re-read across its programs (from L2, as cuBLAS's GEMMs are charged: each operand once), and the
# per-row vectors of its prologues.
FUSED_BLOCK = {"W", "B", "A", "BIAS", "GAMMA", "BETA", "MEAN", "RSTD", "STATS_IN"}
# Flash attention re-reads a head's K and V for each query block (and, in backward, its Q, dO, lse
# and delta for each key block): one head's slice is at most N x D = 256 x 128 elements, in L2 while
# that head's blocks run, so its HBM traffic is the distinct bytes.
FLASH = {"Q", "K", "V", "O", "DO", "LSE", "DELTA", "KIDX", "KMASK", "CU"}
KERNEL_CASES = {
    "random_masking": (_call_random_masking, SHARED),
    "gather_visible": (_call_gather_visible, SHARED),
    "unshuffle": (_call_unshuffle, SHARED),
    "masked_patch_mse_dense": (_call_masked_patch_mse_dense, SHARED),
    "masked_patch_mse_masked_only": (_call_masked_patch_mse_masked_only, SHARED),
    "visible_attention": (_call_visible_attention, FLASH),
    "visible_attention_strided": (_call_visible_attention_strided, FLASH),
    "visible_attention_qkvpacked": (_call_visible_attention_qkvpacked, FLASH),
    "visible_attention_qkvpacked_varlen": (lambda: _call_visible_attention_qkvpacked(varlen=True), FLASH),
    "layer_norm": (_call_layer_norm, FUSED_BLOCK),
    "add_layer_norm": (_call_add_layer_norm, FUSED_BLOCK),
    "bias_gelu": (_call_bias_gelu, FUSED_BLOCK),
    "bias_gelu_linear": (_call_bias_gelu_linear, FUSED_BLOCK),
    "add_layer_norm_linear": (_call_add_layer_norm_linear, FUSED_BLOCK),
    # keys over one block: three backward kernels
    "visible_attention_long": (lambda: _call_visible_attention(n=150), FLASH),
    # the MAE decoder's attention (197 tokens, head dim 32, bf16): one backward kernel, every key on chip
    "visible_attention_decoder": (lambda: _call_visible_attention(n=197, head_dim=32, dtype=torch.bfloat16),
                                  FLASH),
    "norm_mlp_add": (_call_norm_mlp_add, FUSED_BLOCK),
    "norm_linear_linear_add": (_call_norm_linear_linear_add, FUSED_BLOCK),
    # at a real layer width (ViT-B: 768, MLP 3072), a tiny batch (2 samples of 5 tokens)
    "norm_mlp_add_vit_b": (lambda: _call_norm_mlp_add(768, 3072, (2, 5)), FUSED_BLOCK),
    "norm_linear_linear_add_vit_b": (lambda: _call_norm_linear_linear_add(768, (2, 5)), FUSED_BLOCK),
}


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_triton_kernels_move_the_bytes_and_launch_the_kernels_the_model_charges(case):
    from costs.fastmim_ops import MASKED_FRACTION
    from costs.triton_traffic import ImplementationCounter

    from fastmim.ops import use_backend

    if not torch.cuda.is_available():
        from fastmim.ops._dispatch import triton_interpret

        if not triton_interpret():
            pytest.skip("needs TRITON_INTERPRET=1 (set by conftest before triton is imported)")
    call, cached = KERNEL_CASES[case]
    counter = cm.StepCounter()
    with use_backend("triton"), ImplementationCounter() as implementation:
        with counter.phase("forward"):
            try:
                out, leaves = call()
            except ImportError as exc:  # pragma: no cover
                pytest.skip(str(exc))
            out = out[0] if isinstance(out, tuple) else out
            MASKED_FRACTION["value"] = 0.75
        if leaves:
            grad = torch.randn_like(out)
            with counter.phase("backward"):
                out.backward(grad)
    charged = [r for r in counter.ops if r.op.startswith("fastmim::")]
    assert [r.op.removeprefix("fastmim::") for r in charged] == [name for name, _, _ in implementation.calls]
    assert charged, "no fastmim op ran"
    for record, (name, launches, traffic) in zip(charged, implementation.calls, strict=True):
        assert traffic.launches, f"{name} launched no Triton kernel"
        moved = traffic.hbm_bytes(cached=cached)
        assert record.bytes == pytest.approx(moved, rel=0.10), (
            f"{name}: charged {record.bytes} B, kernels moved {moved} B: "
            + str({(lt.kernel, a): (t.loaded, t.stored, t.distinct) for lt in traffic.launches
                   for a, t in lt.args.items()}))
        assert record.launches == launches, f"{name}: charged {record.launches} launches, ran {launches}"


def test_cost_model_script_runs_in_smoke_mode(tmp_path):
    import importlib.util
    import json

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cost_model.py"
    proc = run_until_stalled([sys.executable, str(script), "--smoke", "--output", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads((tmp_path / "cost_model-smoke.json").read_text())
    assert payload["kind"] == "smoke"
    configs = {(r["method"], r["config"]) for r in payload["records"]}
    patched = {"official_patched"} | ({"hf_vitmae_patched"} if importlib.util.find_spec("transformers") else set())
    assert {("mae", c) for c in ("official", "eager_sdpa", "fastmim", "fastmim_pred_masked_only", *patched)} <= configs
    gains = {g["config"]: g for g in payload["patch_gains"]}
    assert gains.keys() == patched
    assert all(g["speedup"] > 1 and g["launch_ratio"] < 1 for g in gains.values())
    assert {(m, c) for m in ("supmim", "cmae", "lut") for c in ("eager_sdpa", "fastmim")} <= configs
    assert {(t["method"], t["peer"]) for t in payload["targets"]} >= {("lut", "eager_sdpa"), ("mae", "official")}
    for r in payload["records"]:
        for key in ("flops", "hbm_bytes", "launches", "activation_bytes", "peak_bytes", "projected_ms"):
            assert r[key] > 0, (r["config"], key)
        assert set(r["by_family"]) == set(cm.FAMILIES)
        assert sum(f["bytes"] for f in r["by_family"].values()) == pytest.approx(r["hbm_bytes"])
    assert (tmp_path / "cost_model-smoke.md").read_text().startswith("# Cost model")
    assert (tmp_path / "cost_model-smoke.png").stat().st_size > 0
