// SAM's CUDA ops: the squared norm of the (adaptively scaled) gradient, the perturbation, the SGD
// and AdamW updates. Float32 math for float32/bfloat16/float16 parameters. Each op unscales the
// gradient; the norm raises the step's found-inf flag on inf/NaN, the updates leave the state alone
// when it is set.
#include "multi_tensor_cuda.cuh"

namespace sambayes {
namespace {

// ---- per-phase element ops (see multi_tensor_cuda.cuh) ---------------------------------------

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
    const auto grad = load_widened<P, A, W>(row.ptr[1], i);
    const auto weight = load<A, W>(row.ptr[2], i);
    Pack<A, W> param;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const A g = grad.v[j] * inv_scale;
      param.v[j] = sam_perturb_param<A>(g, weight.v[j], scale, adaptive);
    }
    store_rounded<P>(row.ptr[0], i, param);
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
      const auto grad = load_widened<P, A, W>(row.ptr[1], i);
      auto buf = load<A, W>(row.ptr[3], i);
#pragma unroll
      for (int j = 0; j < W; ++j) sam_sgd_element<A>(grad.v[j] * inv_scale, weight.v[j], buf.v[j], c);
      store<A, W>(row.ptr[2], i, weight);
      store<A, W>(row.ptr[3], i, buf);
    }
    store_rounded<P>(row.ptr[0], i, weight);
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
    if (lr_ptr) op.c.decay_factor = static_cast<A>(adamw_decay_factor(rate, weight_decay));
    op.c.bias2 = static_cast<A>(adamw_bias2(beta2, t));
    op.c.step_size = static_cast<A>(adamw_step_size(rate, beta1, t));
    return op;
  }
  template <int W>
  __device__ void run(const TensorRow<5>& row, int64_t i) const {
    auto weight = load<A, W>(row.ptr[2], i);
    if (!skip) {
      const auto grad = load_widened<P, A, W>(row.ptr[1], i);
      auto momentum = load<A, W>(row.ptr[3], i);
      auto variance = load<A, W>(row.ptr[4], i);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        sam_adamw_element<A>(grad.v[j] * inv_scale, weight.v[j], momentum.v[j], variance.v[j], c);
      }
      store<A, W>(row.ptr[2], i, weight);
      store<A, W>(row.ptr[3], i, momentum);
      store<A, W>(row.ptr[4], i, variance);
    }
    store_rounded<P>(row.ptr[0], i, weight);
    store_zero<P, W>(row.ptr[1], i);
  }
};

// One partial sum of (T·g)² per chunk, in double; the caller sums the partials. Where the row is aligned,
// vectors of 16 bytes of state (4 float32 or 2 float64 elements) and the matching parameters, then the tail.
template <typename P, typename A>
__global__ void __launch_bounds__(kThreads)
    sq_norm_kernel(const TensorRow<2>* rows, const Chunk* chunks, char* origin, bool adaptive,
                   const float* inv_scale_ptr, float* found_inf, double* partial) {
  constexpr int V = 16 / sizeof(A);
  const Chunk chunk = chunks[blockIdx.x];
  TensorRow<2> row = rows[chunk.row];
  globalize(row, origin);
  const A inv_scale = static_cast<A>(*inv_scale_ptr);
  A sum = 0;
  bool bad = false;
  const auto add = [&](const auto& grad, const auto& weight) {
#pragma unroll
    for (int j = 0; j < static_cast<int>(sizeof(grad.v) / sizeof(grad.v[0])); ++j) {
      const A g = grad.v[j] * inv_scale;
      bad |= !is_finite(g);
      sum += sam_sq_term<A>(g, weight.v[j], adaptive);
    }
  };
  int64_t tail = chunk.begin;
  if (row.aligned) {  // chunk.begin is a multiple of kCudaChunk, hence of V
    const int64_t vectors = (chunk.end - chunk.begin) / V;
#pragma unroll 1
    for (int64_t k = threadIdx.x; k < vectors; k += kThreads) {
      const int64_t i = chunk.begin + k * V;
      Pack<A, V> weight{};
      if (adaptive) weight = load<A, V>(row.ptr[1], i);
      add(load_widened<P, A, V>(row.ptr[0], i), weight);
    }
    tail = chunk.begin + vectors * V;
  }
  for (int64_t i = tail + threadIdx.x; i < chunk.end; i += kThreads) {
    Pack<A, 1> weight{};
    if (adaptive) weight = load<A, 1>(row.ptr[1], i);
    add(load_widened<P, A, 1>(row.ptr[0], i), weight);
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

// ---- the ops ------------------------------------------------------------------------------------

at::Tensor sam_sq_norm_cuda(at::TensorList grads, at::TensorList weights, const at::Tensor& found_inf,
                            const at::Tensor& inv_scale, bool adaptive) {
  check_group("sam_sq_norm", grads, {}, {{"weights", weights}});
  const auto device = grads[0].device();
  const DeviceGuard guard(device);
  const auto rows = make_rows<2>({grads, weights});
  const auto table = table_cache().get(rows, device);
  if (table.num_chunks == 0) return weights[0].new_zeros({});
  float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  auto partial = weights[0].new_empty({table.num_chunks}, at::kDouble);
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "sam_sq_norm", [&] {
    using A = acc_t<scalar_t>;
    launch_kernel(sq_norm_kernel<scalar_t, A>, static_cast<unsigned>(table.num_chunks), kThreads,
                  current_stream(device), table.rows, table.chunks, static_cast<char*>(nullptr), adaptive, inv, flag,
                  partial.data_ptr<double>());
  });
  // a fixed-order sum of the partials: deterministic
  return partial.sum().to(weights[0].scalar_type());
}

void sam_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList weights, const at::Tensor& inv_scale,
                      const at::Tensor& scale, bool adaptive) {
  check_sam_perturb(params, grads, weights, scale);
  const auto device = params[0].device();
  // read in the kernel (no host sync); SAM hands it over in float64 already
  const auto scale64 = scale.scalar_type() == at::kDouble ? scale : scale.to(at::kDouble);
  const DeviceGuard guard(device);
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
  check_sam_update_sgd(params, grad_sums, weights, momentums, splits);
  const auto device = params[0].device();
  const double* lr_ptr = optional_scalar<double>(lr_tensor, device, "sam_update_sgd", "lr_tensor");
  const DeviceGuard guard(device);
  const auto rows = make_rows<4>({params, grad_sums, weights, momentums});
  const float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_sgd", [&] {
    using A = acc_t<scalar_t>;
    const auto c = sgd_coeffs<A>(splits, lr, momentum, weight_decay, nesterov);
    launch<4, A>(rows, device, SgdOp<scalar_t, A>{c, flag, inv, false, A(1), lr_ptr});
  });
}

void sam_update_adamw_cuda(at::TensorList params, at::TensorList grad_sums, at::TensorList weights,
                           at::TensorList momentums, at::TensorList variances, const at::Tensor& found_inf,
                           const at::Tensor& inv_scale, const at::Tensor& step, double lr, double beta1, double beta2,
                           double eps, double weight_decay, int64_t splits,
                           const std::optional<at::Tensor>& lr_tensor) {
  check_sam_update_adamw(params, grad_sums, weights, momentums, variances, step, splits);
  const auto device = params[0].device();
  const double* lr_ptr = optional_scalar<double>(lr_tensor, device, "sam_update_adamw", "lr_tensor");
  const DeviceGuard guard(device);
  const auto rows = make_rows<5>({params, grad_sums, weights, momentums, variances});
  const float* flag = device_scalar(found_inf, device, "found_inf");
  const float* inv = device_scalar(inv_scale, device, "inv_scale");
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_adamw", [&] {
    using A = acc_t<scalar_t>;
    // the step lives on the device: bias2 and step_size (and decay_factor from lr_tensor where given) are
    // filled in there (AdamwOp::prepared); here at step 1, a placeholder
    const auto c = adamw_coeffs<A>(splits, lr, beta1, beta2, eps, weight_decay, 1.0);
    launch<5, A>(rows, device, AdamwOp<scalar_t, A>{c, lr, beta1, beta2, weight_decay, step.data_ptr<double>(), flag,
                                                    inv, false, A(1), lr_ptr});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, SB_CUDA_KEY, m) {
  m.impl("sam_sq_norm", &sam_sq_norm_cuda);
  m.impl("sam_perturb", &sam_perturb_cuda);
  m.impl("sam_update_sgd", &sam_update_sgd_cuda);
  m.impl("sam_update_adamw", &sam_update_adamw_cuda);
}

}  // namespace sambayes
