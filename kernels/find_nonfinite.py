"""The found-inf check of a gradient sum that no kernel has read yet (the perturbed-point
pass, splits = 1): found_inf = 1 if any element is inf or NaN.

Bytes per parameter: reads the gradient (param dtype): 4 B for float32. This is the one
read the update cannot save: the update writes state from its first block on, so the
step's skip decision must be known before it starts (ALGORITHM.md's state stays untouched
on a skipped step). With splits > 1, ``fold_grads`` checks as it sums instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import FIND_NONFINITE
from ._multi_tensor import flag_nonfinite, for_block, launch, load, locate, role_pointer, tensor_table


@triton.jit
def _check_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, OPTION: tl.constexpr):
    (grad,) = pointers
    (found_inf,) = scalars
    flag_nonfinite(load(grad, offs, mask, STATE), found_inf)


@triton.jit
def _find_nonfinite_kernel(
    table, found_inf, PARAM: tl.constexpr, STATE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
):
    start, remaining, _, record = locate(table, 1)
    pointers = (role_pointer(record, start, 0, PARAM, ALIGNED),)
    for_block(_check_block, pointers, (found_inf,), start, remaining, 0, STATE, False, BLOCK)


def find_nonfinite(grads: list[torch.Tensor], found_inf: torch.Tensor) -> None:
    """found_inf = 1 if any element of ``grads`` (contiguous, one dtype) is inf or NaN, one launch."""
    launch(_find_nonfinite_kernel, tensor_table([grads], FIND_NONFINITE.kinds), found_inf)
