"""bSAM noisy sample: θ = m + z / sqrt(N·s), z ~ N(0, I) drawn in-kernel (Philox, ``tl.randn``).

Bytes per parameter: reads mean and precision (2 state words), writes θ (1 param
word): 12 B for float32 parameters, 10 B for bfloat16/float16. Minimal: the
sample depends on m and s elementwise and must land in the parameter, and z
costs no traffic because it is generated from (seed, element index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import (
    BLOCK,
    NUM_WARPS,
    TL_DTYPES,
    div,
    load,
    locate,
    role_pointer,
    scalar,
    split_float,
    sqrt,
    store,
    tensor_table,
)


@triton.jit
def _sample_block(param, mean, precision, offs, mask, noise_offset, seed, num_data, STATE: tl.constexpr):
    m = load(mean, offs, mask, STATE)
    s = load(precision, offs, mask, STATE, 1.0)  # masked lanes: no division by zero
    z = tl.randn(seed, noise_offset + offs).to(STATE)
    # noisy sample
    store(param, offs, m + div(z, sqrt(num_data * s)), mask)


@triton.jit
def _bsam_sample_kernel(
    table,
    seed,
    num_data_hi,
    num_data_lo,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, noise_offset, record = locate(table, 3)
    param = role_pointer(record, start, 0, PARAM, ALIGNED)
    mean = role_pointer(record, start, 1, STATE, ALIGNED)
    precision = role_pointer(record, start, 2, STATE, ALIGNED)
    num_data = scalar(num_data_hi, num_data_lo, STATE)
    offs = tl.arange(0, BLOCK)
    if remaining >= BLOCK:  # full block: no mask, so loads and stores vectorize
        _sample_block(param, mean, precision, offs, None, noise_offset, seed, num_data, STATE)
    else:
        _sample_block(param, mean, precision, offs, offs < remaining, noise_offset, seed, num_data, STATE)


def bsam_sample(
    params: list[torch.Tensor],
    means: list[torch.Tensor],
    precisions: list[torch.Tensor],
    offsets: list[int],
    *,
    num_data: float,
    seed: int,
) -> None:
    """θ_i = m_i + z / sqrt(N·s_i) for every tensor, one launch.

    ``params``: contiguous float64/32, bf16 or fp16 tensors, written in place;
    ``means``, ``precisions``: contiguous state tensors of the same shapes (float64
    for float64 params, float32 otherwise); ``offsets[i]``: index of tensor i's
    first element in the group's flat concatenation (z of element k of tensor i
    is ``tl.randn(seed, offsets[i] + k)``); ``seed``: 0 <= seed < 2^63.
    """
    table = tensor_table([params, means, precisions], offsets)
    if table.num_blocks == 0:
        return
    _bsam_sample_kernel[(table.num_blocks,)](
        table.table,
        seed,
        *split_float(num_data),
        PARAM=TL_DTYPES[params[0].dtype],
        STATE=TL_DTYPES[means[0].dtype],
        ALIGNED=table.aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
