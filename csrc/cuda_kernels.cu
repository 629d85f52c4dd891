// The CUDA kernels: one launch per phase per (device, dtype) group for any number of
// tensors. The group's rows (pointers, sizes, noise offsets) and chunks are uploaded
// as one small table; block b handles chunk b. Where all of a row's pointers are
// 16-byte aligned, each thread moves 16 bytes of state per load (4 float32 or 2
// float64 elements) and the matching 8 bytes of bfloat16/float16; float32 math for
// float32/bfloat16/float16 storage; 64-bit element indices throughout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "multi_tensor.h"
#include "sambayes_math.h"

namespace sambayes {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kCudaChunk = 1 << 14;  // elements per block: 16 vector iterations of 256 threads

template <typename P>
using acc_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

// W elements of T moved as one aligned load or store.
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ Pack<T, W> load(const void* base, int64_t i) {
  return *reinterpret_cast<const Pack<T, W>*>(static_cast<const T*>(base) + i);
}

template <typename T, int W>
__device__ __forceinline__ void store(void* base, int64_t i, const Pack<T, W>& pack) {
  *reinterpret_cast<Pack<T, W>*>(static_cast<T*>(base) + i) = pack;
}

// ---- per-phase element ops: run<W> handles elements i .. i + W - 1 of one row ----------------

template <typename P, typename A>
struct SampleOp {
  A num_data;
  uint32_t k0, k1;
  template <int W>
  __device__ void run(const TensorRow<3>& row, int64_t i) const {
    const auto mean = load<A, W>(row.ptr[1], i);
    const auto precision = load<A, W>(row.ptr[2], i);
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const uint64_t offset = static_cast<uint64_t>(row.offset + i + j);
      const float z = philox_randn(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), k0, k1);
      param.v[j] = static_cast<P>(bsam_sample_param<A>(mean.v[j], precision.v[j], static_cast<A>(z), num_data));
    }
    store<P, W>(row.ptr[0], i, param);
  }
};

template <typename P, typename A>
struct BsamPerturbOp {
  A rho;
  bool accumulate;
  template <int W>
  __device__ void run(const TensorRow<5>& row, int64_t i) const {
    const auto grad = load<P, W>(row.ptr[1], i);
    const auto mean = load<A, W>(row.ptr[2], i);
    const auto precision = load<A, W>(row.ptr[3], i);
    Pack<A, W> curvature_sum;
    if (accumulate) curvature_sum = load<A, W>(row.ptr[4], i);
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A g = static_cast<A>(grad.v[j]);
      param.v[j] = static_cast<P>(bsam_perturb_param<A>(g, mean.v[j], precision.v[j], rho));
      const A a = bsam_curvature<A>(g, precision.v[j]);
      curvature_sum.v[j] = accumulate ? curvature_sum.v[j] + a : a;
    }
    store<P, W>(row.ptr[0], i, param);
    store<A, W>(row.ptr[4], i, curvature_sum);
  }
};

template <typename P, typename A>
struct BsamUpdateOp {
  BsamUpdateCoeffs<A> c;
  template <int W>
  __device__ void run(const TensorRow<6>& row, int64_t i) const {
    const auto grad = load<P, W>(row.ptr[1], i);
    auto mean = load<A, W>(row.ptr[2], i);
    auto precision = load<A, W>(row.ptr[3], i);
    auto momentum = load<A, W>(row.ptr[4], i);
    const auto curvature_sum = load<A, W>(row.ptr[5], i);
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      bsam_update_element<A>(static_cast<A>(grad.v[j]), curvature_sum.v[j], mean.v[j], precision.v[j], momentum.v[j], c);
      param.v[j] = static_cast<P>(mean.v[j]);
    }
    store<A, W>(row.ptr[2], i, mean);
    store<A, W>(row.ptr[3], i, precision);
    store<A, W>(row.ptr[4], i, momentum);
    store<P, W>(row.ptr[0], i, param);
  }
};

template <typename P, typename A>
struct RestoreOp {
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
  const A* scale;  // on the device: no host sync
  bool adaptive;
  template <int W>
  __device__ void run(const TensorRow<3>& row, int64_t i) const {
    const auto grad = load<P, W>(row.ptr[1], i);
    const auto weight = load<A, W>(row.ptr[2], i);
    const A s = *scale;
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      param.v[j] = static_cast<P>(sam_perturb_param<A>(static_cast<A>(grad.v[j]), weight.v[j], s, adaptive));
    }
    store<P, W>(row.ptr[0], i, param);
  }
};

template <typename P, typename A>
struct SgdOp {
  SgdCoeffs<A> c;
  template <int W>
  __device__ void run(const TensorRow<4>& row, int64_t i) const {
    const auto grad = load<P, W>(row.ptr[1], i);
    auto weight = load<A, W>(row.ptr[2], i);
    auto buf = load<A, W>(row.ptr[3], i);
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      sam_sgd_element<A>(static_cast<A>(grad.v[j]), weight.v[j], buf.v[j], c);
      param.v[j] = static_cast<P>(weight.v[j]);
    }
    store<A, W>(row.ptr[2], i, weight);
    store<A, W>(row.ptr[3], i, buf);
    store<P, W>(row.ptr[0], i, param);
  }
};

template <typename P, typename A>
struct AdamwOp {
  AdamwCoeffs<A> c;
  template <int W>
  __device__ void run(const TensorRow<5>& row, int64_t i) const {
    const auto grad = load<P, W>(row.ptr[1], i);
    auto weight = load<A, W>(row.ptr[2], i);
    auto momentum = load<A, W>(row.ptr[3], i);
    auto variance = load<A, W>(row.ptr[4], i);
    Pack<P, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      sam_adamw_element<A>(static_cast<A>(grad.v[j]), weight.v[j], momentum.v[j], variance.v[j], c);
      param.v[j] = static_cast<P>(weight.v[j]);
    }
    store<A, W>(row.ptr[2], i, weight);
    store<A, W>(row.ptr[3], i, momentum);
    store<A, W>(row.ptr[4], i, variance);
    store<P, W>(row.ptr[0], i, param);
  }
};

// ---- the multi-tensor kernel -----------------------------------------------------------------

// Block b runs op over chunk b: vectors of V elements where the row is aligned, then the tail.
template <int N, int V, typename Op>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const TensorRow<N>* rows, const Chunk* chunks, Op op) {
  const Chunk chunk = chunks[blockIdx.x];
  const TensorRow<N> row = rows[chunk.row];
  int64_t tail = chunk.begin;
  if (row.aligned) {  // chunk.begin is a multiple of kCudaChunk, hence of V
    const int64_t vectors = (chunk.end - chunk.begin) / V;
#pragma unroll 2  // ptxas 13 spilled in restore<float> at the default unroll of 4
    for (int64_t k = threadIdx.x; k < vectors; k += kThreads) op.template run<V>(row, chunk.begin + k * V);
    tail = chunk.begin + vectors * V;
  }
  for (int64_t i = tail + threadIdx.x; i < chunk.end; i += kThreads) op.template run<1>(row, i);
}

// The rows and chunks as one device buffer, copied from pinned memory on the current stream.
template <int N>
std::pair<at::Tensor, const Chunk*> upload(const std::vector<TensorRow<N>>& rows, const std::vector<Chunk>& chunks,
                                           at::Device device) {
  const size_t row_bytes = rows.size() * sizeof(TensorRow<N>);
  const size_t chunk_bytes = chunks.size() * sizeof(Chunk);
  auto host = at::empty({static_cast<int64_t>(row_bytes + chunk_bytes)},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), rows.data(), row_bytes);
  std::memcpy(host.data_ptr<uint8_t>() + row_bytes, chunks.data(), chunk_bytes);
  auto table = host.to(device, /*non_blocking=*/true);
  return {table, reinterpret_cast<const Chunk*>(table.data_ptr<uint8_t>() + row_bytes)};
}

template <int N, typename A, typename Op>
void launch(const std::vector<TensorRow<N>>& rows, at::Device device, const Op& op) {
  const auto chunks = plan_chunks(rows, kCudaChunk);
  if (chunks.empty()) return;
  const auto [table, chunk_table] = upload(rows, chunks, device);
  constexpr int V = 16 / sizeof(A);
  multi_tensor_kernel<N, V, Op><<<static_cast<unsigned>(chunks.size()), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const TensorRow<N>*>(table.data_ptr()), chunk_table, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define SB_DISPATCH_PARAM_DTYPE(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

void bsam_sample_cuda(at::TensorList params, at::TensorList means, at::TensorList precisions,
                      at::IntArrayRef offsets, double num_data, int64_t seed) {
  check_group("bsam_sample", params, {}, {{"means", means}, {"precisions", precisions}});
  TORCH_CHECK(offsets.size() == params.size(), "bsam_sample: ", offsets.size(), " offsets for ", params.size(),
              " params");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto key = philox_key(seed);
  const uint32_t k0 = key.first, k1 = key.second;
  const auto rows = make_rows<3>({params, means, precisions}, offsets);
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "bsam_sample", [&] {
    using A = acc_t<scalar_t>;
    launch<3, A>(rows, params[0].device(), SampleOp<scalar_t, A>{static_cast<A>(num_data), k0, k1});
  });
}

void bsam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList means, at::TensorList precisions,
                       at::TensorList curvature_sums, double rho, bool accumulate) {
  check_group("bsam_perturb", params, {{"grads", grads}},
              {{"means", means}, {"precisions", precisions}, {"curvature_sums", curvature_sums}});
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto rows = make_rows<5>({params, grads, means, precisions, curvature_sums});
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "bsam_perturb", [&] {
    using A = acc_t<scalar_t>;
    launch<5, A>(rows, params[0].device(), BsamPerturbOp<scalar_t, A>{static_cast<A>(rho), accumulate});
  });
}

void bsam_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList means, at::TensorList precisions,
                      at::TensorList momentums, at::TensorList curvature_sums, double lr, double beta1, double beta2,
                      double weight_decay, double damping, int64_t splits) {
  check_group("bsam_update", params, {{"grads", grads}},
              {{"means", means}, {"precisions", precisions}, {"momentums", momentums}, {"curvature_sums", curvature_sums}});
  TORCH_CHECK(splits >= 1, "bsam_update: splits must be >= 1, got ", splits);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto rows = make_rows<6>({params, grads, means, precisions, momentums, curvature_sums});
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "bsam_update", [&] {
    using A = acc_t<scalar_t>;
    const BsamUpdateCoeffs<A> c{static_cast<A>(splits),       static_cast<A>(lr),        static_cast<A>(beta1),
                                static_cast<A>(1 - beta1),    static_cast<A>(beta2),     static_cast<A>(1 - beta2),
                                static_cast<A>(weight_decay), static_cast<A>(damping)};
    launch<6, A>(rows, params[0].device(), BsamUpdateOp<scalar_t, A>{c});
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
    sq_norm_kernel(const TensorRow<2>* rows, const Chunk* chunks, bool adaptive, double* partial) {
  const Chunk chunk = chunks[blockIdx.x];
  const TensorRow<2> row = rows[chunk.row];
  const P* grad = static_cast<const P*>(row.ptr[0]);
  const A* weight = static_cast<const A*>(row.ptr[1]);
  A sum = 0;
  for (int64_t i = chunk.begin + threadIdx.x; i < chunk.end; i += kThreads) {
    sum += sam_sq_term<A>(static_cast<A>(grad[i]), weight[i], adaptive);
  }
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

at::Tensor sam_sq_norm_cuda(at::TensorList grads, at::TensorList weights, bool adaptive) {
  check_group("sam_sq_norm", grads, {}, {{"weights", weights}});
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto rows = make_rows<2>({grads, weights});
  const auto chunks = plan_chunks(rows, kCudaChunk);
  if (chunks.empty()) return at::zeros({}, weights[0].options());
  const auto [table, chunk_table] = upload(rows, chunks, grads[0].device());
  auto partial = at::empty({static_cast<int64_t>(chunks.size())}, weights[0].options().dtype(at::kDouble));
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "sam_sq_norm", [&] {
    using A = acc_t<scalar_t>;
    sq_norm_kernel<scalar_t, A><<<static_cast<unsigned>(chunks.size()), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const TensorRow<2>*>(table.data_ptr()), chunk_table, adaptive, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // a fixed-order sum of the partials: deterministic
  return partial.sum().to(weights[0].scalar_type());
}

void sam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList weights, const at::Tensor& scale,
                      bool adaptive) {
  check_group("sam_perturb", params, {{"grads", grads}}, {{"weights", weights}});
  TORCH_CHECK(scale.numel() == 1, "sam_perturb: scale must hold one number, got shape ", scale.sizes());
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto rows = make_rows<3>({params, grads, weights});
  const auto scale_dev = scale.to(params[0].device(), weights[0].scalar_type()).contiguous();
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_perturb", [&] {
    using A = acc_t<scalar_t>;
    launch<3, A>(rows, params[0].device(), SamPerturbOp<scalar_t, A>{scale_dev.data_ptr<A>(), adaptive});
  });
}

void sam_update_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList weights,
                         at::TensorList momentums, double lr, double momentum, double weight_decay, bool nesterov,
                         int64_t splits) {
  check_group("sam_update_sgd", params, {{"grads", grads}}, {{"weights", weights}, {"momentums", momentums}});
  TORCH_CHECK(splits >= 1, "sam_update_sgd: splits must be >= 1, got ", splits);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto rows = make_rows<4>({params, grads, weights, momentums});
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_sgd", [&] {
    using A = acc_t<scalar_t>;
    const SgdCoeffs<A> c{static_cast<A>(splits), static_cast<A>(lr), static_cast<A>(momentum),
                         static_cast<A>(weight_decay), nesterov};
    launch<4, A>(rows, params[0].device(), SgdOp<scalar_t, A>{c});
  });
}

void sam_update_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList weights,
                           at::TensorList momentums, at::TensorList variances, double lr, double beta1, double beta2,
                           double eps, double weight_decay, int64_t step, int64_t splits) {
  check_group("sam_update_adamw", params, {{"grads", grads}},
              {{"weights", weights}, {"momentums", momentums}, {"variances", variances}});
  TORCH_CHECK(splits >= 1 && step >= 1, "sam_update_adamw: splits and step must be >= 1");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto rows = make_rows<5>({params, grads, weights, momentums, variances});
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_adamw", [&] {
    using A = acc_t<scalar_t>;
    const double bias1 = 1 - std::pow(beta1, static_cast<double>(step));
    const double bias2 = 1 - std::pow(beta2, static_cast<double>(step));
    const AdamwCoeffs<A> c{static_cast<A>(splits), static_cast<A>(1 - lr * weight_decay),
                           static_cast<A>(beta1),  static_cast<A>(1 - beta1),
                           static_cast<A>(beta2),  static_cast<A>(1 - beta2),
                           static_cast<A>(bias2),  static_cast<A>(eps),
                           static_cast<A>(lr / bias1)};
    launch<5, A>(rows, params[0].device(), AdamwOp<scalar_t, A>{c});
  });
}

__global__ void philox_randn_kernel(float* out, int64_t n, uint64_t start, uint32_t k0, uint32_t k1) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t offset = start + static_cast<uint64_t>(i);
    out[i] = philox_randn(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), k0, k1);
  }
}

void philox_randn_cuda(const at::Tensor& out, int64_t seed, int64_t start) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "philox_randn_: out must be contiguous float32");
  TORCH_CHECK(start >= 0, "philox_randn_: start must be >= 0, got ", start);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const auto key = philox_key(seed);
  const uint32_t k0 = key.first, k1 = key.second;
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, 65536);
  philox_randn_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(start), k0, k1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, CUDA, m) {
  m.impl("bsam_sample", &bsam_sample_cuda);
  m.impl("bsam_perturb", &bsam_perturb_cuda);
  m.impl("bsam_update", &bsam_update_cuda);
  m.impl("restore", &restore_cuda);
  m.impl("sam_sq_norm", &sam_sq_norm_cuda);
  m.impl("sam_perturb", &sam_perturb_cuda);
  m.impl("sam_update_sgd", &sam_update_sgd_cuda);
  m.impl("sam_update_adamw", &sam_update_adamw_cuda);
  m.impl("philox_randn_", &philox_randn_cuda);
}

}  // namespace sambayes
