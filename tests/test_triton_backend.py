"""The triton backend: its noise, tables and launches, rounding, and whole BSAM and SAM
trajectories against the eager backend and the golden files. The phases themselves are
checked against the spec in tests/test_<phase>.py, its checkpoints in tests/test_checkpoints.py
(which uses the helpers here).

Runs natively on a GPU and on the CPU under the Triton interpreter (set below,
before Triton is imported).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import pathlib
import subprocess
import sys

import pytest
from golden import golden_errors
from harness import Guarded, nan_like, normal, positive

pytest.importorskip("triton")

from sambayes.kernels import bsam_sample as sample_kernels

import sambayes
from sambayes import _philox
from sambayes.backends import triton as triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5))
    return model.to(device=DEVICE, dtype=dtype)


def make_data(steps, batch=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, batch, 13, generator=generator)
    ys = torch.randint(0, 5, (steps, batch), generator=generator)
    return xs.to(DEVICE), ys.to(DEVICE)


def train(model, opt, xs, ys, splits=1):
    dtype = next(model.parameters()).dtype
    for x, y in zip(xs, ys):
        x = x.to(dtype)
        chunks = sambayes.split_batch(x, y, splits=splits)

        def closure(j=0, chunks=chunks):
            xb, yb = chunks[j]
            loss = torch.nn.functional.cross_entropy(model(xb).float(), yb)
            loss.backward()
            return loss

        opt.step(closure, splits=splits) if splits > 1 else opt.step(closure)


def relative_error(got, want):
    """Largest over tensors of ‖got − want‖ / ‖want‖, in float64."""
    return max(
        ((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item() for g, w in zip(got, want)
    )


def state_of(opt, model, keys):
    return [opt.state[p][k] for k in keys for p in model.parameters()]


def bsam(model, backend, **kw):
    return sambayes.BSAM(
        model.parameters(), num_data=500, lr=0.1, rho=0.05, weight_decay=1e-3, seed=7, backend=backend, **kw
    )


@pytest.mark.slow
@pytest.mark.parametrize("splits", [1, 2])
def test_bsam_float32_trajectory_matches_eager(splits):
    xs, ys = make_data(20 if splits == 1 else 10)
    runs = {}
    for backend in ("eager", "triton"):
        model = make_model(torch.float32)
        opt = bsam(model, backend)
        train(model, opt, xs, ys, splits=splits)
        runs[backend] = (list(model.parameters()), state_of(opt, model, ("mean", "precision", "momentum")))
    assert relative_error(runs["triton"][1], runs["eager"][1]) <= 1e-6
    assert relative_error(runs["triton"][0], runs["eager"][0]) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [{}, {"nesterov": True}, {"adaptive": True}, {"base": "adamw", "lr": 1e-2, "weight_decay": 0.01}],
    ids=["sgd", "nesterov", "adaptive", "adamw"],
)
def test_sam_float32_trajectory_matches_eager(options):
    xs, ys = make_data(20 if not options else 10)
    runs = {}
    for backend in ("eager", "triton"):
        model = make_model(torch.float32)
        hyper = {"lr": 0.05, "rho": 0.05, "weight_decay": 1e-3}
        hyper.update(options)
        opt = sambayes.SAM(model.parameters(), backend=backend, **hyper)
        train(model, opt, xs, ys, splits=2)
        runs[backend] = state_of(opt, model, ("weight", "momentum"))
    assert relative_error(runs["triton"], runs["eager"]) <= 1e-6


@pytest.mark.slow
def test_bsam_bfloat16_within_twice_eager_error():
    """bf16 parameters, float32 state: the triton backend is as accurate as the eager backend against float64."""
    xs, ys = make_data(20)
    reference = make_model(torch.float64)
    train(reference, bsam(reference, "eager"), xs, ys)
    errors = {}
    for backend in ("eager", "triton"):
        model = make_model(torch.bfloat16)
        for p, r in zip(model.parameters(), make_model(torch.float64).parameters()):
            p.data.copy_(r)  # the same start as the float64 run, rounded to bf16
        opt = bsam(model, backend)
        train(model, opt, xs, ys)
        errors[backend] = relative_error(state_of(opt, model, ("mean",)), list(reference.parameters()))
    assert 0 < errors["eager"] < 0.1
    assert errors["triton"] <= 2 * errors["eager"], errors


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bsam_basic.json", "sam_basic.json"])
def test_golden_float32(name):
    """float32 through the triton backend: as close to the authors' trajectory as the eager backend in float32."""
    eager = max(golden_errors(name, "eager", torch.float32, DEVICE).values())
    triton = max(golden_errors(name, "triton", torch.float32, DEVICE).values())
    assert triton <= max(2 * eager, 1e-6), (triton, eager)


@pytest.mark.slow
def test_without_triton_the_package_imports_and_says_how_to_get_it():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail, as when it is not installed
        "import torch, sambayes\n"
        "model = torch.nn.Linear(3, 2)\n"
        "opt = sambayes.BSAM(model.parameters(), num_data=10, backend='triton')\n"
        "try:\n"
        "    opt.step(lambda: model(torch.ones(1, 3)).sum().backward())\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert "pip install 'sambayes[triton]'" in out.stdout, out.stdout + out.stderr


# ---- noise, tables, launches, rounding ----------------------------------------------------


def test_noise_equals_reference_vectors():
    """z from the sampling kernel equals Triton's own tl.randn4x test vectors (element i: lane i mod 4
    of call i div 4) and the Philox reference, for tensors starting at any element index."""
    data = json.loads((pathlib.Path(__file__).parent / "data" / "philox_randn4x.json").read_text())
    for case in data["cases"]:
        seed = int(case["seed"])
        offsets = [int(i) for i, _ in case["elements"]]
        params = [torch.full((1,), float("nan"), device=DEVICE) for _ in offsets]
        # m = 0 and N·s = 1 make θ = z
        means = [torch.zeros(1, device=DEVICE) for _ in offsets]
        precisions = [torch.ones(1, device=DEVICE) for _ in offsets]
        triton_backend.bsam_sample(params, means, precisions, offsets, num_data=1.0, seed=seed)
        got = torch.cat(params).cpu().double()
        want = torch.tensor([z for _, z in case["elements"]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        reference = torch.cat([_philox.randn_range(seed, i, 1) for i in offsets]).double()
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)


def test_noise_of_a_group_is_its_flat_concatenation():
    """Tensor i's noise continues at its offset: splitting a group into tensors does not change z."""
    sizes = [1025, 3, 2048]
    seed = 123456789
    params = [torch.full((n,), float("nan"), device=DEVICE) for n in sizes]
    offsets = [0, 1025, 1028]
    means = [torch.zeros(n, device=DEVICE) for n in sizes]
    precisions = [torch.ones(n, device=DEVICE) for n in sizes]
    triton_backend.bsam_sample(params, means, precisions, offsets, num_data=1.0, seed=seed)
    reference = _philox.randn_range(seed, 0, sum(sizes), device=DEVICE)
    torch.testing.assert_close(torch.cat(params), reference, rtol=1e-6, atol=1e-6)


def _count_launches(monkeypatch, module, name):
    launches = []
    kernel = getattr(module, name)

    class Counting:
        __name__ = name  # the launch picks a kernel's warps by its name (_multi_tensor.WARPS)

        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, name, Counting())
    return launches


def test_many_tensors_one_launch(monkeypatch):
    """500 separately allocated tensors whose noise starts on multiples of 4: one launch, every tensor right."""
    sizes = [4 * (1 + (37 * i) % 29) for i in range(500)]
    launches = _count_launches(monkeypatch, sample_kernels, "_bsam_sample_kernel")
    # m = 0 and N·s = 1 make θ = z: the group's noise, tensor after tensor
    means = [torch.zeros(n, device=DEVICE) for n in sizes]
    precisions = [torch.full((n,), 0.25, device=DEVICE) for n in sizes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    params = [torch.full((n,), float("nan"), device=DEVICE) for n in sizes]
    triton_backend.bsam_sample(params, means, precisions, offsets, num_data=4.0, seed=5)
    assert launches == [(len(sizes),)]
    reference = _philox.randn_range(5, 0, sum(sizes), device=DEVICE)
    torch.testing.assert_close(torch.cat(params), reference, rtol=1e-6, atol=1e-6)


def test_alignment_is_decided_per_tensor(monkeypatch):
    """Odd sizes in one buffer: the aligned tensors get one launch with 128-bit accesses, the others a
    second one; an unaligned tensor no longer turns off vector accesses for the whole bucket."""
    from sambayes.kernels import _multi_tensor

    sizes = [1 + (37 * i) % 29 for i in range(500)]
    params = Guarded(sizes, torch.float32)
    means = normal(sizes, torch.float32)
    table = _multi_tensor.tensor_table([params.tensors, means], "PS")
    assert sorted(part.aligned for part in table.parts) == [False, True]
    aligned = [t for t in params.tensors if t.data_ptr() % 16 == 0]
    assert sum(p.num_blocks for p in table.parts if p.aligned) == sum(
        -(-t.numel() // _multi_tensor.BLOCK) for t in aligned
    )
    launches = _count_launches(monkeypatch, sample_kernels, "_bsam_sample_kernel")
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    triton_backend.bsam_sample(params.tensors, means, positive(sizes, torch.float32), offsets, num_data=4.0, seed=5)
    assert len(launches) == 2
    params.check("bsam_sample, 500 tensors")


def test_table_follows_reallocated_tensors():
    """A cached tensor table is keyed by the addresses: new tensors get a new, correct table."""
    sizes = [10, 3000]
    means = normal(sizes, torch.float32)
    first = nan_like(means)
    triton_backend.restore(first, means)
    second = nan_like(means)  # new allocations, same shapes
    triton_backend.restore(second, means)
    for a, b, m in zip(first, second, means):
        assert torch.equal(a, m) and torch.equal(b, m)
    # same addresses, new contents: the cached table is reused and still right
    for m in means:
        m.normal_()
    triton_backend.restore(second, means)
    for b, m in zip(second, means):
        assert torch.equal(b, m)


def test_a_cached_table_does_not_skip_the_size_check():
    """Same addresses, a shorter view in one role: refused, as on a cold cache (not read out of bounds)."""
    param, weight = torch.zeros(10, device=DEVICE), torch.arange(10.0, device=DEVICE)
    triton_backend.restore([param], [weight])
    with pytest.raises((ValueError, RuntimeError)):
        triton_backend.restore([param], [weight[:4]])


def test_a_list_of_the_wrong_dtype_is_refused():
    """State of another dtype than the parameters' state dtype (float32 sums beside float64 state, as
    a model cast between steps once left them): refused when the table is built, not read with the
    wrong element size."""
    params = [torch.zeros(10, dtype=torch.float64, device=DEVICE)]
    with pytest.raises(TypeError, match="expected torch.float64"):
        triton_backend.restore(params, [torch.zeros(10, dtype=torch.float32, device=DEVICE)])


def test_float64_hyperparameters_reach_the_kernels_exactly():
    """float64 state gets its hyperparameters in float64 (no float32 rounding on the way)."""
    lr = 1e-3 / 3
    for dtype in (torch.float64, torch.float32):
        weights = [torch.ones(5, dtype=dtype, device=DEVICE)]
        momentums = [torch.zeros(5, dtype=dtype, device=DEVICE)]
        params = [torch.zeros(5, dtype=dtype, device=DEVICE)]
        grad_sums = [torch.ones(5, dtype=dtype, device=DEVICE)]
        found_inf, inv_scale = torch.zeros((), device=DEVICE), torch.ones((), device=DEVICE)
        hyper = {"lr": lr, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False, "splits": 1}
        triton_backend.sam_update_sgd(params, grad_sums, weights, momentums, found_inf, inv_scale, **hyper)
        # w = 1 - lr·1: exact in float64; in float32 the rounding of lr that PyTorch applies
        want = 1 - torch.tensor(lr, dtype=dtype) if dtype == torch.float32 else torch.tensor(1 - lr, dtype=dtype)
        assert torch.equal(weights[0], want.to(DEVICE).expand(5)), (dtype, weights[0][0].item(), want.item())


def test_bfloat16_rounding_matches_torch():
    """float32 -> bfloat16 in the kernels rounds to nearest even like PyTorch: ties, overflow, NaN, subnormals."""
    values = torch.tensor(
        [
            1.0 + 2**-8,
            1.0 + 3 * 2**-8,
            -(1.0 + 2**-8),
            1.0 + 2**-8 + 2**-20,
            3.4e38,
            -3.4e38,
            float("inf"),
            float("nan"),
            1e-40,
            -1e-41,
            0.0,
            -0.0,
            65504.0,
            1.0 - 2**-25,
        ],
        device=DEVICE,
    )
    params = [torch.full(values.shape, 7.0, dtype=torch.bfloat16, device=DEVICE)]  # poison: not NaN (an input)
    triton_backend.restore(params, [values])
    expected = values.to(torch.bfloat16)
    assert torch.equal(params[0].isnan(), expected.isnan())
    finite = ~expected.isnan()  # NaN payloads differ between PyTorch's own CPU and GPU paths
    assert torch.equal(params[0][finite].view(torch.int16), expected[finite].view(torch.int16))
