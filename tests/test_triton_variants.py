"""The Triton kernels that take a per-step seed (the sample's noise, the bfloat16 update's rounding,
IVON's regenerated noise) compile once for all steps: Triton specializes integer arguments on their value (== 1, divisible
by 16), so an unmarked seed would compile a kernel two or three times early in training;
``do_not_specialize=["seed"]`` keeps one variant.

Without a GPU the launches of thirty steps go to Triton's own argument binder for an sm_90 target
(its specialization is the compile cache's key: one distinct key, one compile), in a child process
without TRITON_INTERPRET; on a GPU, ten optimizer steps and the kernels' compile caches count them.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import AVAILABLE_BACKENDS

import sambayes

triton = pytest.importorskip("triton")

#: thirty steps of the sample and the bfloat16-state update with the optimizer's seed schedule; prints
#: {kernel: [variants of step 1, of thirty steps, of thirty steps if the seed were specialized]}
COUNT = r"""
import json, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import KernelParam, create_function_from_signature
from sambayes import _philox
from sambayes.kernels import bsam_sample, bsam_update, ivon_accumulate, ivon_update

backend = make_backend(GPUTarget("cuda", 90, 32))
counts = {}
kernels = (bsam_sample._bsam_sample_kernel, bsam_update._bsam_update_kernel, ivon_accumulate._ivon_accumulate_kernel,
           ivon_update._ivon_update_kernel)
for kernel in kernels:
    specialized = [KernelParam(p.num, p._param, False, False) for p in kernel.params]  # as if unmarked
    binders = [create_function_from_signature(kernel.signature, params, backend) for params in (kernel.params, specialized)]
    keys = counts.setdefault(kernel.fn.__name__, [set(), set(), set()])[1:]

    def run(*args, grid, warmup, keys=keys, binders=binders, **kwargs):  # Triton's launch, up to its cache key
        for found, binder in zip(keys, binders):
            _, specialization, options = binder(*args, **kwargs)
            found.add(str(specialization) + str(options))

    kernel.run = run
sizes = [7, 1025]
offsets = [0, 7]
means, grads = [torch.randn(n) for n in sizes], [torch.randn(n) for n in sizes]
precisions = [torch.ones(n, dtype=torch.bfloat16) for n in sizes]
momentums = [torch.zeros(n, dtype=torch.bfloat16) for n in sizes]
for step in range(1, 31):
    if step == 2:
        for found in counts.values():
            found[0] = set(found[1])
    params = [torch.empty(n) for n in sizes]
    bsam_sample.bsam_sample(params, means, precisions, offsets, num_data=100.0, seed=_philox.noise_seed(7, 0, step, 0))
    bsam_update.bsam_update(
        params, grads, means, precisions, momentums, [torch.ones(n) for n in sizes], offsets, torch.zeros(()),
        torch.ones(()), lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, damping=0.1, splits=1,
        seed=_philox.rounding_seed(7, 0, step),
    )
    # IVON: one sample's curvature (Price's estimator) and its one-sample update with bfloat16 state
    ivon_accumulate.ivon_accumulate(
        grads, [torch.empty(n) for n in sizes], [torch.empty(n) for n in sizes], offsets, torch.zeros(()),
        seed=_philox.noise_seed(7, 0, step, 0), price=True, first=True, last=True,
    )
    ivon_update.ivon_update(
        params, grads, means, precisions, momentums, [torch.ones(n) for n in sizes], offsets, torch.zeros(()),
        torch.ones(()), torch.tensor(float(step), dtype=torch.float64), lr=0.1, beta1=0.9, beta2=0.999, ess=100.0,
        weight_decay=0.0, clip_radius=float("inf"), debias=True, price=True, summed=False, splits=1,
        noise_seed=_philox.noise_seed(7, 0, step, 0), seed=_philox.rounding_seed(7, 0, step),
    )
print(json.dumps({name: [len(keys) for keys in found] for name, found in counts.items()}))
"""


def test_the_seeded_kernels_compile_no_new_variant_over_thirty_steps():
    try:
        from triton.backends import nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run(
        [sys.executable, "-c", COUNT], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    counts = json.loads(child.stdout.strip().splitlines()[-1])
    assert set(counts) == {
        "_bsam_sample_kernel",
        "_bsam_update_kernel",
        "_ivon_accumulate_kernel",
        "_ivon_update_kernel",
    }
    for name, (first, variants, if_specialized) in counts.items():
        # one per alignment class of the table (a tensor whose offset is no multiple of 4 is its own)
        assert first == 2 and variants == first, (name, counts)
        assert if_specialized > variants, (name, counts)  # the count can fail: an unmarked seed makes more


@pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in AVAILABLE_BACKENDS, reason="needs a GPU")
def test_ten_steps_on_a_gpu_compile_each_seeded_kernel_once():
    from sambayes.kernels import bsam_sample, bsam_update

    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).cuda()
    opt = sambayes.BSAM(model.parameters(), num_data=100, seed=11, backend="triton", state_dtype=torch.bfloat16)
    x, y = torch.randn(8, 5, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    kernels = {"sample": bsam_sample._bsam_sample_kernel, "update": bsam_update._bsam_update_kernel}

    def compiled():
        return {name: sum(len(caches[0]) for caches in k.device_caches.values()) for name, k in kernels.items()}

    opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
    first = compiled()
    for _ in range(9):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
    print("compiled variants after one step:", first, "after ten:", compiled())
    assert compiled() == first
