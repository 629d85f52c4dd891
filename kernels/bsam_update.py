"""bSAM update: momentum, mean (with the old precision), precision and θ = m in one pass,
with the means over sub-batches folded in.

Bytes per parameter: reads h (the perturbed-gradient sum, param dtype), m, s,
g_m and the curvature sum (state); writes g_m, m, s (state) and θ (param dtype).
float32: 36 B; bfloat16/float16: 32 B. Minimal for the state layout: the three
state words are read and written once each, the gradient sum and the curvature
sum are read once, and the parameter is written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import div, for_block, launch, load, locate, role_pointer, scalar, store, tensor_table


@triton.jit
def _update_block(pointers, offs, mask, scalars, noise_offset, STATE: tl.constexpr, OPTION: tl.constexpr):
    param, grad_sum, mean, precision, momentum, curvature_sum = pointers
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, damping, splits = scalars
    # the means over the sub-batches
    h = div(load(grad_sum, offs, mask, STATE), splits)
    a = div(load(curvature_sum, offs, mask, STATE), splits)
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
    lr: tl.float64,
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    weight_decay: tl.float64,
    damping: tl.float64,
    splits,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 6)
    pointers = (
        role_pointer(record, start, 0, PARAM, ALIGNED),
        role_pointer(record, start, 1, PARAM, ALIGNED),
        role_pointer(record, start, 2, STATE, ALIGNED),
        role_pointer(record, start, 3, STATE, ALIGNED),
        role_pointer(record, start, 4, STATE, ALIGNED),
        role_pointer(record, start, 5, STATE, ALIGNED),
    )
    scalars = (
        scalar(lr, STATE),
        scalar(beta1, STATE),
        scalar(one_minus_beta1, STATE),
        scalar(beta2, STATE),
        scalar(one_minus_beta2, STATE),
        scalar(weight_decay, STATE),
        scalar(damping, STATE),
        tl.cast(splits, STATE),
    )
    for_block(_update_block, pointers, scalars, remaining, 0, STATE, False, BLOCK)


def bsam_update(
    params: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    means: list[torch.Tensor],
    precisions: list[torch.Tensor],
    momentums: list[torch.Tensor],
    curvature_sums: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    damping: float,
    splits: int,
) -> None:
    """The bSAM update of every tensor, one launch (see ALGORITHM.md)::

        h = grad_sum / splits ;  a = curvature_sum / splits
        momentum  = β1·momentum + (1 − β1)·(h + δ·mean)
        mean      = mean − lr·momentum / precision
        precision = β2·precision + (1 − β2)·(a + δ + γ)
        param     = mean

    ``params``, ``grad_sums`` (sum over sub-batches of the perturbed-point gradients):
    contiguous, one dtype; the state tensors: contiguous, float64 for float64 params,
    float32 otherwise.
    """
    table = tensor_table([params, grad_sums, means, precisions, momentums, curvature_sums])
    scalars = (lr, beta1, 1 - beta1, beta2, 1 - beta2, weight_decay, damping)
    launch(
        _bsam_update_kernel,
        table,
        *(float(x) for x in scalars),
        int(splits),
        param=params[0].dtype,
        state=means[0].dtype,
    )
