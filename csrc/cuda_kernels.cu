// The CUDA kernels: one launch per phase per bucket for any number of tensors. The bucket's
// rows (pointers, sizes, noise offsets) and chunks form one small device table, built once
// per list of tensors and cached (the optimizers keep their tensors at fixed addresses), so
// a steady-state launch copies nothing from the host. Block b handles chunk b. Where all of
// a row's pointers are 16-byte aligned (decided per row), each thread moves 16 bytes of
// state per load (4 float32 or 2 float64 elements) and the matching 8 bytes of
// bfloat16/float16; float32 math for float32/bfloat16/float16 storage; 64-bit indices.
// bSAM's precision and momentum may be stored in bfloat16 over float32 state
// (BSAM(state_dtype=torch.bfloat16)): read widened to float32, written with stochastic rounding.
// Phases that read a gradient unscale it, raise the step's found-inf flag on inf/NaN and,
// where they consume it, zero it; the updates leave the state alone when the flag is set.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <list>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "multi_tensor.h"
#include "sambayes_math.h"

namespace sambayes {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kCudaChunk = 1 << 14;  // elements per block: 16 vector iterations of 256 threads

// W elements of T moved as one aligned load or store.
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ Pack<T, W> load(const void* base, int64_t i) {
  return *reinterpret_cast<const Pack<T, W>*>(static_cast<const T*>(base) + i);
}

// W elements stored as S read as A, exactly (a bfloat16 is the high half of a float32). Widened from the
// bits: c10's conversion (inline asm on an address) makes every access of the kernel generic; by 32-bit
// pairs where W is even (a vector: i even), as widening 16-bit loads one by one spilled on sm_90 (ptxas 13).
template <typename S, typename A, int W>
__device__ __forceinline__ Pack<A, W> load_widened(const void* base, int64_t i) {
  if constexpr (std::is_same_v<S, A>) {
    return load<A, W>(base, i);
  } else {
    Pack<A, W> widened;
    if constexpr (W % 2 == 0) {
      const auto pairs = load<uint32_t, W / 2>(base, i / 2);
#pragma unroll
      for (int j = 0; j < W / 2; ++j) {  // little-endian: element 2j in the low half
        widened.v[2 * j] = __uint_as_float(pairs.v[j] << 16);
        widened.v[2 * j + 1] = __uint_as_float(pairs.v[j] & 0xFFFF0000u);
      }
    } else {
      const auto stored = load<S, W>(base, i);
#pragma unroll
      for (int j = 0; j < W; ++j) widened.v[j] = __uint_as_float(static_cast<uint32_t>(stored.v[j].x) << 16);
    }
    return widened;
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

__device__ __forceinline__ void raise_flag(float* found_inf) { *found_inf = 1.0f; }

// Lane k of a call's four normals, by selects: a dynamic index would put the array in local memory.
__device__ __forceinline__ float lane(const float* z, uint64_t k) {
  return k == 0 ? z[0] : k == 1 ? z[1] : k == 2 ? z[2] : z[3];
}

// Word k of a Philox call, by selects as above.
__device__ __forceinline__ uint32_t lane(const PhiloxWords& w, uint64_t k) {
  return k == 0 ? w.w0 : k == 1 ? w.w1 : k == 2 ? w.w2 : w.w3;
}

// The stochastic-rounding words of elements first .. first + W - 1 of a group: word i mod 4 of the
// Philox call at counter i div 4 under key (k0, k1).
template <int W>
__device__ __forceinline__ void rounding_words(uint64_t first, uint32_t k0, uint32_t k1, uint32_t* words) {
  PhiloxWords call_words;
  uint64_t call = ~uint64_t(0);
#pragma unroll
  for (int j = 0; j < W; ++j) {  // W <= 4 elements span one or two Philox calls: each made once
    const uint64_t index = first + j;
    if (index / 4 != call) {
      call = index / 4;
      call_words = philox4x32_10(static_cast<uint32_t>(call), static_cast<uint32_t>(call >> 32), k0, k1);
    }
    words[j] = lane(call_words, index % 4);
  }
}

// The Philox key of a seed read on the device (seed_tensor), split as philox_key splits an int seed.
__device__ __forceinline__ void read_philox_key(const int64_t* seed, uint32_t& k0, uint32_t& k1) {
  const auto s = static_cast<uint64_t>(*seed);
  k0 = static_cast<uint32_t>(s);
  k1 = static_cast<uint32_t>(s >> 32);
}

// x stored in bfloat16, rounded stochastically with 16 random bits.
__device__ __forceinline__ c10::BFloat16 rounded_bf16(float x, uint32_t random_bits) {
  return c10::BFloat16(round_bf16_stochastic(x, random_bits), c10::BFloat16::from_bits());
}

// ---- per-phase element ops: run<W> handles elements i .. i + W - 1 of one row ----------------
// prepared() is called once per thread before the loop: it reads the step's device scalars, and the seed or lr
// where given as a tensor (seed_ptr, lr_ptr non-null: CUDA-graph capture, each replay reads the current value).
// bSAM's ops take S, the stored dtype of the precision and momentum: A, or c10::BFloat16 over float32 A.

// float32 params: 12 B/param with float32 precision, 10 B with bfloat16 (reads m 4, s 4 or 2; writes θ 4).
template <typename P, typename A, typename S>
struct SampleOp {
  A num_data;
  uint32_t k0, k1;
  const int64_t* seed_ptr;
  __device__ SampleOp prepared() const {
    SampleOp op = *this;
    if (seed_ptr) read_philox_key(seed_ptr, op.k0, op.k1);
    return op;
  }
  template <int W>
  __device__ void run(const TensorRow<3>& row, int64_t i) const {
    const auto mean = load<A, W>(row.ptr[1], i);
    const auto precision = load_widened<S, A, W>(row.ptr[2], i);
    const uint64_t first = static_cast<uint64_t>(row.offset + i);
    float z[W];
    float lanes[4];
    uint64_t call = ~uint64_t(0);
#pragma unroll
    for (int j = 0; j < W; ++j) {  // W <= 4 elements span one or two Philox calls: each made once
      const uint64_t index = first + j;
      if (index / 4 != call) {
        call = index / 4;
        philox_randn4x(static_cast<uint32_t>(call), static_cast<uint32_t>(call >> 32), k0, k1, lanes);
      }
      z[j] = lane(lanes, index % 4);
    }
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      param.v[j] = static_cast<P>(bsam_sample_param<A>(mean.v[j], precision.v[j], static_cast<A>(z[j]), num_data));
    }
    store<P, W>(row.ptr[0], i, param);
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
    const auto grad = load<P, W>(row.ptr[1], i);
    const auto mean = load<A, W>(row.ptr[2], i);
    const auto precision = load_widened<S, A, W>(row.ptr[3], i);
    Pack<A, W> curvature_sum;
    if (accumulate) curvature_sum = load<A, W>(row.ptr[4], i);
    Pack<P, W> param;
    bool bad = false;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A g = static_cast<A>(grad.v[j]) * inv_scale;
      bad |= !is_finite(g);
      param.v[j] = static_cast<P>(bsam_perturb_param<A>(g, mean.v[j], precision.v[j], rho));
      const A a = bsam_curvature<A>(g, precision.v[j]);
      curvature_sum.v[j] = accumulate ? curvature_sum.v[j] + a : a;
    }
    if (bad) raise_flag(found_inf);
    store<P, W>(row.ptr[0], i, param);
    store<A, W>(row.ptr[4], i, curvature_sum);
    store_zero<P, W>(row.ptr[1], i);
  }
};

template <typename P, typename A>
struct FindNonfiniteOp {
  float* found_inf;
  __device__ FindNonfiniteOp prepared() const { return *this; }
  template <int W>
  __device__ void run(const TensorRow<1>& row, int64_t i) const {
    const auto grad = load<P, W>(row.ptr[0], i);
    bool bad = false;
#pragma unroll
    for (int j = 0; j < W; ++j) bad |= !is_finite(static_cast<A>(grad.v[j]));
    if (bad) raise_flag(found_inf);
  }
};

template <typename P, typename A>
struct FoldOp {
  float* found_inf;
  int stage;  // 0: sum = g, g = 0; 1: sum += g, g = 0; 2 (last): g = sum + g
  __device__ FoldOp prepared() const { return *this; }
  template <int W>
  __device__ void run(const TensorRow<2>& row, int64_t i) const {
    auto grad = load<P, W>(row.ptr[0], i);
    Pack<A, W> total;
    if (stage != 0) total = load<A, W>(row.ptr[1], i);
    bool bad = false;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A g = static_cast<A>(grad.v[j]);
      total.v[j] = stage == 0 ? g : total.v[j] + g;
      grad.v[j] = static_cast<P>(total.v[j]);
      // a non-finite sum; at the last stage as rounded into .grad (a float16 sum may overflow)
      bad |= !is_finite(stage == 2 ? static_cast<A>(grad.v[j]) : total.v[j]);
    }
    if (bad) raise_flag(found_inf);
    if (stage == 2) {
      store<P, W>(row.ptr[0], i, grad);
    } else {
      store<A, W>(row.ptr[1], i, total);
      store_zero<P, W>(row.ptr[0], i);
    }
  }
};

// float32 params: 40 B/param with float32 state, 32 B with bfloat16 precision and momentum (reads h 4, m 4,
// s 4 or 2, g_m 4 or 2, a 4; writes g_m 4 or 2, m 4, s 4 or 2, θ 4, zeroed h 4). kSeedTensor: the key is read
// from seed_ptr, in an instantiation of its own, as a key held in registers rather than kernel parameters costs
// the bfloat16 update 4 to 8 registers on sm_80 (64: 4 blocks an SM, more: 3).
template <typename P, typename A, typename S, bool kSeedTensor = false>
struct BsamUpdateOp {
  BsamUpdateCoeffs<A> c;
  const float* found_inf;
  const float* inv_scale_ptr;
  bool skip;
  A inv_scale;
  uint32_t k0, k1;  // the stochastic-rounding key: bfloat16 S only
  const double* lr_ptr;
  const int64_t* seed_ptr;
  __device__ BsamUpdateOp prepared() const {
    BsamUpdateOp op = *this;
    op.skip = *found_inf != 0.0f;
    op.inv_scale = static_cast<A>(*inv_scale_ptr);
    if (lr_ptr) op.c.lr = static_cast<A>(*lr_ptr);
    if constexpr (kSeedTensor) read_philox_key(seed_ptr, op.k0, op.k1);
    return op;
  }
  template <int W>
  __device__ void run(const TensorRow<6>& row, int64_t i) const {
    auto mean = load<A, W>(row.ptr[2], i);
    if (!skip) {
      const auto grad = load<P, W>(row.ptr[1], i);
      auto precision = load_widened<S, A, W>(row.ptr[3], i);
      auto momentum = load_widened<S, A, W>(row.ptr[4], i);
      const auto curvature_sum = load<A, W>(row.ptr[5], i);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        bsam_update_element<A>(static_cast<A>(grad.v[j]) * inv_scale, curvature_sum.v[j], mean.v[j], precision.v[j],
                               momentum.v[j], c);
      }
      store<A, W>(row.ptr[2], i, mean);
      if constexpr (std::is_same_v<S, A>) {
        store<A, W>(row.ptr[3], i, precision);
        store<A, W>(row.ptr[4], i, momentum);
      } else {  // rounded stochastically: increments below half a bfloat16 ulp survive on average
        uint32_t words[W];
        rounding_words<W>(static_cast<uint64_t>(row.offset + i), k0, k1, words);
        Pack<S, W> stored_precision, stored_momentum;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          stored_precision.v[j] = rounded_bf16(precision.v[j], precision_rounding_bits(words[j]));
          stored_momentum.v[j] = rounded_bf16(momentum.v[j], momentum_rounding_bits(words[j]));
        }
        store<S, W>(row.ptr[3], i, stored_precision);
        store<S, W>(row.ptr[4], i, stored_momentum);
      }
    }
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) param.v[j] = static_cast<P>(mean.v[j]);
    store<P, W>(row.ptr[0], i, param);
    store_zero<P, W>(row.ptr[1], i);
  }
};

template <typename P, typename A>
struct RestoreOp {
  __device__ RestoreOp prepared() const { return *this; }
  template <int W>
  __device__ void run(const TensorRow<2>& row, int64_t i) const {
    const auto weight = load<A, W>(row.ptr[1], i);
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) param.v[j] = static_cast<P>(weight.v[j]);
    store<P, W>(row.ptr[0], i, param);
  }
};

template <typename P, typename A>
struct SamPerturbOp {
  const double* scale_ptr;  // on the device: no host sync
  const float* inv_scale_ptr;
  bool adaptive;
  A scale, inv_scale;
  __device__ SamPerturbOp prepared() const {
    SamPerturbOp op = *this;
    op.scale = static_cast<A>(*scale_ptr);
    op.inv_scale = static_cast<A>(*inv_scale_ptr);
    return op;
  }
  template <int W>
  __device__ void run(const TensorRow<3>& row, int64_t i) const {
    const auto grad = load<P, W>(row.ptr[1], i);
    const auto weight = load<A, W>(row.ptr[2], i);
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A g = static_cast<A>(grad.v[j]) * inv_scale;
      param.v[j] = static_cast<P>(sam_perturb_param<A>(g, weight.v[j], scale, adaptive));
    }
    store<P, W>(row.ptr[0], i, param);
    store_zero<P, W>(row.ptr[1], i);
  }
};

template <typename P, typename A>
struct SgdOp {
  SgdCoeffs<A> c;
  const float* found_inf;
  const float* inv_scale_ptr;
  bool skip;
  A inv_scale;
  const double* lr_ptr;
  __device__ SgdOp prepared() const {
    SgdOp op = *this;
    op.skip = *found_inf != 0.0f;
    op.inv_scale = static_cast<A>(*inv_scale_ptr);
    if (lr_ptr) op.c.lr = static_cast<A>(*lr_ptr);
    return op;
  }
  template <int W>
  __device__ void run(const TensorRow<4>& row, int64_t i) const {
    auto weight = load<A, W>(row.ptr[2], i);
    if (!skip) {
      const auto grad = load<P, W>(row.ptr[1], i);
      auto buf = load<A, W>(row.ptr[3], i);
#pragma unroll
      for (int j = 0; j < W; ++j) sam_sgd_element<A>(static_cast<A>(grad.v[j]) * inv_scale, weight.v[j], buf.v[j], c);
      store<A, W>(row.ptr[2], i, weight);
      store<A, W>(row.ptr[3], i, buf);
    }
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) param.v[j] = static_cast<P>(weight.v[j]);
    store<P, W>(row.ptr[0], i, param);
    store_zero<P, W>(row.ptr[1], i);
  }
};

template <typename P, typename A>
struct AdamwOp {
  AdamwCoeffs<A> c;
  double lr, beta1, beta2, weight_decay;
  const double* step;  // updates taken, counting this one: the bias corrections, without a host sync
  const float* found_inf;
  const float* inv_scale_ptr;
  bool skip;
  A inv_scale;
  const double* lr_ptr;
  __device__ AdamwOp prepared() const {
    AdamwOp op = *this;
    op.skip = *found_inf != 0.0f;
    op.inv_scale = static_cast<A>(*inv_scale_ptr);
    const double t = *step;
    const double rate = lr_ptr ? *lr_ptr : lr;
    // as the host computes it: __dmul_rn keeps nvcc from fusing the product into an fma
    if (lr_ptr) op.c.decay_factor = static_cast<A>(1 - __dmul_rn(rate, weight_decay));
    op.c.bias2 = static_cast<A>(1 - pow(beta2, t));
    op.c.step_size = static_cast<A>(rate / (1 - pow(beta1, t)));
    return op;
  }
  template <int W>
  __device__ void run(const TensorRow<5>& row, int64_t i) const {
    auto weight = load<A, W>(row.ptr[2], i);
    if (!skip) {
      const auto grad = load<P, W>(row.ptr[1], i);
      auto momentum = load<A, W>(row.ptr[3], i);
      auto variance = load<A, W>(row.ptr[4], i);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        sam_adamw_element<A>(static_cast<A>(grad.v[j]) * inv_scale, weight.v[j], momentum.v[j], variance.v[j], c);
      }
      store<A, W>(row.ptr[2], i, weight);
      store<A, W>(row.ptr[3], i, momentum);
      store<A, W>(row.ptr[4], i, variance);
    }
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) param.v[j] = static_cast<P>(weight.v[j]);
    store<P, W>(row.ptr[0], i, param);
    store_zero<P, W>(row.ptr[1], i);
  }
};

// ---- the multi-tensor kernel -----------------------------------------------------------------

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

// Block b runs op over chunk b: vectors of V elements where the row is aligned, then the tail.
// kRelative >= 0: that role's entries are offsets from `base` (see make_relative).
template <int N, int V, int kRelative, typename Op>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const TensorRow<N>* rows, const Chunk* chunks, int64_t base, Op op_) {
  const Op op = op_.prepared();
  const Chunk chunk = chunks[blockIdx.x];
  TensorRow<N> row = rows[chunk.row];
  if constexpr (kRelative >= 0) row.ptr[kRelative] = static_cast<char*>(row.ptr[kRelative]) + base;
  int64_t tail = chunk.begin;
  if (row.aligned) {  // chunk.begin is a multiple of kCudaChunk, hence of V
    const int64_t vectors = (chunk.end - chunk.begin) / V;
    if constexpr (V == 2) {  // float64 state: unrolled, ptxas 13 spills the SGD update on sm_80
#pragma unroll 1
      for (int64_t k = threadIdx.x; k < vectors; k += kThreads) op.template run<V>(row, chunk.begin + k * V);
    } else {
#pragma unroll 2  // ptxas 13 spilled in restore<float> at the default unroll of 4
      for (int64_t k = threadIdx.x; k < vectors; k += kThreads) op.template run<V>(row, chunk.begin + k * V);
    }
    tail = chunk.begin + vectors * V;
  }
  for (int64_t i = tail + threadIdx.x; i < chunk.end; i += kThreads) op.template run<1>(row, i);
}

// ---- device tables, cached ------------------------------------------------------------------

// The rows and chunks of a list of tensors on the device.
template <int N>
struct DeviceTable {
  const TensorRow<N>* rows;
  const Chunk* chunks;
  int64_t num_chunks;  // one block each
};

// Device tables, built on a miss (chunks planned, a pinned copy on the current stream), then
// reused with no host work but the key: the key is the rows' own content, so an equal key means
// an identical table and a cached one is never stale.
class TableCache {
 public:
  template <int N>
  DeviceTable<N> get(const std::vector<TensorRow<N>>& rows, at::Device device) {
    const size_t row_bytes = rows.size() * sizeof(TensorRow<N>);
    std::string key(sizeof(int64_t), '\0');
    const int64_t index = device.index();
    std::memcpy(key.data(), &index, sizeof(index));
    key.append(reinterpret_cast<const char*>(rows.data()), row_bytes);  // chunks follow from the rows
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = entries_.find(key);
    if (found == entries_.end()) {
      const auto chunks = plan_chunks(rows, kCudaChunk);
      const size_t chunk_bytes = chunks.size() * sizeof(Chunk);
      auto host = at::empty({static_cast<int64_t>(row_bytes + chunk_bytes)},
                            at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(host.data_ptr<uint8_t>(), rows.data(), row_bytes);
      std::memcpy(host.data_ptr<uint8_t>() + row_bytes, chunks.data(), chunk_bytes);
      order_.push_front(key);
      const auto num_chunks = static_cast<int64_t>(chunks.size());
      found = entries_.emplace(key, Entry{host.to(device, /*non_blocking=*/true), order_.begin(), num_chunks}).first;
      if (entries_.size() > kCapacity) {
        entries_.erase(order_.back());
        order_.pop_back();
      }
    } else {
      order_.splice(order_.begin(), order_, found->second.position);  // most recently used
    }
    auto* base = found->second.table.data_ptr<uint8_t>();
    return {reinterpret_cast<const TensorRow<N>*>(base), reinterpret_cast<const Chunk*>(base + row_bytes),
            found->second.num_chunks};
  }

 private:
  static constexpr size_t kCapacity = 256;
  struct Entry {
    at::Tensor table;
    std::list<std::string>::iterator position;
    int64_t num_chunks;
  };
  std::mutex mutex_;
  std::list<std::string> order_;
  std::unordered_map<std::string, Entry> entries_;
};

TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

template <int N, typename A, int kRelative = -1, typename Op>
void launch(const std::vector<TensorRow<N>>& rows, at::Device device, const Op& op, int64_t base = 0) {
  const auto table = table_cache().get(rows, device);
  if (table.num_chunks == 0) return;
  constexpr int V = 16 / sizeof(A);
  multi_tensor_kernel<N, V, kRelative, Op>
      <<<static_cast<unsigned>(table.num_chunks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          table.rows, table.chunks, base, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A one-element float32 tensor on the bucket's device (the found-inf flag, 1/scale).
float* device_scalar(const at::Tensor& t, at::Device device, const char* what) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.numel() == 1, what,
              " must be a float32 tensor of one element on ", device);
  return t.data_ptr<float>();
}


void bsam_sample_cuda(at::TensorList params, at::TensorList means, at::TensorList precisions,
                      at::IntArrayRef offsets, double num_data, int64_t seed,
                      const std::optional<at::Tensor>& seed_tensor) {
  check_group("bsam_sample", params, {}, {{"means", means}}, {{"precisions", precisions}});
  check_offsets("bsam_sample", offsets, params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const int64_t* seed_ptr = optional_scalar<int64_t>(seed_tensor, params[0].device(), "bsam_sample", "seed_tensor");
  const auto key = seed_ptr ? std::pair<uint32_t, uint32_t>{} : philox_key(seed);  // a seed tensor: read by the kernel
  const auto rows = make_rows<3>({params, means, precisions}, offsets);
  dispatch_bsam(params[0].scalar_type(), stored_in_bf16(precisions), [&](auto param, auto stored) {
    using P = decltype(param);
    using A = acc_t<P>;
    launch<3, A>(rows, params[0].device(),
                 SampleOp<P, A, decltype(stored)>{static_cast<A>(num_data), key.first, key.second, seed_ptr});
  });
}

void bsam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList means, at::TensorList precisions,
                       at::TensorList curvature_sums, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                       double rho, bool accumulate) {
  check_group("bsam_perturb", params, {{"grads", grads}}, {{"means", means}, {"curvature_sums", curvature_sums}},
              {{"precisions", precisions}});
  const auto device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
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

void find_nonfinite_cuda(at::TensorList grads, const at::Tensor& found_inf) {
  check_group("find_nonfinite", grads, {}, {});
  const auto device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto rows = make_rows<1>({grads});
  float* flag = device_scalar(found_inf, device, "found_inf");
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "find_nonfinite", [&] {
    using A = acc_t<scalar_t>;
    launch<1, A>(rows, device, FindNonfiniteOp<scalar_t, A>{flag});
  });
}

void fold_grads_cuda(at::TensorList grads, at::TensorList grad_sums, const at::Tensor& found_inf, bool first,
                     bool last) {
  check_group("fold_grads", grads, {}, {{"grad_sums", grad_sums}});
  TORCH_CHECK(!(first && last), "fold_grads: first and last are exclusive (splits > 1)");
  const auto device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto rows = make_rows<2>({grads, grad_sums});
  const auto base = make_relative<2>(rows, 1);
  float* flag = device_scalar(found_inf, device, "found_inf");
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "fold_grads", [&] {
    using A = acc_t<scalar_t>;
    launch<2, A, 1>(rows, device, FoldOp<scalar_t, A>{flag, first ? 0 : last ? 2 : 1}, base);
  });
}

void bsam_update_cuda(at::TensorList params, at::TensorList grad_sums, at::TensorList means, at::TensorList precisions,
                      at::TensorList momentums, at::TensorList curvature_sums, at::IntArrayRef offsets,
                      const at::Tensor& found_inf, const at::Tensor& inv_scale, double lr, double beta1, double beta2,
                      double weight_decay, double damping, int64_t splits, int64_t seed,
                      const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& seed_tensor) {
  check_group("bsam_update", params, {{"grad_sums", grad_sums}}, {{"means", means}, {"curvature_sums", curvature_sums}},
              {{"precisions", precisions}, {"momentums", momentums}});
  check_splits("bsam_update", splits);
  check_offsets("bsam_update", offsets, params);
  const auto device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto rows = make_rows<6>({params, grad_sums, means, precisions, momentums, curvature_sums}, offsets);
  const auto base = make_relative<6>(rows, 5);
  const float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  const double* lr_ptr = optional_scalar<double>(lr_tensor, device, "bsam_update", "lr_tensor");
  const int64_t* seed_ptr = optional_scalar<int64_t>(seed_tensor, device, "bsam_update", "seed_tensor");
  const bool bf16_state = stored_in_bf16(precisions);
  // the seed matters only with bfloat16 state; a seed tensor is read by the kernel
  const auto key = bf16_state && !seed_ptr ? philox_key(seed) : std::pair<uint32_t, uint32_t>{};
  dispatch_bsam(params[0].scalar_type(), bf16_state, [&](auto param, auto stored) {
    using P = decltype(param);
    using S = decltype(stored);
    using A = acc_t<P>;
    const BsamUpdateCoeffs<A> c{static_cast<A>(splits),       static_cast<A>(lr),        static_cast<A>(beta1),
                                static_cast<A>(1 - beta1),    static_cast<A>(beta2),     static_cast<A>(1 - beta2),
                                static_cast<A>(weight_decay), static_cast<A>(damping)};
    const auto run = [&](auto seed_tensor) {
      using Op = BsamUpdateOp<P, A, S, decltype(seed_tensor)::value>;
      launch<6, A, 5>(rows, device, Op{c, flag, inv, false, A(1), key.first, key.second, lr_ptr, seed_ptr}, base);
    };
    if constexpr (!std::is_same_v<S, A>) {
      if (seed_ptr) return run(std::true_type{});
    }
    run(std::false_type{});
  });
}

void restore_cuda(at::TensorList params, at::TensorList weights) {
  check_group("restore", params, {}, {{"weights", weights}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto rows = make_rows<2>({params, weights});
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "restore", [&] {
    using A = acc_t<scalar_t>;
    launch<2, A>(rows, params[0].device(), RestoreOp<scalar_t, A>{});
  });
}

// One partial sum of (T·g)² per chunk, in double; the caller sums the partials.
template <typename P, typename A>
__global__ void __launch_bounds__(kThreads)
    sq_norm_kernel(const TensorRow<2>* rows, const Chunk* chunks, bool adaptive, const float* inv_scale_ptr,
                   float* found_inf, double* partial) {
  const Chunk chunk = chunks[blockIdx.x];
  const TensorRow<2> row = rows[chunk.row];
  const P* grad = static_cast<const P*>(row.ptr[0]);
  const A* weight = static_cast<const A*>(row.ptr[1]);
  const A inv_scale = static_cast<A>(*inv_scale_ptr);
  A sum = 0;
  bool bad = false;
  for (int64_t i = chunk.begin + threadIdx.x; i < chunk.end; i += kThreads) {
    const A g = static_cast<A>(grad[i]) * inv_scale;
    bad |= !is_finite(g);
    sum += sam_sq_term<A>(g, weight[i], adaptive);
  }
  if (bad) raise_flag(found_inf);
  __shared__ double warp_sums[kThreads / 32];
  double total = sum;
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) total += __shfl_down_sync(0xFFFFFFFFu, total, delta);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    double block_total = 0;
    for (int w = 0; w < kThreads / 32; ++w) block_total += warp_sums[w];
    partial[blockIdx.x] = block_total;
  }
}

at::Tensor sam_sq_norm_cuda(at::TensorList grads, at::TensorList weights, const at::Tensor& found_inf,
                            const at::Tensor& inv_scale, bool adaptive) {
  check_group("sam_sq_norm", grads, {}, {{"weights", weights}});
  const auto device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto rows = make_rows<2>({grads, weights});
  const auto table = table_cache().get(rows, device);
  if (table.num_chunks == 0) return at::zeros({}, weights[0].options());
  float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  auto partial = at::empty({table.num_chunks}, weights[0].options().dtype(at::kDouble));
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "sam_sq_norm", [&] {
    using A = acc_t<scalar_t>;
    sq_norm_kernel<scalar_t, A><<<static_cast<unsigned>(table.num_chunks), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(table.rows, table.chunks, adaptive, inv, flag,
                                                                       partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // a fixed-order sum of the partials: deterministic
  return partial.sum().to(weights[0].scalar_type());
}

void sam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList weights, const at::Tensor& inv_scale,
                      const at::Tensor& scale, bool adaptive) {
  check_group("sam_perturb", params, {{"grads", grads}}, {{"weights", weights}});
  const auto device = params[0].device();
  TORCH_CHECK(scale.numel() == 1 && scale.device() == device && at::isFloatingType(scale.scalar_type()),
              "sam_perturb: scale must be one floating-point number on ", device);
  // read in the kernel (no host sync); SAM hands it over in float64 already
  const auto scale64 = scale.scalar_type() == at::kDouble ? scale : scale.to(at::kDouble);
  const c10::cuda::CUDAGuard guard(device);
  const auto rows = make_rows<3>({params, grads, weights});
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_perturb", [&] {
    using A = acc_t<scalar_t>;
    launch<3, A>(rows, device, SamPerturbOp<scalar_t, A>{scale64.data_ptr<double>(), inv, adaptive, A(0), A(1)});
  });
}

void sam_update_sgd_cuda(at::TensorList params, at::TensorList grad_sums, at::TensorList weights,
                         at::TensorList momentums, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                         double lr, double momentum, double weight_decay, bool nesterov, int64_t splits,
                         const std::optional<at::Tensor>& lr_tensor) {
  check_group("sam_update_sgd", params, {{"grad_sums", grad_sums}}, {{"weights", weights}, {"momentums", momentums}});
  check_splits("sam_update_sgd", splits);
  const auto device = params[0].device();
  const double* lr_ptr = optional_scalar<double>(lr_tensor, device, "sam_update_sgd", "lr_tensor");
  const c10::cuda::CUDAGuard guard(device);
  const auto rows = make_rows<4>({params, grad_sums, weights, momentums});
  const float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_sgd", [&] {
    using A = acc_t<scalar_t>;
    const SgdCoeffs<A> c{static_cast<A>(splits), static_cast<A>(lr), static_cast<A>(momentum),
                         static_cast<A>(weight_decay), nesterov};
    launch<4, A>(rows, device, SgdOp<scalar_t, A>{c, flag, inv, false, A(1), lr_ptr});
  });
}

void sam_update_adamw_cuda(at::TensorList params, at::TensorList grad_sums, at::TensorList weights,
                           at::TensorList momentums, at::TensorList variances, const at::Tensor& found_inf,
                           const at::Tensor& inv_scale, const at::Tensor& step, double lr, double beta1, double beta2,
                           double eps, double weight_decay, int64_t splits,
                           const std::optional<at::Tensor>& lr_tensor) {
  check_group("sam_update_adamw", params, {{"grad_sums", grad_sums}},
              {{"weights", weights}, {"momentums", momentums}, {"variances", variances}});
  check_splits("sam_update_adamw", splits);
  const auto device = params[0].device();
  TORCH_CHECK(step.device() == device && step.scalar_type() == at::kDouble && step.numel() == 1,
              "sam_update_adamw: step must be a float64 tensor of one element on ", device);
  const double* lr_ptr = optional_scalar<double>(lr_tensor, device, "sam_update_adamw", "lr_tensor");
  const c10::cuda::CUDAGuard guard(device);
  const auto rows = make_rows<5>({params, grad_sums, weights, momentums, variances});
  const float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_adamw", [&] {
    using A = acc_t<scalar_t>;
    // bias2 and step_size are filled in on the device from `step`, and decay_factor from lr_tensor
    // where given (AdamwOp::prepared)
    const AdamwCoeffs<A> c{static_cast<A>(splits), static_cast<A>(1 - lr * weight_decay),
                           static_cast<A>(beta1),  static_cast<A>(1 - beta1),
                           static_cast<A>(beta2),  static_cast<A>(1 - beta2),
                           A(1),                   static_cast<A>(eps),
                           A(1)};
    launch<5, A>(rows, device, AdamwOp<scalar_t, A>{c, lr, beta1, beta2, weight_decay, step.data_ptr<double>(), flag,
                                                    inv, false, A(1), lr_ptr});
  });
}

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
  const c10::cuda::CUDAGuard guard(out.device());
  const auto key = philox_key(seed);
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, 65536);
  philox_randn_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(start), key.first, key.second);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, CUDA, m) {
  m.impl("bsam_sample", &bsam_sample_cuda);
  m.impl("bsam_perturb", &bsam_perturb_cuda);
  m.impl("find_nonfinite", &find_nonfinite_cuda);
  m.impl("fold_grads", &fold_grads_cuda);
  m.impl("bsam_update", &bsam_update_cuda);
  m.impl("restore", &restore_cuda);
  m.impl("sam_sq_norm", &sam_sq_norm_cuda);
  m.impl("sam_perturb", &sam_perturb_cuda);
  m.impl("sam_update_sgd", &sam_update_sgd_cuda);
  m.impl("sam_update_adamw", &sam_update_adamw_cuda);
  m.impl("philox_randn_", &philox_randn_cuda);
}

}  // namespace sambayes
