// Small helpers shared by the CUDA kernels of fastmim.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastmim {
namespace cuda {

// N elements of T moved as one aligned access (16 bytes for the widest packs).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The widest pack of T (16 bytes) if every row of `dim` elements stays aligned to it, else 1.
template <typename T>
inline int pack_width(int64_t dim) {
  constexpr int kWide = 16 / sizeof(T);
  return dim % kWide == 0 ? kWide : 1;
}

}  // namespace cuda
}  // namespace fastmim
