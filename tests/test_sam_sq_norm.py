"""sam_sq_norm, Σ (T·g)² of the unscaled gradients and their found-inf check, on every backend
against the eager backend."""

import pytest
import torch
from harness import COMPARED, NONFINITE_AT, SPEC, cases, flag, inv_scale, module, normal, state_dtype, with_nonfinite


@pytest.mark.parametrize("backend,dtype,sizes", cases())
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_sq_norm_matches_eager(backend, dtype, sizes, adaptive):
    sd = state_dtype(dtype)
    grads, weights = normal(sizes, dtype), normal(sizes, sd)
    found_inf = flag()
    got = module(backend).sam_sq_norm(grads, weights, found_inf, inv_scale(), adaptive=adaptive)
    want = SPEC.sam_sq_norm(grads, weights, flag(), inv_scale(), adaptive=adaptive)
    assert got.dim() == 0 and got.dtype == sd and got.device == want.device
    # the summation order differs (blocks, chunks, torch's cascade): relative 1e-5 in float32
    torch.testing.assert_close(got, want, rtol=1e-5 if sd == torch.float32 else 1e-12, atol=0)
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("backend", ["eager", *COMPARED])
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("where", NONFINITE_AT)
def test_sam_sq_norm_raises_the_flag(backend, value, where):
    sizes = [5, 9001]
    grads = with_nonfinite(normal(sizes, torch.float16), value, where)
    found_inf = flag()
    module(backend).sam_sq_norm(grads, normal(sizes, torch.float32), found_inf, inv_scale(), adaptive=False)
    assert found_inf.item() == 1.0
