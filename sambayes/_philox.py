"""Philox4x32-10 + Box-Muller noise, exactly as Triton's ``tl.randn`` computes it.

This is the reference generator (the test oracle): plain integer tensor ops, so
it runs on any device and any PyTorch build. The fused tiers draw the same
numbers inside their kernels.

    z(seed, offset) = sqrt(-2 ln u1) * cos(2 pi u2),  (u1, u2) from Philox words 0, 1

The per-call seed is ``noise_seed(seed, group, step, split)``, documented below.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85

#: Step index used by :meth:`BSAM.sampled_params`: far beyond any training step,
#: so posterior samples never reuse the noise of a training step.
POSTERIOR_STREAM = 1 << 62


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def noise_seed(seed: int, group: int, step: int, split: int) -> int:
    """The Philox key of one noise draw: a hash of (seed, group, step, split).

    ``x = splitmix64(seed mod 2^64)``, then ``x = splitmix64(x ^ w)`` for
    ``w`` in (group, step, split), and the result is ``x >> 1`` so that it fits
    a signed 64-bit kernel argument. ``group`` is the parameter-group index,
    ``step`` the number of step attempts before this one, ``split`` the
    sub-batch index j.
    """
    x = _splitmix64(seed & _M64)
    for word in (group, step, split):
        x = _splitmix64(x ^ (word & _M64))
    return x >> 1


def _mul_hi_lo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 32x32 -> 64-bit product in int64 without overflow: split x into 16-bit halves
    lo16, hi16 = x & 0xFFFF, x >> 16
    low = a * lo16 + ((a * hi16) & 0xFFFF) * 65536  # < 2^49
    hi = ((a * hi16) >> 16) + (low >> 32)
    return hi & _M32, low & _M32


def philox4x32(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox4x32-10 words for counter ``(offset lo, offset hi, 0, 0)``.

    ``offsets``: int64 tensor of any shape. Returns four int64 tensors holding
    unsigned 32-bit values.
    """
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    # read as int32, bit-invert negatives, scale: Triton's uint_to_uniform_float
    signed = torch.where(x >= 1 << 31, x - (1 << 32), x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 noise, ``z[i] = tl.randn(seed, offsets[i])``."""
    c0, c1, _, _ = philox4x32(seed, offsets)
    u1 = torch.clamp_min(_uniform(c0), 1.0e-7)
    u2 = _uniform(c1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def randn_range(seed: int, start: int, numel: int, device=None, chunk: int = 1 << 20) -> torch.Tensor:
    """``randn(seed, start + arange(numel))`` as a flat float32 tensor, built in chunks
    to bound the int64 temporaries."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for lo in range(0, numel, chunk):
        hi = min(numel, lo + chunk)
        out[lo:hi] = randn(seed, torch.arange(start + lo, start + hi, device=device))
    return out
