// bSAM's CPU ops: sample, perturb, update. The perturbation unscales the gradient (GradScaler),
// checks it for inf/NaN (the step's found-inf flag) and zeroes it for the next backward pass; the
// update reads the flag and leaves the state alone on a skipped step. The precision and momentum
// are stored in the state dtype or, with float32 state, in bfloat16 (BSAM(state_dtype=torch.bfloat16)):
// read and widened exactly, and written back by the update with stochastic rounding, whose random
// bits come from a Philox stream like the noise.
#include <algorithm>
#include <type_traits>

#include "multi_tensor_cpu.h"

namespace sambayes {
namespace {

// ---- per-phase loops -------------------------------------------------------------------------
// `bad` collects "some value read was inf or NaN" as an integer or-reduction, which the compiler
// vectorizes (a bool one it does not). The loops read the precision and momentum as S, the stored
// dtype: A itself, or c10::BFloat16 (widened to float exactly).

// float32 params: 12 B/param with float32 precision, 10 B with bfloat16 (reads m 4, s 4 or 2; writes θ 4).
template <typename P, typename A, typename S>
SB_CLONES void sample_loop(P* __restrict param, const A* __restrict mean, const S* __restrict precision,
                           const float* __restrict z, int64_t n, A num_data) {
  for (int64_t i = 0; i < n; ++i) {
    param[i] = static_cast<P>(
        bsam_sample_param<A>(mean[i], static_cast<A>(precision[i]), static_cast<A>(z[i]), num_data));
  }
}

// float32 params: 24 B/param with float32 precision, 22 B with bfloat16 (reads g 4, m 4, s 4 or 2;
// writes θ 4, a 4, zeroed g 4), 4 B more when accumulating (reads a).
template <bool Accumulate, typename P, typename A, typename S>
SB_CLONES bool bsam_perturb_loop(P* __restrict param, P* __restrict grad, const A* __restrict mean,
                                 const S* __restrict precision, A* __restrict curvature_sum, int64_t n, A rho,
                                 A inv_scale) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const A g = static_cast<A>(grad[i]) * inv_scale;
    bad |= !is_finite(g);
    param[i] = static_cast<P>(bsam_perturb_param<A>(g, mean[i], static_cast<A>(precision[i]), rho));
    const A a = bsam_curvature<A>(g, static_cast<A>(precision[i]));
    curvature_sum[i] = Accumulate ? curvature_sum[i] + a : a;
    grad[i] = P(0);  // consumed: the next backward pass accumulates into a zeroed buffer
  }
  return bad != 0;
}

// float32 params: 40 B/param with float32 state, 32 B with bfloat16 precision and momentum (reads h 4, m 4,
// s 4 or 2, g_m 4 or 2, a 4; writes g_m 4 or 2, m 4, s 4 or 2, θ 4, zeroed h 4). `words`: the elements'
// stochastic-rounding words when S is bfloat16 (rounding_words), unused otherwise.
template <typename P, typename A, typename S>
SB_CLONES void bsam_update_loop(P* __restrict param, P* __restrict grad, A* __restrict mean, S* __restrict precision,
                                S* __restrict momentum, const A* __restrict curvature_sum, int64_t n,
                                const BsamUpdateCoeffs<A>& c, A inv_scale, const uint32_t* __restrict words) {
  for (int64_t i = 0; i < n; ++i) {
    A m = mean[i], s = static_cast<A>(precision[i]), gm = static_cast<A>(momentum[i]);
    bsam_update_element<A>(static_cast<A>(grad[i]) * inv_scale, curvature_sum[i], m, s, gm, c);
    store_posterior(param, grad, mean, precision, momentum, words, i, m, s, gm);
  }
}

// ---- the ops ------------------------------------------------------------------------------------

void bsam_sample_cpu(at::TensorList params, at::TensorList means, at::TensorList precisions,
                     at::IntArrayRef offsets, double num_data, int64_t seed,
                     const std::optional<at::Tensor>& seed_tensor) {
  check_bsam_sample(params, means, precisions, offsets);
  const auto key = philox_key(scalar_or(seed_tensor, seed, "bsam_sample", "seed_tensor"));
  const uint32_t k0 = key.first, k1 = key.second;
  const auto rows = make_rows<3>({params, means, precisions}, offsets);
  dispatch_bsam(params[0].scalar_type(), stored_in_bf16(precisions), [&](auto param, auto stored) {
    using P = decltype(param);
    using S = decltype(stored);
    using A = acc_t<P>;
    for_each_chunk(rows, [&](const TensorRow<3>& row, int64_t begin, int64_t end) {
      alignas(64) float z[kNoiseBlock];
      for (int64_t i = begin; i < end; i += kNoiseBlock) {
        const int64_t len = std::min(kNoiseBlock, end - i);
        prefetch(at_<P>(row.ptr[0], i), len);  // the block's memory under its noise's arithmetic
        prefetch(at_<A>(row.ptr[1], i), len);
        prefetch(at_<S>(row.ptr[2], i), len);
        randn_range(z, row.offset + i, len, k0, k1);
        sample_loop<P, A, S>(at_<P>(row.ptr[0], i), at_<A>(row.ptr[1], i), at_<S>(row.ptr[2], i), z, len,
                             static_cast<A>(num_data));
      }
    });
  });
}

void bsam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList means, at::TensorList precisions,
                      at::TensorList curvature_sums, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                      double rho, bool accumulate) {
  check_group("bsam_perturb", params, {{"grads", grads}}, {{"means", means}, {"curvature_sums", curvature_sums}},
              {{"precisions", precisions}});
  const float inv = read_scalar(inv_scale, "inv_scale");
  read_scalar(found_inf, "found_inf");
  const auto rows = make_rows<5>({params, grads, means, precisions, curvature_sums});
  dispatch_bsam(params[0].scalar_type(), stored_in_bf16(precisions), [&](auto param, auto stored) {
    using P = decltype(param);
    using S = decltype(stored);
    using A = acc_t<P>;
    const auto loop = accumulate ? bsam_perturb_loop<true, P, A, S> : bsam_perturb_loop<false, P, A, S>;
    for_each_chunk(rows, [&](const TensorRow<5>& row, int64_t b, int64_t e) {
      if (loop(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[2], b), at_<S>(row.ptr[3], b),
               at_<A>(row.ptr[4], b), e - b, static_cast<A>(rho), static_cast<A>(inv))) {
        raise_flag(found_inf);
      }
    });
  });
}

// bfloat16 precision and momentum: computed in float32, stored with stochastic rounding, element k of
// tensor i drawing the rounding word of group element offsets[i] + k from the Philox stream `seed`.
void bsam_update_cpu(at::TensorList params, at::TensorList grad_sums, at::TensorList means, at::TensorList precisions,
                     at::TensorList momentums, at::TensorList curvature_sums, at::IntArrayRef offsets,
                     const at::Tensor& found_inf, const at::Tensor& inv_scale, double lr, double beta1, double beta2,
                     double weight_decay, double damping, int64_t splits, int64_t seed,
                     const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& seed_tensor) {
  check_bsam_update(params, grad_sums, means, precisions, momentums, curvature_sums, offsets, splits);
  lr = scalar_or(lr_tensor, lr, "bsam_update", "lr_tensor");
  seed = scalar_or(seed_tensor, seed, "bsam_update", "seed_tensor");
  const auto rows = make_rows<6>({params, grad_sums, means, precisions, momentums, curvature_sums}, offsets);
  if (read_scalar(found_inf, "found_inf") != 0.0f) return skip_step(rows, params[0].scalar_type(), 2);
  const float inv = read_scalar(inv_scale, "inv_scale");
  const bool bf16_state = stored_in_bf16(precisions);
  const auto key = bf16_state ? philox_key(seed) : std::pair<uint32_t, uint32_t>{};  // the seed matters only then
  const uint32_t k0 = key.first, k1 = key.second;
  dispatch_bsam(params[0].scalar_type(), bf16_state, [&](auto param, auto stored) {
    using P = decltype(param);
    using S = decltype(stored);
    using A = acc_t<P>;
    const auto c = bsam_update_coeffs<A>(splits, lr, beta1, beta2, weight_decay, damping);
    for_each_chunk(rows, [&](const TensorRow<6>& row, int64_t b, int64_t e) {
      const auto update = [&](int64_t begin, int64_t len, const uint32_t* words) {
        bsam_update_loop<P, A, S>(at_<P>(row.ptr[0], begin), at_<P>(row.ptr[1], begin), at_<A>(row.ptr[2], begin),
                                  at_<S>(row.ptr[3], begin), at_<S>(row.ptr[4], begin), at_<A>(row.ptr[5], begin),
                                  len, c, static_cast<A>(inv), words);
      };
      if constexpr (std::is_same_v<S, A>) {
        update(b, e - b, nullptr);
      } else {
        // the rounding words drawn into an L1-resident buffer, a block at a time
        alignas(64) uint32_t words[kNoiseBlock];
        for (int64_t i = b; i < e; i += kNoiseBlock) {
          const int64_t len = std::min(kNoiseBlock, e - i);
          rounding_words(words, row.offset + i, len, k0, k1);
          update(i, len, words);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, CPU, m) {
  m.impl("bsam_sample", &bsam_sample_cpu);
  m.impl("bsam_perturb", &bsam_perturb_cpu);
  m.impl("bsam_update", &bsam_update_cpu);
}

}  // namespace sambayes
