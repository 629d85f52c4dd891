"""bsam_perturb, θ = m + ρ·g/s and the curvature sum, on every backend against the eager backend."""

import pytest
import torch
from harness import (
    SPEC,
    Guarded,
    assert_close,
    cases,
    clones,
    module,
    nan_like,
    normal,
    positive,
    state_dtype,
)


@pytest.mark.parametrize("backend,dtype,sizes", cases())
def test_bsam_perturb_matches_eager(backend, dtype, sizes):
    sd = state_dtype(dtype)
    means, precisions = normal(sizes, sd), positive(sizes, sd)
    inputs = clones(means) + clones(precisions)
    curvature_sums = Guarded(sizes, sd)  # poisoned: the first sub-batch overwrites it
    expected_sums = nan_like(curvature_sums.tensors)
    # two sub-batches: overwrite, then accumulate
    for accumulate in (False, True):
        grads = normal(sizes, dtype)
        params = Guarded(sizes, dtype)
        expected = nan_like(params.tensors)
        module(backend).bsam_perturb(
            params.tensors, grads, means, precisions, curvature_sums.tensors, rho=0.05, accumulate=accumulate
        )
        SPEC.bsam_perturb(expected, grads, means, precisions, expected_sums, rho=0.05, accumulate=accumulate)
        params.check("bsam_perturb params")
        curvature_sums.check("bsam_perturb curvature_sums")
        for i in range(len(sizes)):
            assert_close(params.tensors[i], expected[i], dtype, f"param[{i}] accumulate={accumulate}")
            assert_close(curvature_sums.tensors[i], expected_sums[i], sd, f"curvature_sum[{i}] accumulate={accumulate}")
    assert all(torch.equal(a, b) for a, b in zip(means + precisions, inputs)), "the state was written"
