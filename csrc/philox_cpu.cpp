// The CPU noise (ALGORITHM.md, "Noise", version 2): Philox4x32-10 words drawn 256 calls at a time
// (AVX-512 intrinsics where the CPU has them), Box-Muller transforms that write four contiguous lanes
// the compiler vectorizes, then the lanes interleaved; the stochastic-rounding words of bfloat16 state
// from the same generator. And the noise as test ops: philox_randn_ and philox_words.
#include <algorithm>

#include "multi_tensor_cpu.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define SB_HAVE_AVX512_PHILOX 1
#endif

namespace sambayes {
namespace {

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

#ifdef SB_HAVE_AVX512_PHILOX
// Eight counters' Philox state, one per 64-bit lane, each word in the lane's low half: a 32x32->64 multiply
// (vpmuludq) reads only the low halves and leaves the product whole, its low word where the next round reads
// it, so a round is two multiplies, two shifts and two three-way xors (vpternlogd) and the high halves
// are never cleaned.
struct PhiloxLanes {
  __m512i x0, x1, x2, x3;
};

__attribute__((target("avx512f"), always_inline)) inline void philox_round_avx512(PhiloxLanes& s, __m512i key0,
                                                                                  __m512i key1) {
  const __m512i p = _mm512_mul_epu32(_mm512_set1_epi64(kPhiloxRoundA), s.x0);
  const __m512i q = _mm512_mul_epu32(_mm512_set1_epi64(kPhiloxRoundB), s.x2);
  s.x0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(q, 32), s.x1, key0, 0x96);  // hi(q) ^ x1 ^ key0
  s.x2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p, 32), s.x3, key1, 0x96);  // hi(p) ^ x3 ^ key1
  s.x1 = q;                                                                       // lo(q)
  s.x3 = p;                                                                       // lo(p)
}

// One of the four words for sixteen consecutive counters: the low halves of a's eight lanes, then b's.
__attribute__((target("avx512f"), always_inline)) inline void store_low_words(uint32_t* out, __m512i a, __m512i b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  _mm512_storeu_si512(out, _mm512_permutex2var_epi32(a, even, b));
}

// philox_block in AVX-512 intrinsics, 16 counters at a time in two lane sets: a fifth less time (perf, Zen 4)
// than the same rounds on 32-bit lanes, which blend the products' halves back each round; the compiler's loop
// widens to 64-bit lanes too but cleans them each round. Same words as philox4x32_10 (the noise tests).
__attribute__((target("avx512f"))) void philox_block_avx512(uint32_t* __restrict w0, uint32_t* __restrict w1,
                                                            uint32_t* __restrict w2, uint32_t* __restrict w3,
                                                            int64_t n, uint32_t c0, uint32_t c1, uint32_t k0,
                                                            uint32_t k1) {
  __m512i key0[10], key1[10];  // the round keys, broadcast once per block
  for (int round = 0; round < 10; ++round) {
    key0[round] = _mm512_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(round) * kPhiloxKeyA));
    key1[round] = _mm512_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(round) * kPhiloxKeyB));
  }
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    // the counters' low words c0 + i + 0..7 and + 8..15 (a carry goes to the lanes' unread high halves)
    const __m512i first = _mm512_add_epi64(_mm512_set1_epi64(c0 + static_cast<uint32_t>(i)), lane);
    PhiloxLanes a{first, _mm512_set1_epi64(c1), _mm512_setzero_si512(), _mm512_setzero_si512()};
    PhiloxLanes b{_mm512_add_epi64(first, _mm512_set1_epi64(8)), a.x1, a.x2, a.x3};
    for (int round = 0; round < 10; ++round) {
      philox_round_avx512(a, key0[round], key1[round]);
      philox_round_avx512(b, key0[round], key1[round]);
    }
    store_low_words(w0 + i, a.x0, b.x0);
    store_low_words(w1 + i, a.x1, b.x1);
    store_low_words(w2 + i, a.x2, b.x2);
    store_low_words(w3 + i, a.x3, b.x3);
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

}  // namespace

void randn_range(float* out, int64_t start, int64_t n, uint32_t k0, uint32_t k1) {
  lanes_range(out, start, n,
              [&](float* z, int64_t calls, uint64_t counter) { randn4x_block(z, calls, counter, k0, k1); });
}

void rounding_words(uint32_t* out, int64_t start, int64_t n, uint32_t k0, uint32_t k1) {
  lanes_range(out, start, n,
              [&](uint32_t* words, int64_t calls, uint64_t counter) { words4x_block(words, calls, counter, k0, k1); });
}

namespace {

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
  auto out = flat.new_empty({flat.numel(), 4});
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
  m.impl("philox_randn_", &philox_randn_cpu);
  m.impl("philox_words", &philox_words_cpu);
}

}  // namespace sambayes
