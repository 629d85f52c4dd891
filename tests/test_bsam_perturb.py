"""bsam_perturb (θ = m + ρ·g/s, the curvature sum, the gradient consumed) on every backend
against the eager backend."""

import pytest
import torch
from harness import (
    COMPARED,
    NONFINITE_AT,
    PARAM_DTYPES,
    SPEC,
    Guarded,
    assert_close,
    assert_zeros,
    bsam_cases,
    clones,
    flag,
    inv_scale,
    module,
    nan_like,
    normal,
    positive,
    state_dtype,
    with_nonfinite,
)


@pytest.mark.parametrize("backend,dtype,sizes,stored", bsam_cases())
def test_bsam_perturb_matches_eager(backend, dtype, sizes, stored):
    sd = state_dtype(dtype)
    # stored: bfloat16 precision (BSAM(state_dtype=torch.bfloat16)), else the state dtype
    means, precisions = normal(sizes, sd), positive(sizes, stored or sd)
    inputs = clones(means) + clones(precisions)
    curvature_sums = Guarded(sizes, sd)  # poisoned: the first sub-batch overwrites it
    expected_sums = nan_like(curvature_sums.tensors)
    # two sub-batches: overwrite, then accumulate
    for accumulate in (False, True):
        grads = normal(sizes, dtype)
        got_grads, want_grads = Guarded(sizes, dtype, grads), clones(grads)
        params = Guarded(sizes, dtype)
        expected = nan_like(params.tensors)
        got_flag, want_flag = flag(), flag()
        module(backend).bsam_perturb(
            params.tensors,
            got_grads.tensors,
            means,
            precisions,
            curvature_sums.tensors,
            got_flag,
            inv_scale(),
            rho=0.05,
            accumulate=accumulate,
        )
        SPEC.bsam_perturb(
            expected,
            want_grads,
            means,
            precisions,
            expected_sums,
            want_flag,
            inv_scale(),
            rho=0.05,
            accumulate=accumulate,
        )
        for guarded, name in ((params, "params"), (curvature_sums, "curvature_sums"), (got_grads, "grads")):
            guarded.check(f"bsam_perturb {name}")
        for i in range(len(sizes)):
            assert_close(params.tensors[i], expected[i], dtype, f"param[{i}] accumulate={accumulate}")
            assert_close(curvature_sums.tensors[i], expected_sums[i], sd, f"curvature_sum[{i}] accumulate={accumulate}")
        assert_zeros(got_grads.tensors, "grad")  # consumed: the next backward pass accumulates into it
        assert got_flag.item() == want_flag.item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(means + precisions, inputs)), "the state was written"


@pytest.mark.parametrize("backend", ["eager", *COMPARED])
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("where", NONFINITE_AT)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_bsam_perturb_raises_the_flag(backend, dtype, value, where):
    sizes = [7, 1025, 3]
    sd = state_dtype(dtype)
    grads = with_nonfinite(normal(sizes, dtype), value, where)
    found_inf = flag()
    params, sums = nan_like(normal(sizes, dtype)), nan_like(normal(sizes, sd))
    module(backend).bsam_perturb(
        params, grads, normal(sizes, sd), positive(sizes, sd), sums, found_inf, inv_scale(), rho=0.05, accumulate=False
    )
    assert found_inf.item() == 1.0
