"""The "cpu" tier (C++ kernels of sambayes._C) against the eager tier, the executable spec.

Fresh random inputs, outputs poisoned with NaN before each kernel runs, odd sizes,
all parameter dtypes, 1/3/500 tensors; whole trajectories; the golden cases; noise.
"""

import json

import pytest
import torch
from conftest import DATA, GoldenMLP, load_golden

import sambayes
from sambayes import _cext, _eager, _philox

REASON = _cext.why_unavailable("cpu", "cpu")
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"C++ extension unavailable: {REASON}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SIZES = [1, 7, 1023, 1025, 65537]
EPS32 = 2.0**-23


def test_extension_is_built():
    # the package's build makes the CPU kernels whenever a C++ compiler is there: a missing one is a bug
    assert REASON is None, REASON


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tol(dtype, atol32=2e-6):
    """(rtol, atol) for parameter outputs: at most one rounding of the storage dtype apart."""
    return {
        torch.float64: (1e-13, 1e-13),
        torch.float32: (2e-6, atol32),
        torch.bfloat16: (2.0**-7, atol32),
        torch.float16: (2.0**-10, atol32),
    }[dtype]


def _group(dtype, numels, seed=0):
    """Random tensors of one (device, dtype) group: params/grads in ``dtype``, state in the state dtype."""
    gen = torch.Generator().manual_seed(seed)
    sd = _state_dtype(dtype)

    def randn(n, dt):
        return torch.randn(n, generator=gen, dtype=torch.float64).to(dt)

    def positive(n):
        return (0.5 + 1.5 * torch.rand(n, generator=gen, dtype=torch.float64)).to(sd)

    return {
        "params": [randn(n, dtype) for n in numels],
        "grads": [randn(n, dtype) for n in numels],
        "means": [randn(n, sd) for n in numels],
        "precisions": [positive(n) for n in numels],
        "momentums": [randn(n, sd) for n in numels],
        "stats": [positive(n) for n in numels],
        "variances": [positive(n) for n in numels],
    }


def _clone(group):
    return {k: [t.clone() for t in v] for k, v in group.items()}


def _poison(tensors):
    for t in tensors:
        t.fill_(float("nan"))


def _assert_lists_close(got, want, rtol, atol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def _numels(count, size):
    if count == 1:
        return [size]
    if count == 3:
        return [size, 1, size // 3 + 5]
    return [1 + (97 * i) % 301 for i in range(count)]  # 500 small tensors of odd sizes


CASES = [(dtype, count, size) for dtype in DTYPES for size in SIZES for count in (1, 3)] + [
    (dtype, 500, None) for dtype in DTYPES
]


def _case_id(case):
    dtype, count, size = case
    return f"{str(dtype).split('.')[-1]}-{count}x{size or 'mixed'}"


# ---- noise ------------------------------------------------------------------------------------


@needs_ext
def test_philox_words_match_triton_vectors():
    cases = json.loads((DATA / "philox_randn.json").read_text())["cases"]
    for case in cases:
        words = _cext.philox_words(case["seed"], torch.tensor(case["offsets"]))
        assert words.tolist() == case["philox_uint32x4"], f"seed {case['seed']}"


@needs_ext
def test_randn_matches_triton_vectors():
    for case in json.loads((DATA / "philox_randn.json").read_text())["cases"]:
        z = torch.stack([_cext.randn_range(case["seed"], offset, 1)[0] for offset in case["offsets"]])
        want = torch.tensor(case["randn"], dtype=torch.float32)
        torch.testing.assert_close(z, want, rtol=3 * EPS32, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 5, 2**63 - 1])
@pytest.mark.parametrize("start", [0, 2**32 - 700, 10**12 + 3])
def test_randn_range_matches_reference(seed, start):
    # 2**32 - 700 crosses the carry into the counter's high word inside the range
    for numel in (1, 7, 1025, 4099):
        z = _cext.randn_range(seed, start, numel)
        want = _philox.randn_range(seed, start, numel)
        # same Philox words bit for bit; log and cos agree to about an ulp each
        torch.testing.assert_close(z, want, rtol=3 * EPS32, atol=1e-12)


@needs_ext
def test_randn_is_standard_normal():
    z = _cext.randn_range(7, 0, 1 << 20).double()
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 5e-3


# ---- phases against the eager tier ----------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bsam_phases_match_eager(case):
    dtype, count, size = case
    numels = _numels(count, size)
    base = _group(dtype, numels, seed=count * 7919 + (size or 0))
    rtol, atol = _tol(dtype)
    offsets = [sum(numels[:i]) + 5 for i in range(len(numels))]

    # sample: the noise agrees to 3 float32 ulps, scaled by sigma <= 1.5
    want, got = _clone(base), _clone(base)
    _eager.bsam_sample(want["params"], want["means"], want["precisions"], offsets, num_data=1.0, seed=99)
    _poison(got["params"])
    _cext.bsam_sample(got["params"], got["means"], got["precisions"], offsets, num_data=1.0, seed=99)
    _assert_lists_close(got["params"], want["params"], rtol, max(atol, 8e-6), "sample params")

    for accumulate in (False, True):
        want, got = _clone(base), _clone(base)
        _eager.bsam_perturb(
            want["params"],
            want["grads"],
            want["means"],
            want["precisions"],
            want["stats"],
            rho=0.05,
            accumulate=accumulate,
        )
        _poison(got["params"])
        if not accumulate:
            _poison(got["stats"])
        _cext.bsam_perturb(
            got["params"], got["grads"], got["means"], got["precisions"], got["stats"], rho=0.05, accumulate=accumulate
        )
        _assert_lists_close(got["params"], want["params"], rtol, atol, "perturb params")
        srtol, satol = _tol(_state_dtype(dtype))
        _assert_lists_close(got["stats"], want["stats"], srtol, satol, "perturb stats")

    want, got = _clone(base), _clone(base)
    hyper = {"lr": 0.3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01, "damping": 0.1, "splits": 3}
    args = ("params", "grads", "means", "precisions", "momentums", "stats")
    _eager.bsam_update(*(want[k] for k in args), **hyper)
    _poison(got["params"])
    _cext.bsam_update(*(got[k] for k in args), **hyper)
    _assert_lists_close(got["params"], want["params"], rtol, atol, "update params")
    srtol, satol = _tol(_state_dtype(dtype))
    for key in ("means", "precisions", "momentums"):
        _assert_lists_close(got[key], want[key], srtol, satol, f"update {key}")


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sam_phases_match_eager(case):
    dtype, count, size = case
    numels = _numels(count, size)
    base = _group(dtype, numels, seed=count * 104729 + (size or 0))
    rtol, atol = _tol(dtype)
    srtol, satol = _tol(_state_dtype(dtype))
    sd = _state_dtype(dtype)

    want, got = _clone(base), _clone(base)
    _eager.restore(want["params"], want["means"])
    _poison(got["params"])
    _cext.restore(got["params"], got["means"])
    _assert_lists_close(got["params"], want["params"], 0, 0, "restore params")

    for adaptive in (False, True):
        want_sq = _eager.sam_sq_norm(base["grads"], base["means"], adaptive=adaptive)
        got_sq = _cext.sam_sq_norm(base["grads"], base["means"], adaptive=adaptive)
        assert got_sq.dtype == sd and got_sq.dim() == 0
        torch.testing.assert_close(got_sq, want_sq, rtol=1e-12 if sd == torch.float64 else 1e-5, atol=0)

        scale = torch.tensor(0.37, dtype=sd)
        want, got = _clone(base), _clone(base)
        _eager.sam_perturb(want["params"], want["grads"], want["means"], scale=scale, adaptive=adaptive)
        _poison(got["params"])
        _cext.sam_perturb(got["params"], got["grads"], got["means"], scale=scale, adaptive=adaptive)
        _assert_lists_close(got["params"], want["params"], rtol, atol, f"sam_perturb params adaptive={adaptive}")

    for nesterov in (False, True):
        want, got = _clone(base), _clone(base)
        hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": nesterov, "splits": 2}
        _eager.sam_update_sgd(want["params"], want["grads"], want["means"], want["momentums"], **hyper)
        _poison(got["params"])
        _cext.sam_update_sgd(got["params"], got["grads"], got["means"], got["momentums"], **hyper)
        _assert_lists_close(got["params"], want["params"], rtol, atol, "sgd params")
        _assert_lists_close(got["means"], want["means"], srtol, satol, "sgd weights")
        _assert_lists_close(got["momentums"], want["momentums"], srtol, satol, "sgd momentums")

    want, got = _clone(base), _clone(base)
    hyper = {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05, "step": 3, "splits": 2}
    args = ("params", "grads", "means", "momentums", "variances")
    _eager.sam_update_adamw(*(want[k] for k in args), **hyper)
    _poison(got["params"])
    _cext.sam_update_adamw(*(got[k] for k in args), **hyper)
    _assert_lists_close(got["params"], want["params"], rtol, atol, "adamw params")
    for key in ("means", "momentums", "variances"):
        _assert_lists_close(got[key], want[key], srtol, 2e-6 if sd == torch.float32 else 1e-13, f"adamw {key}")


@needs_ext
def test_sample_uses_the_compiled_noise_exactly():
    # with z taken from the extension, θ = m + z/sqrt(N·s) agrees to float32 rounding
    g = _group(torch.float32, [1025, 7])
    offsets = [0, 1025]
    params = [torch.full_like(p, float("nan")) for p in g["params"]]
    _cext.bsam_sample(params, g["means"], g["precisions"], offsets, num_data=3.0, seed=5)
    z = _cext.randn_range(5, 0, 1032)
    want = torch.cat(g["means"]) + z / torch.sqrt(3.0 * torch.cat(g["precisions"]))
    torch.testing.assert_close(torch.cat(params), want, rtol=2 * EPS32, atol=2 * EPS32)


@needs_ext
def test_non_contiguous_tensors_fall_back_to_eager():
    weight = torch.randn(5, 3).t()  # a transposed view: not contiguous
    params, means = [weight], [torch.randn(3, 5)]
    _cext.restore(params, means)
    torch.testing.assert_close(weight, means[0])


@needs_ext
def test_mismatched_lists_raise():
    with pytest.raises(RuntimeError, match="numel|elements"):
        _cext.restore([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(RuntimeError, match="dtype"):
        _cext.restore([torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)])


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
        # the noise is float32 in every tier and agrees to 3 float32 ulps, so float64 runs part there
        rtol, atol = 1e-6, 1e-8
    for p_cpu, p_eager in zip(model_cpu.parameters(), model_eager.parameters()):
        for key in opt_eager.state[p_eager]:
            torch.testing.assert_close(opt_cpu.state[p_cpu][key], opt_eager.state[p_eager][key], rtol=rtol, atol=atol)
        torch.testing.assert_close(p_cpu, p_eager, rtol=rtol, atol=atol)


@needs_ext
@pytest.mark.parametrize("name", ["bsam_basic.json", "sam_basic.json"])
def test_golden_trajectory(name):
    golden = load_golden(name)
    hyper = golden["hyper"]
    model = GoldenMLP(golden["init"])
    x = torch.tensor(golden["data"]["x"], dtype=torch.float64)
    y = torch.tensor(golden["data"]["y"])
    bsam = golden["optimizer"] == "bsam"
    if bsam:
        opt = sambayes.BSAM(
            model.parameters(),
            num_data=1e30,
            lr=hyper["lr"],
            betas=(hyper["beta1"], hyper["beta2"]),
            rho=hyper["rho"],
            weight_decay=hyper["weight_decay"],
            damping=hyper["damping"],
            init_precision=hyper["init_precision"],
            backend="cpu",
        )
    else:
        opt = sambayes.SAM(
            model.parameters(),
            lr=hyper["lr"],
            momentum=hyper["momentum"],
            rho=hyper["rho"],
            weight_decay=hyper["weight_decay"],
            backend="cpu",
        )
    splits = hyper.get("msharpness", 1)
    worst = 0.0
    for batch, factor, ref in zip(golden["batches"], golden["lr_factor"], golden["trajectory"]):
        for group in opt.param_groups:
            group["lr"] = hyper["lr"] * factor
        chunks = sambayes.split_batch(x[batch], y[batch], splits=splits)

        def closure(j=0, chunks=chunks):
            xb, yb = chunks[j]
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure, splits=splits)
        for key in ("mean", "momentum") + (("precision",) if bsam else ()):
            state_key = key if bsam or key != "mean" else "weight"
            for pname, p in model.named_parameters():
                want = torch.tensor(ref[key][pname], dtype=torch.float64)
                worst = max(worst, (opt.state[p][state_key] - want).abs().max().item())
    assert worst < 1e-12


# ---- torch.library ----------------------------------------------------------------------------


@needs_ext
def test_ops_trace_under_torch_compile():
    params = [torch.randn(10), torch.randn(3)]
    grads = [torch.randn(10), torch.randn(3)]
    weights = [torch.randn(10), torch.randn(3)]

    def step(params, grads, weights):
        sq = torch.ops.sambayes_C.sam_sq_norm(grads, weights, False)
        torch.ops.sambayes_C.sam_perturb(params, grads, weights, 0.05 / sq.sqrt(), False)
        return sq

    want_params = [p.clone() for p in params]
    want = step(want_params, grads, weights)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(params, grads, weights)
    torch.testing.assert_close(got, want)
    _assert_lists_close(params, want_params, 0, 0, "compiled sam_perturb")
