"""The "cuda" tier against the eager tier on a GPU, and its noise against the CPU tier's.

Runs only where a GPU is visible and sambayes._C was built with its CUDA kernels.
"""

import pytest
import torch

import sambayes
from sambayes import _cext, _eager, _philox

REASON = _cext.why_unavailable("cuda", "cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or REASON is not None,
    reason=REASON or "no CUDA device",
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def test_noise_matches_reference_and_cpu_tier():
    for start in (0, 2**32 - 700, 10**12 + 3):
        z = _cext.randn_range(1234, start, 70001, device="cuda").cpu()
        torch.testing.assert_close(z, _philox.randn_range(1234, start, 70001), rtol=3 * 2.0**-23, atol=1e-12)
        torch.testing.assert_close(z, _cext.randn_range(1234, start, 70001), rtol=2 * 2.0**-23, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numels", [[1], [7, 1023, 1025], [65537, 3], [1 + (97 * i) % 301 for i in range(500)]])
def test_phases_match_eager(dtype, numels):
    gen = torch.Generator().manual_seed(0)
    sd = _state_dtype(dtype)

    def make(dt, positive=False):
        ts = [torch.randn(n, generator=gen, dtype=torch.float64) for n in numels]
        return [(0.5 + t.abs() if positive else t).to(device="cuda", dtype=dt) for t in ts]

    base = {
        "params": make(dtype),
        "grads": make(dtype),
        "means": make(sd),
        "precisions": make(sd, True),
        "momentums": make(sd),
        "stats": make(sd, True),
        "variances": make(sd, True),
    }
    rtol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    calls = [
        ("bsam_sample", ("params", "means", "precisions"), {"offsets": offsets, "num_data": 1.0, "seed": 9}, 8e-6),
        ("bsam_perturb", ("params", "grads", "means", "precisions", "stats"), {"rho": 0.05, "accumulate": True}, 2e-6),
        (
            "bsam_update",
            ("params", "grads", "means", "precisions", "momentums", "stats"),
            {"lr": 0.3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01, "damping": 0.1, "splits": 3},
            2e-6,
        ),
        (
            "sam_update_sgd",
            ("params", "grads", "means", "momentums"),
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True, "splits": 2},
            2e-6,
        ),
        (
            "sam_update_adamw",
            ("params", "grads", "means", "momentums", "variances"),
            {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05, "step": 3, "splits": 2},
            2e-6,
        ),
    ]
    for name, keys, kwargs, atol in calls:
        want = {k: [t.clone() for t in v] for k, v in base.items()}
        got = {k: [t.clone() for t in v] for k, v in base.items()}
        for p in got["params"]:
            p.fill_(float("nan"))
        args = [want[k] for k in keys]
        if name == "bsam_sample":
            getattr(_eager, name)(*args, kwargs["offsets"], num_data=1.0, seed=9)
            getattr(_cext, name)(*[got[k] for k in keys], kwargs["offsets"], num_data=1.0, seed=9)
        else:
            getattr(_eager, name)(*args, **kwargs)
            getattr(_cext, name)(*[got[k] for k in keys], **kwargs)
        for key in keys:
            for g, w in zip(got[key], want[key]):
                torch.testing.assert_close(g, w, rtol=rtol, atol=atol if dtype != torch.float64 else 1e-12)

    for adaptive in (False, True):
        sq = _cext.sam_sq_norm(base["grads"], base["means"], adaptive=adaptive)
        torch.testing.assert_close(
            sq, _eager.sam_sq_norm(base["grads"], base["means"], adaptive=adaptive), rtol=1e-5, atol=0
        )


def test_bsam_trajectory_matches_cpu_tier():
    def run(device, backend):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3).to(device)
        opt = sambayes.BSAM(model.parameters(), num_data=100, lr=0.1, seed=1, backend=backend)
        x, y = torch.randn(16, 8, device=device), torch.randint(0, 3, (16,), device=device)
        for _ in range(5):
            opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
        return [p.detach().cpu() for p in model.parameters()]

    for got, want in zip(run("cuda", "cuda"), run("cpu", "cpu")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
