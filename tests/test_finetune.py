"""MAE's fine-tuning recipe: layer-wise lr decay, mixup / cutmix with label smoothing, drop path,
global pool vs cls; the Python API (fastmim.train.finetune) and fastmim eval --protocol finetune."""

import json

import pytest
import torch
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from fastmim.cli import main
from fastmim.data import EvalTransform, RandomResizedCropSampler, ViewTransform, open_data
from fastmim.models import create_model
from fastmim.train import FinetuneConfig, finetune, param_groups_lrd
from fastmim.train.checkpoint import save_weights
from fastmim.train.evaluate import subset_indices

TINY = dict(in_chans=1, depth=2, embed_dim=48, num_heads=3, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundled():
    source = open_data("default", channels=1)
    crop = RandomResizedCropSampler(scale=(0.5, 1.0))
    train = source.split("train", [ViewTransform(32, source.mean, source.std, crop_sampler=crop)])
    test = source.split("test", [EvalTransform(32, source.mean, source.std, source.eval_crop_pct)])
    return source, train, test


def test_param_groups_follow_the_official_layer_decay_rule():
    model = create_model("mae", "vit_tiny_patch4_32", **TINY)
    model.pos_embed.requires_grad_(True)
    head = nn.Linear(48, 10)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith(("decoder_", "mask_token"))]
    groups = param_groups_lrd([*named, *[(f"head.{n}", p) for n, p in head.named_parameters()]], num_layers=2,
                              weight_decay=0.05, layer_decay=0.5)
    by_name = {name: g for g in groups for name in g["names"]}
    expected_layer = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 1,
                      "blocks.1.mlp.fc2.bias": 2, "norm.weight": 3, "head.weight": 3}
    for name, layer in expected_layer.items():
        assert by_name[name]["layer_id"] == layer, name
        assert by_name[name]["lr_scale"] == 0.5 ** (2 + 1 - layer), name  # decay ** (num_layers + 1 - layer_id)
    params = dict([*named, *[(f"head.{n}", p) for n, p in head.named_parameters()]])
    assert set(by_name) == set(params)
    for name, group in by_name.items():  # no weight decay on 1-D parameters (biases, norms), cls and pos
        no_decay = params[name].ndim == 1 or name in ("cls_token", "pos_embed")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert by_name["head.weight"]["weight_decay"] == by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05


def test_short_finetune_with_layer_decay_mixup_cutmix_and_drop_path(bundled, monkeypatch):
    _, train, test = bundled
    targets = []
    forward = SoftTargetCrossEntropy.forward

    def spy(self, x, target):
        targets.append(target.detach().clone())
        return forward(self, x, target)

    monkeypatch.setattr(SoftTargetCrossEntropy, "forward", spy)
    model = create_model("mae", "vit_tiny_patch4_32", **TINY)
    result = finetune(model, None, train, test, num_classes=10, epochs=3, batch_size=32, blr=1e-2, layer_decay=0.75,
                      mixup=0.8, cutmix=1.0, label_smoothing=0.1, drop_path=0.1, pool="avg",
                      train_indices=subset_indices(train.labels, 1024), test_indices=subset_indices(test.labels, 300))
    assert len(result.losses) == 3 * 32
    # Layer-wise decay: each group's lr is the schedule's times decay ** (depth + 1 - layer_id).
    for group, summary in zip(result.optimizer.param_groups, result.param_groups, strict=True):
        assert summary["lr_scale"] == pytest.approx(0.75 ** (3 - summary["layer_id"]))
        assert group["lr"] == pytest.approx(result.lrs[-1] * summary["lr_scale"])
    layers = {name: s["layer_id"] for s in result.param_groups for name in s["names"]}
    assert layers["pos_embed"] == 0 and layers["blocks.1.attn.qkv.weight"] == 2 and layers["fc_norm.weight"] == 3
    assert "norm.weight" not in layers and not any(n.startswith("decoder_") for n in layers)  # global pool: fc_norm
    # Mixup / cutmix: soft targets, two classes mixed, smoothed.
    assert len(targets) == len(result.losses)
    t = torch.cat(targets)
    torch.testing.assert_close(t.sum(1), torch.ones(t.shape[0]))
    assert (t.max(1).values < 0.95).float().mean() > 0.8
    assert ((t > 0.1 / 10 + 1e-4).sum(1) >= 2).float().mean() > 0.8
    # It learns: the loss falls and held-out accuracy beats chance (10%).
    assert sum(result.losses[-16:]) / 16 < sum(result.losses[:16]) / 16 - 0.05, result.losses
    assert result.top1 > 0.15, result.top1
    # The model's own settings are back: no drop path, fixed position embedding.
    assert isinstance(model.blocks[1].drop_path1, nn.Identity) and not model.pos_embed.requires_grad


def test_finetune_config_checks_and_the_official_recipe():
    official = FinetuneConfig.official()
    assert (official.layer_decay, official.mixup, official.cutmix, official.drop_path, official.pool) == (
        0.65, 0.8, 1.0, 0.1, "avg")
    for bad, match in ((dict(layer_decay=0), "layer_decay"), (dict(mixup=0.8, batch_size=7), "even batch"),
                       (dict(pool="max"), "pool"), (dict(drop_path=1.0), "drop path")):
        with pytest.raises(ValueError, match=match):
            FinetuneConfig(**bad).validate()


def _checkpoint(tmp_path, source):
    model = create_model("mae", "vit_tiny_patch4_32", **TINY)
    path = tmp_path / "checkpoint.safetensors"
    save_weights(model, path, {"method": "mae", "preset": "vit_tiny_patch4_32", "model_kwargs": TINY,
                               "data": "default", "channels": 1, "image_size": 32, "mean": list(source.mean),
                               "std": list(source.std), "step": 0})
    return path


def test_eval_finetune_protocol_takes_the_recipe_flags(tmp_path, bundled, capsys):
    path = _checkpoint(tmp_path, bundled[0])
    argv = ["eval", "--checkpoint", str(path), "--protocol", "finetune", "--limit-train", "64", "--limit-test", "64",
            "--finetune-epochs", "1", "--finetune-batch-size", "16"]
    recipe = ["--layer-decay", "0.75", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.2", "--drop-path",
              "0.1", "--pool", "avg"]
    assert main([*argv, *recipe]) == 0
    assert "layer decay 0.75, mixup 0.8, cutmix 1" in capsys.readouterr().out
    record = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[-1])
    assert record["protocol"] == "finetune" and record["pool"] == "avg" and 0.0 <= record["top1"] <= 1.0
    assert record["finetune"] == {"epochs": 1, "batch_size": 16, "blr": 5e-4, "layer_decay": 0.75, "mixup": 0.8,
                                  "cutmix": 1.0, "label_smoothing": 0.2, "drop_path": 0.1}
    for bad, message in ((["--layer-decay", "1.5"], "layer_decay must be in (0, 1]"),
                         (["--mixup", "0.8", "--finetune-batch-size", "15"], "even batch size")):
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
