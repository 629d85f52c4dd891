"""The reference noise generator against Triton's own tl.randn test vectors, and its statistics."""

import math

import pytest
import torch
from conftest import load_golden

import sambayes
from sambayes import _philox


@pytest.mark.parametrize("case", load_golden("philox_randn.json")["cases"], ids=lambda c: f"seed{c['seed']}")
def test_philox_matches_triton(case):
    offsets = torch.tensor(case["offsets"])
    words = torch.stack(_philox.philox4x32(case["seed"], offsets), dim=1)
    assert words.tolist() == case["philox_uint32x4"]  # bit for bit
    z = _philox.randn(case["seed"], offsets)
    expected = torch.tensor(case["randn"], dtype=torch.float32)
    # the transcendental functions may differ by an ulp between libraries
    torch.testing.assert_close(z, expected, rtol=2.4e-7, atol=2.4e-7)


def test_randn_range_chunks_agree():
    whole = _philox.randn_range(7, 123, 5000)
    chunked = _philox.randn_range(7, 123, 5000, chunk=777)
    assert torch.equal(whole, chunked)
    assert torch.equal(whole[10:20], _philox.randn(7, torch.arange(133, 143)))


def test_noise_seed_is_documented_hash():
    seed = sambayes.noise_seed(1234, 0, 5, 2)
    assert 0 <= seed < 2**63
    assert seed == sambayes.noise_seed(1234, 0, 5, 2)
    others = {sambayes.noise_seed(1234, g, t, j) for g in range(2) for t in range(5) for j in range(3)}
    assert len(others) == 30  # every (group, step, split) gets its own stream


def test_randn_is_standard_normal():
    # n = 2^20 draws: |mean| < 5/sqrt(n) and |var - 1| < 5*sqrt(2/n) each fail with probability < 1e-6
    n = 1 << 20
    z = _philox.randn_range(99, 0, n).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    # and a tail check: P(|z| > 3) = 0.0027 within 5 binomial standard deviations
    p = 0.0026998
    tail = (z.abs() > 3).double().mean().item()
    assert abs(tail - p) < 5 * math.sqrt(p * (1 - p) / n)
