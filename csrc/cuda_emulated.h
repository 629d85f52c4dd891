// The CUDA execution model on the host: what the CUDA sources (*_cuda.cu) see when they are compiled
// by a C++ compiler for the emulated tier (SAMBAYES_EMULATED; backend "cuda-emulated", on CPU tensors).
//
// A launch runs every block; a block runs its threads as fibers on one OS thread (cuda_emulated.cpp),
// so that __syncthreads, __shared__ memory (one instance per OS thread, hence per running block) and
// the warp shuffles work as on a GPU. Blocks run in parallel over at::parallel_for's threads. What it
// cannot show: streams and graphs (stubs that tests set), the code nvcc generates, timing.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#error "cuda_emulated.h is for host compilers: nvcc compiles the CUDA sources as they are"
#endif

namespace sambayes::emulated {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The builtins of the thread that runs: set by the scheduler before it resumes a fiber.
struct ThreadIndex {
  dim3 thread, block, block_dim, grid_dim;
};
extern thread_local ThreadIndex current;

// __syncthreads: wait until every thread of the block (that has not exited) arrives.
void syncthreads();

// A warp shuffle as 64 bits: every lane of the warp deposits `bits`, then reads lane `source`'s.
uint64_t shuffle_bits(uint64_t bits, unsigned lane_mask, unsigned source);

template <typename T>
T shfl_down_sync(unsigned lane_mask, T value, unsigned delta) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "a value of at most 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const unsigned lane = current.thread.x % 32;
  bits = shuffle_bits(bits, lane_mask, lane + delta < 32 ? lane + delta : lane);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// body() as the kernel of every thread of `blocks` blocks of `threads` threads.
void launch_erased(unsigned blocks, unsigned threads, void (*call)(const void*), const void* body);
template <typename Body>
void launch(unsigned blocks, unsigned threads, const Body& body) {
  launch_erased(blocks, threads, [](const void* b) { (*static_cast<const Body*>(b))(); }, &body);
}

// ---- the mechanical differences: stream, guard, capture (stubs the tests set) ------------------

struct Stream {
  int64_t id;
  bool operator==(const Stream& other) const { return id == other.id; }
};
Stream stream();
bool capturing();
// A table used on a stream other than its own: what record_stream would tell the allocator, counted.
void recorded(const at::Tensor& table, Stream stream);

struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};

// The negative controls of the sanitizer build: rows made wrong on purpose (sambayes_emulated.inject_fault).
enum class Fault { kNone, kMisaligned, kOverrun };
Fault injected_fault();

// Philox calls made by the kernels (sambayes_math.h counts them in this build).
void count_philox_call();

}  // namespace sambayes::emulated

// CUDA's spelling of the above: the sources compile unchanged.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one per OS thread: the block that runs on it
#define threadIdx (::sambayes::emulated::current.thread)
#define blockIdx (::sambayes::emulated::current.block)
#define blockDim (::sambayes::emulated::current.block_dim)
#define gridDim (::sambayes::emulated::current.grid_dim)
#define __syncthreads() ::sambayes::emulated::syncthreads()
#define __shfl_down_sync(mask, value, delta) ::sambayes::emulated::shfl_down_sync(mask, value, delta)

inline float __uint_as_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
