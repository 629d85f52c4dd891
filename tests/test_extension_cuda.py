"""The "cuda" backend on a GPU: its noise against the reference and the "cpu" backend's, and a
whole trajectory against the "cpu" backend. Its phases are checked against the spec in
tests/test_<phase>.py, which run every available backend.

Runs only where a GPU is visible and sambayes._C was built with its CUDA kernels.
"""

import pytest
import torch
from harness import noise_slack

import sambayes
from sambayes import _philox, backends

REASON = backends.why_unavailable("cuda", "cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or REASON is not None,
    reason=REASON or "no CUDA device",
)


def test_noise_matches_reference_and_cpu_backend():
    extension = backends.resolve("cuda", "cuda")
    for start in (0, 2**32 - 700, 10**12 + 3):
        z = extension.randn_range(1234, start, 70001, device="cuda").cpu()
        for want in (_philox.randn_range(1234, start, 70001), extension.randn_range(1234, start, 70001)):
            # nvcc fuses the polynomials' multiply-adds: a few ulps of the pair's radius where z is near 0
            assert ((z.double() - want.double()).abs() <= noise_slack(1234, start, want)).all()


def test_bsam_trajectory_matches_cpu_backend():
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
