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

// ---- parameters of the ops with a CPU, a CUDA and a Meta kernel, in the schema's order (see
// registration.cpp): the kernel of op <op> for a backend is <op>_<backend>(FASTMIM_<OP>_PARAMS).
#define FASTMIM_GATHER_VISIBLE_PARAMS                                                        \
  const at::Tensor &x, const at::Tensor &ids_keep, const std::optional<at::Tensor> &pos_embed, \
      const std::optional<at::Tensor> &cls_token
#define FASTMIM_GATHER_VISIBLE_BACKWARD_PARAMS                                                             \
  const at::Tensor &grad_out, const at::Tensor &ids_keep, int64_t num_patches, bool has_cls, bool need_x, \
      bool need_pos, bool need_cls
#define FASTMIM_UNSHUFFLE_PARAMS                                                                          \
  const at::Tensor &x_visible, const at::Tensor &ids_restore, const at::Tensor &mask_token,              \
      const std::optional<at::Tensor> &pos_embed, bool has_cls
#define FASTMIM_UNSHUFFLE_BACKWARD_PARAMS                                                                     \
  const at::Tensor &grad_out, const at::Tensor &ids_restore, int64_t num_visible, bool has_cls, bool need_x, \
      bool need_mask, bool need_pos
#define FASTMIM_MASKED_PATCH_MSE_PARAMS                                                                  \
  const at::Tensor &pred, const at::Tensor &imgs, const std::optional<at::Tensor> &mask,                \
      const std::optional<at::Tensor> &ids_masked, int64_t patch_size, bool norm_pix, double eps,       \
      c10::string_view reduction, bool compute_grad
#define FASTMIM_MASKED_PATCH_MSE_BACKWARD_PARAMS const at::Tensor &grad_pred, const at::Tensor &grad_output

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// X(op, result type, parameters) for each of those ops: declares and registers their kernels.
#define FASTMIM_DISPATCHED_OPS(X)                                                   \
  X(gather_visible, at::Tensor, FASTMIM_GATHER_VISIBLE_PARAMS)                      \
  X(gather_visible_backward, TensorTriple, FASTMIM_GATHER_VISIBLE_BACKWARD_PARAMS)  \
  X(unshuffle, at::Tensor, FASTMIM_UNSHUFFLE_PARAMS)                                \
  X(unshuffle_backward, TensorTriple, FASTMIM_UNSHUFFLE_BACKWARD_PARAMS)            \
  X(masked_patch_mse, TensorPair, FASTMIM_MASKED_PATCH_MSE_PARAMS)                  \
  X(masked_patch_mse_backward, void, FASTMIM_MASKED_PATCH_MSE_BACKWARD_PARAMS)

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

// ---- what the CPU and CUDA kernels of an op share: setup_<op> checks the arguments (the same
// RuntimeErrors on every backend), reads the sizes and allocates the outputs.
// Sizes of a token op: B samples, L patches, K kept (visible) patches, D features, hc = 1 with a
// cls row.
struct TokenSizes {
  int64_t B, L, D, K, hc;
};

// gather_visible and unshuffle: the result dtype, pos_embed's rows and the output, (B, K + hc, D)
// for gather_visible, (B, L + hc, D) for unshuffle.
struct TokenForwardSetup : TokenSizes {
  at::ScalarType out_dtype;
  PosRows pos;
  at::Tensor out;
};
TokenForwardSetup setup_gather_visible(FASTMIM_GATHER_VISIBLE_PARAMS);
TokenForwardSetup setup_unshuffle(FASTMIM_UNSHUFFLE_PARAMS);

struct GatherVisibleBackwardSetup : TokenSizes {
  at::Tensor grad_x, grad_pos, grad_cls;  // (B, L, D), (L, D), (D,); (0,) when not computed
  TensorTriple grads() const { return {grad_x, grad_pos, grad_cls}; }
};
GatherVisibleBackwardSetup setup_gather_visible_backward(FASTMIM_GATHER_VISIBLE_BACKWARD_PARAMS);
// The gradients' tensors alone (also the Meta kernel's results).
TensorTriple gather_visible_backward_outputs(const at::TensorOptions& opts, int64_t batch, int64_t num_patches,
                                             int64_t dim, bool has_cls, bool need_x, bool need_pos, bool need_cls);

struct UnshuffleBackwardSetup : TokenSizes {
  at::Tensor grad_x, grad_mask, grad_pos;  // (B, K + hc, D), (D,), (L + hc, D); (0,) when not computed
  TensorTriple grads() const { return {grad_x, grad_mask, grad_pos}; }
};
UnshuffleBackwardSetup setup_unshuffle_backward(FASTMIM_UNSHUFFLE_BACKWARD_PARAMS);
TensorTriple unshuffle_backward_outputs(const at::TensorOptions& opts, int64_t batch, int64_t num_patches,
                                        int64_t num_visible, int64_t dim, bool has_cls, bool need_x, bool need_mask,
                                        bool need_pos);

// masked_patch_mse: B images of C x H x W in patches of p x p (L = (H / p) * (W / p) patches of
// N = p * p * C values, Wp patches per row of the image).
struct PatchGeometry {
  int64_t B, L, N, C, H, W, p, Wp;
};
struct PatchMseSetup {
  std::string reduction;
  PatchGeometry g;
  int layout;  // 0: pred (B, L, N); 1: ids_masked (B, K), pred (B, K, N); 2: ids_masked (T,), pred (T, N)
  int64_t rows, rows_per_sample;  // rows of pred; per sample (K with layout 1, else L)
  at::Tensor weight;              // the mask as contiguous float32; undefined without a mask
  at::Tensor row_loss, grad;      // float32 loss per row of pred; the gradient ((0,) without compute_grad)
};
PatchMseSetup setup_masked_patch_mse(FASTMIM_MASKED_PATCH_MSE_PARAMS);
// Checks the backward's arguments; returns grad_output as contiguous float32 (a scalar, or one
// factor per row of grad_pred).
at::Tensor setup_masked_patch_mse_backward(FASTMIM_MASKED_PATCH_MSE_BACKWARD_PARAMS);

// ---- dtype dispatch and pointers shared by the token kernels ----
template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<in_t>{}, Tag<out_t>{}) for in_t = `in` and out_t = `out`, where out is in or float32.
template <typename F>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, const char* op, const F& f) {
  TORCH_CHECK(out == in || out == at::kFloat, op, ": unsupported dtype combination ", in, " -> ", out);
  FASTMIM_DISPATCH_FLOAT(in, "fastmim_csrc", [&] {
    if (out == in) {
      f(Tag<scalar_t>{}, Tag<scalar_t>{});
    } else {
      f(Tag<scalar_t>{}, Tag<float>{});
    }
  });
}

// Rows of pos_embed: `patch` (row l: patch l) and `cls` (the cls slot's row); null when absent.
template <typename T>
struct PosPointers {
  const T* patch = nullptr;
  const T* cls = nullptr;
};

template <typename T>
PosPointers<T> pos_pointers(const PosRows& pos, int64_t dim) {
  if (!pos.rows.defined()) return {};
  const T* rows = pos.rows.const_data_ptr<T>();
  return {rows + pos.patch_offset * dim, pos.patch_offset == 1 ? rows : nullptr};
}

// Dispatches a forward token op (tokens -> s.out, indexed by ids) over its dtypes:
// f(Tag<in_t>{}, Tag<out_t>{}, Tag<index_t>{}, PosPointers<out_t>).
template <typename F>
void dispatch_token_forward(const TokenForwardSetup& s, const at::Tensor& tokens, const at::Tensor& ids,
                            const char* op, const F& f) {
  dispatch_in_out(tokens.scalar_type(), s.out_dtype, op, [&](auto in_tag, auto out_tag) {
    using out_t = typename decltype(out_tag)::type;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fastmim_csrc", [&] {
      f(in_tag, out_tag, Tag<index_t>{}, pos_pointers<out_t>(s.pos, s.D));
    });
  });
}

// Dispatches masked_patch_mse over the dtypes of pred, imgs and ids_masked (int64 when absent):
// f(Tag<pred_t>{}, Tag<img_t>{}, Tag<index_t>{}).
template <typename F>
void dispatch_patch_mse(const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& ids_masked,
                        const F& f) {
  const at::ScalarType index_type = ids_masked.has_value() ? ids_masked->scalar_type() : at::kLong;
  FASTMIM_DISPATCH_FLOAT(pred.scalar_type(), "fastmim_csrc", [&] {
    using pred_t = scalar_t;
    FASTMIM_DISPATCH_FLOAT(imgs.scalar_type(), "fastmim_csrc", [&] {
      using img_t = scalar_t;
      AT_DISPATCH_INDEX_TYPES(index_type, "fastmim_csrc", [&] { f(Tag<pred_t>{}, Tag<img_t>{}, Tag<index_t>{}); });
    });
  });
}

// ---- CPU ----
// Row b of every random op is sample offset + b of the seed's stream.
std::tuple<at::Tensor, at::Tensor> random_permutation_cpu(const at::Tensor& seed, uint64_t offset, int64_t batch,
                                                          int64_t num_patches);
// Dense (cu_seqlens absent: num_keep per sample) or packed varlen (num_keep = total rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& seed, uint64_t offset,
                                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                                  int64_t batch, int64_t num_patches,
                                                                  int64_t num_keep);
#define FASTMIM_DECLARE_CPU(op, result, params) result op##_cpu(params);
FASTMIM_DISPATCHED_OPS(FASTMIM_DECLARE_CPU)
#undef FASTMIM_DECLARE_CPU
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
#define FASTMIM_DECLARE_CUDA(op, result, params) result op##_cuda(params);
FASTMIM_DISPATCHED_OPS(FASTMIM_DECLARE_CUDA)
#undef FASTMIM_DECLARE_CUDA

}  // namespace fastmim
