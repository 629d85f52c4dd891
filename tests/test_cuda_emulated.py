"""The CUDA kernels on the emulated execution layer ("cuda-emulated", csrc/cuda_emulated.cpp): their
noise and their Philox calls. The phases themselves run in tests/test_<phase>.py like every backend.

The sample and the bfloat16-state update place their work in noise-index space: one Philox call per
four elements (the four lanes of one call), whatever a tensor's offset in its group, float64 too.
"""

import pytest
import torch
from conftest import AVAILABLE_BACKENDS
from harness import (
    SPEC,
    assert_close,
    assert_stochastically_rounded,
    clones,
    flag,
    inv_scale,
    nan_like,
    noise_slack,
    normal,
    offsets_of,
    positive,
)

from sambayes import _philox, backends

pytestmark = pytest.mark.skipif(
    "cuda-emulated" not in AVAILABLE_BACKENDS, reason="the cuda-emulated backend is not available here"
)
#: elements per CUDA block (csrc/multi_tensor_cuda.cuh): a tensor of more spans several chunks
CUDA_CHUNK = 1 << 14


@pytest.fixture(scope="module")
def emulated():
    return backends.resolve("cuda-emulated", "cpu")


def philox_calls(module) -> int:
    return module.ops.counters(False)[0]


def calls_per_quad(sizes: list[int], offsets: list[int]) -> int:
    """One call per group of four noise indices that a tensor touches."""
    return sum((offset % 4 + n + 3) // 4 for n, offset in zip(sizes, offsets))


def test_noise_matches_the_reference(emulated):
    for start in (0, 2**32 - 700, 10**12 + 3):  # the carry into the counter's high word, a large counter
        z, want = emulated.randn_range(1234, start, 4099), _philox.randn_range(1234, start, 4099)
        assert ((z.double() - want.double()).abs() <= noise_slack(1234, start, want)).all()


#: sizes: one chunk, several chunks (boundaries in noise-index space), single elements
SIZES = [7, 1025, CUDA_CHUNK + 5, 1, 2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def copies(values: list[torch.Tensor], dtype: torch.dtype, aligned: bool) -> list[torch.Tensor]:
    """``values`` in ``dtype``; not ``aligned``: each starts one element into its storage (no vector loads)."""
    skip = 0 if aligned else 1
    out = [torch.empty(v.numel() + skip, dtype=dtype)[skip:] for v in values]
    for o, v in zip(out, values):
        o.copy_(v)
    return out


@pytest.mark.parametrize("first", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_the_sample_makes_one_philox_call_per_four_elements(emulated, dtype, first):
    """Aligned rows (vector loads) and unaligned ones (element by element): one call per four noise
    indices, the same values both ways, and the spec's to the noise's few ulps."""
    state = torch.float64 if dtype == torch.float64 else torch.float32
    offsets = offsets_of(SIZES, first)
    means, precisions = normal(SIZES, state), positive(SIZES, state)
    hyper = {"num_data": 7.0, "seed": 2**40 + 17}
    runs = []
    for aligned in (True, False):
        params = copies(nan_like(normal(SIZES, dtype)), dtype, aligned)
        emulated.ops.counters(True)
        emulated.bsam_sample(
            params, copies(means, state, aligned), copies(precisions, state, aligned), offsets, **hyper
        )
        assert philox_calls(emulated) == calls_per_quad(SIZES, offsets), f"aligned={aligned}"
        runs.append(params)
    expected = nan_like(runs[0])
    SPEC.bsam_sample(expected, means, precisions, offsets, **hyper)
    for i, (vector, scalar, want) in enumerate(zip(*runs, expected)):
        assert torch.equal(vector, scalar), f"sample[{i}]: the vector and the scalar paths differ"
        sigma = 1 / torch.sqrt(hyper["num_data"] * precisions[i].double())
        z = (want.double() - means[i].double()) / sigma
        assert_close(vector, want, dtype, f"sample[{i}]", slack=noise_slack(hyper["seed"], offsets[i], z) * sigma)


@pytest.mark.parametrize("first", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=lambda d: str(d).split(".")[-1])
def test_the_bf16_state_update_makes_one_philox_call_per_four_elements(emulated, dtype, first):
    offsets = offsets_of(SIZES, first)
    grads, means, curvatures = normal(SIZES, dtype), normal(SIZES, torch.float32), positive(SIZES, torch.float32)
    precisions, momentums = positive(SIZES, torch.bfloat16), normal(SIZES, torch.bfloat16)
    hyper = {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "weight_decay": 1e-3, "damping": 0.1, "splits": 1}
    runs = []
    for aligned in (True, False):
        state = [copies(values, values[0].dtype, aligned) for values in (grads, means, precisions, momentums)]
        params = copies(grads, dtype, aligned)
        emulated.ops.counters(True)
        emulated.bsam_update(
            params, *state, copies(curvatures, torch.float32, aligned), offsets, flag(), inv_scale(),
            **hyper, seed=2**40 + 5,
        )  # fmt: skip
        assert philox_calls(emulated) == calls_per_quad(SIZES, offsets), f"aligned={aligned}"
        runs.append(state[2:])
    expected = [clones(precisions), clones(momentums)]
    SPEC.bsam_update(
        nan_like(grads), clones(grads), clones(means), *expected, curvatures, offsets, flag(), inv_scale(),
        **hyper, seed=2**40 + 5,
    )  # fmt: skip
    for name, vector, scalar, want in zip(("precision", "momentum"), *runs, expected):
        assert all(torch.equal(a, b) for a, b in zip(vector, scalar)), f"{name}: the vector and scalar paths differ"
        assert_stochastically_rounded(vector, want, name)


def test_a_skipped_update_draws_no_rounding_words(emulated):
    sizes = [5, 9]
    stored = [positive(sizes, torch.bfloat16), normal(sizes, torch.bfloat16)]
    emulated.ops.counters(True)
    emulated.bsam_update(
        nan_like(normal(sizes, torch.float32)), normal(sizes, torch.float32), normal(sizes, torch.float32), *stored,
        positive(sizes, torch.float32), [0, 5], flag(1.0), inv_scale(),
        lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, damping=0.1, splits=1, seed=3,
    )  # fmt: skip
    assert philox_calls(emulated) == 0


def test_sums_below_their_first_tensor(emulated):
    """The step's sums are addressed relative to their first tensor; here the second lies below it,
    a negative offset that the kernel once added as a pointer (undefined: the sanitized build's
    UndefinedBehaviorSanitizer stopped it) and now adds as an integer."""
    sizes = [5, 9]
    buffer = torch.zeros(sum(sizes))
    sums = [buffer[sizes[1] :], buffer[: sizes[1]]]  # curvature_sums[1] starts below curvature_sums[0]
    grads, means, precisions = (
        normal(sizes, torch.float32),
        normal(sizes, torch.float32),
        positive(sizes, torch.float32),
    )
    params, expected = nan_like(grads), nan_like(grads)
    expected_sums = [torch.zeros(n) for n in sizes]
    emulated.bsam_perturb(params, clones(grads), means, precisions, sums, flag(), inv_scale(), rho=0.1, accumulate=True)
    SPEC.bsam_perturb(
        expected, clones(grads), means, precisions, expected_sums, flag(), inv_scale(), rho=0.1, accumulate=True
    )
    for got, want in zip(params + sums, expected + expected_sums):
        assert_close(got, want, torch.float32, "perturb")


@pytest.mark.parametrize("first", [0, 3])
def test_ivon_draws_one_philox_call_per_stream_and_four_elements(emulated, first):
    """IVON's accumulation with Price's estimator (the noise) and its one-sample update with bfloat16 state (the
    noise and the rounding words: two streams): one call per stream and quad, the same values on aligned rows
    (vector loads) and unaligned ones; a skipped update draws nothing."""
    offsets = offsets_of(SIZES, first)
    grads, means = normal(SIZES, torch.float32), normal(SIZES, torch.float32)
    precisions, momentums = positive(SIZES, torch.bfloat16), normal(SIZES, torch.bfloat16)
    hyper = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "ess": 50.0, "weight_decay": 1e-3, "clip_radius": 0.5}
    hyper.update(debias=True, price=True, summed=False, splits=1, noise_seed=2**41 + 3, seed=2**40 + 5)
    step = torch.tensor(2.0, dtype=torch.float64)
    runs = []
    for aligned in (True, False):
        curvatures = copies([torch.zeros(n) for n in SIZES], torch.float32, aligned)
        emulated.ops.counters(True)
        emulated.ivon_accumulate(
            copies(grads, torch.float32, aligned), copies(grads, torch.float32, aligned), curvatures, offsets,
            flag(), seed=2**40 + 11, price=True, first=True, last=True,
        )  # fmt: skip
        assert philox_calls(emulated) == calls_per_quad(SIZES, offsets), f"accumulate, aligned={aligned}"
        state = [copies(values, values[0].dtype, aligned) for values in (grads, means, precisions, momentums)]
        emulated.ops.counters(True)
        emulated.ivon_update(
            copies(grads, torch.float32, aligned), *state, curvatures, offsets, flag(), inv_scale(), step, **hyper
        )
        assert philox_calls(emulated) == 2 * calls_per_quad(SIZES, offsets), f"update, aligned={aligned}"
        runs.append(curvatures + [t for values in state[1:] for t in values])
    for vector, scalar in zip(*runs):
        assert torch.equal(vector, scalar), "the vector and the scalar paths differ"
    emulated.ops.counters(True)
    emulated.ivon_update(
        copies(grads, torch.float32, True), *(clones(v) for v in (grads, means, precisions, momentums)),
        [torch.zeros(n) for n in SIZES], offsets, flag(1.0), inv_scale(), step, **hyper,
    )  # fmt: skip
    assert philox_calls(emulated) == 0
