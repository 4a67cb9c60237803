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

// out = src + add (in fp32), or src converted when add is null.
template <typename out_t, typename in_t, typename add_t>
inline void copy_add_row(out_t* out, const in_t* src, const add_t* add, int64_t n) {
  if (add != nullptr) {
    add_rows(out, src, add, n);
  } else {
    convert_row(out, src, n);
  }
}

// Calls row(b, j, dst) for every row j of every sample b of out (B, rows, D), split across threads.
template <typename out_t, typename F>
void for_each_row(out_t* out, int64_t batch, int64_t rows, int64_t dim, const F& row) {
  at::parallel_for(0, batch * rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(r / rows, r % rows, out + r * dim);
  });
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

at::Tensor gather_visible_cpu(FASTMIM_GATHER_VISIBLE_PARAMS) {
  const char* op = "csrc_gather_visible";
  const TokenForwardSetup s = setup_gather_visible(x, ids_keep, pos_embed, cls_token);
  const int64_t L = s.L, D = s.D, K = s.K, hc = s.hc;
  dispatch_token_forward(s, x, ids_keep, op, [&](auto in_tag, auto out_tag, auto index_tag, const auto& pos) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    using index_t = typename decltype(index_tag)::type;
    const in_t* xp = x.const_data_ptr<in_t>();
    const out_t* cls = hc ? cls_token->const_data_ptr<out_t>() : nullptr;
    const index_t* ip = ids_keep.const_data_ptr<index_t>();
    for_each_row(s.out.data_ptr<out_t>(), s.B, K + hc, D, [&](int64_t b, int64_t j, out_t* dst) {
      if (j < hc) return copy_add_row(dst, cls, pos.cls, D);
      const int64_t v = static_cast<int64_t>(ip[b * K + (j - hc)]);
      TORCH_CHECK(v >= 0 && v < L, op, ": ids_keep[", b, ", ", j - hc, "] = ", v, " is out of range [0, ", L, ")");
      copy_add_row(dst, xp + (b * L + v) * D, pos.patch != nullptr ? pos.patch + v * D : nullptr, D);
    });
  });
  return s.out;
}

TensorTriple gather_visible_backward_cpu(FASTMIM_GATHER_VISIBLE_BACKWARD_PARAMS) {
  const char* op = "csrc_gather_visible_backward";
  const GatherVisibleBackwardSetup s = setup_gather_visible_backward(grad_out, ids_keep, num_patches, has_cls,
                                                                     need_x, need_pos, need_cls);
  const int64_t B = s.B, D = s.D, K = s.K, L = s.L, hc = s.hc;
  if (!need_x && !need_pos && !(need_cls && has_cls)) return s.grads();
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
        scalar_t* gx = need_x ? s.grad_x.data_ptr<scalar_t>() : nullptr;
        scalar_t* gpos = need_pos ? s.grad_pos.data_ptr<scalar_t>() : nullptr;
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
        store_row(s.grad_cls.data_ptr<scalar_t>(), acc.data(), D);
      }
    });
  });
  return s.grads();
}

// ---------------------------------------------------------------- unshuffle

at::Tensor unshuffle_cpu(FASTMIM_UNSHUFFLE_PARAMS) {
  const char* op = "csrc_unshuffle";
  const TokenForwardSetup s = setup_unshuffle(x_visible, ids_restore, mask_token, pos_embed, has_cls);
  const int64_t D = s.D, L = s.L, K = s.K, hc = s.hc, rows_in = K + hc;
  dispatch_token_forward(s, x_visible, ids_restore, op, [&](auto in_tag, auto out_tag, auto index_tag, const auto& pos) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    using index_t = typename decltype(index_tag)::type;
    const in_t* xp = x_visible.const_data_ptr<in_t>();
    const out_t* mt = mask_token.const_data_ptr<out_t>();
    const index_t* ip = ids_restore.const_data_ptr<index_t>();
    for_each_row(s.out.data_ptr<out_t>(), s.B, L + hc, D, [&](int64_t b, int64_t j, out_t* dst) {
      if (j < hc) return copy_add_row(dst, xp + b * rows_in * D, pos.cls, D);
      const int64_t i = j - hc;
      const int64_t v = static_cast<int64_t>(ip[b * L + i]);
      TORCH_CHECK(v >= 0 && v < L, op, ": ids_restore[", b, ", ", i, "] = ", v, " is out of range [0, ", L, ")");
      const out_t* pos_row = pos.patch != nullptr ? pos.patch + i * D : nullptr;
      if (v < K) {
        copy_add_row(dst, xp + (b * rows_in + hc + v) * D, pos_row, D);
      } else {
        copy_add_row(dst, mt, pos_row, D);
      }
    });
  });
  return s.out;
}

TensorTriple unshuffle_backward_cpu(FASTMIM_UNSHUFFLE_BACKWARD_PARAMS) {
  const char* op = "csrc_unshuffle_backward";
  const UnshuffleBackwardSetup s = setup_unshuffle_backward(grad_out, ids_restore, num_visible, has_cls, need_x,
                                                            need_mask, need_pos);
  const int64_t B = s.B, D = s.D, L = s.L, K = s.K, hc = s.hc;
  const int64_t S = L + hc, rows_x = K + hc;
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
        scalar_t* gx = s.grad_x.data_ptr<scalar_t>();
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
        scalar_t* gpos = need_pos ? s.grad_pos.data_ptr<scalar_t>() : nullptr;
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
          store_row(s.grad_mask.data_ptr<scalar_t>(), mask_partial.data(), D);
        }
      }
    });
  });
  return s.grads();
}

}  // namespace fastmim
