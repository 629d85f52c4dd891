"""The compiled kernels, without a GPU: Triton compiles them ahead of time for sm_90 (H100),
and the machine code must use 128-bit global loads and stores on every stream of a full
block and no local memory (no register spills); with capturable=True's lr and seeds read from device
memory too."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

# input and output streams of each kernel's full block (float32 parameters, ACCUMULATE=True)
STREAMS = {
    "_bsam_sample_kernel": (2, 1),
    "_bsam_perturb_kernel": (4, 3),  # writes θ, the curvature sum and the zeroed gradient
    "_bsam_update_kernel": (5, 5),  # writes g_m, m, s, θ and the zeroed gradient sum
    "_find_nonfinite_kernel": (1, 0),
    "_fold_grads_kernel": (2, 2),  # a middle sub-batch: reads g and the sum, writes the sum and zeroes g
    "_restore_kernel": (1, 1),
    "_sq_norm_kernel": (1, 0),
    "_sam_perturb_kernel": (2, 2),
    "_sam_update_sgd_kernel": (3, 4),
    "_sam_update_adamw_kernel": (4, 5),
    "_ivon_accumulate_kernel": (3, 3),  # a middle sample: reads g and both sums, writes both and zeroes g
    "_ivon_update_kernel": (5, 5),  # summed: writes g_m, m, s, θ and the zeroed gradient sum
}
#: the kernels that take a step scalar (lr, seed) from device memory with capturable=True
CAPTURABLE = {
    "_bsam_sample_kernel",
    "_bsam_update_kernel",
    "_sam_update_sgd_kernel",
    "_sam_update_adamw_kernel",
    "_ivon_accumulate_kernel",
    "_ivon_update_kernel",
}


@pytest.mark.slow
@pytest.mark.parametrize("capturable", [False, True], ids=["scalars-by-value", "capturable"])
def test_kernels_compile_for_sm90_with_128_bit_accesses_and_no_spills(capturable):
    try:
        from triton.backends import nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "sambayes.kernels._compile_check", "--arch", "90", "--dtypes", "fp32"]
        + ["--capturable"] * capturable,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reports = {r["kernel"]: r for r in map(json.loads, out.stdout.splitlines())}
    expected = CAPTURABLE if capturable else set(STREAMS)
    assert set(reports) == expected
    for name in expected:
        inputs, outputs = STREAMS[name]
        r = reports[name]
        # BLOCK = 1024 over 128 threads: 8 float32 per thread and stream, two 16-byte accesses
        assert r["ldg128"] == 2 * inputs, r
        assert r["stg128"] == 2 * outputs, r
        assert r["local_ops"] == 0 and r["local_bytes"] == 0 and r["stack_bytes"] == 0, r
