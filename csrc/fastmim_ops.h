// Declarations shared by the CPU and CUDA implementations of fastmim's compiled ops.
//
// Every op is registered as torch.ops.fastmim.csrc_<op> (see registration.cpp); the public
// Python ops in fastmim/ops/ call them when the "csrc" backend is selected. The semantics are
// those of the plain-PyTorch references in fastmim/ops/token_ops.py and fastmim/ops/loss.py.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>

// Dispatch over the floating dtypes the kernels take (float32, float16, bfloat16): unlike
// AT_DISPATCH_FLOATING_TYPES_AND2 it does not instantiate float64, which no op accepts.
#define FASTMIM_DISPATCH_FLOAT(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                        \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastmim {

// ---- counter-based RNG of random_masking (identical bits on every backend) ----
// All arithmetic is unsigned 32-bit; see the RNG section of fastmim/ops/token_ops.py.
#if defined(__CUDACC__)
#define FASTMIM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTMIM_HOST_DEVICE inline
#endif

FASTMIM_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 16;
  return x;
}

FASTMIM_HOST_DEVICE uint32_t seed_key(uint64_t seed) {
  return mix32(static_cast<uint32_t>(seed)) ^ mix32(static_cast<uint32_t>(seed >> 32) ^ 0x1B873593u);
}

// Key of sample `counter` = offset + b (the sample offset of the call plus the row), mod 2**32.
FASTMIM_HOST_DEVICE uint32_t row_key(uint32_t key, uint64_t counter) {
  return mix32(key ^ mix32(static_cast<uint32_t>(counter)));
}

FASTMIM_HOST_DEVICE uint32_t patch_noise(uint32_t rkey, uint32_t i) { return mix32(rkey ^ (i * 0x2545F491u)); }

// Sort key of patch i: noise in the high bits, the patch index in the low 31 bits, so an
// ascending sort of the keys is the stable ascending argsort of the noise (ties -> smaller i).
// It is < 2**63, so it also sorts correctly as a signed int64.
FASTMIM_HOST_DEVICE uint64_t sort_key(uint32_t noise, uint32_t i) {
  return (static_cast<uint64_t>(noise) << 31) | static_cast<uint64_t>(i);
}

// ---- shared argument checks (each raises RuntimeError naming the op and the argument) ----
void check_index_tensor(const at::Tensor& ids, const char* op, const char* name, int64_t batch, int64_t length);
void check_float_tensor(const at::Tensor& t, const char* op, const char* name);
void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                       const char* name_b);
// Result dtype of a token op: the promotion of x's dtype with the small operands' (pos_embed,
// cls_token, mask_token), which must already have that dtype (the Python side casts them).
at::ScalarType token_result_dtype(const at::Tensor& x, std::initializer_list<const std::optional<at::Tensor>*> aux,
                                  const char* op);
// pos_embed (P, D) or (1, P, D) with P = L (patch rows) or L + 1 (row 0: the cls slot).
struct PosRows {
  at::Tensor rows;           // (P, D) view, undefined when there is no pos_embed
  int64_t patch_offset = 0;  // 1 when row 0 is the cls slot
};
PosRows check_pos_embed(const std::optional<at::Tensor>& pos, const at::Tensor& x, at::ScalarType dtype,
                        int64_t num_patches, int64_t dim, const char* op);
void check_token_vector(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype, int64_t dim, const char* op,
                        const char* name);
void check_patch_mse_args(const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& mask,
                          const std::optional<at::Tensor>& ids_masked, int64_t patch_size,
                          const std::string& reduction, const char* op);
// Seed of the random ops, read on the host (an int64 tensor with one element on the host).
uint64_t host_seed(const at::Tensor& seed, const char* op);
// Checks the sample offset of the random ops (an int64 tensor with one element; a host value
// must be >= 0: one on a device is not read, that would be a sync).
void check_offset(const std::optional<at::Tensor>& offset, const char* op);
// The sample offset read on the host (0 when absent); check_offset first.
uint64_t host_offset(const std::optional<at::Tensor>& offset);

// ---- CPU ----
// Row b of every random op is sample offset + b of the seed's stream.
std::tuple<at::Tensor, at::Tensor> random_permutation_cpu(const at::Tensor& seed, uint64_t offset, int64_t batch,
                                                          int64_t num_patches);
// Dense (cu_seqlens absent: num_keep per sample) or packed varlen (num_keep = total rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& seed, uint64_t offset,
                                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                                  int64_t batch, int64_t num_patches,
                                                                  int64_t num_keep);
at::Tensor gather_visible_cpu(const at::Tensor& x, const at::Tensor& ids_keep,
                              const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_visible_backward_cpu(const at::Tensor& grad_out,
                                                                           const at::Tensor& ids_keep,
                                                                           int64_t num_patches, bool has_cls,
                                                                           bool need_x, bool need_pos,
                                                                           bool need_cls);
at::Tensor unshuffle_cpu(const at::Tensor& x_visible, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                         const std::optional<at::Tensor>& pos_embed, bool has_cls);
std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_backward_cpu(const at::Tensor& grad_out,
                                                                      const at::Tensor& ids_restore,
                                                                      int64_t num_visible, bool has_cls, bool need_x,
                                                                      bool need_mask, bool need_pos);
std::tuple<at::Tensor, at::Tensor> masked_patch_mse_cpu(const at::Tensor& pred, const at::Tensor& imgs,
                                                        const std::optional<at::Tensor>& mask,
                                                        const std::optional<at::Tensor>& ids_masked,
                                                        int64_t patch_size, bool norm_pix, double eps,
                                                        c10::string_view reduction, bool compute_grad);
void masked_patch_mse_backward_cpu(const at::Tensor& grad_pred, const at::Tensor& grad_output);
// resized_crop_flip_normalize: image b of the uint8 tensor at element offset layout[b, 0] (layout
// (B, 6) int64: offset, height, width, stride_c, stride_h, stride_w), boxes (B, 4) (top, left,
// height, width), optional flip (B,) bool, mean / std (C,) float32 -> (B, C, out_h, out_w) of dtype.
at::Tensor resized_crop_flip_normalize_cpu(const at::Tensor& images, const at::Tensor& layout,
                                           const at::Tensor& boxes, const std::optional<at::Tensor>& flip,
                                           int64_t out_h, int64_t out_w, const at::Tensor& mean,
                                           const at::Tensor& std, at::ScalarType dtype);

// ---- CUDA (defined only when the extension is built with CUDA) ----
std::tuple<at::Tensor, at::Tensor> random_permutation_cuda(const at::Tensor& seed,
                                                           const std::optional<at::Tensor>& offset, int64_t batch,
                                                           int64_t num_patches, c10::Device device);
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(const at::Tensor& seed,
                                                                   const std::optional<at::Tensor>& offset,
                                                                   const std::optional<at::Tensor>& cu_seqlens,
                                                                   int64_t batch, int64_t num_patches,
                                                                   int64_t num_keep, c10::Device device);
at::Tensor gather_visible_cuda(const at::Tensor& x, const at::Tensor& ids_keep,
                               const std::optional<at::Tensor>& pos_embed,
                               const std::optional<at::Tensor>& cls_token);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_visible_backward_cuda(const at::Tensor& grad_out,
                                                                            const at::Tensor& ids_keep,
                                                                            int64_t num_patches, bool has_cls,
                                                                            bool need_x, bool need_pos,
                                                                            bool need_cls);
at::Tensor unshuffle_cuda(const at::Tensor& x_visible, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                          const std::optional<at::Tensor>& pos_embed, bool has_cls);
std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_backward_cuda(const at::Tensor& grad_out,
                                                                       const at::Tensor& ids_restore,
                                                                       int64_t num_visible, bool has_cls, bool need_x,
                                                                       bool need_mask, bool need_pos);
std::tuple<at::Tensor, at::Tensor> masked_patch_mse_cuda(const at::Tensor& pred, const at::Tensor& imgs,
                                                         const std::optional<at::Tensor>& mask,
                                                         const std::optional<at::Tensor>& ids_masked,
                                                         int64_t patch_size, bool norm_pix, double eps,
                                                         c10::string_view reduction, bool compute_grad);
void masked_patch_mse_backward_cuda(const at::Tensor& grad_pred, const at::Tensor& grad_output);

}  // namespace fastmim
