"""bSAM update: momentum, mean (with the old precision), precision and θ = m in one pass,
with the average over sub-batches folded in.

Bytes per parameter: reads h (the perturbed-gradient sum, param dtype), m, s,
g_m and the statistic (state); writes g_m, m, s (state) and θ (param dtype).
float32: 36 B; bfloat16/float16: 32 B. Minimal for the state layout: the three
state words are read and written once each, the gradient sum and the statistic
are read once, and the parameter is written once.
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
    store,
    tensor_table,
)


@triton.jit
def _update_block(
    param,
    grad,
    mean,
    precision,
    momentum,
    stat,
    offs,
    mask,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    weight_decay,
    damping,
    splits,
    STATE: tl.constexpr,
):
    h = div(load(grad, offs, mask, STATE), splits)
    a = div(load(stat, offs, mask, STATE), splits)
    m = load(mean, offs, mask, STATE)
    s = load(precision, offs, mask, STATE, 1.0)
    g_m = load(momentum, offs, mask, STATE)
    # momentum
    g_m = beta1 * g_m + one_minus_beta1 * (h + weight_decay * m)
    # mean step, divided by the precision before this step's update
    m = m - div(lr * g_m, s)
    # precision
    s = beta2 * s + one_minus_beta2 * (a + weight_decay + damping)
    store(momentum, offs, g_m, mask)
    store(mean, offs, m, mask)
    store(precision, offs, s, mask)
    # the model holds the mean between steps
    store(param, offs, m, mask)


@triton.jit
def _bsam_update_kernel(
    table,
    lr_hi,
    lr_lo,
    beta1_hi,
    beta1_lo,
    one_minus_beta1_hi,
    one_minus_beta1_lo,
    beta2_hi,
    beta2_lo,
    one_minus_beta2_hi,
    one_minus_beta2_lo,
    weight_decay_hi,
    weight_decay_lo,
    damping_hi,
    damping_lo,
    splits,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 6)
    param = role_pointer(record, start, 0, PARAM, ALIGNED)
    grad = role_pointer(record, start, 1, PARAM, ALIGNED)
    mean = role_pointer(record, start, 2, STATE, ALIGNED)
    precision = role_pointer(record, start, 3, STATE, ALIGNED)
    momentum = role_pointer(record, start, 4, STATE, ALIGNED)
    stat = role_pointer(record, start, 5, STATE, ALIGNED)
    lr = scalar(lr_hi, lr_lo, STATE)
    beta1 = scalar(beta1_hi, beta1_lo, STATE)
    one_minus_beta1 = scalar(one_minus_beta1_hi, one_minus_beta1_lo, STATE)
    beta2 = scalar(beta2_hi, beta2_lo, STATE)
    one_minus_beta2 = scalar(one_minus_beta2_hi, one_minus_beta2_lo, STATE)
    weight_decay = scalar(weight_decay_hi, weight_decay_lo, STATE)
    damping = scalar(damping_hi, damping_lo, STATE)
    k = tl.cast(splits, STATE)
    offs = tl.arange(0, BLOCK)
    if remaining >= BLOCK:  # full block: no mask, so loads and stores vectorize
        _update_block(
            param,
            grad,
            mean,
            precision,
            momentum,
            stat,
            offs,
            None,
            lr,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            weight_decay,
            damping,
            k,
            STATE,
        )
    else:
        _update_block(
            param,
            grad,
            mean,
            precision,
            momentum,
            stat,
            offs,
            offs < remaining,
            lr,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            weight_decay,
            damping,
            k,
            STATE,
        )


def bsam_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    means: list[torch.Tensor],
    precisions: list[torch.Tensor],
    momentums: list[torch.Tensor],
    stats: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    damping: float,
    splits: int,
) -> None:
    """The bSAM update of every tensor, one launch (see ALGORITHM.md)::

        h = grad / splits ;  a = stat / splits
        momentum  = β1·momentum + (1 − β1)·(h + δ·mean)
        mean      = mean − lr·momentum / precision
        precision = β2·precision + (1 − β2)·(a + δ + γ)
        param     = mean

    ``params``, ``grads`` (sum over sub-batches of the perturbed-point gradients):
    contiguous, one dtype; the state tensors: contiguous, float64 for float64
    params, float32 otherwise.
    """
    table = tensor_table([params, grads, means, precisions, momentums, stats])
    if table.num_blocks == 0:
        return
    scalars = (lr, beta1, 1 - beta1, beta2, 1 - beta2, weight_decay, damping)
    _bsam_update_kernel[(table.num_blocks,)](
        table.table,
        *(part for x in scalars for part in split_float(x)),
        int(splits),
        PARAM=TL_DTYPES[params[0].dtype],
        STATE=TL_DTYPES[means[0].dtype],
        ALIGNED=table.aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
