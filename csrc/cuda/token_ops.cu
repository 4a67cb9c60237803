// CUDA kernels of the token ops (dense layout), same results as the CPU kernels and the
// references in fastmim/ops/token_ops.py.
//
// - random permutation / masking: one block per sample. Each patch's 64-bit sort key (noise,
//   index) sits in shared memory and its rank is counted by pairwise comparison, which equals
//   the stable argsort: L^2 / threads comparisons per block, all shared-memory broadcasts.
//   Rows longer than kMaxSmemPatches fall back to a segmented sort of the keys (at::sort).
// - gathers (gather_visible, unshuffle): one warp per output row, 16-byte packs along D when D
//   and the address of every tensor read or written in packs allow it, else scalar accesses.
// - scatter-type backward passes are gathers through an inverse index table (first source,
//   count) built with integer atomics, so every output row is written by one thread, with
//   no floating-point atomics: deterministic, and repeated indices are summed.
// - sums over the batch (pos_embed, cls_token, mask_token gradients) walk the batch inside
//   one thread per (position, feature pack), accumulating in fp32 registers.
//
// Index values cannot be validated on the host without a device sync (fastmim.ops checks them
// only under FASTMIM_CHECK_INDICES=1 / check_indices()), and no value makes a kernel access
// memory outside its tensors: an ids_keep entry outside [0, L) gathers a zero row, an
// ids_restore rank outside [0, L) gives a zero token (plus the position embedding), and their
// gradients are dropped. The keep counts in random masking's cu_seqlens (built by
// random_masking itself) trip a device-side assert when inconsistent. An empty batch gives
// empty results.
#include "../fastmim_ops.h"
#include "common.cuh"

#include <climits>

namespace fastmim {
namespace {

using cuda::ceil_div;
using cuda::launch_packed;
using cuda::load_pack;
using cuda::Pack;
using cuda::pack_threads;
using cuda::pack_width;
using cuda::store_pack;

constexpr int kMaxSmemPatches = 4096;  // 32 KiB of 64-bit keys per block
constexpr int kWarpsPerBlock = 4;

// An int64 scalar of the random ops (the seed, the sample offset): read by the kernel from
// device memory when it lives on the output's device (no sync), else passed by value.
struct Scalar {
  const int64_t* ptr;
  uint64_t value;
};

__device__ __forceinline__ uint64_t read(const Scalar& s) {
  return s.ptr != nullptr ? static_cast<uint64_t>(*s.ptr) : s.value;
}

// Key of row b: sample offset + b of the seed's stream.
__device__ __forceinline__ uint32_t block_row_key(const Scalar& seed, const Scalar& offset, int64_t b) {
  return row_key(seed_key(read(seed)), read(offset) + static_cast<uint64_t>(b));
}

// Writes one sample's outputs from the rank of each patch.
struct MaskingOut {
  int64_t* ids_shuffle;      // (B, L) or null
  int64_t* ids_keep;         // dense (B, K) / packed (T,) or null
  int64_t* ids_restore;      // (B, L)
  float* mask;               // (B, L) or null
  const int64_t* cu_seqlens; // (B + 1,) or null: then K is num_keep for every sample
  int64_t num_keep;          // K, or with cu_seqlens the packed total T (the length of ids_keep)
  int64_t batch;
};

// Sample b's rows [start, start + keep) of ids_keep. cu_seqlens is read on the device, where
// checking it on the host would cost a sync: an inconsistent one (cu_seqlens[0] != 0, a count
// outside [0, L], cu_seqlens[B] != T) trips a device-side assert, and its sample keeps no
// patch, so ids_keep is never written out of bounds even where asserts are compiled out.
__device__ __forceinline__ void keep_range(const MaskingOut& o, int64_t b, int64_t L, int64_t* start,
                                           int64_t* keep) {
  if (o.cu_seqlens == nullptr) {
    *start = b * o.num_keep;
    *keep = o.num_keep;
    return;
  }
  const int64_t lo = o.cu_seqlens[b], hi = o.cu_seqlens[b + 1];
  const bool ok = lo >= 0 && hi >= lo && hi - lo <= L && hi <= o.num_keep && (b > 0 || lo == 0) &&
                  (b + 1 < o.batch || hi == o.num_keep);
  CUDA_KERNEL_ASSERT(ok && "csrc_random_masking_varlen: inconsistent cu_seqlens");
  *start = ok ? lo : 0;
  *keep = ok ? hi - lo : 0;
}

__device__ __forceinline__ void emit_rank(const MaskingOut& o, int64_t b, int64_t L, int64_t i, int64_t rank) {
  o.ids_restore[b * L + i] = rank;
  if (o.ids_shuffle != nullptr) o.ids_shuffle[b * L + rank] = i;
  int64_t start = 0, keep = 0;
  keep_range(o, b, L, &start, &keep);
  if (o.ids_keep != nullptr && rank < keep) o.ids_keep[start + rank] = i;
  if (o.mask != nullptr) o.mask[b * L + i] = rank >= keep ? 1.0f : 0.0f;
}

__global__ void permutation_smem_kernel(Scalar seed, Scalar offset, int64_t L, MaskingOut out) {
  extern __shared__ uint64_t keys[];
  const int64_t b = blockIdx.x;
  const uint32_t rkey = block_row_key(seed, offset, b);
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    keys[i] = sort_key(patch_noise(rkey, static_cast<uint32_t>(i)), static_cast<uint32_t>(i));
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    const uint64_t mine = keys[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < L; ++j) rank += keys[j] < mine;  // all threads read keys[j]: a broadcast
    emit_rank(out, b, L, i, rank);
  }
}

__global__ void sort_keys_kernel(Scalar seed, Scalar offset, int64_t B, int64_t L, int64_t* keys) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * L) return;
  const int64_t b = idx / L, i = idx % L;
  const uint32_t rkey = block_row_key(seed, offset, b);
  keys[idx] = static_cast<int64_t>(sort_key(patch_noise(rkey, static_cast<uint32_t>(i)), static_cast<uint32_t>(i)));
}

__global__ void emit_sorted_kernel(const int64_t* sorted_keys, int64_t B, int64_t L, MaskingOut out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * L) return;
  const int64_t b = idx / L, rank = idx % L;
  emit_rank(out, b, L, sorted_keys[idx] & 0x7FFFFFFF, rank);
}

// `t` (checked: int64, one element) as a kernel argument; `storage` keeps a device copy alive.
Scalar scalar_arg(const at::Tensor& t, c10::Device device, at::Tensor& storage) {
  if (t.device() == device) {
    storage = t.contiguous();
    return {storage.const_data_ptr<int64_t>(), 0};
  }
  return {nullptr, static_cast<uint64_t>(t.item<int64_t>())};
}

void launch_permutation(const at::Tensor& seed, const std::optional<at::Tensor>& offset, int64_t B, int64_t L,
                        const MaskingOut& out, c10::Device device) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "csrc_random_masking: seed must be an int64 tensor with one element, got ", seed.scalar_type(),
              " of shape ", seed.sizes());
  if (B == 0) return;  // nothing to write, and a grid of no block is not launchable
  at::Tensor seed_dev, offset_dev;
  const Scalar seed_arg = scalar_arg(seed, device, seed_dev);
  const Scalar offset_arg = offset.has_value() ? scalar_arg(*offset, device, offset_dev) : Scalar{nullptr, 0};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (L <= kMaxSmemPatches) {
    const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(128, ceil_div(L, 32) * 32)));
    permutation_smem_kernel<<<B, threads, L * sizeof(uint64_t), stream>>>(seed_arg, offset_arg, L, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto keys = at::empty({B, L}, at::TensorOptions().dtype(at::kLong).device(device));
  const int threads = 256;
  sort_keys_kernel<<<ceil_div(B * L, threads), threads, 0, stream>>>(seed_arg, offset_arg, B, L,
                                                                      keys.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto sorted = std::get<0>(keys.sort(/*dim=*/1));
  emit_sorted_kernel<<<ceil_div(B * L, threads), threads, 0, stream>>>(sorted.const_data_ptr<int64_t>(), B, L, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- row gathers

template <typename out_t, typename in_t, typename aux_t, int VEC>
__device__ __forceinline__ void copy_add_row(out_t* dst, const in_t* src, const aux_t* add, int64_t D, int lane) {
  for (int64_t d = static_cast<int64_t>(lane) * VEC; d < D; d += 32 * VEC) {
    Pack<in_t, VEC> a = load_pack<in_t, VEC>(src + d);
    Pack<out_t, VEC> o;
    if (add != nullptr) {
      Pack<aux_t, VEC> p = load_pack<aux_t, VEC>(add + d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<out_t>(static_cast<float>(a.v[k]) + static_cast<float>(p.v[k]));
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<out_t>(static_cast<float>(a.v[k]));
    }
    store_pack<out_t, VEC>(dst + d, o);
  }
}

// The row a warp of a warp-per-row kernel writes: row `row` of the output, row j of sample b
// (`rows` per sample, B samples); lane = the thread's lane; valid = false past the last row.
struct WarpRow {
  int64_t row, b, j;
  int lane;
  bool valid;
};

__device__ __forceinline__ WarpRow warp_row(int64_t B, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const bool valid = row < B * rows;
  return {row, valid ? row / rows : 0, valid ? row % rows : 0, static_cast<int>(threadIdx.x % 32), valid};
}

template <typename out_t>
__device__ __forceinline__ void zero_row(out_t* dst, int64_t D, int lane) {
  for (int64_t d = lane; d < D; d += 32) dst[d] = static_cast<out_t>(0.0f);
}

template <typename in_t, typename out_t, typename index_t, int VEC>
__global__ void gather_visible_kernel(const in_t* __restrict__ x, const index_t* __restrict__ ids,
                                      const out_t* __restrict__ pos_patch, const out_t* __restrict__ pos_cls,
                                      const out_t* __restrict__ cls, out_t* __restrict__ out, int64_t B, int64_t L,
                                      int64_t K, int64_t D, int hc) {
  const auto [row, b, j, lane, valid] = warp_row(B, K + hc);
  if (!valid) return;
  out_t* dst = out + row * D;
  if (j < hc) {
    copy_add_row<out_t, out_t, out_t, VEC>(dst, cls, pos_cls, D, lane);
    return;
  }
  const int64_t v = static_cast<int64_t>(ids[b * K + j - hc]);
  if (v < 0 || v >= L) {  // out of range: nothing to gather, not even a position embedding
    zero_row(dst, D, lane);
    return;
  }
  copy_add_row<out_t, in_t, out_t, VEC>(dst, x + (b * L + v) * D, pos_patch != nullptr ? pos_patch + v * D : nullptr,
                                        D, lane);
}

template <typename in_t, typename out_t, typename index_t, int VEC>
__global__ void unshuffle_kernel(const in_t* __restrict__ xv, const index_t* __restrict__ ids,
                                 const out_t* __restrict__ mask_token, const out_t* __restrict__ pos_patch,
                                 const out_t* __restrict__ pos_cls, out_t* __restrict__ out, int64_t B, int64_t L,
                                 int64_t K, int64_t D, int hc) {
  const int64_t rows_in = K + hc;
  const auto [row, b, j, lane, valid] = warp_row(B, L + hc);
  if (!valid) return;
  out_t* dst = out + row * D;
  if (j < hc) {
    copy_add_row<out_t, in_t, out_t, VEC>(dst, xv + b * rows_in * D, pos_cls, D, lane);
    return;
  }
  const int64_t i = j - hc;
  const int64_t v = static_cast<int64_t>(ids[b * L + i]);
  const out_t* pos = pos_patch != nullptr ? pos_patch + i * D : nullptr;
  if (v < 0 || v >= L) {  // out of range: a zero token, plus the position's embedding
    if (pos != nullptr) {
      copy_add_row<out_t, out_t, out_t, VEC>(dst, pos, static_cast<const out_t*>(nullptr), D, lane);
    } else {
      zero_row(dst, D, lane);
    }
    return;
  }
  if (v < K) {
    copy_add_row<out_t, in_t, out_t, VEC>(dst, xv + (b * rows_in + hc + v) * D, pos, D, lane);
  } else {
    copy_add_row<out_t, out_t, out_t, VEC>(dst, mask_token, pos, D, lane);
  }
}

// ---------------------------------------------------------------- inverse tables

// first[b, v] = min n with idx[b, n] == v, count[b, v] = #{n : idx[b, n] == v}, for v in [0, M);
// other values are ignored: masked ranks (unshuffle), or out of range, whose gradient is dropped.
template <typename index_t>
__global__ void build_inverse_kernel(const index_t* __restrict__ idx, int64_t B, int64_t N, int64_t M,
                                     int32_t* __restrict__ first, int32_t* __restrict__ count) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B * N) return;
  const int64_t b = t / N, n = t % N;
  const int64_t v = static_cast<int64_t>(idx[t]);
  if (v < 0 || v >= M) return;
  atomicAdd(count + b * M + v, 1);
  atomicMin(first + b * M + v, static_cast<int32_t>(n));
}

template <typename index_t>
std::pair<at::Tensor, at::Tensor> build_inverse(const at::Tensor& idx, int64_t M) {
  const int64_t B = idx.size(0), N = idx.size(1);
  auto opts = idx.options().dtype(at::kInt);
  auto first = at::full({B, M}, INT_MAX, opts);
  auto count = at::zeros({B, M}, opts);
  if (B * N > 0) {
    const int threads = 256;
    build_inverse_kernel<index_t><<<ceil_div(B * N, threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        idx.const_data_ptr<index_t>(), B, N, M, first.data_ptr<int32_t>(), count.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {first, count};
}

// Row m of sample b of the scattered gradient: sum of src rows n with idx[b, n] == m, in fp32,
// for the VEC features starting at d.
template <typename scalar_t, typename index_t, int VEC>
__device__ __forceinline__ void inverse_row_pack(float* acc, const scalar_t* src, int64_t D, const index_t* idx_row,
                                                 int64_t N, int64_t m, int32_t first, int32_t count, int64_t d) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
  if (count == 0) return;
  int64_t n = first;
  for (int32_t seen = 0; seen < count && n < N; ++n) {
    if (seen > 0 && static_cast<int64_t>(idx_row[n]) != m) continue;
    Pack<scalar_t, VEC> g = load_pack<scalar_t, VEC>(src + n * D + d);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] += static_cast<float>(g.v[k]);
    ++seen;
  }
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_acc(scalar_t* dst, const float* acc) {
  Pack<scalar_t, VEC> o;
#pragma unroll
  for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(acc[k]);
  store_pack<scalar_t, VEC>(dst, o);
}

// gather_visible backward: block x = patch position l (x == L: the cls rows), block y = a
// slice of the batch (one slice when pos_embed's gradient is summed here), threads = packs of D.
template <typename scalar_t, typename index_t, int VEC>
__global__ void gather_visible_backward_kernel(const scalar_t* __restrict__ g, const index_t* __restrict__ ids,
                                               const int32_t* __restrict__ first, const int32_t* __restrict__ count,
                                               scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_pos,
                                               scalar_t* __restrict__ grad_cls, int64_t B, int64_t L, int64_t K,
                                               int64_t D, int hc, int64_t batch_per_block) {
  const int64_t l = blockIdx.x;
  const int64_t rows_in = K + hc;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * batch_per_block;
  const int64_t b1 = min(B, b0 + batch_per_block);
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < D; d += static_cast<int64_t>(blockDim.x) * VEC) {
    float sum[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum[k] = 0.0f;
    if (l == L) {  // the cls rows
      for (int64_t b = b0; b < b1; ++b) {
        Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(g + b * rows_in * D + d);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[k] += static_cast<float>(v.v[k]);
      }
      store_acc<scalar_t, VEC>(grad_cls + d, sum);
      continue;
    }
    for (int64_t b = b0; b < b1; ++b) {
      float row[VEC];
      inverse_row_pack<scalar_t, index_t, VEC>(row, g + (b * rows_in + hc) * D, D, ids + b * K, K, l,
                                               first[b * L + l], count[b * L + l], d);
      if (grad_x != nullptr) store_acc<scalar_t, VEC>(grad_x + (b * L + l) * D + d, row);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum[k] += row[k];
    }
    if (grad_pos != nullptr) store_acc<scalar_t, VEC>(grad_pos + l * D + d, sum);
  }
}

// unshuffle backward, visible tokens: one warp per row of grad_x_visible.
template <typename scalar_t, typename index_t, int VEC>
__global__ void unshuffle_backward_x_kernel(const scalar_t* __restrict__ g, const index_t* __restrict__ ids,
                                            const int32_t* __restrict__ first, const int32_t* __restrict__ count,
                                            scalar_t* __restrict__ grad_x, int64_t B, int64_t L, int64_t K,
                                            int64_t D, int hc) {
  const int64_t S = L + hc;
  const auto [row, b, j, lane, valid] = warp_row(B, K + hc);
  if (!valid) return;
  const scalar_t* src = g + b * S * D;
  for (int64_t d = static_cast<int64_t>(lane) * VEC; d < D; d += 32 * VEC) {
    float acc[VEC];
    if (j < hc) {
      Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(src + d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = static_cast<float>(v.v[k]);
    } else {
      const int64_t k = j - hc;
      inverse_row_pack<scalar_t, index_t, VEC>(acc, src + hc * D, D, ids + b * L, L, k, first[b * K + k],
                                               count[b * K + k], d);
    }
    store_acc<scalar_t, VEC>(grad_x + row * D + d, acc);
  }
}

// unshuffle backward, column sums: block x = output position j; each thread walks the batch
// for its pack of D. grad_pos[j] = sum_b g[b, j]; mask_partial[j] = sum of the masked ones.
template <typename scalar_t, typename index_t, int VEC>
__global__ void unshuffle_backward_sums_kernel(const scalar_t* __restrict__ g, const index_t* __restrict__ ids,
                                               scalar_t* __restrict__ grad_pos, float* __restrict__ mask_partial,
                                               int64_t B, int64_t L, int64_t K, int64_t D, int hc) {
  const int64_t j = blockIdx.x;
  const int64_t S = L + hc;
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < D; d += static_cast<int64_t>(blockDim.x) * VEC) {
    float pos[VEC], masked[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) pos[k] = masked[k] = 0.0f;
    for (int64_t b = 0; b < B; ++b) {
      Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(g + (b * S + j) * D + d);
      // Ranks in [K, L) are the masked positions; an out-of-range rank's gradient is dropped.
      const int64_t rank = j >= hc ? static_cast<int64_t>(ids[b * L + j - hc]) : -1;
      const bool is_masked = rank >= K && rank < L;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float f = static_cast<float>(v.v[k]);
        pos[k] += f;
        masked[k] += is_masked ? f : 0.0f;
      }
    }
    if (grad_pos != nullptr) store_acc<scalar_t, VEC>(grad_pos + j * D + d, pos);
    if (mask_partial != nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) mask_partial[j * D + d + k] = masked[k];
    }
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

// ---------------------------------------------------------------- entry points

std::tuple<at::Tensor, at::Tensor> random_permutation_cuda(const at::Tensor& seed,
                                                           const std::optional<at::Tensor>& offset, int64_t batch,
                                                           int64_t num_patches, c10::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  auto ids_shuffle = at::empty({batch, num_patches}, opts);
  auto ids_restore = at::empty({batch, num_patches}, opts);
  MaskingOut out{ids_shuffle.data_ptr<int64_t>(), nullptr, ids_restore.data_ptr<int64_t>(), nullptr, nullptr, 0,
                 batch};
  launch_permutation(seed, offset, batch, num_patches, out, device);
  return {ids_shuffle, ids_restore};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(const at::Tensor& seed,
                                                                   const std::optional<at::Tensor>& offset,
                                                                   const std::optional<at::Tensor>& cu_seqlens,
                                                                   int64_t batch, int64_t num_patches,
                                                                   int64_t num_keep, c10::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor cu;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) == batch + 1,
                "csrc_random_masking_varlen: cu_seqlens must have shape (", batch + 1, ",), got ",
                cu_seqlens->sizes());
    cu = cu_seqlens->to(at::kLong).contiguous();  // its values are checked by the kernel
  }
  auto ids_keep = cu.defined() ? at::empty({num_keep}, opts) : at::empty({batch, num_keep}, opts);
  auto ids_restore = at::empty({batch, num_patches}, opts);
  auto mask = at::empty({batch, num_patches}, opts.dtype(at::kFloat));
  MaskingOut out{nullptr, ids_keep.data_ptr<int64_t>(), ids_restore.data_ptr<int64_t>(), mask.data_ptr<float>(),
                 ptr_or_null<int64_t>(cu), num_keep, batch};
  launch_permutation(seed, offset, batch, num_patches, out, device);
  return {ids_keep, ids_restore, mask};
}

at::Tensor gather_visible_cuda(FASTMIM_GATHER_VISIBLE_PARAMS) {
  const char* op = "csrc_gather_visible";
  check_cuda(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const TokenForwardSetup s = setup_gather_visible(x, ids_keep, pos_embed, cls_token);
  if (s.out.numel() == 0) return s.out;
  const int64_t B = s.B, L = s.L, D = s.D, K = s.K, hc = s.hc;
  dispatch_token_forward(s, x, ids_keep, op, [&](auto in_tag, auto out_tag, auto index_tag, const auto& pos) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    using index_t = typename decltype(index_tag)::type;
    const out_t* cls = hc ? cls_token->const_data_ptr<out_t>() : nullptr;
    const bool wide = pack_width<in_t>(D, {x, s.pos.rows, cls_token.value_or(at::Tensor()), s.out}) > 1;
    launch_packed<in_t>(wide, [&](auto vec) {
      gather_visible_kernel<in_t, out_t, index_t, decltype(vec)::value>
          <<<ceil_div(B * (K + hc), kWarpsPerBlock), 32 * kWarpsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<in_t>(), ids_keep.const_data_ptr<index_t>(), pos.patch, pos.cls, cls,
              s.out.data_ptr<out_t>(), B, L, K, D, static_cast<int>(hc));
    });
  });
  return s.out;
}

TensorTriple gather_visible_backward_cuda(FASTMIM_GATHER_VISIBLE_BACKWARD_PARAMS) {
  check_cuda(grad_out, "csrc_gather_visible_backward", "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const GatherVisibleBackwardSetup s = setup_gather_visible_backward(grad_out, ids_keep, num_patches, has_cls,
                                                                     need_x, need_pos, need_cls);
  const int64_t B = s.B, L = s.L, D = s.D, K = s.K;
  const int hc = static_cast<int>(s.hc);
  const bool cls_grad = need_cls && has_cls;
  if (B == 0) {  // sums over an empty batch; a grid with no block along the batch is not launchable
    s.grad_pos.zero_();
    s.grad_cls.zero_();
    return s.grads();
  }
  // No position to write (L == 0 without a cls gradient): an empty grid is not launchable.
  if ((!need_x && !need_pos && !cls_grad) || L + (cls_grad ? 1 : 0) == 0) return s.grads();
  FASTMIM_DISPATCH_FLOAT(grad_out.scalar_type(), "fastmim_csrc_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(ids_keep.scalar_type(), "fastmim_csrc_cuda", [&] {
      auto [first, count] = build_inverse<index_t>(ids_keep, L);
      // With pos_embed's gradient one block owns a position for the whole batch; without it
      // the batch is split across blocks for parallelism.
      const int64_t batch_per_block = need_pos || cls_grad ? B : std::max<int64_t>(1, ceil_div(B, 16));
      const dim3 grid(static_cast<unsigned>(L + (cls_grad ? 1 : 0)),
                      static_cast<unsigned>(ceil_div(B, batch_per_block)));
      const bool wide = pack_width<scalar_t>(D, {grad_out, s.grad_x, s.grad_pos, s.grad_cls}) > 1;
      launch_packed<scalar_t>(wide, [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        gather_visible_backward_kernel<scalar_t, index_t, VEC>
            <<<grid, pack_threads(D, VEC), 0, c10::cuda::getCurrentCUDAStream()>>>(
                grad_out.const_data_ptr<scalar_t>(), ids_keep.const_data_ptr<index_t>(),
                first.const_data_ptr<int32_t>(), count.const_data_ptr<int32_t>(),
                need_x ? s.grad_x.data_ptr<scalar_t>() : nullptr,
                need_pos ? s.grad_pos.data_ptr<scalar_t>() : nullptr,
                cls_grad ? s.grad_cls.data_ptr<scalar_t>() : nullptr, B, L, K, D, hc, batch_per_block);
      });
    });
  });
  return s.grads();
}

at::Tensor unshuffle_cuda(FASTMIM_UNSHUFFLE_PARAMS) {
  const char* op = "csrc_unshuffle";
  check_cuda(x_visible, op, "x_visible");
  const c10::cuda::CUDAGuard guard(x_visible.device());
  const TokenForwardSetup s = setup_unshuffle(x_visible, ids_restore, mask_token, pos_embed, has_cls);
  if (s.out.numel() == 0) return s.out;
  dispatch_token_forward(s, x_visible, ids_restore, op, [&](auto in_tag, auto out_tag, auto index_tag, const auto& pos) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    using index_t = typename decltype(index_tag)::type;
    const bool wide = pack_width<in_t>(s.D, {x_visible, mask_token, s.pos.rows, s.out}) > 1;
    launch_packed<in_t>(wide, [&](auto vec) {
      unshuffle_kernel<in_t, out_t, index_t, decltype(vec)::value>
          <<<ceil_div(s.B * (s.L + s.hc), kWarpsPerBlock), 32 * kWarpsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
              x_visible.const_data_ptr<in_t>(), ids_restore.const_data_ptr<index_t>(),
              mask_token.const_data_ptr<out_t>(), pos.patch, pos.cls, s.out.data_ptr<out_t>(), s.B, s.L, s.K, s.D,
              static_cast<int>(s.hc));
    });
  });
  return s.out;
}

TensorTriple unshuffle_backward_cuda(FASTMIM_UNSHUFFLE_BACKWARD_PARAMS) {
  check_cuda(grad_out, "csrc_unshuffle_backward", "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const UnshuffleBackwardSetup s = setup_unshuffle_backward(grad_out, ids_restore, num_visible, has_cls, need_x,
                                                            need_mask, need_pos);
  const int64_t B = s.B, L = s.L, D = s.D, K = s.K;
  const int hc = static_cast<int>(s.hc);
  const int64_t S = L + hc, rows_x = K + hc;
  if (S == 0) {  // L == 0 without a cls row: nothing to gather or sum, and no launchable grid
    if (need_mask) s.grad_mask.zero_();
    return s.grads();
  }
  FASTMIM_DISPATCH_FLOAT(grad_out.scalar_type(), "fastmim_csrc_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(ids_restore.scalar_type(), "fastmim_csrc_cuda", [&] {
      auto [first, count] = build_inverse<index_t>(ids_restore, K);
      auto stream = c10::cuda::getCurrentCUDAStream();
      const bool wide = pack_width<scalar_t>(D, {grad_out, s.grad_x, s.grad_pos}) > 1;
      if (need_x && B * rows_x > 0) {
        launch_packed<scalar_t>(wide, [&](auto vec) {
          unshuffle_backward_x_kernel<scalar_t, index_t, decltype(vec)::value>
              <<<ceil_div(B * rows_x, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
                  grad_out.const_data_ptr<scalar_t>(), ids_restore.const_data_ptr<index_t>(),
                  first.const_data_ptr<int32_t>(), count.const_data_ptr<int32_t>(), s.grad_x.data_ptr<scalar_t>(),
                  B, L, K, D, hc);
        });
      }
      if (need_mask || need_pos) {
        at::Tensor partial = need_mask ? at::empty({S, D}, grad_out.options().dtype(at::kFloat)) : at::Tensor();
        launch_packed<scalar_t>(wide, [&](auto vec) {
          constexpr int VEC = decltype(vec)::value;
          unshuffle_backward_sums_kernel<scalar_t, index_t, VEC><<<S, pack_threads(D, VEC), 0, stream>>>(
              grad_out.const_data_ptr<scalar_t>(), ids_restore.const_data_ptr<index_t>(),
              need_pos ? s.grad_pos.data_ptr<scalar_t>() : nullptr, need_mask ? partial.data_ptr<float>() : nullptr,
              B, L, K, D, hc);
        });
        if (need_mask) s.grad_mask.copy_(partial.sum(0));  // (S, D) -> (D,): a deterministic reduction
      }
    });
  });
  return s.grads();
}

}  // namespace fastmim
