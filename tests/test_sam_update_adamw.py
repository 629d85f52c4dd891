"""sam_update_adamw (AdamW on the mean perturbed-point gradient, then θ = w) on every backend
against the eager backend."""

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
def test_sam_update_adamw_matches_eager(backend, dtype, sizes):
    sd = state_dtype(dtype)
    grad_sums = normal(sizes, dtype)
    start = [normal(sizes, sd), normal(sizes, sd), positive(sizes, sd)]  # weight, momentum, variance
    state = [Guarded(sizes, sd, values) for values in start]
    expected_state = [clones(values) for values in start]
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "step": 3, "splits": 2}
    module(backend).sam_update_adamw(params.tensors, grad_sums, *(s.tensors for s in state), **hyper)
    SPEC.sam_update_adamw(expected, grad_sums, *expected_state, **hyper)
    params.check("sam_update_adamw params")
    for name, got, want in zip(("weight", "momentum", "variance"), state, expected_state):
        got.check(f"sam_update_adamw {name}")
        assert_lists_close(got.tensors, want, sd, name)
    assert_rounded(params.tensors, state[0].tensors, "param")
