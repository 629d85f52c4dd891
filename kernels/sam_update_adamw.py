"""SAM with an AdamW base: AdamW on the mean perturbed-point gradient, then θ = w, in one pass;
on a skipped step (found-inf set) the state stays and θ = w. The gradient buffer is zeroed.

Bytes per parameter: reads the gradient sum (param dtype), w, momentum and
variance (state); writes w, momentum, variance (state), θ and the zeroed sum:
36 B for float32 parameters. Minimal: each state word is read and written once.
The bias corrections come from the step count, a 0-dim device tensor (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import SAM_UPDATE_ADAMW, step_args
from ._multi_tensor import (
    div,
    for_block,
    launch,
    load,
    locate,
    role_pointer,
    scalar,
    sqrt,
    step_value,
    store,
    tensor_table,
    zero,
)


@triton.jit
def _adamw_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, OPTION: tl.constexpr):
    param, grad_sum, weight, momentum, variance = pointers
    run, inv_scale, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, bias2, eps, step_size, splits = scalars
    # every load before the first branch, so that they go out in one wave (a skipped step reads and drops them)
    w = load(weight, offs, mask, STATE)
    g = load(grad_sum, offs, mask, STATE)
    m = load(momentum, offs, mask, STATE)
    v = load(variance, offs, mask, STATE)
    if run:
        h = div(g * inv_scale, splits)
        # decoupled weight decay
        w = w * decay
        m = beta1 * m + one_minus_beta1 * h
        v = beta2 * v + one_minus_beta2 * h * h
        denom = sqrt(div(v, bias2)) + eps
        w = w - div(step_size * m, denom)
        store(momentum, offs, m, mask)
        store(variance, offs, v, mask)
        store(weight, offs, w, mask)
    store(param, offs, w, mask)
    zero(grad_sum, offs, mask)


@triton.jit
def _sam_update_adamw_kernel(
    table,
    found_inf,
    inv_scale_ptr,
    corrections_ptr,
    decay: tl.float64,
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    eps: tl.float64,
    splits,
    decay_ptr,  # None, or 1 − lr·δ in device memory (a tensor lr: capturable)
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
        tl.load(found_inf) == 0,  # not a skipped step
        tl.load(inv_scale_ptr).to(STATE),
        scalar(step_value(decay, decay_ptr), STATE),
        scalar(beta1, STATE),
        scalar(one_minus_beta1, STATE),
        scalar(beta2, STATE),
        scalar(one_minus_beta2, STATE),
        tl.load(corrections_ptr).to(STATE),  # 1 − β2^step
        scalar(eps, STATE),
        tl.load(corrections_ptr + 1).to(STATE),  # lr / (1 − β1^step)
        tl.cast(splits, STATE),
    )
    for_block(_adamw_block, pointers, scalars, start, remaining, 0, STATE, False, BLOCK)


def sam_update_adamw(
    params: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    weights: list[torch.Tensor],
    momentums: list[torch.Tensor],
    variances: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    splits: int,
) -> None:
    """AdamW on grad_sum·inv_scale/splits, then θ = w, grad_sums zeroed, for every tensor (found_inf set:
    θ = w and grad_sums zeroed only). ``step``: float64 0-dim device tensor, updates taken counting this one.
    ``lr`` may be a one-element float64 tensor on the device, read on the device (CUDA-graph capture)."""
    table = tensor_table([params, grad_sums, weights, momentums, variances], SAM_UPDATE_ADAMW.kinds)
    # the bias corrections of this step, on the device, in float64 as the host would compute them
    corrections = torch.stack([1 - beta2**step, lr / (1 - beta1**step)])
    decay, decay_ptr = step_args(1 - lr * weight_decay, float)
    scalars = (decay, beta1, 1 - beta1, beta2, 1 - beta2, eps)
    launch(
        _sam_update_adamw_kernel,
        table,
        found_inf,
        inv_scale,
        corrections,
        *(float(x) for x in scalars),
        int(splits),
        decay_ptr,
    )
