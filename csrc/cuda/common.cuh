// Small helpers shared by the CUDA kernels of fastmim.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

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

// Threads of a block that walks a row of `dim` features in packs of `vec` (32 to 256).
inline int pack_threads(int64_t dim, int vec) {
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, ceil_div(dim, vec))));
}

// Calls launch(std::integral_constant<int, VEC>{}) with VEC = the widest pack of T when `wide`,
// else 1, then checks the launch.
template <typename T, typename F>
void launch_packed(bool wide, const F& launch) {
  if (wide) {
    launch(std::integral_constant<int, 16 / sizeof(T)>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda

// The CUDA kernels' first check: `t` (the tensor the op is dispatched on) is a CUDA tensor.
inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
}

}  // namespace fastmim
