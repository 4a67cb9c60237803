"""Does each method do what its paper claims? A small-scale reproduction of the headline comparisons.

The three comparisons (docs/METHODS.md), each as two arms trained with the same model size,
schedule, data order (the run's seed), initialisation seed and view-1 augmentation:

- ``supmim``: supervised + MIM (Chen et al.) against the same supervised training with the MIM
  branch off (``w_mim=0``: the same masked encoder pass, classifier, decoder and masks; only
  the reconstruction loss no longer reaches the weights). Metrics: the model's own classifier
  top-1 and k-NN top-1 of its features (the paper's "retrieval"), plus a linear probe.
  Paper: +2.01 ImageNet-1k top-1 (ViT-B/14), +1.32 k-NN retrieval.
- ``cmae``: CMAE (2022) against MAE. Metrics after equal pretraining: k-NN, linear probe and
  fine-tune top-1. Paper: +2.89 top-1 on Tiny-ImageNet (ViT-B).
- ``lut``: LUT (Kim et al.) against MAE, the same metrics. Paper: 84.2 vs 83.6 ImageNet-1k
  fine-tune (ViT-B, +0.6) and stronger linear probing.

MAE's runs serve both the ``cmae`` and the ``lut`` comparison. Each arm's extra parts are
the method's own (CMAE: second view, ContrastiveCrop, contrastive and position tasks, its
smaller decoder; LUT: second, photometrically augmented view and EMA teacher); everything
the loop controls is shared: steps, batch, lr schedule (``blr``, 5% warm-up, cosine), AdamW,
weight decay, ``norm_pix_loss=True`` (the official MAE default is off; CMAE and LUT use it),
mask ratio 0.75 (supervised + MIM: its 0.5 on both arms).

Statistics: seeds are paired (seed ``s`` on both arms = the same data order and initialisation
seed); per arm the mean and sample standard deviation over seeds, per comparison the mean of
the per-seed differences (method - baseline) with a 95% paired t-interval
(``mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n)``).

Budget (the default settings): the whole run (15 trainings, the untrained reference, their
evaluations) is about 3.8 hours of one busy core's time: about 2 hours of two single-threaded
invocations (same ``--output``: they share the runs) on a busy 2-core machine. Encoder ``embed_dim=128, depth=6,
num_heads=4`` (head dim 32) on the ``vit_tiny_patch4_32`` preset (32 px, patch 4, 64
tokens) with the preset's decoders (2 blocks, 128 wide for MAE, LUT and supervised + MIM;
CMAE's builder a smaller one); batch 32; 600 pretraining steps (2.1 epochs of the 9,000
bundled train images); 3 seeds. Why this size: at the preset's own 12-block, 192-wide
encoder a step costs about 2.5x more and the budget would buy some 200 steps, too few for
any method to leave its initialisation; narrower than 128 the encoder is smaller than its
decoder. Measured per-step costs at this size, relative to MAE's (one thread, the data
pipeline included): supervised + MIM about 1.1x, CMAE 1.3x (two views, small decoder), LUT
2.8x (two views, the photometric augmentation of view 2, the teacher's unmasked passes).
Evaluation per encoder: k-NN on all 9,000 train / 1,000 held-out features, a 90-epoch linear
probe on them, 2 epochs of fine-tuning (282 steps) for MAE, CMAE and LUT.

Output: ``--output DIR`` holds ``runs/<run>-seed<s>/`` (the training runs), ``records/``
(one JSON per run and seed, written after training and after each evaluation: a restarted
invocation skips what is done and resumes an interrupted training run from its last
checkpoint), and the assembled ``reproduce_methods.json`` / ``.md`` / ``.png``, rewritten
after each finished record; ``--results DIR`` receives copies of the three (default
``benchmarks/results``; none in ``--smoke``).

    python benchmarks/reproduce_methods.py --output runs/reproduce      # the full run
    python benchmarks/reproduce_methods.py --smoke                      # a few steps per arm (tests)
    python benchmarks/reproduce_methods.py --data PATH --channels 3     # an image folder
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAME = "reproduce_methods"

# What the loop trains: name -> (method, model overrides on top of the size).
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "mae": ("mae", {}),
    "cmae": ("cmae", {}),
    "lut": ("lut", {}),
    "supmim": ("supmim", {"w_mim": 1.0}),
    "supervised": ("supmim", {"w_mim": 0.0}),
    "init": ("mae", {}),  # a reference, no training: MAE's encoder at its initialisation (seed s)
}
RUN_ORDER = ("mae", "cmae", "lut", "supmim", "supervised", "init")  # per seed: pairs complete early
REFERENCE = {"run": "init", "metrics": ["knn", "linear", "finetune"],
             "label": "untrained encoder (MAE's initialisation, the same seed)"}

# The comparisons: method arm against baseline arm, their metrics (headline first) and the
# paper's figures (differences in top-1 points, method minus baseline, and the reported context).
COMPARISONS: list[dict[str, Any]] = [
    {"method": "supmim", "treatment": "supmim", "baseline": "supervised",
     "metrics": ["classifier", "knn", "linear"],
     "paper": {"classifier": {"delta": 2.01, "text": "81.72 vs 79.71, ImageNet-1k, ViT-B/14"},
               "knn": {"delta": 1.32, "text": "k-NN retrieval, ImageNet-1k, ViT-B/14"}},
     "label": "supervised + MIM vs supervised (MIM branch off)"},
    {"method": "cmae", "treatment": "cmae", "baseline": "mae", "metrics": ["knn", "linear", "finetune"],
     "paper": {"finetune": {"delta": 2.89, "text": "65.84 vs 62.95, Tiny-ImageNet, ViT-B"}},
     "label": "CMAE vs MAE"},
    {"method": "lut", "treatment": "lut", "baseline": "mae", "metrics": ["knn", "linear", "finetune"],
     "paper": {"finetune": {"delta": 0.6, "text": "84.2 vs 83.6, ImageNet-1k fine-tune, ViT-B"},
               "linear": {"delta": None, "text": "stronger linear probing (ImageNet-1k, ViT-B)"}},
     "label": "LUT vs MAE"},
]
METRIC_NAMES = {"classifier": "classifier top-1", "knn": "k-NN top-1", "linear": "linear probe top-1",
                "finetune": "fine-tune top-1"}

FULL = {
    "model": "vit_tiny_patch4_32",
    "size": {"embed_dim": 128, "depth": 6, "num_heads": 4},
    "method_overrides": {},
    "steps": 600,
    "batch_size": 32,
    "blr": 8e-3,  # lr 1e-3 at batch 32; one value for every arm
    "weight_decay": 0.05,
    "norm_pix_loss": True,
    "seeds": [0, 1, 2],
    "knn_k": 20,
    "knn_temperature": 0.07,
    "probe_epochs": 90,
    "finetune_epochs": 2,  # the first is warm-up
    "finetune_blr": 2e-3,  # lr 2.5e-4 at batch 32
    "finetune_batch_size": 32,
    "limit_train": None,  # k-NN memory and linear-probe images: all 9,000
    "limit_test": None,  # all 1,000 held-out images
    "finetune_limit_train": 4500,  # labelled images for fine-tuning: half of the train split, stratified
}
SMOKE = {
    **FULL,
    "size": {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
             "decoder_num_heads": 2},
    "method_overrides": {"cmae": {"proj_hidden_dim": 32, "proj_dim": 16},
                         "lut": {"head_hidden_dim": 32}},
    "steps": 3,
    "batch_size": 16,
    "blr": 1e-2,
    "seeds": [0, 1],
    "probe_epochs": 2,
    "finetune_epochs": 1,
    "finetune_batch_size": 16,
    "limit_train": 96,
    "limit_test": 48,
    "finetune_limit_train": 32,
}


# ---------------------------------------------------------------------------------------- statistics
def summarize(values: list[float]) -> dict[str, Any]:
    """``n``, ``mean`` and the sample standard deviation ``sd`` (None below 2 values)."""
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values) if n else None,
            "sd": statistics.stdev(values) if n > 1 else None}


def paired_difference(treatment: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    """Mean of the per-seed differences ``treatment - baseline`` over the seeds both arms have,
    its sample standard deviation and the 95% paired t-interval (None below 2 pairs)."""
    seeds = sorted(set(treatment) & set(baseline))
    diffs = [treatment[s] - baseline[s] for s in seeds]
    out = {"seeds": seeds, "differences": diffs, **summarize(diffs), "ci95": None,
           "interval": "paired t, 95%, n-1 degrees of freedom"}
    if len(diffs) > 1:
        half = harness.t_quantile_975(len(diffs) - 1) * out["sd"] / math.sqrt(len(diffs))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


# ---------------------------------------------------------------------------------------- files
def _write_json(path: Path, payload: Any) -> None:
    _write_text(path, json.dumps(payload, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Written whole or not at all (a temporary name per process, then a rename): invocations
    running other seeds into the same folder may assemble the results at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _source_commit() -> tuple[str | None, bool | None]:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=here).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        # An exported source tree (git archive) is not a checkout: its commit can be given.
        return os.environ.get("FASTMIM_SOURCE_COMMIT"), None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    commit, dirty = _source_commit()
    return {"device": f"CPU {_cpu_name()}", "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "commit_dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------- one run
def run_key(run: str, seed: int) -> str:
    return f"{run}-seed{seed}"


def _trained_step(run_dir: Path) -> int | None:
    """The step of the run's checkpoint, or None when there is none."""
    from fastmim.train.checkpoint import read_metadata

    path = run_dir / "checkpoint.safetensors"
    if not path.exists():
        return None
    try:
        return int(read_metadata(path).get("step", 0))
    except Exception:  # a broken checkpoint: train again
        return None


def train_run(run: str, seed: int, settings: dict[str, Any], args: argparse.Namespace,
              run_dir: Path) -> dict[str, Any]:
    """Train (or finish training) one arm at one seed; returns what the record keeps of it."""
    from fastmim.train.config import TrainConfig
    from fastmim.train.loop import train

    method, overrides = RUNS[run]
    if run == REFERENCE["run"]:
        return init_run(seed, args, run_dir, out=run_dir.parent)
    steps = settings["steps"]
    done = _trained_step(run_dir)
    resume = done is not None and (run_dir / "train_state.pt").exists()
    cfg = TrainConfig(
        method=method, model=settings["model"], data=args.data, channels=args.channels,
        image_size=args.image_size, output=str(run_dir), max_steps=steps, batch_size=settings["batch_size"],
        blr=settings["blr"], weight_decay=settings["weight_decay"], norm_pix_loss=settings["norm_pix_loss"],
        model_overrides={**settings["size"], **settings["method_overrides"].get(method, {}), **overrides},
        seed=seed, num_workers=0, progress=args.progress, figures=False, log_every=max(1, min(50, steps // 10)),
        ckpt_every=max(1, steps // 5), resume=resume, overwrite=not resume and run_dir.exists())
    result = train(cfg)
    if not result.finished:
        raise RuntimeError(f"training {run_key(run, seed)} did not finish (step {result.step} of {result.max_steps})")
    return {"method": method, "model_overrides": cfg.model_overrides, "steps": result.step,
            "final_loss": result.loss, "seconds": result.seconds, "resumed_from_step": done if resume else 0,
            "skipped_steps": getattr(result, "skipped", None)}


def init_run(seed: int, args: argparse.Namespace, run_dir: Path, out: Path) -> dict[str, Any]:
    """The untrained reference: the MAE model built as ``fastmim train`` builds it at ``seed``
    (``torch.manual_seed(seed)``, then the model), saved as a checkpoint with the metadata of a
    finished MAE run of this folder, so ``fastmim eval`` scores it as any other."""
    from fastmim.train.checkpoint import read_metadata, save_weights
    from fastmim.train.loop import build_model

    trained = sorted(out.glob("mae-seed*/checkpoint.safetensors"))
    if not trained:
        raise RuntimeError("the untrained reference takes its metadata from a finished MAE run; none yet")
    meta = read_metadata(trained[0])
    meta = {k: v for k, v in meta.items() if k not in ("state_sha256", "tensors_sha256", "format")}
    torch.manual_seed(seed)
    module = build_model(meta["method"], meta["preset"], meta["model_kwargs"])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(module, run_dir / "checkpoint.safetensors", {**meta, "step": 0, "seed": seed})
    return {"method": "mae", "model_overrides": meta["model_kwargs"], "steps": 0, "final_loss": None,
            "seconds": 0.0, "resumed_from_step": 0, "skipped_steps": 0}


def _eval(run_dir: Path, protocol: str, seed: int, settings: dict[str, Any], args: argparse.Namespace,
          log: Path) -> list[dict[str, Any]]:
    """``fastmim eval`` on the run's checkpoint (in this process); its JSONL records."""
    from fastmim.cli import main

    argv = ["eval", "--checkpoint", str(run_dir), "--protocol", protocol, "--seed", str(seed), "--log", str(log),
            "--k", str(settings["knn_k"]), "--temperature", str(settings["knn_temperature"]),
            "--probe-epochs", str(settings["probe_epochs"])]
    if args.data != "default":
        argv += ["--data", args.data]
    limit_train = settings["finetune_limit_train"] if protocol == "finetune" else settings["limit_train"]
    if limit_train is not None:
        argv += ["--limit-train", str(limit_train)]
    if settings["limit_test"] is not None:
        argv += ["--limit-test", str(settings["limit_test"])]
    if protocol == "finetune":
        argv += ["--finetune-epochs", str(settings["finetune_epochs"]), "--finetune-blr",
                 str(settings["finetune_blr"]), "--finetune-batch-size", str(settings["finetune_batch_size"])]
    log.unlink(missing_ok=True)
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"fastmim {' '.join(argv)} failed (exit {rc})")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    log.unlink()
    return records


def needed_metrics(run: str) -> list[str]:
    """Every metric some comparison reads from this run."""
    if run == REFERENCE["run"]:
        return list(REFERENCE["metrics"])
    out: list[str] = []
    for comp in COMPARISONS:
        if run in (comp["treatment"], comp["baseline"]):
            out += [m for m in comp["metrics"] if m not in out]
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(out: Path, key: str) -> bool:
    """Take the run ``key`` for this process (``claims/<key>.pid``, created exclusively), unless
    another live invocation holds it; a claim whose process has ended is taken over. So several
    invocations on one ``--output`` (e.g. two single-threaded ones on a 2-core machine) share
    the runs instead of repeating them."""
    path = out / "claims" / f"{key}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                return False
            path.unlink(missing_ok=True)  # left by an invocation that ended: take it over
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def release(out: Path, key: str) -> None:
    (out / "claims" / f"{key}.pid").unlink(missing_ok=True)


def do_run(run: str, seed: int, settings: dict[str, Any], args: argparse.Namespace, out: Path,
           progress: str, on_record) -> bool:
    """Train and evaluate one arm at one seed, skipping what its record already holds; False when
    another invocation is on it."""
    key = run_key(run, seed)
    record_path = out / "records" / f"{key}.json"
    metrics = needed_metrics(run)

    def is_done(rec: dict[str, Any] | None) -> bool:
        return rec is not None and rec["train"] is not None and all(m in rec["metrics"] for m in metrics)

    if is_done(_read_json(record_path)):
        print(f"{progress} {key}: done before, skipped", flush=True)
        return True
    if not claim(out, key):
        print(f"{progress} {key}: another invocation is on it, next", flush=True)
        return False
    try:
        _do_run(key, run, seed, settings, args, out, progress, on_record, record_path, metrics)
    finally:
        release(out, key)
    return True


def _do_run(key, run, seed, settings, args, out, progress, on_record, record_path, metrics) -> None:
    record = _read_json(record_path) or {"run": run, "seed": seed, "train": None, "metrics": {}}
    run_dir = out / "runs" / key
    start = time.perf_counter()
    if record["train"] is None:
        what = ("saving the untrained model" if run == REFERENCE["run"]
                else f"training {RUNS[run][0]} for {settings['steps']} steps")
        print(f"{progress} {key}: {what}", flush=True)
        record["train"] = {**train_run(run, seed, settings, args, run_dir), "commit": _source_commit()[0]}
        _write_json(record_path, record)
        print(f"{progress} {key}: trained in {record['train']['seconds']:.0f} s, final loss "
              f"{record['train']['final_loss']}", flush=True)
    groups = [p for p in ("all",) if any(m in ("knn", "linear", "classifier") and m not in record["metrics"]
                                         for m in metrics)]
    if "finetune" in metrics and "finetune" not in record["metrics"]:
        groups.append("finetune")
    for protocol in groups:
        print(f"{progress} {key}: evaluating ({'k-NN, linear probe, classifier' if protocol == 'all' else protocol})",
              flush=True)
        t0 = time.perf_counter()
        results = _eval(run_dir, protocol, seed, settings, args, out / "records" / f"{key}.{protocol}.eval.jsonl")
        seconds = time.perf_counter() - t0
        for r in results:
            record["metrics"][r["protocol"]] = {"top1": r["top1"], "num_train": r["num_train"],
                                                "num_test": r["num_test"], "step": r["step"],
                                                "eval_seconds": seconds, "commit": _source_commit()[0]}
        _write_json(record_path, record)
        on_record()
    shown = ", ".join(f"{m} {100 * record['metrics'][m]['top1']:.2f}%" for m in metrics if m in record["metrics"])
    print(f"{progress} {key}: finished in {time.perf_counter() - start:.0f} s: {shown}", flush=True)


# ---------------------------------------------------------------------------------------- results
def assemble(out: Path, settings: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    """The results JSON from the records on disk: one record per (method, arm, seed, metric),
    the per-comparison summaries, and what is missing."""
    runs = {}
    for path in sorted((out / "records").glob("*.json")):
        rec = _read_json(path)
        runs[run_key(rec["run"], rec["seed"])] = rec
    records, summary, missing = [], [], []
    for comp in COMPARISONS:
        for metric in comp["metrics"]:
            values: dict[str, dict[int, float]] = {}
            for role in ("baseline", "treatment"):
                arm = comp[role]
                values[role] = {}
                for seed in settings["seeds"]:
                    rec = runs.get(run_key(arm, seed))
                    m = (rec or {}).get("metrics", {}).get(metric)
                    if m is None:
                        missing.append({"method": comp["method"], "arm": arm, "seed": seed, "metric": metric})
                        continue
                    values[role][seed] = m["top1"]
                    records.append({"method": comp["method"], "arm": arm, "role": role, "seed": seed,
                                    "metric": metric, "top1": m["top1"], "num_train": m["num_train"],
                                    "num_test": m["num_test"], "pretrain_steps": rec["train"]["steps"],
                                    "train_seconds": rec["train"]["seconds"], "eval_seconds": m["eval_seconds"],
                                    "final_train_loss": rec["train"]["final_loss"], "run": run_key(arm, seed),
                                    "train_commit": rec["train"].get("commit"), "eval_commit": m.get("commit")})
            paper = comp["paper"].get(metric)
            summary.append({
                "method": comp["method"], "comparison": comp["label"], "metric": metric,
                "baseline": {"arm": comp["baseline"], **summarize(list(values["baseline"].values()))},
                "treatment": {"arm": comp["treatment"], **summarize(list(values["treatment"].values()))},
                "difference": paired_difference(values["treatment"], values["baseline"]),
                "paper": paper})
    reference = {"run": REFERENCE["run"], "label": REFERENCE["label"], "metrics": {}}
    for metric in REFERENCE["metrics"]:
        values = {}
        for seed in settings["seeds"]:
            rec = runs.get(run_key(REFERENCE["run"], seed))
            m = (rec or {}).get("metrics", {}).get(metric)
            if m is None:
                missing.append({"method": "reference", "arm": REFERENCE["run"], "seed": seed, "metric": metric})
                continue
            values[seed] = m["top1"]
            records.append({"method": "reference", "arm": REFERENCE["run"], "role": "reference", "seed": seed,
                            "metric": metric, "top1": m["top1"], "num_train": m["num_train"],
                            "num_test": m["num_test"], "pretrain_steps": 0, "train_seconds": 0.0,
                            "eval_seconds": m["eval_seconds"], "final_train_loss": None,
                            "run": run_key(REFERENCE["run"], seed), "train_commit": None,
                            "eval_commit": m.get("commit")})
        reference["metrics"][metric] = summarize(list(values.values()))
    return {"benchmark": NAME, "kind": "smoke" if args.smoke else "measured-cpu", "environment": env,
            "settings": {**settings, "data": args.data, "channels": args.channels, "image_size": args.image_size,
                         "runs": {k: {"method": m, "overrides": o} for k, (m, o) in RUNS.items()},
                         "comparisons": COMPARISONS},
            "complete": not missing, "missing": missing, "summary": summary, "reference": reference,
            "records": records}


def _pct(x: float | None, sd: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")


def markdown_table(payload: dict[str, Any]) -> str:
    lines = ["| comparison | metric | baseline | method | difference [95% CI] | seeds | paper |",
             "|---|---|---|---|---|---|---|"]
    for s in payload["summary"]:
        d = s["difference"]
        if d["mean"] is None:
            diff = "-"
        else:
            diff = f"{100 * d['mean']:+.2f}"
            if d["ci95"] is not None:
                diff += f" [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
        paper = s["paper"]
        if paper is None:
            paper_text = "-"
        else:
            paper_text = f"{paper['delta']:+.2f} ({paper['text']})" if paper["delta"] is not None else paper["text"]
        lines.append(f"| {s['comparison']} | {METRIC_NAMES[s['metric']]} | {s['baseline']['arm']} "
                     f"{_pct(s['baseline']['mean'], s['baseline']['sd'])} | {s['treatment']['arm']} "
                     f"{_pct(s['treatment']['mean'], s['treatment']['sd'])} | {diff} | {d['n']} | {paper_text} |")
    ref = payload.get("reference")
    if ref is not None:
        shown = ", ".join(f"{METRIC_NAMES[m]} {_pct(v['mean'], v['sd'])} ({v['n']} seeds)"
                          for m, v in ref["metrics"].items() if v["mean"] is not None)
        if shown:
            lines.append(f"\nReference, {ref['label']}: {shown}.")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COMPARISONS), figsize=(5.2 * len(COMPARISONS), 4.2), squeeze=False)
    by_comp = {}
    for s in payload["summary"]:
        by_comp.setdefault(s["method"], []).append(s)
    per_seed = {}
    for r in payload["records"]:
        per_seed.setdefault((r["method"], r["metric"], r["role"]), []).append(100 * r["top1"])
    for ax, comp in zip(axes[0], COMPARISONS, strict=True):
        rows = by_comp.get(comp["method"], [])
        for i, s in enumerate(rows):
            for j, (role, color) in enumerate((("baseline", "tab:gray"), ("treatment", "tab:blue"))):
                x = i + (j - 0.5) * 0.38
                arm = s[role]
                if arm["mean"] is not None:
                    ax.bar(x, 100 * arm["mean"], width=0.36, color=color, alpha=0.75,
                           yerr=None if arm["sd"] is None else 100 * arm["sd"], capsize=3,
                           label=arm["arm"] if i == 0 else None)
                pts = per_seed.get((comp["method"], s["metric"], role), [])
                ax.plot([x] * len(pts), pts, "k.", markersize=4)
            ref = payload.get("reference", {}).get("metrics", {}).get(s["metric"])
            if comp["baseline"] == "mae" and ref is not None and ref["mean"] is not None:
                ax.hlines(100 * ref["mean"], i - 0.4, i + 0.4, colors="tab:red", linestyles="dashed",
                          label="untrained encoder" if i == 0 else None)
            d = s["difference"]
            if d["mean"] is not None:
                text = f"{100 * d['mean']:+.1f}"
                if d["ci95"] is not None:
                    text += f"\n[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
                top = max([100 * (s[r]["mean"] + (s[r]["sd"] or 0)) for r in ("baseline", "treatment")
                           if s[r]["mean"] is not None])
                ax.text(i, top + 1.5, text, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), [METRIC_NAMES[s["metric"]].replace(" top-1", "") for s in rows])
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, 100)
        ax.set_title(comp["label"], fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    env, st = payload["environment"], payload["settings"]
    fig.suptitle(f"{payload['kind']}: {st['steps']} pretraining steps x batch {st['batch_size']}, "
                 f"seeds {st['seeds']}, {env['device']} (mean ± sd; difference [95% paired t-CI])", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, settings: dict[str, Any], args: argparse.Namespace, env: dict[str, Any],
                  results_dir: Path | None) -> dict[str, Any]:
    payload = assemble(out, settings, args, env)
    _write_json(out / f"{NAME}.json", payload)
    _write_text(out / f"{NAME}.md", markdown_table(payload))
    tmp_png = out / f".{NAME}.{os.getpid()}.png"
    plot(payload, tmp_png)
    tmp_png.replace(out / f"{NAME}.png")
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md", ".png"):
            shutil.copyfile(out / f"{NAME}{suffix}", results_dir / f"{NAME}{suffix}")
    return payload


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few steps per arm, 2 seeds, tiny evaluation subsets")
    p.add_argument("--output", type=Path, default=None,
                   help="work folder: runs, records and the assembled results (default: runs/reproduce_methods; "
                        "a temporary folder with --smoke)")
    p.add_argument("--results", default=None,
                   help="folder that receives copies of the results JSON, table and plot "
                        "(default: benchmarks/results; none with --smoke); 'none' for none")
    p.add_argument("--data", default="default", help="the bundled Animal-MNIST (default) or an image folder")
    p.add_argument("--channels", type=int, default=None, help="image channels (default: 1 for the bundled data, "
                                                              "else 3)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the preset's, 32)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; smoke: 0 1)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps of every arm (default: 600)")
    p.add_argument("--only", nargs="+", choices=[c["method"] for c in COMPARISONS], default=None,
                   help="run only these comparisons")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no training progress bars")
    args = p.parse_args(argv)
    if args.channels is None:
        args.channels = 1 if args.data == "default" else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(SMOKE if args.smoke else FULL)
    if args.seeds is not None:
        settings["seeds"] = list(args.seeds)
    if args.steps is not None:
        settings["steps"] = args.steps
    out = args.output or (Path(tempfile.mkdtemp(prefix="reproduce_methods_")) if args.smoke
                          else Path("runs/reproduce_methods"))
    if args.results is None:
        results_dir = None if args.smoke else RESULTS_DIR
    else:
        results_dir = None if args.results == "none" else Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    saved = _read_json(out / "settings.json")
    current = {**settings, "data": args.data, "channels": args.channels, "image_size": args.image_size}
    if saved is not None and {k: v for k, v in saved.items() if k != "seeds"} != \
            {k: v for k, v in json.loads(json.dumps(current)).items() if k != "seeds"}:
        print(f"error: {out} holds runs with other settings ({out / 'settings.json'}); choose another --output",
              file=sys.stderr)
        return 2
    _write_json(out / "settings.json", current)
    env = environment()
    comps = [c for c in COMPARISONS if args.only is None or c["method"] in args.only]
    wanted = {arm for c in comps for arm in (c["treatment"], c["baseline"])}
    if "mae" in wanted:
        wanted.add(REFERENCE["run"])
    plan = [(seed, run) for seed in settings["seeds"] for run in RUN_ORDER if run in wanted]
    print(f"{NAME}: {len(plan)} runs ({len(settings['seeds'])} seeds x {len(wanted)} arms), {settings['steps']} "
          f"steps each, batch {settings['batch_size']}, encoder {settings['size']} on {settings['model']}, "
          f"data {args.data}; {torch.get_num_threads()} threads; output {out}", flush=True)
    start = time.perf_counter()

    def on_record() -> None:
        write_outputs(out, settings, args, env, results_dir)

    others = []
    for i, (seed, run) in enumerate(plan):
        elapsed = time.perf_counter() - start
        if not do_run(run, seed, settings, args, out, f"[{i + 1}/{len(plan)} {elapsed / 60:.1f} min]", on_record):
            others.append(run_key(run, seed))
    payload = write_outputs(out, settings, args, env, results_dir)
    if others:
        print(f"{NAME}: left to the other invocations on {out}: {', '.join(others)}; the results are assembled "
              f"again as each record lands", flush=True)
    print(markdown_table(payload), end="")
    where = f"{out / NAME}.json" + (f" (copied to {results_dir})" if results_dir is not None else "")
    print(f"{NAME}: done in {(time.perf_counter() - start) / 60:.1f} min -> {where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
