// bSAM's CUDA ops: sample, perturb, update (and the noise test op philox_randn_). bSAM's precision
// and momentum may be stored in bfloat16 over float32 state (BSAM(state_dtype=torch.bfloat16)): read
// widened to float32, written with stochastic rounding. Float32 math for float32/bfloat16/float16
// parameters. The perturbation unscales the gradient and raises the step's found-inf flag on inf/NaN;
// the update leaves the state alone when the flag is set.
#include "multi_tensor_cuda.cuh"

namespace sambayes {
namespace {

// ---- per-phase element ops (see multi_tensor_cuda.cuh) ---------------------------------------
// The seed or lr given as a tensor (seed_ptr, lr_ptr non-null: CUDA-graph capture) is read in prepared(),
// so that each replay reads the current value. S is the stored dtype of the precision and momentum: A, or
// c10::BFloat16 over float32 A.

// float32 params: 12 B/param with float32 precision, 10 B with bfloat16 (reads m 4, s 4 or 2; writes θ 4).
// One Philox call and two Box-Muller transforms per four elements (the kernel's quads). kSeedTensor: the key
// is read from seed_ptr (CUDA-graph capture), in an instantiation of its own, as the other takes the ten
// rounds' keys as kernel parameters (operands from the constant bank).
template <typename P, typename A, typename S, bool kSeedTensor = false>
struct SampleOp {
  static constexpr bool kNoiseQuads = true;
  A num_data;
  PhiloxRoundKeys keys;  // kSeedTensor: read in prepared() (read_philox_round_keys), once per thread
  const int64_t* seed_ptr;
  __device__ SampleOp prepared() const {
    SampleOp op = *this;
    if constexpr (kSeedTensor) op.keys = read_philox_round_keys(seed_ptr);
    return op;
  }
  // z of a quad: tl.randn4x(seed, call), call = (offset + q) / 4 for the quad that starts at element q
  __device__ Pack<float, 4> draw(uint64_t call) const { return noise_quad(call, keys); }
  template <int W, typename Lanes>
  __device__ void run(const TensorRow<3>& row, int64_t i, const Lanes& lanes) const {
    const Pack<float, W> z = lanes();
    const auto mean = load<A, W>(row.ptr[1], i);
    const auto precision = load_widened<S, A, W>(row.ptr[2], i);
    Pack<A, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      param.v[j] = bsam_sample_param_fast<A>(mean.v[j], precision.v[j], static_cast<A>(z.v[j]), num_data);
    }
    store_rounded<P>(row.ptr[0], i, param);
  }
};

// float32 params: 24 B/param with float32 precision, 22 B with bfloat16
// (reads g 4, m 4, s 4 or 2, a 4 when accumulating; writes θ 4, a 4, zeroed g 4).
template <typename P, typename A, typename S>
struct BsamPerturbOp {
  A rho;
  bool accumulate;
  float* found_inf;
  const float* inv_scale_ptr;
  A inv_scale;
  __device__ BsamPerturbOp prepared() const {
    BsamPerturbOp op = *this;
    op.inv_scale = static_cast<A>(*inv_scale_ptr);
    return op;
  }
  template <int W>
  __device__ void run(const TensorRow<5>& row, int64_t i) const {
    const auto grad = load_widened<P, A, W>(row.ptr[1], i);
    const auto mean = load<A, W>(row.ptr[2], i);
    const auto precision = load_widened<S, A, W>(row.ptr[3], i);
    Pack<A, W> curvature_sum;
    if (accumulate) curvature_sum = load<A, W>(row.ptr[4], i);
    Pack<A, W> param;
    bool bad = false;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A g = grad.v[j] * inv_scale;
      bad |= !is_finite(g);
      param.v[j] = bsam_perturb_param<A>(g, mean.v[j], precision.v[j], rho);
      const A a = bsam_curvature<A>(g, precision.v[j]);
      curvature_sum.v[j] = accumulate ? curvature_sum.v[j] + a : a;
    }
    if (bad) raise_flag(found_inf);
    store_rounded<P>(row.ptr[0], i, param);
    store<A, W>(row.ptr[4], i, curvature_sum);
    store_zero<P, W>(row.ptr[1], i);
  }
};

// float32 params: 40 B/param with float32 state, 32 B with bfloat16 precision and momentum (reads h 4, m 4,
// s 4 or 2, g_m 4 or 2, a 4; writes g_m 4 or 2, m 4, s 4 or 2, θ 4, zeroed h 4). kSeedTensor: the key is read
// from seed_ptr, in an instantiation of its own, as a key held in registers rather than kernel parameters costs
// the bfloat16 update 4 to 8 registers on sm_80 (64: 4 blocks an SM, more: 3). bfloat16 state is rounded with
// the words of one Philox call per four elements (the kernel's quads).
template <typename P, typename A, typename S, bool kSeedTensor = false>
struct BsamUpdateOp {
  static constexpr bool kNoiseQuads = !std::is_same_v<S, A>;
  BsamUpdateCoeffs<A> c;
  const float* found_inf;
  const float* inv_scale_ptr;
  bool skip;
  A inv_scale;
  PhiloxRoundKeys keys;  // the stochastic-rounding key's rounds (bfloat16 S only): kernel parameters, or
                        // computed in prepared() from the seed tensor (kSeedTensor)
  const double* lr_ptr;
  const int64_t* seed_ptr;
  __device__ BsamUpdateOp prepared() const {
    BsamUpdateOp op = *this;
    op.skip = *found_inf != 0.0f;
    op.inv_scale = static_cast<A>(*inv_scale_ptr);
    if (lr_ptr) op.c.lr = static_cast<A>(*lr_ptr);
    if constexpr (kSeedTensor) op.keys = read_philox_round_keys(seed_ptr);
    return op;
  }
  // the rounding words of a quad: Philox4x32-10 at call = (offset + q) / 4 for the quad that starts at q
  __device__ Pack<uint32_t, 4> draw(uint64_t call) const {
    if (skip) return {};  // a skipped step stores no state
    return words_quad(call, keys);
  }
  template <int W>
  __device__ void run(const TensorRow<6>& row, int64_t i) const {
    run<W>(row, i, [] { return Pack<uint32_t, W>{}; });
  }
  // lanes(): the elements' rounding words (bfloat16 S only), drawn after the math
  template <int W, typename Lanes>
  __device__ void run(const TensorRow<6>& row, int64_t i, const Lanes& lanes) const {
    auto mean = load<A, W>(row.ptr[2], i);
    if (!skip) {
      const auto grad = load_widened<P, A, W>(row.ptr[1], i);
      auto precision = load_widened<S, A, W>(row.ptr[3], i);
      auto momentum = load_widened<S, A, W>(row.ptr[4], i);
      const auto curvature_sum = load<A, W>(row.ptr[5], i);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        bsam_update_element<A, true>(grad.v[j] * inv_scale, curvature_sum.v[j], mean.v[j],
                                     precision.v[j], momentum.v[j], c);
      }
      store_posterior<S>(row, i, mean, precision, momentum, lanes);
    }
    store_rounded<P>(row.ptr[0], i, mean);
    store_zero<P, W>(row.ptr[1], i);
  }
};

// ---- the ops ------------------------------------------------------------------------------------

void bsam_sample_cuda(at::TensorList params, at::TensorList means, at::TensorList precisions,
                      at::IntArrayRef offsets, double num_data, int64_t seed,
                      const std::optional<at::Tensor>& seed_tensor) {
  check_bsam_sample(params, means, precisions, offsets);
  const DeviceGuard guard(params[0].device());
  const int64_t* seed_ptr = optional_scalar<int64_t>(seed_tensor, params[0].device(), "bsam_sample", "seed_tensor");
  const auto key = seed_ptr ? std::pair<uint32_t, uint32_t>{} : philox_key(seed);  // a seed tensor: read by the kernel
  const auto rows = make_rows<3>({params, means, precisions}, offsets);
  const auto keys = philox_round_keys(key.first, key.second);
  dispatch_bsam(params[0].scalar_type(), stored_in_bf16(precisions), [&](auto param, auto stored) {
    using P = decltype(param);
    using A = acc_t<P>;
    using S = decltype(stored);
    if (seed_ptr) {
      launch<3, A>(rows, params[0].device(), SampleOp<P, A, S, true>{static_cast<A>(num_data), {}, seed_ptr});
    } else {
      launch<3, A>(rows, params[0].device(), SampleOp<P, A, S>{static_cast<A>(num_data), keys, nullptr});
    }
  });
}

void bsam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList means, at::TensorList precisions,
                       at::TensorList curvature_sums, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                       double rho, bool accumulate) {
  check_group("bsam_perturb", params, {{"grads", grads}}, {{"means", means}, {"curvature_sums", curvature_sums}},
              {{"precisions", precisions}});
  const auto device = params[0].device();
  const DeviceGuard guard(device);
  auto rows = make_rows<5>({params, grads, means, precisions, curvature_sums});
  const auto base = make_relative<5>(rows, 4);
  float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  dispatch_bsam(params[0].scalar_type(), stored_in_bf16(precisions), [&](auto param, auto stored) {
    using P = decltype(param);
    using A = acc_t<P>;
    launch<5, A, 4>(rows, device,
                    BsamPerturbOp<P, A, decltype(stored)>{static_cast<A>(rho), accumulate, flag, inv, A(1)}, base);
  });
}

void bsam_update_cuda(at::TensorList params, at::TensorList grad_sums, at::TensorList means, at::TensorList precisions,
                      at::TensorList momentums, at::TensorList curvature_sums, at::IntArrayRef offsets,
                      const at::Tensor& found_inf, const at::Tensor& inv_scale, double lr, double beta1, double beta2,
                      double weight_decay, double damping, int64_t splits, int64_t seed,
                      const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& seed_tensor) {
  check_bsam_update(params, grad_sums, means, precisions, momentums, curvature_sums, offsets, splits);
  const auto device = params[0].device();
  const DeviceGuard guard(device);
  const bool bf16_state = stored_in_bf16(precisions);
  // offsets only where they matter (the rounding words), so that the other rows' chunks stay vector-aligned
  auto rows = make_rows<6>({params, grad_sums, means, precisions, momentums, curvature_sums},
                           bf16_state ? offsets : at::IntArrayRef{});
  const auto base = make_relative<6>(rows, 5);
  const float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  const double* lr_ptr = optional_scalar<double>(lr_tensor, device, "bsam_update", "lr_tensor");
  const int64_t* seed_ptr = optional_scalar<int64_t>(seed_tensor, device, "bsam_update", "seed_tensor");
  // the seed matters only with bfloat16 state; a seed tensor is read by the kernel
  const auto key = bf16_state && !seed_ptr ? philox_key(seed) : std::pair<uint32_t, uint32_t>{};
  dispatch_bsam(params[0].scalar_type(), bf16_state, [&](auto param, auto stored) {
    using P = decltype(param);
    using S = decltype(stored);
    using A = acc_t<P>;
    const auto c = bsam_update_coeffs<A>(splits, lr, beta1, beta2, weight_decay, damping);
    const auto run = [&](auto seed_tensor) {
      using Op = BsamUpdateOp<P, A, S, decltype(seed_tensor)::value>;
      launch<6, A, 5>(rows, device,
                      Op{c, flag, inv, false, A(1), philox_round_keys(key.first, key.second), lr_ptr, seed_ptr},
                      base);
    };
    if constexpr (!std::is_same_v<S, A>) {
      if (seed_ptr) return run(std::true_type{});
    }
    run(std::false_type{});
  });
}

// ---- the noise as a test op: z(seed, start + i) ----------------------------------------------

__global__ void philox_randn_kernel(float* out, int64_t n, uint64_t start, uint32_t k0, uint32_t k1) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t index = start + static_cast<uint64_t>(i);
    float lanes[4];
    philox_randn4x(static_cast<uint32_t>(index / 4), static_cast<uint32_t>((index / 4) >> 32), k0, k1, lanes);
    out[i] = lane(lanes, index % 4);
  }
}

void philox_randn_cuda(const at::Tensor& out, int64_t seed, int64_t start) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "philox_randn_: out must be contiguous float32");
  TORCH_CHECK(start >= 0, "philox_randn_: start must be >= 0, got ", start);
  if (out.numel() == 0) return;
  const DeviceGuard guard(out.device());
  const auto key = philox_key(seed);
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, 65536);
  launch_kernel(philox_randn_kernel, static_cast<unsigned>(blocks), kThreads, current_stream(out.device()),
                out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(start), key.first, key.second);
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, SB_CUDA_KEY, m) {
  m.impl("bsam_sample", &bsam_sample_cuda);
  m.impl("bsam_perturb", &bsam_perturb_cuda);
  m.impl("bsam_update", &bsam_update_cuda);
  m.impl("philox_randn_", &philox_randn_cuda);
}

}  // namespace sambayes
