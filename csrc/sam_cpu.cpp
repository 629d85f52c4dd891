// SAM's CPU ops: the squared norm of the (adaptively scaled) gradient, the perturbation, the SGD
// and AdamW updates. Each op unscales the gradient (GradScaler); the norm checks it for inf/NaN (the
// step's found-inf flag), the perturbation and the updates zero it for the next backward pass, and
// the updates leave the state alone on a skipped step.
#include "multi_tensor_cpu.h"

namespace sambayes {
namespace {

// ---- per-phase loops -------------------------------------------------------------------------

// Σ (T·g)² with 16 independent partial sums, so that the sum vectorizes without reassociation flags.
template <bool Adaptive, typename P, typename A>
SB_CLONES double sq_norm_loop(const P* __restrict grad, const A* __restrict weight, int64_t n, A inv_scale, bool& bad) {
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
SB_CLONES void sam_perturb_loop(P* __restrict param, P* __restrict grad, const A* __restrict weight, int64_t n,
                                A scale, A inv_scale) {
  for (int64_t i = 0; i < n; ++i) {
    param[i] = static_cast<P>(sam_perturb_param<A>(static_cast<A>(grad[i]) * inv_scale, weight[i], scale, Adaptive));
    grad[i] = P(0);
  }
}

template <bool Nesterov, typename P, typename A>
SB_CLONES void sgd_loop(P* __restrict param, P* __restrict grad, A* __restrict weight, A* __restrict buf, int64_t n,
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
SB_CLONES void adamw_loop(P* __restrict param, P* __restrict grad, A* __restrict weight, A* __restrict momentum,
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

// ---- the ops ------------------------------------------------------------------------------------

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
    const auto loop = adaptive ? sq_norm_loop<true, P, A> : sq_norm_loop<false, P, A>;
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const auto& row = rows[chunks[c].row];
        const int64_t b = chunks[c].begin;
        bool bad = false;
        partial[c] = loop(at_<P>(row.ptr[0], b), at_<A>(row.ptr[1], b), chunks[c].end - b, static_cast<A>(inv), bad);
        if (bad) raise_flag(found_inf);
      }
    });
  });
  double total = 0;
  for (double p : partial) total += p;
  return weights[0].new_full({}, total);
}

void sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList weights, const at::Tensor& inv_scale,
                     const at::Tensor& scale, bool adaptive) {
  check_sam_perturb(params, grads, weights, scale);
  const float inv = read_scalar(inv_scale, "inv_scale");
  const auto rows = make_rows<3>({params, grads, weights});
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_perturb", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    const A s = scale.to(weights[0].scalar_type()).item<A>();  // read in the state dtype
    const auto loop = adaptive ? sam_perturb_loop<true, P, A> : sam_perturb_loop<false, P, A>;
    for_each_chunk(rows, [&](const TensorRow<3>& row, int64_t b, int64_t e) {
      loop(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[2], b), e - b, s, static_cast<A>(inv));
    });
  });
}

void sam_update_sgd_cpu(at::TensorList params, at::TensorList grad_sums, at::TensorList weights,
                        at::TensorList momentums, const at::Tensor& found_inf, const at::Tensor& inv_scale, double lr,
                        double momentum, double weight_decay, bool nesterov, int64_t splits,
                        const std::optional<at::Tensor>& lr_tensor) {
  check_sam_update_sgd(params, grad_sums, weights, momentums, splits);
  lr = scalar_or(lr_tensor, lr, "sam_update_sgd", "lr_tensor");
  const auto rows = make_rows<4>({params, grad_sums, weights, momentums});
  if (read_scalar(found_inf, "found_inf") != 0.0f) return skip_step(rows, params[0].scalar_type(), 2);
  const float inv = read_scalar(inv_scale, "inv_scale");
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_sgd", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    const auto c = sgd_coeffs<A>(splits, lr, momentum, weight_decay, nesterov);
    const auto loop = nesterov ? sgd_loop<true, P, A> : sgd_loop<false, P, A>;
    for_each_chunk(rows, [&](const TensorRow<4>& row, int64_t b, int64_t e) {
      loop(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[2], b), at_<A>(row.ptr[3], b), e - b, c,
           static_cast<A>(inv));
    });
  });
}

void sam_update_adamw_cpu(at::TensorList params, at::TensorList grad_sums, at::TensorList weights,
                          at::TensorList momentums, at::TensorList variances, const at::Tensor& found_inf,
                          const at::Tensor& inv_scale, const at::Tensor& step, double lr, double beta1, double beta2,
                          double eps, double weight_decay, int64_t splits,
                          const std::optional<at::Tensor>& lr_tensor) {
  check_sam_update_adamw(params, grad_sums, weights, momentums, variances, step, splits);
  lr = scalar_or(lr_tensor, lr, "sam_update_adamw", "lr_tensor");
  const auto rows = make_rows<5>({params, grad_sums, weights, momentums, variances});
  if (read_scalar(found_inf, "found_inf") != 0.0f) return skip_step(rows, params[0].scalar_type(), 2);
  const float inv = read_scalar(inv_scale, "inv_scale");
  const double t = *step.data_ptr<double>();
  TORCH_CHECK(t >= 1, "sam_update_adamw: step must be >= 1");
  SB_DISPATCH_PARAM_DTYPE(params[0].scalar_type(), "sam_update_adamw", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    const auto c = adamw_coeffs<A>(splits, lr, beta1, beta2, eps, weight_decay, t);
    for_each_chunk(rows, [&](const TensorRow<5>& row, int64_t b, int64_t e) {
      adamw_loop<P, A>(at_<P>(row.ptr[0], b), at_<P>(row.ptr[1], b), at_<A>(row.ptr[2], b), at_<A>(row.ptr[3], b),
                       at_<A>(row.ptr[4], b), e - b, c, static_cast<A>(inv));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sambayes_C, CPU, m) {
  m.impl("sam_sq_norm", &sam_sq_norm_cpu);
  m.impl("sam_perturb", &sam_perturb_cpu);
  m.impl("sam_update_sgd", &sam_update_sgd_cpu);
  m.impl("sam_update_adamw", &sam_update_adamw_cpu);
}

}  // namespace sambayes
