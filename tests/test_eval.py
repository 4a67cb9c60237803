"""fastmim.train.evaluate and ``fastmim eval``: k-NN, linear probe, checkpoint loading, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fastmim.cli import main
from fastmim.train.checkpoint import read_metadata, save_weights
from fastmim.train.config import TrainConfig
from fastmim.train.evaluate import (
    evaluation_data,
    knn_accuracy,
    knn_predict,
    linear_probe,
    load_checkpoint,
    subset_indices,
)
from fastmim.train.loop import train

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3, "decoder_embed_dim": 32, "decoder_depth": 1,
        "decoder_num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _clusters(n_per_class, num_classes, dim, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=g)
    return feats, labels


def test_knn_on_separated_clusters_and_scale_invariance():
    train_f, train_y = _clusters(30, 5, 16, seed=0)
    test_f, test_y = _clusters(10, 5, 16, seed=1)
    assert knn_accuracy(train_f, train_y, test_f, test_y, num_classes=5) == 1.0
    # Cosine similarity: rescaling a feature changes nothing.
    assert torch.equal(knn_predict(train_f * 7.0, train_y, test_f * 0.1, num_classes=5),
                       knn_predict(train_f, train_y, test_f, num_classes=5))


def test_knn_votes_are_temperature_weighted():
    # One very close neighbour of class 1 against two farther ones of class 0.
    train_f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_y = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train_f, train_y, query, num_classes=2, k=3, temperature=0.07).item() == 1  # weighted
    assert knn_predict(train_f, train_y, query, num_classes=2, k=3, temperature=100.0).item() == 0  # ~majority
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_predict(train_f, train_y, query, num_classes=2, k=0)


def test_linear_probe_learns_a_linear_rule():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(600, 12, generator=g) * 5 + 3  # off-centre, badly scaled: BatchNorm copes
    labels = (feats[:, 0] - 3 > 0).long() + 2 * (feats[:, 1] - 3 > 0).long()
    acc = linear_probe(feats[:500], labels[:500], feats[500:], labels[500:], num_classes=4, epochs=30)
    assert acc > 0.85  # chance: 0.25


def test_subset_indices_keep_every_class():
    labels = torch.arange(10).repeat_interleave(50)
    idx = subset_indices(labels, 100)
    assert len(idx) == 100 and torch.bincount(labels[idx]).tolist() == [10] * 10
    assert subset_indices(labels, None) == list(range(500))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny MAE trained briefly on the bundled data (300 steps: enough for its k-NN accuracy
    to clear the untrained encoder's by a margin at seeds 0-3, 7 to 14 points)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    train(TrainConfig(output=str(out), max_steps=300, batch_size=32, blr=1.5e-2, num_workers=0, progress=False,
                      figures=False, model_overrides=dict(TINY), log_every=50))
    return out


def test_knn_of_a_trained_checkpoint_beats_an_untrained_encoder(trained_run, tmp_path, capsys):
    """The same evaluation of the run's initial weights is the baseline. Its k-NN is well above
    chance (10%) too, random patch embeddings of silhouettes being informative, so beating
    chance alone would not show that training (or the checkpoint loading) worked."""
    from fastmim.train.methods import build_model

    meta = read_metadata(trained_run / "checkpoint.safetensors")
    torch.manual_seed(0)  # the run's seed: its initial weights
    untrained = tmp_path / "untrained.safetensors"
    save_weights(build_model(meta["method"], meta["preset"], meta["model_kwargs"]), untrained, {**meta, "step": 0})
    args = ["--protocol", "all", "--limit-train", "2000", "--limit-test", "500", "--probe-epochs", "30"]
    scores = {}
    for name, ckpt in (("trained", trained_run), ("untrained", untrained)):
        log = tmp_path / f"{name}.jsonl"
        assert main(["eval", "--checkpoint", str(ckpt), *args, "--log", str(log)]) == 0
        out = capsys.readouterr().out
        assert "knn top-1:" in out and "linear top-1:" in out
        scores[name] = {r["protocol"]: r for r in map(json.loads, log.read_text().splitlines())}
    trained, baseline = scores["trained"], scores["untrained"]
    assert trained["knn"]["num_test"] == 500 and trained["knn"]["num_train"] == 2000
    assert trained["knn"]["step"] == 300 and baseline["knn"]["step"] == 0
    assert baseline["knn"]["top1"] > 0.3, baseline  # the pipeline itself: features and labels line up
    assert trained["knn"]["top1"] > baseline["knn"]["top1"] + 0.04, (trained, baseline)
    # A linear probe reads random features about as well (within 1-8 points at seeds 0-3).
    assert trained["linear"]["top1"] > 0.5, trained


def test_load_checkpoint_rebuilds_the_model(trained_run):
    ckpt = load_checkpoint(trained_run)
    assert ckpt.metadata["method"] == "mae" and ckpt.adapter.name == "mae"
    assert not ckpt.module.training
    feats = ckpt.module.encode(torch.randn(3, 1, 32, 32))
    assert feats.shape == (3, TINY["embed_dim"])


def test_eval_at_another_image_size(trained_run, tmp_path, capsys):
    """--image-size: the features of larger images, the position embeddings resampled for them."""
    log = tmp_path / "eval.jsonl"
    assert main(["eval", "--checkpoint", str(trained_run), "--image-size", "48", "--limit-train", "200",
                 "--limit-test", "100", "--log", str(log)]) == 0
    (record,) = map(json.loads, log.read_text().splitlines())
    assert record["image_size"] == 48 and 0.1 < record["top1"] <= 1.0
    capsys.readouterr()
    assert "multiple of the model's patch size 4" in _eval_error(capsys, ["eval", "--checkpoint", str(trained_run),
                                                                          "--image-size", "30"])


def _eval_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_eval_bad_input(tmp_path, trained_run, capsys):
    assert "does not exist" in _eval_error(capsys, ["eval", "--checkpoint", str(tmp_path / "none.safetensors")])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert "without fastmim metadata" in _eval_error(capsys, ["eval", "--checkpoint", str(foreign)])
    # Weights of another model under fastmim metadata: a clear mismatch, not a crash.
    meta = read_metadata(trained_run / "checkpoint.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_weights(torch.nn.Linear(4, 4), wrong, meta)
    assert "does not fit mae vit_tiny_patch4_32" in _eval_error(capsys, ["eval", "--checkpoint", str(wrong)])
    ckpt = str(trained_run / "checkpoint.safetensors")
    assert "unknown --protocol" in _eval_error(capsys, ["eval", "--checkpoint", ckpt, "--protocol", "svm"])
    assert "--k must be >= 1" in _eval_error(capsys, ["eval", "--checkpoint", ckpt, "--k", "0"])
    assert "does not exist" in _eval_error(capsys, ["eval", "--checkpoint", ckpt, "--data", str(tmp_path / "x")])
    assert "--finetune-blr must be positive" in _eval_error(capsys, ["eval", "--checkpoint", ckpt, "--protocol",
                                                                     "finetune", "--finetune-blr", "0"])
    # Found only after fine-tuning, by the DataLoader of the held-out images, until checked up front.
    assert "--num-workers must be >= 0" in _eval_error(capsys, [
        "eval", "--checkpoint", ckpt, "--protocol", "finetune", "--num-workers", "-1", "--limit-train", "8",
        "--limit-test", "8", "--finetune-epochs", "1", "--finetune-batch-size", "8"])
    # A fastmim checkpoint whose metadata lacks what rebuilding or scoring the model reads.
    module = load_checkpoint(trained_run).module
    for key in ("preset", "image_size"):
        partial = tmp_path / f"no_{key}.safetensors"
        save_weights(module, partial, {k: v for k, v in meta.items() if k not in (key, "format")})
        msg = _eval_error(capsys, ["eval", "--checkpoint", str(partial)])
        assert f"lacks the metadata {key}" in msg


def test_supervised_checkpoint_classifier_and_finetune(tmp_path, capsys):
    out = tmp_path / "sup"
    train(TrainConfig(method="supmim", output=str(out), max_steps=60, batch_size=32, blr=1e-2, num_workers=0,
                      progress=False, figures=False, model_overrides=dict(TINY), log_every=10))
    assert read_metadata(out / "checkpoint.safetensors")["model_kwargs"]["num_classes"] == 10
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(out), "--limit-test", "300"]
    assert "--num-workers must be >= 0" in _eval_error(capsys, [*argv, "--protocol", "classifier", "--num-workers",
                                                                "-1"])
    assert main([*argv, "--protocol", "classifier"]) == 0
    assert main([*argv, "--protocol", "finetune", "--limit-train", "256", "--finetune-epochs", "1",
                 "--finetune-batch-size", "32"]) == 0
    records = {r["protocol"]: r for r in map(json.loads, (out / "eval.jsonl").read_text().splitlines())}
    assert records["finetune"]["num_train"] == 256 and 0.0 <= records["finetune"]["top1"] <= 1.0
    assert records["classifier"]["top1"] > 0.1  # chance; 60 tiny steps do not get far
    # The protocol scores exactly what the deployed classifier predicts on those images.
    ckpt = load_checkpoint(out)
    _, _, test_set = evaluation_data(ckpt.metadata)
    idx = subset_indices(test_set.labels, 300)
    imgs = torch.stack([test_set[i]["views"][0] for i in idx])
    with torch.no_grad():
        manual = (ckpt.module.classify(imgs).argmax(1) == test_set.labels[idx]).float().mean().item()
    assert records["classifier"]["top1"] == pytest.approx(manual)
    capsys.readouterr()


def test_classifier_protocol_needs_a_classifier(trained_run, capsys):
    msg = _eval_error(capsys, ["eval", "--checkpoint", str(trained_run), "--protocol", "classifier"])
    assert "have no classifier" in msg
