// Multi-tensor launching, shared by the CPU and CUDA kernels: one pass per phase over
// all tensors of a (device, dtype) group. The group's tensors are cut into chunks of
// at most `chunk` elements; a CPU task or a CUDA block handles one chunk.
#pragma once

// The Tensor class and what each file uses, never ATen/ATen.h (a header per PyTorch op): parsing it took a third
// of a CPU file's compile and of each of nvcc's four passes over a CUDA file.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace sambayes {

// One tensor index of the group: the base pointer of each of the N parallel lists,
// the element count and the element offset of its noise stream.
template <int N>
struct TensorRow {
  void* ptr[N];
  int64_t numel;
  int64_t offset;
  int64_t aligned;  // every pointer is 16-byte aligned (CUDA vector loads)
};

// Elements [begin, end) of tensor `row`.
struct Chunk {
  int64_t row;
  int64_t begin;
  int64_t end;
};

// The state dtype of a parameter dtype: float64 for float64, float32 otherwise.
inline at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The same in C++ types: the state (and math) type of parameter type P.
template <typename P>
using acc_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

#define SB_DISPATCH_PARAM_DTYPE(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

// body(P{}, S{}) with P the parameter dtype and S the stored dtype of bSAM's precision and momentum:
// the state dtype, or c10::BFloat16 (float32 state only, as check_group's stored_like enforces).
template <typename F>
void dispatch_bsam(at::ScalarType dtype, bool bf16_state, F&& body) {
  SB_DISPATCH_PARAM_DTYPE(dtype, "bsam", [&] {
    using P = scalar_t;
    using A = acc_t<P>;
    if constexpr (std::is_same_v<A, float>) {
      if (bf16_state) return body(P{}, c10::BFloat16{});
    }
    body(P{}, A{});
  });
}

using NamedList = std::pair<const char*, at::TensorList>;

// The element index of each tensor's first element (bSAM's noise and rounding streams): one per parameter.
inline void check_offsets(const char* op, at::IntArrayRef offsets, at::TensorList params) {
  TORCH_CHECK(offsets.size() == params.size(), op, ": ", offsets.size(), " offsets for ", params.size(), " params");
}

// The number of sub-batches an update averages its sums over: at least one.
inline void check_splits(const char* op, int64_t splits) {
  TORCH_CHECK(splits >= 1, op, ": splits must be >= 1, got ", splits);
}

// Parallel lists of one group: same length, same numel at each index, contiguous, one
// device; `param_like` lists hold the parameter dtype, `state_like` ones the state dtype,
// `stored_like` ones (bSAM's precision and momentum) the state dtype or, for float32 state,
// bfloat16 (BSAM(state_dtype=torch.bfloat16)): the dtype of the first one, all of them alike.
inline void check_group(const char* op, at::TensorList params, std::initializer_list<NamedList> param_like,
                        std::initializer_list<NamedList> state_like,
                        std::initializer_list<NamedList> stored_like = {}) {
  TORCH_CHECK(!params.empty(), op, ": empty parameter list");
  const auto device = params[0].device();
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": parameters must be float32, float64, bfloat16 or float16, got ", dtype);
  const auto check_list = [&](const char* name, at::TensorList list, at::ScalarType want) {
    TORCH_CHECK(list.size() == params.size(), op, ": ", name, " has ", list.size(), " tensors, params has ",
                params.size());
    for (size_t i = 0; i < list.size(); ++i) {
      const auto& t = list[i];
      TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", params[0] on ", device);
      TORCH_CHECK(t.scalar_type() == want, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
                  want);
      TORCH_CHECK(t.numel() == params[i].numel(), op, ": ", name, "[", i, "] has ", t.numel(),
                  " elements, params[", i, "] has ", params[i].numel());
      TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] is not contiguous");
    }
  };
  check_list("params", params, dtype);
  for (const auto& [name, list] : param_like) check_list(name, list, dtype);
  for (const auto& [name, list] : state_like) check_list(name, list, state_dtype(dtype));
  if (stored_like.size() == 0) return;
  const auto& [first_name, first_list] = *stored_like.begin();
  TORCH_CHECK(!first_list.empty(), op, ": ", first_name, " is empty");
  const auto stored = first_list[0].scalar_type();
  TORCH_CHECK(stored == state_dtype(dtype) || (stored == at::kBFloat16 && state_dtype(dtype) == at::kFloat), op, ": ",
              first_name, " has dtype ", stored, ", expected ", state_dtype(dtype),
              state_dtype(dtype) == at::kFloat ? " or bfloat16" : "");
  for (const auto& [name, list] : stored_like) check_list(name, list, stored);
}

// ---- the arguments of the ops with more than one check, checked alike on both devices ----------

inline void check_bsam_sample(at::TensorList params, at::TensorList means, at::TensorList precisions,
                              at::IntArrayRef offsets) {
  check_group("bsam_sample", params, {}, {{"means", means}}, {{"precisions", precisions}});
  check_offsets("bsam_sample", offsets, params);
}

inline void check_bsam_update(at::TensorList params, at::TensorList grad_sums, at::TensorList means,
                              at::TensorList precisions, at::TensorList momentums, at::TensorList curvature_sums,
                              at::IntArrayRef offsets, int64_t splits) {
  check_group("bsam_update", params, {{"grad_sums", grad_sums}}, {{"means", means}, {"curvature_sums", curvature_sums}},
              {{"precisions", precisions}, {"momentums", momentums}});
  check_splits("bsam_update", splits);
  check_offsets("bsam_update", offsets, params);
}

inline void check_fold_grads(at::TensorList grads, at::TensorList grad_sums, bool first, bool last) {
  check_group("fold_grads", grads, {}, {{"grad_sums", grad_sums}});
  TORCH_CHECK(!(first && last), "fold_grads: first and last are exclusive (splits > 1)");
}

inline void check_sam_update_sgd(at::TensorList params, at::TensorList grad_sums, at::TensorList weights,
                                 at::TensorList momentums, int64_t splits) {
  check_group("sam_update_sgd", params, {{"grad_sums", grad_sums}}, {{"weights", weights}, {"momentums", momentums}});
  check_splits("sam_update_sgd", splits);
}

// `step`: the updates taken, counting this one (the bias corrections), in float64 on the bucket's device.
inline void check_sam_update_adamw(at::TensorList params, at::TensorList grad_sums, at::TensorList weights,
                                   at::TensorList momentums, at::TensorList variances, const at::Tensor& step,
                                   int64_t splits) {
  check_group("sam_update_adamw", params, {{"grad_sums", grad_sums}},
              {{"weights", weights}, {"momentums", momentums}, {"variances", variances}});
  check_splits("sam_update_adamw", splits);
  TORCH_CHECK(step.device() == params[0].device() && step.scalar_type() == at::kDouble && step.numel() == 1,
              "sam_update_adamw: step must be a float64 tensor of one element on ", params[0].device());
}

// `scale`: one floating-point number on the bucket's device.
inline void check_sam_perturb(at::TensorList params, at::TensorList grads, at::TensorList weights,
                              const at::Tensor& scale) {
  check_group("sam_perturb", params, {{"grads", grads}}, {{"weights", weights}});
  TORCH_CHECK(scale.numel() == 1 && scale.device() == params[0].device() && at::isFloatingType(scale.scalar_type()),
              "sam_perturb: scale must be one floating-point number on ", params[0].device());
}

inline void check_ivon_accumulate(at::TensorList grads, at::TensorList grad_sums, at::TensorList curvature_sums,
                                  at::IntArrayRef offsets) {
  check_group("ivon_accumulate", grads, {}, {{"grad_sums", grad_sums}, {"curvature_sums", curvature_sums}});
  check_offsets("ivon_accumulate", offsets, grads);
}

// `step`: the updates taken, counting this one (the debiasing), in float64 on the bucket's device.
inline void check_ivon_update(at::TensorList params, at::TensorList grad_sums, at::TensorList means,
                              at::TensorList precisions, at::TensorList momentums, at::TensorList curvature_sums,
                              at::IntArrayRef offsets, const at::Tensor& step, int64_t splits) {
  check_group("ivon_update", params, {{"grad_sums", grad_sums}}, {{"means", means}, {"curvature_sums", curvature_sums}},
              {{"precisions", precisions}, {"momentums", momentums}});
  check_splits("ivon_update", splits);
  check_offsets("ivon_update", offsets, params);
  TORCH_CHECK(step.device() == params[0].device() && step.scalar_type() == at::kDouble && step.numel() == 1,
              "ivon_update: step must be a float64 tensor of one element on ", params[0].device());
}

// Whether a stored_like list holds bfloat16 (precision and momentum rounded stochastically).
inline bool stored_in_bf16(at::TensorList stored) {
  return !stored.empty() && stored[0].scalar_type() == at::kBFloat16;
}

// The rows of N parallel lists (the first list decides numel); offsets may be empty.
template <int N>
std::vector<TensorRow<N>> make_rows(const std::array<at::TensorList, N>& lists, at::IntArrayRef offsets = {}) {
  std::vector<TensorRow<N>> rows(lists[0].size());
  for (size_t i = 0; i < rows.size(); ++i) {
    bool aligned = true;
    for (int k = 0; k < N; ++k) {
      rows[i].ptr[k] = lists[k][i].data_ptr();
      aligned = aligned && reinterpret_cast<uintptr_t>(rows[i].ptr[k]) % 16 == 0;
    }
    rows[i].numel = lists[0][i].numel();
    rows[i].offset = offsets.empty() ? 0 : offsets[i];
    rows[i].aligned = aligned;
  }
  return rows;
}

// Cut every row into chunks of at most `chunk` elements (empty tensors give none). noise_space: the
// boundaries fall on noise indices (offset + element) that are multiples of 4 (`chunk` is one), so
// that no chunk splits the four elements of a Philox call.
template <int N>
std::vector<Chunk> plan_chunks(const std::vector<TensorRow<N>>& rows, int64_t chunk, bool noise_space = false) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t shift = noise_space ? rows[i].offset % 4 : 0;
    for (int64_t begin = 0, end = chunk - shift; begin < rows[i].numel; begin = end, end += chunk) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(rows[i].numel, end)});
    }
  }
  return chunks;
}

// Philox key (seed lo, seed hi); a Python int seed below 2^63 arrives as int64.
inline std::pair<uint32_t, uint32_t> philox_key(int64_t seed) {
  TORCH_CHECK(seed >= 0, "seed must be non-negative, got ", seed);
  const auto s = static_cast<uint64_t>(seed);
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32)};
}

// The data of an optional one-element tensor of type T on `device`, or nullptr: a step scalar (seed_tensor,
// lr_tensor) that replaces its int/float argument, read by the kernel so that a captured CUDA graph sees each
// replay's value.
template <typename T>
const T* optional_scalar(const std::optional<at::Tensor>& t, at::Device device, const char* op, const char* what) {
  static_assert(std::is_same_v<T, int64_t> || std::is_same_v<T, double>, "an int64 or float64 scalar");
  if (!t.has_value()) return nullptr;
  constexpr auto dtype = std::is_same_v<T, int64_t> ? at::kLong : at::kDouble;
  TORCH_CHECK(t->device() == device && t->scalar_type() == dtype && t->numel() == 1, op, ": ", what, " must be ",
              std::is_same_v<T, int64_t> ? "an int64" : "a float64", " tensor of one element on ", device, ", got ",
              t->scalar_type(), " of ", t->numel(), " elements on ", t->device());
  return t->data_ptr<T>();
}

}  // namespace sambayes
