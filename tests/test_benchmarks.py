"""The benchmark harness, and every benchmark script run in smoke mode (tiny sizes, CPU)."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from fastmim.testing import run_until_stalled

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402

SCRIPTS = sorted(p.name for p in BENCH_DIR.glob("bench_*.py"))


def test_roofline_and_peer_ratio_are_computed_from_the_figures():
    ceilings = {"copy_gbps": 100.0, "matmul_tflops": 10.0}
    ours = harness.Record("case", "fastmim-triton", ms=2.0, shape={}, bytes_moved=100e6)
    eager = harness.Record("case", "eager", ms=6.0, shape={}, bytes_moved=100e6)
    compiled = harness.Record("case", "compile", ms=4.0, shape={}, bytes_moved=100e6)
    records = [ours, eager, compiled]
    for record in records:
        record.finish(ceilings)
    harness.compare_to_peers(records)
    assert ours.gbps == pytest.approx(50.0)
    assert ours.roofline_fraction == pytest.approx(0.5)
    assert ours.best_peer == "compile"
    assert ours.speedup_vs_best_peer == pytest.approx(2.0)
    assert eager.speedup_vs_best_peer is None


def test_time_ms_rotates_through_argument_sets():
    seen = []
    harness.time_ms(lambda i: seen.append(i), [(0,), (1,), (2,)], device="cpu", warmup=10, rep=30)
    assert set(seen) == {0, 1, 2}


def test_interleaved_timing_takes_turns_round_by_round():
    calls = []
    samples = harness.time_interleaved_samples({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                               rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3}


def test_paired_speedup_is_the_geometric_mean_of_the_rounds_ratios_with_its_interval():
    exact = harness.paired_speedup([10.0, 20.0, 40.0], [5.0, 10.0, 20.0])  # 2x in every round
    assert exact["speedup"] == pytest.approx(2.0) and exact["rounds"] == 3
    assert exact["ci95_low"] == pytest.approx(2.0) and exact["ci95_high"] == pytest.approx(2.0)
    # log-ratios +-log(1.1) around log(1.5): geometric mean 1.5; t(0.975, 3) = 3.182
    noisy = harness.paired_speedup([1.5 * 1.1, 1.5 / 1.1, 1.5 * 1.1, 1.5 / 1.1], [1.0] * 4)
    half = 3.182 * math.log(1.1) * math.sqrt(4 / 3) / 2
    assert noisy["speedup"] == pytest.approx(1.5)
    assert noisy["ci95_low"] == pytest.approx(1.5 * math.exp(-half), rel=1e-3)
    assert noisy["ci95_high"] == pytest.approx(1.5 * math.exp(half), rel=1e-3)
    # a machine whose speed drifts round to round does not hide that the two are the same
    drift = [100.0, 140.0, 90.0, 180.0, 120.0]
    same = harness.paired_speedup(drift, [d * r for d, r in zip(drift, [1.02, 0.97, 1.01, 0.99, 1.0], strict=True)])
    assert same["ci95_low"] < 1.0 < same["ci95_high"]
    with pytest.raises(ValueError, match="same number"):
        harness.paired_speedup([1.0, 2.0], [1.0])


def test_ceilings_are_positive_on_cpu():
    ceilings = harness.measure_ceilings("cpu", smoke=True)
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"] > 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_runs_in_smoke_mode(script, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1" if not torch.cuda.is_available() else "0")
    proc = run_until_stalled([sys.executable, str(BENCH_DIR / script), "--smoke", "--output", str(tmp_path)], env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = list(tmp_path.glob("*.json"))
    assert results, f"{script} wrote no results JSON"
    for path in results:
        payload = json.loads(path.read_text())
        assert payload["kind"] == "smoke"
        assert payload["environment"]["torch"] == torch.__version__
        assert payload["records"], f"{path.name} holds no records"
        assert all(record["ms"] > 0 for record in payload["records"])


def test_reproduce_methods_smoke_writes_one_record_per_method_arm_seed_and_metric(tmp_path):
    """benchmarks/reproduce_methods.py --smoke: every arm trained a few steps at 2 seeds, evaluated
    on small subsets; the results JSON holds the records, the paired summaries and the plot; a
    second invocation finds everything done and trains nothing."""
    env = dict(os.environ, TRITON_INTERPRET="1" if not torch.cuda.is_available() else "0")
    cmd = [sys.executable, str(BENCH_DIR / "reproduce_methods.py"), "--smoke", "--no-progress", "--threads", "1",
           "--output", str(tmp_path)]
    proc = run_until_stalled(cmd, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads((tmp_path / "reproduce_methods.json").read_text())
    assert payload["kind"] == "smoke" and payload["complete"] and not payload["missing"]
    assert (tmp_path / "reproduce_methods.png").stat().st_size > 0
    assert payload["environment"]["torch"] == torch.__version__
    seeds = payload["settings"]["seeds"]
    expected = {("supmim", arm, s, m) for arm in ("supmim", "supervised") for s in seeds
                for m in ("classifier", "knn", "linear")}
    expected |= {(method, arm, s, m) for method in ("cmae", "lut") for arm in (method, "mae") for s in seeds
                 for m in ("knn", "linear", "finetune")}
    expected |= {("reference", "init", s, m) for s in seeds for m in ("knn", "linear", "finetune")}
    got = [(r["method"], r["arm"], r["seed"], r["metric"]) for r in payload["records"]]
    assert sorted(got) == sorted(expected)
    for record in payload["records"]:
        steps = 0 if record["arm"] == "init" else payload["settings"]["steps"]
        assert 0.0 <= record["top1"] <= 1.0 and record["pretrain_steps"] == steps
    assert payload["reference"]["metrics"]["knn"]["n"] == len(seeds)
    # The two comparisons against MAE read the same MAE runs.
    mae = {(r["method"], r["seed"], r["metric"]): r["top1"] for r in payload["records"] if r["arm"] == "mae"}
    assert all(mae[("cmae", s, m)] == mae[("lut", s, m)] for s in seeds for m in ("knn", "linear", "finetune"))
    for summary in payload["summary"]:
        diff = summary["difference"]
        assert diff["n"] == len(seeds) == len(diff["differences"])
        assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    # Resumable: nothing left to train or evaluate.
    again = run_until_stalled(cmd, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("done before, skipped") == 12 and "training" not in again.stdout


def test_reproduce_methods_paired_interval():
    import reproduce_methods as rm

    diff = rm.paired_difference({0: 0.6, 1: 0.7, 2: 0.65}, {0: 0.5, 1: 0.55, 2: 0.6, 3: 0.9})
    assert diff["seeds"] == [0, 1, 2] and diff["n"] == 3
    assert diff["mean"] == pytest.approx(0.1)
    half = 4.303 * 0.05 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n), sd of (0.1, 0.15, 0.05)
    assert diff["ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    assert rm.paired_difference({0: 0.5}, {0: 0.4})["ci95"] is None
    assert harness.t_quantile_975(30) == pytest.approx(2.042)
    assert harness.t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
