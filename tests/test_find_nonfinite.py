"""find_nonfinite (the found-inf check of a gradient no kernel has read yet) on every backend."""

import pytest
import torch
from harness import COMPARED, NONFINITE_AT, PARAM_DTYPES, cases, clones, flag, module, normal, with_nonfinite


@pytest.mark.parametrize("backend,dtype,sizes", cases())
def test_find_nonfinite_reads_without_writing(backend, dtype, sizes):
    grads = normal(sizes, dtype)
    before = clones(grads)
    found_inf = flag()
    module(backend).find_nonfinite(grads, found_inf)
    assert found_inf.item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


@pytest.mark.parametrize("backend", ["eager", *COMPARED])
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", NONFINITE_AT)
def test_find_nonfinite_raises_the_flag(backend, dtype, value, where):
    grads = with_nonfinite(normal([1, 8195, 3], dtype), value, where)
    found_inf = flag()
    module(backend).find_nonfinite(grads, found_inf)
    assert found_inf.item() == 1.0
    # a raised flag stays raised
    module(backend).find_nonfinite(normal([5], dtype), found_inf)
    assert found_inf.item() == 1.0
