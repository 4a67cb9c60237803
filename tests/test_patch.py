"""fastmim.patch / fastmim.unpatch on the official MAE, transformers' ViTMAE / ViT and timm's ViT.

Each patched model is compared with an unpatched copy: same masks from the same RNG state (or the
same ``noise=``), same loss and outputs, same gradients (fp32, 1e-5 relative), on the CPU path
and on the fused-block path (Triton kernels forced, through the interpreter); what the patch
cannot take is left as it was and reported; unpatch restores the classes; torch.compile
(fullgraph), a one-process gloo DDP and bf16 autocast run the patched model.
"""

import copy
import io
import logging
import pickle
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import fastmim
import fastmim.models
from fastmim.models.patching import ATTENTION, BLOCK, CHAIN, LOSS, MASKING, UNSHUFFLE, PatchReport
from fastmim.ops import use_backend
from fastmim.testing import assert_rel_close, rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peers.official_mae import MaskedAutoencoderViT as Official  # noqa: E402

try:
    import transformers
except ImportError:  # the [hf] extra: the tests of transformers' models skip without it
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers (pip install fastmim[hf])")

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def official(**kwargs) -> nn.Module:
    return Official(**{**TINY, **kwargs})


def hf_vitmae(cls_name: str = "ViTMAEForPreTraining", **kwargs) -> nn.Module:
    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=16, patch_size=4, decoder_hidden_size=16,
                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                       decoder_intermediate_size=32, **kwargs)
    return getattr(transformers, cls_name)(config)


def hf_vit(**kwargs) -> nn.Module:
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=16, patch_size=4, **kwargs)
    return transformers.ViTModel(config)


def timm_vit(**kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10, **kwargs)


def patched_copy(model: nn.Module, **kwargs) -> tuple[nn.Module, PatchReport]:
    return fastmim.patch(copy.deepcopy(model), return_report=True, **kwargs)


def assert_grads_close(model: nn.Module, ref: nn.Module, tol: float = 1e-5) -> None:
    """Every gradient within ``tol`` relative; gradients that are zero up to rounding (the key bias of
    attention) are compared against the scale of all gradients instead of their own."""
    grads = dict(model.named_parameters())
    scale = max(p.grad.norm().item() for p in ref.parameters() if p.grad is not None)
    for name, p in ref.named_parameters():
        got = grads[name].grad
        if p.grad is None:
            assert got is None, name
            continue
        if p.grad.norm() < 1e-6 * scale:
            assert (got - p.grad).norm() <= tol * scale, name
        else:
            assert_rel_close(got, p.grad, tol=tol, name=f"grad {name}")


def assert_same_state_dict(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------- official MAE


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_official_mae_same_masks_loss_outputs_and_gradients(norm_pix_loss):
    ref = official(norm_pix_loss=norm_pix_loss)
    model, report = patched_copy(ref)
    assert_same_state_dict(model, ref)
    assert {what for _, what in report.patched} == {ATTENTION, BLOCK, MASKING, UNSHUFFLE, LOSS}
    assert report.left == () and report.verified and report.kind == "official MAE"
    imgs = torch.randn(3, 3, 16, 16)
    torch.manual_seed(7)
    loss_ref, pred_ref, mask_ref = ref(imgs)  # masks from torch.rand, as the official code draws them
    torch.manual_seed(7)
    loss, pred, mask = model(imgs)
    assert torch.equal(mask, mask_ref)
    assert_rel_close(loss, loss_ref, tol=1e-5, name="loss")
    assert_rel_close(pred, pred_ref, tol=1e-5, name="pred")
    loss_ref.backward()
    loss.backward()
    assert_grads_close(model, ref)
    noise = torch.rand(3, 16)
    assert torch.equal(model(imgs, 0.5, noise)[2], ref(imgs, 0.5, noise)[2])


def test_official_mae_fused_block_path_matches():
    """The fused blocks (Triton's LayerNorm / GELU kernels, forced on CPU through the interpreter) and
    the residual stream passed as two terms: same loss and gradients."""
    ref = official(depth=2, decoder_depth=1)
    model, _ = patched_copy(ref)
    imgs = torch.randn(2, 3, 16, 16)
    torch.manual_seed(3)
    loss_ref, pred_ref, mask_ref = ref(imgs)
    loss_ref.backward()
    with use_backend("triton"):
        assert model.blocks[0].fusable(imgs.new_zeros(1, 5, 32))
        torch.manual_seed(3)
        loss, pred, mask = model(imgs)
        loss.backward()
    assert torch.equal(mask, mask_ref)
    assert_rel_close(loss, loss_ref, tol=1e-5, name="loss")
    assert_rel_close(pred, pred_ref, tol=1e-5, name="pred")
    assert_grads_close(model, ref)


def test_checkpoints_load_both_ways():
    ref = official()
    model = fastmim.patch(official())
    model.load_state_dict(ref.state_dict())  # strict
    other = official()
    other.load_state_dict(model.state_dict())
    assert_same_state_dict(other, ref)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    assert_rel_close(model(imgs, 0.75, noise)[0], ref(imgs, 0.75, noise)[0], tol=1e-5)


def test_a_changed_method_is_left_and_the_rest_patched(caplog):
    class WeightedLoss(Official):
        def forward_loss(self, imgs, pred, mask):
            return 2 * super().forward_loss(imgs, pred, mask)

    ref = WeightedLoss(**TINY)
    with caplog.at_level(logging.INFO, logger="fastmim.patch"):
        model, report = patched_copy(ref)
    assert [p for p, _ in report.left] == [":forward_loss"] and "probe input" in report.left[0][1]
    assert (":forward_loss", LOSS) not in report.patched and (":forward_encoder", MASKING) in report.patched
    records = [r for r in caplog.records if r.name == "fastmim.patch"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "forward_loss" in records[0].getMessage() and "un-shuffle" in records[0].getMessage()
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    assert_rel_close(model(imgs, 0.75, noise)[0], ref(imgs, 0.75, noise)[0], tol=1e-5)


def test_patch_leaves_the_rng_and_training_mode_as_they_were():
    model = official().train()
    model.decoder_blocks[0].eval()
    state = torch.get_rng_state()
    fastmim.patch(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and model.blocks[0].training and not model.decoder_blocks[0].training


# ---------------------------------------------------------------------------------- transformers


@needs_hf
def test_hf_vitmae_same_masks_loss_outputs_and_gradients():
    torch.manual_seed(0)
    ref = hf_vitmae(norm_pix_loss=True)
    model, report = patched_copy(ref)
    assert_same_state_dict(model, ref)
    assert {what for _, what in report.patched} == {ATTENTION, BLOCK, MASKING, UNSHUFFLE, LOSS} and not report.left
    imgs = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    out_ref = ref(imgs, noise=noise, output_hidden_states=True)
    out = model(imgs, noise=noise, output_hidden_states=True)
    assert torch.equal(out.mask, out_ref.mask) and torch.equal(out.ids_restore, out_ref.ids_restore)
    assert_rel_close(out.loss, out_ref.loss, tol=1e-5, name="loss")
    assert_rel_close(out.logits, out_ref.logits, tol=1e-5, name="logits")
    assert len(out.hidden_states) == len(out_ref.hidden_states)  # the layers' hooks still fire
    for h, h_ref in zip(out.hidden_states, out_ref.hidden_states, strict=True):
        assert_rel_close(h, h_ref, tol=1e-5, name="hidden state")
    out_ref.loss.backward()
    out.loss.backward()
    assert_grads_close(model, ref)
    torch.manual_seed(11)  # no noise: the same torch.rand draw
    mask_ref = ref(imgs).mask
    torch.manual_seed(11)
    assert torch.equal(model(imgs).mask, mask_ref)
    assert isinstance(model(imgs, noise=noise, return_dict=False), tuple)


@needs_hf
def test_hf_vitmae_fused_block_path_matches():
    torch.manual_seed(0)
    ref = hf_vitmae(norm_pix_loss=False)
    model, _ = patched_copy(ref)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    out_ref = ref(imgs, noise=noise)
    out_ref.loss.backward()
    with use_backend("triton"):
        out = model(imgs, noise=noise)
        out.loss.backward()
    assert_rel_close(out.loss, out_ref.loss, tol=1e-5, name="loss")
    assert_grads_close(model, ref)


@needs_hf
def test_hf_vitmae_model_and_vit_model_outputs_and_gradients():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16)
    for ref, expected in ((hf_vitmae("ViTMAEModel"), {ATTENTION, BLOCK, MASKING}), (hf_vit(), {ATTENTION, BLOCK})):
        model, report = patched_copy(ref)
        assert {what for _, what in report.patched} == expected and not report.left
        kwargs = {"noise": torch.rand(2, 16)} if MASKING in expected else {}
        out_ref, out = ref(imgs, **kwargs).last_hidden_state, model(imgs, **kwargs).last_hidden_state
        assert_rel_close(out, out_ref, tol=1e-5)
        out_ref.square().sum().backward()
        out.square().sum().backward()
        assert_grads_close(model, ref)


@needs_hf
def test_hf_attention_mask_and_dropout_take_the_original_forward():
    torch.manual_seed(0)
    ref = hf_vit(attention_probs_dropout_prob=0.1)
    model, report = patched_copy(ref)
    assert not report.left
    imgs = torch.randn(2, 3, 16, 16)
    ref.train()
    model.train()
    torch.manual_seed(5)
    out_ref = ref(imgs).last_hidden_state
    torch.manual_seed(5)  # the original attention runs, dropout included: the same draws
    assert_rel_close(model(imgs).last_hidden_state, out_ref, tol=1e-5)


# ---------------------------------------------------------------------------------- timm


def test_timm_vit_outputs_and_gradients():
    torch.manual_seed(0)
    ref = timm_vit(init_values=1e-1, drop_path_rate=0.1)
    model, report = patched_copy(ref)
    assert {what for _, what in report.patched} == {ATTENTION, BLOCK, CHAIN} and not report.left
    imgs = torch.randn(2, 3, 16, 16)
    torch.manual_seed(2)  # training mode: drop path draws the same numbers
    out_ref = ref(imgs)
    torch.manual_seed(2)
    out = model(imgs)
    assert_rel_close(out, out_ref, tol=1e-5)
    out_ref.sum().backward()
    out.sum().backward()
    assert_grads_close(model, ref)
    with use_backend("triton"):
        ref.eval()
        model.eval()
        assert_rel_close(model(imgs), ref(imgs), tol=1e-5)


def test_timm_block_and_attention_alone():
    from timm.models.vision_transformer import Block

    block = Block(32, 2, qkv_bias=True)
    model, report = patched_copy(block)
    assert report.kind == "timm Block" and dict(report.patched) == {"attn": ATTENTION, "": BLOCK}
    x = torch.randn(2, 5, 32)
    assert_rel_close(model(x), block(x), tol=1e-5)
    attn, attn_report = patched_copy(block.attn, attn_backend="reference")
    assert attn_report.kind == "timm Attention" and attn._fastmim_attn_backend == "reference"
    assert_rel_close(attn(x), block.attn(x), tol=1e-5)


def test_unsupported_parts_are_left_and_reported():
    from timm.models.vision_transformer import ResPostBlock

    torch.manual_seed(0)
    for kwargs, reason in ((dict(qk_norm=True), "qk-norm"), (dict(act_layer=nn.SiLU), "not the exact GELU"),
                           (dict(act_layer="gelu_tanh"), "not the exact GELU"),
                           (dict(block_fn=ResPostBlock), "block type ResPostBlock not supported")):
        ref = timm_vit(**kwargs)
        model, report = patched_copy(ref)
        assert report.left and all(path.startswith("blocks.") for path, _ in report.left)
        assert any(reason in why for _, why in report.left), report.left
        assert not any(path.startswith("blocks.0") and what == BLOCK for path, what in report.patched)
        if "qk_norm" in kwargs:
            assert type(model.blocks[0]) is type(ref.blocks[0])
            assert type(model.blocks[0].attn) is type(ref.blocks[0].attn)
        imgs = torch.randn(2, 3, 16, 16)
        ref.eval()
        model.eval()
        assert_rel_close(model(imgs), ref(imgs), tol=1e-5)


def test_hooked_blocks_are_called_as_modules():
    ref = timm_vit().eval()
    model = fastmim.patch(copy.deepcopy(ref))
    seen = []
    model.blocks[1].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    imgs = torch.randn(2, 3, 16, 16)
    with use_backend("triton"):
        out = model(imgs)
    assert seen == [torch.Size([2, 17, 32])]
    assert_rel_close(out, ref(imgs), tol=1e-5)


# ---------------------------------------------------------------------------------- API


def test_unknown_types_are_errors_and_change_nothing():
    with pytest.raises(TypeError, match="unsupported model type"):
        fastmim.patch(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="fastmim's own models"):
        fastmim.patch(fastmim.models.MaskedAutoencoderViT(**TINY))
    if transformers is not None:
        with pytest.raises(TypeError, match="not supported"):
            fastmim.patch(hf_vit().layers[0])
    with pytest.raises(ValueError, match="attn_backend"):
        fastmim.patch(official(), attn_backend="flash")


def test_unpatch_restores_the_original_classes_and_forwards():
    for ref in (official(), timm_vit(), *([hf_vitmae()] if transformers is not None else [])):
        before = {name: type(m) for name, m in ref.named_modules()}
        forwards = {name: type(m).forward for name, m in ref.named_modules()}
        model = fastmim.patch(ref)
        assert any(type(m) is not before[n] for n, m in model.named_modules())
        assert fastmim.unpatch(model) is model
        assert {name: type(m) for name, m in model.named_modules()} == before
        assert {name: type(m).forward for name, m in model.named_modules()} == forwards
        assert not any(k.startswith("_fastmim_") for m in model.modules() for k in vars(m))
        assert fastmim.patch_report(model) is None


def test_patching_twice_repatches_and_pickle_and_deepcopy_keep_the_patch():
    model = fastmim.patch(official())
    fastmim.patch(model, attn_backend="reference")
    assert model.blocks[0].attn._fastmim_attn_backend == "reference"
    assert fastmim.patch_report(model).verified
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    loss = model(imgs, 0.75, noise)[0]
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is type(model) and type(clone.blocks[0]) is type(model.blocks[0])
        assert torch.equal(clone(imgs, 0.75, noise)[0], loss)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False).blocks[0].attn) is type(model.blocks[0].attn)


def test_models_on_the_meta_device_are_patched_unverified():
    """The cost model patches meta models: nothing to probe, the report says so, the step runs."""
    with torch.device("meta"):
        model = official()
    model, report = fastmim.patch(model, attn_backend="fastmim", return_report=True)
    assert not report.verified and not report.left and "not verified" in report.summary()
    loss = model(torch.empty(2, 3, 16, 16, device="meta"))[0]
    loss.backward()
    assert loss.is_meta and model.blocks[0].attn.qkv.weight.grad.is_meta


# ---------------------------------------------------------------------------------- compile, DDP, autocast


def test_compiled_patched_official_model_trains_as_eager():
    torch.manual_seed(0)
    eager = official(depth=1, norm_pix_loss=True)
    model = fastmim.patch(copy.deepcopy(eager))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    opt_eager = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_model = torch.optim.AdamW(model.parameters(), lr=1e-3)
    imgs = torch.randn(4, 3, 16, 16)
    losses = []
    for _ in range(3):
        noise = torch.rand(4, 16)
        for net, opt in ((eager, opt_eager), (compiled, opt_model)):
            loss = net(imgs, 0.75, noise)[0]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    eager_losses, compiled_losses = losses[0::2], losses[1::2]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled_losses[-1] < compiled_losses[0]


def test_ddp_one_process_gloo(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ref = official()
        ddp = DistributedDataParallel(copy.deepcopy(ref))
        assert fastmim.patch(ddp) is ddp and fastmim.patch_report(ddp).verified
        imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
        loss_ref = ref(imgs, 0.75, noise)[0]
        loss = ddp(imgs, 0.75, noise)[0]
        assert_rel_close(loss, loss_ref, tol=1e-5)
        loss_ref.backward()
        loss.backward()
        assert_grads_close(ddp.module, ref)
    finally:
        dist.destroy_process_group()


def test_bf16_autocast_forward_matches():
    ref = official()
    model = fastmim.patch(copy.deepcopy(ref))
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, pred_ref, _ = ref(imgs, 0.75, noise)
        loss, pred, _ = model(imgs, 0.75, noise)
    assert loss.dtype == loss_ref.dtype and pred.dtype == pred_ref.dtype
    assert rel_error(loss, loss_ref) < 1.6e-2 and rel_error(pred, pred_ref) < 1.6e-2


# ---------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["official", "hf_vitmae", "timm"])
def test_cuda_fused_paths_match_the_unpatched_models(kind, monkeypatch):
    """On a GPU the blocks take the fused path (Triton) and attention fastmim's kernel: fp32 without
    TF32 close to the unpatched model, loss and gradients; bf16 autocast within bf16 rounding."""
    if kind == "hf_vitmae" and transformers is None:
        pytest.skip("needs transformers")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    device = torch.device("cuda")
    torch.manual_seed(0)
    ref = {"official": official, "hf_vitmae": hf_vitmae, "timm": timm_vit}[kind]().to(device)
    model, report = patched_copy(ref, attn_backend="fastmim")
    assert report.verified and not report.left, report
    imgs, noise = torch.randn(4, 3, 16, 16, device=device), torch.rand(4, 16, device=device)

    def loss_of(net):
        if kind == "timm":
            return net(imgs).square().mean()
        out = net(imgs, noise=noise)
        return out[0] if isinstance(out, tuple) else out.loss

    assert_rel_close(loss_of(model), loss_of(ref), tol=1e-4, name="loss")
    loss_of(ref).backward()
    loss_of(model).backward()
    assert_grads_close(model, ref, tol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert rel_error(loss_of(model), loss_of(ref)) < 3e-2
