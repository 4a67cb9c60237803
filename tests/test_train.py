"""fastmim.train: the loop, checkpoints, resume, figures and the ``fastmim train`` command."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fastmim.cli import main
from fastmim.testing import TINY_TRAIN_MODEL as TINY
from fastmim.testing import TINY_TRAIN_MODEL_ARGS as TINY_ARGS
from fastmim.testing import run_until_stalled
from fastmim.train.checkpoint import (
    CheckpointError,
    atomic_write,
    load_weights,
    read_metadata,
    save_weights,
)
from fastmim.train.config import TrainConfig, TrainError
from fastmim.train.loop import train
from fastmim.train.methods import MAEAdapter, StepContext
from fastmim.train.schedule import cosine_lr, default_warmup_steps, scaled_lr

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def train_defaults():
    """train_config's defaults here (tests/conftest.py): five steps of batch 8, a record every two."""
    return {"max_steps": 5, "batch_size": 8, "log_every": 2}


def _image_folder(root, classes=2, per_class=10, size=(20, 20), seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).save(root / f"class{c}" / f"{i}.png")
    return root


def test_schedule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert default_warmup_steps(1000) == 50 and default_warmup_steps(5) == 1
    lrs = [cosine_lr(s, lr=1.0, max_steps=100, warmup_steps=10, min_lr=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone decay after warmup
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert cosine_lr(100, lr=1.0, max_steps=100, warmup_steps=10, min_lr=0.1) == pytest.approx(0.1)


def test_masking_noise_is_one_global_batch_sliced_by_rank():
    whole = StepContext(step=3, max_steps=10, micro_step=1, mask_ratio=0.75, seed=5).masking_noise(8, 16, "cpu")
    halves = [StepContext(step=3, max_steps=10, micro_step=1, mask_ratio=0.75, seed=5, rank=r, world_size=2)
              .masking_noise(4, 16, "cpu") for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    other = StepContext(step=4, max_steps=10, micro_step=1, mask_ratio=0.75, seed=5).masking_noise(8, 16, "cpu")
    assert not torch.equal(whole, other)


@pytest.mark.parametrize("method,op", [("mae", "random_masking"), ("supmim", "random_masking"),
                                       ("supmae", "random_masking"), ("cmae", "random_masking"),
                                       ("lut", "random_permutation")])
def test_adapters_mask_with_the_fused_op_whatever_the_world_size(monkeypatch, method, op):
    """What `fastmim train` runs each micro-step masks through fastmim's fused op (the counter-based
    RNG), seeded by a host tensor, and two ranks holding half the batch each draw the masks one
    rank holding the whole batch draws."""
    import fastmim.ops
    from fastmim.models import create_model
    from fastmim.train.methods import get_adapter

    adapter = get_adapter(method)
    torch.manual_seed(0)
    model = create_model(method, "vit_tiny_patch4_32", **{**adapter.model_overrides(1, None, 3), **TINY})
    calls = []
    real = getattr(fastmim.ops, op)

    def recording(*args, **kwargs):
        calls.append((kwargs, real(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(fastmim.ops, op, recording)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 1, 32, 32, generator=g) for _ in range(adapter.num_views)]
    labels = torch.randint(0, 3, (4,), generator=g)
    for rows, rank, world in ((slice(0, 4), 0, 1), (slice(0, 2), 0, 2), (slice(2, 4), 1, 2)):
        ctx = StepContext(step=2, max_steps=5, micro_step=1, mask_ratio=adapter.default_mask_ratio, seed=9,
                          rank=rank, world_size=world)
        out = adapter.loss(model, {"views": [v[rows] for v in views], "label": labels[rows]}, ctx)
        assert torch.isfinite(out["loss"])
    assert len(calls) == 3
    for kwargs, _ in calls:
        assert isinstance(kwargs["seed"], torch.Tensor) and kwargs["seed"].device.type == "cpu"
    (_, whole), (_, first), (_, second) = calls
    for w, a, b in zip(whole, first, second, strict=True):
        assert torch.equal(torch.cat([a, b]), w)
    # another step, other masks
    ctx = StepContext(step=3, max_steps=5, micro_step=1, mask_ratio=adapter.default_mask_ratio, seed=9)
    adapter.loss(model, {"views": views, "label": labels}, ctx)
    assert not torch.equal(calls[-1][1][1], whole[1])


def test_checkpoint_roundtrip_and_errors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    path = tmp_path / "ckpt.safetensors"
    save_weights(model, path, {"method": "mae", "step": 7})
    assert read_metadata(path)["step"] == 7
    copy = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    load_weights(copy, path)
    assert torch.equal(copy[0].weight, model[0].weight)
    with pytest.raises(CheckpointError, match="does not fit .*size mismatch"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5)), path)
    with pytest.raises(CheckpointError, match="missing 2 key"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1)), path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="without fastmim metadata"):
        read_metadata(foreign)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_metadata(tmp_path / "junk.safetensors")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"half-writ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
    atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and oct(path.stat().st_mode & 0o777) != oct(0o600)


def _check_run_outputs(out, steps):
    for name in ("checkpoint.safetensors", "train_state.pt", "metrics.jsonl", "config.json", "loss.png",
                 "reconstruction.png", "reconstruction_step0.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps and all(math.isfinite(r["loss"]) for r in records)
    assert all(r["lr"] > 0 and r["img_per_s"] > 0 for r in records)
    for name in ("loss.png", "reconstruction.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert read_metadata(out / "checkpoint.safetensors")["step"] == steps
    return records


def test_train_mae_five_steps(tmp_path, train_config):
    result = train(train_config())
    assert result.finished and result.step == 5 and math.isfinite(result.loss)
    records = _check_run_outputs(tmp_path / "run", 5)
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    meta = read_metadata(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["method"] == "mae" and meta["channels"] == 1 and meta["image_size"] == 32
    assert meta["model_kwargs"]["in_chans"] == 1


@pytest.mark.parametrize("method", ["supmim", "supmae", "cmae", "lut"])
def test_train_other_methods_five_steps(tmp_path, train_config, method):
    result = train(train_config(method=method))
    assert result.finished
    _check_run_outputs(tmp_path / "run", 5)


def test_adapter_state_is_saved_and_restored_on_resume(tmp_path, train_config, monkeypatch):
    """CMAE's ContrastiveCrop boxes and schedule live in its adapter: they travel with the checkpoint."""
    from fastmim.train.checkpoint import STATE_NAME, load_state
    from fastmim.train.methods import CMAEAdapter

    common = {"method": "cmae", "max_steps": 4, "figures": False}
    train(train_config(stop_after=2, **common))
    saved = load_state(tmp_path / "run" / STATE_NAME)["adapter"]
    assert "contrastive_crop" in saved
    restored = []
    original = CMAEAdapter.load_state_dict

    def record(self, state):
        restored.append(state)
        original(self, state)

    monkeypatch.setattr(CMAEAdapter, "load_state_dict", record)
    result = train(train_config(resume=True, **common))
    assert result.finished and result.step == 4
    assert len(restored) == 1 and restored[0].keys() == saved.keys()


def test_loss_decreases_on_the_bundled_data(tmp_path, train_config):
    result = train(train_config(max_steps=40, batch_size=16, blr=1e-2, figures=False, log_every=5))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.loss < 0.8 * records[0]["loss"]


def _params(path):
    return load_file(str(path))


def test_interrupted_and_resumed_run_is_bit_exact(tmp_path, train_config, monkeypatch):
    """Ctrl-C (SIGINT) during step 3 of 6, resume: same parameters as an uninterrupted run.
    An image folder of 18 train images with batch 4 x accumulation 2 crosses epochs mid-run."""
    data = str(_image_folder(tmp_path / "data"))
    common = {"data": data, "max_steps": 6, "batch_size": 4, "accum_steps": 2, "figures": False, "image_size": 16,
              "model_overrides": {**TINY, "patch_size": 4}}
    full = train(train_config(output=str(tmp_path / "full"), **common))
    assert full.finished

    original = MAEAdapter.after_step

    def interrupt(self, module, ctx):
        original(self, module, ctx)
        if ctx.step + 1 == 3:  # Ctrl-C in the middle of step 3: it completes, is saved, the run stops
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MAEAdapter, "after_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(output=str(tmp_path / "part"), **common))
    monkeypatch.setattr(MAEAdapter, "after_step", original)
    assert read_metadata(tmp_path / "part" / "checkpoint.safetensors")["step"] == 3
    # The resumed half loads with 2 DataLoader workers: the batches do not depend on them.
    resumed = train(train_config(output=str(tmp_path / "part"), resume=True, num_workers=2, **common))
    assert resumed.finished and resumed.step == 6
    a, b = _params(tmp_path / "full" / "checkpoint.safetensors"), _params(tmp_path / "part" / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.mlp.fc1.weight"], train_initial_weights(tmp_path, common))
    full_log = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part_log = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    full_rec, part_rec = [json.loads(x) for x in full_log], [json.loads(x) for x in part_log]
    assert [r["step"] for r in full_rec] == [r["step"] for r in part_rec] == [1, 2, 4, 6]
    # Records average the steps since the previous record; the resumed window 4 lacks step 3.
    assert [full_rec[i]["loss"] for i in (0, 1, 3)] == [part_rec[i]["loss"] for i in (0, 1, 3)]


@pytest.mark.parametrize("crashed_rename", ["checkpoint.safetensors", "train_state.pt"])
def test_crash_between_checkpoint_writes_resumes_from_the_last_complete_pair(tmp_path, train_config, monkeypatch,
                                                                            crashed_rename):
    """The save at step 4 of 6 dies just before its weights or its state replace the old file:
    resuming continues from the newest complete pair, to the parameters of a run that never
    crashed. (Renaming the weights and then dying left new weights beside the old state.)"""
    from fastmim.train import checkpoint

    common = {"max_steps": 6, "ckpt_every": 2, "figures": False}
    full = train(train_config(output=str(tmp_path / "full"), **common))
    assert full.finished
    real_replace = os.replace
    renames = []

    def crash_on_second_save(src, dst):
        if os.path.basename(dst) == crashed_rename:
            renames.append(dst)
            if len(renames) == 2:
                raise RuntimeError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(train_config(**common))
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    run = tmp_path / "run"
    assert read_metadata(run / "checkpoint.safetensors")["step"] == (4 if crashed_rename == "train_state.pt" else 2)
    shutil.copytree(run, tmp_path / "crashed")
    resumed = train(train_config(resume=True, **common))
    assert resumed.finished and resumed.step == 6
    a, b = _params(tmp_path / "full" / "checkpoint.safetensors"), _params(run / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load_checkpoint_state(run)["step"] == 6
    assert not (run / checkpoint.PENDING_STATE_NAME).exists()
    if crashed_rename == "train_state.pt":
        # Without the complete pending state the pair is refused, never mixed.
        (tmp_path / "crashed" / checkpoint.PENDING_STATE_NAME).unlink()
        with pytest.raises(CheckpointError, match="from step 4 but there is train_state.pt from step 2"):
            checkpoint.load_checkpoint_state(tmp_path / "crashed")


def test_compile_and_bf16_autocast_run(tmp_path, train_config):
    compiled = train(train_config(output=str(tmp_path / "c"), max_steps=2, compile="eager", figures=False))
    assert compiled.finished and math.isfinite(compiled.loss)
    bf16 = train(train_config(output=str(tmp_path / "b"), max_steps=2, precision="bf16", figures=False))
    assert bf16.finished and math.isfinite(bf16.loss)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["precision"] == "bf16"


def test_diverged_loss_stops_with_a_clear_error(tmp_path, monkeypatch, cli_error):
    original = MAEAdapter.loss

    def nan_loss(self, model, batch, ctx):
        out = original(self, model, batch, ctx)
        return {"loss": out["loss"] * float("nan") if ctx.step >= 2 else out["loss"]}

    monkeypatch.setattr(MAEAdapter, "loss", nan_loss)
    argv = ["train", "--output", str(tmp_path / "run"), "--max-steps", "6", "--batch-size", "4", "--log-every", "2",
            "--ckpt-every", "2", "--on-nonfinite", "stop", "--max-skips", "2", "--no-progress", "--no-figures",
            *TINY_ARGS]
    assert "the last 2 steps (to step 4) had a non-finite loss" in cli_error(argv)
    assert read_metadata(tmp_path / "run" / "checkpoint.safetensors")["step"] == 2  # the last good checkpoint


def train_initial_weights(tmp_path, common):
    from fastmim.models import create_model

    torch.manual_seed(0)
    return create_model("mae", "vit_tiny_patch4_32", in_chans=3, img_size=16, **{**TINY, "patch_size": 4}
                        ).state_dict()["blocks.0.mlp.fc1.weight"]


def test_stop_after_then_resume_via_cli(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--output", out, "--max-steps", "4", "--batch-size", "8", "--no-progress", "--no-figures",
            *TINY_ARGS]
    assert main([*args, "--stop-after", "2"]) == 0
    assert "stopped at step 2 of 4" in capsys.readouterr().err
    assert main(["train", "--output", out, "--resume", "--no-progress", "--no-figures"]) == 0
    assert read_metadata(tmp_path / "run" / "checkpoint.safetensors")["step"] == 4
    # A resumed run refuses a setting that would change it.
    assert main(["train", "--output", out, "--resume", "--batch-size", "16"]) == 2
    assert "--batch-size 16 differs from the run being resumed (8)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("method", ["mae", "cmae", "lut"])
def test_mask_type_and_norm_pix_loss_reach_the_model(method):
    """--mask-type and --norm-pix-loss / --no-norm-pix-loss (unset: the method's own default)."""
    from fastmim.cli import build_parser
    from fastmim.train.methods import build_model, get_adapter, resolve_model

    adapter = get_adapter(method)
    for argv, masking, norm_pix_loss in ((["--mask-type", "block"], "block", method != "mae"),
                                         (["--no-norm-pix-loss"], "random", False),
                                         (["--norm-pix-loss", "--masking", "grid"], "grid", True)):
        args = vars(build_parser().parse_args(["train", *argv]))
        cfg = TrainConfig(**{k: v for k, v in args.items() if k in TrainConfig.__dataclass_fields__})
        kwargs, _, _ = resolve_model(cfg, adapter, 1, 3)
        with torch.device("meta"):
            if method == "lut" and masking != "random":  # its views cut one permutation per image
                with pytest.raises(TrainError, match="masking must be 'random' or 'official'"):
                    build_model(method, cfg.model, {**kwargs, "depth": 1})
                continue
            model = build_model(method, cfg.model, {**kwargs, "depth": 1})
        assert (model.masking, model.norm_pix_loss) == (masking, norm_pix_loss)
    # the official rule in training: the step's noise, argsorted (no seed / offset for it)
    torch.manual_seed(0)
    model = build_model(method, "vit_tiny_patch4_32", {**adapter.model_overrides(1, None, 3), **TINY,
                                                       "masking": "official"})
    views = [torch.randn(2, 1, 32, 32) for _ in range(adapter.num_views)]
    ctx = StepContext(step=1, max_steps=2, micro_step=0, mask_ratio=adapter.default_mask_ratio, seed=3)
    assert torch.isfinite(adapter.loss(model, {"views": views, "label": torch.tensor([0, 1])}, ctx)["loss"])
    # a config saved before --no-norm-pix-loss, where False meant "not asked for"
    assert TrainConfig.from_json({"method": "cmae", "norm_pix_loss": False}).norm_pix_loss is None


def test_bad_input_one_line_errors(tmp_path, cli_error):
    out = ["--output", str(tmp_path / "run"), "--max-steps", "1", "--no-progress", *TINY_ARGS]
    assert "does not exist" in cli_error(["train", "--data", str(tmp_path / "nope"), *out])
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in cli_error(["train", "--data", str(tmp_path / "empty"), *out])
    data = _image_folder(tmp_path / "data")
    (data / "class0" / "bad.png").write_bytes(b"garbage")
    assert "corrupt image" in cli_error(["train", "--data", str(data), "--on-corrupt", "error", *out])
    assert "not divisible by the patch size 4" in cli_error(["train", "--image-size", "30", *out])
    assert "unknown method 'maee'" in cli_error(["train", "--method", "maee", *out])
    assert "unknown preset 'vit_tiny_patch4_33'" in cli_error(["train", "--model", "vit_tiny_patch4_33", *out])
    assert "--mask-ratio must be in [0, 1), got 1.5" in cli_error(["train", "--mask-ratio", "1.5", *out])
    # A model's own validation (LUT's disjoint views need half the patches masked) is one line too.
    assert "mask_ratio" in cli_error(["train", "--method", "lut", "--mask-ratio", "0.3", "--batch-size", "2",
                                               "--output", str(tmp_path / "lut"), "--max-steps", "1", "--no-progress",
                                               "--no-figures", *TINY_ARGS])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = cli_error(["train", *out[2:], "--output", str(blocker / "run")])
    assert "not writable" in msg or "not a folder" in msg
    assert not (tmp_path / "run").exists()  # nothing was created by the attempts that failed early


def test_corrupt_file_skipped_with_warning(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    (data / "class1" / "bad.png").write_bytes(b"garbage")
    argv = ["train", "--data", str(data), "--output", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4",
            "--image-size", "16", "--no-progress", "--no-figures", *TINY_ARGS]
    with pytest.warns(UserWarning, match="skipped 1 corrupt image file"):
        assert main(argv) == 0


def test_existing_run_is_never_overwritten(tmp_path, cli_error):
    argv = ["train", "--output", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4", "--no-progress",
            "--no-figures", *TINY_ARGS]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert "already holds a training run" in cli_error(argv)
    # Resuming with another model: refused before anything is touched.
    assert "--model vit_tiny_patch8_64 differs" in cli_error([*argv, "--resume", "--model",
                                                                      "vit_tiny_patch8_64"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_resume_rejects_weights_of_another_model(tmp_path, cli_error):
    argv = ["train", "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--no-progress",
            "--no-figures", "--stop-after", "1", *TINY_ARGS]
    assert main(argv) == 0
    other = torch.nn.Linear(2, 2)
    meta = read_metadata(tmp_path / "run" / "checkpoint.safetensors")
    save_weights(other, tmp_path / "run" / "checkpoint.safetensors", meta)
    msg = cli_error(["train", "--output", str(tmp_path / "run"), "--resume", "--no-progress"])
    assert "does not fit mae vit_tiny_patch4_32" in msg


def test_small_image_folder_holds_out_one_image_per_class(tmp_path, capsys, cli_error):
    """Three images per class: 10% rounds to none, yet the figures need held-out images."""
    rest = ["--max-steps", "1", "--batch-size", "2", "--image-size", "16", "--no-progress", *TINY_ARGS]
    data = str(_image_folder(tmp_path / "data", per_class=3))
    assert main(["train", "--data", data, "--output", str(tmp_path / "run"), *rest]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "reconstruction.png").is_file()
    single = str(_image_folder(tmp_path / "single", per_class=1))
    msg = cli_error(["train", "--data", single, "--output", str(tmp_path / "single_run"), *rest])
    assert "one image per class, so none can be held out" in msg


def test_overwrite_replaces_a_run_and_only_its_files(tmp_path, cli_error):
    out = tmp_path / "run"
    argv = ["train", "--output", str(out), "--batch-size", "4", "--no-progress", "--no-figures", *TINY_ARGS]
    assert main([*argv, "--max-steps", "2"]) == 0
    (out / "eval.jsonl").write_text("{}\n")  # the old checkpoint's scores
    (out / "notes.txt").write_text("mine")
    assert "already holds a training run" in cli_error([*argv, "--max-steps", "1"])
    assert read_metadata(out / "checkpoint.safetensors")["step"] == 2
    assert "pass one of them" in cli_error([*argv, "--max-steps", "1", "--overwrite", "--resume"])
    # A replacement that cannot start leaves the old run.
    assert "cannot build" in cli_error([*argv, "--max-steps", "1", "--overwrite", "--model-arg", "bogus=1"])
    assert (out / "eval.jsonl").exists() and read_metadata(out / "checkpoint.safetensors")["step"] == 2
    assert main([*argv, "--max-steps", "1", "--overwrite"]) == 0
    assert read_metadata(out / "checkpoint.safetensors")["step"] == 1
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "eval.jsonl").exists() and (out / "notes.txt").read_text() == "mine"


def test_the_demo_command_runs_twice(tmp_path, capsys):
    """The Makefile's demo (the README's first command), shortened, into a temporary folder."""
    import shlex
    from pathlib import Path

    lines = (Path(__file__).parents[1] / "Makefile").read_text().splitlines()
    recipe = lines[lines.index("demo:") + 1].strip()
    words = shlex.split(recipe)
    argv = words[words.index("fastmim") + 1:]
    argv[argv.index("--output") + 1] = str(tmp_path / "demo")
    argv += ["--max-steps", "1", "--batch-size", "4", "--no-progress", "--no-figures", *TINY_ARGS]
    for _ in range(2):
        assert main(argv) == 0, capsys.readouterr().err


def test_resume_rejects_a_state_that_is_not_fastmims(tmp_path, cli_error):
    argv = ["train", "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--no-progress",
            "--no-figures", "--stop-after", "1", *TINY_ARGS]
    assert main(argv) == 0
    torch.save({"step": 1, "config": {}}, tmp_path / "run" / "train_state.pt")
    msg = cli_error(["train", "--output", str(tmp_path / "run"), "--resume", "--no-progress"])
    assert "lacks epoch, position, optimizer, rng" in msg


def test_train_error_is_a_value_error():
    assert issubclass(TrainError, ValueError)


@pytest.mark.slow
def test_ddp_and_fsdp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 4 each, against 1 process with batch 8: the
    same global batches, augmentations and masks, so the same losses and parameters up to
    the order of the gradient reduction."""
    import sys

    common = ["train", "--max-steps", "3", "--no-progress", "--no-figures", "--log-every", "1", "--seed", "3",
              "--blr", "1e-2", *TINY_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert main([*common, "--batch-size", "8", "--output", str(tmp_path / "one")]) == 0
    double = run_until_stalled([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fastmim", *common, "--batch-size", "4", "--output", str(tmp_path / "two")], env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "x 2 processes" in double.stderr
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    pa, pb = _params(tmp_path / "one" / "checkpoint.safetensors"), _params(tmp_path / "two" / "checkpoint.safetensors")
    assert pa.keys() == pb.keys()
    # Adam divides by the root of the squared gradient, so parameters whose gradient is pure
    # rounding noise (the key bias: softmax ignores it) move by +-lr either way: compare norms.
    flat_a, flat_b = torch.cat([pa[k].flatten() for k in pa]), torch.cat([pb[k].flatten() for k in pa])
    assert (flat_a - flat_b).norm() / flat_a.norm() < 1e-4
    from fastmim.models import create_model

    torch.manual_seed(3)
    initial = create_model("mae", "vit_tiny_patch4_32", in_chans=1, **TINY).state_dict()["blocks.0.mlp.fc1.weight"]
    moved = (pa["blocks.0.mlp.fc1.weight"] - initial).norm()
    assert moved > 100 * (pa["blocks.0.mlp.fc1.weight"] - pb["blocks.0.mlp.fc1.weight"]).norm()  # trained, alike
    assert json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]["world_size"] == 2

    # FSDP2 (sharded parameters and optimizer state), stopped after 2 steps and resumed: its
    # checkpoints hold the full states, so it continues to the same result.
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastmim"]
    fsdp_out = ["--output", str(tmp_path / "fsdp"), "--fsdp"]
    first = run_until_stalled([*launch, *common, "--batch-size", "4", "--stop-after", "2", *fsdp_out], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_until_stalled([*launch, "train", "--resume", "--no-progress", *fsdp_out], env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    sharded = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, sharded, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    pf = _params(tmp_path / "fsdp" / "checkpoint.safetensors")
    assert pf.keys() == pa.keys()
    flat_f = torch.cat([pf[k].flatten() for k in pa])
    assert (flat_a - flat_f).norm() / flat_a.norm() < 1e-4


def _object_folder(root, classes=3, per_class=6, size=20, seed=0):
    """A dark square on a light, slightly noisy background, somewhere else in each image: even
    an untrained ViT's heat maps single it out, so ContrastiveCrop's boxes are not all the
    whole image (on uniform noise they are)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = rng.integers(190, 230, (size, size, 3), dtype=np.uint8)
            side = int(rng.integers(6, 11))
            top, left = rng.integers(0, size - side, 2)
            array[top:top + side, left:left + side] = rng.integers(0, 30, 3, dtype=np.uint8)
            Image.fromarray(array).save(root / f"class{c}" / f"{i}.png")
    return root


# Tiny heads; LUT's teacher on a fast momentum (0.5 -> 1 over the run) so that it moves visibly.
TWO_VIEW_MODELS = {"lut": {"head_hidden_dim": 32, "ema_momentum": 0.5}, "cmae": {"proj_hidden_dim": 32, "proj_dim": 16}}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lut", "cmae"])
def test_two_view_methods_under_ddp_and_fsdp_match_one_process(tmp_path, method):
    """LUT (EMA teacher updated from FSDP's shards) and CMAE (ContrastiveCrop boxes computed by
    the sharded model, gathered negatives), 2 gloo processes of batch 4 under DDP and under
    FSDP2 against 1 process of batch 8: the same losses, parts, parameters, teacher and boxes.
    15 train images make each step an epoch, so ContrastiveCrop's default schedule (warm-up and
    period 20% of the 3 epochs: 1) recomputes the boxes before steps 2 and 3, over shares of 8
    and 7 (+1 repeated) images. The FSDP run stops after step 1 and resumes: its first box
    update is then the resumed model's first pass, before any training forward."""
    import sys

    from fastmim.models import create_model
    from fastmim.train.checkpoint import STATE_NAME, load_state

    data = _object_folder(tmp_path / "data")
    model_kwargs = {**TINY, "patch_size": 4, **TWO_VIEW_MODELS[method]}
    common = ["train", "--method", method, "--data", str(data), "--image-size", "16", "--max-steps", "3",
              "--no-progress", "--no-figures", "--log-every", "1", "--seed", "3", "--blr", "1e-2",
              *[a for k, v in model_kwargs.items() for a in ("--model-arg", f"{k}={v}")]]
    assert main([*common, "--batch-size", "8", "--output", str(tmp_path / "one")]) == 0
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    pa = _params(tmp_path / "one" / "checkpoint.safetensors")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastmim"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torch.manual_seed(3)
    initial = create_model(method, "vit_tiny_patch4_32", in_chans=3, img_size=16, **model_kwargs).state_dict()
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp", "--stop-after", "1"])):
        out = tmp_path / name
        run = run_until_stalled([*launch, *common, "--batch-size", "4", "--output", str(out), *flags], env=env)
        assert run.returncode == 0, (name, run.stderr[-3000:])
        if name == "fsdp":
            resume = ["train", "--resume", "--no-progress", "--log-every", "1", "--output", str(out)]
            run = run_until_stalled([*launch, *resume], env=env)
            assert run.returncode == 0, (name, run.stderr[-3000:])
        two = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
        for a, b in zip(one, two, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (name, a, b)
            assert b["parts"].keys() == a["parts"].keys()
            for part, value in a["parts"].items():
                assert b["parts"][part] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, part, a, b)
        pb = _params(out / "checkpoint.safetensors")
        assert pb.keys() == pa.keys()
        flat_a, flat_b = torch.cat([pa[k].flatten() for k in pa]), torch.cat([pb[k].flatten() for k in pa])
        assert (flat_a - flat_b).norm() / flat_a.norm() < 1e-4, name
        if method == "lut":
            # The rows of the teacher's copies of parameters that rank 1 holds under FSDP (from
            # ceil(N / 2) on), in the teacher rank 0 saved: moved from the start (the student's
            # initial weights) as in one process. Not 1e-4: the key weights and bias, whose gradient
            # is rounding noise, take Adam steps of +-lr either way, about 1e-3 of the movement;
            # rows the gather missed would differ by all of it.
            rows = [k for k in pa if k.startswith("teacher.") and "running_" not in k and pa[k].shape[0] > 1]
            rank1 = {k: slice(-(-pa[k].shape[0] // 2), None) for k in rows}
            moved = torch.cat([(pa[k] - initial[k[len("teacher."):]])[rank1[k]].flatten() for k in rows])
            differ = torch.cat([(pa[k] - pb[k])[rank1[k]].flatten() for k in rows])
            assert moved.norm() > 0 and differ.norm() < 1e-2 * moved.norm(), (name, differ.norm(), moved.norm())
        else:
            boxes_a = load_state(tmp_path / "one" / STATE_NAME)["adapter"]["contrastive_crop"]
            boxes_b = load_state(out / STATE_NAME)["adapter"]["contrastive_crop"]
            assert boxes_a["boxes_epoch"] == boxes_b["boxes_epoch"] == 2 and boxes_b["use_boxes"]
            assert boxes_a["boxes"].shape == (15, 4)
            assert torch.equal(boxes_a["boxes"], boxes_b["boxes"]), name
            assert (boxes_a["boxes"] != torch.tensor([0.0, 0.0, 1.0, 1.0])).any(dim=1).sum() >= 5


def test_init_from_official_starts_at_its_weights_optimizer_and_step(tmp_path, train_config):
    """A new run from an official main_pretrain.py checkpoint: its weights and AdamW state are
    the run's start and its optimizer steps count as done (the schedule goes on from there)."""
    import argparse

    from timm.optim import param_groups_weight_decay

    from fastmim.models import create_model
    from fastmim.train.checkpoint import load_state, read_weights

    torch.manual_seed(5)
    official = create_model("mae", "vit_tiny_patch4_32", in_chans=1, fused=False, **TINY)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(official, 0.05), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(2):
        loss, _, _ = official(torch.randn(4, 1, 32, 32), 0.75)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path / "checkpoint-1.pth"
    torch.save({"model": official.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "scaler": None,
                "args": argparse.Namespace(blr=1e-3, batch_size=4)}, path)

    # max_steps = the official steps: nothing left to train, the saved weights are the official ones.
    done = train(train_config(output=str(tmp_path / "start"), max_steps=2, init_from_official=str(path),
                         figures=False))
    assert done.step == 2 and done.finished
    saved = read_weights(tmp_path / "start" / "checkpoint.safetensors")
    for name, tensor in official.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    assert load_state(tmp_path / "start" / "train_state.pt")["step"] == 2

    # Two more steps: records from step 3, Adam's step counts going on from 2.
    more = train(train_config(output=str(tmp_path / "more"), max_steps=4, log_every=1,
                         init_from_official=str(path), figures=False))
    steps = [json.loads(x)["step"] for x in (tmp_path / "more" / "metrics.jsonl").read_text().splitlines()]
    assert more.step == 4 and steps == [3, 4]
    adam_steps = {int(s["step"]) for s in load_state(tmp_path / "more" / "train_state.pt")["optimizer"]["state"]
                  .values()}
    assert adam_steps == {4}
    with pytest.raises(TrainError, match="--method mae"):
        train(train_config(output=str(tmp_path / "lut"), method="lut", init_from_official=str(path)))
