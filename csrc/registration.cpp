// Schemas of fastmim's compiled ops, their Meta (shape-only) kernels, the device dispatch of
// the random ops, the argument checks shared by the CPU and CUDA kernels, and the entry point
// of the Python module fastmim._C.
//
// The op names carry a csrc_ prefix: the public ops fastmim::<op> are registered from Python
// (torch.library.custom_op) and call these when the csrc backend is selected.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastmim_ops.h"

#ifdef FASTMIM_WITH_CUDA
#define FASTMIM_CUDA_NOTE " and cuda"
#else
#define FASTMIM_CUDA_NOTE "; it was built without CUDA"
#endif

namespace fastmim {

void check_index_tensor(const at::Tensor& ids, const char* op, const char* name, int64_t batch, int64_t length) {
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op, ": ", name,
              " must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2, op, ": ", name, " must be 2-D (B, ", length, "), got shape ", ids.sizes());
  TORCH_CHECK(ids.size(0) == batch && (length < 0 || ids.size(1) == length), op, ": ", name, " must have shape (",
              batch, ", ", length < 0 ? std::string("N") : std::to_string(length), "), got ", ids.sizes());
  TORCH_CHECK(ids.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first), got strides ",
              t.strides(), " for shape ", t.sizes());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                       const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " and ", name_b, " must be on the same device, got ",
              a.device(), " and ", b.device());
}

at::ScalarType token_result_dtype(const at::Tensor& x, std::initializer_list<const std::optional<at::Tensor>*> aux,
                                  const char* op) {
  at::ScalarType out = x.scalar_type();
  for (const auto* t : aux) {
    if (t->has_value()) out = c10::promoteTypes(out, (*t)->scalar_type());
  }
  TORCH_CHECK(out == x.scalar_type() || out == at::kFloat, op, ": the inputs promote to ", out,
              "; only the dtype of the tokens or float32 is supported");
  return out;
}

PosRows check_pos_embed(const std::optional<at::Tensor>& pos, const at::Tensor& x, at::ScalarType dtype,
                        int64_t num_patches, int64_t dim, const char* op) {
  if (!pos.has_value()) return {};
  const at::Tensor& t = *pos;
  check_float_tensor(t, op, "pos_embed");
  check_same_device(t, x, op, "pos_embed", "the tokens");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": pos_embed must have the result dtype ", dtype, ", got ",
              t.scalar_type(), " (cast it first)");
  const bool shape_ok = (t.dim() == 2 || (t.dim() == 3 && t.size(0) == 1)) && t.size(-1) == dim &&
                        (t.size(-2) == num_patches || t.size(-2) == num_patches + 1);
  TORCH_CHECK(shape_ok, op, ": pos_embed must have shape (L, D) or (L + 1, D) (optionally with a leading 1) with ",
              "L = ", num_patches, ", D = ", dim, ", got ", t.sizes());
  return {t.view({t.size(-2), dim}), t.size(-2) == num_patches + 1 ? 1 : 0};
}

void check_token_vector(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype, int64_t dim, const char* op,
                        const char* name) {
  check_float_tensor(t, op, name);
  check_same_device(t, x, op, name, "the tokens");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have the result dtype ", dtype, ", got ",
              t.scalar_type(), " (cast it first)");
  TORCH_CHECK(t.numel() == dim && t.size(-1) == dim, op, ": ", name, " must have ", dim,
              " elements (D,), got shape ", t.sizes());
}

void check_patch_mse_args(const at::Tensor& pred, const at::Tensor& imgs, const std::optional<at::Tensor>& mask,
                          const std::optional<at::Tensor>& ids_masked, int64_t patch_size,
                          const std::string& reduction, const char* op) {
  check_float_tensor(pred, op, "pred");
  check_float_tensor(imgs, op, "imgs");
  check_same_device(pred, imgs, op, "pred", "imgs");
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", op,
              ": reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
  TORCH_CHECK(imgs.dim() == 4, op, ": imgs must be 4-D (B, C, H, W), got shape ", imgs.sizes());
  TORCH_CHECK(patch_size >= 1, op, ": patch_size must be >= 1, got ", patch_size);
  const int64_t B = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), p = patch_size;
  // An empty batch is a valid call (loss 0, no rows); an empty image is not.
  TORCH_CHECK(C >= 1 && H >= 1 && W >= 1, op, ": imgs must have C, H and W >= 1 (only the batch may be empty), ",
              "got shape ", imgs.sizes());
  TORCH_CHECK(H % p == 0 && W % p == 0, op, ": image size ", H, "x", W, " is not divisible by patch_size ", p);
  const int64_t L = (H / p) * (W / p), N = p * p * C;
  if (!ids_masked.has_value()) {
    TORCH_CHECK(pred.dim() == 3 && pred.size(0) == B && pred.size(1) == L && pred.size(2) == N, op,
                ": pred must have shape (", B, ", ", L, ", ", N, ") for imgs of shape ", imgs.sizes(),
                " and patch_size ", p, ", got ", pred.sizes());
  } else {
    const at::Tensor& ids = *ids_masked;
    check_same_device(ids, pred, op, "ids_masked", "pred");
    TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
                ": ids_masked must be int64 or int32, got ", ids.scalar_type());
    TORCH_CHECK(ids.is_contiguous(), op, ": ids_masked must be contiguous");
    if (ids.dim() == 2) {
      TORCH_CHECK(ids.size(0) == B && pred.dim() == 3 && pred.size(0) == B && pred.size(1) == ids.size(1) &&
                      pred.size(2) == N,
                  op, ": with ids_masked (B, K) = ", ids.sizes(), ", pred must have shape (", B, ", K, ", N,
                  "), got ", pred.sizes());
    } else {
      TORCH_CHECK(ids.dim() == 1 && pred.dim() == 2 && pred.size(0) == ids.size(0) && pred.size(1) == N, op,
                  ": with packed ids_masked (T,), pred must have shape (T, ", N, "); got ids_masked ", ids.sizes(),
                  " and pred ", pred.sizes());
    }
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_same_device(m, pred, op, "mask", "pred");
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == L, op, ": mask must have shape (", B, ", ", L,
                "), got ", m.sizes());
    const auto mdt = m.scalar_type();
    TORCH_CHECK(mdt == at::kFloat || mdt == at::kBFloat16 || mdt == at::kHalf || mdt == at::kDouble ||
                    mdt == at::kBool,
                op, ": mask must be a float or bool tensor, got ", mdt);
  }
}

uint64_t host_seed(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed must be an int64 tensor with one element, got ", seed.scalar_type(), " of shape ",
              seed.sizes());
  return static_cast<uint64_t>(seed.item<int64_t>());
}

void check_offset(const std::optional<at::Tensor>& offset, const char* op) {
  if (!offset.has_value()) return;
  TORCH_CHECK(offset->scalar_type() == at::kLong && offset->numel() == 1, op,
              ": offset must be an int64 tensor with one element, got ", offset->scalar_type(), " of shape ",
              offset->sizes());
  if (offset->device().is_cpu()) {
    const int64_t value = offset->item<int64_t>();
    TORCH_CHECK(value >= 0, op, ": offset must be in [0, 2**63), got ", value);
  }
}

uint64_t host_offset(const std::optional<at::Tensor>& offset) {
  return offset.has_value() ? static_cast<uint64_t>(offset->item<int64_t>()) : 0;
}

// ---- setup of the CPU and CUDA kernels ----

namespace {

// Tokens x (B, N, D) and their index tensor ids (B, any).
void check_tokens(const at::Tensor& x, const at::Tensor& ids, const char* op, const char* x_name,
                  const char* ids_name) {
  check_float_tensor(x, op, x_name);
  TORCH_CHECK(x.dim() == 3, op, ": ", x_name, " must be 3-D (B, N, D), got shape ", x.sizes());
  check_same_device(x, ids, op, x_name, ids_name);
  check_index_tensor(ids, op, ids_name, x.size(0), -1);
}

// A gradient's tensor of `sizes` when it is asked for, else an empty (0,) one.
at::Tensor grad_or_empty(bool needed, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return needed ? at::empty(sizes, opts) : at::empty({0}, opts);
}

}  // namespace

TokenForwardSetup setup_gather_visible(FASTMIM_GATHER_VISIBLE_PARAMS) {
  const char* op = "csrc_gather_visible";
  check_tokens(x, ids_keep, op, "x", "ids_keep");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = ids_keep.size(1);
  TORCH_CHECK(K <= L, op, ": ids_keep has ", K, " columns but x has only ", L, " patches");
  const at::ScalarType out_dtype = token_result_dtype(x, {&pos_embed, &cls_token}, op);
  const PosRows pos = check_pos_embed(pos_embed, x, out_dtype, L, D, op);
  if (cls_token.has_value()) check_token_vector(*cls_token, x, out_dtype, D, op, "cls_token");
  const int64_t hc = cls_token.has_value() ? 1 : 0;
  return {{B, L, D, K, hc}, out_dtype, pos, at::empty({B, K + hc, D}, x.options().dtype(out_dtype))};
}

TensorTriple gather_visible_backward_outputs(const at::TensorOptions& opts, int64_t batch, int64_t num_patches,
                                             int64_t dim, bool has_cls, bool need_x, bool need_pos, bool need_cls) {
  return {grad_or_empty(need_x, {batch, num_patches, dim}, opts), grad_or_empty(need_pos, {num_patches, dim}, opts),
          grad_or_empty(need_cls && has_cls, {dim}, opts)};
}

GatherVisibleBackwardSetup setup_gather_visible_backward(FASTMIM_GATHER_VISIBLE_BACKWARD_PARAMS) {
  const char* op = "csrc_gather_visible_backward";
  check_tokens(grad_out, ids_keep, op, "grad_out", "ids_keep");
  const int64_t B = grad_out.size(0), D = grad_out.size(2), K = ids_keep.size(1), L = num_patches;
  const int64_t hc = has_cls ? 1 : 0;
  TORCH_CHECK(grad_out.size(1) == K + hc, op, ": grad_out must have K + has_cls = ", K + hc, " rows, got ",
              grad_out.size(1));
  TORCH_CHECK(L >= K, op, ": num_patches (", L, ") must be >= K (", K, ")");
  auto [grad_x, grad_pos, grad_cls] =
      gather_visible_backward_outputs(grad_out.options(), B, L, D, has_cls, need_x, need_pos, need_cls);
  return {{B, L, D, K, hc}, grad_x, grad_pos, grad_cls};
}

TokenForwardSetup setup_unshuffle(FASTMIM_UNSHUFFLE_PARAMS) {
  const char* op = "csrc_unshuffle";
  check_tokens(x_visible, ids_restore, op, "x_visible", "ids_restore");
  const int64_t hc = has_cls ? 1 : 0;
  const int64_t B = x_visible.size(0), D = x_visible.size(2), L = ids_restore.size(1), K = x_visible.size(1) - hc;
  TORCH_CHECK(K >= 0 && K <= L, op, ": x_visible must have K + has_cls rows with 0 <= K <= L = ", L, ", got ",
              x_visible.size(1), " rows");
  const std::optional<at::Tensor> mask_opt = mask_token;
  const at::ScalarType out_dtype = token_result_dtype(x_visible, {&mask_opt, &pos_embed}, op);
  check_token_vector(mask_token, x_visible, out_dtype, D, op, "mask_token");
  const PosRows pos = check_pos_embed(pos_embed, x_visible, out_dtype, L, D, op);
  return {{B, L, D, K, hc}, out_dtype, pos, at::empty({B, L + hc, D}, x_visible.options().dtype(out_dtype))};
}

TensorTriple unshuffle_backward_outputs(const at::TensorOptions& opts, int64_t batch, int64_t num_patches,
                                        int64_t num_visible, int64_t dim, bool has_cls, bool need_x, bool need_mask,
                                        bool need_pos) {
  const int64_t hc = has_cls ? 1 : 0;
  return {grad_or_empty(need_x, {batch, num_visible + hc, dim}, opts), grad_or_empty(need_mask, {dim}, opts),
          grad_or_empty(need_pos, {num_patches + hc, dim}, opts)};
}

UnshuffleBackwardSetup setup_unshuffle_backward(FASTMIM_UNSHUFFLE_BACKWARD_PARAMS) {
  const char* op = "csrc_unshuffle_backward";
  check_tokens(grad_out, ids_restore, op, "grad_out", "ids_restore");
  const int64_t hc = has_cls ? 1 : 0;
  const int64_t B = grad_out.size(0), D = grad_out.size(2), L = ids_restore.size(1), K = num_visible;
  TORCH_CHECK(grad_out.size(1) == L + hc, op, ": grad_out must have L + has_cls = ", L + hc, " rows, got ",
              grad_out.size(1));
  TORCH_CHECK(K >= 0 && K <= L, op, ": num_visible must be in [0, ", L, "], got ", K);
  auto [grad_x, grad_mask, grad_pos] =
      unshuffle_backward_outputs(grad_out.options(), B, L, K, D, has_cls, need_x, need_mask, need_pos);
  return {{B, L, D, K, hc}, grad_x, grad_mask, grad_pos};
}

PatchMseSetup setup_masked_patch_mse(FASTMIM_MASKED_PATCH_MSE_PARAMS) {
  std::string red(reduction);
  check_patch_mse_args(pred, imgs, mask, ids_masked, patch_size, red, "csrc_masked_patch_mse");
  const int64_t p = patch_size;
  const PatchGeometry g{imgs.size(0), (imgs.size(2) / p) * (imgs.size(3) / p), pred.size(-1), imgs.size(1),
                        imgs.size(2), imgs.size(3), p, imgs.size(3) / p};
  const int layout = !ids_masked.has_value() ? 0 : (ids_masked->dim() == 2 ? 1 : 2);
  const int64_t rows = pred.numel() / g.N;
  const int64_t rows_per_sample = layout == 1 ? ids_masked->size(1) : g.L;
  at::Tensor weight = mask.has_value() ? mask->to(at::kFloat).contiguous() : at::Tensor();
  auto row_loss = at::empty(pred.sizes().slice(0, pred.dim() - 1), pred.options().dtype(at::kFloat));
  auto grad = compute_grad ? at::empty_like(pred, at::MemoryFormat::Contiguous) : at::empty({0}, pred.options());
  return {std::move(red), g, layout, rows, rows_per_sample, weight, row_loss, grad};
}

at::Tensor setup_masked_patch_mse_backward(FASTMIM_MASKED_PATCH_MSE_BACKWARD_PARAMS) {
  const char* op = "csrc_masked_patch_mse_backward";
  check_float_tensor(grad_pred, op, "grad_pred");
  check_same_device(grad_output, grad_pred, op, "grad_output", "grad_pred");
  TORCH_CHECK(grad_pred.dim() >= 1 && grad_pred.numel() > 0, op, ": grad_pred is empty (shape ", grad_pred.sizes(),
              "): was the forward run with compute_grad=True?");
  if (grad_output.dim() > 0) {
    TORCH_CHECK(grad_output.sizes() == grad_pred.sizes().slice(0, grad_pred.dim() - 1), op,
                ": grad_output must be a scalar or have shape ", grad_pred.sizes().slice(0, grad_pred.dim() - 1),
                " (one factor per row), got ", grad_output.sizes());
  }
  return grad_output.to(at::kFloat).contiguous();
}

namespace {

void check_random_args(int64_t batch, int64_t num_patches, int64_t num_keep, const char* op) {
  TORCH_CHECK(batch >= 0, op, ": batch must be >= 0, got ", batch);
  TORCH_CHECK(num_patches >= 1 && num_patches < (int64_t{1} << 31), op,
              ": num_patches must be in [1, 2**31), got ", num_patches);
  TORCH_CHECK(num_keep >= 0 && num_keep <= num_patches, op, ": num_keep must be in [0, num_patches=", num_patches,
              "], got ", num_keep);
}

// ---- the random ops: the outputs go to `device`, which need not be the seed's device, so one
// kernel picks the implementation from `device` (their fake kernels are registered from Python).

std::tuple<at::Tensor, at::Tensor> random_permutation(const at::Tensor& seed, int64_t batch, int64_t num_patches,
                                                      c10::Device device, const std::optional<at::Tensor>& offset) {
  const char* op = "csrc_random_permutation";
  check_random_args(batch, num_patches, 0, op);
  check_offset(offset, op);
  if (device.is_cpu()) return random_permutation_cpu(seed, host_offset(offset), batch, num_patches);
#ifdef FASTMIM_WITH_CUDA
  if (device.is_cuda()) return random_permutation_cuda(seed, offset, batch, num_patches, device);
#endif
  TORCH_CHECK(false, op, ": no kernel for device ", device, " (fastmim._C supports cpu", FASTMIM_CUDA_NOTE, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking(const at::Tensor& seed, int64_t batch,
                                                              int64_t num_patches, int64_t num_keep,
                                                              c10::Device device,
                                                              const std::optional<at::Tensor>& offset) {
  const char* op = "csrc_random_masking";
  check_random_args(batch, num_patches, num_keep, op);
  check_offset(offset, op);
  if (device.is_cpu()) return random_masking_cpu(seed, host_offset(offset), std::nullopt, batch, num_patches, num_keep);
#ifdef FASTMIM_WITH_CUDA
  if (device.is_cuda()) return random_masking_cuda(seed, offset, std::nullopt, batch, num_patches, num_keep, device);
#endif
  TORCH_CHECK(false, op, ": no kernel for device ", device, " (fastmim._C supports cpu", FASTMIM_CUDA_NOTE, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_varlen(const at::Tensor& seed,
                                                                     const at::Tensor& cu_seqlens, int64_t batch,
                                                                     int64_t num_patches, int64_t total,
                                                                     c10::Device device,
                                                                     const std::optional<at::Tensor>& offset) {
  const char* op = "csrc_random_masking_varlen";
  check_random_args(batch, num_patches, 0, op);
  check_offset(offset, op);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong || cu_seqlens.scalar_type() == at::kInt, op,
              ": cu_seqlens must be int64 or int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) == batch + 1, op, ": cu_seqlens must have shape (",
              batch + 1, ",), got ", cu_seqlens.sizes());
  TORCH_CHECK(total >= 0 && total <= batch * num_patches, op, ": total must be in [0, B * L], got ", total);
  TORCH_CHECK(cu_seqlens.device() == device, op, ": cu_seqlens must be on ", device, ", got ", cu_seqlens.device());
  if (device.is_cpu()) return random_masking_cpu(seed, host_offset(offset), cu_seqlens, batch, num_patches, total);
#ifdef FASTMIM_WITH_CUDA
  if (device.is_cuda()) return random_masking_cuda(seed, offset, cu_seqlens, batch, num_patches, total, device);
#endif
  TORCH_CHECK(false, op, ": no kernel for device ", device, " (fastmim._C supports cpu", FASTMIM_CUDA_NOTE, ")");
}

// ---- Meta kernels: output shapes and dtypes (torch.compile traces through these) ----
// The dispatcher also picks them when any argument is a meta tensor, so they repeat the real
// kernels' same-device checks: a meta index tensor next to CPU tokens is an error, not a
// shape-only result.

void check_same_device_opt(const std::optional<at::Tensor>& a, const at::Tensor& b, const char* op,
                           const char* name_a, const char* name_b) {
  if (a.has_value()) check_same_device(*a, b, op, name_a, name_b);
}

at::Tensor gather_visible_meta(FASTMIM_GATHER_VISIBLE_PARAMS) {
  const char* op = "csrc_gather_visible";
  check_same_device(x, ids_keep, op, "x", "ids_keep");
  check_same_device_opt(pos_embed, x, op, "pos_embed", "the tokens");
  check_same_device_opt(cls_token, x, op, "cls_token", "the tokens");
  TORCH_CHECK(x.dim() == 3 && ids_keep.dim() == 2, op, ": x must be (B, L, D) and ids_keep (B, K)");
  const at::ScalarType dtype = token_result_dtype(x, {&pos_embed, &cls_token}, op);
  return at::empty({x.size(0), ids_keep.size(1) + (cls_token.has_value() ? 1 : 0), x.size(2)},
                   x.options().dtype(dtype));
}

TensorTriple gather_visible_backward_meta(FASTMIM_GATHER_VISIBLE_BACKWARD_PARAMS) {
  check_same_device(grad_out, ids_keep, "csrc_gather_visible_backward", "grad_out", "ids_keep");
  return gather_visible_backward_outputs(grad_out.options(), grad_out.size(0), num_patches, grad_out.size(-1), has_cls,
                                         need_x, need_pos, need_cls);
}

at::Tensor unshuffle_meta(FASTMIM_UNSHUFFLE_PARAMS) {
  const char* op = "csrc_unshuffle";
  check_same_device(x_visible, ids_restore, op, "x_visible", "ids_restore");
  check_same_device(mask_token, x_visible, op, "mask_token", "the tokens");
  check_same_device_opt(pos_embed, x_visible, op, "pos_embed", "the tokens");
  TORCH_CHECK(x_visible.dim() == 3 && ids_restore.dim() == 2, op,
              ": x_visible must be (B, K, D) and ids_restore (B, L)");
  const std::optional<at::Tensor> mask_opt = mask_token;
  const at::ScalarType dtype = token_result_dtype(x_visible, {&mask_opt, &pos_embed}, op);
  return at::empty({x_visible.size(0), ids_restore.size(1) + (has_cls ? 1 : 0), x_visible.size(2)},
                   x_visible.options().dtype(dtype));
}

TensorTriple unshuffle_backward_meta(FASTMIM_UNSHUFFLE_BACKWARD_PARAMS) {
  check_same_device(grad_out, ids_restore, "csrc_unshuffle_backward", "grad_out", "ids_restore");
  return unshuffle_backward_outputs(grad_out.options(), grad_out.size(0), ids_restore.size(1), num_visible,
                                    grad_out.size(-1), has_cls, need_x, need_mask, need_pos);
}

TensorPair masked_patch_mse_meta(FASTMIM_MASKED_PATCH_MSE_PARAMS) {
  const char* op = "csrc_masked_patch_mse";
  check_same_device(pred, imgs, op, "pred", "imgs");
  check_same_device_opt(mask, pred, op, "mask", "pred");
  check_same_device_opt(ids_masked, pred, op, "ids_masked", "pred");
  auto f32 = pred.options().dtype(at::kFloat);
  auto loss = reduction == "none" ? at::empty(pred.sizes().slice(0, pred.dim() - 1), f32) : at::empty({}, f32);
  auto grad = compute_grad ? at::empty(pred.sizes(), pred.options()) : at::empty({0}, pred.options());
  return {loss, grad};
}

void masked_patch_mse_backward_meta(FASTMIM_MASKED_PATCH_MSE_BACKWARD_PARAMS) {
  check_same_device(grad_output, grad_pred, "csrc_masked_patch_mse_backward", "grad_output", "grad_pred");
}

}  // namespace
}  // namespace fastmim

TORCH_LIBRARY(fastmim, m) {
  // offset: row b is sample offset + b of the seed's stream (absent: 0). Keyword-only with a
  // default, so calls without it keep the shorter argument list.
  m.def(
      "csrc_random_permutation(Tensor seed, int batch, int num_patches, Device device, *, Tensor? offset=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "csrc_random_masking(Tensor seed, int batch, int num_patches, int num_keep, Device device, *, "
      "Tensor? offset=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "csrc_random_masking_varlen(Tensor seed, Tensor cu_seqlens, int batch, int num_patches, int total, "
      "Device device, *, Tensor? offset=None) -> (Tensor, Tensor, Tensor)");
  m.def("csrc_gather_visible(Tensor x, Tensor ids_keep, Tensor? pos_embed, Tensor? cls_token) -> Tensor");
  m.def(
      "csrc_gather_visible_backward(Tensor grad_out, Tensor ids_keep, int num_patches, bool has_cls, bool need_x, "
      "bool need_pos, bool need_cls) -> (Tensor, Tensor, Tensor)");
  m.def(
      "csrc_unshuffle(Tensor x_visible, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed, bool has_cls) "
      "-> Tensor");
  m.def(
      "csrc_unshuffle_backward(Tensor grad_out, Tensor ids_restore, int num_visible, bool has_cls, bool need_x, "
      "bool need_mask, bool need_pos) -> (Tensor, Tensor, Tensor)");
  m.def(
      "csrc_masked_patch_mse(Tensor pred, Tensor imgs, Tensor? mask, Tensor? ids_masked, int patch_size, "
      "bool norm_pix, float eps, str reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def("csrc_masked_patch_mse_backward(Tensor(a!) grad_pred, Tensor grad_output) -> ()");
  m.def(
      "csrc_resized_crop_flip_normalize(Tensor images, Tensor layout, Tensor boxes, Tensor? flip, int out_h, "
      "int out_w, Tensor mean, Tensor std, ScalarType dtype) -> Tensor");
  // The random ops write to `device` whatever the seed's device: one kernel for every backend.
  m.impl("csrc_random_permutation", c10::DispatchKey::CompositeExplicitAutograd,
         TORCH_FN(fastmim::random_permutation));
  m.impl("csrc_random_masking", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(fastmim::random_masking));
  m.impl("csrc_random_masking_varlen", c10::DispatchKey::CompositeExplicitAutograd,
         TORCH_FN(fastmim::random_masking_varlen));
}

// csrc_<op> -> fastmim::<op>_<backend> for every op of FASTMIM_DISPATCHED_OPS.
#define FASTMIM_IMPL_CPU(op, result, params) m.impl("csrc_" #op, TORCH_FN(fastmim::op##_cpu));
#define FASTMIM_IMPL_CUDA(op, result, params) m.impl("csrc_" #op, TORCH_FN(fastmim::op##_cuda));
#define FASTMIM_IMPL_META(op, result, params) m.impl("csrc_" #op, TORCH_FN(fastmim::op##_meta));

TORCH_LIBRARY_IMPL(fastmim, CPU, m) {
  FASTMIM_DISPATCHED_OPS(FASTMIM_IMPL_CPU)
  m.impl("csrc_resized_crop_flip_normalize", TORCH_FN(fastmim::resized_crop_flip_normalize_cpu));
}

#ifdef FASTMIM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastmim, CUDA, m) { FASTMIM_DISPATCHED_OPS(FASTMIM_IMPL_CUDA) }
#endif

TORCH_LIBRARY_IMPL(fastmim, Meta, m) { FASTMIM_DISPATCHED_OPS(FASTMIM_IMPL_META) }

// fastmim._C is an importable module so that `import fastmim._C` registers the ops above;
// WITH_CUDA tells the Python side whether the CUDA kernels were compiled in.
static PyModuleDef fastmim_c_module = {PyModuleDef_HEAD_INIT, "_C", "fastmim compiled ops (torch.ops.fastmim.csrc_*)",
                                       -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastmim_c_module);
  if (module == nullptr) return nullptr;
#ifdef FASTMIM_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
