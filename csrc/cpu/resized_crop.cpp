// CPU kernel of resized_crop_flip_normalize: crop, antialiased bicubic resize, horizontal flip and
// normalisation of uint8 images, with the semantics of resized_crop_flip_normalize_reference in
// fastmim/ops/resized_crop.py (PyTorch's / Pillow's antialiased bicubic: Keys' cubic, a = -0.5,
// support 2 * max(scale, 1), weights normalised per output pixel; horizontal pass first, each
// pass clamped to [0, 255]).
//
// One task per image (at::parallel_for over the batch). For each image the filter taps and
// weights of both axes are computed once (the flip folded into the horizontal ones); each crop
// row is converted to fp32 once, a pixel's channels in the lanes of a 4-float vector (images of
// up to 4 channels), and resampled horizontally into a planar fp32 buffer (C, crop_h, out_w),
// one vector multiply-add per tap; the vertical pass then accumulates whole rows of that buffer
// (contiguous, vectorised by the compiler), clamps, normalises and writes the output dtype.
// Deterministic: the sums run in a fixed order and no two tasks write the same output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../fastmim_ops.h"

namespace fastmim {
namespace {

inline float cubic_weight(float x) {
  x = std::fabs(x);
  if (x < 1.0f) return (1.5f * x - 2.5f) * x * x + 1.0f;
  if (x < 2.0f) return ((-0.5f * x + 2.5f) * x - 4.0f) * x + 2.0f;
  return 0.0f;
}

// Taps of every output index along one axis: output i reads input first[i] .. first[i] + count[i] - 1
// with weights w[i * max_taps + j], normalised to sum 1.
struct Taps {
  std::vector<int64_t> first, count;
  std::vector<float> w;
  int64_t max_taps = 0;
};

Taps axis_taps(int64_t crop, int64_t out, bool reverse) {
  const float scale = static_cast<float>(crop) / static_cast<float>(out);
  const float support = scale >= 1.0f ? 2.0f * scale : 2.0f;
  const float inv = scale >= 1.0f ? 1.0f / scale : 1.0f;
  Taps t;
  t.max_taps = static_cast<int64_t>(2.0f * support) + 2;
  t.first.resize(out);
  t.count.resize(out);
  t.w.assign(out * t.max_taps, 0.0f);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t i = reverse ? out - 1 - o : o;
    const float center = scale * (static_cast<float>(i) + 0.5f);
    const int64_t lo = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5f), 0);
    const int64_t hi = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5f), crop);
    const int64_t n = std::min<int64_t>(hi - lo, t.max_taps);
    float* w = t.w.data() + o * t.max_taps;
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      w[j] = cubic_weight((static_cast<float>(lo + j) - center + 0.5f) * inv);
      total += w[j];
    }
    const float norm = total != 0.0f ? 1.0f / total : 0.0f;
    for (int64_t j = 0; j < n; ++j) w[j] *= norm;
    t.first[o] = lo;
    t.count[o] = n;
  }
  return t;
}

struct ImageJob {
  const uint8_t* pixels;  // the image's first pixel
  int64_t sc, sh, sw;     // element strides of channel, row, column
  int64_t top, left, crop_h, crop_w;
  bool flip;
};

// Four fp32 lanes (SSE on x86-64, NEON on Arm: GCC/Clang vector extensions, no ISA flags needed).
typedef float f4 __attribute__((vector_size(16)));

// Horizontal pass of one crop row for images of up to 4 channels: pixel k's channels are the lanes
// of row[k] (unused lanes 0), so each tap is one vector multiply-add; two partial sums (even and
// odd taps) keep two add chains in flight. Writes the clamped result to tmp[c * plane + x].
inline void resample_row_lanes(const f4* row, int64_t C, const Taps& tx, int64_t out_w, float* tmp, int64_t plane) {
  const f4 lo = {0.0f, 0.0f, 0.0f, 0.0f}, hi = {255.0f, 255.0f, 255.0f, 255.0f};
  for (int64_t x = 0; x < out_w; ++x) {
    const float* w = tx.w.data() + x * tx.max_taps;
    const f4* p = row + tx.first[x];
    const int64_t n = tx.count[x];
    f4 even = lo, odd = lo;
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
      even += w[j] * p[j];
      odd += w[j + 1] * p[j + 1];
    }
    if (j < n) even += w[j] * p[j];
    f4 acc = even + odd;
    acc = acc < lo ? lo : acc;
    acc = acc > hi ? hi : acc;
    for (int64_t c = 0; c < C; ++c) tmp[c * plane + x] = acc[c];
  }
}

// The same for any number of channels (pixel k, channel c at row[k * C + c]), scalar.
inline void resample_row_scalar(const float* row, int64_t C, const Taps& tx, int64_t out_w, float* tmp,
                                int64_t plane) {
  for (int64_t x = 0; x < out_w; ++x) {
    const float* w = tx.w.data() + x * tx.max_taps;
    const int64_t n = tx.count[x];
    for (int64_t c = 0; c < C; ++c) {
      const float* p = row + tx.first[x] * C + c;
      float acc = 0.0f;
      for (int64_t j = 0; j < n; ++j) acc += w[j] * p[j * C];
      tmp[c * plane + x] = std::min(std::max(acc, 0.0f), 255.0f);
    }
  }
}

template <typename scalar_t>
void resize_one(const ImageJob& job, int64_t C, int64_t out_h, int64_t out_w, const float* mean,
                const float* inv_std, scalar_t* out) {
  const Taps tx = axis_taps(job.crop_w, out_w, job.flip);
  const Taps ty = axis_taps(job.crop_h, out_h, false);
  const int64_t plane = job.crop_h * out_w;
  std::vector<float> tmp(C * plane);
  const bool lanes = C <= 4;
  std::vector<f4> row4(lanes ? job.crop_w : 0, f4{0.0f, 0.0f, 0.0f, 0.0f});
  std::vector<float> row(lanes ? 0 : job.crop_w * C);
  for (int64_t r = 0; r < job.crop_h; ++r) {
    const uint8_t* src = job.pixels + (job.top + r) * job.sh + job.left * job.sw;
    float* dst = tmp.data() + r * out_w;
    if (lanes) {
      if (C == 3 && job.sc == 1 && job.sw == 3) {  // the loader's HWC rows
        for (int64_t k = 0; k < job.crop_w; ++k) {
          row4[k] = f4{static_cast<float>(src[3 * k]), static_cast<float>(src[3 * k + 1]),
                       static_cast<float>(src[3 * k + 2]), 0.0f};
        }
      } else {
        for (int64_t k = 0; k < job.crop_w; ++k)
          for (int64_t c = 0; c < C; ++c) row4[k][c] = static_cast<float>(src[k * job.sw + c * job.sc]);
      }
      resample_row_lanes(row4.data(), C, tx, out_w, dst, plane);
    } else {
      for (int64_t k = 0; k < job.crop_w; ++k)
        for (int64_t c = 0; c < C; ++c) row[k * C + c] = static_cast<float>(src[k * job.sw + c * job.sc]);
      resample_row_scalar(row.data(), C, tx, out_w, dst, plane);
    }
  }
  std::vector<float> acc(out_w);
  for (int64_t c = 0; c < C; ++c) {
    const float* src = tmp.data() + c * plane;
    const float scale = inv_std[c] / 255.0f;
    const float shift = mean[c] * inv_std[c];
    for (int64_t y = 0; y < out_h; ++y) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const float* w = ty.w.data() + y * ty.max_taps;
      for (int64_t i = 0; i < ty.count[y]; ++i) {
        const float wi = w[i];
        const float* in = src + (ty.first[y] + i) * out_w;
        for (int64_t x = 0; x < out_w; ++x) acc[x] += wi * in[x];
      }
      scalar_t* o = out + (c * out_h + y) * out_w;
      for (int64_t x = 0; x < out_w; ++x) {
        const float v = std::min(std::max(acc[x], 0.0f), 255.0f);
        o[x] = static_cast<scalar_t>(v * scale - shift);
      }
    }
  }
}

}  // namespace

at::Tensor resized_crop_flip_normalize_cpu(const at::Tensor& images, const at::Tensor& layout,
                                           const at::Tensor& boxes, const std::optional<at::Tensor>& flip,
                                           int64_t out_h, int64_t out_w, const at::Tensor& mean,
                                           const at::Tensor& std, at::ScalarType dtype) {
  const char* op = "csrc_resized_crop_flip_normalize";
  TORCH_CHECK(images.scalar_type() == at::kByte, op, ": images must be uint8, got ", images.scalar_type());
  TORCH_CHECK(layout.scalar_type() == at::kLong && layout.dim() == 2 && layout.size(1) == 6 && layout.is_contiguous(),
              op, ": layout must be a contiguous int64 (B, 6) tensor, got ", layout.scalar_type(), " ",
              layout.sizes());
  const int64_t B = layout.size(0);
  TORCH_CHECK(boxes.scalar_type() == at::kInt || boxes.scalar_type() == at::kLong, op,
              ": boxes must be int32 or int64, got ", boxes.scalar_type());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == B && boxes.size(1) == 4, op, ": boxes must have shape (", B,
              ", 4), got ", boxes.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat && std.scalar_type() == at::kFloat && mean.dim() == 1 &&
                  std.sizes() == mean.sizes(),
              op, ": mean and std must be float32 (C,) tensors, got ", mean.sizes(), " and ", std.sizes());
  TORCH_CHECK(out_h >= 1 && out_w >= 1, op, ": the output size must be >= 1, got ", out_h, "x", out_w);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16, got ", dtype);
  if (flip.has_value()) {
    TORCH_CHECK(flip->scalar_type() == at::kBool && flip->dim() == 1 && flip->size(0) == B, op,
                ": flip must be a bool (", B, ",) tensor, got ", flip->scalar_type(), " ", flip->sizes());
  }
  for (const at::Tensor* t : {&layout, &boxes, &mean, &std}) {
    TORCH_CHECK(t->device() == images.device(), op, ": every argument must be on ", images.device());
  }
  const int64_t C = mean.size(0);
  TORCH_CHECK(C >= 1 && C <= 16, op, ": 1 to 16 channels are supported, got ", C);
  // Elements addressable from the images' first one with their strides.
  int64_t extent = images.numel() > 0 ? 1 : 0;
  if (images.numel() > 0) {
    for (int64_t d = 0; d < images.dim(); ++d) {
      TORCH_CHECK(images.stride(d) >= 0, op, ": images with negative strides are not supported");
      extent += (images.size(d) - 1) * images.stride(d);
    }
  }
  const at::Tensor boxes64 = boxes.to(at::kLong).contiguous();
  const at::Tensor flips = flip.has_value() ? flip->contiguous() : at::Tensor();
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor inv_std = std.reciprocal().contiguous();
  auto out = at::empty({B, C, out_h, out_w}, images.options().dtype(dtype));
  if (B == 0) return out;

  // Every value is on the host: check each image and box (the CPU path raises, it never clamps).
  std::vector<ImageJob> jobs(B);
  const int64_t* lay = layout.data_ptr<int64_t>();
  const int64_t* bx = boxes64.data_ptr<int64_t>();
  const bool* fl = flips.defined() ? flips.data_ptr<bool>() : nullptr;
  const uint8_t* base = images.data_ptr<uint8_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* l = lay + 6 * b;
    const int64_t offset = l[0], H = l[1], W = l[2], sc = l[3], sh = l[4], sw = l[5];
    TORCH_CHECK(H >= 1 && W >= 1 && offset >= 0 && sc >= 0 && sh >= 0 && sw >= 0 &&
                    offset + (C - 1) * sc + (H - 1) * sh + (W - 1) * sw < extent,
                op, ": layout[", b, "] = (", offset, ", ", H, ", ", W, ", ", sc, ", ", sh, ", ", sw,
                ") does not describe an image inside the buffer of ", extent, " elements");
    const int64_t top = bx[4 * b], left = bx[4 * b + 1], ch = bx[4 * b + 2], cw = bx[4 * b + 3];
    TORCH_CHECK(top >= 0 && left >= 0 && ch >= 1 && cw >= 1 && top + ch <= H && left + cw <= W, op, ": boxes[", b,
                "] = (top ", top, ", left ", left, ", height ", ch, ", width ", cw, ") is not inside image ", b,
                " of ", H, "x", W, " pixels");
    jobs[b] = {base + offset, sc, sh, sw, top, left, ch, cw, fl != nullptr && fl[b]};
  }
  const float* mean_p = mean_c.data_ptr<float>();
  const float* inv_std_p = inv_std.data_ptr<float>();
  FASTMIM_DISPATCH_FLOAT(dtype, "csrc_resized_crop_flip_normalize", [&] {
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        resize_one<scalar_t>(jobs[b], C, out_h, out_w, mean_p, inv_std_p, out_p + b * C * out_h * out_w);
      }
    });
  });
  return out;
}

}  // namespace fastmim
