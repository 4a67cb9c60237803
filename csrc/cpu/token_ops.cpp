// CPU kernels of the token ops: random_permutation / random_masking (dense and varlen),
// gather_visible and unshuffle (forward and backward), with the semantics of the references in
// fastmim/ops/token_ops.py (dense layout; the packed varlen gather/unshuffle stay in Python).
//
// A row of D features is the unit of work: at::parallel_for splits rows (or samples) across
// threads and the inner loops over D are contiguous loops the compiler vectorises. Sums over
// the batch accumulate in fp32 in a fixed order (deterministic for a given thread count).
// The row loops stay plain loops rather than at::vec::Vectorized: under the baseline ISA the
// extension is built for, Vectorized measured no faster for fp32 (the compiler emits the same
// vector code), 1.5-5x slower for bf16 (its conversions go element by element through memory,
// where the plain loops' conversions are vectorised) and mixed for fp16 (neither vectorises).
//
// Scatter-type backward passes (a row of the gradient receives the rows gathered from it) are
// computed as gathers through an inverse index table (first source, count): each output row is
// written once by one thread, no atomics, and a repeated index is summed as the references'
// scatter-add does.
//
// Index values are read on the host here, so every one is checked (a RuntimeError naming it)
// before the access it steers. An empty batch (B = 0) gives empty results.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "../fastmim_ops.h"

namespace fastmim {
namespace {

constexpr int64_t kRowGrain = 16;  // rows per parallel_for task (a row is D >= ~64 elements)

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<in_t>, Tag<out_t>) for in_t = `in` and out_t = `out`, where out is in or float32.
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

template <typename out_t, typename a_t, typename b_t>
inline void add_rows(out_t* __restrict__ out, const a_t* __restrict__ a, const b_t* __restrict__ b, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<out_t>(static_cast<float>(a[d]) + static_cast<float>(b[d]));
}

template <typename out_t, typename in_t>
inline void convert_row(out_t* __restrict__ out, const in_t* __restrict__ src, int64_t n) {
  if constexpr (std::is_same_v<out_t, in_t>) {
    std::memcpy(out, src, n * sizeof(out_t));
  } else {
    for (int64_t d = 0; d < n; ++d) out[d] = static_cast<out_t>(static_cast<float>(src[d]));
  }
}

template <typename scalar_t>
inline void accumulate_row(float* __restrict__ acc, const scalar_t* __restrict__ src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += static_cast<float>(src[d]);
}

template <typename scalar_t>
inline void store_row(scalar_t* __restrict__ out, const float* __restrict__ src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<scalar_t>(src[d]);
}

// Inverse of idx (B, N) whose values must lie in [0, limit); values in [m, limit) are ignored:
// first[b, v] = smallest n with idx[b, n] == v, count[b, v] = how many such n (v < m).
template <typename index_t>
void build_inverse(const index_t* idx, int64_t batch, int64_t n, int64_t m, int64_t limit, int32_t* first,
                   int32_t* count, const char* op, const char* name) {
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* f = first + b * m;
      int32_t* c = count + b * m;
      std::fill(c, c + m, 0);
      const index_t* row = idx + b * n;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(row[i]);
        TORCH_CHECK(v >= 0 && v < limit, op, ": ", name, "[", b, ", ", i, "] = ", v, " is out of range [0, ", limit,
                    ")");
        if (v < m && c[v]++ == 0) f[v] = static_cast<int32_t>(i);
      }
    }
  });
}

// dst = the sum (fp32) of the rows i of src with idx_row[i] == target; `first`/`count` from
// build_inverse. Returns dst.
template <typename scalar_t, typename index_t>
inline scalar_t* gather_inverse_row(scalar_t* dst, const scalar_t* src, int64_t dim, const index_t* idx_row,
                                    int64_t n, int64_t target, int32_t first, int32_t count, float* scratch) {
  if (count == 0) {
    std::fill(dst, dst + dim, static_cast<scalar_t>(0));
  } else if (count == 1) {
    std::memcpy(dst, src + first * dim, dim * sizeof(scalar_t));
  } else {
    std::fill(scratch, scratch + dim, 0.0f);
    for (int64_t i = first; i < n; ++i) {
      if (static_cast<int64_t>(idx_row[i]) == target) accumulate_row(scratch, src + i * dim, dim);
    }
    store_row(dst, scratch, dim);
  }
  return dst;
}

void check_tokens(const at::Tensor& x, const at::Tensor& ids, const char* op, const char* x_name,
                  const char* ids_name) {
  check_float_tensor(x, op, x_name);
  TORCH_CHECK(x.dim() == 3, op, ": ", x_name, " must be 3-D (B, N, D), got shape ", x.sizes());
  check_same_device(x, ids, op, x_name, ids_name);
  check_index_tensor(ids, op, ids_name, x.size(0), -1);
}

// Calls emit(b, ids_shuffle_row) for every row b (sample offset + b); the row is the stable
// argsort of the noise.
void permutation_rows(uint64_t seed, uint64_t offset, int64_t batch, int64_t num_patches,
                      const std::function<void(int64_t, const int64_t*)>& emit) {
  const uint32_t key = seed_key(seed);
  at::parallel_for(0, batch, 4, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> keys(num_patches);
    std::vector<int64_t> shuffle(num_patches);
    for (int64_t b = b0; b < b1; ++b) {
      const uint32_t rkey = row_key(key, offset + static_cast<uint64_t>(b));
      for (int64_t i = 0; i < num_patches; ++i) {
        keys[i] = sort_key(patch_noise(rkey, static_cast<uint32_t>(i)), static_cast<uint32_t>(i));
      }
      std::sort(keys.begin(), keys.end());  // distinct keys: their sort is the stable argsort
      for (int64_t r = 0; r < num_patches; ++r) shuffle[r] = static_cast<int64_t>(keys[r] & 0x7FFFFFFFu);
      emit(b, shuffle.data());
    }
  });
}

}  // namespace

// ---------------------------------------------------------------- random permutation / masking

std::tuple<at::Tensor, at::Tensor> random_permutation_cpu(const at::Tensor& seed, uint64_t offset, int64_t batch,
                                                          int64_t num_patches) {
  auto opts = at::TensorOptions().dtype(at::kLong);
  auto ids_shuffle = at::empty({batch, num_patches}, opts);
  auto ids_restore = at::empty({batch, num_patches}, opts);
  int64_t* sp = ids_shuffle.data_ptr<int64_t>();
  int64_t* rp = ids_restore.data_ptr<int64_t>();
  const uint64_t seed_value = host_seed(seed, "csrc_random_permutation");
  permutation_rows(seed_value, offset, batch, num_patches, [&](int64_t b, const int64_t* shuffle) {
    int64_t* s = sp + b * num_patches;
    int64_t* r = rp + b * num_patches;
    for (int64_t i = 0; i < num_patches; ++i) {
      s[i] = shuffle[i];
      r[shuffle[i]] = i;
    }
  });
  return {ids_shuffle, ids_restore};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& seed, uint64_t offset,
                                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                                  int64_t batch, int64_t num_patches,
                                                                  int64_t num_keep) {
  const char* op = "csrc_random_masking";
  auto opts = at::TensorOptions().dtype(at::kLong);
  const bool varlen = cu_seqlens.has_value();
  std::vector<int64_t> offsets(batch + 1);  // row b of the keep set starts at offsets[b]
  if (varlen) {
    auto cu = cu_seqlens->to(at::kLong).contiguous();
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) == batch + 1, op, ": cu_seqlens must have shape (", batch + 1,
                ",), got ", cu_seqlens->sizes());
    const int64_t* c = cu.const_data_ptr<int64_t>();
    TORCH_CHECK(c[0] == 0, op, ": cu_seqlens[0] must be 0, got ", c[0]);
    for (int64_t b = 0; b <= batch; ++b) {
      if (b > 0) {
        TORCH_CHECK(c[b] - c[b - 1] >= 0 && c[b] - c[b - 1] <= num_patches, op, ": keep count of sample ", b - 1,
                    " (cu_seqlens[", b, "] - cu_seqlens[", b - 1, "] = ", c[b] - c[b - 1], ") is out of range [0, ",
                    num_patches, "]");
      }
      offsets[b] = c[b];
    }
    TORCH_CHECK(offsets[batch] == num_keep, op, ": total must equal cu_seqlens[-1] = ", offsets[batch], ", got ",
                num_keep);
  } else {
    for (int64_t b = 0; b <= batch; ++b) offsets[b] = b * num_keep;
  }
  auto ids_keep = varlen ? at::empty({num_keep}, opts) : at::empty({batch, num_keep}, opts);
  auto ids_restore = at::empty({batch, num_patches}, opts);
  auto mask = at::empty({batch, num_patches}, opts.dtype(at::kFloat));
  int64_t* kp = ids_keep.data_ptr<int64_t>();
  int64_t* rp = ids_restore.data_ptr<int64_t>();
  float* mp = mask.data_ptr<float>();
  permutation_rows(host_seed(seed, op), offset, batch, num_patches, [&](int64_t b, const int64_t* shuffle) {
    const int64_t keep = offsets[b + 1] - offsets[b];
    int64_t* r = rp + b * num_patches;
    float* mk = mp + b * num_patches;
    std::copy(shuffle, shuffle + keep, kp + offsets[b]);
    for (int64_t i = 0; i < num_patches; ++i) {
      r[shuffle[i]] = i;
      mk[shuffle[i]] = i >= keep ? 1.0f : 0.0f;
    }
  });
  return {ids_keep, ids_restore, mask};
}

// ---------------------------------------------------------------- gather_visible

at::Tensor gather_visible_cpu(const at::Tensor& x, const at::Tensor& ids_keep,
                              const std::optional<at::Tensor>& pos_embed,
                              const std::optional<at::Tensor>& cls_token) {
  const char* op = "csrc_gather_visible";
  check_tokens(x, ids_keep, op, "x", "ids_keep");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = ids_keep.size(1);
  TORCH_CHECK(K <= L, op, ": ids_keep has ", K, " columns but x has only ", L, " patches");
  const at::ScalarType out_dtype = token_result_dtype(x, {&pos_embed, &cls_token}, op);
  const PosRows pos = check_pos_embed(pos_embed, x, out_dtype, L, D, op);
  if (cls_token.has_value()) check_token_vector(*cls_token, x, out_dtype, D, op, "cls_token");
  const int64_t hc = cls_token.has_value() ? 1 : 0;
  auto out = at::empty({B, K + hc, D}, x.options().dtype(out_dtype));
  const int64_t rows = K + hc;
  dispatch_in_out(x.scalar_type(), out_dtype, op, [&](auto in_tag, auto out_tag) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    AT_DISPATCH_INDEX_TYPES(ids_keep.scalar_type(), "fastmim_csrc", [&] {
      const in_t* xp = x.const_data_ptr<in_t>();
      const out_t* pp = pos.rows.defined() ? pos.rows.const_data_ptr<out_t>() : nullptr;
      const out_t* pos_patch = pp != nullptr ? pp + pos.patch_offset * D : nullptr;
      const out_t* pos_cls = (pp != nullptr && pos.patch_offset == 1) ? pp : nullptr;
      const out_t* cls = hc ? cls_token->const_data_ptr<out_t>() : nullptr;
      const index_t* ip = ids_keep.const_data_ptr<index_t>();
      out_t* o = out.data_ptr<out_t>();
      at::parallel_for(0, B * rows, kRowGrain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / rows, j = r % rows;
          out_t* dst = o + r * D;
          if (j < hc) {
            if (pos_cls != nullptr) {
              add_rows(dst, cls, pos_cls, D);
            } else {
              std::memcpy(dst, cls, D * sizeof(out_t));
            }
            continue;
          }
          const int64_t v = static_cast<int64_t>(ip[b * K + (j - hc)]);
          TORCH_CHECK(v >= 0 && v < L, op, ": ids_keep[", b, ", ", j - hc, "] = ", v, " is out of range [0, ", L,
                      ")");
          const in_t* src = xp + (b * L + v) * D;
          if (pos_patch != nullptr) {
            add_rows(dst, src, pos_patch + v * D, D);
          } else {
            convert_row(dst, src, D);
          }
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_visible_backward_cpu(const at::Tensor& grad_out,
                                                                           const at::Tensor& ids_keep,
                                                                           int64_t num_patches, bool has_cls,
                                                                           bool need_x, bool need_pos,
                                                                           bool need_cls) {
  const char* op = "csrc_gather_visible_backward";
  check_tokens(grad_out, ids_keep, op, "grad_out", "ids_keep");
  const int64_t B = grad_out.size(0), D = grad_out.size(2), K = ids_keep.size(1), L = num_patches;
  const int64_t hc = has_cls ? 1 : 0;
  TORCH_CHECK(grad_out.size(1) == K + hc, op, ": grad_out must have K + has_cls = ", K + hc, " rows, got ",
              grad_out.size(1));
  TORCH_CHECK(L >= K, op, ": num_patches (", L, ") must be >= K (", K, ")");
  auto opts = grad_out.options();
  auto grad_x = need_x ? at::empty({B, L, D}, opts) : at::empty({0}, opts);
  auto grad_pos = need_pos ? at::empty({L, D}, opts) : at::empty({0}, opts);
  auto grad_cls = (need_cls && has_cls) ? at::empty({D}, opts) : at::empty({0}, opts);
  if (!need_x && !need_pos && !(need_cls && has_cls)) return {grad_x, grad_pos, grad_cls};
  auto first = at::empty({B, L}, at::TensorOptions().dtype(at::kInt));
  auto count = at::empty({B, L}, at::TensorOptions().dtype(at::kInt));
  FASTMIM_DISPATCH_FLOAT(grad_out.scalar_type(), "fastmim_csrc", [&] {
    AT_DISPATCH_INDEX_TYPES(ids_keep.scalar_type(), "fastmim_csrc", [&] {
      const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
      const index_t* ip = ids_keep.const_data_ptr<index_t>();
      int32_t* fp = first.data_ptr<int32_t>();
      int32_t* cp = count.data_ptr<int32_t>();
      build_inverse(ip, B, K, L, L, fp, cp, op, "ids_keep");
      const int64_t rows_in = K + hc;
      if (need_x || need_pos) {
        scalar_t* gx = need_x ? grad_x.data_ptr<scalar_t>() : nullptr;
        scalar_t* gpos = need_pos ? grad_pos.data_ptr<scalar_t>() : nullptr;
        // A task owns a range of patch positions l and walks the batch, so the pos_embed
        // gradient (sum over b of grad_x[b, l]) is reduced while grad_x[b, l] is written.
        const int64_t grain = need_pos ? 1 : std::max<int64_t>(1, kRowGrain / std::max<int64_t>(B, 1));
        at::parallel_for(0, L, grain, [&](int64_t l0, int64_t l1) {
          std::vector<float> scratch(D), acc(D);
          std::vector<scalar_t> row(need_x ? 0 : D);
          for (int64_t l = l0; l < l1; ++l) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t b = 0; b < B; ++b) {
              scalar_t* dst = gx != nullptr ? gx + (b * L + l) * D : row.data();
              gather_inverse_row(dst, gp + (b * rows_in + hc) * D, D, ip + b * K, K, l, fp[b * L + l], cp[b * L + l],
                                 scratch.data());
              if (gpos != nullptr) accumulate_row(acc.data(), dst, D);
            }
            if (gpos != nullptr) store_row(gpos + l * D, acc.data(), D);
          }
        });
      }
      if (need_cls && has_cls) {
        std::vector<float> acc(D, 0.0f);
        for (int64_t b = 0; b < B; ++b) accumulate_row(acc.data(), gp + b * rows_in * D, D);
        store_row(grad_cls.data_ptr<scalar_t>(), acc.data(), D);
      }
    });
  });
  return {grad_x, grad_pos, grad_cls};
}

// ---------------------------------------------------------------- unshuffle

at::Tensor unshuffle_cpu(const at::Tensor& x_visible, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                         const std::optional<at::Tensor>& pos_embed, bool has_cls) {
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
  auto out = at::empty({B, L + hc, D}, x_visible.options().dtype(out_dtype));
  const int64_t S = L + hc, rows_in = K + hc;
  dispatch_in_out(x_visible.scalar_type(), out_dtype, op, [&](auto in_tag, auto out_tag) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    AT_DISPATCH_INDEX_TYPES(ids_restore.scalar_type(), "fastmim_csrc", [&] {
      const in_t* xp = x_visible.const_data_ptr<in_t>();
      const out_t* mt = mask_token.const_data_ptr<out_t>();
      const out_t* pp = pos.rows.defined() ? pos.rows.const_data_ptr<out_t>() : nullptr;
      const out_t* pos_patch = pp != nullptr ? pp + pos.patch_offset * D : nullptr;
      const out_t* pos_cls = (pp != nullptr && pos.patch_offset == 1) ? pp : nullptr;
      const index_t* ip = ids_restore.const_data_ptr<index_t>();
      out_t* o = out.data_ptr<out_t>();
      at::parallel_for(0, B * S, kRowGrain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / S, j = r % S;
          out_t* dst = o + r * D;
          if (j < hc) {
            const in_t* src = xp + b * rows_in * D;
            if (pos_cls != nullptr) {
              add_rows(dst, src, pos_cls, D);
            } else {
              convert_row(dst, src, D);
            }
            continue;
          }
          const int64_t i = j - hc;
          const int64_t v = static_cast<int64_t>(ip[b * L + i]);
          TORCH_CHECK(v >= 0 && v < L, op, ": ids_restore[", b, ", ", i, "] = ", v, " is out of range [0, ", L, ")");
          if (v < K) {
            const in_t* src = xp + (b * rows_in + hc + v) * D;
            if (pos_patch != nullptr) {
              add_rows(dst, src, pos_patch + i * D, D);
            } else {
              convert_row(dst, src, D);
            }
          } else if (pos_patch != nullptr) {
            add_rows(dst, mt, pos_patch + i * D, D);
          } else {
            std::memcpy(dst, mt, D * sizeof(out_t));
          }
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_backward_cpu(const at::Tensor& grad_out,
                                                                      const at::Tensor& ids_restore,
                                                                      int64_t num_visible, bool has_cls, bool need_x,
                                                                      bool need_mask, bool need_pos) {
  const char* op = "csrc_unshuffle_backward";
  check_tokens(grad_out, ids_restore, op, "grad_out", "ids_restore");
  const int64_t hc = has_cls ? 1 : 0;
  const int64_t B = grad_out.size(0), D = grad_out.size(2), L = ids_restore.size(1), K = num_visible;
  const int64_t S = L + hc, rows_x = K + hc;
  TORCH_CHECK(grad_out.size(1) == S, op, ": grad_out must have L + has_cls = ", S, " rows, got ", grad_out.size(1));
  TORCH_CHECK(K >= 0 && K <= L, op, ": num_visible must be in [0, ", L, "], got ", K);
  auto opts = grad_out.options();
  auto grad_x = need_x ? at::empty({B, rows_x, D}, opts) : at::empty({0}, opts);
  auto grad_mask = need_mask ? at::empty({D}, opts) : at::empty({0}, opts);
  auto grad_pos = need_pos ? at::empty({S, D}, opts) : at::empty({0}, opts);
  FASTMIM_DISPATCH_FLOAT(grad_out.scalar_type(), "fastmim_csrc", [&] {
    AT_DISPATCH_INDEX_TYPES(ids_restore.scalar_type(), "fastmim_csrc", [&] {
      const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
      const index_t* ip = ids_restore.const_data_ptr<index_t>();
      // Validates every index even when only pos_embed's gradient is asked for.
      auto first = at::empty({B, K}, at::TensorOptions().dtype(at::kInt));
      auto count = at::empty({B, K}, at::TensorOptions().dtype(at::kInt));
      int32_t* fp = first.data_ptr<int32_t>();
      int32_t* cp = count.data_ptr<int32_t>();
      build_inverse(ip, B, L, K, L, fp, cp, op, "ids_restore");
      if (need_x) {  // the visible tokens' gradient: a gather through the inverse of ids_restore
        scalar_t* gx = grad_x.data_ptr<scalar_t>();
        at::parallel_for(0, B * rows_x, kRowGrain, [&](int64_t r0, int64_t r1) {
          std::vector<float> scratch(D);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / rows_x, j = r % rows_x;
            const scalar_t* src = gp + b * S * D;
            if (j < hc) {
              std::memcpy(gx + r * D, src, D * sizeof(scalar_t));
            } else {
              const int64_t k = j - hc;
              gather_inverse_row(gx + r * D, src + hc * D, D, ip + b * L, L, k, fp[b * K + k], cp[b * K + k],
                                 scratch.data());
            }
          }
        });
      }
      if (need_mask || need_pos) {
        // Column sums over the batch. Positions are split in fixed chunks, each with its own fp32
        // partial of the mask-token sum; the partials are added in chunk order.
        const int64_t chunks = std::min<int64_t>(S, std::max<int64_t>(1, at::get_num_threads()) * 4);
        // At least one partial: with S == 0 (no patch, no cls row) grad_mask is that zero row.
        std::vector<float> mask_partial(need_mask ? std::max<int64_t>(chunks, 1) * D : 0, 0.0f);
        scalar_t* gpos = need_pos ? grad_pos.data_ptr<scalar_t>() : nullptr;
        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
          std::vector<float> acc(D);
          for (int64_t c = c0; c < c1; ++c) {
            float* mp = need_mask ? mask_partial.data() + c * D : nullptr;
            for (int64_t j = c * S / chunks; j < (c + 1) * S / chunks; ++j) {
              std::fill(acc.begin(), acc.end(), 0.0f);
              for (int64_t b = 0; b < B; ++b) {
                const scalar_t* row = gp + (b * S + j) * D;
                if (gpos != nullptr) accumulate_row(acc.data(), row, D);
                if (mp != nullptr && j >= hc && static_cast<int64_t>(ip[b * L + (j - hc)]) >= K) {
                  accumulate_row(mp, row, D);
                }
              }
              if (gpos != nullptr) store_row(gpos + j * D, acc.data(), D);
            }
          }
        });
        if (need_mask) {
          for (int64_t c = 1; c < chunks; ++c) {
            for (int64_t d = 0; d < D; ++d) mask_partial[d] += mask_partial[c * D + d];
          }
          store_row(grad_mask.data_ptr<scalar_t>(), mask_partial.data(), D);
        }
      }
    });
  });
  return {grad_x, grad_mask, grad_pos};
}

}  // namespace fastmim
