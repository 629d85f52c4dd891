"""sam_sq_norm, Σ (T·g)², on every backend against the eager backend."""

import pytest
import torch
from harness import SPEC, cases, module, normal, state_dtype


@pytest.mark.parametrize("backend,dtype,sizes", cases())
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_sq_norm_matches_eager(backend, dtype, sizes, adaptive):
    sd = state_dtype(dtype)
    grads, weights = normal(sizes, dtype), normal(sizes, sd)
    got = module(backend).sam_sq_norm(grads, weights, adaptive=adaptive)
    want = SPEC.sam_sq_norm(grads, weights, adaptive=adaptive)
    assert got.dim() == 0 and got.dtype == sd and got.device == want.device
    # the summation order differs (blocks, chunks, torch's cascade): relative 1e-5 in float32
    torch.testing.assert_close(got, want, rtol=1e-5 if sd == torch.float32 else 1e-12, atol=0)
