"""Philox4x32-10 + Box-Muller noise, exactly as Triton's ``tl.randn4x`` computes it
(ALGORITHM.md, "Noise", version 2).

This is the reference generator (the test oracle): plain integer tensor ops, so
it runs on any device and any PyTorch build. The fused backends draw the same
numbers inside their kernels. One Philox call at counter c gives four normals,
two Box-Muller pairs (cosine and sine each), for elements 4c .. 4c + 3::

    (z_4c, z_4c+1, z_4c+2, z_4c+3) = randn4x(seed, c)
    pair(a, b) = r·cos θ, r·sin θ  with r = sqrt(-2 ln max(1e-7, u(a))), θ = 2π·u(b)
    randn4x(seed, c) = pair(word0, word1) + pair(word2, word3)

The per-call seed is ``noise_seed(seed, group, attempt, split)``, documented below.

Stochastic rounding (``BSAM(state_dtype=torch.bfloat16)``): the update computes the new
precision and momentum in float32 and stores them in bfloat16, rounded with 16 random bits
per value from the same generator, under the key ``rounding_seed(seed, group, attempt)``::

    word_i        = word (i mod 4) of philox4x32(key, counter i div 4)   (element i of the group)
    r_precision   = word_i >> 16 ;  r_momentum = word_i & 0xFFFF
    bf16(x, r)    = (bits(x) + r) >> 16     (bits(x): x's float32 bits; inf stays, NaN -> 0x7FC0)

x rounds away from zero with probability (the 16 dropped bits) / 2^16, so the stored value
equals x in expectation. Deterministic and resumable (a function of the seed, the group,
the attempt and the element index) and the same in every backend.
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


#: Sub-batch index of the stochastic-rounding key: no sub-batch has it (2^64 - 1).
ROUNDING_STREAM = (1 << 64) - 1

#: Step index of a seed derived from torch's (``seed=None``): no step has it (2^64 - 2).
DERIVED_SEED_STREAM = (1 << 64) - 2


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
    ``step`` the number of step attempts before this one (updates taken plus steps
    skipped: the host always knows it), ``split`` the sub-batch index j.
    """
    x = _splitmix64(_splitmix64(seed & _M64) ^ (group & _M64))
    for word in (step, split):
        x = _splitmix64(x ^ (word & _M64))
    return x >> 1


def noise_seed_on_device(seed: int, group: int, step: torch.Tensor, split: int) -> torch.Tensor:
    """:func:`noise_seed` with ``step`` a 0-dim int64 tensor (``capturable=True``): the same key, as a
    0-dim int64 tensor on ``step``'s device, hashed there by integer tensor ops (which wrap modulo
    2^64), so that a CUDA graph replays it with the step count the tensor holds then."""
    x = step ^ _signed(_splitmix64(_splitmix64(seed & _M64) ^ (group & _M64)))
    x = _splitmix64_tensor(_splitmix64_tensor(x) ^ _signed(split & _M64))
    return _shift_right(x, 1)


def _signed(x: int) -> int:
    """The int64 with the bits of the unsigned 64-bit ``x``."""
    return x - (1 << 64) if x >> 63 else x


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # logical: int64's >> copies the sign bit
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`_splitmix64` of int64 tensors, bit for bit."""
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


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


def randn4x(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four standard normals of each Philox call, float32 [len(counters), 4]:
    ``randn4x(seed, counters)[k] = tl.randn4x(seed, counters[k])``."""
    c0, c1, c2, c3 = philox4x32(seed, counters)
    out = []
    for a, b in ((c0, c1), (c2, c3)):
        u1 = torch.clamp_min(_uniform(a), 1.0e-7)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        theta = 6.283185307179586 * _uniform(b)
        out += [radius * torch.cos(theta), radius * torch.sin(theta)]
    return torch.stack(out, dim=-1)


def _lanes_range(calls, start: int, numel: int, dtype: torch.dtype, device, chunk: int) -> torch.Tensor:
    """Lane i mod 4 of call i div 4 for elements ``start .. start + numel - 1``, flat; ``calls(counters)``
    gives the four lanes of each counter, [len(counters), 4]. Built in chunks to bound the int64
    temporaries, each chunk from whole calls (one per four elements)."""
    out = torch.empty(numel, dtype=dtype, device=device)
    for lo in range(0, numel, chunk):
        hi = min(numel, lo + chunk)
        first, last = (start + lo) // 4, (start + hi - 1) // 4
        lanes = calls(torch.arange(first, last + 1, device=device)).flatten()
        skip = (start + lo) - 4 * first
        out[lo:hi] = lanes[skip : skip + hi - lo]
    return out


def randn_range(seed: int, start: int, numel: int, device=None, chunk: int = 1 << 20) -> torch.Tensor:
    """z of elements ``start .. start + numel - 1`` as a flat float32 tensor: element i takes
    lane i mod 4 of ``randn4x(seed, i div 4)``."""
    return _lanes_range(lambda counters: randn4x(seed, counters), start, numel, torch.float32, device, chunk)


def randn_tensors(seed: int, offsets: list[int], likes: list[torch.Tensor]) -> list[torch.Tensor]:
    """z for each tensor of a group, shaped and typed like ``likes[i]``, tensor i starting at element
    ``offsets[i]``: one draw over the span of all of them, then sliced (same numbers, fewer ops)."""
    if not likes:
        return []
    start = min(offsets)
    end = max(offset + like.numel() for offset, like in zip(offsets, likes))
    z = randn_range(seed, start, end - start, device=likes[0].device)
    return [
        z[offset - start : offset - start + like.numel()].view(like.shape).to(like.dtype)
        for offset, like in zip(offsets, likes)
    ]


def rounding_seed(seed: int, group: int, attempt: int) -> int:
    """The Philox key of a step's stochastic rounding: ``noise_seed(seed, group, attempt, ROUNDING_STREAM)``,
    ``attempt`` counted as for the noise of the same step (attempts before this one)."""
    return noise_seed(seed, group, attempt, ROUNDING_STREAM)


def rounding_words(seed: int, start: int, numel: int, device=None, chunk: int = 1 << 20) -> torch.Tensor:
    """The random word of elements ``start .. start + numel - 1``: word i mod 4 of the Philox call at
    counter i div 4; int64 [numel] holding uint32 values."""

    def words(counters: torch.Tensor) -> torch.Tensor:
        return torch.stack(philox4x32(seed, counters), dim=-1)

    return _lanes_range(words, start, numel, torch.int64, device, chunk)


def round_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16 with the 16 random bits ``bits`` (int64, < 2^16) per value:
    ``(bits(x) + r) >> 16``; inf stays inf, NaN becomes the quiet NaN 0x7FC0."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    finite = (u & 0x7F800000) != 0x7F800000
    nonfinite = torch.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, u >> 16)
    half = torch.where(finite, (u + bits) >> 16, nonfinite)
    return ((half ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16).view(x.shape)
