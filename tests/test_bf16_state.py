"""BSAM(state_dtype=torch.bfloat16): precision and momentum in bfloat16, stored with stochastic
rounding from a counter-based stream (sambayes._philox, "Stochastic rounding").

The rounding itself (exact expectation, the random words), the same bits in every backend, why
it is needed (round-to-nearest stalls the precision update; stochastic rounding tracks float32),
and the optimizer around it: memory, refusals, trajectories across backends. Its checkpoints (a
resumed run, loads across state dtypes) are in test_checkpoints.py.
"""

import pytest
import torch
from conftest import AVAILABLE_BACKENDS, DEVICE
from harness import COMPARED, SPEC, flag, module, offsets_of

from sambayes import BSAM, _philox

BF16 = torch.bfloat16


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16).int() & 0xFFFF


# ---- the rounding --------------------------------------------------------------------------


def test_the_expectation_over_all_random_bits_is_exactly_the_float32_value():
    x = torch.randn(200, dtype=torch.float64).mul(torch.logspace(-30, 30, 200, dtype=torch.float64)).float()
    r = torch.arange(1 << 16, dtype=torch.int64)
    rounded = _philox.round_stochastic(x.unsqueeze(1).expand(-1, r.numel()), r.expand(x.numel(), -1))
    # the two neighbours only: x truncated to bfloat16 and the next value away from zero
    down = _philox.round_stochastic(x, torch.zeros(x.shape, dtype=torch.int64)).double()
    up = _philox.round_stochastic(x, torch.full(x.shape, 0xFFFF)).double()
    as_double = rounded.double()
    assert ((as_double == down.unsqueeze(1)) | (as_double == up.unsqueeze(1))).all()
    assert torch.equal(as_double.mean(dim=1), x.double())  # unbiased, exactly


def test_bfloat16_values_stay_and_nonfinite_values_are_kept():
    exact = torch.randn(1000).to(BF16)
    r = torch.randint(0, 1 << 16, (1000,))
    assert torch.equal(_philox.round_stochastic(exact.float(), r), exact)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    out = _philox.round_stochastic(special, torch.full((5,), 0xFFFF))
    assert out[:2].isinf().all() and out[2].isnan() and torch.equal(_bits(out[3:]), torch.tensor([0, 0x8000]))


def test_the_rounding_words_are_lanes_of_philox_calls():
    seed = 2**40 + 9
    for start in (0, 3, 4 * 2**32 - 5):
        words = _philox.rounding_words(seed, start, 11)
        calls = torch.stack(_philox.philox4x32(seed, torch.arange(start // 4, (start + 10) // 4 + 1)), dim=-1)
        expected = [int(calls[(start + k) // 4 - start // 4, (start + k) % 4]) for k in range(11)]
        assert words.tolist() == expected


# ---- every backend --------------------------------------------------------------------------


def _exact_update_inputs(sizes):
    """Inputs whose float32 update is one rounding of exact terms (β = 1/2, no decay, no damping):
    every backend computes the same float32 values, so the bfloat16 results must be bitwise equal."""
    gen = torch.Generator().manual_seed(5)

    def rand(positive):
        values = [torch.rand(n, generator=gen) * 3 + 0.1 if positive else torch.randn(n, generator=gen) for n in sizes]
        return [v.to(DEVICE) for v in values]

    return {
        "grad_sums": rand(False),
        "means": rand(False),
        "precisions": [t.to(BF16) for t in rand(True)],
        "momentums": [t.to(BF16) for t in rand(False)],
        "curvature_sums": rand(True),
    }


def _assert_update_rounds_as_eager(backend, sizes, offsets, seed, inputs):
    """bsam_update on eager and on ``backend`` from the same ``inputs(sizes)`` (β = 1/2, no decay, no
    damping): the bfloat16 precision and momentum must be bitwise equal. Returns eager's inputs, updated."""
    hyper = {"lr": 0.1, "beta1": 0.5, "beta2": 0.5, "weight_decay": 0.0, "damping": 0.0, "splits": 1, "seed": seed}
    results = {}
    for name, phases in (("eager", SPEC), (backend, module(backend))):
        x = inputs(sizes)
        params = [torch.full_like(m, float("nan")) for m in x["means"]]
        ones = torch.ones((), device=DEVICE)
        phases.bsam_update(
            params, x["grad_sums"], x["means"], x["precisions"], x["momentums"], x["curvature_sums"],
            offsets, flag(), ones, **hyper,
        )  # fmt: skip
        results[name] = x
    for key in ("precisions", "momentums"):
        for i, (got, want) in enumerate(zip(results[backend][key], results["eager"][key])):
            assert torch.equal(_bits(got), _bits(want)), f"{backend} {key}[{i}]: other bits than eager's"
    return results["eager"]


@pytest.mark.parametrize("backend", COMPARED)
def test_every_backend_rounds_with_the_same_bits(backend):
    sizes = [7, 1025, 3, 33]
    offsets = offsets_of(sizes, first=2**34 + 1)  # off a multiple of 4, past 2^32 calls
    _assert_update_rounds_as_eager(backend, sizes, offsets, 77, _exact_update_inputs)


@pytest.mark.parametrize("backend", COMPARED)
def test_every_backend_stores_nonfinite_state_as_eager(backend):
    """±inf stays ±inf, NaN becomes 0x7FC0 and a float32 above bfloat16's largest finite value rounds up to
    inf or down by its random bits, bit for bit as eager: the kernels test for NaN alone (an infinity's low
    bits are zero, so adding the random bits keeps it)."""
    big = torch.finfo(torch.float32).max
    # NaNs whose payload the random bits would carry out of (a GPU's canonical NaN is 0x7FFFFFFF)
    payloads = torch.tensor([0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)
    specials = torch.cat([torch.tensor([float("inf"), -float("inf"), float("nan"), big, -big, 1.0]), payloads])

    def inputs(sizes):
        # momentum = (m + g)/2, precision = (s + a)/2: the specials, and near-max values that round either way
        x = _exact_update_inputs(sizes)
        x["momentums"] = [torch.full((n,), torch.finfo(BF16).max, dtype=BF16, device=DEVICE) for n in sizes]
        x["grad_sums"] = [specials.repeat(n // 8 + 1)[:n].to(DEVICE) for n in sizes]
        x["curvature_sums"] = [specials.roll(3).repeat(n // 8 + 1)[:n].to(DEVICE) for n in sizes]
        return x

    sizes = [1030, 7]  # a full block and a tail
    eager = _assert_update_rounds_as_eager(backend, sizes, offsets_of(sizes, first=3), 5, inputs)
    momentum = eager["momentums"][0].float()
    assert momentum.isinf().any() and momentum.isnan().any() and momentum.isfinite().any()


@pytest.mark.parametrize("backend", ["eager", *COMPARED])
def test_round_to_nearest_stalls_the_precision_and_stochastic_rounding_tracks_float32(backend):
    # precision 1 heading for a+δ+γ = 2 with β2 = 0.999: each step moves it by 0.001·(2 − s), less
    # than half a bfloat16 ulp at 1 (2^-8): rounded to nearest, it never leaves 1
    n, steps = 4096, 400
    hyper = {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0, "damping": 0.1, "splits": 1}
    curvature = [torch.full((n,), 1.9, device=DEVICE)]
    grads = [torch.zeros(n, device=DEVICE)]
    args = {"found_inf": flag(), "inv_scale": torch.ones((), device=DEVICE)}

    def run(precision_dtype, phases, round_to_nearest=False):
        params, means = [torch.zeros(n, device=DEVICE)], [torch.zeros(n, device=DEVICE)]
        precision = [torch.ones(n, device=DEVICE, dtype=precision_dtype)]
        momentum = [torch.zeros(n, device=DEVICE, dtype=precision_dtype)]
        for t in range(steps):
            seed = _philox.rounding_seed(3, 0, t)
            phases.bsam_update(params, grads, means, precision, momentum, curvature, [0], **args, **hyper, seed=seed)
            if round_to_nearest:  # what a plain .to(torch.bfloat16) of the float32 result keeps
                precision[0].copy_(precision[0].to(BF16))
        return precision[0].double()

    float32 = run(torch.float32, SPEC)
    nearest = run(torch.float32, SPEC, round_to_nearest=True)
    stochastic = run(BF16, module(backend) if backend != "eager" else SPEC)
    target = 2 - 0.999**steps * (2 - 1)  # 1.33: float32 follows it
    assert abs(float32.mean() - target) < 1e-4
    assert (nearest == 1.0).all(), "round-to-nearest moved: the test no longer shows the stall"
    # unbiased: the mean over 4096 elements is within a few standard errors (spread ~0.05 each)
    assert abs(stochastic.mean() - float32.mean()) < 0.01, f"{stochastic.mean():.4f} vs float32 {float32.mean():.4f}"
    assert stochastic.std() > 0  # the elements went separate ways: rounding is random, not a bias


# ---- the optimizer -----------------------------------------------------------------------------


def make_net(dtype=torch.float32):
    """6 → 33 → 3 with a tanh, seeded (test_checkpoints.py uses it too)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3)).to(dtype)


def train_steps(opt, net, steps, splits=1):
    """``steps`` steps on fresh batches of a generator of their own, in ``splits`` sub-batches."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)

        def closure(j=0):
            xs, ys = x.chunk(splits)[j], y.chunk(splits)[j]
            loss = torch.nn.functional.cross_entropy(net(xs.to(DEVICE, next(net.parameters()).dtype)), ys.to(DEVICE))
            loss.backward()
            return loss

        opt.step(closure, splits=splits)


def test_state_is_8_bytes_per_float32_parameter():
    net = make_net()
    opt = BSAM(net.parameters(), num_data=100, state_dtype=BF16, seed=0)
    train_steps(opt, net, 2)
    numel = sum(p.numel() for p in net.parameters())
    kept = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert kept == 8 * numel
    assert {k: v.dtype for k, v in next(iter(opt.state.values())).items()} == {
        "mean": torch.float32,
        "precision": BF16,
        "momentum": BF16,
    }


def test_bad_state_dtypes_and_float64_parameters_are_refused():
    with pytest.raises(ValueError, match="state_dtype=torch.float16"):
        BSAM(make_net().parameters(), num_data=10, state_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"shape \(33, 6\) is float64"):
        BSAM(make_net(torch.float64).parameters(), num_data=10, state_dtype=BF16)
    net = make_net()
    opt = BSAM(net.parameters(), num_data=10, state_dtype=BF16)
    net.double()
    with pytest.raises(ValueError, match="float64"):
        train_steps(opt, net, 1)


@pytest.mark.parametrize("backend", COMPARED)
def test_trajectories_agree_across_backends(backend):
    runs = {}
    for name in ("eager", backend):
        net = make_net().to(DEVICE)
        opt = BSAM(net.parameters(), num_data=100, lr=0.05, state_dtype=BF16, seed=4, backend=name)
        train_steps(opt, net, 5, splits=2)
        runs[name] = opt.state_dict()["state"]
    for pid, want in runs["eager"].items():
        got = runs[backend][pid]
        torch.testing.assert_close(got["mean"], want["mean"], rtol=1e-4, atol=1e-5)
        for key in ("precision", "momentum"):  # one bfloat16 ulp where float32 values straddled a threshold
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=2.0**-7, atol=1e-6)


@pytest.mark.skipif("cpu" not in AVAILABLE_BACKENDS, reason="needs the cpu backend")
def test_sampled_params_read_bfloat16_precision():
    net = make_net()
    opt = BSAM(net.parameters(), num_data=100, state_dtype=BF16, seed=2)
    train_steps(opt, net, 2)
    means = [p.detach().clone() for p in net.parameters()]
    with opt.sampled_params(seed=5):
        drawn = [p.detach().clone() for p in net.parameters()]
    sigma = opt.posterior_std()
    z = torch.cat([((d - m) / s).flatten() for d, m, s in zip(drawn, means, sigma)])
    assert 0.8 < float(z.std()) < 1.2 and abs(float(z.mean())) < 0.2
