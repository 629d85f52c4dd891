"""The C++/CUDA extension sambayes._C: it is built, its Philox noise, its op checks, whole
"cpu" trajectories against the eager backend and the golden files, torch.compile tracing.
The phases themselves are checked against the spec in tests/test_<phase>.py."""

import json

import pytest
import torch
from conftest import DATA

import sambayes
from sambayes import _philox, backends

REASON = backends.why_unavailable("cpu", "cpu", load=False)
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"C++ extension unavailable: {REASON}")

EPS32 = 2.0**-23


@pytest.fixture(scope="module")
def extension():
    """The extension's backend module, loaded (compiled on first use) when a test asks for it."""
    return backends.resolve("cpu", "cpu")


def test_extension_is_built():
    # the package's build makes the CPU kernels whenever a C++ compiler is there: a missing one is a bug
    assert REASON is None, REASON


def _assert_lists_close(got, want, rtol, atol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m, i=i: f"{what}[{i}]: {m}")


# ---- noise ------------------------------------------------------------------------------------


@needs_ext
def test_philox_words_match_triton_vectors(extension):
    cases = json.loads((DATA / "philox_randn.json").read_text())["cases"]
    for case in cases:
        words = extension.philox_words(case["seed"], torch.tensor(case["offsets"]))
        assert words.tolist() == case["philox_uint32x4"], f"seed {case['seed']}"


@needs_ext
def test_randn4x_matches_triton_vectors(extension):
    """Element i takes lane i mod 4 of tl.randn4x(seed, i div 4) (ALGORITHM.md, "Noise", version 2)."""
    for case in json.loads((DATA / "philox_randn4x.json").read_text())["cases"]:
        seed = int(case["seed"])
        z = torch.stack([extension.randn_range(seed, int(i), 1)[0] for i, _ in case["elements"]])
        want = torch.tensor([v for _, v in case["elements"]], dtype=torch.float32)
        torch.testing.assert_close(z, want, rtol=3 * EPS32, atol=1e-12)
        for counter, lanes in zip(case["counters"], case["randn4x"]):
            got = extension.randn_range(seed, 4 * int(counter), 4)
            torch.testing.assert_close(got, torch.tensor(lanes, dtype=torch.float32), rtol=3 * EPS32, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 5, 2**63 - 1])
@pytest.mark.parametrize("start", [0, 2**32 - 700, 10**12 + 3])
def test_randn_range_matches_reference(seed, start, extension):
    # 2**32 - 700 crosses the carry into the counter's high word inside the range
    for numel in (1, 7, 1025, 4099):
        z = extension.randn_range(seed, start, numel)
        want = _philox.randn_range(seed, start, numel)
        # same Philox words bit for bit; log and cos agree to about an ulp each
        torch.testing.assert_close(z, want, rtol=3 * EPS32, atol=1e-12)


@needs_ext
def test_randn_is_standard_normal(extension):
    z = extension.randn_range(7, 0, 1 << 20).double()
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 5e-3


@needs_ext
def test_sample_uses_the_compiled_noise_exactly(extension):
    # with z taken from the extension, θ = m + z/sqrt(N·s) agrees to float32 rounding
    gen = torch.Generator().manual_seed(0)
    means = [torch.randn(1025, generator=gen), torch.randn(7, generator=gen)]
    precisions = [0.5 + torch.rand(1025, generator=gen), 0.5 + torch.rand(7, generator=gen)]
    params = [torch.full_like(m, float("nan")) for m in means]
    extension.bsam_sample(params, means, precisions, [0, 1025], num_data=3.0, seed=5)
    z = extension.randn_range(5, 0, 1032)
    want = torch.cat(means) + z / torch.sqrt(3.0 * torch.cat(precisions))
    torch.testing.assert_close(torch.cat(params), want, rtol=2 * EPS32, atol=2 * EPS32)


@needs_ext
def test_mismatched_lists_raise(extension):
    with pytest.raises(RuntimeError, match="numel|elements"):
        extension.restore([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(RuntimeError, match="dtype"):
        extension.restore([torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)])


# ---- whole trajectories ---------------------------------------------------------------------


def _mlp(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.Tanh(), torch.nn.Linear(33, 4)).to(dtype)


def _train(make_opt, dtype, steps=6, splits=2):
    model = _mlp(dtype)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 9, generator=gen).to(dtype)
        y = torch.randint(0, 4, (16,), generator=gen)
        chunks = sambayes.split_batch(x, y, splits=splits)

        def closure(j=0, chunks=chunks):
            xb, yb = chunks[j]
            loss = torch.nn.functional.cross_entropy(model(xb).float(), yb)
            loss.backward()
            return loss

        opt.step(closure, splits=splits)
    return model, opt


OPTIMIZERS = {
    "bsam": lambda ps, backend: sambayes.BSAM(ps, num_data=500, lr=0.1, rho=0.05, seed=3, backend=backend),
    "sam-sgd": lambda ps, backend: sambayes.SAM(ps, lr=0.1, rho=0.05, momentum=0.9, nesterov=True, backend=backend),
    "asam-adamw": lambda ps, backend: sambayes.SAM(ps, lr=0.01, rho=0.05, base="adamw", adaptive=True, backend=backend),
}


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trajectory_matches_eager(name, dtype):
    model_cpu, opt_cpu = _train(lambda ps: OPTIMIZERS[name](ps, "cpu"), dtype)
    model_eager, opt_eager = _train(lambda ps: OPTIMIZERS[name](ps, "eager"), dtype)
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5), torch.bfloat16: (0.05, 0.02)}[dtype]
    if name == "bsam" and dtype == torch.float64:
        # the noise is float32 in every backend and agrees to 3 float32 ulps, so float64 runs part there
        rtol, atol = 1e-6, 1e-8
    for p_cpu, p_eager in zip(model_cpu.parameters(), model_eager.parameters()):
        for key in opt_eager.state[p_eager]:
            torch.testing.assert_close(opt_cpu.state[p_cpu][key], opt_eager.state[p_eager][key], rtol=rtol, atol=atol)
        torch.testing.assert_close(p_cpu, p_eager, rtol=rtol, atol=atol)


# ---- torch.library ----------------------------------------------------------------------------


@needs_ext
def test_ops_trace_under_torch_compile():
    params = [torch.randn(10), torch.randn(3)]
    grads = [torch.randn(10), torch.randn(3)]
    weights = [torch.randn(10), torch.randn(3)]

    found_inf, inv_scale = torch.zeros(()), torch.ones(())

    def step(params, grads, weights):
        sq = torch.ops.sambayes_C.sam_sq_norm(grads, weights, found_inf, inv_scale, False)
        torch.ops.sambayes_C.sam_perturb(params, grads, weights, inv_scale, 0.05 / sq.sqrt(), False)
        return sq

    want_params = [p.clone() for p in params]
    want = step(want_params, [g.clone() for g in grads], weights)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(params, grads, weights)
    torch.testing.assert_close(got, want)
    _assert_lists_close(params, want_params, 0, 0, "compiled sam_perturb")
