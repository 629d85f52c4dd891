// The CUDA scaffolding of every phase: one launch per phase per bucket for any number of tensors.
// The bucket's rows (pointers, sizes, noise offsets) and chunks form one small device table, built
// once per list of tensors and cached (the optimizers keep their tensors at fixed addresses), so a
// steady-state launch copies nothing from the host. Block b handles chunk b. Where all of a row's
// pointers are 16-byte aligned (decided per row), each thread moves 16 bytes of state per load
// (4 float32 or 2 float64 elements) and the matching 8 bytes of bfloat16/float16; 64-bit indices.
//
// An op is a struct with `prepared()` (called once per thread before the loop: it reads the step's
// device scalars) and `run<W>(row, i)` (elements i .. i + W - 1 of one row); the ops live in
// bsam_cuda.cu, sam_cuda.cu and grads_cuda.cu, their per-element math in sambayes_math.h.
//
// SAMBAYES_EMULATED: the same sources compiled by a C++ compiler for the host, on the execution
// layer of cuda_emulated.h (backend "cuda-emulated"). The differences are mechanical and all here:
// the device header, the guard and stream types, the capture query, the launch, the dispatch key.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#if defined(SAMBAYES_EMULATED)
#include "cuda_emulated.h"
#else
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "multi_tensor.h"
#include "sambayes_math.h"

namespace sambayes {

// ---- the device: CUDA, or its emulation on the host ---------------------------------------------
#if defined(SAMBAYES_EMULATED)
#define SB_CUDA_KEY CPU  // the dispatch key of the ops: the emulated build's ops take CPU tensors
using emulated::DeviceGuard;
using emulated::Stream;
inline Stream current_stream(at::Device) { return emulated::stream(); }
inline bool stream_is_capturing(at::Device) { return emulated::capturing(); }
inline void record_stream(const at::Tensor& t, Stream stream) { emulated::recorded(t, stream); }

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned blocks, unsigned threads, Stream, Args&&... args) {
  emulated::launch(blocks, threads, [&] { kernel(args...); });
}
#else
#define SB_CUDA_KEY CUDA
using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = c10::cuda::CUDAStream;
inline Stream current_stream(at::Device device) { return c10::cuda::getCurrentCUDAStream(device.index()); }
inline bool stream_is_capturing(at::Device) {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}
// the allocator reuses `t`'s memory only once the work queued on `stream` so far is done
inline void record_stream(const at::Tensor& t, Stream stream) {
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned blocks, unsigned threads, Stream stream, Args&&... args) {
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

constexpr int kThreads = 256;
constexpr int64_t kCudaChunk = 1 << 14;  // elements per block: 16 vector iterations of 256 threads

// ---- vector loads and stores ------------------------------------------------------------------

// W elements of T moved as one aligned load or store (as 16-byte ones where they span more).
template <typename T, int W>
struct alignas(sizeof(T) * W < 16 ? sizeof(T) * W : 16) Pack {
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ Pack<T, W> load(const void* base, int64_t i) {
  return *reinterpret_cast<const Pack<T, W>*>(static_cast<const T*>(base) + i);
}

// x read as A, exactly (a bfloat16 is the high half of a float32): from the value's bits, as c10's
// conversions (inline asm on the value's address) make every access of the kernel generic (LD/ST).
template <typename A, typename S>
__device__ __forceinline__ A widened(S x) {
  if constexpr (std::is_same_v<S, A>) {
    return x;
  } else if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<A, float>) {
    return __uint_as_float(static_cast<uint32_t>(x.x) << 16);
  } else {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<S, c10::Half> && std::is_same_v<A, float>) {
      float value;
      asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(x.x));
      return value;
    }
#endif
    return static_cast<A>(x);
  }
}

// W elements stored as S (a parameter, bSAM's stored state) read as A (widened); bfloat16 by 32-bit pairs
// where W is even (a vector: i even), as widening 16-bit loads one by one spilled on sm_90 (ptxas 13).
template <typename S, typename A, int W>
__device__ __forceinline__ Pack<A, W> load_widened(const void* base, int64_t i) {
  if constexpr (std::is_same_v<S, A>) {
    return load<A, W>(base, i);
  } else {
    Pack<A, W> out;
    if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<A, float> && W % 2 == 0) {
      const auto pairs = load<uint32_t, W / 2>(base, i / 2);
#pragma unroll
      for (int j = 0; j < W / 2; ++j) {  // little-endian: element 2j in the low half
        out.v[2 * j] = __uint_as_float(pairs.v[j] << 16);
        out.v[2 * j + 1] = __uint_as_float(pairs.v[j] & 0xFFFF0000u);
      }
    } else {
      const auto stored = load<S, W>(base, i);
#pragma unroll
      for (int j = 0; j < W; ++j) out.v[j] = widened<A>(stored.v[j]);
    }
    return out;
  }
}

template <typename T, int W>
__device__ __forceinline__ void store(void* base, int64_t i, const Pack<T, W>& pack) {
  *reinterpret_cast<Pack<T, W>*>(static_cast<T*>(base) + i) = pack;
}

template <typename T, int W>
__device__ __forceinline__ void store_zero(void* base, int64_t i) {
  Pack<T, W> zero;
#pragma unroll
  for (int j = 0; j < W; ++j) zero.v[j] = T(0);
  store<T, W>(base, i, zero);
}

// Lane k of four, by selects: a dynamic index would put the pack in local memory.
template <typename T>
__device__ __forceinline__ Pack<T, 1> one_lane(const Pack<T, 4>& pack, int64_t k) {
  return {{k == 0 ? pack.v[0] : k == 1 ? pack.v[1] : k == 2 ? pack.v[2] : pack.v[3]}};
}

// Elements first .. first + W - 1 of a pack.
template <int W, typename T, int N>
__device__ __forceinline__ Pack<T, W> slice(const Pack<T, N>& pack, int first) {
  Pack<T, W> out;
#pragma unroll
  for (int j = 0; j < W; ++j) out.v[j] = pack.v[first + j];
  return out;
}

// x rounded to P to nearest even. On the GPU a float32 to bfloat16/float16 is one conversion instruction
// (c10's bfloat16 one a dozen integer ones), written with value operands: CUDA's conversion intrinsics and
// c10's take the value's address, which makes every access of the kernel generic (LD/ST). The same value,
// but for a NaN's payload (the GPU's canonical NaN).
template <typename P, typename A>
__device__ __forceinline__ P narrowed(A x) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<P, c10::BFloat16> && std::is_same_v<A, float>) {
    unsigned short bits;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(x));
    return P(bits, P::from_bits());
  } else if constexpr (std::is_same_v<P, c10::Half> && std::is_same_v<A, float>) {
    unsigned short bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(x));
    return P(bits, P::from_bits());
  }
#endif
  return static_cast<P>(x);
}

// W values rounded to P (narrowed) and stored; bfloat16 on the GPU two at a time, one conversion per pair
// stored as the pair's 32-bit word (split into two 16-bit values, the pair costs two instructions to re-pack).
template <typename P, typename A, int W>
__device__ __forceinline__ void store_rounded(void* base, int64_t i, const Pack<A, W>& values) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<P, c10::BFloat16> && std::is_same_v<A, float> && W % 2 == 0) {
    Pack<uint32_t, W / 2> pairs;
#pragma unroll
    for (int j = 0; j < W; j += 2) {  // the first operand goes to the high half: element j + 1
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(pairs.v[j / 2]) : "f"(values.v[j + 1]), "f"(values.v[j]));
    }
    store<uint32_t, W / 2>(base, i >> 1, pairs);  // i even and not negative
    return;
  }
#endif
  Pack<P, W> out;
#pragma unroll
  for (int j = 0; j < W; ++j) out.v[j] = narrowed<P>(values.v[j]);
  store<P, W>(base, i, out);
}

__device__ __forceinline__ void raise_flag(float* found_inf) { *found_inf = 1.0f; }

// ---- Philox on the device ----------------------------------------------------------------------

// Lane k of a call's four normals, by selects: a dynamic index would put the array in local memory.
__device__ __forceinline__ float lane(const float* z, uint64_t k) {
  return k == 0 ? z[0] : k == 1 ? z[1] : k == 2 ? z[2] : z[3];
}

// Word k of a Philox call, by selects as above.
__device__ __forceinline__ uint32_t lane(const PhiloxWords& w, uint64_t k) {
  return k == 0 ? w.w0 : k == 1 ? w.w1 : k == 2 ? w.w2 : w.w3;
}

// The Philox key of a seed read on the device (seed_tensor), split as philox_key splits an int seed.
__device__ __forceinline__ void read_philox_key(const int64_t* seed, uint32_t& k0, uint32_t& k1) {
  const auto s = static_cast<uint64_t>(*seed);
  k0 = static_cast<uint32_t>(s);
  k1 = static_cast<uint32_t>(s >> 32);
}

// The rounds' keys of a seed read on the device: computed by the block's first thread into shared memory and
// read from there once by every thread (call it from prepared(), which every thread runs, under a condition
// the same for the whole block). Held in registers: computed from the seed by each thread, they are recomputed
// in every call (nine of the twenty on sm_90).
__device__ __forceinline__ PhiloxRoundKeys read_philox_round_keys(const int64_t* seed) {
  __shared__ PhiloxRoundKeys shared;
  if (threadIdx.x == 0) {
    uint32_t k0, k1;
    read_philox_key(seed, k0, k1);
    shared = philox_round_keys(k0, k1);
  }
  __syncthreads();
  const PhiloxRoundKeys keys = shared;
  __syncthreads();  // every thread has its copy before a second call (another seed) writes them
  return keys;
}

// The draws of a quad (see multi_tensor_kernel): the Philox4x32-10 call `call` = (offset + q) / 4 for the quad
// that starts at element q, under the rounds' keys, as z (noise_quad: the four lanes of tl.randn4x) or as
// its four words (words_quad: the stochastic-rounding words).
__device__ __forceinline__ Pack<float, 4> noise_quad(uint64_t call, const PhiloxRoundKeys& keys) {
  Pack<float, 4> z;
  randn4x_from_words(philox4x32_10(static_cast<uint32_t>(call), static_cast<uint32_t>(call >> 32), keys), z.v);
  return z;
}

__device__ __forceinline__ Pack<uint32_t, 4> words_quad(uint64_t call, const PhiloxRoundKeys& keys) {
  const PhiloxWords w = philox4x32_10(static_cast<uint32_t>(call), static_cast<uint32_t>(call >> 32), keys);
  return {{w.w0, w.w1, w.w2, w.w3}};
}

// The same under the key (k0, k1), its rounds' keys computed in the call: for a kernel whose key comes from device
// memory or not at run time, where its rounds' keys held in registers would spill (IVON's summed update, sm_80).
__device__ __forceinline__ Pack<uint32_t, 4> words_quad(uint64_t call, uint32_t k0, uint32_t k1) {
  const PhiloxWords w = philox4x32_10(static_cast<uint32_t>(call), static_cast<uint32_t>(call >> 32), k0, k1);
  return {{w.w0, w.w1, w.w2, w.w3}};
}

// ---- the end of an update of the posterior, shared by bSAM's and IVON's ---------------------------

// Elements i .. i + W - 1 of the rows of an update (phases.POSTERIOR_UPDATE_ROLES): the new mean (role 2), the
// precision and momentum (roles 3, 4: in S; bfloat16 ones rounded stochastically with the words that words()
// returns, called only then: increments below half a bfloat16 ulp survive on average).
template <typename S, typename A, int W, typename Words>
__device__ __forceinline__ void store_posterior(const TensorRow<6>& row, int64_t i, const Pack<A, W>& mean,
                                                const Pack<A, W>& precision, const Pack<A, W>& momentum,
                                                const Words& words) {
  store<A, W>(row.ptr[2], i, mean);
  if constexpr (std::is_same_v<S, A>) {
    store<A, W>(row.ptr[3], i, precision);
    store<A, W>(row.ptr[4], i, momentum);
  } else {
    const Pack<uint32_t, W> word = words();
    Pack<S, W> stored_precision, stored_momentum;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      stored_precision.v[j] = S(round_bf16_stochastic(precision.v[j], precision_rounding_bits(word.v[j])),
                                S::from_bits());
      stored_momentum.v[j] = S(round_bf16_stochastic(momentum.v[j], momentum_rounding_bits(word.v[j])),
                               S::from_bits());
    }
    store<S, W>(row.ptr[3], i, stored_precision);
    store<S, W>(row.ptr[4], i, stored_momentum);
  }
}

// ---- the multi-tensor kernel -----------------------------------------------------------------

// A row's addresses as global ones. nvcc infers that an address read from the table points to global
// memory only in a kernel without inline assembly (the conversions to bfloat16 and float16 and the
// approximate square roots have some); an access it cannot place is generic (LD/ST, the space resolved
// per access). A pointer parameter plus an integer is global whatever the kernel holds: `origin` is a
// null pointer parameter, which the compiler cannot see through. The emulated build keeps the addresses.
__device__ __forceinline__ void* global_address(void* address, char* origin) {
#if defined(SAMBAYES_EMULATED)
  (void)origin;
  return address;
#else
  return origin + reinterpret_cast<intptr_t>(address);
#endif
}

// `bytes` past an address (an op's own relative role): in integers in the emulated build (an offset below
// the base is no pointer: UBSan's pointer overflow), a pointer sum on the GPU, which keeps the global space.
__device__ __forceinline__ void* offset_address(void* address, int64_t bytes) {
#if defined(SAMBAYES_EMULATED)
  return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(address) + bytes);
#else
  return static_cast<char*>(address) + bytes;
#endif
}

template <int N>
__device__ __forceinline__ void globalize(TensorRow<N>& row, char* origin) {
#pragma unroll
  for (int k = 0; k < N; ++k) row.ptr[k] = global_address(row.ptr[k], origin);
}

// Make role `role` of the rows offsets from its first tensor, returned: the step's running sums are
// views of one buffer that may move between steps; with offsets their table stays cached and the
// launch passes the base. `aligned` was decided on the addresses, so a base of another alignment
// gives another key.
template <int N>
int64_t make_relative(std::vector<TensorRow<N>>& rows, int role) {
  if (rows.empty()) return 0;
  const auto base = reinterpret_cast<int64_t>(rows[0].ptr[role]);
  for (auto& row : rows) row.ptr[role] = reinterpret_cast<void*>(reinterpret_cast<int64_t>(row.ptr[role]) - base);
  return base;
}

// An op that draws from a Philox stream (`static constexpr bool kNoiseQuads = true`): see multi_tensor_kernel.
template <typename Op, typename = void>
struct draws_noise : std::false_type {};
template <typename Op>
struct draws_noise<Op, std::void_t<decltype(Op::kNoiseQuads)>> : std::bool_constant<Op::kNoiseQuads> {};

// Block b runs op over chunk b: vectors of V elements where the row is aligned, then the tail.
// kRelative >= 0: that role's entries are offsets from `base` (see make_relative).
// An op that draws from a Philox stream runs over quads instead: the four elements whose noise
// indices (offset + element) are 4c .. 4c + 3, with one call c for the four (op.draw(c)): with vector
// loads where the row is aligned and its offset a multiple of 4, else element by element. Its
// run<W>(row, i, lanes) gets the lanes of its W elements from lanes(), which it calls where it needs
// them (a late call keeps fewer values live across the Philox rounds). The other ops' rows carry no
// offsets, so that their chunks begin on multiples of kCudaChunk.
template <int N, int V, int kRelative, typename Op>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const TensorRow<N>* rows, const Chunk* chunks, char* origin, int64_t base, Op op_) {
  const Op op = op_.prepared();
  const Chunk chunk = chunks[blockIdx.x];
  TensorRow<N> row = rows[chunk.row];
  if constexpr (kRelative >= 0) {  // in integers: an offset below the base is no pointer (UBSan: pointer overflow)
    row.ptr[kRelative] = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(row.ptr[kRelative]) + base);
  }
  if constexpr (V != 2 || draws_noise<Op>::value) {
    globalize(row, origin);
  } else if constexpr (kRelative >= 0) {
    // float64 state: no inline assembly but in the noise, and the sums cost SGD's update a spill (ptxas 13,
    // sm_90); only the relative role, whose integer sum nvcc cannot place
    row.ptr[kRelative] = global_address(row.ptr[kRelative], origin);
  }
  if constexpr (draws_noise<Op>::value) {
    int64_t first = chunk.begin - (row.offset + chunk.begin) % 4;  // the quad that holds chunk.begin
    if (row.aligned && row.offset % 4 == 0) {  // then first == chunk.begin: whole quads, vector loads
      const int quads = static_cast<int>((chunk.end - chunk.begin) / 4);  // a chunk's quads count in 32 bits
      const auto first_call = static_cast<uint64_t>(row.offset + chunk.begin) / 4;  // quad k: call first_call + k
#pragma unroll 1
      for (int k = threadIdx.x; k < quads; k += kThreads) {
        const int64_t q = chunk.begin + 4 * k;
        const uint64_t call = first_call + static_cast<uint64_t>(k);
        if constexpr (V == 4) {
          op.template run<4>(row, q, [&] { return op.draw(call); });
        } else {  // float64 state: two vectors of two elements, one call for both
          const auto lanes = op.draw(call);
          op.template run<2>(row, q, [&] { return slice<2>(lanes, 0); });
          op.template run<2>(row, q + 2, [&] { return slice<2>(lanes, 2); });
        }
      }
      first = chunk.begin + 4 * quads;
    }
    for (int64_t q = first + 4 * threadIdx.x; q < chunk.end; q += 4 * kThreads) {  // the rest, masked
      const auto lanes = op.draw(static_cast<uint64_t>(row.offset + q) / 4);
      const int64_t end = q + 4 < chunk.end ? q + 4 : chunk.end;
#pragma unroll 1
      for (int64_t i = q > chunk.begin ? q : chunk.begin; i < end; ++i) {
        op.template run<1>(row, i, [&] { return one_lane(lanes, i - q); });
      }
    }
  } else {
    int64_t tail = chunk.begin;
    if (row.aligned) {  // chunk.begin is a multiple of kCudaChunk, hence of W
      // two vectors per run (float64 state: one, as two spill the SGD update on sm_80 with ptxas 13): every
      // load of both before the first store, which the compiler may not move a later vector's loads above
      constexpr int W = V == 2 ? V : 2 * V;
      const int64_t vectors = (chunk.end - chunk.begin) / W;
#pragma unroll 1
      for (int64_t k = threadIdx.x; k < vectors; k += kThreads) op.template run<W>(row, chunk.begin + k * W);
      tail = chunk.begin + vectors * W;
    }
    for (int64_t i = tail + threadIdx.x; i < chunk.end; i += kThreads) op.template run<1>(row, i);
  }
}

// ---- device tables, cached ------------------------------------------------------------------

// The rows and chunks of a list of tensors on the device.
template <int N>
struct DeviceTable {
  const TensorRow<N>* rows;
  const Chunk* chunks;
  int64_t num_chunks;  // one block each
};

// Device tables, built on a miss (chunks planned, copied from the host before any launch can read
// them), then reused with no host work but the key: the key is the rows' own content, so an equal key
// means an identical table and a cached one is never stale.
//
// CUDA graphs: a captured launch keeps the table's address, so a table used during a capture is held
// for the life of the process (a graph may be replayed at any time) and never evicted; a miss during
// a capture is refused (its copy would be captured too, and replayed from a host buffer long gone).
// Streams: the copy completes before get() returns, so any stream may launch with the table at once;
// a table used on a stream other than the one it was allocated on is recorded on that stream, so
// that the allocator reuses its memory only after the launches queued there.
class TableCache {
 public:
  template <int N>
  DeviceTable<N> get(const std::vector<TensorRow<N>>& rows, at::Device device) {
    const size_t row_bytes = rows.size() * sizeof(TensorRow<N>);
    std::string key(sizeof(int64_t), '\0');
    const int64_t index = device.index();
    std::memcpy(key.data(), &index, sizeof(index));
    key.append(reinterpret_cast<const char*>(rows.data()), row_bytes);  // chunks follow from the rows
    const bool capturing = stream_is_capturing(device);
    const Stream stream = current_stream(device);
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = entries_.find(key);
    if (found == entries_.end()) {
      TORCH_CHECK(!capturing,
                  "sambayes: the cuda backend has no launch table for these tensors and cannot build one during "
                  "the capture of a CUDA graph; run the captured steps once before capturing (a warm-up, as "
                  "torch.cuda.graphs recommends), with the same tensors");
      const auto chunks = plan_chunks(rows, kCudaChunk, /*noise_space=*/true);
      const size_t chunk_bytes = chunks.size() * sizeof(Chunk);
      // (at::detail::empty_cpu, ATen/EmptyTensor.h: a CPU allocation without the op headers)
      const at::Tensor host{at::detail::empty_cpu({static_cast<int64_t>(row_bytes + chunk_bytes)}, at::kByte)};
      std::memcpy(host.data_ptr<uint8_t>(), rows.data(), row_bytes);
      std::memcpy(host.data_ptr<uint8_t>() + row_bytes, chunks.data(), chunk_bytes);
      order_.push_front(key);
      // a blocking copy from pageable memory: done when it returns, whatever stream reads the table next
      Entry entry{host.to(device), order_.begin(), static_cast<int64_t>(chunks.size()), stream, {}, false};
      found = entries_.emplace(key, std::move(entry)).first;
      if (order_.size() > kCapacity) {  // the least recently used table that no graph holds
        entries_.erase(order_.back());
        order_.pop_back();
      }
    } else if (!found->second.held) {
      order_.splice(order_.begin(), order_, found->second.position);  // most recently used
    }
    Entry& entry = found->second;
    if (capturing && !entry.held) {  // a graph may replay this launch at any time: never evicted
      order_.erase(entry.position);
      entry.held = true;
    }
    if (!(stream == entry.allocated_on) &&
        std::find(entry.used_on.begin(), entry.used_on.end(), stream) == entry.used_on.end()) {
      record_stream(entry.table, stream);
      entry.used_on.push_back(stream);
    }
    auto* base = entry.table.data_ptr<uint8_t>();
    return {reinterpret_cast<const TensorRow<N>*>(base), reinterpret_cast<const Chunk*>(base + row_bytes),
            entry.num_chunks};
  }

  // (tables cached, tables held for CUDA graphs)
  std::pair<int64_t, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto cached = static_cast<int64_t>(entries_.size());
    return {cached, cached - static_cast<int64_t>(order_.size())};
  }

  // Forget every table, held ones too (for tests, where no graph exists).
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
    order_.clear();
  }

 private:
  static constexpr size_t kCapacity = 256;  // tables that no graph holds
  struct Entry {
    at::Tensor table;
    std::list<std::string>::iterator position;  // in order_, unless held
    int64_t num_chunks;
    Stream allocated_on;
    std::vector<Stream> used_on;  // the other streams that launched with it (recorded)
    bool held;
  };
  std::mutex mutex_;
  std::list<std::string> order_;  // least recently used last; held tables are not in it
  std::unordered_map<std::string, Entry> entries_;
};

// One cache for the whole extension (an inline function's static: one instance across the .cu files).
inline TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

#if defined(SAMBAYES_EMULATED)
// The negative controls of the sanitizer build: rows made wrong on purpose (emulated::inject_fault).
template <int N>
std::vector<TensorRow<N>> with_injected_fault(std::vector<TensorRow<N>> rows) {
  for (auto& row : rows) {
    if (emulated::injected_fault() == emulated::Fault::kMisaligned) row.aligned = 1;  // vector loads anyway
  }
  if (emulated::injected_fault() == emulated::Fault::kOverrun && !rows.empty()) rows.back().numel += 1;
  return rows;
}
#endif

// multi_tensor_kernel over the rows: V = 16 bytes of the state dtype A per vector.
template <int N, typename A, int kRelative = -1, typename Op>
void launch(const std::vector<TensorRow<N>>& rows, at::Device device, const Op& op, int64_t base = 0) {
#if defined(SAMBAYES_EMULATED)
  const auto table = table_cache().get(with_injected_fault(rows), device);
#else
  const auto table = table_cache().get(rows, device);
#endif
  if (table.num_chunks == 0) return;
  constexpr int V = 16 / sizeof(A);
  launch_kernel(multi_tensor_kernel<N, V, kRelative, Op>, static_cast<unsigned>(table.num_chunks), kThreads,
                current_stream(device), table.rows, table.chunks, static_cast<char*>(nullptr), base, op);
}

// A one-element float32 tensor on the bucket's device (the found-inf flag, 1/scale).
inline float* device_scalar(const at::Tensor& t, at::Device device, const char* what) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.numel() == 1, what,
              " must be a float32 tensor of one element on ", device);
  return t.data_ptr<float>();
}

}  // namespace sambayes
