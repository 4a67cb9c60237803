// Small helpers shared by the CUDA kernels of fastmim.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <initializer_list>

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

// The widest pack of T (16 / sizeof(T) elements) if every row of `dim` elements of each tensor
// in `vectorised` stays aligned to it, else 1. A tensor of another element type is moved in
// packs of the same count, so it needs element_size() * width bytes of alignment; a contiguous
// view (a slice of pos_embed, say) need not start at an aligned address, hence the pointer
// checks. Undefined tensors are skipped.
template <typename T>
inline int pack_width(int64_t dim, std::initializer_list<at::Tensor> vectorised) {
  constexpr int kWide = 16 / sizeof(T);
  if (dim % kWide != 0) return 1;
  for (const at::Tensor& t : vectorised) {
    if (!t.defined()) continue;
    const auto bytes = static_cast<uintptr_t>(t.element_size()) * kWide;
    if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes != 0) return 1;
  }
  return kWide;
}

}  // namespace cuda
}  // namespace fastmim
