"""BSAM, sambayes/bsam.py: the algorithm (against a hand-written reference), backends, noise, seeds,
the posterior (sampled_params, predict), dtypes. What BSAM shares with SAM is in test_optimizer.py
and the files beside it."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS
from harness import CPU_BACKENDS, cross_entropy_closure, data, flat, linear, small_mlp, square_closure
from torch.func import functional_call, grad

import sambayes


def closure_for(model, chunks):
    def closure(j=0):
        x, y = chunks[j]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


# ---------------------------------------------------------------------------------------
# the algorithm, written out independently of the package, with splits > 1


def reference_bsam_step(model, params, state, chunks, *, lr, b1, b2, rho, wd, damping):
    """ALGORITHM.md line by line, noise-free (N -> inf), on dicts of tensors."""

    def loss_grad(theta, x, y):
        return grad(lambda t: F.cross_entropy(functional_call(model, t, (x,)), y))(theta)

    m, s, gm = state["mean"], state["precision"], state["momentum"]
    hs, stats = [], []
    for x, y in chunks:
        g = loss_grad(dict(m), x, y)  # θ = m + z/sqrt(N s) with N -> inf
        theta = {k: m[k] + rho * g[k] / s[k] for k in m}
        hs.append(loss_grad(theta, x, y))
        stats.append({k: torch.sqrt(s[k] * g[k] ** 2) for k in m})
    k = len(chunks)
    for n in m:
        h = sum(hj[n] for hj in hs) / k
        a = sum(st[n] for st in stats) / k
        gm[n] = b1 * gm[n] + (1 - b1) * (h + wd * m[n])
        m[n] = m[n] - lr * gm[n] / s[n]
        s[n] = b2 * s[n] + (1 - b2) * (a + wd + damping)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("splits", [1, 4])
def test_bsam_matches_written_out_algorithm(backend, splits):
    model = small_mlp(torch.float64)
    x, y = data(dtype=torch.float64)
    hyper = dict(lr=0.05, b1=0.8, b2=0.95, rho=0.1, wd=0.01, damping=0.2)
    names = [n for n, _ in model.named_parameters()]
    ref = {
        "mean": {n: p.detach().clone() for n, p in model.named_parameters()},
        "precision": {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()},
        "momentum": {n: torch.zeros_like(p) for n, p in model.named_parameters()},
    }
    opt = sambayes.BSAM(
        model.parameters(),
        num_data=1e30,
        lr=hyper["lr"],
        betas=(hyper["b1"], hyper["b2"]),
        rho=hyper["rho"],
        weight_decay=hyper["wd"],
        damping=hyper["damping"],
        init_precision=2.0,
        seed=3,
        backend=backend,
    )
    chunks = sambayes.split_batch(x, y, splits=splits)
    for _ in range(5):
        reference_bsam_step(model, None, ref, chunks, **hyper)
        opt.step(closure_for(model, chunks), splits=splits)
    for n, p in zip(names, model.parameters()):
        for key in ("mean", "precision", "momentum"):
            torch.testing.assert_close(opt.state[p][key], ref[key][n], rtol=1e-12, atol=1e-13)
        assert torch.equal(p.detach(), opt.state[p]["mean"])  # at rest the model holds the mean


# ---------------------------------------------------------------------------------------
# backends agree on a small CNN with BatchNorm


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.head(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def assert_eager_and_foreach_agree_on_cnn(make_optimizer):
    """50 steps with splits 2 of a small CNN with BatchNorm: eager and foreach end in the same place."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    finals = {}
    for backend in ("eager", "foreach"):
        torch.manual_seed(0)
        model = SmallCNN()
        opt = make_optimizer(model.parameters(), backend)
        for step in range(50):
            idx = torch.arange(step % 2 * 16, step % 2 * 16 + 16)
            opt.step(closure_for(model, sambayes.split_batch(x[idx], y[idx], splits=2)), splits=2)
        finals[backend] = (model.state_dict(), opt.state_dict()["state"])
    for key, value in finals["eager"][0].items():
        torch.testing.assert_close(finals["foreach"][0][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for pid, state in finals["eager"][1].items():
        for key, value in state.items():
            torch.testing.assert_close(finals["foreach"][1][pid][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*bare parameters of a model with BatchNorm:UserWarning")
@pytest.mark.slow
def test_eager_and_foreach_agree_on_cnn_with_batchnorm():
    assert_eager_and_foreach_agree_on_cnn(
        lambda ps, backend: sambayes.BSAM(
            ps, num_data=1000, lr=0.1, rho=0.05, weight_decay=1e-3, seed=11, backend=backend
        )
    )


# ---------------------------------------------------------------------------------------
# the noise


@pytest.mark.filterwarnings("ignore:.*gave no parameter a gradient:RuntimeWarning")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noise_has_posterior_mean_and_variance(backend):
    # 20,000 elements, precision varying per element: z = (θ - m)·sqrt(N·s) must be N(0, 1).
    # |mean(z)| < 5/sqrt(n) and |var(z) - 1| < 5·sqrt(2/n) fail by chance with probability < 1e-6.
    n, num_data = 20_000, 50.0
    p = torch.nn.Parameter(torch.randn(100, 200))
    opt = sambayes.BSAM([p], num_data=num_data, seed=7, backend=backend)
    opt.sample()
    state = opt.state[p]
    state["precision"].uniform_(0.5, 4.0)
    opt.perturb()  # no gradient: back to the mean
    p.grad = torch.zeros_like(p)
    opt.update()
    mean, precision = state["mean"].clone(), state["precision"].clone()
    opt.sample()
    z = ((p.detach() - mean) * torch.sqrt(num_data * precision)).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    expected_var = 1 / (num_data * precision)
    torch.testing.assert_close(opt.posterior_variance()[0], expected_var)
    torch.testing.assert_close(opt.posterior_std()[0], expected_var.sqrt())


@pytest.mark.filterwarnings("ignore:.*gave no parameter a gradient:RuntimeWarning")
def test_noise_is_a_function_of_seed_step_split_and_index():
    a, b = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(10))
    opt = sambayes.BSAM([a, b], num_data=1.0, seed=42)
    opt.sample()
    za, zb = a.detach().clone(), b.detach().clone()
    seed = sambayes.noise_seed(42, 0, 0, 0)
    from sambayes import _philox

    # s0 = 1, N = 1: θ = z; the compiled Philox may differ from the emulation by a few ulps
    close = dict(rtol=5e-7, atol=5e-7)
    torch.testing.assert_close(za.flatten(), _philox.randn_range(seed, 0, 12), **close)
    torch.testing.assert_close(zb, _philox.randn_range(seed, 12, 10), **close)  # index runs on
    opt.perturb()
    opt.update()
    opt.sample()
    assert not torch.equal(a.detach(), za)  # next step, new noise


def test_same_seed_same_run_different_seed_different_run():
    def run(seed):
        model = small_mlp()
        x, y = data()
        opt = sambayes.BSAM(model.parameters(), num_data=100, seed=seed)
        for _ in range(3):
            opt.step(closure_for(model, [(x, y)]))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_seed_none_draws_from_the_system_and_leaves_torch_alone():
    """seed=None does not consume torch's generator: the user's shuffling and dropout streams stay as
    they would be with any other optimizer."""
    p = [torch.nn.Parameter(torch.zeros(3))]
    torch.manual_seed(3)
    seeds = {sambayes.BSAM(p, num_data=1).param_groups[0]["seed"] for _ in range(4)}
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)


def test_seeds_are_integers_below_2_to_the_64():
    p = [torch.nn.Parameter(torch.zeros(2))]
    np = pytest.importorskip("numpy")
    assert sambayes.BSAM(p, num_data=1, seed=np.int64(7)).param_groups[0]["seed"] == 7
    assert sambayes.BSAM(p, num_data=1, seed=2**64 - 1).param_groups[0]["seed"] == 2**64 - 1
    for bad in (2**64, -1, 1.5, "3", True):
        with pytest.raises(ValueError, match="seed="):
            sambayes.BSAM(p, num_data=1, seed=bad)


# ---------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_state_dtypes(backend, dtype):
    model = small_mlp(dtype)
    x, y = data(dtype=dtype)
    opt = sambayes.BSAM(model.parameters(), num_data=100, lr=0.1, seed=0, backend=backend)
    for _ in range(3):
        loss = opt.step(closure_for(model, [(x, y)]))
    assert torch.isfinite(loss)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    for p in model.parameters():
        assert p.dtype == dtype
        assert all(opt.state[p][k].dtype == expected for k in ("mean", "precision", "momentum"))
        assert torch.equal(p.detach(), opt.state[p]["mean"].to(dtype))  # at rest: the rounded mean
    sam = sambayes.SAM(model.parameters(), lr=0.1, backend=backend)
    sam.step(closure_for(model, [(x, y)]))
    assert all(sam.state[p]["weight"].dtype == expected for p in model.parameters())


def test_bfloat16_keeps_float32_master_mean():
    """Updates smaller than bf16's resolution accumulate in the float32 mean."""
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = sambayes.BSAM([p], num_data=1e30, lr=1e-4, betas=(0.0, 0.999), rho=0.0, damping=0.0)
    for _ in range(10):
        opt.sample()
        p.grad = torch.ones_like(p)
        opt.perturb()
        p.grad = torch.ones_like(p)
        opt.update()
    mean = opt.state[p]["mean"]
    assert (mean < 1 - 5e-4).all()  # ten steps of 1e-4 / s
    assert torch.equal(p.detach(), mean.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------
# the posterior in the model: sampled_params(), predict()


def test_sampled_params_restores_the_mean_exactly_even_on_error():
    model = small_mlp(torch.bfloat16)
    x, y = data(dtype=torch.bfloat16)
    opt = sambayes.BSAM(model.parameters(), num_data=10)
    opt.step(cross_entropy_closure(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params(seed=1):
        sample1 = flat(model)
        assert not torch.equal(sample1, torch.cat([b.flatten() for b in before]))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(KeyError), opt.sampled_params(seed=1):
        assert torch.equal(flat(model), sample1)  # a pure function of the seed
        raise KeyError("boom")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with opt.sampled_params(seed=2):
        assert not torch.equal(flat(model), sample1)


def test_nested_sampled_params_return_to_the_outer_sample():
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=10, seed=0)
    opt.step(square_closure(m, x))
    mean = m.weight.detach().clone()
    with opt.sampled_params(seed=1):
        outer = m.weight.detach().clone()
        with opt.sampled_params(seed=2):
            assert not torch.equal(m.weight, outer)
        assert torch.equal(m.weight, outer)
    assert torch.equal(m.weight, mean)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_no_step_inside_sampled_params(backend):
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0, backend=backend)
    opt.step(square_closure(m, x))
    mean = m.weight.detach().clone()
    with opt.sampled_params(seed=1):
        with pytest.raises(RuntimeError, match="sampled_params"):
            opt.step(square_closure(m, x))
        with pytest.raises(RuntimeError, match="sampled_params"):
            opt.sample()
    assert torch.equal(m.weight, mean)


@pytest.mark.filterwarnings("ignore:.*bare parameters of a model with BatchNorm:UserWarning")
def test_predict_averages_softmax_over_posterior_samples():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))
    x, y = data()
    opt = sambayes.BSAM(model.parameters(), num_data=5)
    opt.step(cross_entropy_closure(model, x, y))
    model.train()
    running_mean = model[1].running_mean.clone()
    probs = sambayes.predict(model, opt, x, samples=4, seed=10)
    assert model.training and torch.equal(model[1].running_mean, running_mean)  # eval inside, mode restored
    model.eval()
    manual = []
    for s in range(4):
        with opt.sampled_params(seed=10 + s):
            manual.append(torch.softmax(model(x), -1))
    torch.testing.assert_close(probs, torch.stack(manual).mean(0))
    torch.testing.assert_close(sambayes.predict(model, opt, x, samples=0), torch.softmax(model(x), -1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(x)))
    with pytest.raises(TypeError, match="BSAM"):
        sambayes.predict(model, sambayes.SAM(model.parameters(), lr=0.1), x, samples=2)
    with pytest.raises(ValueError, match="samples=-1"):
        sambayes.predict(model, opt, x, samples=-1)
