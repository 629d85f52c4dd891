"""Restore: θ = m (bSAM) or θ = w (SAM), the model back at rest.

Bytes per parameter: reads the state word, writes θ: 8 B for float32
parameters, 6 B for bfloat16/float16, the cost of a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import RESTORE
from ._multi_tensor import for_block, launch, load, locate, role_pointer, store, tensor_table


@triton.jit
def _restore_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, OPTION: tl.constexpr):
    param, weight = pointers
    store(param, offs, load(weight, offs, mask, STATE), mask)


@triton.jit
def _restore_kernel(table, PARAM: tl.constexpr, STATE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    start, remaining, _, record = locate(table, 2)
    pointers = (role_pointer(record, start, 0, PARAM, ALIGNED), role_pointer(record, start, 1, STATE, ALIGNED))
    for_block(_restore_block, pointers, (), start, remaining, 0, STATE, False, BLOCK)


def restore(params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """params[i] = weights[i] (rounded to the param dtype) for every tensor, one launch. Contiguous tensors."""
    launch(_restore_kernel, tensor_table([params, weights], RESTORE.kinds))
