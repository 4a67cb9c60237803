"""The benchmark harness, and every benchmark script run in smoke mode (tiny sizes, CPU)."""

import json
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
