"""The reference noise generator (ALGORITHM.md, "Noise", version 2) against Triton's own
tl.randn4x test vectors, its layout (element i: lane i mod 4 of call i div 4), and its statistics."""

import math

import pytest
import torch
from conftest import load_golden

import sambayes
from sambayes import _philox

RANDN4X = load_golden("philox_randn4x.json")["cases"]
ULP = 2.4e-7  # one float32 ulp, relative: log, sin and cos may round differently between libraries


@pytest.mark.parametrize("case", load_golden("philox_randn.json")["cases"], ids=lambda c: f"seed{c['seed']}")
def test_philox_words_match_triton(case):
    words = torch.stack(_philox.philox4x32(case["seed"], torch.tensor(case["offsets"])), dim=1)
    assert words.tolist() == case["philox_uint32x4"]  # bit for bit


@pytest.mark.parametrize("case", RANDN4X, ids=lambda c: f"seed{c['seed']}")
def test_randn4x_matches_triton(case):
    counters = torch.tensor([int(c) for c in case["counters"]])
    z = _philox.randn4x(int(case["seed"]), counters)
    torch.testing.assert_close(z, torch.tensor(case["randn4x"], dtype=torch.float32), rtol=ULP, atol=ULP)


@pytest.mark.parametrize("case", RANDN4X, ids=lambda c: f"seed{c['seed']}")
def test_element_i_takes_lane_i_mod_4_of_call_i_div_4(case):
    seed = int(case["seed"])
    for index, want in case["elements"]:
        got = _philox.randn_range(seed, int(index), 1)
        torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float32), rtol=ULP, atol=ULP)


@pytest.mark.parametrize("start", [0, 1, 2, 3, 4097, 2**34 - 3])
def test_a_range_may_start_at_any_element(start):
    """A shard (FSDP2) or a tensor after an odd-sized one starts anywhere inside a call."""
    whole = _philox.randn_range(11, start - start % 4, 64)
    part = _philox.randn_range(11, start, 50)
    assert torch.equal(part, whole[start % 4 : start % 4 + 50])


def test_randn_range_chunks_agree():
    whole = _philox.randn_range(7, 123, 5000)
    chunked = _philox.randn_range(7, 123, 5000, chunk=777)
    assert torch.equal(whole, chunked)
    # elements 123 .. 126: the last lane of call 30, then the first three of call 31
    calls = _philox.randn4x(7, torch.tensor([30, 31]))
    assert torch.equal(whole[:4], torch.cat([calls[0, 3:], calls[1, :3]]))


def test_noise_seed_is_documented_hash():
    seed = sambayes.noise_seed(1234, 0, 5, 2)
    assert 0 <= seed < 2**63
    assert seed == sambayes.noise_seed(1234, 0, 5, 2)
    others = {sambayes.noise_seed(1234, g, t, j) for g in range(2) for t in range(5) for j in range(3)}
    assert len(others) == 30  # every (group, attempt, split) gets its own stream


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
    # the four lanes of a call are independent: their correlations are within 5/sqrt(n/4) of 0
    lanes = z.view(-1, 4).T
    corr = torch.corrcoef(lanes)
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 5 / math.sqrt(n / 4)
