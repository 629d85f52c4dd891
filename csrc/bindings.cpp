// The op schemas of sambayes._C (namespace torch.ops.sambayes_C) and the Python module.
//
// Each op takes one bucket (device, dtype) as parallel tensor lists, with the arguments
// of the backend functions in sambayes/backends/eager.py; the (a!) annotations name the lists an
// op writes, so that torch.compile functionalizes calls correctly. The CPU kernels
// register in *_cpu.cpp, the CUDA ones in *_cuda.cu; the fake (meta)
// implementations in sambayes/backends/extension.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>

// Why setup.py left the CUDA kernels out (codes from setup.py's CUDA_SKIPPED).
static const char* cuda_note() {
#if defined(SAMBAYES_WITH_CUDA)
  return "";
#elif SAMBAYES_CUDA_SKIPPED == 1
  return "its CUDA kernels were skipped at build time (SAMBAYES_NO_CUDA=1)";
#elif SAMBAYES_CUDA_SKIPPED == 2
  return "it was built against a CPU-only PyTorch, so without CUDA kernels";
#elif SAMBAYES_CUDA_SKIPPED == 3
  return "it was built without CUDA kernels: no CUDA toolkit (nvcc, CUDA_HOME) was found";
#elif SAMBAYES_CUDA_SKIPPED == 4
  return "compiling its CUDA kernels failed at build time (see the pip install log); only the CPU kernels were built";
#else
  return "it was built without CUDA kernels";
#endif
}

TORCH_LIBRARY(sambayes_C, m) {
  // found_inf, inv_scale: float32 one-element tensors on the bucket's device (the step's flag, 1/scale).
  // seed_tensor (int64), lr_tensor (float64): optional one-element tensors on the bucket's device that replace
  // the seed / lr argument, read by the kernel (CUDA-graph capture: each replay reads the current value)
  m.def(
      "bsam_sample(Tensor(a!)[] params, Tensor[] means, Tensor[] precisions, int[] offsets, float num_data, "
      "int seed, Tensor? seed_tensor=None) -> ()");
  m.def(
      "bsam_perturb(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor[] means, Tensor[] precisions, "
      "Tensor(c!)[] curvature_sums, Tensor(d!) found_inf, Tensor inv_scale, float rho, bool accumulate) -> ()");
  m.def("find_nonfinite(Tensor[] grads, Tensor(a!) found_inf) -> ()");
  m.def(
      "fold_grads(Tensor(a!)[] grads, Tensor(b!)[] grad_sums, Tensor(c!) found_inf, bool first, bool last) -> ()");
  // bfloat16 precisions and momentums are stored with stochastic rounding: element offsets[i] + k of the group
  // takes its random bits from the Philox stream `seed` (both ignored for float32/float64 state)
  m.def(
      "bsam_update(Tensor(a!)[] params, Tensor(b!)[] grad_sums, Tensor(c!)[] means, Tensor(d!)[] precisions, "
      "Tensor(e!)[] momentums, Tensor[] curvature_sums, int[] offsets, Tensor found_inf, Tensor inv_scale, float lr, "
      "float beta1, float beta2, float weight_decay, float damping, int splits, int seed, Tensor? lr_tensor=None, "
      "Tensor? seed_tensor=None) -> ()");
  m.def("restore(Tensor(a!)[] params, Tensor[] weights) -> ()");
  m.def("sam_sq_norm(Tensor[] grads, Tensor[] weights, Tensor(a!) found_inf, Tensor inv_scale, bool adaptive) -> Tensor");
  m.def(
      "sam_perturb(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor[] weights, Tensor inv_scale, Tensor scale, "
      "bool adaptive) -> ()");
  m.def(
      "sam_update_sgd(Tensor(a!)[] params, Tensor(b!)[] grad_sums, Tensor(c!)[] weights, Tensor(d!)[] momentums, "
      "Tensor found_inf, Tensor inv_scale, float lr, float momentum, float weight_decay, bool nesterov, int splits, "
      "Tensor? lr_tensor=None) -> ()");
  m.def(
      "sam_update_adamw(Tensor(a!)[] params, Tensor(b!)[] grad_sums, Tensor(c!)[] weights, Tensor(d!)[] momentums, "
      "Tensor(e!)[] variances, Tensor found_inf, Tensor inv_scale, Tensor step, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, int splits, Tensor? lr_tensor=None) -> ()");
  // z(seed, start + i) into a contiguous float32 tensor (ALGORITHM.md, "Noise", version 2)
  m.def("philox_randn_(Tensor(a!) out, int seed, int start) -> ()");
  // the four Philox4x32-10 words per counter, int64 [n, 4]: a test hook
  m.def("philox_words(Tensor counters, int seed) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "sambayes C++/CUDA kernels; the ops live in torch.ops.sambayes_C";
#ifdef SAMBAYES_WITH_CUDA
  module.attr("cuda_compiled") = true;
#else
  module.attr("cuda_compiled") = false;
#endif
  module.attr("cuda_note") = cuda_note();
}

// IVON's ops (docs/ivon.md; csrc/ivon_cpu.cpp, csrc/ivon_cuda.cu). seed_tensor, noise_seed_tensor (int64), lr_tensor
// (float64): as above. ivon_accumulate: found_inf is raised on an inf or NaN gradient; ivon_update: step (float64,
// updates taken counting this one) is read on the device, curvature_sums is not read when summed is false (pass the
// means), noise_seed is that one sample's (read with price only), seed the bfloat16 state's rounding stream
TORCH_LIBRARY_FRAGMENT(sambayes_C, m) {
  m.def(
      "ivon_accumulate(Tensor(a!)[] grads, Tensor(b!)[] grad_sums, Tensor(c!)[] curvature_sums, int[] offsets, "
      "Tensor(d!) found_inf, int seed, bool price, bool first, bool last, Tensor? seed_tensor=None) -> ()");
  m.def(
      "ivon_update(Tensor(a!)[] params, Tensor(b!)[] grad_sums, Tensor(c!)[] means, Tensor(d!)[] precisions, "
      "Tensor(e!)[] momentums, Tensor[] curvature_sums, int[] offsets, Tensor found_inf, Tensor inv_scale, "
      "Tensor step, float lr, float beta1, float beta2, float ess, float weight_decay, float clip_radius, "
      "bool debias, bool price, bool summed, int splits, int noise_seed, int seed, Tensor? lr_tensor=None, "
      "Tensor? noise_seed_tensor=None, Tensor? seed_tensor=None) -> ()");
}
