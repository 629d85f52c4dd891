"""bsam_update (momentum, mean, precision, θ = m) on every backend against the eager backend."""

import pytest
from harness import (
    SPEC,
    Guarded,
    assert_lists_close,
    assert_rounded,
    cases,
    clones,
    module,
    nan_like,
    normal,
    positive,
    state_dtype,
)


@pytest.mark.parametrize("backend,dtype,sizes", cases())
def test_bsam_update_matches_eager(backend, dtype, sizes):
    sd = state_dtype(dtype)
    grad_sums, curvature_sums = normal(sizes, dtype), positive(sizes, sd)
    start = [normal(sizes, sd), positive(sizes, sd), normal(sizes, sd)]  # mean, precision, momentum
    state = [Guarded(sizes, sd, values) for values in start]
    expected_state = [clones(values) for values in start]
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    hyper = {"lr": 0.3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-3, "damping": 0.1, "splits": 3}
    module(backend).bsam_update(params.tensors, grad_sums, *(s.tensors for s in state), curvature_sums, **hyper)
    SPEC.bsam_update(expected, grad_sums, *expected_state, curvature_sums, **hyper)
    params.check("bsam_update params")
    for name, got, want in zip(("mean", "precision", "momentum"), state, expected_state):
        got.check(f"bsam_update {name}")
        assert_lists_close(got.tensors, want, sd, name)
    # the model holds the new mean
    assert_rounded(params.tensors, state[0].tensors, "param")
