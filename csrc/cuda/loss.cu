// CUDA kernel of masked_patch_mse, same results as the CPU kernel and masked_patch_mse_reference
// (fastmim/ops/loss.py).
//
// One warp per row of pred (one patch). The warp gathers its target patch from imgs in image
// order (consecutive lanes read consecutive pixels of a patch row: coalesced) into shared
// memory in the official patch layout (row, column, channel), reduces mean and unbiased
// variance with warp shuffles (two passes over shared memory, no cancellation), then streams
// pred once: squared error for the loss and the final gradient (2 (pred - target) / N times
// the row weight and the reduction's scale), written in the same pass. Each block writes one
// partial loss sum; a one-block kernel adds the partials in a fixed order (deterministic, no
// float atomics). The backward op scales the saved gradient by grad_output in place.
#include "../fastmim_ops.h"
#include "common.cuh"

namespace fastmim {
namespace {

using cuda::ceil_div;
using cuda::warp_sum;

constexpr int kMaxSmemBytes = 48 * 1024;

template <typename index_t>
__device__ __forceinline__ int64_t row_patch(const index_t* ids, int64_t r, int64_t rows_per_sample,
                                             const PatchGeometry& g, int layout, bool* ok) {
  if (layout == 0) return r;
  const int64_t v = static_cast<int64_t>(ids[r]);
  const int64_t limit = layout == 1 ? g.L : g.B * g.L;
  if (v < 0 || v >= limit) {
    *ok = false;
    return 0;
  }
  return layout == 1 ? (r / rows_per_sample) * g.L + v : v;
}

template <typename pred_t, typename img_t, typename index_t>
__global__ void patch_mse_kernel(const pred_t* __restrict__ pred, const img_t* __restrict__ imgs,
                                 const float* __restrict__ weight, const index_t* __restrict__ ids, int layout,
                                 int64_t rows, int64_t rows_per_sample, PatchGeometry g, bool norm_pix, float eps,
                                 const float* __restrict__ scale_ptr, float* __restrict__ row_loss,
                                 pred_t* __restrict__ grad, float* __restrict__ block_partial) {
  extern __shared__ float smem[];
  __shared__ float warp_loss[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  float* target = smem + static_cast<int64_t>(warp) * g.N;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * warps + warp;
  float loss = 0.0f;
  if (r < rows) {
    // ids_masked is not checked on the device (the Python op checks it only on request, a
    // sync): an out-of-range id reads no patch and its row weighs 0 (loss 0, gradient 0).
    bool ok = true;
    const int64_t q = row_patch(ids, r, rows_per_sample, g, layout, &ok);
    const float w = !ok ? 0.0f : (weight != nullptr ? weight[q] : 1.0f);
    pred_t* grow = grad != nullptr ? grad + r * g.N : nullptr;
    if (w == 0.0f) {  // contributes nothing: skip reading pred and imgs
      if (grow != nullptr) {
        for (int64_t e = lane; e < g.N; e += 32) grow[e] = static_cast<pred_t>(0.0f);
      }
    } else {
      const int64_t b = q / g.L, l = q % g.L;
      const int64_t hp = l / g.Wp, wp = l % g.Wp;
      const int64_t pp = g.p * g.p;
      for (int64_t t = lane; t < g.N; t += 32) {  // image order: j fastest, then i, then c
        const int64_t j = t % g.p, i = (t / g.p) % g.p, c = t / pp;
        const float v = static_cast<float>(imgs[((b * g.C + c) * g.H + hp * g.p + i) * g.W + wp * g.p + j]);
        target[(i * g.p + j) * g.C + c] = v;
      }
      __syncwarp();
      float mean = 0.0f, rstd = 1.0f;
      if (norm_pix) {
        float s = 0.0f;
        for (int64_t e = lane; e < g.N; e += 32) s += target[e];
        mean = warp_sum(s) / static_cast<float>(g.N);
        float sq = 0.0f;
        for (int64_t e = lane; e < g.N; e += 32) {
          const float d = target[e] - mean;
          sq += d * d;
        }
        rstd = 1.0f / sqrtf(warp_sum(sq) / static_cast<float>(g.N - 1) + eps);  // N == 1: nan, as torch.var
      }
      const float scale = scale_ptr != nullptr ? *scale_ptr : 1.0f;
      const float coef = w * scale * (2.0f / static_cast<float>(g.N));
      const pred_t* prow = pred + r * g.N;
      float acc = 0.0f;
      for (int64_t e = lane; e < g.N; e += 32) {
        const float d = static_cast<float>(prow[e]) - (target[e] - mean) * rstd;
        acc += d * d;
        if (grow != nullptr) grow[e] = static_cast<pred_t>(d * coef);
      }
      loss = warp_sum(acc) / static_cast<float>(g.N) * w;
      __syncwarp();
    }
    if (lane == 0 && row_loss != nullptr) row_loss[r] = loss;
  }
  if (block_partial != nullptr) {
    if (lane == 0) warp_loss[warp] = loss;
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.0f;
      for (int k = 0; k < warps; ++k) s += warp_loss[k];
      block_partial[blockIdx.x] = s;
    }
  }
}

// loss = scale * sum(partials), summed by one block in a fixed order.
__global__ void finish_loss_kernel(const float* __restrict__ partials, int64_t count,
                                   const float* __restrict__ scale_ptr, float* __restrict__ loss) {
  __shared__ float warp_sums[32];
  float s = 0.0f;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) s += partials[k];
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.0f;
    s = warp_sum(s);
    if (threadIdx.x == 0) *loss = scale_ptr != nullptr ? s * *scale_ptr : s;
  }
}

template <typename scalar_t>
__global__ void scale_grad_kernel(scalar_t* __restrict__ grad, const float* __restrict__ factor, bool per_row,
                                  int64_t n, int64_t row_len) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float f = per_row ? factor[i / row_len] : factor[0];
    grad[i] = static_cast<scalar_t>(static_cast<float>(grad[i]) * f);
  }
}

}  // namespace

TensorPair masked_patch_mse_cuda(FASTMIM_MASKED_PATCH_MSE_PARAMS) {
  const char* op = "csrc_masked_patch_mse";
  check_cuda(pred, op, "pred");
  const c10::cuda::CUDAGuard guard(pred.device());
  const PatchMseSetup s =
      setup_masked_patch_mse(pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, reduction, compute_grad);
  const std::string& red = s.reduction;
  const PatchGeometry& g = s.g;
  TORCH_CHECK(g.N * static_cast<int64_t>(sizeof(float)) <= kMaxSmemBytes, op, ": patches of ", g.N,
              " values (p*p*C) exceed the kernel's shared-memory budget of ", kMaxSmemBytes / 4, " values");
  const int layout = s.layout;
  const int64_t rows = s.rows, rows_per_sample = s.rows_per_sample;
  const at::Tensor& weight = s.weight;
  const at::Tensor& row_loss = s.row_loss;
  const at::Tensor& grad = s.grad;
  auto f32 = row_loss.options();
  // The masked mean's scale 1 / sum(weights of the rows) (0 when that sum is 0), computed on
  // the device before the main pass, which writes the final gradient: no host sync.
  at::Tensor scale;
  if (red == "mean") {
    at::Tensor wsum;
    if (!weight.defined()) {
      wsum = at::full({}, static_cast<double>(rows), f32);
    } else if (layout == 0) {
      wsum = weight.sum();
    } else {
      // The rows' weights as the kernel sees them: an out-of-range id weighs 0 and is not used
      // to index (index_select would assert on the device).
      at::Tensor ids = ids_masked->to(at::kLong);
      const at::Tensor in_range = (ids >= 0) & (ids < (layout == 1 ? g.L : g.B * g.L));
      at::Tensor flat = at::where(in_range, ids, 0);
      if (layout == 1) flat = flat + at::arange(g.B, flat.options()).unsqueeze(1) * g.L;
      wsum = at::where(in_range.view(-1), weight.view(-1).index_select(0, flat.view(-1)), 0).sum();
    }
    scale = at::where(wsum != 0, wsum.reciprocal(), at::zeros_like(wsum));
  }
  if (rows == 0) {
    return {red == "none" ? row_loss : at::zeros({}, f32), grad};
  }
  const int warps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4, kMaxSmemBytes / (g.N * 4))));
  const int64_t blocks = ceil_div(rows, warps);
  at::Tensor partials = red == "none" ? at::Tensor() : at::empty({blocks}, f32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_patch_mse(pred, imgs, ids_masked, [&](auto pred_tag, auto img_tag, auto index_tag) {
    using pred_t = typename decltype(pred_tag)::type;
    using img_t = typename decltype(img_tag)::type;
    using index_t = typename decltype(index_tag)::type;
    patch_mse_kernel<pred_t, img_t, index_t><<<blocks, 32 * warps, warps * g.N * sizeof(float), stream>>>(
        pred.const_data_ptr<pred_t>(), imgs.const_data_ptr<img_t>(),
        weight.defined() ? weight.const_data_ptr<float>() : nullptr,
        ids_masked.has_value() ? ids_masked->const_data_ptr<index_t>() : nullptr, layout, rows, rows_per_sample, g,
        norm_pix, static_cast<float>(eps), scale.defined() ? scale.const_data_ptr<float>() : nullptr,
        red == "none" ? row_loss.data_ptr<float>() : nullptr, compute_grad ? grad.data_ptr<pred_t>() : nullptr,
        partials.defined() ? partials.data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (red == "none") return {row_loss, grad};
  auto loss = at::empty({}, f32);
  finish_loss_kernel<<<1, 1024, 0, stream>>>(partials.const_data_ptr<float>(), blocks,
                                             scale.defined() ? scale.const_data_ptr<float>() : nullptr,
                                             loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

void masked_patch_mse_backward_cuda(FASTMIM_MASKED_PATCH_MSE_BACKWARD_PARAMS) {
  const at::Tensor factor = setup_masked_patch_mse_backward(grad_pred, grad_output);
  const c10::cuda::CUDAGuard guard(grad_pred.device());
  const int64_t N = grad_pred.size(-1);
  const bool per_row = factor.dim() > 0;
  const int64_t n = grad_pred.numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, threads), 65535);
  FASTMIM_DISPATCH_FLOAT(grad_pred.scalar_type(), "fastmim_csrc_cuda", [&] {
    scale_grad_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_pred.data_ptr<scalar_t>(), factor.const_data_ptr<float>(), per_row, n, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastmim
