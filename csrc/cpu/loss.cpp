// CPU kernel of masked_patch_mse: the MAE loss read straight from the image, with the
// semantics of masked_patch_mse_reference in fastmim/ops/loss.py.
//
// One task handles a run of rows of pred. For each row it gathers the target patch from imgs
// (index math instead of a patchified copy) into an fp32 buffer in the official patch layout
// (row, column, channel), normalises it (mean, unbiased variance, eps inside the sqrt), then in
// one pass over pred accumulates the squared error and writes the final gradient with respect
// to pred (2 (pred - target) / N times the row's weight and the reduction's scale: Liger-style,
// the backward op only rescales it by grad_output).
//
// The fp32 passes over a row use at::vec::Vectorized<float>: a sum runs in kLanes independent
// partials (a scalar float sum is one serial chain of adds, which -O3 must keep in order),
// added in a fixed order at the end, so it stays deterministic. A 16-bit pred row is
// converted to and from an fp32 buffer by plain loops: under the baseline ISA the extension
// is built for, ATen's vector conversions go element by element through memory and measured
// slower for bf16 (whose plain conversion loops the compiler vectorises), no faster for fp16.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../fastmim_ops.h"

namespace fastmim {
namespace {

using fVec = at::vec::Vectorized<float>;
// Elements per step of the vector loops: two fp32 vectors, so two partial sums in flight.
constexpr int64_t kLanes = 2 * fVec::size();

// Sum of the lanes of lo and hi, lane by lane in a fixed order.
inline float lane_sum(const fVec& lo, const fVec& hi) {
  __at_align__ float lanes[kLanes];
  lo.store(lanes);
  hi.store(lanes + fVec::size());
  float s = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) s += lanes[k];
  return s;
}

inline float row_sum(const float* x, int64_t n) {
  const int64_t n_vec = n - n % kLanes;
  fVec lo(0.0f), hi(0.0f);
  for (int64_t e = 0; e < n_vec; e += kLanes) {
    lo += fVec::loadu(x + e);
    hi += fVec::loadu(x + e + fVec::size());
  }
  float s = lane_sum(lo, hi);
  for (int64_t e = n_vec; e < n; ++e) s += x[e];
  return s;
}

// x = (x - mean) / sqrt(var(x) + eps), var unbiased; two passes (the variance of centred
// values: no cancellation).
inline void normalise_row(float* x, int64_t n, float inv_n, float inv_n1, float eps) {
  const int64_t n_vec = n - n % kLanes;
  const float mean = row_sum(x, n) * inv_n;
  const fVec vmean(mean);
  fVec lo(0.0f), hi(0.0f);
  for (int64_t e = 0; e < n_vec; e += kLanes) {
    const fVec c_lo = fVec::loadu(x + e) - vmean, c_hi = fVec::loadu(x + e + fVec::size()) - vmean;
    lo += c_lo * c_lo;
    hi += c_hi * c_hi;
  }
  float sq = lane_sum(lo, hi);
  for (int64_t e = n_vec; e < n; ++e) {
    const float c = x[e] - mean;
    sq += c * c;
  }
  const float rstd = 1.0f / std::sqrt(sq * inv_n1 + eps);
  const fVec vrstd(rstd);
  for (int64_t e = 0; e < n_vec; e += kLanes) {
    ((fVec::loadu(x + e) - vmean) * vrstd).store(x + e);
    ((fVec::loadu(x + e + fVec::size()) - vmean) * vrstd).store(x + e + fVec::size());
  }
  for (int64_t e = n_vec; e < n; ++e) x[e] = (x[e] - mean) * rstd;
}

// Returns sum((p - t)^2); with g, also writes g = (p - t) * coef (g may be p).
inline float squared_error_row(const float* p, const float* t, float* g, float coef, int64_t n) {
  const int64_t n_vec = n - n % kLanes;
  const fVec vcoef(coef);
  fVec lo(0.0f), hi(0.0f);
  for (int64_t e = 0; e < n_vec; e += kLanes) {
    const fVec d_lo = fVec::loadu(p + e) - fVec::loadu(t + e);
    const fVec d_hi = fVec::loadu(p + e + fVec::size()) - fVec::loadu(t + e + fVec::size());
    lo += d_lo * d_lo;
    hi += d_hi * d_hi;
    if (g != nullptr) {
      (d_lo * vcoef).store(g + e);
      (d_hi * vcoef).store(g + e + fVec::size());
    }
  }
  float acc = lane_sum(lo, hi);
  for (int64_t e = n_vec; e < n; ++e) {
    const float d = p[e] - t[e];
    acc += d * d;
    if (g != nullptr) g[e] = d * coef;
  }
  return acc;
}

// Flat patch index q = b * L + l of each row of pred (identity for the full layout). The id is
// range-checked here, on the host where reading it is free, before it indexes anything: an
// out-of-range id raises (the Python op has already rejected it with a ValueError).
template <typename index_t>
inline int64_t row_patch(const index_t* ids, int64_t r, int64_t rows_per_sample, const PatchGeometry& g, int layout,
                         const char* op) {
  if (layout == 0) return r;
  const int64_t v = static_cast<int64_t>(ids[r]);
  if (layout == 1) {
    TORCH_CHECK(v >= 0 && v < g.L, op, ": ids_masked[", r / rows_per_sample, ", ", r % rows_per_sample, "] = ", v,
                " is out of range [0, ", g.L, ")");
    return (r / rows_per_sample) * g.L + v;
  }
  TORCH_CHECK(v >= 0 && v < g.B * g.L, op, ": ids_masked[", r, "] = ", v, " is out of range [0, B * L = ",
              g.B * g.L, ")");
  return v;
}

template <typename pred_t, typename img_t, typename index_t>
void patch_mse_rows(const pred_t* pred, const img_t* imgs, const float* weight, const index_t* ids, int layout,
                    int64_t rows, int64_t rows_per_sample, const PatchGeometry& g, bool norm_pix, float eps, float scale,
                    float* row_loss, pred_t* grad, const char* op) {
  const float inv_n = 1.0f / static_cast<float>(g.N);
  const float inv_n1 = 1.0f / static_cast<float>(g.N - 1);  // inf when N == 1: var = nan, as torch.var
  const float two_over_n = 2.0f / static_cast<float>(g.N);
  constexpr bool pred_is_float = std::is_same_v<pred_t, float>;
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> target(g.N);
    std::vector<float> pred_f32(pred_is_float ? 0 : g.N);  // the row of pred, then its gradient
    float* t = target.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t q = row_patch(ids, r, rows_per_sample, g, layout, op);
      const float w = weight != nullptr ? weight[q] : 1.0f;
      pred_t* grow = grad != nullptr ? grad + r * g.N : nullptr;
      if (w == 0.0f) {  // a zero-weight row contributes nothing: skip reading pred and imgs
        row_loss[r] = 0.0f;
        if (grow != nullptr) std::fill(grow, grow + g.N, static_cast<pred_t>(0));
        continue;
      }
      const int64_t b = q / g.L, l = q % g.L;
      const int64_t hp = l / g.Wp, wp = l % g.Wp;
      // target[(i * p + j) * C + c] = imgs[b, c, hp * p + i, wp * p + j]
      for (int64_t c = 0; c < g.C; ++c) {
        const img_t* plane = imgs + ((b * g.C + c) * g.H + hp * g.p) * g.W + wp * g.p;
        for (int64_t i = 0; i < g.p; ++i) {
          const img_t* src = plane + i * g.W;
          float* dst = t + i * g.p * g.C + c;
          for (int64_t j = 0; j < g.p; ++j) dst[j * g.C] = static_cast<float>(src[j]);
        }
      }
      if (norm_pix) normalise_row(t, g.N, inv_n, inv_n1, eps);
      const pred_t* prow = pred + r * g.N;
      const float coef = w * scale * two_over_n;
      float acc;
      if constexpr (pred_is_float) {
        acc = squared_error_row(prow, t, grow, coef, g.N);
      } else {
        float* p32 = pred_f32.data();
        for (int64_t e = 0; e < g.N; ++e) p32[e] = static_cast<float>(prow[e]);
        acc = squared_error_row(p32, t, grow != nullptr ? p32 : nullptr, coef, g.N);
        if (grow != nullptr) {
          for (int64_t e = 0; e < g.N; ++e) grow[e] = static_cast<pred_t>(p32[e]);
        }
      }
      row_loss[r] = acc * inv_n * w;
    }
  });
}

}  // namespace

TensorPair masked_patch_mse_cpu(FASTMIM_MASKED_PATCH_MSE_PARAMS) {
  const char* op = "csrc_masked_patch_mse";
  const PatchMseSetup s =
      setup_masked_patch_mse(pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, reduction, compute_grad);
  const std::string& red = s.reduction;
  const PatchGeometry& g = s.g;
  const int layout = s.layout;
  const int64_t rows = s.rows, rows_per_sample = s.rows_per_sample;
  const float* wp = s.weight.defined() ? s.weight.const_data_ptr<float>() : nullptr;
  // The scale of the masked mean needs the weights of the rows before the main pass (the
  // gradient is written final): a cheap pre-pass over B * L floats.
  float scale = 1.0f;
  if (red == "mean") {
    double wsum = 0.0;
    if (wp == nullptr) {
      wsum = static_cast<double>(rows);
    } else if (layout == 0) {
      for (int64_t r = 0; r < rows; ++r) wsum += wp[r];
    } else {
      AT_DISPATCH_INDEX_TYPES(ids_masked->scalar_type(), "fastmim_csrc", [&] {
        const index_t* ip = ids_masked->const_data_ptr<index_t>();
        for (int64_t r = 0; r < rows; ++r) wsum += wp[row_patch(ip, r, rows_per_sample, g, layout, op)];
      });
    }
    scale = wsum != 0.0 ? 1.0f / static_cast<float>(wsum) : 0.0f;  // all-zero mask: loss 0, gradient 0
  }
  const at::Tensor& row_loss = s.row_loss;
  const at::Tensor& grad = s.grad;
  dispatch_patch_mse(pred, imgs, ids_masked, [&](auto pred_tag, auto img_tag, auto index_tag) {
    using pred_t = typename decltype(pred_tag)::type;
    using img_t = typename decltype(img_tag)::type;
    using index_t = typename decltype(index_tag)::type;
    const index_t* ip = ids_masked.has_value() ? ids_masked->const_data_ptr<index_t>() : nullptr;
    patch_mse_rows<pred_t, img_t, index_t>(pred.const_data_ptr<pred_t>(), imgs.const_data_ptr<img_t>(), wp, ip, layout,
                                           rows, rows_per_sample, g, norm_pix, static_cast<float>(eps), scale,
                                           row_loss.data_ptr<float>(), compute_grad ? grad.data_ptr<pred_t>() : nullptr,
                                           op);
  });
  if (red == "none") return {row_loss, grad};
  // Summed in a fixed order in double: deterministic for any thread count.
  const float* lp = row_loss.const_data_ptr<float>();
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) total += lp[r];
  const double loss = red == "mean" ? total * scale : total;
  return {at::scalar_tensor(loss, row_loss.options()), grad};
}

void masked_patch_mse_backward_cpu(FASTMIM_MASKED_PATCH_MSE_BACKWARD_PARAMS) {
  const at::Tensor go = setup_masked_patch_mse_backward(grad_pred, grad_output);
  const int64_t N = grad_pred.size(-1), rows = grad_pred.numel() / N;
  const bool per_row = go.dim() > 0;
  FASTMIM_DISPATCH_FLOAT(grad_pred.scalar_type(), "fastmim_csrc", [&] {
    scalar_t* gp = grad_pred.data_ptr<scalar_t>();
    const float* gop = go.const_data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float s = per_row ? gop[r] : gop[0];
        scalar_t* row = gp + r * N;
        for (int64_t e = 0; e < N; ++e) row[e] = static_cast<scalar_t>(static_cast<float>(row[e]) * s);
      }
    });
  });
}

}  // namespace fastmim
