"""Restore: θ = m (bSAM) or θ = w (SAM), the model back at rest.

Bytes per parameter: reads the state word, writes θ: 8 B for float32
parameters, 6 B for bfloat16/float16, the cost of a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import BLOCK, NUM_WARPS, TL_DTYPES, load, locate, role_pointer, store, tensor_table


@triton.jit
def _restore_kernel(table, PARAM: tl.constexpr, STATE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    start, remaining, _, record = locate(table, 2)
    param = role_pointer(record, start, 0, PARAM, ALIGNED)
    weight = role_pointer(record, start, 1, STATE, ALIGNED)
    offs = tl.arange(0, BLOCK)
    if remaining >= BLOCK:  # full block: no mask, so loads and stores vectorize
        store(param, offs, load(weight, offs, None, STATE), None)
    else:
        mask = offs < remaining
        store(param, offs, load(weight, offs, mask, STATE), mask)


def restore(params: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """params[i] = weights[i] (rounded to the param dtype) for every tensor, one launch. Contiguous tensors."""
    table = tensor_table([params, weights])
    if table.num_blocks == 0:
        return
    _restore_kernel[(table.num_blocks,)](
        table.table,
        PARAM=TL_DTYPES[params[0].dtype],
        STATE=TL_DTYPES[weights[0].dtype],
        ALIGNED=table.aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
