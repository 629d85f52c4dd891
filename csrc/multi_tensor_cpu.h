// The CPU scaffolding of every phase: one pass over all tensors of a bucket, chunks spread over
// threads with at::parallel_for, and the per-element math of sambayes_math.h in plain loops over
// raw pointers that the compiler vectorizes.
//
// The loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) with target_clones
// (SB_CLONES); the dynamic loader picks the best for the machine at load time. The ops live in
// bsam_cpu.cpp, sam_cpu.cpp and grads_cpu.cpp, the noise in philox_cpu.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "multi_tensor.h"
#include "sambayes_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SB_CLONES
#endif

namespace sambayes {

constexpr int64_t kCpuChunk = 1 << 15;    // elements per task: a few hundred KiB over all arrays, cache-sized
constexpr int64_t kNoiseBlock = 1 << 10;  // z drawn into an L1-resident buffer this many at a time

// Run body(row, begin, end) over every chunk of the rows, chunks spread over the threads.
template <int N, typename F>
void for_each_chunk(const std::vector<TensorRow<N>>& rows, F&& body) {
  const auto chunks = plan_chunks(rows, kCpuChunk);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) body(rows[chunks[c].row], chunks[c].begin, chunks[c].end);
  });
}

// The cache lines of elements [0, n) of an array asked into L2, before a block's noise is drawn: the hardware
// prefetcher runs only a few lines ahead of the loads, so without this a block's memory traffic waits until its
// arithmetic is done instead of going on under it.
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  const auto end = reinterpret_cast<uintptr_t>(p + n);
  for (auto line = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63}; line < end; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
  }
}

template <typename T>
T* at_(void* base, int64_t begin) {
  return static_cast<T*>(base) + begin;
}

// The step's flags, read and raised on the host: a CPU tensor is host memory.
inline float read_scalar(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1, what,
              " must be a float32 CPU tensor of one element");
  return *t.data_ptr<float>();
}

inline void raise_flag(const at::Tensor& found_inf) {
  float one = 1.0f;  // several threads may store it: an atomic store of the same value
  __atomic_store(found_inf.data_ptr<float>(), &one, __ATOMIC_RELAXED);
}

// A step scalar: its tensor's value where given (seed_tensor, lr_tensor; host memory here), else the argument.
template <typename T>
T scalar_or(const std::optional<at::Tensor>& t, T value, const char* op, const char* what) {
  const T* data = optional_scalar<T>(t, at::Device(at::kCPU), op, what);
  return data != nullptr ? *data : value;
}

// ---- noise (philox_cpu.cpp; ALGORITHM.md, "Noise", version 2) --------------------------------

// out[i] = z of noise index start + i, for i < n.
void randn_range(float* out, int64_t start, int64_t n, uint32_t k0, uint32_t k1);

// out[i] = the stochastic-rounding word of element start + i, for i < n: word (start + i) mod 4 of
// Philox4x32-10 at counter (start + i) div 4 (sambayes/_philox.py, "Stochastic rounding").
void rounding_words(uint32_t* out, int64_t start, int64_t n, uint32_t k0, uint32_t k1);

// ---- the end of an update of the posterior, shared by bSAM's and IVON's ---------------------------

// Element i's new mean m, precision s and momentum gm (bfloat16 S: rounded stochastically with its rounding word,
// words[i]; words is unused otherwise), the parameter at the mean and the gradient buffer zeroed.
template <typename P, typename A, typename S>
inline __attribute__((always_inline)) void store_posterior(P* __restrict param, P* __restrict grad,
                                                           A* __restrict mean, S* __restrict precision,
                                                           S* __restrict momentum, const uint32_t* __restrict words,
                                                           int64_t i, A m, A s, A gm) {
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

// ---- a skipped update, shared by bSAM's and SAM's ---------------------------------------------

// θ = the state word, the gradient buffer zeroed, the state untouched.
template <typename P, typename A>
SB_CLONES void skip_loop(P* __restrict param, P* __restrict grad, const A* __restrict weight, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    param[i] = static_cast<P>(weight[i]);
    grad[i] = P(0);
  }
}

// skip_loop over the rows (roles 0, 1 and `weight`, which holds the state dtype: bSAM's mean, never its
// possibly bfloat16 precision or momentum).
template <int N>
void skip_step(const std::vector<TensorRow<N>>& rows, at::ScalarType dtype, int weight) {
  SB_DISPATCH_PARAM_DTYPE(dtype, "skip", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    for_each_chunk(rows, [&](const TensorRow<N>& row, int64_t b, int64_t e) {
      skip_loop<P, A>(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[weight], b), e - b);
    });
  });
}

}  // namespace sambayes
