// The CUDA ops on gradients and weights that both optimizers share: the found-inf check, the fold of
// sub-batch gradients into their sum, and θ = the state (restore). Float32 math for
// float32/bfloat16/float16 parameters.
#include "multi_tensor_cuda.cuh"

namespace sambayes {
namespace {

// ---- per-phase element ops (see multi_tensor_cuda.cuh) ---------------------------------------

template <typename P, typename A>
struct FindNonfiniteOp {
  float* found_inf;
  __device__ FindNonfiniteOp prepared() const { return *this; }
  template <int W>
  __device__ void run(const TensorRow<1>& row, int64_t i) const {
    const auto grad = load_widened<P, A, W>(row.ptr[0], i);
    bool bad = false;
#pragma unroll
    for (int j = 0; j < W; ++j) bad |= !is_finite(grad.v[j]);
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
      bad |= !is_finite(fold_element<P, A>(static_cast<A>(grad.v[j]), total.v[j], grad.v[j], stage));
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

template <typename P, typename A>
struct RestoreOp {
  __device__ RestoreOp prepared() const { return *this; }
  template <int W>
  __device__ void run(const TensorRow<2>& row, int64_t i) const {
    store_rounded<P>(row.ptr[0], i, load<A, W>(row.ptr[1], i));
  }
};

// ---- the ops ------------------------------------------------------------------------------------

void find_nonfinite_cuda(at::TensorList grads, const at::Tensor& found_inf) {
  check_group("find_nonfinite", grads, {}, {});
  const auto device = grads[0].device();
  const DeviceGuard guard(device);
  const auto rows = make_rows<1>({grads});
  float* flag = device_scalar(found_inf, device, "found_inf");
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "find_nonfinite", [&] {
    using A = acc_t<scalar_t>;
    launch<1, A>(rows, device, FindNonfiniteOp<scalar_t, A>{flag});
  });
}

void fold_grads_cuda(at::TensorList grads, at::TensorList grad_sums, const at::Tensor& found_inf, bool first,
                     bool last) {
  check_fold_grads(grads, grad_sums, first, last);
  const auto device = grads[0].device();
  const DeviceGuard guard(device);
  auto rows = make_rows<2>({grads, grad_sums});
  const auto base = make_relative<2>(rows, 1);
  float* flag = device_scalar(found_inf, device, "found_inf");
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "fold_grads", [&] {
    using A = acc_t<scalar_t>;
    launch<2, A, 1>(rows, device, FoldOp<scalar_t, A>{flag, first ? 0 : last ? 2 : 1}, base);
  });
}

void restore_cuda(at::TensorList params, at::TensorList weights) {
  check_group("restore", params, {}, {{"weights", weights}});
  const DeviceGuard guard(params[0].device());
  const auto rows = make_rows<2>({params, weights});
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "restore", [&] {
    using A = acc_t<scalar_t>;
    launch<2, A>(rows, params[0].device(), RestoreOp<scalar_t, A>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, SB_CUDA_KEY, m) {
  m.impl("find_nonfinite", &find_nonfinite_cuda);
  m.impl("fold_grads", &fold_grads_cuda);
  m.impl("restore", &restore_cuda);
}

}  // namespace sambayes
