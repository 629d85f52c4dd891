"""Every tier reproduces the paper authors' trajectories (tests/data, from their JAX code)."""

import pytest
from conftest import AVAILABLE_TIERS, DEVICE
from golden import golden_errors


@pytest.mark.parametrize("tier", AVAILABLE_TIERS)
@pytest.mark.parametrize("name", ["bsam_basic.json", "sam_basic.json"])
def test_golden_float64(name, tier):
    errors = golden_errors(name, tier, device=DEVICE)
    print(name, tier, errors)
    assert max(errors.values()) <= 1e-10, errors
