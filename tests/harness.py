"""The shared harness of the phase tests: every backend against the eager backend (the spec).

Fresh random inputs per case, odd sizes around the kernels' block size, every
parameter dtype, one to 500 tensors; outputs poisoned with NaN before a phase runs
and carved out of guarded buffers, so that a skipped element or a write past a
tensor's end fails; one tolerance table per dtype; a printer of the first mismatches.

At the end, the tiny models and closures that the optimizer's tests share
(tests/test_optimizer.py, test_ledger.py, test_checkpoints.py, test_skipping.py, test_bsam.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import AVAILABLE_BACKENDS, DEVICE

from sambayes import _philox, backends
from sambayes.backends import eager

#: what every other backend is checked against
SPEC = eager
#: every backend available here but the spec
COMPARED = [b for b in AVAILABLE_BACKENDS if b != "eager"]
#: the backends available here that run on the CPU without an interpreter
CPU_BACKENDS = [b for b in AVAILABLE_BACKENDS if b in ("eager", "foreach", "cpu", "cuda-emulated")]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

#: (atol, rtol) per dtype: one unit in the last place of the dtype. The math is float32/64, and
#: a one-ulp difference there (FMA contraction on GPUs) can flip one rounding to bf16/fp16.
TOLERANCE = {
    torch.float64: (1e-13, 1e-13),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (2e-6, 2.0**-7),
    torch.float16: (2e-6, 2.0**-10),
}
#: float32 ulps by which a backend's noise z may differ from the reference's (log and cos)
NOISE_ULPS = 3
#: ulps of the math dtype by which fusing a line's products and sums into FMAs may move its result,
#: scaled to the line's terms (contraction_slack): nvcc (--fmad=true), Triton and -ffp-contract=fast
#: fuse b·x + c into one rounding, which ALGORITHM.md's elementwise lines allow. Two: one rounding
#: saved per fused product, at most two products fused into one term.
FMA_ULPS = 2


def noise_slack(seed: int, start: int, z: torch.Tensor) -> torch.Tensor:
    """Elementwise, how far a backend's noise may be from the reference's z (noise indices start ..):
    NOISE_ULPS float32 ulps of z (log, sin and cos round differently) plus FMA_ULPS ulps of the
    radius r of z's Box–Muller pair, the operands of r·cos θ and r·sin θ: fused multiply-adds in the
    polynomials move z by a few ulps of r, not of z, where cos θ is near zero."""
    first = start - start % 2  # pairs: lanes 0-1 and 2-3 of a call
    count = (start + z.numel() + 1) // 2 * 2 - first
    pairs = _philox.randn_range(seed, first, count).double().view(-1, 2)
    radius = pairs.square().sum(1).sqrt().repeat_interleave(2)[start - first : start - first + z.numel()]
    return (NOISE_ULPS * z.detach().double().abs().cpu().flatten() + FMA_ULPS * radius) * 2.0**-23


def contraction_slack(dtype: torch.dtype, *terms) -> torch.Tensor:
    """Elementwise: how far fusing the multiply-adds of a line ``t1 + t2 + ...`` may move its result,
    FMA_ULPS ulps of the math dtype of ``dtype`` times Σ |term|. Scaled to the terms, not to the result:
    where the terms cancel, the result is small but the rounding a fused product skips is not."""
    ulp = torch.finfo(state_dtype(dtype)).eps  # an ulp at 1
    return FMA_ULPS * ulp * sum(torch.as_tensor(t, dtype=torch.float64).abs() for t in terms)


def _triton_block() -> int:
    try:
        from sambayes.kernels import _multi_tensor
    except ImportError:  # no Triton: the block of the interpreter, for the same odd sizes everywhere
        return 8192
    return _multi_tensor.BLOCK


BLOCK = _triton_block()
ODD_SIZES = sorted({1, 7, 1023, 1025, BLOCK - 1, BLOCK + 1, 65537})
MANY = [1 + (97 * i) % 301 for i in range(500)]  # 500 small tensors of odd sizes


def _slow(backend: str) -> bool:
    """Triton's interpreter costs milliseconds per block: 500 tensors in float32 only."""
    return backend == "triton" and DEVICE == "cpu"


def cases(backends_: list[str] = COMPARED) -> list:
    """pytest params (backend, dtype, sizes) for a phase test."""
    out = []
    for backend in backends_:
        for dtype in PARAM_DTYPES:
            name = str(dtype).split(".")[-1]
            for sizes in [[n] for n in ODD_SIZES] + [[7, 1025, 1]]:
                out.append(pytest.param(backend, dtype, sizes, id=f"{backend}-{name}-{'x'.join(map(str, sizes))}"))
            if dtype == torch.float32 or not _slow(backend):
                out.append(pytest.param(backend, dtype, MANY, id=f"{backend}-{name}-500"))
    return out


def stored_cases(backends_: list[str] = COMPARED) -> list:
    """pytest params (backend, dtype, sizes) for bSAM's phases with bfloat16 precision and momentum
    (``BSAM(state_dtype=torch.bfloat16)``): the parameter dtypes it takes, fewer sizes."""
    out = []
    for backend in backends_:
        for dtype in PARAM_DTYPES[:3]:
            name = str(dtype).split(".")[-1]
            for sizes in ([BLOCK + 1], [7, 1025, 1]) + (([65537], MANY) if dtype == torch.float32 else ()):
                size_id = "500" if sizes is MANY else "x".join(map(str, sizes))
                out.append(pytest.param(backend, dtype, sizes, id=f"{backend}-{name}-{size_id}-bf16state"))
    return out


def bsam_cases(backends_: list[str] = COMPARED) -> list:
    """pytest params (backend, dtype, sizes, stored) for bSAM's phases: :func:`cases` with the
    precision and momentum in the state dtype (stored None), then :func:`stored_cases` in bfloat16."""
    return [pytest.param(*c.values, None, id=c.id) for c in cases(backends_)] + [
        pytest.param(*c.values, torch.bfloat16, id=c.id) for c in stored_cases(backends_)
    ]


def lean_cases(backends_: list[str] = COMPARED, stored: bool = False) -> list:
    """pytest params (backend, dtype, sizes, stored) for a phase whose tables, chunks, loads and stores are those
    the phases on :func:`cases` test at every size: every dtype over three tensors (7, 1025, 1: vector and scalar
    paths, offsets off multiples of 4), and in float32 one tensor across blocks and CUDA chunks (65537) and
    500 small tensors (not under Triton's interpreter). ``stored``: also with bfloat16 precision and momentum,
    over the parameter dtypes that take it."""
    out = []
    for backend in backends_:
        for dtype in PARAM_DTYPES:
            name = str(dtype).split(".")[-1]
            sizes_ = [[7, 1025, 1]]
            if dtype == torch.float32:
                sizes_ += [[65537]] + ([] if _slow(backend) else [MANY])
            for stored_ in (None, torch.bfloat16) if stored and dtype != torch.float64 else (None,):
                for sizes in sizes_ if stored_ is None or dtype == torch.float32 else sizes_[:1]:
                    size_id = "500" if sizes is MANY else "x".join(map(str, sizes))
                    case = f"{backend}-{name}-{size_id}" + ("-bf16state" if stored_ else "")
                    out.append(pytest.param(backend, dtype, sizes, stored_, id=case))
    return out


def offsets_of(sizes: list[int], first: int = 3) -> list[int]:
    """Group element index of each tensor's first element: consecutive, starting off a multiple of 4."""
    return [first + sum(sizes[:i]) for i in range(len(sizes))]


def assert_stochastically_rounded(actual: list, expected: list, name: str, slack: list | None = None) -> None:
    """bfloat16 state rounded with the same random bits from float32 values that may differ by a
    float32 ulp between backends: bitwise equal, but for rare elements one bfloat16 ulp apart.
    ``slack[i]``: how far the float32 values of tensor i may differ before rounding (contraction_slack);
    where it exceeds a bfloat16 ulp (terms that cancel), elements may be apart by that much more."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype == torch.bfloat16, f"{name}[{i}]: dtype {a.dtype}"
        apart = (a.view(torch.int16).int() - e.view(torch.int16).int()).abs()
        if slack is not None:  # rounding (bits + r) >> 16 is monotonic: apart by at most the slack and an ulp
            ulp = torch.ldexp(torch.ones_like(e, dtype=torch.float64), torch.frexp(e.double()).exponent - 8)
            within = (a.double() - e.double()).abs() <= slack[i].flatten().view_as(e) + ulp
            apart = torch.where(within & (apart > 1), 1, apart)
        if (apart > 1).any() or int((apart == 1).sum()) > max(2, a.numel() // 1000):
            idx = (apart > 0).nonzero().flatten()[:5].tolist()
            pairs = ", ".join(f"[{j}] {a.flatten()[j].item():.6g} vs {e.flatten()[j].item():.6g}" for j in idx)
            pytest.fail(f"{name}[{i}]: {int((apart > 0).sum())} of {a.numel()} bfloat16 values differ; first: {pairs}")


#: 1/scale of a GradScaler: the phases that read gradients unscale them (not a power of 2: real rounding)
INV_SCALE = 1 / 3


def flag(value: float = 0.0) -> torch.Tensor:
    """A found-inf flag (float32 0-dim, as torch's GradScaler keeps it)."""
    return torch.full((), value, dtype=torch.float32, device=DEVICE)


def inv_scale() -> torch.Tensor:
    return torch.tensor(INV_SCALE, dtype=torch.float32, device=DEVICE)


#: Where a non-finite value goes: the first element, the middle of the largest tensor (a full
#: vectorized block), the end of the largest (its remainder past the last full vector or block),
#: the last element of the last tensor.
NONFINITE_AT = ["first", "middle", "tail", "last"]


def with_nonfinite(tensors: list[torch.Tensor], value: float, where: str = "middle") -> list[torch.Tensor]:
    """Copies with ``value`` (inf or NaN) at one place (see NONFINITE_AT)."""
    out = clones(tensors)
    largest = max(out, key=lambda t: t.numel())
    tensor, index = {
        "first": (out[0], 0),
        "middle": (largest, largest.numel() // 2),
        "tail": (largest, largest.numel() - 1),
        "last": (out[-1], out[-1].numel() - 1),
    }[where]
    tensor[index] = value
    return out


def assert_zeros(tensors: list[torch.Tensor], name: str) -> None:
    for i, t in enumerate(tensors):
        assert torch.equal(t, torch.zeros_like(t)), f"{name}[{i}] was not zeroed"


def module(backend: str):
    """The backend's own module (not the dispatch: the phase tests call it directly)."""
    return backends.resolve(backend, DEVICE)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def normal(sizes: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(n, dtype=torch.float64, device=DEVICE).to(dtype) for n in sizes]


def positive(sizes: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    """Values in [0.1, 3.1): precisions (s0 = 1 plus accumulated curvature) and sums of |·|."""
    return [(torch.rand(n, dtype=torch.float64, device=DEVICE) * 3 + 0.1).to(dtype) for n in sizes]


def clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def nan_like(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.full_like(t, float("nan")) for t in tensors]


GUARD = 5  # sentinel elements around every tensor
SENTINEL = 12345.0


class Guarded:
    """Tensors carved out of one buffer with SENTINEL gaps, to catch writes past a tensor's end.

    Filled with NaN (poisoned outputs), or with copies of ``values`` (state written in place).
    """

    def __init__(self, sizes: list[int], dtype: torch.dtype, values: list[torch.Tensor] | None = None):
        total = sum(sizes) + GUARD * (len(sizes) + 1)
        self.buffer = torch.full((total,), SENTINEL, dtype=dtype, device=DEVICE)
        self.tensors, start = [], GUARD
        for i, n in enumerate(sizes):
            t = self.buffer[start : start + n]
            t.copy_(values[i]) if values is not None else t.fill_(float("nan"))
            self.tensors.append(t)
            start += n + GUARD
        self.mask = torch.ones(total, dtype=torch.bool, device=DEVICE)
        for t in self.tensors:
            self.mask[t.storage_offset() : t.storage_offset() + t.numel()] = False

    def check(self, name: str) -> None:
        assert (self.buffer[self.mask] == SENTINEL).all(), f"{name}: a kernel wrote outside its tensor"


def assert_close(actual, expected, dtype: torch.dtype, name: str, slack: torch.Tensor | float = 0.0) -> None:
    """|actual − expected| <= atol + rtol·|expected| (+ ``slack``, elementwise) with the dtype's
    tolerances; on failure, name the tensor and print its first mismatches."""
    atol, rtol = TOLERANCE[dtype]
    a, e = actual.double().flatten(), expected.double().flatten()
    slack = torch.as_tensor(slack, dtype=torch.float64, device=a.device).flatten()
    bad = ~((a - e).abs() <= atol + rtol * e.abs() + slack)
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        pairs = ", ".join(f"[{i}] {a[i].item():.9g} vs {e[i].item():.9g}" for i in idx)
        pytest.fail(f"{name}: {int(bad.sum())} of {a.numel()} elements differ ({dtype}); first: {pairs}")


def assert_lists_close(actual: list, expected: list, dtype: torch.dtype, name: str, slack: list | None = None) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, dtype, f"{name}[{i}]", slack=0.0 if slack is None else slack[i])


def assert_rounded(params: list[torch.Tensor], state: list[torch.Tensor], name: str) -> None:
    """Each parameter is exactly its state tensor rounded to the parameter dtype."""
    for i, (p, w) in enumerate(zip(params, state)):
        assert torch.equal(p, w.to(p.dtype)), f"{name}[{i}] is not the rounded state"


# ---- the optimizer tests' tiny models ----------------------------------------------------------------


def small_mlp(dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """5 → 7 → 3 with a tanh, on the CPU: the same weights at every call."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def data(n: int = 16, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs of :func:`small_mlp` and their labels (3 classes), from a generator of their own."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def cross_entropy_closure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """closure(): the cross-entropy of ``model`` on (x, y), backward, the loss."""

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def flat(model: torch.nn.Module) -> torch.Tensor:
    """The model's parameters, detached, as one flat tensor."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def linear() -> tuple[torch.nn.Linear, torch.Tensor]:
    """A seeded Linear(3, 2) on the tests' device, and 8 inputs for it."""
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).to(DEVICE), torch.randn(8, 3, device=DEVICE)


def square_closure(model: torch.nn.Module, x: torch.Tensor):
    """closure(j=0): the mean square of ``model(x)`` (every sub-batch the same), backward, the loss."""

    def closure(j=0):
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    return closure


def posterior_state(sizes: list[int], dtype: torch.dtype, stored: torch.dtype | None) -> tuple[list, list, list]:
    """An update's posterior state for parameters of ``dtype``: (start, for the backend, for the spec), each
    [mean, precision (positive), momentum]; precision and momentum in ``stored`` (bfloat16) or the state dtype.
    The backend's in Guarded buffers, the spec's plain clones."""
    sd = state_dtype(dtype)
    start = [normal(sizes, sd), positive(sizes, stored or sd), normal(sizes, stored or sd)]
    return start, [Guarded(sizes, t[0].dtype, t) for t in start], [clones(values) for values in start]
