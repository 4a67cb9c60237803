"""LUT: disjoint two-view masking, fused vs reference, the EMA teacher (outside the optimizer,
eval mode, one foreach update, momentum schedule), where gradients go, bf16, torch.compile,
and an overfitting check."""

import copy

import pytest
import torch
from torch import nn

from fastmim.models import LUT, EMATeacher, create_model
from fastmim.models.ema import ema_momentum
from fastmim.models.heads import FrozenBatchNorm1d, cosine_loss
from fastmim.testing import (
    TINY_TWO_VIEW,
    TwoViewMethod,
    assert_each_loss_reaches,
    assert_every_loss_falls,
    grads,
    kernel_devices,
    overfit_history,
    parameter_groups,
    rel_error,
    two_views,
)

# mask 0.75 keeps K = 6 of the L = 25 patches per view, 12 of 25 seen in all.
TINY = {**TINY_TWO_VIEW, "head_hidden_dim": 48}


def tiny_lut(seed: int = 0, **kwargs) -> LUT:
    torch.manual_seed(seed)
    return LUT(**{**TINY, **kwargs})


# Noise: a row per image (one permutation, its disjoint slices the two views' masks).
METHOD = TwoViewMethod(tiny_lut, ("loss", "loss_mae", "loss_bc"), noise_rows=1, mask_seed=77)


# ---------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_the_views_keep_disjoint_slices_of_one_permutation(fused, mask_ratio, monkeypatch):
    model = tiny_lut(fused=fused)
    keep = int(25 * (1 - mask_ratio))
    seen = []
    real = model._visible_tokens
    monkeypatch.setattr(model, "_visible_tokens", lambda x, ids, pos: seen.append(ids) or real(x, ids, pos))
    ids_shuffle, _ = model.two_view_permutation(3, torch.device("cpu"), seed=42)
    model(*two_views(batch=3), mask_ratio, seed=42)
    (ids_keep,) = seen
    assert ids_keep.shape == (6, keep)
    torch.testing.assert_close(ids_keep[:3], ids_shuffle[:, :keep], rtol=0, atol=0)
    torch.testing.assert_close(ids_keep[3:], ids_shuffle[:, keep:2 * keep], rtol=0, atol=0)
    for b in range(3):
        assert not set(ids_keep[b].tolist()) & set(ids_keep[3 + b].tolist())


def test_one_random_permutation_call_serves_both_views(monkeypatch):
    import fastmim.ops

    calls = []
    real = fastmim.ops.random_permutation
    monkeypatch.setattr(fastmim.ops, "random_permutation", lambda *a, **k: calls.append(a) or real(*a, **k))
    tiny_lut()(*two_views(batch=3), 0.75, seed=1)
    assert calls == [(3, 25)]


@pytest.mark.parametrize("fused", [True, False])
def test_offset_permutes_each_image_as_one_process_with_the_whole_batch_would(fused):
    from fastmim.ops import random_permutation_reference

    model = tiny_lut(fused=fused)
    cpu = torch.device("cpu")
    whole = model.two_view_permutation(5, cpu, seed=3)
    part = model.two_view_permutation(2, cpu, seed=3, offset=3)
    for got_whole, got_part, want in zip(whole, part, random_permutation_reference(5, 25, seed=3), strict=True):
        assert torch.equal(got_whole, want) and torch.equal(got_part, want[3:])
    with pytest.raises(ValueError, match="give noise or seed / offset, not both"):
        model.two_view_permutation(2, cpu, noise=torch.rand(2, 25), seed=3)


def test_mask_ratio_below_one_half_is_refused_with_a_clear_error():
    model = tiny_lut()
    with pytest.raises(ValueError, match=r"mask_ratio >= 0\.5.*got 0\.4"):
        model(*two_views(batch=2), 0.4)


# ---------------------------------------------------------------------------------- fused == reference
# (and the other checks of every two-view method: test_passes_the_checks_of_every_two_view_method)


@pytest.mark.parametrize("device", kernel_devices())
def test_fused_token_ops_on_the_triton_backend_match_the_reference_path(device):
    fused, ref = METHOD.fused_and_reference(device, {"attn_backend": "sdpa"})
    exact = copy.deepcopy(ref).double()
    a, b = (v.to(device) for v in two_views(batch=2))
    METHOD.assert_triton_step_matches_reference(fused, ref, a, b, seed=5)
    out_x = exact(a.double(), b.double(), 0.75, seed=5)
    out_x["loss"].backward()
    # The heads' BatchNorm over a batch of 2 amplifies fp32 rounding in the gradients (an input
    # perturbed by 1e-7 moves them by 1e-5): each gradient must be as close to the float64 result as
    # the fp32 reference path's own, within a small multiple (the flash-attention test rule).
    g_r, g_x = grads(ref), grads(exact)
    for name, g in grads(fused).items():
        own_error = rel_error(g_r[name].double(), g_x[name])
        error = rel_error(g.double(), g_x[name])
        assert error <= 3 * own_error + 1e-6, f"{name}: error {error:.2e} vs the fp32 reference's {own_error:.2e}"


# ---------------------------------------------------------------------------------- the losses


def test_contextualisation_matches_the_teacher_on_the_other_unmasked_view():
    model = tiny_lut(w_mae=0.7, w_bc=0.3)
    a, b = two_views(batch=4)
    captured = []
    model.predictor.register_forward_hook(lambda m, i, o: captured.append(o))
    out = model(a, b, 0.75, seed=9)
    q1, q2 = captured
    t1, t2 = model.teacher(a), model.teacher(b)  # teacher: each view whole, unmasked
    expected = 0.5 * (cosine_loss(q1, t2) + cosine_loss(q2, t1))
    torch.testing.assert_close(out["loss_bc"], expected)
    torch.testing.assert_close(out["loss"], 0.7 * out["loss_mae"] + 0.3 * out["loss_bc"])
    # the MAE loss is view 1's: the same model with view 2 replaced gives the same loss_mae
    torch.testing.assert_close(model(a, torch.randn_like(b), 0.75, seed=9)["loss_mae"], out["loss_mae"])
    assert 0.0 <= float(out["loss_bc"].detach()) <= 4.0


def test_cosine_loss_is_two_minus_two_cosine():
    p, z = torch.randn(6, 5), torch.randn(6, 5)
    expected = (2 - 2 * torch.nn.functional.cosine_similarity(p, z, dim=1)).mean()
    torch.testing.assert_close(cosine_loss(p, z), expected)
    assert float(cosine_loss(p, 3 * p)) < 1e-6


def test_each_loss_reaches_exactly_the_parameters_that_should_learn_and_the_teacher_none():
    model = tiny_lut()
    groups = parameter_groups(model, decoder=("decoder_", "mask_token"), heads=("projector.", "predictor."))
    encoder = groups["rest"]
    assert_each_loss_reaches(model, {"loss_mae": encoder | groups["decoder"], "loss_bc": encoder | groups["heads"],
                                     "loss": groups["all"]}, *two_views(batch=4), 0.75, seed=3)
    assert not any(t.requires_grad or t.grad is not None for t in model.teacher.buffers())


# ---------------------------------------------------------------------------------- the teacher


def test_teacher_is_outside_the_parameters_the_optimizer_sees_but_inside_the_state_dict():
    model = tiny_lut()
    assert not list(model.teacher.parameters())
    assert not any(n.startswith("teacher.") for n, _ in model.named_parameters())
    state = model.state_dict()
    teacher_keys = {k for k in state if k.startswith("teacher.")}
    assert {"teacher.cls_token", "teacher.pos_embed", "teacher.projector.1.running_mean",
            "teacher.blocks.0.attn.qkv.weight", "teacher.norm.weight"} <= teacher_keys
    assert isinstance(model.teacher.projector[1], FrozenBatchNorm1d)
    # starts as an exact copy of the student's encoder and projection head
    for key in teacher_keys:
        student_key = key[len("teacher."):]
        torch.testing.assert_close(state[key], state[student_key], rtol=0, atol=0)
    # an optimizer step moves the student but not the teacher
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(*two_views(batch=4), 0.75, seed=1)["loss"].backward()
    optimizer.step()
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model.blocks[0].attn.qkv.weight, model.teacher.blocks[0].attn.qkv.weight)
    # and a checkpoint round trip restores it
    clone = tiny_lut(seed=5)
    clone.load_state_dict(model.state_dict())
    for k, v in clone.teacher.state_dict().items():
        assert torch.equal(v, model.teacher.state_dict()[k])


def test_teacher_stays_in_eval_mode():
    model = tiny_lut()
    model.train()
    assert model.training and model.projector.training and not model.teacher.training
    assert not any(m.training for m in model.teacher.modules())
    model.teacher.train()
    assert not model.teacher.training
    # eval mode: each row's target is independent of the rest of the batch (running statistics)
    a, _ = two_views(batch=4)
    torch.testing.assert_close(model.teacher(a)[:2], model.teacher(a[:2]))


def test_ema_update_is_one_foreach_call_over_parameters_and_running_statistics(monkeypatch):
    model = tiny_lut()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(*two_views(batch=4), 0.75, seed=2)["loss"].backward()  # also moves the BN running stats
    optimizer.step()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = model.state_dict()
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append(len(a[0])) or real(*a))
    m = model.update_teacher(momentum=0.9)
    assert m == 0.9 and calls == [len(teacher_before)]
    for key, old in teacher_before.items():
        expected = 0.9 * old + 0.1 * student[key]
        torch.testing.assert_close(model.teacher.state_dict()[key], expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(model.teacher.projector[1].running_mean, teacher_before["projector.1.running_mean"])


def _student_step(model: LUT, seed: int) -> None:
    """An SGD step of the student (its BatchNorm running statistics move too)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(*two_views(batch=4, seed=seed), 0.75, seed=seed)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _expected_teacher(model: LUT, momentum: float) -> dict[str, torch.Tensor]:
    """The reference EMA, by name from the state dicts: ``m * teacher + (1 - m) * student``."""
    student = {k: _full(v).detach().clone() for k, v in model.state_dict().items()}
    return {k: momentum * v + (1 - momentum) * student[k] for k, v in model.teacher.state_dict().items()}


def _assert_teacher(model: LUT, expected: dict[str, torch.Tensor]) -> None:
    teacher = model.teacher.state_dict()
    assert teacher.keys() == expected.keys()
    for key, value in expected.items():
        assert teacher[key].dtype == value.dtype, key
        torch.testing.assert_close(teacher[key], value, rtol=1e-6, atol=1e-7, msg=key)


def _perturb_student(model: LUT, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers()
                                      if not n.startswith("teacher.") and b.is_floating_point())]
    with torch.no_grad():
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=g).to(t.dtype))


def test_ema_pairs_are_built_once_and_follow_the_students_steps(monkeypatch):
    import fastmim.models.lut as lut

    built = []
    real = lut.EMAPairs
    monkeypatch.setattr(lut, "EMAPairs", lambda model: built.append(model) or real(model))
    model = tiny_lut()
    for step in range(3):
        _student_step(model, seed=10 + step)
        expected = _expected_teacher(model, 0.8)
        model.update_teacher(momentum=0.8)
        _assert_teacher(model, expected)
    assert built == [model]


def test_ema_pairs_are_rebuilt_when_the_models_tensors_change():
    model = tiny_lut()
    pairs = model._ema_pairs()
    assert model._ema_pairs() is pairs
    model.to(torch.float64)  # new tensor objects, student's and teacher's
    assert model._ema_pairs() is not pairs
    _perturb_student(model, seed=1)
    expected = _expected_teacher(model, 0.7)
    model.update_teacher(momentum=0.7)
    _assert_teacher(model, expected)
    assert model.teacher.blocks[0].attn.qkv.weight.dtype == torch.float64

    other = tiny_lut(seed=3).to(torch.float64)
    pairs = model._ema_pairs()
    model.load_state_dict(other.state_dict(), assign=True)  # assign: the loaded tensors replace the model's
    assert model._ema_pairs() is not pairs
    _perturb_student(model, seed=2)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.data = torch.randn_like(model.blocks[0].mlp.fc1.weight)  # same Parameter
    expected = _expected_teacher(model, 0.6)
    model.update_teacher(momentum=0.6)
    _assert_teacher(model, expected)

    pairs = model._ema_pairs()
    model.reset_teacher()
    assert model._ema_pairs() is not pairs
    _perturb_student(model, seed=3)
    expected = _expected_teacher(model, 0.5)
    model.update_teacher(momentum=0.5)
    _assert_teacher(model, expected)
    assert copy.deepcopy(model)._ema_cache is None  # a copy pairs its own tensors


def test_shard_rows_are_torch_chunks_as_fully_shard_splits_dim_0():
    from fastmim.models.ema import _shard_rows

    for length in range(1, 8):
        for world in range(1, 5):
            chunks = torch.arange(length).chunk(world)
            expected = [(int(c[0]), len(c)) for c in chunks] + [(length, 0)] * (world - len(chunks))
            assert _shard_rows(length, world) == expected, (length, world)


def test_ema_update_of_an_fsdp_sharded_student_is_one_lerp_and_one_gather(tmp_path, monkeypatch):
    """FSDP2 turns the student's parameters into DTensor shards; the teacher stays whole. One
    process here (the 2-process run is in test_train): the pairing, the lerp on the local shard,
    the gather and the staleness check run; the teacher moves as the reference EMA says."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = tiny_lut()
    pairs = model._ema_pairs()  # paired before sharding: must not be used after it
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for block in (*model.blocks, *model.decoder_blocks):
            fully_shard(block)
        fully_shard(model)
        assert isinstance(model.blocks[0].attn.qkv.weight, DTensor)
        _student_step(model, seed=4)
        expected = _expected_teacher(model, 0.8)
        lerps, gathers = [], []
        gather_name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        real_lerp, real_gather = torch._foreach_lerp_, getattr(dist, gather_name)
        monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: lerps.append(len(a[0])) or real_lerp(*a))
        monkeypatch.setattr(dist, gather_name, lambda *a, **k: gathers.append(1) or real_gather(*a, **k))
        model.update_teacher(momentum=0.8)
        assert model._ema_pairs() is not pairs and model._ema_pairs().gathers
        assert lerps == [len(expected)] and gathers == [1]
        _assert_teacher(model, expected)
    finally:
        dist.destroy_process_group()


def test_momentum_schedule_rises_from_base_to_one_on_a_half_cosine():
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(50, 100) == pytest.approx(0.998)
    assert ema_momentum(100, 100) == pytest.approx(1.0)
    assert ema_momentum(200, 100) == pytest.approx(1.0)
    values = [ema_momentum(s, 100) for s in range(101)]
    assert values == sorted(values)
    model = tiny_lut(ema_momentum=0.99)
    assert model.update_teacher(0, 10) == pytest.approx(0.99)
    assert model.update_teacher(10, 10) == 1.0
    with pytest.raises(ValueError, match="ema_momentum"):
        tiny_lut(ema_momentum=1.5)


def test_reset_teacher_copies_the_student_again():
    model = tiny_lut()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)
    model.reset_teacher()
    assert isinstance(model.teacher, EMATeacher)
    assert torch.equal(model.teacher.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_registry_builds_lut_with_the_documented_defaults():
    model = create_model("lut", "vit_tiny_patch4_32", depth=1, head_hidden_dim=64)
    assert isinstance(model, LUT)
    assert (model.w_mae, model.w_bc, model.ema_momentum, model.ema_final) == (1.0, 0.25, 0.996, 1.0)
    assert model.projector[-1].out_features == model.predictor[-1].out_features == 192
    assert LUT.__init__.__kwdefaults__["head_hidden_dim"] == 4096


def test_bad_views_raise_clear_errors():
    model = tiny_lut()
    a, b = two_views(batch=2)
    with pytest.raises(ValueError, match="imgs1"):
        model(torch.randn(2, 1, 20, 20), b)
    with pytest.raises(ValueError, match="same shape"):
        model(a, torch.randn(3, 3, 20, 20))
    with pytest.raises(ValueError, match=r"noise must be \(B, L\)"):
        model(a, b, 0.75, noise=torch.rand(4, 25))


# ---------------------------------------------------------------------------------- fused, precision, compile


@pytest.mark.parametrize("check", METHOD.checks())
def test_passes_the_checks_of_every_two_view_method(check):
    """Fused == reference (seeded masks or noise, every patch predicted or the masked ones only),
    a bf16 autocast step finite and close to fp32, torch.compile of the student step == eager."""
    METHOD.checks()[check]()


# ---------------------------------------------------------------------------------- sanity


def test_every_loss_decreases_when_overfitting_a_fixed_batch_with_the_teacher_following():
    model = tiny_lut()
    steps = 25  # the teacher follows every step: a fast one (momentum 0.9) for a short run
    history = overfit_history(model, *two_views(batch=8, seed=4), 0.75, seed=321, steps=steps,
                              after_step=lambda step: model.update_teacher(step + 1, steps, momentum=0.9))
    assert_every_loss_falls(history, METHOD.losses)


def test_ddp_skips_the_teacher_buffers_but_keeps_the_student_ones(tmp_path):
    import torch.distributed as dist

    model = tiny_lut()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        ignored = ddp.parameters_to_ignore
        assert {n for n, _ in model.named_buffers() if n.startswith("teacher.")} <= ignored
        assert "projector.1.running_mean" not in ignored
        out = ddp(*two_views(batch=2), 0.75, seed=1)
        out["loss"].backward()
        model.reset_teacher()
        assert set(model._ddp_params_and_buffers_to_ignore) == {f"teacher.{n}" for n, _ in
                                                                 model.teacher.named_buffers()}
    finally:
        dist.destroy_process_group()
