// IVON's CPU ops (docs/ivon.md): the accumulation of a sample's gradient into the sums over samples, and the
// update. The sample itself is bSAM's (bsam_sample, θ = m + z/sqrt(ess·s)). The accumulation regenerates the
// sample's noise z for Price's estimator (never stored), checks the gradient for inf/NaN (the step's found-inf
// flag) and zeroes it for the next pass; the update reads the flag and leaves the state alone on a skipped
// step. With one sample the update computes the curvature itself, from the gradient and the regenerated noise.
// The precision and momentum are stored in the state dtype or, over float32 state, in bfloat16 (written with
// stochastic rounding, as bSAM's update writes them).
#include <algorithm>
#include <type_traits>

#include "multi_tensor_cpu.h"

namespace sambayes {
namespace {

// ---- per-phase loops -------------------------------------------------------------------------
// `bad` collects "some value read was inf or NaN" as an integer or-reduction, which the compiler vectorizes.

// The stages of a sample's accumulation: the first of several, a middle one, the last of several (the gradient
// sum back into .grad), the only one (.grad keeps g).
enum Stage { kFirst, kMiddle, kLast, kOnly };

// float32 params: first 12 B/param (reads g; writes the two sums, zeroes g), middle 20 B, last 16 B (reads g and the
// sums, writes the curvature sum and g), only 8 B (reads g, writes the curvature sum). `z`: the sample's noise
// (Price's estimator), unused for gradsq.
template <Stage kStage, bool kPrice, typename P, typename A>
SB_CLONES bool accumulate_loop(P* __restrict grad, A* __restrict grad_sum, A* __restrict curvature_sum,
                               const float* __restrict z, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const A g = static_cast<A>(grad[i]);
    const A c = ivon_curvature<A>(g, kPrice ? static_cast<A>(z[i]) : A(0), kPrice);
    curvature_sum[i] = kStage == kFirst || kStage == kOnly ? c : curvature_sum[i] + c;
    // the gradient sum over samples, as fold_grads sums sub-batches; the only sample: .grad keeps g
    bad |= !is_finite(kStage == kOnly ? g : fold_element<P, A>(g, grad_sum[i], grad[i], kStage));
  }
  return bad != 0;
}

// float32 params, summed: 40 B/param with float32 state, 32 B with bfloat16 precision and momentum (reads h 4, m 4,
// s 4 or 2, g_m 4 or 2, c 4; writes g_m 4 or 2, m 4, s 4 or 2, θ 4, zeroed h 4); one sample (not summed): 4 B less
// (no curvature sum read). `z`: the one sample's noise (not summed, Price's estimator); `words`: the stochastic-
// rounding words when S is bfloat16 (rounding_words); unused otherwise.
template <bool kSummed, bool kPrice, typename P, typename A, typename S>
SB_CLONES void ivon_update_loop(P* __restrict param, P* __restrict grad, A* __restrict mean, S* __restrict precision,
                                S* __restrict momentum, const A* __restrict curvature_sum, int64_t n,
                                const IvonUpdateCoeffs<A>& k, A inv_scale, const float* __restrict z,
                                const uint32_t* __restrict words) {
  for (int64_t i = 0; i < n; ++i) {
    const A g = static_cast<A>(grad[i]) * inv_scale * k.inv_splits;
    const A c = kSummed ? ivon_mean_curvature<A>(curvature_sum[i], inv_scale, k.inv_splits, kPrice)
                        : ivon_curvature<A>(g, kPrice ? static_cast<A>(z[i]) : A(0), kPrice);
    A m = mean[i], s = static_cast<A>(precision[i]), gm = static_cast<A>(momentum[i]);
    ivon_update_element<A>(g, c, m, s, gm, k, kPrice);
    store_posterior(param, grad, mean, precision, momentum, words, i, m, s, gm);
  }
}

// ---- the ops ------------------------------------------------------------------------------------

void ivon_accumulate_cpu(at::TensorList grads, at::TensorList grad_sums, at::TensorList curvature_sums,
                         at::IntArrayRef offsets, const at::Tensor& found_inf, int64_t seed, bool price, bool first,
                         bool last, const std::optional<at::Tensor>& seed_tensor) {
  check_ivon_accumulate(grads, grad_sums, curvature_sums, offsets);
  read_scalar(found_inf, "found_inf");
  seed = scalar_or(seed_tensor, seed, "ivon_accumulate", "seed_tensor");
  const auto key = price ? philox_key(seed) : std::pair<uint32_t, uint32_t>{};  // the seed matters only then
  const uint32_t k0 = key.first, k1 = key.second;
  const auto rows = make_rows<3>({grads, grad_sums, curvature_sums}, offsets);
  const Stage stage = first && last ? kOnly : first ? kFirst : last ? kLast : kMiddle;
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "ivon_accumulate", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    const auto run = [&](auto price_tag) {
      constexpr bool kPrice = decltype(price_tag)::value;
      const auto loop = stage == kOnly    ? accumulate_loop<kOnly, kPrice, P, A>
                        : stage == kFirst ? accumulate_loop<kFirst, kPrice, P, A>
                        : stage == kLast  ? accumulate_loop<kLast, kPrice, P, A>
                                          : accumulate_loop<kMiddle, kPrice, P, A>;
      for_each_chunk(rows, [&](const TensorRow<3>& row, int64_t b, int64_t e) {
        alignas(64) float z[kNoiseBlock];
        for (int64_t i = b; i < e; i += kNoiseBlock) {  // z drawn into an L1-resident buffer, a block at a time
          const int64_t len = std::min(kNoiseBlock, e - i);
          if (kPrice) randn_range(z, row.offset + i, len, k0, k1);
          if (loop(at_<P>(row.ptr[0], i), at_<A>(row.ptr[1], i), at_<A>(row.ptr[2], i), z, len)) raise_flag(found_inf);
        }
      });
    };
    price ? run(std::true_type{}) : run(std::false_type{});
  });
}

// bfloat16 precision and momentum: computed in float32, stored with stochastic rounding, element k of tensor i
// drawing the rounding word of group element offsets[i] + k from the Philox stream `seed`. Not summed with Price's
// estimator: the one sample's noise from the stream `noise_seed`, at the same element index.
void ivon_update_cpu(at::TensorList params, at::TensorList grad_sums, at::TensorList means, at::TensorList precisions,
                     at::TensorList momentums, at::TensorList curvature_sums, at::IntArrayRef offsets,
                     const at::Tensor& found_inf, const at::Tensor& inv_scale, const at::Tensor& step, double lr,
                     double beta1, double beta2, double ess, double weight_decay, double clip_radius, bool debias,
                     bool price, bool summed, int64_t splits, int64_t noise_seed, int64_t seed,
                     const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& noise_seed_tensor,
                     const std::optional<at::Tensor>& seed_tensor) {
  check_ivon_update(params, grad_sums, means, precisions, momentums, curvature_sums, offsets, step, splits);
  lr = scalar_or(lr_tensor, lr, "ivon_update", "lr_tensor");
  noise_seed = scalar_or(noise_seed_tensor, noise_seed, "ivon_update", "noise_seed_tensor");
  seed = scalar_or(seed_tensor, seed, "ivon_update", "seed_tensor");
  const auto rows = make_rows<6>({params, grad_sums, means, precisions, momentums, curvature_sums}, offsets);
  if (read_scalar(found_inf, "found_inf") != 0.0f) return skip_step(rows, params[0].scalar_type(), 2);
  const float inv = read_scalar(inv_scale, "inv_scale");
  const bool bf16_state = stored_in_bf16(precisions);
  const bool noise = price && !summed;
  // the seeds matter only with bfloat16 state (rounding) and for one sample's noise
  const auto rounding_key = bf16_state ? philox_key(seed) : std::pair<uint32_t, uint32_t>{};
  const auto noise_key = noise ? philox_key(noise_seed) : std::pair<uint32_t, uint32_t>{};
  const double bias1 = ivon_bias1(beta1, *step.data_ptr<double>(), debias);
  dispatch_bsam(params[0].scalar_type(), bf16_state, [&](auto param, auto stored) {
    using P = decltype(param);
    using S = decltype(stored);
    using A = acc_t<P>;
    const auto k = ivon_update_coeffs<A>(splits, lr, beta1, beta2, ess, weight_decay, clip_radius, bias1);
    const auto loop = summed ? (price ? ivon_update_loop<true, true, P, A, S> : ivon_update_loop<true, false, P, A, S>)
                             : (price ? ivon_update_loop<false, true, P, A, S> : ivon_update_loop<false, false, P, A, S>);
    for_each_chunk(rows, [&](const TensorRow<6>& row, int64_t b, int64_t e) {
      const auto update = [&](int64_t begin, int64_t len, const float* z, const uint32_t* words) {
        loop(at_<P>(row.ptr[0], begin), at_<P>(row.ptr[1], begin), at_<A>(row.ptr[2], begin), at_<S>(row.ptr[3], begin),
             at_<S>(row.ptr[4], begin), at_<A>(row.ptr[5], begin), len, k, static_cast<A>(inv), z, words);
      };
      if (!noise && std::is_same_v<S, A>) return update(b, e - b, nullptr, nullptr);
      // the noise and the rounding words drawn into L1-resident buffers, a block at a time
      alignas(64) float z[kNoiseBlock];
      alignas(64) uint32_t words[kNoiseBlock];
      for (int64_t i = b; i < e; i += kNoiseBlock) {
        const int64_t len = std::min(kNoiseBlock, e - i);
        if (noise) randn_range(z, row.offset + i, len, noise_key.first, noise_key.second);
        if (!std::is_same_v<S, A>) rounding_words(words, row.offset + i, len, rounding_key.first, rounding_key.second);
        update(i, len, z, words);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, CPU, m) {
  m.impl("ivon_accumulate", &ivon_accumulate_cpu);
  m.impl("ivon_update", &ivon_update_cpu);
}

}  // namespace sambayes
