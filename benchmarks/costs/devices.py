"""The device constants of the roofline projection, all in one place.

Every figure says where it comes from. "measured" means measured on an H100 SXM5 80 GB with
PyTorch (a large bf16 matmul; a large device-to-device copy, read plus write counted); the
rest are NVIDIA's H100 SXM5 datasheet figures (dense, no sparsity) or, where marked,
derived from the measured figures.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str
    # Tensor-core throughput in FLOP/s by operand dtype (GEMMs, convolutions, attention kernels).
    tensor_core_flops: dict[str, float]
    # Non-tensor-core (CUDA core) throughput in FLOP/s by dtype (FLOP-counted ops without tensor cores).
    vector_flops: dict[str, float]
    # HBM bandwidth in bytes/s for a streaming kernel, read plus write counted.
    hbm_bytes_per_s: float
    # The shortest a kernel can take, launch included, when kernels run back to back.
    launch_floor_s: float
    # A Triton GEMM's tensor-core throughput as a fraction of cuBLAS's on the same problem.
    triton_gemm_efficiency: float
    sources: dict[str, str]

    def peak_flops(self, dtype: torch.dtype | str, tensor_core: bool) -> float:
        name = str(dtype).removeprefix("torch.")
        table = self.tensor_core_flops if tensor_core else self.vector_flops
        if name not in table:
            table = self.vector_flops
        return table.get(name, self.vector_flops["float32"])


_MEASURED_BF16 = 790e12
_DATASHEET_BF16 = 989.4e12
# The measured fraction of the datasheet bf16 peak, applied to the other tensor-core dtypes.
_TC_EFFICIENCY = _MEASURED_BF16 / _DATASHEET_BF16

H100_SXM = DeviceSpec(
    name="H100 SXM5 80GB (modelled)",
    tensor_core_flops={
        "bfloat16": _MEASURED_BF16,
        "float16": _MEASURED_BF16,
        "float32": 494.7e12 * _TC_EFFICIENCY,  # TF32, only when the caller allows TF32 matmuls
        "float8_e4m3fn": 1978.9e12 * _TC_EFFICIENCY,
    },
    vector_flops={"float32": 66.9e12, "bfloat16": 133.8e12, "float16": 133.8e12, "float64": 33.5e12},
    hbm_bytes_per_s=3.0e12,
    launch_floor_s=2.5e-6,
    triton_gemm_efficiency=0.85,
    sources={
        "tensor_core_flops.bfloat16": "measured: dense bf16 matmul (8192^3) on an H100 SXM5, about 790 TFLOP/s",
        "tensor_core_flops.float16": "taken equal to bf16 (same tensor-core rate on the datasheet)",
        "tensor_core_flops.float32": "TF32 datasheet 494.7 TFLOP/s dense, scaled by the measured bf16 efficiency "
                                     "(790 / 989.4); fp32 matmuls without TF32 use vector_flops",
        "vector_flops": "NVIDIA H100 SXM5 datasheet: FP32 66.9, FP64 33.5 TFLOP/s; bf16/fp16 non-tensor 2x FP32",
        "hbm_bytes_per_s": "measured: large device-to-device copy on an H100 SXM5, about 3.0 TB/s counting read + "
                           "write (datasheet HBM3: 3.35 TB/s)",
        "launch_floor_s": "2.5 us: the usual end-to-end time of a tiny kernel launched back to back on a Hopper GPU "
                          "(GPU-side launch latency plus ramp-up, 2-3 us in published microbenchmarks); not "
                          "measured here. Host-side eager dispatch (5-10 us per op) is assumed hidden behind "
                          "the GPU queue at batch 256",
        "triton_gemm_efficiency": "0.85 of cuBLAS: the mean of the three largest sizes published for Triton's "
                                  "tutorial matmul (the non-persistent, autotuned, grouped-order kernel fastmim's "
                                  "GEMMs follow) against cuBLAS on an H100, fp16, in triton-lang/triton issue "
                                  "#3672 (2024-04-16): 2816^3 500.7 vs 616.5, 2944^3 471.4 vs 573.9, 3072^3 524.7 "
                                  "vs 584.7 TFLOP/s (0.81, 0.82, 0.90). Not a measurement of fastmim's kernels, "
                                  "whose prologues (LayerNorm, GELU) and epilogues add work this figure does not "
                                  "see; no GPU has measured them. cuBLAS GEMMs are charged at 1.0",
    },
)
