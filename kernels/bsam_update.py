"""bSAM update: momentum, mean (with the old precision), precision and θ = m in one pass,
with the means over sub-batches folded in; on a skipped step (the step's found-inf flag
is set) the state stays as it was and θ = m. The gradient buffer is zeroed for the next step.

Bytes per parameter: reads h (the perturbed-gradient sum, param dtype), m, s, g_m and
the curvature sum (state); writes g_m, m, s (state), θ and the zeroed h (param dtype).
float32: 40 B; bfloat16/float16: 34 B. Minimal for the state layout: the three state
words are read and written once each, the sums are read once, the parameter written once.

With s and g_m stored in bfloat16 (``BSAM(state_dtype=torch.bfloat16)``; the mean stays
float32) 8 B less: float32 params 32 B (reads h 4, m 4, s 2, g_m 2, curvature 4; writes g_m 2,
m 4, s 2, θ 4, zeroed h 4), bfloat16/float16 26 B. They are computed in float32 and stored with
stochastic rounding: element i of the group takes word w = word (i mod 4) of Philox4x32-10(seed,
counter i div 4), and bf16 = (float32 bits + r) >> 16 with r = w >> 16 for s, w & 0xFFFF for g_m.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import BSAM_UPDATE, step_args
from ._multi_tensor import (
    div,
    for_block,
    launch,
    load,
    locate,
    relative_base,
    role_pointer,
    scalar,
    scratch_pointer,
    step_value,
    store,
    store_stochastic,
    tensor_table,
    words_block,
    zero,
)


@triton.jit
def _update_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, STORED: tl.constexpr):
    param, grad_sum, mean, precision, momentum, curvature_sum = pointers
    run, inv_scale, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, damping, inv_splits, seed = (
        scalars
    )
    # every load before the first branch, so that they go out in one wave (a skipped step reads and drops them)
    m = load(mean, offs, mask, STATE)
    grad_sum_block = load(grad_sum, offs, mask, STATE)
    curvature = load(curvature_sum, offs, mask, STATE)
    s = load(precision, offs, mask, STATE, 1.0)
    g_m = load(momentum, offs, mask, STATE)
    if run:
        # the means over the sub-batches: x·(1/k), the reciprocal from the host (x / k for k a power of two)
        h = grad_sum_block * inv_scale * inv_splits
        a = curvature * inv_splits
        # momentum
        g_m = beta1 * g_m + one_minus_beta1 * (h + weight_decay * m)
        # mean step, divided by the precision before this step's update
        m = m - div(lr * g_m, s)
        # precision
        s = beta2 * s + one_minus_beta2 * (a + weight_decay + damping)
        if STORED == tl.bfloat16:
            # stochastic rounding: one Philox word per element (noise_index: a multiple of 4), its
            # low half for the momentum, its high half for the precision
            word = words_block(seed, noise_index, offs.shape[0])
            store_stochastic(momentum, offs, g_m, word & 0xFFFF, mask)
            store(mean, offs, m, mask)
            store_stochastic(precision, offs, s, word >> 16, mask)
        else:
            store(momentum, offs, g_m, mask)
            store(mean, offs, m, mask)
            store(precision, offs, s, mask)
    # the model holds the mean between steps (on a skipped step: the old mean)
    store(param, offs, m, mask)
    zero(grad_sum, offs, mask)


@triton.jit
def update_pointers(record, start, curvature_base, PARAM: tl.constexpr, STATE: tl.constexpr, STORED: tl.constexpr,
                    ALIGNED: tl.constexpr):  # fmt: skip
    """The block's pointers into the roles of bSAM's and IVON's updates (phases.POSTERIOR_UPDATE_ROLES): param,
    grad_sum, mean, precision, momentum (STORED: the state dtype or bfloat16), curvature_sum (relative to its
    first tensor)."""
    return (
        role_pointer(record, start, 0, PARAM, ALIGNED),
        role_pointer(record, start, 1, PARAM, ALIGNED),
        role_pointer(record, start, 2, STATE, ALIGNED),
        role_pointer(record, start, 3, STORED, ALIGNED),
        role_pointer(record, start, 4, STORED, ALIGNED),
        scratch_pointer(record, start, 5, STATE, ALIGNED, curvature_base),
    )


@triton.jit(do_not_specialize=["seed"])  # a new seed each step: one compiled variant for all
def _bsam_update_kernel(
    table,
    found_inf,
    inv_scale_ptr,
    lr: tl.float64,
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    weight_decay: tl.float64,
    damping: tl.float64,
    inv_splits: tl.float64,
    curvature_base,
    seed,
    lr_ptr,  # None, or lr in device memory (capturable)
    seed_ptr,  # None, or the seed in device memory (capturable)
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    STORED: tl.constexpr,  # the dtype precision and momentum are stored in: STATE or bfloat16
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, noise_index, record = locate(table, 6)
    pointers = update_pointers(record, start, curvature_base, PARAM, STATE, STORED, ALIGNED)
    scalars = (
        tl.load(found_inf) == 0,  # not a skipped step
        tl.load(inv_scale_ptr).to(STATE),
        scalar(step_value(lr, lr_ptr), STATE),
        scalar(beta1, STATE),
        scalar(one_minus_beta1, STATE),
        scalar(beta2, STATE),
        scalar(one_minus_beta2, STATE),
        scalar(weight_decay, STATE),
        scalar(damping, STATE),
        scalar(inv_splits, STATE),
        step_value(seed, seed_ptr),
    )
    for_block(_update_block, pointers, scalars, start, remaining, noise_index, STATE, STORED, BLOCK)


def bsam_update(
    params: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    means: list[torch.Tensor],
    precisions: list[torch.Tensor],
    momentums: list[torch.Tensor],
    curvature_sums: list[torch.Tensor],
    offsets: list[int],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    damping: float,
    splits: int,
    seed: int | torch.Tensor,
) -> None:
    """The bSAM update of every tensor, one launch per alignment class (see ALGORITHM.md)::

        h = grad_sum·inv_scale / splits ;  a = curvature_sum / splits   (as x·(1/splits): within an ulp)
        momentum  = β1·momentum + (1 − β1)·(h + δ·mean)
        mean      = mean − lr·momentum / precision
        precision = β2·precision + (1 − β2)·(a + δ + γ)
        param     = mean ;  grad_sum = 0

    or, when ``found_inf`` is set, only ``param = mean; grad_sum = 0``. ``params``,
    ``grad_sums``: contiguous, one dtype; the state tensors: contiguous, float64 for
    float64 params, float32 otherwise; ``found_inf``, ``inv_scale``: float32 0-dim tensors.
    ``precisions`` and ``momentums`` may instead both be bfloat16 (float32 state): computed in
    float32, stored with stochastic rounding, element k of tensor i taking word (j mod 4) of
    ``tl.randint4x(seed, j div 4)``, j = offsets[i] + k (0 <= seed < 2^63); float32/float64
    precisions and momentums ignore ``offsets`` and ``seed``. ``lr`` and ``seed`` may be one-element
    float64 / int64 tensors on the device, read by the kernel (CUDA-graph capture).
    """
    roles = [params, grad_sums, means, precisions, momentums, curvature_sums]
    if precisions and precisions[0].dtype == torch.bfloat16:
        # blocks on multiples of 4 in element-index space: BLOCK/4 Philox calls each
        table = tensor_table(roles, BSAM_UPDATE.kinds, offsets, noise_blocks=True)
    else:
        table, seed = tensor_table(roles, BSAM_UPDATE.kinds), 0  # no rounding: one compiled variant whatever the seed
    lr, lr_ptr = step_args(lr, float)
    seed, seed_ptr = step_args(seed, int)
    scalars = (lr, beta1, 1 - beta1, beta2, 1 - beta2, weight_decay, damping)
    launch(
        _bsam_update_kernel,
        table,
        found_inf,
        inv_scale,
        *(float(x) for x in scalars),
        1.0 / int(splits),
        relative_base(curvature_sums),
        seed,
        lr_ptr,
        seed_ptr,
    )
