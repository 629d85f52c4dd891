"""sam_perturb (w' = w + ρ·T²·g/‖T·g‖, the gradient consumed) on every backend against the eager backend."""

import pytest
from harness import (
    SPEC,
    Guarded,
    assert_close,
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
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_perturb_matches_eager(backend, dtype, sizes, adaptive):
    sd = state_dtype(dtype)
    grads, weights = normal(sizes, dtype), normal(sizes, sd)
    # the scale is a 0-dim device tensor: no host sync
    scale = (0.05 / SPEC.sam_sq_norm(grads, weights, flag(), inv_scale(), adaptive=adaptive).sqrt()).to(sd)
    got_grads, want_grads = Guarded(sizes, dtype, grads), clones(grads)
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    module(backend).sam_perturb(params.tensors, got_grads.tensors, weights, inv_scale(), scale=scale, adaptive=adaptive)
    SPEC.sam_perturb(expected, want_grads, weights, inv_scale(), scale=scale, adaptive=adaptive)
    params.check("sam_perturb")
    got_grads.check("sam_perturb grads")
    for i in range(len(sizes)):
        assert_close(params.tensors[i], expected[i], dtype, f"param[{i}]")
    assert_zeros(got_grads.tensors, "grad")
