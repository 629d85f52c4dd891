"""bsam_sample, θ = m + z / sqrt(N·s), on every backend against the eager backend."""

import pytest
import torch
from harness import (
    SPEC,
    Guarded,
    assert_close,
    bsam_cases,
    module,
    nan_like,
    noise_slack,
    normal,
    offsets_of,
    positive,
    state_dtype,
)


@pytest.mark.parametrize("backend,dtype,sizes,stored", bsam_cases())
def test_bsam_sample_matches_eager(backend, dtype, sizes, stored):
    sd = state_dtype(dtype)
    # stored: bfloat16 precision (BSAM(state_dtype=torch.bfloat16)), else the state dtype
    means, precisions = normal(sizes, sd), positive(sizes, stored or sd)
    offsets = offsets_of(sizes)
    hyper = {"num_data": 7.0, "seed": 2**40 + 17}
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    module(backend).bsam_sample(params.tensors, means, precisions, offsets, **hyper)
    SPEC.bsam_sample(expected, means, precisions, offsets, **hyper)
    params.check("bsam_sample")
    for i, (got, want) in enumerate(zip(params.tensors, expected)):
        # z is float32 on every backend and agrees to a few float32 ulps (noise_slack), scaled by σ = 1/sqrt(N·s)
        sigma = 1 / torch.sqrt(hyper["num_data"] * precisions[i].double())
        z = (want.double() - means[i].double()) / sigma
        slack = noise_slack(hyper["seed"], offsets[i], z).to(sigma.device) * sigma
        assert_close(got, want, dtype, f"sample[{i}]", slack=slack)
