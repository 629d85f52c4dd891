// The CPU ops on gradients and weights that both optimizers share: the found-inf check, the fold of
// sub-batch gradients into their sum, and θ = the state (restore).
#include "multi_tensor_cpu.h"

namespace sambayes {
namespace {

// ---- per-phase loops -------------------------------------------------------------------------
// `bad` collects "some value read was inf or NaN" as an integer or-reduction, which the compiler
// vectorizes (a bool one it does not).

template <typename P>
SB_CLONES bool find_nonfinite_loop(const P* __restrict grad, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !is_finite(static_cast<acc_t<P>>(grad[i]));
  return bad != 0;
}

// Stage 0: sum = g, g = 0; stage 1: sum += g, g = 0; stage 2 (last): g = sum + g. Flags a
// non-finite sum: at the last stage as rounded into .grad (a float16 sum of finite values may overflow).
template <int Stage, typename P, typename A>
SB_CLONES bool fold_loop(P* __restrict grad, A* __restrict grad_sum, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bad |= !is_finite(fold_element<P, A>(static_cast<A>(grad[i]), grad_sum[i], grad[i], Stage));
  }
  return bad != 0;
}

template <typename P, typename A>
SB_CLONES void restore_loop(P* __restrict param, const A* __restrict weight, int64_t n) {
  for (int64_t i = 0; i < n; ++i) param[i] = static_cast<P>(weight[i]);
}

// ---- the ops ------------------------------------------------------------------------------------

void find_nonfinite_cpu(at::TensorList grads, const at::Tensor& found_inf) {
  check_group("find_nonfinite", grads, {}, {});
  read_scalar(found_inf, "found_inf");
  const auto rows = make_rows<1>({grads});
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "find_nonfinite", [&] {
    using P = scalar_t;
    for_each_chunk(rows, [&](const TensorRow<1>& row, int64_t b, int64_t e) {
      if (find_nonfinite_loop<P>(at_<P>(row.ptr[0], b), e - b)) raise_flag(found_inf);
    });
  });
}

void fold_grads_cpu(at::TensorList grads, at::TensorList grad_sums, const at::Tensor& found_inf, bool first,
                    bool last) {
  check_fold_grads(grads, grad_sums, first, last);
  read_scalar(found_inf, "found_inf");
  const auto rows = make_rows<2>({grads, grad_sums});
  SB_DISPATCH_PARAM_DTYPE(grads[0].scalar_type(), "fold_grads", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    const auto loop = first ? fold_loop<0, P, A> : last ? fold_loop<2, P, A> : fold_loop<1, P, A>;
    for_each_chunk(rows, [&](const TensorRow<2>& row, int64_t b, int64_t e) {
      if (loop(at_<P>(row.ptr[0], b), at_<A>(row.ptr[1], b), e - b)) raise_flag(found_inf);
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
      restore_loop<P, A>(at_<P>(row.ptr[0], b), at_<A>(row.ptr[1], b), e - b);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, CPU, m) {
  m.impl("find_nonfinite", &find_nonfinite_cpu);
  m.impl("fold_grads", &fold_grads_cpu);
  m.impl("restore", &restore_cpu);
}

}  // namespace sambayes
