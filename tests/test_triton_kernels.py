"""The triton tier, phase by phase, against the eager tier (the spec) on fresh random inputs.

Runs natively on a GPU and on the CPU under the Triton interpreter (set below,
before Triton is imported). Outputs are poisoned with NaN before the kernels run
and written into guarded buffers, so a skipped element or a write past the end fails.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import pathlib

import pytest

pytest.importorskip("triton")

from sambayes.kernels import _multi_tensor
from sambayes.kernels import bsam_sample as sample_kernels

from sambayes import _eager, _philox
from sambayes import _triton as tier

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# odd sizes around the block size (1024 on GPUs, larger under the interpreter)
ODD_SIZES = sorted({1, 7, 1023, 1025, _multi_tensor.BLOCK - 1, _multi_tensor.BLOCK + 1, 65537})
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (atol, rtol): one unit in the last place of the dtype; the math is float32/64, and a 1-ulp
# difference there (z, FMA contraction on GPUs) can flip one rounding to bf16/fp16
TOLERANCE = {
    torch.float64: (1e-13, 1e-13),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-3, 2**-7),
    torch.float16: (1e-4, 2**-10),
}
GUARD = 5  # sentinel elements around every tensor
SENTINEL = 12345.0


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close(actual, expected, dtype, name):
    """assert_close with the dtype's (atol, rtol), naming the tensor and its first mismatches."""
    atol, rtol = TOLERANCE[dtype]
    a, e = actual.double().flatten(), expected.double().flatten()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        pairs = ", ".join(f"[{i}] {a[i].item():.9g} vs {e[i].item():.9g}" for i in idx)
        pytest.fail(f"{name}: {int(bad.sum())} of {a.numel()} elements differ ({dtype}); first: {pairs}")


class Guarded:
    """Tensors carved out of one buffer with SENTINEL gaps, to catch writes past a tensor's end."""

    def __init__(self, sizes, dtype, fill=float("nan")):
        total = sum(sizes) + GUARD * (len(sizes) + 1)
        self.buffer = torch.full((total,), SENTINEL, dtype=dtype, device=DEVICE)
        self.tensors, start = [], GUARD
        for n in sizes:
            self.tensors.append(self.buffer[start : start + n].fill_(fill))
            start += n + GUARD
        self.mask = torch.ones(total, dtype=torch.bool, device=DEVICE)
        for t in self.tensors:
            offset = t.storage_offset()
            self.mask[offset : offset + t.numel()] = False

    def check_guards(self, name):
        assert (self.buffer[self.mask] == SENTINEL).all(), f"{name}: a kernel wrote outside its tensor"


def random_state(sizes, dtype, positive=False):
    sd = state_dtype(dtype)
    if positive:  # precisions: s0 = 1 plus accumulated statistics
        return [torch.rand(n, dtype=sd, device=DEVICE) * 3 + 0.1 for n in sizes]
    return [torch.randn(n, dtype=sd, device=DEVICE) for n in sizes]


def random_grads(sizes, dtype):
    return [torch.randn(n, dtype=dtype, device=DEVICE) for n in sizes]


def clones(tensors):
    return [t.clone() for t in tensors]


def nan_like(tensors):
    return [torch.full_like(t, float("nan")) for t in tensors]


CASES = [(dtype, sizes) for dtype in PARAM_DTYPES for sizes in ([n] for n in ODD_SIZES)]
CASES += [(dtype, [7, 1025, 1]) for dtype in PARAM_DTYPES]
CASE_IDS = [f"{str(d).split('.')[-1]}-{'x'.join(map(str, s))}" for d, s in CASES]


@pytest.mark.parametrize("dtype,sizes", CASES, ids=CASE_IDS)
def test_bsam_phases_match_eager(dtype, sizes):
    sd = state_dtype(dtype)
    means, precisions = random_state(sizes, dtype), random_state(sizes, dtype, positive=True)
    offsets = [sum(sizes[:i]) + 3 for i in range(len(sizes))]
    seed = 2**40 + 17

    # noisy sample (the Philox reference is slow on the CPU: the large case in float32 only)
    if dtype == torch.float32 or sum(sizes) < 20_000:
        params = Guarded(sizes, dtype)
        expected = nan_like(params.tensors)
        tier.bsam_sample(params.tensors, means, precisions, offsets, num_data=7.0, seed=seed)
        _eager.bsam_sample(expected, means, precisions, offsets, num_data=7.0, seed=seed)
        params.check_guards("bsam_sample")
        for i, (a, e) in enumerate(zip(params.tensors, expected)):
            # z is float32 on every tier and agrees to ~1 ulp: float32 tolerance for float64 samples too
            assert_close(a, e, torch.float32 if dtype == torch.float64 else dtype, f"sample[{i}]")

    # ascent, two sub-batches: overwrite then accumulate the statistic
    stats = Guarded(sizes, sd)
    expected_stats = nan_like(stats.tensors)
    for accumulate in (False, True):
        grads = random_grads(sizes, dtype)
        params = Guarded(sizes, dtype)
        expected = nan_like(params.tensors)
        tier.bsam_perturb(params.tensors, grads, means, precisions, stats.tensors, rho=0.05, accumulate=accumulate)
        _eager.bsam_perturb(expected, grads, means, precisions, expected_stats, rho=0.05, accumulate=accumulate)
        params.check_guards("bsam_perturb params")
        stats.check_guards("bsam_perturb stats")
        for i in range(len(sizes)):
            assert_close(params.tensors[i], expected[i], dtype, f"perturb param[{i}] accumulate={accumulate}")
            assert_close(stats.tensors[i], expected_stats[i], sd, f"perturb stat[{i}] accumulate={accumulate}")

    # update, with the two sub-batches folded in
    grads = random_grads(sizes, dtype)
    momentums = random_state(sizes, dtype)
    state = [clones(means), clones(precisions), clones(momentums)]
    expected_state = [clones(means), clones(precisions), clones(momentums)]
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    hyper = {"lr": 0.3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-3, "damping": 0.1, "splits": 2}
    tier.bsam_update(params.tensors, grads, *state, stats.tensors, **hyper)
    _eager.bsam_update(expected, grads, *expected_state, expected_stats, **hyper)
    params.check_guards("bsam_update")
    for name, got, want in zip(("mean", "precision", "momentum"), state, expected_state):
        for i in range(len(sizes)):
            assert_close(got[i], want[i], sd, f"update {name}[{i}]")
    for i in range(len(sizes)):
        # the parameter is exactly the new mean, rounded
        assert torch.equal(params.tensors[i], state[0][i].to(dtype)), f"update param[{i}] != mean"

    # restore
    params = Guarded(sizes, dtype)
    tier.restore(params.tensors, means)
    params.check_guards("restore")
    for i in range(len(sizes)):
        assert torch.equal(params.tensors[i], means[i].to(dtype)), f"restore param[{i}]"


@pytest.mark.parametrize("dtype,sizes", CASES, ids=CASE_IDS)
def test_sam_phases_match_eager(dtype, sizes):
    sd = state_dtype(dtype)
    weights = random_state(sizes, dtype)
    for adaptive in (False, True):
        grads = random_grads(sizes, dtype)
        got = tier.sam_sq_norm(grads, weights, adaptive=adaptive)
        want = _eager.sam_sq_norm(grads, weights, adaptive=adaptive)
        assert got.dim() == 0 and got.dtype == sd and got.device == want.device
        # summation order differs (blocks vs torch's cascade): relative 1e-5 in float32
        torch.testing.assert_close(got, want, rtol=1e-5 if sd == torch.float32 else 1e-12, atol=0)

        scale = (0.05 / want.sqrt()).to(sd)
        params = Guarded(sizes, dtype)
        expected = nan_like(params.tensors)
        tier.sam_perturb(params.tensors, grads, weights, scale=scale, adaptive=adaptive)
        _eager.sam_perturb(expected, grads, weights, scale=scale, adaptive=adaptive)
        params.check_guards("sam_perturb")
        for i in range(len(sizes)):
            assert_close(params.tensors[i], expected[i], dtype, f"sam_perturb[{i}] adaptive={adaptive}")

    for nesterov in (False, True):
        grads = random_grads(sizes, dtype)
        buffers = random_state(sizes, dtype)
        state, expected_state = [clones(weights), clones(buffers)], [clones(weights), clones(buffers)]
        params = Guarded(sizes, dtype)
        expected = nan_like(params.tensors)
        hyper = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": nesterov, "splits": 3}
        tier.sam_update_sgd(params.tensors, grads, *state, **hyper)
        _eager.sam_update_sgd(expected, grads, *expected_state, **hyper)
        params.check_guards("sam_update_sgd")
        for name, got, want in zip(("weight", "momentum"), state, expected_state):
            for i in range(len(sizes)):
                assert_close(got[i], want[i], sd, f"sgd {name}[{i}] nesterov={nesterov}")
        for i in range(len(sizes)):
            assert torch.equal(params.tensors[i], state[0][i].to(dtype)), f"sgd param[{i}] != weight"

    grads = random_grads(sizes, dtype)
    moments = [random_state(sizes, dtype), [v.abs() for v in random_state(sizes, dtype)]]
    state = [clones(weights)] + [clones(m) for m in moments]
    expected_state = [clones(weights)] + [clones(m) for m in moments]
    params = Guarded(sizes, dtype)
    expected = nan_like(params.tensors)
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "step": 3, "splits": 2}
    tier.sam_update_adamw(params.tensors, grads, *state, **hyper)
    _eager.sam_update_adamw(expected, grads, *expected_state, **hyper)
    params.check_guards("sam_update_adamw")
    for name, got, want in zip(("weight", "momentum", "variance"), state, expected_state):
        for i in range(len(sizes)):
            assert_close(got[i], want[i], sd, f"adamw {name}[{i}]")


def test_noise_equals_reference_vectors():
    """z from the sampling kernel equals Triton's own tl.randn test vectors and the Philox reference."""
    data = json.loads((pathlib.Path(__file__).parent / "data" / "philox_randn.json").read_text())
    for case in data["cases"]:
        offsets = case["offsets"]
        params = [torch.full((1,), float("nan"), device=DEVICE) for _ in offsets]
        # m = 0 and N·s = 1 make θ = z
        means = [torch.zeros(1, device=DEVICE) for _ in offsets]
        precisions = [torch.ones(1, device=DEVICE) for _ in offsets]
        tier.bsam_sample(params, means, precisions, offsets, num_data=1.0, seed=case["seed"])
        got = torch.cat(params).cpu().double()
        torch.testing.assert_close(got, torch.tensor(case["randn"], dtype=torch.float64), rtol=1e-6, atol=1e-6)
        reference = _philox.randn(case["seed"], torch.tensor(offsets)).double()
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)


def test_noise_of_a_group_is_its_flat_concatenation():
    """Tensor i's noise continues at its offset: splitting a group into tensors does not change z."""
    sizes = [1025, 3, 2048]
    seed = 123456789
    params = [torch.full((n,), float("nan"), device=DEVICE) for n in sizes]
    offsets = [0, 1025, 1028]
    means = [torch.zeros(n, device=DEVICE) for n in sizes]
    precisions = [torch.ones(n, device=DEVICE) for n in sizes]
    tier.bsam_sample(params, means, precisions, offsets, num_data=1.0, seed=seed)
    reference = _philox.randn_range(seed, 0, sum(sizes), device=DEVICE)
    torch.testing.assert_close(torch.cat(params), reference, rtol=1e-6, atol=1e-6)


def test_many_tensors_one_launch(monkeypatch):
    """500 tensors of mixed odd sizes: one launch for the whole group, every tensor right."""
    sizes = [1 + (37 * i) % 29 for i in range(500)]
    launches = []
    kernel = sample_kernels._bsam_sample_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(sample_kernels, "_bsam_sample_kernel", Counting())
    # m = 0 and N·s = 1 make θ = z: the group's noise, tensor after tensor
    means = [torch.zeros(n, device=DEVICE) for n in sizes]
    precisions = [torch.full((n,), 0.25, device=DEVICE) for n in sizes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    params = Guarded(sizes, torch.float32)
    tier.bsam_sample(params.tensors, means, precisions, offsets, num_data=4.0, seed=5)
    assert launches == [(len(sizes),)]
    params.check_guards("bsam_sample, 500 tensors")
    reference = _philox.randn_range(5, 0, sum(sizes), device=DEVICE)
    torch.testing.assert_close(torch.cat(params.tensors), reference, rtol=1e-6, atol=1e-6)

    # an update on the same 500 tensors
    means, precisions = random_state(sizes, torch.float32), random_state(sizes, torch.float32, positive=True)
    grads, momentums, stats = (random_state(sizes, torch.float32) for _ in range(3))
    state = [clones(means), clones(precisions), clones(momentums)]
    expected_state = [clones(means), clones(precisions), clones(momentums)]
    params = Guarded(sizes, torch.float32)
    expected = nan_like(params.tensors)
    hyper = {"lr": 0.3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-3, "damping": 0.1, "splits": 1}
    tier.bsam_update(params.tensors, grads, *state, stats, **hyper)
    _eager.bsam_update(expected, grads, *expected_state, stats, **hyper)
    params.check_guards("bsam_update, 500 tensors")
    torch.testing.assert_close(torch.cat(params.tensors), torch.cat(expected), rtol=1e-6, atol=1e-6)
    for got, want in zip(state, expected_state):
        torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=1e-6, atol=1e-6)


def test_table_follows_reallocated_tensors():
    """A cached tensor table is keyed by the addresses: new tensors get a new, correct table."""
    sizes = [10, 3000]
    means = random_state(sizes, torch.float32)
    first = nan_like(means)
    tier.restore(first, means)
    second = nan_like(means)  # new allocations, same shapes
    tier.restore(second, means)
    for a, b, m in zip(first, second, means):
        assert torch.equal(a, m) and torch.equal(b, m)
    # same addresses, new contents: the cached table is reused and still right
    for m in means:
        m.normal_()
    tier.restore(second, means)
    for b, m in zip(second, means):
        assert torch.equal(b, m)


def test_a_cached_table_does_not_skip_the_size_check():
    """Same addresses, a shorter view in one role: refused, as on a cold cache (not read out of bounds)."""
    param, weight = torch.zeros(10, device=DEVICE), torch.arange(10.0, device=DEVICE)
    tier.restore([param], [weight])
    with pytest.raises((ValueError, RuntimeError)):
        tier.restore([param], [weight[:4]])


def test_non_contiguous_tensors_take_the_eager_path():
    """A parameter that is a transposed view still gets the right values (eager path for it only)."""
    base = torch.randn(33, 17, device=DEVICE)
    params = [torch.full((17, 33), float("nan"), device=DEVICE).T, torch.full((5,), float("nan"), device=DEVICE)]
    means = [base, torch.randn(5, device=DEVICE)]
    tier.restore(params, means)
    assert torch.equal(params[0], base) and torch.equal(params[1], means[1])


def test_split_float_keeps_float64_precision():
    for x in (0.1, 1e-3 / 3, 0.999, 1e30, 0.0, -2.5e-7):
        hi, lo = _multi_tensor.split_float(x)
        assert hi == float(torch.tensor(x, dtype=torch.float32))
        assert abs((hi + lo) - x) <= 1e-14 * abs(x)


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
    params = [torch.full(values.shape, float("nan"), dtype=torch.bfloat16, device=DEVICE)]
    tier.restore(params, [values])
    expected = values.to(torch.bfloat16)
    assert torch.equal(params[0].isnan(), expected.isnan())
    finite = ~expected.isnan()  # NaN payloads differ between PyTorch's own CPU and GPU paths
    assert torch.equal(params[0][finite].view(torch.int16), expected[finite].view(torch.int16))
