"""sam_update_sgd (heavy ball, optionally Nesterov, then θ = w; a skipped step keeps the state) on
every backend against the eager backend."""

import pytest
import torch
from harness import (
    SPEC,
    Guarded,
    assert_lists_close,
    assert_rounded,
    assert_zeros,
    cases,
    clones,
    flag,
    inv_scale,
    module,
    nan_like,
    normal,
    state_dtype,
)


@pytest.mark.parametrize("backend,dtype,sizes", cases())
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
@pytest.mark.parametrize("skip", [False, True], ids=["", "skipped"])
def test_sam_update_sgd_matches_eager(backend, dtype, sizes, nesterov, skip):
    sd = state_dtype(dtype)
    grad_sums = normal(sizes, dtype)
    start = [normal(sizes, sd), normal(sizes, sd)]  # weight, momentum buffer
    state = [Guarded(sizes, sd, values) for values in start]
    expected_state = [clones(values) for values in start]
    got_grads, want_grads = Guarded(sizes, dtype, grad_sums), clones(grad_sums)
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": nesterov, "splits": 3}
    found_inf = float(skip)
    module(backend).sam_update_sgd(
        params.tensors, got_grads.tensors, *(s.tensors for s in state), flag(found_inf), inv_scale(), **hyper
    )
    SPEC.sam_update_sgd(expected, want_grads, *expected_state, flag(found_inf), inv_scale(), **hyper)
    params.check("sam_update_sgd params")
    got_grads.check("sam_update_sgd grad_sums")
    for name, got, want in zip(("weight", "momentum"), state, expected_state):
        got.check(f"sam_update_sgd {name}")
        assert_lists_close(got.tensors, want, sd, name)
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(got.tensors, start[("weight", "momentum").index(name)]))
    assert_rounded(params.tensors, state[0].tensors, "param")
    assert_zeros(got_grads.tensors, "grad_sum")
