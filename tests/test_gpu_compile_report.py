"""The GPU compile report: every Triton kernel the training step launches compiles for the GPU,
with no register spill (a CI gate), and the occupancy arithmetic is right."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from fastmim.testing import run_until_stalled

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))


def test_occupancy_follows_the_sm_limits():
    import gpu_compile_report as report

    # 64 registers x 128 threads: 8192 registers a block, 8 blocks by registers; 16 by warps.
    occ = report.occupancy("sm_90a", regs=64, smem=0, warps=4)
    assert occ["blocks_per_sm"] == 8 and occ["occupancy"] == pytest.approx(0.5) and occ["limited_by"] == "registers"
    # Shared memory bound: 100 KB a block leaves room for 2 on H100 (228 KB) and 1 on A100 (164 KB).
    assert report.occupancy("sm_90a", regs=32, smem=100 * 1024, warps=4)["blocks_per_sm"] == 2
    assert report.occupancy("sm_80", regs=32, smem=100 * 1024, warps=4)["blocks_per_sm"] == 1
    # Register allocation is per warp in units of 256: 33 registers cost as much as 40.
    assert report.occupancy("sm_80", regs=33, smem=0, warps=8) == report.occupancy("sm_80", regs=40, smem=0, warps=8)
    assert report.occupancy("sm_80", regs=16, smem=0, warps=4)["limited_by"] in ("warps", "blocks")


def test_training_step_kernels_compile_without_spills(tmp_path):
    """The full Triton report (ViT-B/L launches, sm_80 and sm_90a; seconds): a compile error or a spill
    fails it (exit code)."""
    proc = run_until_stalled([sys.executable, str(BENCH_DIR / "gpu_compile_report.py"), "--no-csrc",
                           "--output", str(tmp_path)])
    payload_path = tmp_path / "gpu_compile_report.json"
    assert payload_path.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads(payload_path.read_text())
    assert proc.returncode == 0, "\n".join(payload["failures"]) + proc.stderr[-2000:]
    rows = payload["triton_kernels"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    kernels = {r["kernel"] for r in rows}
    # The kernels of the MAE step: masking, gather, un-shuffle, loss, attention forward and backward,
    # and its input's views.
    for expected in ("_random_masking_kernel", "_gather_visible_fwd_kernel", "_gather_visible_bwd_kernel",
                     "_unshuffle_fwd_kernel", "_unshuffle_bwd_kernel", "_masked_patch_mse_fwd_kernel",
                     "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_resized_crop_kernel"):
        assert expected in kernels
    for r in rows:
        assert r["ok"], r.get("error")
        assert 0 < r["registers"] <= 255
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["occupancy"] <= 1
    assert (tmp_path / "gpu_compile_report.md").read_text().startswith("# GPU compile report")
    # Every Triton kernel fastmim ships is in the report, compiled for both architectures.
    missing = {name for name in _triton_kernels() if {(name, "sm_80"), (name, "sm_90a")} - {(r["kernel"], r["arch"])
                                                                                           for r in rows}}
    assert not missing, f"kernels no captured launch reached: {sorted(missing)}"
    # Every configuration the fused GEMMs' autotuner may pick on a GPU is compiled.
    from fastmim.kernels.fused_block import GEMM_CONFIGS

    tiles = {(r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["constexprs"]["BLOCK_K"], r["num_warps"],
              r["num_stages"]) for r in rows if r["kernel"] == "_fused_gemm_kernel"}
    assert tiles == {cfg for configs in GEMM_CONFIGS.values() for cfg in configs}


def _triton_kernels() -> set[str]:
    """The ``@triton.jit`` kernels (``*_kernel``) defined in the modules of ``fastmim.kernels``."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import fastmim.kernels

    names = set()
    for info in pkgutil.iter_modules(fastmim.kernels.__path__):
        module = importlib.import_module(f"fastmim.kernels.{info.name}")
        names |= {name for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == module.__name__}
    return names


def test_smoke_mode_runs(tmp_path):
    proc = run_until_stalled([sys.executable, str(BENCH_DIR / "gpu_compile_report.py"), "--smoke", "--no-csrc",
                           "--output", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads((tmp_path / "gpu_compile_report-smoke.json").read_text())
    assert payload["kind"] == "smoke" and payload["triton_kernels"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile_for_sm80_and_sm90():
    """csrc/*.cu compiled by nvcc for sm_80 and sm_90 (no GPU needed): a CUDA compile error fails CI."""
    proc = run_until_stalled(["bash", str(REPO / "csrc" / "check_cuda_compile.sh"), sys.executable],
                             env=dict(os.environ, FASTMIM_REQUIRE_NVCC="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sm_80" in proc.stdout + proc.stderr and "sm_90" in proc.stdout + proc.stderr
