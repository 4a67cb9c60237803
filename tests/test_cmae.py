"""CMAE: fused vs reference, where each loss's gradient goes, the position-free tokens, InfoNCE
(also across 2 gloo ranks), bf16 autocast, torch.compile, and an overfitting check."""

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmim.models import CMAE, create_model, get_preset, list_presets
from fastmim.models.heads import HeadBatchNorm1d, all_gather_with_grad, info_nce, mlp_head
from fastmim.testing import (
    TINY_TWO_VIEW,
    TwoViewMethod,
    assert_each_loss_reaches,
    assert_every_loss_falls,
    assert_rel_close,
    grads,
    kernel_devices,
    overfit_history,
    parameter_groups,
    two_views,
)

# mask 0.75 keeps K = 6 of the L = 25 patches, 4 of them without position.
TINY = {**TINY_TWO_VIEW, "proj_hidden_dim": 48, "proj_dim": 16}


def tiny_cmae(seed: int = 0, **kwargs) -> CMAE:
    torch.manual_seed(seed)
    return CMAE(**{**TINY, **kwargs})


# Noise: a row per view (2B rows for B images).
METHOD = TwoViewMethod(tiny_cmae, ("loss", "loss_mim", "loss_con", "loss_pos"), noise_rows=2, mask_seed=1234)


# ---------------------------------------------------------------------------------- fused == reference
# (and the other checks of every two-view method: test_passes_the_checks_of_every_two_view_method)


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_token_ops_on_the_triton_backend_match_the_reference_path(device):
    fused, ref = METHOD.fused_and_reference(device, {"attn_backend": "sdpa"})
    a, b = (v.to(device) for v in two_views(batch=2))
    METHOD.assert_triton_step_matches_reference(fused, ref, a, b, seed=99)
    g_r = grads(ref)
    for name, g in grads(fused).items():
        assert_rel_close(g, g_r[name], torch.float32)


def test_both_views_are_masked_by_one_random_masking_call(monkeypatch):
    import fastmim.ops

    calls = []
    real = fastmim.ops.random_masking

    def counting(*args, **kwargs):
        calls.append(args[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(fastmim.ops, "random_masking", counting)
    model = tiny_cmae()
    model(*two_views(batch=3), 0.75, seed=5)
    assert calls == [(6, 25)]


@pytest.mark.parametrize("fused", [True, False])
def test_offset_masks_each_image_as_one_process_with_the_whole_batch_would(fused, monkeypatch):
    """View v of image b is sample 2 * (offset + b) + v of the seed: images 2..3 of a batch of 4,
    masked with offset 2, get the masks they get in the whole batch, from one call of 2B rows."""
    import fastmim.ops
    from fastmim.ops import random_masking_reference

    calls = []
    real = fastmim.ops.random_masking
    monkeypatch.setattr(fastmim.ops, "random_masking", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    model = tiny_cmae(fused=fused)
    cpu = torch.device("cpu")
    whole = model.two_view_masking(8, cpu, 0.75, seed=7)
    part = model.two_view_masking(4, cpu, 0.75, seed=7, offset=torch.tensor(2))
    pairs = random_masking_reference(8, 25, 0.75, seed=7)  # rows 2b + v
    for got_whole, got_part, want in zip(whole, part, pairs, strict=True):
        assert torch.equal(got_whole, want.reshape(4, 2, -1).transpose(0, 1).reshape(8, -1))
        assert torch.equal(got_part.reshape(2, 2, -1), got_whole.reshape(2, 4, -1)[:, 2:])
    assert not torch.equal(whole[1][0], whole[1][4])  # the two views of an image differ
    if fused:
        assert len(calls) == 2 and calls[0][0][:2] == (8, 25) and calls[0][1]["offset"] == 0
        assert calls[1][0][:2] == (4, 25) and int(calls[1][1]["offset"]) == 4  # 2 * 2: pairs of rows
    else:
        assert calls == []
    with pytest.raises(ValueError, match="give noise or seed / offset, not both"):
        model(*two_views(batch=2), 0.75, noise=torch.rand(4, 25), offset=1)


# ---------------------------------------------------------------------------------- the encoder input


@pytest.mark.parametrize("fused", [True, False])
def test_the_first_num_free_visible_tokens_carry_no_position_embedding(fused):
    model = tiny_cmae(fused=fused)
    x = torch.randn(3, 25, 32)
    ids_keep = torch.stack([torch.randperm(25)[:6] for _ in range(3)])
    tokens = model.visible_tokens(x, ids_keep, num_free=4)
    pos = model.pos_embed[0, 1:]
    assert tokens.shape == (3, 7, 32)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, 0]).expand(3, 1, 32)[:, 0])
    for b in range(3):
        torch.testing.assert_close(tokens[b, 1:5], x[b, ids_keep[b, :4]], rtol=0, atol=0)
        torch.testing.assert_close(tokens[b, 5:], x[b, ids_keep[b, 4:]] + pos[ids_keep[b, 4:]])
    assert model.num_free(6) == 4
    assert tiny_cmae(pos_fraction=0.0).num_free(6) == 0


def test_position_head_targets_are_the_patch_indices_of_the_free_tokens():
    model = tiny_cmae()
    a, b = two_views(batch=2)
    noise = torch.rand(4, 25)
    ids_keep = torch.argsort(noise, dim=1)[:, :6]
    captured = {}
    model.pos_head.register_forward_hook(lambda m, i, o: captured.update(logits=o))
    out = model(a, b, 0.75, noise=noise)
    logits = captured["logits"]
    assert logits.shape == (4, 4, 25)  # 2B rows, num_free tokens, L classes
    expected = F.cross_entropy(logits.reshape(-1, 25), ids_keep[:, :4].reshape(-1))
    torch.testing.assert_close(out["loss_pos"], expected)


def test_pos_fraction_zero_disables_the_position_task():
    model = tiny_cmae(pos_fraction=0.0)
    out = model(*two_views(batch=2), 0.75, seed=3)
    assert float(out["loss_pos"]) == 0.0
    out["loss"].backward()
    assert model.pos_head.weight.grad is None


# ---------------------------------------------------------------------------------- where gradients go


def test_each_loss_reaches_exactly_the_parameters_that_should_learn_from_it():
    model = tiny_cmae()
    groups = parameter_groups(model, decoder=("decoder_", "mask_token"), projector="projector.", pos_head="pos_head.")
    encoder = groups["rest"]
    assert "pos_embed" not in groups["all"]  # fixed sin-cos
    # cls_token reaches the position logits only through attention; it does, as every encoder weight
    assert_each_loss_reaches(model, {"loss_mim": encoder | groups["decoder"], "loss_con": encoder | groups["projector"],
                                     "loss_pos": encoder | groups["pos_head"], "loss": groups["all"]},
                             *two_views(batch=4), 0.75, seed=7)


def test_loss_is_the_weighted_sum_of_its_parts_and_weights_are_options():
    model = tiny_cmae(w_mim=0.5, w_con=2.0, w_pos=0.25)
    out = model(*two_views(batch=3), 0.75, seed=11)
    torch.testing.assert_close(out["loss"], 0.5 * out["loss_mim"] + 2.0 * out["loss_con"] + 0.25 * out["loss_pos"])
    assert all(torch.isfinite(v) for v in out.values())


# ---------------------------------------------------------------------------------- heads


def test_info_nce_equals_the_naive_symmetric_formula():
    z1, z2 = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    t = 0.2
    n1, n2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    sim = n1 @ n2.t() / t
    naive = 0.5 * (-(sim.diag() - sim.logsumexp(1)).mean() - (sim.diag() - sim.logsumexp(0)).mean())
    torch.testing.assert_close(info_nce(z1, z2, t).double(), naive, rtol=1e-6, atol=1e-6)
    # well-separated positives: loss near zero
    e = torch.eye(5)
    assert info_nce(e, e, 0.05) < 1e-3


def test_all_gather_with_grad_is_the_identity_in_one_process():
    t = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(t) is t


def test_mlp_head_layout():
    head = mlp_head(8, 16, 4, 2)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, HeadBatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].bias is None and head[3].bias is None
    assert [type(m) for m in mlp_head(8, 16, 4, 3, sync_bn=False)] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [
        nn.Linear]
    with pytest.raises(ValueError, match="num_layers"):
        mlp_head(8, 16, 4, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, weights, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        head = mlp_head(8, 12, 6, 2)
        head.load_state_dict(weights)
        rows = slice(rank * z1.shape[0] // world, (rank + 1) * z1.shape[0] // world)
        x1 = z1[rows].clone().requires_grad_(True)
        x2 = z2[rows].clone().requires_grad_(True)
        loss = info_nce(head(x1), head(x2), 0.2)
        loss.backward()
        grad_w = head[0].weight.grad.clone()
        dist.all_reduce(grad_w)  # DDP's average, times world
        torch.save({"loss": loss.detach(), "grad_w": grad_w / world, "g1": x1.grad, "g2": x2.grad,
                    "running_mean": head[1].running_mean.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_negatives_and_batchnorm_statistics_span_ranks_like_one_process_with_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    z1, z2 = torch.randn(8, 8), torch.randn(8, 8)
    head = mlp_head(8, 12, 6, 2)
    weights = {k: v.clone() for k, v in head.state_dict().items()}
    mp.spawn(_ddp_worker, args=(2, _free_port(), z1, z2, weights, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # one process, global batch of 8: BatchNorm over the 8 rows of each view
    x1, x2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = info_nce(head(x1), head(x2), 0.2)
    loss.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    # per-rank grads of the inputs are this rank's rows of the 1-process gradient times world
    # (each rank's loss is a mean over its half of the queries: DDP's averaging divides it back)
    torch.testing.assert_close(torch.cat([r["g1"] for r in ranks]) / 2, x1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["g2"] for r in ranks]) / 2, x2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[0]["grad_w"], head[0].weight.grad, rtol=1e-4, atol=1e-6)
    # running statistics: the 1-process head saw both views (2 updates), as each rank did
    torch.testing.assert_close(ranks[0]["running_mean"], head[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[1]["running_mean"], head[1].running_mean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- validation


def test_bad_inputs_raise_clear_errors():
    model = tiny_cmae()
    a, b = two_views(batch=2)
    with pytest.raises(ValueError, match="imgs2"):
        model(a, torch.randn(2, 1, 40, 40))  # another size is fine (a multiple of the patch), not other channels
    with pytest.raises(ValueError, match="same shape"):
        model(a, torch.randn(3, 3, 20, 20))
    with pytest.raises(ValueError, match=r"noise must be \(2B, L\)"):
        model(a, b, 0.75, noise=torch.rand(2, 25))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(a, b, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        tiny_cmae(temperature=0.0)
    with pytest.raises(ValueError, match="pos_fraction"):
        tiny_cmae(pos_fraction=1.5)


def test_registry_builds_cmae_with_the_small_decoder():
    model = create_model("cmae", "vit_tiny_patch4_32", depth=1)
    assert isinstance(model, CMAE)
    # The preset's MAE decoder is 2 x 128 already: CMAE's is half as wide (it was 2 x 256, larger than MAE's).
    assert (model.decoder_embed.out_features, len(model.decoder_blocks)) == (64, 2)
    assert model.projector[-1].out_features == 256 and model.temperature == 0.2
    assert (model.w_mim, model.w_con, model.w_pos, model.pos_fraction) == (1.0, 0.1, 0.1, 0.75)
    assert model.pos_head.out_features == 64


@pytest.mark.parametrize("preset", list_presets())
def test_cmae_decoder_is_smaller_than_maes_at_every_preset(preset):
    """docs/METHODS.md (a): CMAE's decoder is smaller than MAE's. At ViT-B scale it is 2 x 256
    against 8 x 512; the CPU-scale presets' MAE decoders are small already, and a fixed 2 x 256
    there was larger than MAE's (which a CMAE-vs-MAE comparison at that size would inherit)."""
    from fastmim.models.cmae import small_decoder

    size = get_preset(preset)
    dec = small_decoder(size)
    mae_cost = size.decoder_depth * size.decoder_embed_dim ** 2
    assert dec["decoder_depth"] * dec["decoder_embed_dim"] ** 2 < mae_cost
    assert dec["decoder_depth"] <= size.decoder_depth and dec["decoder_embed_dim"] <= size.decoder_embed_dim
    assert dec["decoder_embed_dim"] // dec["decoder_num_heads"] == 32  # head dim as MAE's
    if size.embed_dim >= 768:
        assert (dec["decoder_embed_dim"], dec["decoder_depth"]) == (256, 2)  # the spec's default, unchanged
    with torch.device("meta"):
        cmae = create_model("cmae", preset, depth=1)
        mae = create_model("mae", preset, depth=1)

    def decoder_params(m):
        return sum(p.numel() for n, p in m.named_parameters() if n.startswith(("decoder_", "mask_token")))

    assert decoder_params(cmae) < decoder_params(mae)


# ---------------------------------------------------------------------------------- fused, precision, compile


@pytest.mark.parametrize("check", METHOD.checks())
def test_passes_the_checks_of_every_two_view_method(check):
    """Fused == reference (seeded masks or noise, every patch predicted or the masked ones only),
    a bf16 autocast step finite and close to fp32, torch.compile of the training step == eager."""
    METHOD.checks()[check]()


# ---------------------------------------------------------------------------------- sanity


def test_every_loss_decreases_when_overfitting_a_fixed_batch():
    model = tiny_cmae(pos_fraction=0.75)
    history = overfit_history(model, *two_views(batch=8, seed=3), 0.75, seed=123)  # the same masks every step
    assert_every_loss_falls(history, METHOD.losses)
