"""sam_update_sgd (heavy ball, optionally Nesterov, then θ = w) on every backend against the eager backend."""

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
    state_dtype,
)


@pytest.mark.parametrize("backend,dtype,sizes", cases())
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_sam_update_sgd_matches_eager(backend, dtype, sizes, nesterov):
    sd = state_dtype(dtype)
    grad_sums = normal(sizes, dtype)
    start = [normal(sizes, sd), normal(sizes, sd)]  # weight, momentum buffer
    state = [Guarded(sizes, sd, values) for values in start]
    expected_state = [clones(values) for values in start]
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": nesterov, "splits": 3}
    module(backend).sam_update_sgd(params.tensors, grad_sums, *(s.tensors for s in state), **hyper)
    SPEC.sam_update_sgd(expected, grad_sums, *expected_state, **hyper)
    params.check("sam_update_sgd params")
    for name, got, want in zip(("weight", "momentum"), state, expected_state):
        got.check(f"sam_update_sgd {name}")
        assert_lists_close(got.tensors, want, sd, name)
    assert_rounded(params.tensors, state[0].tensors, "param")
