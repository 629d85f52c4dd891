"""IVON accumulation: the gradient g of sample j joins the sums over samples, in the state dtype and
unscaled (the update unscales): grad_sum (+)= g and curvature_sum (+)= z·g (Price's estimator, z the
sample's noise regenerated in-kernel from its seed: never stored) or g² (gradsq). g is checked for inf/NaN
(the step's found-inf flag) and zeroed for the next pass; after the last of several samples the gradient
sum goes back into .grad, rounded once; with one sample (under DDP: each replica's estimate before the
average) .grad keeps g and only the curvature is written.

Bytes per parameter (float32): the first sample 12 B (read g; write both sums, zero g), a middle one 20 B
(read g and both sums; write both, zero g), the last 16 B (read g and both sums; write the curvature sum
and g), the only one 8 B (read g, write the curvature sum). Minimal: each sum is read and written once,
and z costs no traffic (one Philox call per four elements, as in bsam_sample).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import IVON_ACCUMULATE, step_args
from ._multi_tensor import (
    flag_nonfinite,
    for_block,
    launch,
    load,
    locate,
    randn_block,
    relative_base,
    role_pointer,
    scratch_pointer,
    step_value,
    store,
    tensor_table,
)
from .fold_grads import fold_into

#: the stages of a sample's accumulation (``OPTION % 4`` of the block; ``OPTION // 4``: Price's estimator)
FIRST, MIDDLE, LAST, ONLY = 0, 1, 2, 3


@triton.jit
def _accumulate_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, OPTION: tl.constexpr):
    grad, grad_sum, curvature_sum = pointers
    found_inf, seed = scalars
    g = load(grad, offs, mask, STATE)
    # the sample's curvature estimate: Price's theorem (z·g), or the squared gradient
    if OPTION // 4 == 1:
        c = randn_block(seed, noise_index, offs.shape[0]).to(STATE) * g
    else:
        c = g * g
    if (OPTION % 4 == 0) or (OPTION % 4 == 3):  # the first (or only) sample
        store(curvature_sum, offs, c, mask)
    else:
        store(curvature_sum, offs, load(curvature_sum, offs, mask, STATE) + c, mask)
    # the gradient sum over samples, as fold_grads sums sub-batches
    if OPTION % 4 == 3:  # the only sample: .grad keeps g
        flag_nonfinite(g, found_inf)
    else:
        fold_into(grad, grad_sum, g, offs, mask, found_inf, STATE, OPTION % 4)


@triton.jit(do_not_specialize=["seed"])  # a new seed each step: one compiled variant for all
def _ivon_accumulate_kernel(
    table,
    found_inf,
    seed,
    grad_sum_base,
    curvature_base,
    seed_ptr,  # None, or the seed in device memory (capturable)
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    STAGE: tl.constexpr,
    PRICE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, noise_index, record = locate(table, 3)
    pointers = (
        role_pointer(record, start, 0, PARAM, ALIGNED),
        scratch_pointer(record, start, 1, STATE, ALIGNED, grad_sum_base),
        scratch_pointer(record, start, 2, STATE, ALIGNED, curvature_base),
    )
    scalars = (found_inf, step_value(seed, seed_ptr))
    for_block(_accumulate_block, pointers, scalars, start, remaining, noise_index, STATE, 4 * PRICE + STAGE, BLOCK)


def ivon_accumulate(
    grads: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    curvature_sums: list[torch.Tensor],
    offsets: list[int],
    found_inf: torch.Tensor,
    *,
    seed: int | torch.Tensor,
    price: bool,
    first: bool,
    last: bool,
) -> None:
    """For every tensor, one launch per alignment class: curvature_sums (+)= z·g (``price``) or g², and
    grad_sums (+)= g with g zeroed, or (``last``) grads = grad_sums + g (``first`` and ``last``: grads kept);
    found_inf = 1 if that sum (or g) is inf or NaN.

    ``grads``: contiguous, one dtype (float64/32, bf16, fp16); ``grad_sums``, ``curvature_sums``: contiguous,
    float64 for float64 grads, float32 otherwise; ``offsets[i]``: the group element index of tensor i's first
    element (z of element k of tensor i is lane j mod 4 of ``tl.randn4x(seed, j div 4)``, j = offsets[i] + k);
    ``seed``: 0 <= seed < 2^63, or a one-element int64 tensor on the device (CUDA-graph capture), read with
    ``price`` only; ``found_inf``: a float32 0-dim tensor on the device.
    """
    roles = [grads, grad_sums, curvature_sums]
    if price:  # blocks on multiples of 4 in noise space: BLOCK/4 Philox calls each
        table = tensor_table(roles, IVON_ACCUMULATE.kinds, offsets, noise_blocks=True)
    else:
        table, seed = tensor_table(roles, IVON_ACCUMULATE.kinds), 0  # no noise: one compiled variant whatever the seed
    stage = ONLY if first and last else FIRST if first else LAST if last else MIDDLE
    seed, seed_ptr = step_args(seed, int)
    launch(
        _ivon_accumulate_kernel,
        table,
        found_inf,
        seed,
        relative_base(grad_sums),
        relative_base(curvature_sums),
        seed_ptr,
        STAGE=stage,
        PRICE=bool(price),
    )
