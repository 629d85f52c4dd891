"""bSAM noisy sample: θ = m + z / sqrt(N·s), z ~ N(0, I) drawn in-kernel (Philox, ``tl.randn4x``).

Bytes per parameter: reads mean and precision (2 state words), writes θ (1 param
word): 12 B for float32 parameters, 10 B for bfloat16/float16; with the precision in
bfloat16 (``BSAM(state_dtype=torch.bfloat16)``) 10 B and 8 B. Minimal: the
sample depends on m and s elementwise and must land in the parameter, and z
costs no traffic because it is generated from (seed, element index): one Philox
call per four elements (ALGORITHM.md, "Noise", version 2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import BSAM_SAMPLE, step_args
from ._multi_tensor import (
    for_block,
    launch,
    load,
    locate,
    over_sqrt,
    randn_block,
    role_pointer,
    scalar,
    step_value,
    store,
    tensor_table,
)


@triton.jit
def _sample_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, BLOCK: tl.constexpr):
    param, mean, precision = pointers
    seed, num_data = scalars
    m = load(mean, offs, mask, STATE)
    s = load(precision, offs, mask, STATE, 1.0)  # masked lanes: no division by zero; bfloat16: exact
    z = randn_block(seed, noise_index, BLOCK).to(STATE)
    # noisy sample
    store(param, offs, m + over_sqrt(z, num_data * s), mask)


@triton.jit(do_not_specialize=["seed"])  # a new seed each step: one compiled variant for all
def _bsam_sample_kernel(
    table,
    seed,
    num_data: tl.float64,
    seed_ptr,  # None, or the seed in device memory (capturable)
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    STORED: tl.constexpr,  # the dtype the precision is stored in: STATE or bfloat16
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, noise_index, record = locate(table, 3)
    pointers = (
        role_pointer(record, start, 0, PARAM, ALIGNED),
        role_pointer(record, start, 1, STATE, ALIGNED),
        role_pointer(record, start, 2, STORED, ALIGNED),
    )
    scalars = (step_value(seed, seed_ptr), scalar(num_data, STATE))
    for_block(_sample_block, pointers, scalars, start, remaining, noise_index, STATE, BLOCK, BLOCK)


def bsam_sample(
    params: list[torch.Tensor],
    means: list[torch.Tensor],
    precisions: list[torch.Tensor],
    offsets: list[int],
    *,
    num_data: float,
    seed: int | torch.Tensor,
) -> None:
    """θ_i = m_i + z / sqrt(N·s_i) for every tensor, one launch per alignment class.

    ``params``: contiguous float64/32, bf16 or fp16 tensors, written in place;
    ``means``, ``precisions``: contiguous state tensors of the same shapes (float64
    for float64 params, float32 otherwise; ``precisions`` may be bfloat16 instead of
    float32, read and converted to float32); ``offsets[i]``: index of tensor i's
    first element in the group's flat concatenation (element k of tensor i takes
    lane j mod 4 of ``tl.randn4x(seed, j div 4)``, j = offsets[i] + k); ``seed``: 0 <= seed < 2^63, or a
    one-element int64 tensor on the device holding it, read by the kernel (CUDA-graph capture).
    """
    table = tensor_table([params, means, precisions], BSAM_SAMPLE.kinds, offsets, noise_blocks=True)
    seed, seed_ptr = step_args(seed, int)
    launch(_bsam_sample_kernel, table, seed, float(num_data), seed_ptr)
