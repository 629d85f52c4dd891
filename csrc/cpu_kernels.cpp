// The CPU kernels: one pass per phase over all tensors of a bucket, chunks spread over
// threads with at::parallel_for, and the per-element math of sambayes_math.h in plain
// loops over raw pointers that the compiler vectorizes.
//
// The loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) with
// target_clones; the dynamic loader picks the best for the machine at load time.
// Phases that read a gradient unscale it (GradScaler), check it for inf/NaN (the step's
// found-inf flag) and, where they consume it, zero it for the next backward pass; the
// updates read the flag and leave the state alone on a skipped step.
// bSAM's precision and momentum are stored in the state dtype or, with float32 state, in
// bfloat16 (BSAM(state_dtype=torch.bfloat16)): read and widened exactly, and written back by
// the update with stochastic rounding, whose random bits come from a Philox stream like the noise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "multi_tensor.h"
#include "sambayes_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SB_CLONES
#endif

namespace sambayes {
namespace {

constexpr int64_t kCpuChunk = 1 << 15;    // elements per task: a few hundred KiB over all arrays, cache-sized
constexpr int64_t kNoiseBlock = 1 << 10;  // z drawn into an L1-resident buffer this many at a time

// ---- noise (ALGORITHM.md, "Noise", version 2) ---------------------------------------------

constexpr int64_t kCounterBlock = 256;  // Philox calls drawn at a time into L1 (4 normals each)

// The four Philox words for counters (c0 + i, c1, 0, 0), i < n: the portable loop, vectorized by the compiler.
SB_CLONES void philox_block(uint32_t* __restrict w0, uint32_t* __restrict w1, uint32_t* __restrict w2,
                            uint32_t* __restrict w3, int64_t n, uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  for (int64_t i = 0; i < n; ++i) {
    const PhiloxWords w = philox4x32_10(c0 + static_cast<uint32_t>(i), c1, k0, k1);
    w0[i] = w.w0;
    w1[i] = w.w1;
    w2[i] = w.w2;
    w3[i] = w.w3;
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define SB_HAVE_AVX512_PHILOX 1

// (hi, lo) of a * c in 32-bit lanes: even and odd lanes through two 32x32->64 multiplies.
__attribute__((target("avx512f"), always_inline)) inline void mulhilo_avx512(__m512i a, __m512i c, __m512i& hi,
                                                                             __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, c);
  const __m512i odd = _mm512_mul_epu32(a, _mm512_srli_epi64(c, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// philox_block in AVX-512 intrinsics, 16 counters at a time: twice the compiler's speed, which
// widens to 64-bit lanes. Same words as philox4x32_10 (checked by the noise tests).
__attribute__((target("avx512f"))) void philox_block_avx512(uint32_t* __restrict w0, uint32_t* __restrict w1,
                                                            uint32_t* __restrict w2, uint32_t* __restrict w3,
                                                            int64_t n, uint32_t c0, uint32_t c1, uint32_t k0,
                                                            uint32_t k1) {
  const __m512i round_a = _mm512_set1_epi64(kPhiloxRoundA);
  const __m512i round_b = _mm512_set1_epi64(kPhiloxRoundB);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c0 + static_cast<uint32_t>(i))), lane);
    __m512i x1 = _mm512_set1_epi32(static_cast<int>(c1));
    __m512i x2 = _mm512_setzero_si512();
    __m512i x3 = _mm512_setzero_si512();
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      __m512i p_hi, p_lo, q_hi, q_lo;
      mulhilo_avx512(round_a, x0, p_hi, p_lo);
      mulhilo_avx512(round_b, x2, q_hi, q_lo);
      x0 = _mm512_xor_si512(_mm512_xor_si512(q_hi, x1), _mm512_set1_epi32(static_cast<int>(key0)));
      x2 = _mm512_xor_si512(_mm512_xor_si512(p_hi, x3), _mm512_set1_epi32(static_cast<int>(key1)));
      x1 = q_lo;
      x3 = p_lo;
      key0 += kPhiloxKeyA;
      key1 += kPhiloxKeyB;
    }
    _mm512_storeu_si512(w0 + i, x0);
    _mm512_storeu_si512(w1 + i, x1);
    _mm512_storeu_si512(w2 + i, x2);
    _mm512_storeu_si512(w3 + i, x3);
  }
  philox_block(w0 + i, w1 + i, w2 + i, w3 + i, n - i, c0 + static_cast<uint32_t>(i), c1, k0, k1);
}
#endif

// Box-Muller on n calls' words: out[4i .. 4i + 3] = the four normals of call i. The transforms
// write four contiguous lanes (so that they vectorize), then the lanes are interleaved.
SB_CLONES void box_muller_block(float* __restrict out, const uint32_t* __restrict w0, const uint32_t* __restrict w1,
                                const uint32_t* __restrict w2, const uint32_t* __restrict w3, int64_t n) {
  alignas(64) float z0[kCounterBlock], z1[kCounterBlock], z2[kCounterBlock], z3[kCounterBlock];
  for (int64_t i = 0; i < n; ++i) normal_pair(w0[i], w1[i], z0[i], z1[i]);
  for (int64_t i = 0; i < n; ++i) normal_pair(w2[i], w3[i], z2[i], z3[i]);
  for (int64_t i = 0; i < n; ++i) {
    out[4 * i] = z0[i];
    out[4 * i + 1] = z1[i];
    out[4 * i + 2] = z2[i];
    out[4 * i + 3] = z3[i];
  }
}

// The four Philox words of counters counter .. counter + n - 1 (the counter's low word must not wrap):
// the AVX-512 loop where the CPU has it.
void philox_words_block(uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3, int64_t n, uint64_t counter,
                        uint32_t k0, uint32_t k1) {
  const uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
#ifdef SB_HAVE_AVX512_PHILOX
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return philox_block_avx512(w0, w1, w2, w3, n, c0, c1, k0, k1);
#endif
  philox_block(w0, w1, w2, w3, n, c0, c1, k0, k1);
}

// out[0 .. 4n) = the normals of counters counter .. counter + n - 1 (the counter's low word must not wrap).
void randn4x_block(float* out, int64_t n, uint64_t counter, uint32_t k0, uint32_t k1) {
  alignas(64) uint32_t w0[kCounterBlock], w1[kCounterBlock], w2[kCounterBlock], w3[kCounterBlock];
  philox_words_block(w0, w1, w2, w3, n, counter, k0, k1);
  box_muller_block(out, w0, w1, w2, w3, n);
}

// out[0 .. 4n) = the Philox words of counters counter .. counter + n - 1, the four of each call in a row.
void words4x_block(uint32_t* out, int64_t n, uint64_t counter, uint32_t k0, uint32_t k1) {
  alignas(64) uint32_t w0[kCounterBlock], w1[kCounterBlock], w2[kCounterBlock], w3[kCounterBlock];
  philox_words_block(w0, w1, w2, w3, n, counter, k0, k1);
  for (int64_t i = 0; i < n; ++i) {
    out[4 * i] = w0[i];
    out[4 * i + 1] = w1[i];
    out[4 * i + 2] = w2[i];
    out[4 * i + 3] = w3[i];
  }
}

// out[i] = lane (start + i) mod 4 of call (start + i) div 4, for i < n (any start: lanes are picked from
// whole calls); block(values, calls, counter) writes the four lanes of each of `calls` consecutive counters.
template <typename T, typename Block>
void lanes_range(T* out, int64_t start, int64_t n, Block&& block) {
  alignas(64) T values[4 * kCounterBlock];
  int64_t i = 0;
  while (i < n) {
    const uint64_t index = static_cast<uint64_t>(start + i);
    const uint64_t counter = index / 4;
    const int64_t skip = static_cast<int64_t>(index % 4);
    // whole calls, at most kCounterBlock, never across a wrap of the counter's low word
    const int64_t calls_needed = (skip + (n - i) + 3) / 4;
    const int64_t before_wrap = static_cast<int64_t>((uint64_t{1} << 32) - (counter & 0xFFFFFFFFu));
    const int64_t calls = std::min({calls_needed, kCounterBlock, before_wrap});
    block(values, calls, counter);
    const int64_t take = std::min(n - i, 4 * calls - skip);
    std::copy(values + skip, values + skip + take, out + i);
    i += take;
  }
}

// out[i] = z of noise index start + i, for i < n.
void randn_range(float* out, int64_t start, int64_t n, uint32_t k0, uint32_t k1) {
  lanes_range(out, start, n,
              [&](float* z, int64_t calls, uint64_t counter) { randn4x_block(z, calls, counter, k0, k1); });
}

// out[i] = the stochastic-rounding word of element start + i, for i < n: word (start + i) mod 4 of
// Philox4x32-10 at counter (start + i) div 4 (sambayes/_philox.py, "Stochastic rounding").
void rounding_words(uint32_t* out, int64_t start, int64_t n, uint32_t k0, uint32_t k1) {
  lanes_range(out, start, n,
              [&](uint32_t* words, int64_t calls, uint64_t counter) { words4x_block(words, calls, counter, k0, k1); });
}

// ---- per-phase loops (inlined into the clones below) --------------------------------------
// `bad` collects "some value read was inf or NaN" as an integer or-reduction, which the compiler
// vectorizes (a bool one it does not). bSAM's loops read the precision and momentum as S, the
// stored dtype: A itself, or c10::BFloat16 (widened to float exactly).

// float32 params: 12 B/param with float32 precision, 10 B with bfloat16 (reads m 4, s 4 or 2; writes θ 4).
template <typename P, typename A, typename S>
SB_HD void sample_loop(P* __restrict param, const A* __restrict mean, const S* __restrict precision,
                       const float* __restrict z, int64_t n, A num_data) {
  for (int64_t i = 0; i < n; ++i) {
    param[i] = static_cast<P>(
        bsam_sample_param<A>(mean[i], static_cast<A>(precision[i]), static_cast<A>(z[i]), num_data));
  }
}

// float32 params: 24 B/param with float32 precision, 22 B with bfloat16 (reads g 4, m 4, s 4 or 2;
// writes θ 4, a 4, zeroed g 4), 4 B more when accumulating (reads a).
template <bool Accumulate, typename P, typename A, typename S>
SB_HD bool bsam_perturb_loop(P* __restrict param, P* __restrict grad, const A* __restrict mean,
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

template <typename P>
SB_HD bool find_nonfinite_loop(const P* __restrict grad, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !is_finite(static_cast<acc_t<P>>(grad[i]));
  return bad != 0;
}

// Stage 0: sum = g, g = 0; stage 1: sum += g, g = 0; stage 2 (last): g = sum + g. Flags a
// non-finite sum: at the last stage as rounded into .grad (a float16 sum of finite values may overflow).
template <int Stage, typename P, typename A>
SB_HD bool fold_loop(P* __restrict grad, A* __restrict grad_sum, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const A g = static_cast<A>(grad[i]);
    const A total = Stage == 0 ? g : grad_sum[i] + g;
    if (Stage == 2) {
      const P rounded = static_cast<P>(total);
      bad |= !is_finite(static_cast<A>(rounded));
      grad[i] = rounded;
    } else {
      bad |= !is_finite(total);
      grad_sum[i] = total;
      grad[i] = P(0);
    }
  }
  return bad != 0;
}

// float32 params: 40 B/param with float32 state, 32 B with bfloat16 precision and momentum (reads h 4, m 4,
// s 4 or 2, g_m 4 or 2, a 4; writes g_m 4 or 2, m 4, s 4 or 2, θ 4, zeroed h 4). `words`: the elements'
// stochastic-rounding words when S is bfloat16 (rounding_words), unused otherwise.
template <typename P, typename A, typename S>
SB_HD void bsam_update_loop(P* __restrict param, P* __restrict grad, A* __restrict mean, S* __restrict precision,
                            S* __restrict momentum, const A* __restrict curvature_sum, int64_t n,
                            const BsamUpdateCoeffs<A>& c, A inv_scale, const uint32_t* __restrict words) {
  for (int64_t i = 0; i < n; ++i) {
    A m = mean[i], s = static_cast<A>(precision[i]), gm = static_cast<A>(momentum[i]);
    bsam_update_element<A>(static_cast<A>(grad[i]) * inv_scale, curvature_sum[i], m, s, gm, c);
    mean[i] = m;
    if constexpr (std::is_same_v<S, A>) {
      precision[i] = s;
      momentum[i] = gm;
    } else {
      precision[i] = S(round_bf16_stochastic(s, precision_rounding_bits(words[i])), S::from_bits());
      momentum[i] = S(round_bf16_stochastic(gm, momentum_rounding_bits(words[i])), S::from_bits());
    }
    param[i] = static_cast<P>(m);
    grad[i] = P(0);
  }
}

// A skipped step: the model back at rest, the gradient buffer zeroed, the state untouched.
template <typename P, typename A>
SB_HD void skip_loop(P* __restrict param, P* __restrict grad, const A* __restrict weight, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    param[i] = static_cast<P>(weight[i]);
    grad[i] = P(0);
  }
}

template <typename P, typename A>
SB_HD void restore_loop(P* __restrict param, const A* __restrict weight, int64_t n) {
  for (int64_t i = 0; i < n; ++i) param[i] = static_cast<P>(weight[i]);
}

// Σ (T·g)² with 16 independent partial sums, so that the sum vectorizes without reassociation flags.
template <bool Adaptive, typename P, typename A>
SB_HD double sq_norm_loop(const P* __restrict grad, const A* __restrict weight, int64_t n, A inv_scale, bool& bad) {
  constexpr int kLanes = 16;
  A lanes[kLanes] = {};
  uint32_t any_bad = 0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const A g = static_cast<A>(grad[i + j]) * inv_scale;
      any_bad |= !is_finite(g);
      lanes[j] += sam_sq_term<A>(g, weight[i + j], Adaptive);
    }
  }
  double total = 0;
  for (; i < n; ++i) {
    const A g = static_cast<A>(grad[i]) * inv_scale;
    any_bad |= !is_finite(g);
    total += sam_sq_term<A>(g, weight[i], Adaptive);
  }
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  bad = any_bad != 0;
  return total;
}

template <bool Adaptive, typename P, typename A>
SB_HD void sam_perturb_loop(P* __restrict param, P* __restrict grad, const A* __restrict weight, int64_t n, A scale,
                            A inv_scale) {
  for (int64_t i = 0; i < n; ++i) {
    param[i] = static_cast<P>(sam_perturb_param<A>(static_cast<A>(grad[i]) * inv_scale, weight[i], scale, Adaptive));
    grad[i] = P(0);
  }
}

template <bool Nesterov, typename P, typename A>
SB_HD void sgd_loop(P* __restrict param, P* __restrict grad, A* __restrict weight, A* __restrict buf, int64_t n,
                    SgdCoeffs<A> c, A inv_scale) {
  c.nesterov = Nesterov;
  for (int64_t i = 0; i < n; ++i) {
    A w = weight[i], b = buf[i];
    sam_sgd_element<A>(static_cast<A>(grad[i]) * inv_scale, w, b, c);
    weight[i] = w;
    buf[i] = b;
    param[i] = static_cast<P>(w);
    grad[i] = P(0);
  }
}

template <typename P, typename A>
SB_HD void adamw_loop(P* __restrict param, P* __restrict grad, A* __restrict weight, A* __restrict momentum,
                      A* __restrict variance, int64_t n, const AdamwCoeffs<A>& c, A inv_scale) {
  for (int64_t i = 0; i < n; ++i) {
    A w = weight[i], m = momentum[i], v = variance[i];
    sam_adamw_element<A>(static_cast<A>(grad[i]) * inv_scale, w, m, v, c);
    weight[i] = w;
    momentum[i] = m;
    variance[i] = v;
    param[i] = static_cast<P>(w);
    grad[i] = P(0);
  }
}

// ---- the clones: one set of non-inline functions per parameter dtype -----------------------

template <typename P>
struct Kernels;

#define SB_DEFINE_CPU_KERNELS(P, TAG)                                                                              \
  using A_##TAG = acc_t<P>;                                                                                        \
  SB_CLONES bool find_nonfinite_##TAG(const P* g, int64_t n) { return find_nonfinite_loop<P>(g, n); }              \
  SB_CLONES bool fold_##TAG(P* g, A_##TAG* sum, int64_t n, int stage) {                                            \
    return stage == 0   ? fold_loop<0, P, A_##TAG>(g, sum, n)                                                      \
           : stage == 1 ? fold_loop<1, P, A_##TAG>(g, sum, n)                                                      \
                        : fold_loop<2, P, A_##TAG>(g, sum, n);                                                     \
  }                                                                                                                \
  SB_CLONES void skip_##TAG(P* p, P* g, const A_##TAG* w, int64_t n) { skip_loop<P, A_##TAG>(p, g, w, n); }        \
  SB_CLONES void restore_##TAG(P* p, const A_##TAG* w, int64_t n) { restore_loop<P, A_##TAG>(p, w, n); }           \
  SB_CLONES double sq_norm_##TAG(const P* g, const A_##TAG* w, int64_t n, bool adaptive, A_##TAG inv, bool& bad) { \
    return adaptive ? sq_norm_loop<true, P, A_##TAG>(g, w, n, inv, bad)                                            \
                    : sq_norm_loop<false, P, A_##TAG>(g, w, n, inv, bad);                                          \
  }                                                                                                                \
  SB_CLONES void sam_perturb_##TAG(P* p, P* g, const A_##TAG* w, int64_t n, A_##TAG scale, bool adaptive,          \
                                   A_##TAG inv) {                                                                  \
    if (adaptive)                                                                                                  \
      sam_perturb_loop<true, P, A_##TAG>(p, g, w, n, scale, inv);                                                  \
    else                                                                                                           \
      sam_perturb_loop<false, P, A_##TAG>(p, g, w, n, scale, inv);                                                 \
  }                                                                                                                \
  SB_CLONES void sgd_##TAG(P* p, P* g, A_##TAG* w, A_##TAG* b, int64_t n, const SgdCoeffs<A_##TAG>& c,             \
                           A_##TAG inv) {                                                                          \
    if (c.nesterov)                                                                                                \
      sgd_loop<true, P, A_##TAG>(p, g, w, b, n, c, inv);                                                           \
    else                                                                                                           \
      sgd_loop<false, P, A_##TAG>(p, g, w, b, n, c, inv);                                                          \
  }                                                                                                                \
  SB_CLONES void adamw_##TAG(P* p, P* g, A_##TAG* w, A_##TAG* m, A_##TAG* v, int64_t n,                            \
                             const AdamwCoeffs<A_##TAG>& c, A_##TAG inv) {                                         \
    adamw_loop<P, A_##TAG>(p, g, w, m, v, n, c, inv);                                                              \
  }                                                                                                                \
  template <>                                                                                                      \
  struct Kernels<P> {                                                                                              \
    static constexpr auto find_nonfinite = &find_nonfinite_##TAG;                                                  \
    static constexpr auto fold = &fold_##TAG;                                                                      \
    static constexpr auto skip = &skip_##TAG;                                                                      \
    static constexpr auto restore = &restore_##TAG;                                                                \
    static constexpr auto sq_norm = &sq_norm_##TAG;                                                                \
    static constexpr auto sam_perturb = &sam_perturb_##TAG;                                                        \
    static constexpr auto sgd = &sgd_##TAG;                                                                        \
    static constexpr auto adamw = &adamw_##TAG;                                                                    \
  };

SB_DEFINE_CPU_KERNELS(float, f32)
SB_DEFINE_CPU_KERNELS(double, f64)
SB_DEFINE_CPU_KERNELS(c10::BFloat16, bf16)
SB_DEFINE_CPU_KERNELS(c10::Half, f16)

#undef SB_DEFINE_CPU_KERNELS

// bSAM's phases per parameter dtype P and stored dtype S of the precision and momentum.
template <typename P, typename S>
struct BsamKernels;

#define SB_DEFINE_BSAM_KERNELS(P, S, TAG)                                                                          \
  using A_##TAG = acc_t<P>;                                                                                        \
  SB_CLONES void sample_##TAG(P* p, const A_##TAG* m, const S* s, const float* z, int64_t n, A_##TAG nd) {         \
    sample_loop<P, A_##TAG, S>(p, m, s, z, n, nd);                                                                 \
  }                                                                                                                \
  SB_CLONES bool bsam_perturb_##TAG(P* p, P* g, const A_##TAG* m, const S* s, A_##TAG* cs, int64_t n,              \
                                    A_##TAG rho, A_##TAG inv, bool acc) {                                          \
    return acc ? bsam_perturb_loop<true, P, A_##TAG, S>(p, g, m, s, cs, n, rho, inv)                               \
               : bsam_perturb_loop<false, P, A_##TAG, S>(p, g, m, s, cs, n, rho, inv);                             \
  }                                                                                                                \
  SB_CLONES void bsam_update_##TAG(P* p, P* g, A_##TAG* m, S* s, S* gm, const A_##TAG* cs, int64_t n,              \
                                   const BsamUpdateCoeffs<A_##TAG>& c, A_##TAG inv, const uint32_t* words) {       \
    bsam_update_loop<P, A_##TAG, S>(p, g, m, s, gm, cs, n, c, inv, words);                                         \
  }                                                                                                                \
  template <>                                                                                                      \
  struct BsamKernels<P, S> {                                                                                       \
    static constexpr auto sample = &sample_##TAG;                                                                  \
    static constexpr auto perturb = &bsam_perturb_##TAG;                                                           \
    static constexpr auto update = &bsam_update_##TAG;                                                             \
  };

SB_DEFINE_BSAM_KERNELS(float, float, f32)
SB_DEFINE_BSAM_KERNELS(double, double, f64)
SB_DEFINE_BSAM_KERNELS(c10::BFloat16, float, bf16)
SB_DEFINE_BSAM_KERNELS(c10::Half, float, f16)
// bfloat16 precision and momentum: float32 state only (float64 parameters refuse it)
SB_DEFINE_BSAM_KERNELS(float, c10::BFloat16, f32_bf16state)
SB_DEFINE_BSAM_KERNELS(c10::BFloat16, c10::BFloat16, bf16_bf16state)
SB_DEFINE_BSAM_KERNELS(c10::Half, c10::BFloat16, f16_bf16state)

#undef SB_DEFINE_BSAM_KERNELS

// ---- the bucket driver --------------------------------------------------------------------

// Run body(row, begin, end) over every chunk of the rows, chunks spread over the threads.
template <int N, typename F>
void for_each_chunk(const std::vector<TensorRow<N>>& rows, F&& body) {
  const auto chunks = plan_chunks(rows, kCpuChunk);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) body(rows[chunks[c].row], chunks[c].begin, chunks[c].end);
  });
}

template <typename T>
T* at_(void* base, int64_t begin) {
  return static_cast<T*>(base) + begin;
}

// The step's flags, read and raised on the host: a CPU tensor is host memory.
float read_scalar(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1, what,
              " must be a float32 CPU tensor of one element");
  return *t.data_ptr<float>();
}

void raise_flag(const at::Tensor& found_inf) {
  float one = 1.0f;  // several threads may store it: an atomic store of the same value
  __atomic_store(found_inf.data_ptr<float>(), &one, __ATOMIC_RELAXED);
}

// A step scalar: its tensor's value where given (seed_tensor, lr_tensor; host memory here), else the argument.
template <typename T>
T scalar_or(const std::optional<at::Tensor>& t, T value, const char* op, const char* what) {
  const T* data = optional_scalar<T>(t, at::Device(at::kCPU), op, what);
  return data != nullptr ? *data : value;
}


void bsam_sample_cpu(at::TensorList params, at::TensorList means, at::TensorList precisions,
                     at::IntArrayRef offsets, double num_data, int64_t seed,
                     const std::optional<at::Tensor>& seed_tensor) {
  check_group("bsam_sample", params, {}, {{"means", means}}, {{"precisions", precisions}});
  check_offsets("bsam_sample", offsets, params);
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
        randn_range(z, row.offset + i, len, k0, k1);
        BsamKernels<P, S>::sample(at_<P>(row.ptr[0], i), at_<A>(row.ptr[1], i), at_<S>(row.ptr[2], i), z, len,
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
    for_each_chunk(rows, [&](const TensorRow<5>& row, int64_t b, int64_t e) {
      if (BsamKernels<P, S>::perturb(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[2], b),
                                     at_<S>(row.ptr[3], b), at_<A>(row.ptr[4], b), e - b, static_cast<A>(rho),
                                     static_cast<A>(inv), accumulate)) {
        raise_flag(found_inf);
      }
    });
  });
}

void find_nonfinite_cpu(at::TensorList grads, const at::Tensor& found_inf) {
  check_group("find_nonfinite", grads, {}, {});
  read_scalar(found_inf, "found_inf");
  const auto rows = make_rows<1>({grads});
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "find_nonfinite", [&] {
    using P = scalar_t;
    for_each_chunk(rows, [&](const TensorRow<1>& row, int64_t b, int64_t e) {
      if (Kernels<P>::find_nonfinite(at_<P>(row.ptr[0], b), e - b)) raise_flag(found_inf);
    });
  });
}

void fold_grads_cpu(at::TensorList grads, at::TensorList grad_sums, const at::Tensor& found_inf, bool first,
                    bool last) {
  check_group("fold_grads", grads, {}, {{"grad_sums", grad_sums}});
  TORCH_CHECK(!(first && last), "fold_grads: first and last are exclusive (splits > 1)");
  read_scalar(found_inf, "found_inf");
  const int stage = first ? 0 : last ? 2 : 1;
  const auto rows = make_rows<2>({grads, grad_sums});
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "fold_grads", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    for_each_chunk(rows, [&](const TensorRow<2>& row, int64_t b, int64_t e) {
      if (Kernels<P>::fold(at_<P>(row.ptr[0], b), at_<A>(row.ptr[1], b), e - b, stage)) raise_flag(found_inf);
    });
  });
}

// θ = the state word, the gradient buffer zeroed: a skipped step (rows' roles 0, 1 and `weight`, which
// holds the state dtype: bSAM's mean, never its possibly bfloat16 precision or momentum).
template <int N>
void skip_step(const std::vector<TensorRow<N>>& rows, at::ScalarType dtype, int weight) {
  SB_DISPATCH_PARAM_DTYPE(dtype, "skip", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    for_each_chunk(rows, [&](const TensorRow<N>& row, int64_t b, int64_t e) {
      Kernels<P>::skip(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[weight], b), e - b);
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
  check_group("bsam_update", params, {{"grad_sums", grad_sums}}, {{"means", means}, {"curvature_sums", curvature_sums}},
              {{"precisions", precisions}, {"momentums", momentums}});
  check_splits("bsam_update", splits);
  check_offsets("bsam_update", offsets, params);
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
    const BsamUpdateCoeffs<A> c{static_cast<A>(splits), static_cast<A>(lr),      static_cast<A>(beta1),
                                static_cast<A>(1 - beta1), static_cast<A>(beta2), static_cast<A>(1 - beta2),
                                static_cast<A>(weight_decay), static_cast<A>(damping)};
    for_each_chunk(rows, [&](const TensorRow<6>& row, int64_t b, int64_t e) {
      const auto update = [&](int64_t begin, int64_t len, const uint32_t* words) {
        BsamKernels<P, S>::update(at_<P>(row.ptr[0], begin), at_<P>(row.ptr[1], begin), at_<A>(row.ptr[2], begin),
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

void restore_cpu(at::TensorList params, at::TensorList weights) {
  check_group("restore", params, {}, {{"weights", weights}});
  const auto rows = make_rows<2>({params, weights});
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "restore", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    for_each_chunk(rows, [&](const TensorRow<2>& row, int64_t b, int64_t e) {
      Kernels<P>::restore(at_<P>(row.ptr[0], b), at_<A>(row.ptr[1], b), e - b);
    });
  });
}

at::Tensor sam_sq_norm_cpu(at::TensorList grads, at::TensorList weights, const at::Tensor& found_inf,
                           const at::Tensor& inv_scale, bool adaptive) {
  check_group("sam_sq_norm", grads, {}, {{"weights", weights}});
  const float inv = read_scalar(inv_scale, "inv_scale");
  read_scalar(found_inf, "found_inf");
  const auto rows = make_rows<2>({grads, weights});
  const auto chunks = plan_chunks(rows, kCpuChunk);
  // one partial per chunk, summed in chunk order: the result does not depend on the thread count
  std::vector<double> partial(chunks.size(), 0.0);
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "sam_sq_norm", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const auto& row = rows[chunks[c].row];
        const int64_t b = chunks[c].begin;
        bool bad = false;
        partial[c] = Kernels<P>::sq_norm(at_<P>(row.ptr[0], b), at_<A>(row.ptr[1], b), chunks[c].end - b, adaptive,
                                         static_cast<A>(inv), bad);
        if (bad) raise_flag(found_inf);
      }
    });
  });
  double total = 0;
  for (double p : partial) total += p;
  return at::scalar_tensor(total, weights[0].options());
}

void sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList weights, const at::Tensor& inv_scale,
                     const at::Tensor& scale, bool adaptive) {
  check_group("sam_perturb", params, {{"grads", grads}}, {{"weights", weights}});
  TORCH_CHECK(scale.numel() == 1 && scale.device().is_cpu() && at::isFloatingType(scale.scalar_type()),
              "sam_perturb: scale must be one floating-point number on the CPU");
  const float inv = read_scalar(inv_scale, "inv_scale");
  const auto rows = make_rows<3>({params, grads, weights});
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_perturb", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    const A s = scale.to(weights[0].scalar_type()).item<A>();  // read in the state dtype
    for_each_chunk(rows, [&](const TensorRow<3>& row, int64_t b, int64_t e) {
      Kernels<P>::sam_perturb(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[2], b), e - b, s, adaptive,
                              static_cast<A>(inv));
    });
  });
}

void sam_update_sgd_cpu(at::TensorList params, at::TensorList grad_sums, at::TensorList weights,
                        at::TensorList momentums, const at::Tensor& found_inf, const at::Tensor& inv_scale, double lr,
                        double momentum, double weight_decay, bool nesterov, int64_t splits,
                        const std::optional<at::Tensor>& lr_tensor) {
  check_group("sam_update_sgd", params, {{"grad_sums", grad_sums}}, {{"weights", weights}, {"momentums", momentums}});
  check_splits("sam_update_sgd", splits);
  lr = scalar_or(lr_tensor, lr, "sam_update_sgd", "lr_tensor");
  const auto rows = make_rows<4>({params, grad_sums, weights, momentums});
  if (read_scalar(found_inf, "found_inf") != 0.0f) return skip_step(rows, params[0].scalar_type(), 2);
  const float inv = read_scalar(inv_scale, "inv_scale");
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_sgd", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    const SgdCoeffs<A> c{static_cast<A>(splits), static_cast<A>(lr), static_cast<A>(momentum),
                         static_cast<A>(weight_decay), nesterov};
    for_each_chunk(rows, [&](const TensorRow<4>& row, int64_t b, int64_t e) {
      Kernels<P>::sgd(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[2], b), at_<A>(row.ptr[3], b),
                      e - b, c, static_cast<A>(inv));
    });
  });
}

void sam_update_adamw_cpu(at::TensorList params, at::TensorList grad_sums, at::TensorList weights,
                          at::TensorList momentums, at::TensorList variances, const at::Tensor& found_inf,
                          const at::Tensor& inv_scale, const at::Tensor& step, double lr, double beta1, double beta2,
                          double eps, double weight_decay, int64_t splits,
                          const std::optional<at::Tensor>& lr_tensor) {
  check_group("sam_update_adamw", params, {{"grad_sums", grad_sums}},
              {{"weights", weights}, {"momentums", momentums}, {"variances", variances}});
  check_splits("sam_update_adamw", splits);
  TORCH_CHECK(step.device().is_cpu() && step.scalar_type() == at::kDouble && step.numel() == 1,
              "sam_update_adamw: step must be a float64 CPU tensor of one element");
  lr = scalar_or(lr_tensor, lr, "sam_update_adamw", "lr_tensor");
  const auto rows = make_rows<5>({params, grad_sums, weights, momentums, variances});
  if (read_scalar(found_inf, "found_inf") != 0.0f) return skip_step(rows, params[0].scalar_type(), 2);
  const float inv = read_scalar(inv_scale, "inv_scale");
  const double t = *step.data_ptr<double>();
  TORCH_CHECK(t >= 1, "sam_update_adamw: step must be >= 1");
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_adamw", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    const double bias1 = 1 - std::pow(beta1, t);
    const double bias2 = 1 - std::pow(beta2, t);
    const AdamwCoeffs<A> c{static_cast<A>(splits),    static_cast<A>(1 - lr * weight_decay),
                           static_cast<A>(beta1),     static_cast<A>(1 - beta1),
                           static_cast<A>(beta2),     static_cast<A>(1 - beta2),
                           static_cast<A>(bias2),     static_cast<A>(eps),
                           static_cast<A>(lr / bias1)};
    for_each_chunk(rows, [&](const TensorRow<5>& row, int64_t b, int64_t e) {
      Kernels<P>::adamw(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[2], b), at_<A>(row.ptr[3], b),
                        at_<A>(row.ptr[4], b), e - b, c, static_cast<A>(inv));
    });
  });
}

// out[i] = z(seed, start + i), float32.
void philox_randn_cpu(const at::Tensor& out, int64_t seed, int64_t start) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "philox_randn_: out must be contiguous float32");
  TORCH_CHECK(start >= 0, "philox_randn_: start must be >= 0, got ", start);
  const auto key = philox_key(seed);
  const uint32_t k0 = key.first, k1 = key.second;
  float* data = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), kCpuChunk, [&](int64_t lo, int64_t hi) {
    randn_range(data + lo, start + lo, hi - lo, k0, k1);
  });
}

// The four Philox words of each counter, as int64 [n, 4] (unsigned 32-bit values): for tests.
at::Tensor philox_words_cpu(const at::Tensor& counters, int64_t seed) {
  const auto key = philox_key(seed);
  const uint32_t k0 = key.first, k1 = key.second;
  const auto flat = counters.to(at::kLong).contiguous();
  auto out = at::empty({flat.numel(), 4}, flat.options());
  const int64_t* counter = flat.data_ptr<int64_t>();
  int64_t* words = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const auto c = static_cast<uint64_t>(counter[i]);
    const PhiloxWords w = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), k0, k1);
    words[4 * i + 0] = w.w0;
    words[4 * i + 1] = w.w1;
    words[4 * i + 2] = w.w2;
    words[4 * i + 3] = w.w3;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, CPU, m) {
  m.impl("bsam_sample", &bsam_sample_cpu);
  m.impl("bsam_perturb", &bsam_perturb_cpu);
  m.impl("find_nonfinite", &find_nonfinite_cpu);
  m.impl("fold_grads", &fold_grads_cpu);
  m.impl("bsam_update", &bsam_update_cpu);
  m.impl("restore", &restore_cpu);
  m.impl("sam_sq_norm", &sam_sq_norm_cpu);
  m.impl("sam_perturb", &sam_perturb_cpu);
  m.impl("sam_update_sgd", &sam_update_sgd_cpu);
  m.impl("sam_update_adamw", &sam_update_adamw_cpu);
  m.impl("philox_randn_", &philox_randn_cpu);
  m.impl("philox_words", &philox_words_cpu);
}

}  // namespace sambayes
