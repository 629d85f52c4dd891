// The per-element math of every phase and the per-step constants it uses, shared by the CPU
// kernels (*_cpu.cpp) and the CUDA kernels (*_cuda.cu) so that both run the very same arithmetic.
//
// Each phase is one function of the element's loaded values; `acc_t` is the
// state dtype (float for float32/bfloat16/float16 parameters, double for
// float64 ones) and all math runs in it. Line for line with sambayes/backends/eager.py,
// the executable spec of ALGORITHM.md. The constants are computed in double and rounded
// to the math dtype once, as PyTorch rounds a Python float that meets a tensor.
#pragma once

#include <cstdint>
#if !defined(__CUDACC__)
#include <cmath>
#endif

#if defined(__CUDACC__)
#define SB_HD __host__ __device__ __forceinline__
#else
#define SB_HD inline __attribute__((always_inline))
#endif

namespace sambayes {

// ---- Philox4x32-10 + Box-Muller: z(seed, offset), exactly Triton's tl.randn ----------

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
};

#if defined(SAMBAYES_EMULATED)
namespace emulated {
void count_philox_call();  // the emulated CUDA tier counts the calls its kernels make
}
#endif

// The four words for counter (c0, c1, 0, 0) and key (k0, k1) = (seed lo, seed hi).
SB_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
#if defined(SAMBAYES_EMULATED)
  emulated::count_philox_call();
#endif
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint64_t q = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(q >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(q);
    c3 = static_cast<uint32_t>(p);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// The keys of the ten rounds for key (k0, k1), computed once: the CUDA kernels take them as kernel
// parameters, which the rounds read from the constant bank as operands (computed per call, they cost
// 15 to 20 instructions a call).
struct PhiloxRoundKeys {
  uint32_t k0[10], k1[10];
};

SB_HD PhiloxRoundKeys philox_round_keys(uint32_t k0, uint32_t k1) {
  PhiloxRoundKeys keys;
  for (int round = 0; round < 10; ++round) {
    keys.k0[round] = k0 + static_cast<uint32_t>(round) * kPhiloxKeyA;
    keys.k1[round] = k1 + static_cast<uint32_t>(round) * kPhiloxKeyB;
  }
  return keys;
}

// philox4x32_10 with the round keys given: the same words.
SB_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, const PhiloxRoundKeys& keys) {
#if defined(SAMBAYES_EMULATED)
  emulated::count_philox_call();
#endif
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint64_t q = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(q >> 32) ^ c1 ^ keys.k0[round];
    const uint32_t n2 = static_cast<uint32_t>(p >> 32) ^ c3 ^ keys.k1[round];
    c1 = static_cast<uint32_t>(q);
    c3 = static_cast<uint32_t>(p);
    c0 = n0;
    c2 = n2;
  }
  return {c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float: the word read as int32, bit-inverted when negative.
SB_HD float uint_to_uniform(uint32_t x) {
  const int32_t s = static_cast<int32_t>(x);
  const int32_t folded = s < 0 ? ~s : s;
  return static_cast<float>(folded) * 4.6566127342e-10f;
}

// −2·ln(x) for normal x > 0 (Box–Muller's squared radius), float32: Cephes logf (peak error about 1 ulp) with
// its coefficients times −2, exact, so that the result is −2 times Cephes's, bit for bit, without the product.
// Branch-free, so that compilers vectorize it; the same polynomial on CPU and GPU.
SB_HD float minus_two_log_f32(float x) {
  union {
    float f;
    uint32_t u;
  } bits = {x};
  // x = m·2^e with m in [sqrt(1/2), sqrt(2)): e is how many binades x's bits lie above sqrt(1/2)'s (0x3F3504F3),
  // m keeps x's mantissa bits; Cephes's m and e (its m < sqrt(1/2) folded by doubling), with integer operations
  const int32_t exponent = static_cast<int32_t>(bits.u - 0x3F3504F3u) >> 23;
  bits.u -= static_cast<uint32_t>(exponent) << 23;
  const float f = bits.f - 1.0f;
  const float e = static_cast<float>(exponent);
  const float f2 = f * f;
  // Cephes's coefficients, each times −2 (folded exactly by the compiler)
  float y = -2.0f * 7.0376836292e-2f;
  y = y * f + -2.0f * -1.1514610310e-1f;
  y = y * f + -2.0f * 1.1676998740e-1f;
  y = y * f + -2.0f * -1.2420140846e-1f;
  y = y * f + -2.0f * 1.4249322787e-1f;
  y = y * f + -2.0f * -1.6668057665e-1f;
  y = y * f + -2.0f * 2.0000714765e-1f;
  y = y * f + -2.0f * -2.4999993993e-1f;
  y = y * f + -2.0f * 3.3333331174e-1f;
  y = y * f * f2;
  y += -2.0f * -2.12194440e-4f * e;  // ln 2 split in two parts keeps e*ln2 exact
  y += f2;                            // −2 · −f²/2
  return (-2.0f * f + y) + -2.0f * 0.693359375f * e;
}

// x with its sign bit xor-ed with the top bit of `sign` (the other bits 0): -x or x.
SB_HD float with_sign_flipped(float x, uint32_t sign) {
  union {
    float f;
    uint32_t u;
  } bits = {x};
  bits.u ^= sign;
  return bits.f;
}

// sin(x) and cos(x) for 0 <= x < 2^21 (Box–Muller's angle is below 2π), float32, Cephes sinf/cosf (peak
// error about 1 ulp each): the quadrant k = x·2/π rounded to an integer by adding 1.5·2^23, which leaves k
// in the sum's low bits (no conversions); r = x − k·π/2 with π/2 in three parts (Cephes's π/4 ones doubled:
// exact products); then the sine and cosine polynomials. Cephes's r, polynomials and signs, bit for bit,
// but where x·2/π lies within rounding of a half-integer (Cephes picks the octant by truncation).
SB_HD void sincos_f32(float x, float& sin_x, float& cos_x) {
  union {
    float f;
    uint32_t u;
  } shifted = {x * 0.636619772367581343f + 12582912.0f};  // 2/π, 1.5·2^23
  const float k = shifted.f - 12582912.0f;
  const float r = ((x - k * 1.5703125f) - k * 4.837512969970703125e-4f) - k * 7.54978995489188216e-8f;
  const float r2 = r * r;
  const float sin_r = ((-1.9515295891e-4f * r2 + 8.3321608736e-3f) * r2 - 1.6666654611e-1f) * r2 * r + r;
  const float cos_r =
      ((2.443315711809948e-5f * r2 - 1.388731625493765e-3f) * r2 + 4.166664568298827e-2f) * r2 * r2 - 0.5f * r2 + 1.0f;
  // over quadrants 0 to 3: sin x is sin r, cos r, -sin r, -cos r; cos x is cos r, -sin r, -cos r, sin r;
  // the signs flipped on the bits (bit 1 of k for the sine, of k + 1 for the cosine): no compares
  const uint32_t quadrant = shifted.u;
  const bool swap = (quadrant & 1) != 0;
  sin_x = with_sign_flipped(swap ? cos_r : sin_r, (quadrant & 2) << 30);
  cos_x = with_sign_flipped(swap ? sin_r : cos_r, ((quadrant + 1) & 2) << 30);
}

// sqrt(x) and 1/sqrt(x), float32: on a GPU approximate, one instruction each as Triton's tl.sqrt and
// tl.math.rsqrt (PTX sqrt.approx.ftz / rsqrt.approx.ftz; the CUDA Math API's accuracy table: 1 and 2
// ulps), where an IEEE square root or division is a dozen instructions with a slow-path check; on the
// host (the CPU kernels, the emulated CUDA tier) sqrtf and 1 / sqrtf.
SB_HD float sqrt_approx(float x) {
#if defined(__CUDA_ARCH__)
  float root;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(root) : "f"(x));
  return root;
#else
  return sqrtf(x);
#endif
}
SB_HD float rsqrt_approx(float x) {
#if defined(__CUDA_ARCH__)
  float root;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(root) : "f"(x));
  return root;
#else
  return 1.0f / sqrtf(x);
#endif
}
SB_HD double sqrt_approx(double x) { return sqrt(x); }  // float64: correctly rounded everywhere

// x / y for a divisor of normal magnitude below 2^126 (a precision), float32: on a GPU approximate, PTX
// div.approx.f32 (__fdividef, within 2 ulps; Triton's tl.math.fdiv(approx=True)), five instructions where
// an IEEE division is ten with a slow-path branch; on the host, and in float64 everywhere, x / y.
SB_HD float div_approx(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fdividef(x, y);
#else
  return x / y;
#endif
}
SB_HD double div_approx(double x, double y) { return x / y; }

// Box-Muller on one pair of Philox words, all in float32 as tl.randn4x does: (r cos θ, r sin θ); the
// radius's square root approximate on a GPU, as tl.randn4x's.
SB_HD void normal_pair(uint32_t a, uint32_t b, float& first, float& second) {
  float u1 = uint_to_uniform(a);
  u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
  const float radius = sqrt_approx(minus_two_log_f32(u1));
  float sin_theta, cos_theta;
  sincos_f32(6.2831855f * uint_to_uniform(b), sin_theta, cos_theta);
  first = radius * cos_theta;
  second = radius * sin_theta;
}

// z[0..3] = tl.randn4x(seed, counter) from the four Philox words of that counter (ALGORITHM.md,
// "Noise", version 2): element i of a group takes z[i mod 4] of counter i div 4.
SB_HD void randn4x_from_words(const PhiloxWords& w, float* z) {
  normal_pair(w.w0, w.w1, z[0], z[1]);
  normal_pair(w.w2, w.w3, z[2], z[3]);
}

// z[0..3] = tl.randn4x(seed, counter) with counter = (c1 << 32) | c0.
SB_HD void philox_randn4x(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, float* z) {
  randn4x_from_words(philox4x32_10(c0, c1, k0, k1), z);
}

// True for a finite value: x - x is NaN for inf and NaN (IEEE; the builds do not assume finite math).
template <typename T>
SB_HD bool is_finite(T x) {
  return x - x == T(0);
}

// ---- the sums over sub-batches (bSAM, SAM) and over samples (IVON): fold_grads ------------------

// A pass's gradient g (in the state dtype A) joins the running sum: stage 0 (the first pass) sum = g, 1 sum += g,
// both zeroing .grad for the next pass; 2 (the last) .grad = sum + g, rounded once to P, for the update. Returns
// the value the found-inf check reads: the new sum, at the last stage as rounded into .grad (a float16 sum of
// finite gradients may overflow).
template <typename P, typename A>
SB_HD A fold_element(A g, A& sum, P& grad, int stage) {
  const A total = stage == 0 ? g : sum + g;
  if (stage == 2) {
    grad = static_cast<P>(total);
    return static_cast<A>(grad);
  }
  sum = total;
  grad = P(0);
  return total;
}

// ---- bSAM ------------------------------------------------------------------------------

template <typename T>
SB_HD T sqrt_acc(T x);
template <>
SB_HD float sqrt_acc<float>(float x) {
  return sqrtf(x);
}
template <>
SB_HD double sqrt_acc<double>(double x) {
  return sqrt(x);
}

template <typename T>
SB_HD T abs_acc(T x) {
  return x < T(0) ? -x : x;
}

// θ = m + z / sqrt(N·s): a sample of the posterior.
template <typename T>
SB_HD T bsam_sample_param(T mean, T precision, T z, T num_data) {
  return mean + z / sqrt_acc<T>(num_data * precision);
}

// The same as z·rsqrt(N·s) with an approximate reciprocal square root in float32 (rsqrt_approx: within
// 2 ulps of z / sqrt(N·s) on a GPU, 1.5 on the host), correctly rounded in float64: the CUDA kernels'.
template <typename T>
SB_HD T bsam_sample_param_fast(T mean, T precision, T z, T num_data) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return mean + z * rsqrt_approx(num_data * precision);
  } else {
    return bsam_sample_param<T>(mean, precision, z, num_data);
  }
}

// θ = m + ρ·g/s (from the mean); a = sqrt(s)·|g|, the curvature estimate, summed over sub-batches.
template <typename T>
SB_HD T bsam_perturb_param(T grad, T mean, T precision, T rho) {
  return mean + rho * grad / precision;
}
template <typename T>
SB_HD T bsam_curvature(T grad, T precision) {
  return sqrt_acc<T>(precision) * abs_acc<T>(grad);
}

template <typename T>
struct BsamUpdateCoeffs {
  T splits, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, damping, inv_splits;
};

template <typename T>
SB_HD BsamUpdateCoeffs<T> bsam_update_coeffs(int64_t splits, double lr, double beta1, double beta2,
                                             double weight_decay, double damping) {
  return {static_cast<T>(splits),       static_cast<T>(lr),      static_cast<T>(beta1),
          static_cast<T>(1 - beta1),    static_cast<T>(beta2),   static_cast<T>(1 - beta2),
          static_cast<T>(weight_decay), static_cast<T>(damping), static_cast<T>(1.0 / splits)};
}

// momentum, mean (with the precision before this step's update), precision; θ = m after.
// kReciprocal: the sums averaged as x·(1/k) (the CUDA kernels: one multiply where an IEEE division costs a
// dozen instructions; the same bits for k a power of two, within an ulp of x / k otherwise), else x / k.
template <typename T, bool kReciprocal = false>
SB_HD void bsam_update_element(T grad_sum, T curvature_sum, T& mean, T& precision, T& momentum,
                               const BsamUpdateCoeffs<T>& c) {
  const T h = kReciprocal ? grad_sum * c.inv_splits : grad_sum / c.splits;
  const T a = kReciprocal ? curvature_sum * c.inv_splits : curvature_sum / c.splits;
  // momentum
  momentum = c.beta1 * momentum + c.one_minus_beta1 * (h + c.weight_decay * mean);
  // mean step, divided by the old precision
  mean = mean - c.lr * momentum / precision;
  // precision
  precision = c.beta2 * precision + c.one_minus_beta2 * (a + c.weight_decay + c.damping);
}

// ---- bfloat16 precision and momentum: stochastic rounding (BSAM(state_dtype=torch.bfloat16)) ---
// The element's 16 random bits: word i mod 4 of Philox4x32-10 at counter i div 4 under the step's
// rounding key (sambayes/_philox.py, "Stochastic rounding"); the precision takes the word's high
// half, the momentum its low half.
SB_HD uint32_t precision_rounding_bits(uint32_t word) { return word >> 16; }
SB_HD uint32_t momentum_rounding_bits(uint32_t word) { return word & 0xFFFFu; }

// The bfloat16 bits of x rounded stochastically with 16 random bits r: x's float32 bits plus r,
// truncated. x rounds away from zero with probability (dropped bits) / 2^16, so the stored value
// equals x in expectation, where round-to-nearest would drop every increment below half an ulp.
// inf stays inf (its low bits are zero: the sum keeps its top half); NaN becomes the quiet NaN 0x7FC0, as the
// sum could carry out of its payload (branch-free, so that the loops vectorize).
SB_HD uint16_t round_bf16_stochastic(float x, uint32_t r) {
  union {
    float f;
    uint32_t u;
  } bits = {x};
  const uint32_t u = bits.u;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : (u + (r & 0xFFFFu)) >> 16);
}

// ---- SAM ------------------------------------------------------------------------------

// (T·g)², T = |w| if adaptive else 1: one term of the squared global norm.
template <typename T>
SB_HD T sam_sq_term(T grad, T weight, bool adaptive) {
  const T tg = adaptive ? grad * abs_acc<T>(weight) : grad;
  return tg * tg;
}

// w' = w + scale·T²·g with scale = ρ/‖T·g‖₂.
template <typename T>
SB_HD T sam_perturb_param(T grad, T weight, T scale, bool adaptive) {
  return weight + scale * (adaptive ? weight * weight : T(1)) * grad;
}

template <typename T>
struct SgdCoeffs {
  T splits, lr, momentum, weight_decay;
  bool nesterov;
};

template <typename T>
SB_HD SgdCoeffs<T> sgd_coeffs(int64_t splits, double lr, double momentum, double weight_decay, bool nesterov) {
  return {static_cast<T>(splits), static_cast<T>(lr), static_cast<T>(momentum), static_cast<T>(weight_decay), nesterov};
}

// heavy ball without dampening on the mean perturbed-point gradient.
template <typename T>
SB_HD void sam_sgd_element(T grad_sum, T& weight, T& buf, const SgdCoeffs<T>& c) {
  const T d = grad_sum / c.splits + c.weight_decay * weight;
  buf = c.momentum * buf + d;
  // nesterov looks ahead along the new buffer
  const T direction = c.nesterov ? d + c.momentum * buf : buf;
  weight = weight - c.lr * direction;
}

template <typename T>
struct AdamwCoeffs {
  T splits, decay_factor, beta1, one_minus_beta1, beta2, one_minus_beta2, bias2, eps, step_size;
};

// a·b rounded to double: nvcc would fuse the product into a following subtraction (an FMA), the host does not
SB_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// The decoupled decay 1 − lr·δ; the bias corrections at step t (updates taken, counting this one):
// 1 − β2^t, and the step size lr / (1 − β1^t). The CUDA kernels compute the last two on the device
// (the step count lives there), and the first too when lr is a tensor.
SB_HD double adamw_decay_factor(double lr, double weight_decay) { return 1 - mul_rn(lr, weight_decay); }
SB_HD double adamw_bias2(double beta2, double step) { return 1 - pow(beta2, step); }
SB_HD double adamw_step_size(double lr, double beta1, double step) { return lr / (1 - pow(beta1, step)); }

template <typename T>
SB_HD AdamwCoeffs<T> adamw_coeffs(int64_t splits, double lr, double beta1, double beta2, double eps,
                                  double weight_decay, double step) {
  return {static_cast<T>(splits),
          static_cast<T>(adamw_decay_factor(lr, weight_decay)),
          static_cast<T>(beta1),
          static_cast<T>(1 - beta1),
          static_cast<T>(beta2),
          static_cast<T>(1 - beta2),
          static_cast<T>(adamw_bias2(beta2, step)),
          static_cast<T>(eps),
          static_cast<T>(adamw_step_size(lr, beta1, step))};
}

// AdamW with decoupled weight decay; step_size = lr / (1 - beta1^step).
template <typename T>
SB_HD void sam_adamw_element(T grad_sum, T& weight, T& momentum, T& variance, const AdamwCoeffs<T>& c) {
  const T h = grad_sum / c.splits;
  weight = weight * c.decay_factor;
  momentum = c.beta1 * momentum + c.one_minus_beta1 * h;
  variance = c.beta2 * variance + c.one_minus_beta2 * h * h;
  const T denom = sqrt_acc<T>(variance / c.bias2) + c.eps;
  weight = weight - c.step_size * momentum / denom;
}

// ---- IVON (docs/ivon.md) -----------------------------------------------------------------------

// The curvature estimate of one sample from its gradient g: z·g by Price's theorem (z its noise), or g².
template <typename T>
SB_HD T ivon_curvature(T grad, T z, bool price) {
  return price ? z * grad : grad * grad;
}

// The mean curvature estimate over k samples from its sum, unscaled (1/scale of a GradScaler; gradsq's
// squares twice); averaged as x·(1/k).
template <typename T>
SB_HD T ivon_mean_curvature(T curvature_sum, T inv_scale, T inv_splits, bool price) {
  return (price ? curvature_sum * inv_scale : curvature_sum * inv_scale * inv_scale) * inv_splits;
}

template <typename T>
struct IvonUpdateCoeffs {
  T inv_splits, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, half_one_minus_beta2_squared, ess, weight_decay,
      clip_radius, inv_bias1;
};

// 1 − β1^t, the momentum's debiasing at step t (updates taken, counting this one); 1 without debiasing. The
// CUDA kernels compute it on the device, where the step count lives.
SB_HD double ivon_bias1(double beta1, double step, bool debias) { return debias ? 1 - pow(beta1, step) : 1.0; }

template <typename T>
SB_HD IvonUpdateCoeffs<T> ivon_update_coeffs(int64_t splits, double lr, double beta1, double beta2, double ess,
                                             double weight_decay, double clip_radius, double bias1) {
  return {static_cast<T>(1.0 / splits),
          static_cast<T>(lr),
          static_cast<T>(beta1),
          static_cast<T>(1 - beta1),
          static_cast<T>(beta2),
          static_cast<T>(1 - beta2),
          static_cast<T>(0.5 * (1 - beta2) * (1 - beta2)),
          static_cast<T>(ess),
          static_cast<T>(weight_decay),
          static_cast<T>(clip_radius),
          static_cast<T>(1.0 / bias1)};
}

// momentum, Hessian h = s − δ, precision s = h + δ, then the mean with the new precision, clipped; g and c
// are the means over the samples of the gradient and of the curvature estimate, unscaled. The debiasing as a
// product with 1/(1 − β1^t) (within an ulp); the square root and the divisions by the precision approximate on
// a GPU in float32 (sqrt_approx, div_approx: within 1 and 2 ulps; IEEE, with the divisions by k and by 1 − β1^t,
// they cost 36 of the one-sample update's 157 instructions per element on sm_90), correctly rounded on the host.
template <typename T>
SB_HD void ivon_update_element(T g, T c, T& mean, T& precision, T& momentum, const IvonUpdateCoeffs<T>& k,
                               bool price) {
  T h = precision - k.weight_decay;
  // the expected Hessian of the loss: sqrt(ess·s)·E[z·g], or ess·E[g²]
  const T f = price ? sqrt_approx(k.ess * precision) * c : k.ess * c;
  // momentum
  momentum = k.beta1 * momentum + k.one_minus_beta1 * g;
  // Hessian, with the correction that keeps it positive
  const T gap = h - f;
  h = k.beta2 * h + k.one_minus_beta2 * f + div_approx(k.half_one_minus_beta2_squared * (gap * gap), precision);
  precision = h + k.weight_decay;
  // mean step, with the new precision, clipped
  const T direction = div_approx(momentum * k.inv_bias1 + k.weight_decay * mean, precision);
  mean = mean - k.lr * (direction < -k.clip_radius ? -k.clip_radius : direction > k.clip_radius ? k.clip_radius : direction);
}

}  // namespace sambayes
