"""ivon_update (momentum, Hessian, mean with the new precision, clipped, θ = m; a skipped step keeps the state)
on every backend against the eager backend: from the sums over samples, and for one sample from the gradient
and its regenerated noise."""

import dataclasses

import pytest
import torch
from conftest import DEVICE
from harness import (
    BLOCK,
    COMPARED,
    NOISE_ULPS,
    SPEC,
    Guarded,
    assert_close,
    assert_rounded,
    assert_stochastically_rounded,
    assert_zeros,
    clones,
    flag,
    inv_scale,
    lean_cases,
    module,
    nan_like,
    normal,
    offsets_of,
    positive,
    posterior_state,
    state_dtype,
)

#: clip_radius clips some of the steps (directions are O(1) here); seed: the rounding stream's key (bfloat16 state)
HYPER = {
    "lr": 0.3,
    "beta1": 0.9,
    "beta2": 0.99,
    "ess": 50.0,
    "weight_decay": 1e-3,
    "clip_radius": 0.5,
    "debias": True,
    "splits": 3,
    "noise_seed": 2**41 + 3,
    "seed": 2**40 + 5,
}
STEP = 4.0  # updates taken, counting this one: the debiasing's t


@dataclasses.dataclass
class Mode:
    price: bool
    summed: bool

    def __str__(self) -> str:
        return ("price" if self.price else "gradsq") + ("-summed" if self.summed else "-one-sample")


MODES = [Mode(True, True), Mode(False, True), Mode(True, False), Mode(False, False)]


def mode_cases() -> list:
    """The three other modes: every backend, over three tensors, in float32 (with bfloat16 state too), bfloat16
    and float64: the dtypes' loads and stores are the same in every mode."""
    out = []
    for mode in MODES[1:]:
        for backend in COMPARED:
            for dtype, stored in ((torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, None),
                                  (torch.float64, None)):  # fmt: skip
                case = f"{mode}-{backend}-{str(dtype).split('.')[-1]}-7x1025x1" + ("-bf16state" if stored else "")
                out.append(pytest.param(mode, backend, dtype, [7, 1025, 1], stored, id=case))
    return out


def _run(mode, backend, dtype, sizes, found_inf, stored):
    sd = state_dtype(dtype)
    grad_sums = normal(sizes, dtype)
    # a curvature sum over 3 samples: z·g of either sign (price), or g² >= 0 (gradsq)
    curvature_sums = normal(sizes, sd) if mode.price else positive(sizes, sd)
    # mean, precision (s = h + δ, positive), momentum; stored: bfloat16 precision and momentum, else the state dtype
    start, state, expected_state = posterior_state(sizes, dtype, stored)
    offsets = offsets_of(sizes)
    hyper = dict(HYPER, price=mode.price, summed=mode.summed, splits=HYPER["splits"] if mode.summed else 1)
    step = torch.tensor(STEP, dtype=torch.float64, device=DEVICE)
    # one sample: the curvature sums are not read (the optimizer passes the means); here poison
    read_sums = curvature_sums if mode.summed else nan_like(curvature_sums)
    got_grads, want_grads = Guarded(sizes, dtype, grad_sums), clones(grad_sums)
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    module(backend).ivon_update(
        params.tensors,
        got_grads.tensors,
        *(s.tensors for s in state),
        read_sums,
        offsets,
        flag(found_inf),
        inv_scale(),
        step,
        **hyper,
    )
    SPEC.ivon_update(
        expected, want_grads, *expected_state, read_sums, offsets, flag(found_inf), inv_scale(), step, **hyper
    )
    slack = _noise_slack(grad_sums, start, read_sums, offsets, found_inf, step, hyper, expected_state)
    params.check("ivon_update params")
    got_grads.check("ivon_update grad_sums")
    for k, (name, got, want) in enumerate(zip(("mean", "precision", "momentum"), state, expected_state)):
        got.check(f"ivon_update {name}")
        if want[0].dtype == torch.bfloat16:
            assert_stochastically_rounded(got.tensors, want, name)
        else:
            for i, (a, e) in enumerate(zip(got.tensors, want)):
                assert_close(a, e, sd, f"{name}[{i}]", slack=slack[k][i])
    # the model holds the (new) mean; the gradient buffer is ready for the next step
    assert_rounded(params.tensors, state[0].tensors, "param")
    assert_zeros(got_grads.tensors, "grad_sum")
    return start, state


def _noise_slack(grad_sums, start, read_sums, offsets, found_inf, step, hyper, expected_state) -> list:
    """Per state key and tensor, how far the outputs may move when the one sample's noise z differs by NOISE_ULPS
    float32 ulps between backends (price, one sample): c = z·g scales by (1 ± ε), as f = sqrt(ess·s)·c does when
    ess scales by (1 ± ε)²; twice the larger change of the spec's outputs. 0 where no noise is drawn."""
    if hyper["summed"] or not hyper["price"]:
        return [[0.0] * len(grad_sums) for _ in start]
    epsilon = NOISE_ULPS * 2.0**-23
    moved = [[torch.zeros(t.shape, dtype=torch.float64, device=DEVICE) for t in key] for key in start]
    for factor in ((1 + epsilon) ** 2, (1 - epsilon) ** 2):
        state = [clones(values) for values in start]
        SPEC.ivon_update(
            nan_like(grad_sums),
            clones(grad_sums),
            *state,
            read_sums,
            offsets,
            flag(found_inf),
            inv_scale(),
            step,
            **dict(hyper, ess=hyper["ess"] * factor),
        )
        for k, (key, want) in enumerate(zip(state, expected_state)):
            for i, (a, e) in enumerate(zip(key, want)):
                moved[k][i] = torch.maximum(moved[k][i], 2 * (a.double() - e.double()).abs())
    return moved


@pytest.mark.parametrize("backend,dtype,sizes,stored", lean_cases(stored=True))
def test_ivon_update_from_the_sums_matches_eager(backend, dtype, sizes, stored):
    _run(MODES[0], backend, dtype, sizes, 0.0, stored)


@pytest.mark.parametrize("mode,backend,dtype,sizes,stored", mode_cases())
def test_ivon_update_in_every_mode_matches_eager(mode, backend, dtype, sizes, stored):
    _run(mode, backend, dtype, sizes, 0.0, stored)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("stored", [None, torch.bfloat16], ids=["state", "bf16state"])
@pytest.mark.parametrize("backend", COMPARED)
def test_ivon_update_skips_on_the_flag(backend, stored, mode):
    start, state = _run(mode, backend, torch.float32, [7, BLOCK + 1], 1.0, stored)
    for name, before, after in zip(("mean", "precision", "momentum"), start, state):
        assert all(torch.equal(a, b) for a, b in zip(after.tensors, before)), f"skipped step changed the {name}"


@pytest.mark.parametrize("backend", ["eager", *COMPARED])
def test_clipping_and_the_debiasing_act(backend):
    """A radius that clips every element moves each mean by exactly lr·radius; without debiasing the first step
    moves by lr·(1 − β1)·g/s where debiasing moves by lr·g/s."""
    n, sd = 1025, torch.float32
    mean = torch.zeros(n, dtype=sd, device=DEVICE)
    grad = torch.full((n,), 5.0, dtype=sd, device=DEVICE)
    one = torch.ones((), dtype=torch.float64, device=DEVICE)

    def update(**changes):
        state = [mean.clone(), torch.ones(n, dtype=sd, device=DEVICE), torch.zeros(n, dtype=sd, device=DEVICE)]
        hyper = dict(HYPER, price=False, summed=False, splits=1, weight_decay=0.0, clip_radius=float("inf"))
        hyper.update(changes)
        module(backend).ivon_update(
            [torch.empty(n, dtype=sd, device=DEVICE)], [grad.clone()], *[[t] for t in state], [state[0]], [0],
            flag(), torch.ones((), device=DEVICE), one, **hyper,
        )  # fmt: skip
        return state[0], state[1]

    clipped, _ = update(clip_radius=0.01)
    step = torch.tensor(HYPER["lr"], dtype=sd) * torch.tensor(0.01, dtype=sd)  # lr·radius in float32
    assert torch.equal(clipped.cpu(), torch.full((n,), -step.item(), dtype=sd))
    debiased, s = update()
    raw, _ = update(debias=False)
    torch.testing.assert_close(debiased, -HYPER["lr"] * 5.0 / s)
    torch.testing.assert_close(raw, (1 - HYPER["beta1"]) * debiased)
