"""Every backend reproduces the paper authors' trajectories (tests/data, from their JAX code)."""

import pytest
from conftest import AVAILABLE_BACKENDS, DEVICE
from golden import golden_errors


@pytest.mark.slow
@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("name", ["bsam_basic.json", "sam_basic.json"])
def test_golden_float64(name, backend):
    errors = golden_errors(name, backend, device=DEVICE)
    print(name, backend, errors)
    assert max(errors.values()) <= 1e-12, errors
