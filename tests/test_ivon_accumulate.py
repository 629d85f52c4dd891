"""ivon_accumulate (a sample's gradient joins the sums over samples: of g, and of z·g or g², in the state dtype;
the last sum back into .grad) on every backend against the eager backend."""

import pytest
import torch
from conftest import DEVICE
from harness import (
    BLOCK,
    COMPARED,
    NONFINITE_AT,
    PARAM_DTYPES,
    SPEC,
    Guarded,
    assert_close,
    assert_lists_close,
    assert_zeros,
    clones,
    flag,
    lean_cases,
    module,
    nan_like,
    noise_slack,
    normal,
    offsets_of,
    state_dtype,
    with_nonfinite,
)

from sambayes import _philox

STAGES = ((True, False), (False, False), (False, True))  # first, middle, last of three samples


def _seed(sample: int) -> int:
    return 2**40 + 11 * sample


def gradsq_cases() -> list:
    """The squared-gradient estimator draws no noise: every backend and dtype over three tensors."""
    return [
        pytest.param(backend, dtype, [7, 1025, 1], id=f"{backend}-{str(dtype).split('.')[-1]}-7x1025x1")
        for backend in COMPARED
        for dtype in PARAM_DTYPES
    ]


def _price_slack(seed: int, offsets: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per tensor, how far z·g may be from the spec's: z is float32 on every backend and agrees to a few float32
    ulps (harness.noise_slack), times |g|. The tensors are consecutive in the group."""
    start = offsets[0]
    allowed = noise_slack(seed, start, _philox.randn_range(seed, start, sum(g.numel() for g in grads)))
    return [allowed[o - start : o - start + g.numel()].to(DEVICE) * g.double().abs() for o, g in zip(offsets, grads)]


def _three_samples(backend, dtype, sizes, price):
    sd = state_dtype(dtype)
    offsets = offsets_of(sizes)
    grad_sums, curvature_sums = Guarded(sizes, sd), Guarded(sizes, sd)  # poisoned: the first sample overwrites them
    expected_grad_sums, expected_curvature_sums = nan_like(grad_sums.tensors), nan_like(curvature_sums.tensors)
    slack = [torch.zeros(n, dtype=torch.float64, device=DEVICE) for n in sizes]  # the noise's, summed
    found_inf = flag()
    for sample, (first, last) in enumerate(STAGES):
        hyper = dict(seed=_seed(sample), price=price, first=first, last=last)
        grads = normal(sizes, dtype)
        got, want = Guarded(sizes, dtype, grads), clones(grads)
        module(backend).ivon_accumulate(
            got.tensors, grad_sums.tensors, curvature_sums.tensors, offsets, found_inf, **hyper
        )
        SPEC.ivon_accumulate(want, expected_grad_sums, expected_curvature_sums, offsets, flag(), **hyper)
        got.check("ivon_accumulate grads")
        grad_sums.check("ivon_accumulate grad_sums")
        curvature_sums.check("ivon_accumulate curvature_sums")
        if price:
            slack = [a + b for a, b in zip(slack, _price_slack(_seed(sample), offsets, grads))]
        for i, (a, e) in enumerate(zip(curvature_sums.tensors, expected_curvature_sums)):
            assert_close(a, e, sd, f"curvature_sum[{i}] after sample {sample}", slack=slack[i])
        if last:  # the gradient sum, rounded once to the parameter dtype, back in .grad
            assert_lists_close(got.tensors, want, dtype, "grad (the sum)")
        else:
            assert_lists_close(grad_sums.tensors, expected_grad_sums, sd, f"grad_sum after sample {sample}")
            assert_zeros(got.tensors, "grad")
    assert found_inf.item() == 0.0


@pytest.mark.parametrize("backend,dtype,sizes,stored", lean_cases())
def test_ivon_accumulate_with_price_matches_eager(backend, dtype, sizes, stored):
    _three_samples(backend, dtype, sizes, price=True)


@pytest.mark.parametrize("backend,dtype,sizes", gradsq_cases())
def test_ivon_accumulate_with_gradsq_matches_eager(backend, dtype, sizes):
    _three_samples(backend, dtype, sizes, price=False)


@pytest.mark.parametrize("price", [True, False], ids=["price", "gradsq"])
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", COMPARED)
def test_one_sample_writes_the_curvature_and_keeps_the_gradient(backend, dtype, price):
    """Under DDP each replica's estimate of its one sample is summed before the average: only the curvature is
    written, .grad keeps g (the grad sums are not touched)."""
    sizes = [7, BLOCK + 1, 1]
    sd, offsets = state_dtype(dtype), offsets_of(sizes)
    grads = normal(sizes, dtype)
    got = Guarded(sizes, dtype, grads)
    grad_sums, curvature_sums = Guarded(sizes, sd), Guarded(sizes, sd)
    expected = nan_like(curvature_sums.tensors)
    hyper = dict(seed=_seed(0), price=price, first=True, last=True)
    module(backend).ivon_accumulate(got.tensors, grad_sums.tensors, curvature_sums.tensors, offsets, flag(), **hyper)
    SPEC.ivon_accumulate(clones(grads), nan_like(grad_sums.tensors), expected, offsets, flag(), **hyper)
    slack = _price_slack(hyper["seed"], offsets, grads) if price else [0.0] * len(sizes)
    for i, (a, e, g) in enumerate(zip(curvature_sums.tensors, expected, grads)):
        assert_close(a, e, sd, f"curvature_sum[{i}]", slack=slack[i])
        assert torch.equal(got.tensors[i], g), f"grad[{i}] was changed"
        assert grad_sums.tensors[i].isnan().all(), f"grad_sum[{i}] was written"
    grad_sums.check("grad_sums")
    curvature_sums.check("curvature_sums")


@pytest.mark.parametrize("backend", ["eager", *COMPARED])
@pytest.mark.parametrize("first,last", [*STAGES, (True, True)], ids=["first", "middle", "last", "only"])
@pytest.mark.parametrize("where", NONFINITE_AT)
def test_ivon_accumulate_raises_the_flag(backend, first, last, where):
    sizes = [9, 1030, 3]
    grads = with_nonfinite(normal(sizes, torch.bfloat16), float("inf"), where)
    sums = [normal(sizes, torch.float32), normal(sizes, torch.float32)]
    found_inf = flag()
    module(backend).ivon_accumulate(
        grads, *sums, offsets_of(sizes), found_inf, seed=5, price=True, first=first, last=last
    )
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("backend", ["eager", *COMPARED])
def test_a_sum_that_overflows_its_dtype_raises_the_flag(backend):
    """float16 gradients of 40000 in each of two samples: each is finite, their sum is not a float16."""
    sizes = [3, 1030]
    offsets = offsets_of(sizes)
    grads = [torch.full((n,), 40000.0, dtype=torch.float16, device=DEVICE) for n in sizes]
    sums = [[torch.empty(n, dtype=torch.float32, device=DEVICE) for n in sizes] for _ in range(2)]
    found_inf = flag()
    module(backend).ivon_accumulate(grads, *sums, offsets, found_inf, seed=1, price=False, first=True, last=False)
    assert found_inf.item() == 0.0
    for g in grads:
        g.fill_(40000.0)
    module(backend).ivon_accumulate(grads, *sums, offsets, found_inf, seed=2, price=False, first=False, last=True)
    assert found_inf.item() == 1.0
