"""fold_grads (the perturbed-point gradients summed over sub-batches, in the state dtype) on
every backend against the eager backend."""

import pytest
import torch
from conftest import DEVICE
from harness import (
    COMPARED,
    NONFINITE_AT,
    SPEC,
    Guarded,
    assert_lists_close,
    assert_zeros,
    cases,
    clones,
    flag,
    module,
    nan_like,
    normal,
    state_dtype,
    with_nonfinite,
)


@pytest.mark.parametrize("backend,dtype,sizes", cases())
def test_fold_grads_matches_eager(backend, dtype, sizes):
    sd = state_dtype(dtype)
    sums = Guarded(sizes, sd)  # poisoned: the first sub-batch overwrites it
    expected_sums = nan_like(sums.tensors)
    found_inf = flag()
    for stage, (first, last) in enumerate(((True, False), (False, False), (False, True))):
        grads = normal(sizes, dtype)
        got, want = Guarded(sizes, dtype, grads), clones(grads)
        module(backend).fold_grads(got.tensors, sums.tensors, found_inf, first=first, last=last)
        SPEC.fold_grads(want, expected_sums, flag(), first=first, last=last)
        got.check("fold_grads grads")
        sums.check("fold_grads grad_sums")
        if last:  # the total, rounded once to the parameter dtype, back in .grad
            assert_lists_close(got.tensors, want, dtype, "grad (total)")
        else:
            assert_lists_close(sums.tensors, expected_sums, sd, f"grad_sum after stage {stage}")
            assert_zeros(got.tensors, "grad")
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("backend", ["eager", *COMPARED])
@pytest.mark.parametrize("first,last", [(True, False), (False, False), (False, True)], ids=["first", "middle", "last"])
@pytest.mark.parametrize("where", NONFINITE_AT)
def test_fold_grads_raises_the_flag(backend, first, last, where):
    sizes = [9, 1030, 3]
    grads = with_nonfinite(normal(sizes, torch.bfloat16), float("nan"), where)
    found_inf = flag()
    module(backend).fold_grads(grads, normal(sizes, torch.float32), found_inf, first=first, last=last)
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("backend", ["eager", *COMPARED])
def test_a_sum_that_overflows_its_dtype_raises_the_flag(backend):
    """float16 gradients of 40000 in each of two sub-batches: each is finite, their sum (80000) is
    not a float16; rounded into .grad it is inf, and the update must not take it."""
    sizes = [3, 1030]
    grads = [torch.full((n,), 40000.0, dtype=torch.float16, device=DEVICE) for n in sizes]
    sums = [torch.empty(n, dtype=torch.float32, device=DEVICE) for n in sizes]
    found_inf = flag()
    module(backend).fold_grads(grads, sums, found_inf, first=True, last=False)
    assert found_inf.item() == 0.0
    for g in grads:
        g.fill_(40000.0)
    module(backend).fold_grads(grads, sums, found_inf, first=False, last=True)
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("backend", COMPARED)
def test_low_precision_sums_accumulate_in_float32(backend):
    """Eight sub-batches of bfloat16 gradients: the sum is exact in float32, rounded once at the end."""
    n = 1025
    h = torch.full((n,), 1.0 + 2**-7, dtype=torch.bfloat16, device=DEVICE)  # exactly representable, 1 + 1 ulp
    grad = [torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)]
    sums = [torch.empty(n, dtype=torch.float32, device=DEVICE)]
    found_inf = flag()
    for j in range(8):
        grad[0].copy_(h * (256 if j == 0 else 1))  # a large first term, then small ones
        module(backend).fold_grads(grad, sums, found_inf, first=j == 0, last=j == 7)
    want = torch.tensor(256 * (1 + 2**-7) + 7 * (1 + 2**-7), dtype=torch.float64).to(torch.bfloat16)
    assert torch.equal(grad[0].cpu(), torch.full((n,), want.item(), dtype=torch.bfloat16))
    # summed in bfloat16 the small terms would vanish: 258 + 1 rounds to 258 at bf16's resolution there
    naive = torch.tensor(256 * (1 + 2**-7), dtype=torch.bfloat16)
    for _ in range(7):
        naive = naive + torch.tensor(1 + 2**-7, dtype=torch.bfloat16)
    assert naive.item() != want.item()
