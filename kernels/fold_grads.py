"""Sums over sub-batches (splits > 1): the perturbed-point gradient of sub-batch j joins the
running sum in the state dtype (float32 for bfloat16/float16 parameters), is checked for
inf/NaN, and the buffer is zeroed for the next backward pass. After the last sub-batch the
total goes back into the gradient buffer, rounded once to the parameter dtype, for the update.

Bytes per parameter (float32): first sub-batch 12 B (read g; write the sum, zero g), later
ones 16 B (read g and the sum; write both), the last 12 B (read g and the sum, write g).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import FOLD_GRADS
from ._multi_tensor import (
    flag_nonfinite,
    for_block,
    launch,
    load,
    locate,
    relative_base,
    role_pointer,
    rounded,
    scratch_pointer,
    store,
    tensor_table,
    zero,
)


@triton.jit
def _fold_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, STAGE: tl.constexpr):
    grad, grad_sum = pointers
    (found_inf,) = scalars
    fold_into(grad, grad_sum, load(grad, offs, mask, STATE), offs, mask, found_inf, STATE, STAGE)


@triton.jit
def fold_into(grad, grad_sum, g, offs, mask, found_inf, STATE: tl.constexpr, STAGE: tl.constexpr):
    """g, a pass's gradient in the state dtype, joins the sum (stage 0: the first pass, 1, 2: the last); also
    IVON's sums over samples (kernels/ivon_accumulate.py)."""
    total = g
    if STAGE != 0:
        total = load(grad_sum, offs, mask, STATE) + total
    if STAGE == 2:  # last sub-batch: the sum, rounded once, for the update
        total = rounded(total, grad.dtype.element_ty)
        flag_nonfinite(total.to(STATE), found_inf)  # as the update reads it: a float16 sum may overflow
        store(grad, offs, total, mask)
    else:
        flag_nonfinite(total, found_inf)
        store(grad_sum, offs, total, mask)
        zero(grad, offs, mask)


@triton.jit
def _fold_grads_kernel(
    table,
    found_inf,
    grad_sum_base,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    STAGE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 2)
    pointers = (
        role_pointer(record, start, 0, PARAM, ALIGNED),
        scratch_pointer(record, start, 1, STATE, ALIGNED, grad_sum_base),
    )
    for_block(_fold_block, pointers, (found_inf,), start, remaining, 0, STATE, STAGE, BLOCK)


def fold_grads(
    grads: list[torch.Tensor], grad_sums: list[torch.Tensor], found_inf: torch.Tensor, *, first: bool, last: bool
) -> None:
    """grad_sums (+)= grads and grads = 0, or (``last``) grads = grad_sums + grads; found_inf = 1 if a
    gradient is inf or NaN. One launch. ``first`` and ``last`` are exclusive (splits > 1)."""
    stage = 0 if first else 2 if last else 1
    table = tensor_table([grads, grad_sums], FOLD_GRADS.kinds)
    launch(_fold_grads_kernel, table, found_inf, relative_base(grad_sums), STAGE=stage)
