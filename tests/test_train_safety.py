"""Training safety: a step with a non-finite loss or gradient is skipped, without a host sync;
a checkpoint is never broken and never replaces a good one; every load verifies checksums
and finiteness; impossible settings fail before training."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save_file

import fastmim
from fastmim.cli import main
from fastmim.testing import TINY_TRAIN_MODEL_ARGS as TINY_ARGS
from fastmim.train import loop
from fastmim.train.checkpoint import (
    CHECKPOINT_NAME,
    STATE_NAME,
    load_state,
    load_weights,
    read_metadata,
    read_weights,
    save_weights,
    save_weights_dict,
)
from fastmim.train.loop import train
from fastmim.train.methods import LUTAdapter, MAEAdapter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def train_defaults():
    """train_config's defaults here (tests/conftest.py): short runs, a record each step, no figures."""
    return {"max_steps": 4, "batch_size": 4, "log_every": 1, "figures": False}



def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _nan_loss_on(monkeypatch, adapter_cls, steps: set[int]) -> None:
    """``adapter_cls.loss`` returns nan at the (1-based) optimizer steps in ``steps``, once each:
    a step retried after a rollback is fine."""
    original = adapter_cls.loss

    def loss(self, model, batch, ctx):
        out = original(self, model, batch, ctx)
        if ctx.step + 1 in steps:
            steps.discard(ctx.step + 1)
            return {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(adapter_cls, "loss", loss)


def _optimizer_steps(run: Path) -> set[float]:
    return {float(s["step"]) for s in load_state(run / STATE_NAME)["optimizer"]["state"].values()}


# ------------------------------------------------------------------------------- divergence

def test_a_diverging_run_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, capsys, cli_error):
    """lr 1e20 with a checkpoint every step: step 1 is the last one whose loss is finite; every
    later step is skipped, none of them replaces its checkpoint, and the run fails at the end."""
    run = tmp_path / "run"
    written = []
    real_save = loop.save_checkpoint

    def recording(folder, weights, metadata, state):
        real_save(folder, weights, metadata, state)
        written.append((state["step"], (run / CHECKPOINT_NAME).read_bytes(), (run / STATE_NAME).read_bytes()))

    monkeypatch.setattr(loop, "save_checkpoint", recording)
    argv = ["train", "--output", str(run), "--lr", "1e20", "--ckpt-every", "1", "--max-steps", "8", "--max-skips", "4",
            "--batch-size", "4", "--log-every", "1", "--no-progress", "--no-figures", *TINY_ARGS]
    with pytest.warns(UserWarning, match=r"the last 4 steps \(to step 5\) .* were skipped; going on"):
        msg = cli_error(argv)
    assert "the last 7 steps (to step 8) had a non-finite loss or gradient" in msg
    assert f"the checkpoint of step 1 in {run} is kept" in msg
    assert [step for step, _, _ in written] == [1]
    assert (run / CHECKPOINT_NAME).read_bytes() == written[0][1] and (run / STATE_NAME).read_bytes() == written[0][2]
    assert all(torch.isfinite(t).all() for t in read_weights(run / CHECKPOINT_NAME).values())
    assert [r["skipped"] for r in _records(run)] == list(range(8))
    # It resumes; its next step is skipped too (the settings' fault, not the checkpoint's).
    assert main(["train", "--output", str(run), "--resume", "--stop-after", "1", "--no-progress"]) == 0
    assert "1 skipped" in capsys.readouterr().err
    good, resumed = load(written[0][1]), load_file(str(run / CHECKPOINT_NAME))
    assert read_metadata(run / CHECKPOINT_NAME)["step"] == 2 and all(torch.equal(good[k], resumed[k]) for k in good)


def test_impossible_settings_are_one_line_errors_before_anything_is_written(tmp_path, cli_error):
    out = ["--output", str(tmp_path / "run"), "--max-steps", "1", "--no-progress", *TINY_ARGS]
    for args, expected in ((["--blr", "inf"], "--blr must be a finite number, got inf"),
                           (["--lr", "nan"], "--lr must be a finite number, got nan"),
                           (["--lr", "1e38"], "--lr 1e+38 overflows AdamW's float32 arithmetic"),
                           (["--blr", "1e308"], "--blr 1e+308 (lr 2.5e+307) overflows"),
                           (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
                           (["--min-lr", "-1"], "--min-lr must be >= 0"),
                           (["--max-skips", "0"], "--max-skips must be positive"),
                           (["--on-nonfinite", "rollback"], "pass --ckpt-every N too"),
                           (["--device", "tpu"], "--device tpu is not a device name")):
        assert expected in cli_error(["train", *args, *out])
    assert not (tmp_path / "run").exists()
    msg = cli_error(["eval", "--checkpoint", str(tmp_path / "run"), "--device", "tpu"])
    assert "--device tpu is not a device name" in msg


def test_a_skipped_step_changes_nothing_and_is_counted(tmp_path, train_config, monkeypatch, capsys):
    """The nan step 3 leaves weights and optimizer state (step count included) bit-identical to
    step 2's; the records count it, the progress bar shows it, and the next steps train."""
    reference = train(train_config(output=str(tmp_path / "ref"), max_steps=6, stop_after=2))
    nan_steps = {3}
    _nan_loss_on(monkeypatch, MAEAdapter, nan_steps)
    skipped = train(train_config(max_steps=6, stop_after=3))
    assert reference.skipped == 0 and skipped.skipped == 1 and skipped.step == 3
    run, ref = tmp_path / "run", tmp_path / "ref"
    a, b = load_file(str(ref / CHECKPOINT_NAME)), load_file(str(run / CHECKPOINT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = load_state(ref / STATE_NAME)["optimizer"]["state"]
    state_b = load_state(run / STATE_NAME)["optimizer"]["state"]
    for i in state_a:
        assert all(torch.equal(state_a[i][k], state_b[i][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert _optimizer_steps(run) == {2.0}

    resumed = train(train_config(max_steps=6, resume=True, progress=True))
    assert resumed.finished and resumed.skipped == 1 and math.isfinite(resumed.loss)
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert "loss" not in records[2] and all(math.isfinite(r["loss"]) for r in records if r["step"] != 3)
    assert _optimizer_steps(run) == {5.0}
    err = capsys.readouterr().err
    assert "skipped=1" in err and "1 skipped (non-finite loss or gradient)" in err


def test_an_ema_teacher_takes_in_nothing_from_a_skipped_step(tmp_path, train_config, monkeypatch):
    _nan_loss_on(monkeypatch, LUTAdapter, {2})
    result = train(train_config(method="lut", max_steps=3))
    assert result.finished and result.skipped == 1
    tensors = read_weights(tmp_path / "run" / CHECKPOINT_NAME)  # refuses non-finite ones
    assert any(name.startswith("teacher.") for name in tensors)
    assert _optimizer_steps(tmp_path / "run") == {2.0}


def test_stop_ends_with_one_line_after_max_skips(tmp_path, monkeypatch, cli_error):
    _nan_loss_on(monkeypatch, MAEAdapter, set(range(3, 9)))
    argv = ["train", "--output", str(tmp_path / "run"), "--max-steps", "8", "--batch-size", "4", "--log-every", "1",
            "--ckpt-every", "2", "--on-nonfinite", "stop", "--max-skips", "3", "--no-progress", "--no-figures",
            *TINY_ARGS]
    msg = cli_error(argv)
    assert "the last 3 steps (to step 5) had a non-finite loss or gradient and were skipped" in msg
    assert "training diverged" in msg and "the checkpoint of step 2" in msg
    # Step 4 was skipped, so its checkpoint was not written over step 2's.
    assert read_metadata(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 2


def test_rollback_reloads_the_last_checkpoint_with_a_fresh_data_order(tmp_path, train_config, monkeypatch):
    """Steps 5 and 6 are nan on their first try: at step 6 the run goes back to its step-3
    checkpoint and retries with other batches, to the end. A copy stopped at step 7 and resumed
    ends with the same weights: the rollback count travels in the state."""
    batches = []
    original = MAEAdapter.loss

    def recording(self, model, batch, ctx):
        batches.append((ctx.step + 1, batch["index"].tolist()))
        return original(self, model, batch, ctx)

    monkeypatch.setattr(MAEAdapter, "loss", recording)
    common = {"max_steps": 8, "ckpt_every": 3, "max_skips": 2, "on_nonfinite": "rollback"}
    _nan_loss_on(monkeypatch, MAEAdapter, {5, 6})
    with pytest.warns(UserWarning, match="to step 6.*rolled back to the checkpoint of step 3, going on with a fresh"):
        result = train(train_config(**common))
    assert result.finished and result.step == 8 and result.skipped == 2
    run = tmp_path / "run"
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4, 5, 6, 7, 8]
    assert records[3] == {"step": 3, "rolled_back_from": 6, "rollbacks": 1, "skipped": 2}
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    tries_of_step_4 = [indices for step, indices in batches if step == 4]
    assert len(tries_of_step_4) == 2 and tries_of_step_4[0] != tries_of_step_4[1]
    assert load_state(run / STATE_NAME)["rollbacks"] == 1

    _nan_loss_on(monkeypatch, MAEAdapter, {5, 6})
    with pytest.warns(UserWarning, match="rolled back"):
        train(train_config(output=str(tmp_path / "part"), stop_after=7, **common))
    train(train_config(output=str(tmp_path / "part"), resume=True, **common))
    a, b = load_file(str(run / CHECKPOINT_NAME)), load_file(str(tmp_path / "part" / CHECKPOINT_NAME))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("clip_grad", [None, 1.0])
def test_the_guard_adds_no_host_sync_per_step(train_config, monkeypatch, clip_grad):
    """Reading a tensor's value on the host (``.item()``, ``bool()``, ``.cpu()``, ...) from the
    training code happens at the metrics records, never in the steps between them. (The model's
    ops and the data pipeline read host tensors of their own: they are not the loop's.)"""
    package, train_package = Path(fastmim.__file__).parent, Path(loop.__file__).parent
    finished_step = [0]
    reads = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(f"{package}{os.sep}"):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(f"{train_package}{os.sep}"):
                reads.append((finished_step[0], name))
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    after_step = MAEAdapter.after_step

    def note_step(self, module, ctx):
        after_step(self, module, ctx)
        finished_step[0] = ctx.step + 1

    monkeypatch.setattr(MAEAdapter, "after_step", note_step)
    train(train_config(max_steps=8, log_every=4, clip_grad=clip_grad))
    # A read tagged k comes after step k's update and before step k + 1's: records follow steps 1, 4, 8.
    assert [read for read in reads if read[0] not in (0, 1, 4, 8)] == []
    assert any(step == 4 for step, _ in reads)  # the record's one read is seen


# ---------------------------------------------------------------------------- verified loads

def _short_run(train_config) -> Path:
    cfg = train_config(max_steps=2, stop_after=1)
    train(cfg)
    return Path(cfg.output)


def test_eval_and_resume_refuse_nonfinite_weights_naming_the_tensor(train_config, cli_error):
    run = _short_run(train_config)
    path = run / CHECKPOINT_NAME
    tensors = load_file(str(path))
    # As a run before this guard wrote them: every value nan, with a valid checksum.
    save_weights_dict({k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in tensors.items()},
                      path, read_metadata(path))
    first = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    msg = cli_error(["eval", "--checkpoint", str(run), "--limit-train", "20", "--limit-test", "10"])
    assert f"holds non-finite weights (nan or inf) in {first}" in msg
    msg = cli_error(["train", "--output", str(run), "--resume", "--no-progress"])
    assert f"holds non-finite weights (nan or inf) in {first}" in msg


def _flip_16_bytes(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + 16] = bytes(b ^ 0xFF for b in data[offset:offset + 16])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_detected_by_resume_and_eval(train_config, cli_error):
    run = _short_run(train_config)
    weights, state = run / CHECKPOINT_NAME, run / STATE_NAME
    good = weights.read_bytes()
    (header_size,) = struct.unpack("<Q", good[:8])
    _flip_16_bytes(weights, 8 + header_size + 64)  # in the tensor data
    msg = cli_error(["eval", "--checkpoint", str(run), "--limit-train", "20", "--limit-test", "10"])
    assert f"{weights} is corrupt: its tensor data does not match the checksum" in msg
    msg = cli_error(["train", "--output", str(run), "--resume", "--no-progress"])
    assert f"{weights} is corrupt" in msg

    weights.write_bytes(good)
    with zipfile.ZipFile(state) as archive:  # the largest record: an optimizer tensor's bytes
        record = max(archive.infolist(), key=lambda info: info.file_size)
    with open(state, "rb") as f:
        f.seek(record.header_offset + 26)
        name_size, extra_size = struct.unpack("<HH", f.read(4))
    _flip_16_bytes(state, record.header_offset + 30 + name_size + extra_size + 64)
    assert load_state(state)["step"] == 1  # torch.load itself does not notice
    msg = cli_error(["train", "--output", str(run), "--resume", "--no-progress"])
    assert f"{state} is corrupt: it does not match the checksum recorded in {weights}" in msg


def test_a_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "old.safetensors"
    save_file(model.state_dict(), str(path), metadata={"fastmim": json.dumps({"format": "fastmim-checkpoint-1"})})
    copy = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="has no checksum"):
        load_weights(copy, path)
    assert torch.equal(copy.weight, model.weight)
    save_weights(model, path, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_weights(copy, path)


def test_a_run_saved_before_checksums_resumes_with_a_warning(train_config):
    """As an older version left it: no checksums or skip counts, a foreach AdamW's state."""
    run = _short_run(train_config)
    state = load_state(run / STATE_NAME)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=None, foreach=None)
    del state["skipped"], state["rollbacks"]
    torch.save(state, run / STATE_NAME)
    meta = {k: v for k, v in read_metadata(run / CHECKPOINT_NAME).items() if not k.endswith("_sha256")}
    save_file(load_file(str(run / CHECKPOINT_NAME)), str(run / CHECKPOINT_NAME),
              metadata={"fastmim": json.dumps(meta)})
    with pytest.warns(UserWarning, match="has no checksum"):
        result = train(train_config(max_steps=2, resume=True))
    assert result.finished and result.skipped == 0 and _optimizer_steps(run) == {2.0}


LEFTOVERS = (".checkpoint.safetensors.k2j4h5g6.tmp", "..train_state.pt.pending.abcdefgh.tmp",
             ".train_state.pt.zzzzzzzz.tmp", ".metrics.jsonl.q1w2e3r4.tmp")


def test_leftover_temporary_files_are_removed_and_the_pair_shares_permissions(train_config):
    umask = os.umask(0o027)
    try:
        run = _short_run(train_config)
    finally:
        os.umask(umask)
    assert {(run / name).stat().st_mode & 0o777 for name in (CHECKPOINT_NAME, STATE_NAME)} == {0o640}
    mine = ("notes.tmp", ".checkpoint.safetensors.bak")
    for name in (*LEFTOVERS, *mine):
        (run / name).write_bytes(b"\0" * 1000)
    train(train_config(max_steps=2, resume=True))
    assert not any((run / name).exists() for name in LEFTOVERS) and all((run / name).exists() for name in mine)
    for name in LEFTOVERS:
        (run / name).write_bytes(b"\0" * 1000)
    train(train_config(max_steps=1, overwrite=True))
    assert not any((run / name).exists() for name in LEFTOVERS) and all((run / name).exists() for name in mine)
