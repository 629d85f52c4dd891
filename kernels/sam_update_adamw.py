"""SAM with an AdamW base: AdamW on the mean perturbed-point gradient, then θ = w, in one pass.

Bytes per parameter: reads the gradient sum (param dtype), w, momentum and
variance (state); writes w, momentum, variance (state) and θ (param dtype): 32 B
for float32 parameters. Minimal: each state word is read and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import div, for_block, launch, load, locate, role_pointer, scalar, sqrt, store, tensor_table


@triton.jit
def _adamw_block(pointers, offs, mask, scalars, noise_offset, STATE: tl.constexpr, OPTION: tl.constexpr):
    param, grad_sum, weight, momentum, variance = pointers
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, bias2, eps, step_size, splits = scalars
    h = div(load(grad_sum, offs, mask, STATE), splits)
    # decoupled weight decay
    w = load(weight, offs, mask, STATE) * decay
    m = beta1 * load(momentum, offs, mask, STATE) + one_minus_beta1 * h
    v = beta2 * load(variance, offs, mask, STATE) + one_minus_beta2 * h * h
    denom = sqrt(div(v, bias2)) + eps
    w = w - div(step_size * m, denom)
    store(momentum, offs, m, mask)
    store(variance, offs, v, mask)
    store(weight, offs, w, mask)
    store(param, offs, w, mask)


@triton.jit
def _sam_update_adamw_kernel(
    table,
    decay: tl.float64,
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    bias2: tl.float64,
    eps: tl.float64,
    step_size: tl.float64,
    splits,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 5)
    pointers = (
        role_pointer(record, start, 0, PARAM, ALIGNED),
        role_pointer(record, start, 1, PARAM, ALIGNED),
        role_pointer(record, start, 2, STATE, ALIGNED),
        role_pointer(record, start, 3, STATE, ALIGNED),
        role_pointer(record, start, 4, STATE, ALIGNED),
    )
    scalars = (
        scalar(decay, STATE),
        scalar(beta1, STATE),
        scalar(one_minus_beta1, STATE),
        scalar(beta2, STATE),
        scalar(one_minus_beta2, STATE),
        scalar(bias2, STATE),
        scalar(eps, STATE),
        scalar(step_size, STATE),
        tl.cast(splits, STATE),
    )
    for_block(_adamw_block, pointers, scalars, remaining, 0, STATE, False, BLOCK)


def sam_update_adamw(
    params: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    weights: list[torch.Tensor],
    momentums: list[torch.Tensor],
    variances: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    splits: int,
) -> None:
    """AdamW (``step`` counts from 1) on grad_sum/splits, then θ = w, for every tensor in one launch."""
    table = tensor_table([params, grad_sums, weights, momentums, variances])
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    scalars = (1 - lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, bias2, eps, lr / bias1)
    launch(
        _sam_update_adamw_kernel,
        table,
        *(float(x) for x in scalars),
        int(splits),
        param=params[0].dtype,
        state=weights[0].dtype,
    )
