"""sam_update_adamw (AdamW on the mean perturbed-point gradient, then θ = w; a skipped step keeps
the state) on every backend against the eager backend."""

import pytest
import torch
from conftest import DEVICE
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
    positive,
    state_dtype,
)


@pytest.mark.parametrize("backend,dtype,sizes", cases())
@pytest.mark.parametrize("skip", [False, True], ids=["", "skipped"])
def test_sam_update_adamw_matches_eager(backend, dtype, sizes, skip):
    sd = state_dtype(dtype)
    grad_sums = normal(sizes, dtype)
    start = [normal(sizes, sd), normal(sizes, sd), positive(sizes, sd)]  # weight, momentum, variance
    state = [Guarded(sizes, sd, values) for values in start]
    expected_state = [clones(values) for values in start]
    got_grads, want_grads = Guarded(sizes, dtype, grad_sums), clones(grad_sums)
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    # the step count lives on the device (no host sync for the bias corrections)
    step = torch.tensor(3.0, dtype=torch.float64, device=DEVICE)
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "splits": 2}
    found_inf = float(skip)
    module(backend).sam_update_adamw(
        params.tensors, got_grads.tensors, *(s.tensors for s in state), flag(found_inf), inv_scale(), step, **hyper
    )
    SPEC.sam_update_adamw(expected, want_grads, *expected_state, flag(found_inf), inv_scale(), step, **hyper)
    params.check("sam_update_adamw params")
    got_grads.check("sam_update_adamw grad_sums")
    for name, got, want in zip(("weight", "momentum", "variance"), state, expected_state):
        got.check(f"sam_update_adamw {name}")
        assert_lists_close(got.tensors, want, sd, name)
        if skip:
            before = start[("weight", "momentum", "variance").index(name)]
            assert all(torch.equal(a, b) for a, b in zip(got.tensors, before)), f"skipped step changed the {name}"
    assert_rounded(params.tensors, state[0].tensors, "param")
    assert_zeros(got_grads.tensors, "grad_sum")
