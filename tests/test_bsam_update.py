"""bsam_update (momentum, mean, precision, θ = m; a skipped step keeps the state) on every
backend against the eager backend."""

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
    positive,
    state_dtype,
)

HYPER = {"lr": 0.3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-3, "damping": 0.1, "splits": 3}


def _run(backend, dtype, sizes, found_inf):
    sd = state_dtype(dtype)
    grad_sums, curvature_sums = normal(sizes, dtype), positive(sizes, sd)
    start = [normal(sizes, sd), positive(sizes, sd), normal(sizes, sd)]  # mean, precision, momentum
    state = [Guarded(sizes, sd, values) for values in start]
    expected_state = [clones(values) for values in start]
    got_grads, want_grads = Guarded(sizes, dtype, grad_sums), clones(grad_sums)
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    module(backend).bsam_update(
        params.tensors,
        got_grads.tensors,
        *(s.tensors for s in state),
        curvature_sums,
        flag(found_inf),
        inv_scale(),
        **HYPER,
    )
    SPEC.bsam_update(expected, want_grads, *expected_state, curvature_sums, flag(found_inf), inv_scale(), **HYPER)
    params.check("bsam_update params")
    got_grads.check("bsam_update grad_sums")
    for name, got, want in zip(("mean", "precision", "momentum"), state, expected_state):
        got.check(f"bsam_update {name}")
        assert_lists_close(got.tensors, want, sd, name)
    # the model holds the (new) mean; the gradient buffer is ready for the next step
    assert_rounded(params.tensors, state[0].tensors, "param")
    assert_zeros(got_grads.tensors, "grad_sum")
    return start, state


@pytest.mark.parametrize("backend,dtype,sizes", cases())
def test_bsam_update_matches_eager(backend, dtype, sizes):
    _run(backend, dtype, sizes, 0.0)


@pytest.mark.parametrize("backend,dtype,sizes", cases())
def test_bsam_update_skips_on_the_flag(backend, dtype, sizes):
    start, state = _run(backend, dtype, sizes, 1.0)
    for name, before, after in zip(("mean", "precision", "momentum"), start, state):
        assert all(torch.equal(a, b) for a, b in zip(after.tensors, before)), f"skipped step changed the {name}"
