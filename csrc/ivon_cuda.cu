// IVON's CUDA ops (docs/ivon.md): the accumulation of a sample's gradient into the sums over samples, and the
// update (the sample itself is bsam_sample). Float32 math for float32/bfloat16/float16 parameters. The
// accumulation regenerates the sample's noise for Price's estimator and raises the step's found-inf flag on
// inf/NaN; the update leaves the state alone when the flag is set, and with one sample computes the curvature
// itself from the gradient and the regenerated noise. The precision and momentum may be stored in bfloat16 over
// float32 state: read widened, written with stochastic rounding.
#include "multi_tensor_cuda.cuh"

namespace sambayes {
namespace {

// ---- per-phase element ops (see multi_tensor_cuda.cuh) ---------------------------------------
// The seeds, lr and step given as tensors are read in prepared(), so that each replay of a CUDA graph reads the
// current values.

// float32 params: first 12 B/param (reads g; writes the two sums, zeroes g), middle 20 B, last 16 B (reads g and
// the sums, writes the curvature sum and g), only (first and last) 8 B (reads g, writes the curvature sum). Both
// sums are addressed relative to their first tensors: the grad sums' base comes with the launch, the curvature
// sums' is added here. Price's estimator: one Philox call per four elements (the kernel's quads), under the rounds'
// keys (kernel parameters, or read in prepared() from the seed tensor); kGradsq: the squared gradient, no noise, in
// an instantiation of its own (so that each compiles to its own path: the instruction budgets, tests/budget.py).
template <typename P, typename A, bool kGradsq>
struct IvonAccumulateOp {
  static constexpr bool kNoiseQuads = true;
  bool first, last;
  PhiloxRoundKeys keys;
  const int64_t* seed_ptr;
  float* found_inf;
  int64_t curvature_base;
  __device__ IvonAccumulateOp prepared() const {
    IvonAccumulateOp op = *this;
    if (seed_ptr) op.keys = read_philox_round_keys(seed_ptr);
    return op;
  }
  // z of a quad (Price's estimator; none for the squared gradient)
  __device__ Pack<float, 4> draw(uint64_t call) const {
    if constexpr (kGradsq) return {};
    return noise_quad(call, keys);
  }
  template <int W, typename Lanes>
  __device__ void run(const TensorRow<3>& row, int64_t i, const Lanes& lanes) const {
    void* const curvature_ptr = offset_address(row.ptr[2], curvature_base);
    const auto grad = load<P, W>(row.ptr[0], i);
    Pack<A, W> curvature, total;
    if (!first) {
      curvature = load<A, W>(curvature_ptr, i);
      total = load<A, W>(row.ptr[1], i);
    }
    const Pack<float, W> z = lanes();
    const bool only = first && last;
    const int stage = first ? 0 : last ? 2 : 1;
    auto folded = grad;
    bool bad = false;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A g = static_cast<A>(grad.v[j]);
      const A c = ivon_curvature<A>(g, static_cast<A>(z.v[j]), !kGradsq);
      curvature.v[j] = first ? c : curvature.v[j] + c;
      // the gradient sum over samples, as fold_grads sums sub-batches; the only sample: .grad keeps g
      bad |= !is_finite(only ? g : fold_element<P, A>(g, total.v[j], folded.v[j], stage));
    }
    if (bad) raise_flag(found_inf);
    store<A, W>(curvature_ptr, i, curvature);
    if (only) return;
    if (last) {
      store<P, W>(row.ptr[0], i, folded);
    } else {
      store<A, W>(row.ptr[1], i, total);
      store_zero<P, W>(row.ptr[0], i);
    }
  }
};

// What the update draws for one element: the one sample's z (Price's estimator, not summed) and the stochastic
// rounding word (bfloat16 S), each from its own Philox stream.
struct IvonDraw {
  float z;
  uint32_t word;
};

// float32 params, summed: 40 B/param with float32 state, 32 B with bfloat16 precision and momentum (reads h 4, m 4,
// s 4 or 2, g_m 4 or 2, c 4; writes g_m 4 or 2, m 4, s 4 or 2, θ 4, zeroed h 4); one sample (not summed): 4 B less.
// The noise and the rounding words: one Philox call per stream and four elements (the kernel's quads).
// kOneSample: the one sample's curvature from Price's estimator (price && !summed), in an instantiation of its own,
// so that the others carry no noise and each compiles to its own path (the instruction budgets, tests/budget.py).
template <typename P, typename A, typename S, bool kOneSample>
struct IvonUpdateOp {
  static constexpr bool kNoiseQuads = true;
  static constexpr bool kRounded = !std::is_same_v<S, A>;
  IvonUpdateCoeffs<A> c;
  bool price, summed, debias;
  double beta1;
  const double* step_ptr;
  const float* found_inf;
  const float* inv_scale_ptr;
  bool skip;
  A inv_scale;
  PhiloxRoundKeys noise_keys;     // the one sample's noise (kOneSample): its rounds' keys
  // the stochastic rounding (bfloat16 S): its rounds' keys with one sample; summed, its key alone (round 0's) and
  // the rounds' computed in each call, as held in registers (capturable) they spill the summed update of float16
  // parameters on sm_80 (ptxas 13)
  PhiloxRoundKeys rounding_keys;
  const double* lr_ptr;
  const int64_t* noise_seed_ptr;
  const int64_t* seed_ptr;
  __device__ IvonUpdateOp prepared() const {
    IvonUpdateOp op = *this;
    op.skip = *found_inf != 0.0f;
    op.inv_scale = static_cast<A>(*inv_scale_ptr);
    op.c.inv_bias1 = static_cast<A>(1.0 / ivon_bias1(beta1, *step_ptr, debias));
    if (lr_ptr) op.c.lr = static_cast<A>(*lr_ptr);
    if (noise_seed_ptr) op.noise_keys = read_philox_round_keys(noise_seed_ptr);
    if (seed_ptr && kOneSample) op.rounding_keys = read_philox_round_keys(seed_ptr);
    if (seed_ptr && !kOneSample) read_philox_key(seed_ptr, op.rounding_keys.k0[0], op.rounding_keys.k1[0]);
    return op;
  }
  __device__ bool noise() const { return kOneSample; }
  // the draws of a quad: Philox4x32-10 call `call` in each stream used
  __device__ Pack<IvonDraw, 4> draw(uint64_t call) const {
    Pack<IvonDraw, 4> out{};
    if (skip) return out;  // a skipped step stores no state
    const Pack<float, 4> z = noise() ? noise_quad(call, noise_keys) : Pack<float, 4>{};
    const Pack<uint32_t, 4> words = !kRounded  ? Pack<uint32_t, 4>{}
                                    : kOneSample ? words_quad(call, rounding_keys)
                                                 : words_quad(call, rounding_keys.k0[0], rounding_keys.k1[0]);
#pragma unroll
    for (int j = 0; j < 4; ++j) out.v[j] = {z.v[j], words.v[j]};
    return out;
  }
  // lanes(): the elements' draws, called once: before the math for the noise, else after it (the rounding words)
  template <int W, typename Lanes>
  __device__ void run(const TensorRow<6>& row, int64_t i, const Lanes& lanes) const {
    auto mean = load<A, W>(row.ptr[2], i);
    if (!skip) {
      const auto grad = load<P, W>(row.ptr[1], i);
      auto precision = load_widened<S, A, W>(row.ptr[3], i);
      auto momentum = load_widened<S, A, W>(row.ptr[4], i);
      Pack<A, W> curvature_sum;
      Pack<IvonDraw, W> drawn{};
      if (kOneSample) {
        drawn = lanes();
      } else if (summed) {
        curvature_sum = load<A, W>(row.ptr[5], i);
      }
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const A g = static_cast<A>(grad.v[j]) * inv_scale * c.inv_splits;
        // one sample: Price's estimator (kOneSample) or the squared gradient
        const A curvature = kOneSample ? ivon_curvature<A>(g, static_cast<A>(drawn.v[j].z), true)
                            : summed   ? ivon_mean_curvature<A>(curvature_sum.v[j], inv_scale, c.inv_splits, price)
                                       : ivon_curvature<A>(g, A(0), false);
        ivon_update_element<A>(g, curvature, mean.v[j], precision.v[j], momentum.v[j], c, price);
      }
      store_posterior<S>(row, i, mean, precision, momentum, [&] {
        if (!noise()) drawn = lanes();  // the rounding words alone: drawn after the math
        Pack<uint32_t, W> words;
#pragma unroll
        for (int j = 0; j < W; ++j) words.v[j] = drawn.v[j].word;
        return words;
      });
    }
    store_rounded<P>(row.ptr[0], i, mean);
    store_zero<P, W>(row.ptr[1], i);
  }
};

// ---- the ops ------------------------------------------------------------------------------------

void ivon_accumulate_cuda(at::TensorList grads, at::TensorList grad_sums, at::TensorList curvature_sums,
                          at::IntArrayRef offsets, const at::Tensor& found_inf, int64_t seed, bool price, bool first,
                          bool last, const std::optional<at::Tensor>& seed_tensor) {
  check_ivon_accumulate(grads, grad_sums, curvature_sums, offsets);
  const auto device = grads[0].device();
  const DeviceGuard guard(device);
  const int64_t* seed_ptr = optional_scalar<int64_t>(seed_tensor, device, "ivon_accumulate", "seed_tensor");
  // the seed matters for Price's estimator only; a seed tensor is read by the kernel
  const auto key = price && !seed_ptr ? philox_key(seed) : std::pair<uint32_t, uint32_t>{};
  const PhiloxRoundKeys keys = philox_round_keys(key.first, key.second);
  // offsets only where they matter (the noise), so that the other rows' chunks stay vector-aligned
  auto rows = make_rows<3>({grads, grad_sums, curvature_sums}, price ? offsets : at::IntArrayRef{});
  const auto grad_base = make_relative<3>(rows, 1);
  const auto curvature_base = make_relative<3>(rows, 2);
  float* flag = device_scalar(found_inf, device, "found_inf");
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "ivon_accumulate", [&] {
    using A = acc_t<scalar_t>;
    const auto run = [&](auto gradsq) {
      const IvonAccumulateOp<scalar_t, A, decltype(gradsq)::value> op{
          first, last, keys, price ? seed_ptr : nullptr, flag, curvature_base};
      launch<3, A, 1>(rows, device, op, grad_base);
    };
    price ? run(std::false_type{}) : run(std::true_type{});
  });
}

void ivon_update_cuda(at::TensorList params, at::TensorList grad_sums, at::TensorList means, at::TensorList precisions,
                      at::TensorList momentums, at::TensorList curvature_sums, at::IntArrayRef offsets,
                      const at::Tensor& found_inf, const at::Tensor& inv_scale, const at::Tensor& step, double lr,
                      double beta1, double beta2, double ess, double weight_decay, double clip_radius, bool debias,
                      bool price, bool summed, int64_t splits, int64_t noise_seed, int64_t seed,
                      const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& noise_seed_tensor,
                      const std::optional<at::Tensor>& seed_tensor) {
  check_ivon_update(params, grad_sums, means, precisions, momentums, curvature_sums, offsets, step, splits);
  const auto device = params[0].device();
  const DeviceGuard guard(device);
  const bool bf16_state = stored_in_bf16(precisions);
  const bool noise = price && !summed;
  // offsets only where they matter (the noise, the rounding words), so that the other rows' chunks stay vector-aligned
  auto rows = make_rows<6>({params, grad_sums, means, precisions, momentums, curvature_sums},
                           noise || bf16_state ? offsets : at::IntArrayRef{});
  const auto base = make_relative<6>(rows, 5);
  const float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  const double* lr_ptr = optional_scalar<double>(lr_tensor, device, "ivon_update", "lr_tensor");
  const int64_t* noise_ptr = optional_scalar<int64_t>(noise_seed_tensor, device, "ivon_update", "noise_seed_tensor");
  const int64_t* seed_ptr = optional_scalar<int64_t>(seed_tensor, device, "ivon_update", "seed_tensor");
  // the seeds matter only for one sample's noise and with bfloat16 state; a seed tensor is read by the kernel
  const auto noise_key = noise && !noise_ptr ? philox_key(noise_seed) : std::pair<uint32_t, uint32_t>{};
  const auto rounding_key = bf16_state && !seed_ptr ? philox_key(seed) : std::pair<uint32_t, uint32_t>{};
  dispatch_bsam(params[0].scalar_type(), bf16_state, [&](auto param, auto stored) {
    using P = decltype(param);
    using S = decltype(stored);
    using A = acc_t<P>;
    // the step lives on the device: the debiasing is filled in there (IvonUpdateOp::prepared); here a placeholder
    const auto c = ivon_update_coeffs<A>(splits, lr, beta1, beta2, ess, weight_decay, clip_radius, 1.0);
    const auto run = [&](auto one_sample) {
      constexpr bool kOneSample = decltype(one_sample)::value;
      const IvonUpdateOp<P, A, S, kOneSample> op{
          c,
          price,
          summed,
          debias,
          beta1,
          step.data_ptr<double>(),
          flag,
          inv,
          false,
          A(1),
          philox_round_keys(noise_key.first, noise_key.second),
          philox_round_keys(rounding_key.first, rounding_key.second),
          lr_ptr,
          noise ? noise_ptr : nullptr,
          bf16_state ? seed_ptr : nullptr};
      launch<6, A, 5>(rows, device, op, base);
    };
    noise ? run(std::true_type{}) : run(std::false_type{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, SB_CUDA_KEY, m) {
  m.impl("ivon_accumulate", &ivon_accumulate_cuda);
  m.impl("ivon_update", &ivon_update_cuda);
}

}  // namespace sambayes
