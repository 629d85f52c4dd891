"""bsam_update (momentum, mean, precision, θ = m; a skipped step keeps the state) on every
backend against the eager backend."""

import pytest
import torch
from harness import (
    INV_SCALE,
    SPEC,
    Guarded,
    assert_lists_close,
    assert_rounded,
    assert_stochastically_rounded,
    assert_zeros,
    bsam_cases,
    clones,
    contraction_slack,
    flag,
    inv_scale,
    module,
    nan_like,
    normal,
    offsets_of,
    positive,
    posterior_state,
    state_dtype,
)

#: seed: the stochastic-rounding stream's key (read with bfloat16 precision and momentum only)
HYPER = {"lr": 0.3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-3, "damping": 0.1, "splits": 3, "seed": 2**40 + 5}


def _run(backend, dtype, sizes, found_inf, stored):
    sd = state_dtype(dtype)
    grad_sums, curvature_sums = normal(sizes, dtype), positive(sizes, sd)
    # mean, precision, momentum; stored: bfloat16 precision and momentum, else the state dtype
    start, state, expected_state = posterior_state(sizes, dtype, stored)
    offsets = offsets_of(sizes)
    got_grads, want_grads = Guarded(sizes, dtype, grad_sums), clones(grad_sums)
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    module(backend).bsam_update(
        params.tensors,
        got_grads.tensors,
        *(s.tensors for s in state),
        curvature_sums,
        offsets,
        flag(found_inf),
        inv_scale(),
        **HYPER,
    )
    SPEC.bsam_update(
        expected, want_grads, *expected_state, curvature_sums, offsets, flag(found_inf), inv_scale(), **HYPER
    )
    params.check("bsam_update params")
    got_grads.check("bsam_update grad_sums")
    slack = fma_slack(sd, start, grad_sums, curvature_sums, expected_state[2])
    for name, got, want, allowed in zip(("mean", "precision", "momentum"), state, expected_state, slack):
        got.check(f"bsam_update {name}")
        if want[0].dtype == torch.bfloat16:
            assert_stochastically_rounded(got.tensors, want, name, allowed)
        else:
            assert_lists_close(got.tensors, want, sd, name, allowed)
    # the model holds the (new) mean; the gradient buffer is ready for the next step
    assert_rounded(params.tensors, state[0].tensors, "param")
    assert_zeros(got_grads.tensors, "grad_sum")
    return start, state


def fma_slack(sd, start, grad_sums, curvature_sums, new_momentums) -> tuple[list, list, list]:
    """(mean, precision, momentum): per tensor, how far fused multiply-adds may move each line
    (harness.contraction_slack of its terms); the mean's line inherits the momentum's, times lr/s."""
    b1, b2, wd, lr = HYPER["beta1"], HYPER["beta2"], HYPER["weight_decay"], HYPER["lr"]
    out = ([], [], [])
    for i, (g, c, gm_new) in enumerate(zip(grad_sums, curvature_sums, new_momentums)):
        m, s, gm = (values[i].double() for values in start)
        h, a = g.double() * INV_SCALE / HYPER["splits"], c.double() / HYPER["splits"]
        momentum = contraction_slack(sd, b1 * gm, (1 - b1) * h, (1 - b1) * wd * m)
        precision = contraction_slack(sd, b2 * s, (1 - b2) * a, (1 - b2) * (wd + HYPER["damping"]))
        mean = contraction_slack(sd, m, lr * gm_new.double() / s) + lr * momentum / s
        for slacks, value in zip(out, (mean, precision, momentum)):
            slacks.append(value)
    return out


@pytest.mark.parametrize("backend,dtype,sizes,stored", bsam_cases())
def test_bsam_update_matches_eager(backend, dtype, sizes, stored):
    _run(backend, dtype, sizes, 0.0, stored)


@pytest.mark.parametrize("backend,dtype,sizes,stored", bsam_cases())
def test_bsam_update_skips_on_the_flag(backend, dtype, sizes, stored):
    start, state = _run(backend, dtype, sizes, 1.0, stored)
    for name, before, after in zip(("mean", "precision", "momentum"), start, state):
        assert all(torch.equal(a, b) for a, b in zip(after.tensors, before)), f"skipped step changed the {name}"


def test_the_bf16_check_allows_contraction_only_where_the_terms_cancel():
    """A bfloat16 momentum 3 ulps from the spec's passes where the terms of its line cancel (their
    contraction slack is larger than those ulps), and fails where they do not: the slack is no blanket."""
    want = torch.tensor([1e-3, 1.0], dtype=torch.bfloat16)
    got = (want.view(torch.int16) + 3).view(torch.bfloat16)  # 3 bfloat16 ulps above
    cancelling = contraction_slack(torch.float32, torch.tensor([300.0, 1.0]), torch.tensor([300.0, 1.0]))
    assert_stochastically_rounded([got[:1]], [want[:1]], "momentum", [cancelling[:1]])
    with pytest.raises(pytest.fail.Exception, match="differ"):
        assert_stochastically_rounded([got[1:]], [want[1:]], "momentum", [cancelling[1:]])
