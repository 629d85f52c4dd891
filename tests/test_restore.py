"""restore, θ = m (or w), on every backend: exactly the state rounded to the parameter dtype."""

import pytest
from harness import Guarded, assert_rounded, cases, module, normal, state_dtype


@pytest.mark.parametrize("backend,dtype,sizes", cases())
def test_restore_is_the_rounded_state(backend, dtype, sizes):
    weights = normal(sizes, state_dtype(dtype))
    params = Guarded(sizes, dtype)
    module(backend).restore(params.tensors, weights)
    params.check("restore")
    assert_rounded(params.tensors, weights, "param")
