"""SAM-SGD update: heavy ball (optionally Nesterov) on the mean perturbed-point gradient, then
θ = w, in one pass; on a skipped step (found-inf set) the state stays and θ = w. The gradient
buffer is zeroed for the next step.

Bytes per parameter: reads the gradient sum (param dtype), w and the buffer (state);
writes w, the buffer (state), θ and the zeroed sum (param dtype): 28 B for float32
parameters. Minimal: each state word is read and written once, θ written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import SAM_UPDATE_SGD, step_args
from ._multi_tensor import (
    div,
    for_block,
    launch,
    load,
    locate,
    role_pointer,
    scalar,
    step_value,
    store,
    tensor_table,
    zero,
)


@triton.jit
def _sgd_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, NESTEROV: tl.constexpr):
    param, grad_sum, weight, momentum_buffer = pointers
    run, inv_scale, lr, momentum, weight_decay, splits = scalars
    # every load before the first branch, so that they go out in one wave (a skipped step reads and drops them)
    w = load(weight, offs, mask, STATE)
    h = load(grad_sum, offs, mask, STATE)
    b = load(momentum_buffer, offs, mask, STATE)
    if run:
        d = div(h * inv_scale, splits) + weight_decay * w
        # heavy ball, no dampening
        b = momentum * b + d
        # nesterov looks ahead along the new buffer
        if NESTEROV:
            w = w - lr * (d + momentum * b)
        else:
            w = w - lr * b
        store(momentum_buffer, offs, b, mask)
        store(weight, offs, w, mask)
    store(param, offs, w, mask)
    zero(grad_sum, offs, mask)


@triton.jit
def _sam_update_sgd_kernel(
    table,
    found_inf,
    inv_scale_ptr,
    lr: tl.float64,
    momentum: tl.float64,
    weight_decay: tl.float64,
    splits,
    lr_ptr,  # None, or lr in device memory (capturable)
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 4)
    pointers = (
        role_pointer(record, start, 0, PARAM, ALIGNED),
        role_pointer(record, start, 1, PARAM, ALIGNED),
        role_pointer(record, start, 2, STATE, ALIGNED),
        role_pointer(record, start, 3, STATE, ALIGNED),
    )
    scalars = (
        tl.load(found_inf) == 0,  # not a skipped step
        tl.load(inv_scale_ptr).to(STATE),
        scalar(step_value(lr, lr_ptr), STATE),
        scalar(momentum, STATE),
        scalar(weight_decay, STATE),
        tl.cast(splits, STATE),
    )
    for_block(_sgd_block, pointers, scalars, start, remaining, 0, STATE, NESTEROV, BLOCK)


def sam_update_sgd(
    params: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    weights: list[torch.Tensor],
    momentums: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    splits: int,
) -> None:
    """Heavy ball on grad_sum·inv_scale/splits + δ·w, then θ = w, grad_sums zeroed, for every tensor
    (found_inf set: θ = w and grad_sums zeroed only). ``lr`` may be a one-element float64 tensor on the
    device, read by the kernel (CUDA-graph capture)."""
    table = tensor_table([params, grad_sums, weights, momentums], SAM_UPDATE_SGD.kinds)
    lr, lr_ptr = step_args(lr, float)
    launch(
        _sam_update_sgd_kernel,
        table,
        found_inf,
        inv_scale,
        lr,
        float(momentum),
        float(weight_decay),
        int(splits),
        lr_ptr,
        NESTEROV=bool(nesterov),
    )
