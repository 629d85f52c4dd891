"""The compiled kernels, without a GPU: Triton compiles them ahead of time for sm_90 (H100),
and the machine code must use 128-bit global loads and stores on every stream of a full
block and no local memory (no register spills); with capturable=True's lr and seeds read from device
memory too. Every kernel must be within the instruction budget (tests/budget.py)."""

import budget
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
def test_kernels_compile_for_sm90_with_128_bit_accesses_no_spills_and_within_the_budget(triton_reports):
    # conftest's build: float32 and bfloat16 parameters, precision and momentum in float32 and bfloat16
    reports = {r["kernel"]: r for r in _base(triton_reports) if r["param"] == "fp32" and "stored" not in r}
    _check(reports, set(STREAMS))
    budget.check("triton", triton_reports)


@pytest.mark.slow
def test_capturable_kernels_compile_for_sm90_with_128_bit_accesses_and_no_spills():
    try:
        from triton.backends import nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    from conftest import _compile_check_reports

    reports = {r["kernel"]: r for r in _base(_compile_check_reports("--dtypes", "fp32", "--capturable"))}
    _check(reports, CAPTURABLE)


def _base(reports: list[dict]) -> list[dict]:
    """The reports of each kernel's base compilation (IVON's update summed over samples, not with one)."""
    return [r for r in reports if not r.get("one_sample")]


def _check(reports: dict, expected: set) -> None:
    from sambayes.kernels import _multi_tensor, sam_sq_norm

    blocks = {"_sq_norm_kernel": sam_sq_norm.SPAN}  # table blocks per program
    assert set(reports) == expected
    for name in expected:
        inputs, outputs = STREAMS[name]
        r = reports[name]
        # the compiled BLOCK = 1024 over 128 threads (_multi_tensor.WARPS: 64): 8 (16) float32 per thread and
        # stream, two (four) 16-byte accesses per block
        accesses = 1024 // (32 * _multi_tensor.WARPS.get(name, _multi_tensor.NUM_WARPS)) // 4
        assert r["ldg128"] == accesses * inputs * blocks.get(name, 1), r
        assert r["stg128"] == accesses * outputs * blocks.get(name, 1), r
        assert r["local_ops"] == 0 and r["local_bytes"] == 0 and r["stack_bytes"] == 0, r
