"""SAM: the global gradient norm (two-stage reduction), the ascent, and the
restore + SGD-momentum or AdamW update, each in one pass.

Bytes per parameter (float32 parameters; bfloat16/float16 parameters save 2 B
per parameter word):

=============  ==================================  ==========
kernel         reads / writes                      float32
=============  ==================================  ==========
sq_norm        g (+ w if adaptive)                 4 B (8 B)
perturb        g, w / θ                            12 B
update_sgd     g, w, buf / w, buf, θ               24 B
update_adamw   g, w, m, v / w, m, v, θ             32 B
=============  ==================================  ==========

Minimal for the layout: the norm needs every gradient before any parameter can
move, so the ascent is a second pass over g; the update reads and writes each
state word once and writes θ once. The norm's partial sums (one per block) are
reduced on the device, so no host synchronisation is needed.
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
    sqrt,
    store,
    tensor_table,
)


@triton.jit
def _sq_norm_block(grad, weight, offs, mask, STATE: tl.constexpr, ADAPTIVE: tl.constexpr):
    tg = load(grad, offs, mask, STATE)
    if ADAPTIVE:
        tg = tg * tl.abs(load(weight, offs, mask, STATE))
    # masked lanes read 0 and add nothing
    return tl.sum(tg * tg, axis=0)


@triton.jit
def _sq_norm_kernel(
    table,
    partials,
    STATE: tl.constexpr,
    GRAD: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 2)
    grad = role_pointer(record, start, 0, GRAD, ALIGNED)
    weight = role_pointer(record, start, 1, STATE, ALIGNED)
    offs = tl.arange(0, BLOCK)
    if remaining >= BLOCK:  # full block: no mask, so loads vectorize
        partial = _sq_norm_block(grad, weight, offs, None, STATE, ADAPTIVE)
    else:
        partial = _sq_norm_block(grad, weight, offs, offs < remaining, STATE, ADAPTIVE)
    # first stage: one partial sum per block
    tl.store(partials + tl.program_id(0), partial)


@triton.jit
def _perturb_block(param, grad, weight, offs, mask, scale, STATE: tl.constexpr, ADAPTIVE: tl.constexpr):
    g = load(grad, offs, mask, STATE)
    w = load(weight, offs, mask, STATE)
    # adversarial point: w + ρ·T²·g/‖T·g‖
    if ADAPTIVE:
        store(param, offs, w + scale * (w * w) * g, mask)
    else:
        store(param, offs, w + scale * g, mask)


@triton.jit
def _perturb_kernel(
    table,
    scale_ptr,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 3)
    param = role_pointer(record, start, 0, PARAM, ALIGNED)
    grad = role_pointer(record, start, 1, PARAM, ALIGNED)
    weight = role_pointer(record, start, 2, STATE, ALIGNED)
    scale = tl.load(scale_ptr).to(STATE)
    offs = tl.arange(0, BLOCK)
    if remaining >= BLOCK:  # full block: no mask, so loads and stores vectorize
        _perturb_block(param, grad, weight, offs, None, scale, STATE, ADAPTIVE)
    else:
        _perturb_block(param, grad, weight, offs, offs < remaining, scale, STATE, ADAPTIVE)


@triton.jit
def _sgd_block(
    param,
    grad,
    weight,
    buf,
    offs,
    mask,
    lr,
    momentum,
    weight_decay,
    splits,
    STATE: tl.constexpr,
    NESTEROV: tl.constexpr,
):
    w = load(weight, offs, mask, STATE)
    d = div(load(grad, offs, mask, STATE), splits) + weight_decay * w
    # heavy ball, no dampening
    b = momentum * load(buf, offs, mask, STATE) + d
    if NESTEROV:
        w = w - lr * (d + momentum * b)
    else:
        w = w - lr * b
    store(buf, offs, b, mask)
    store(weight, offs, w, mask)
    store(param, offs, w, mask)


@triton.jit
def _sgd_kernel(
    table,
    lr_hi,
    lr_lo,
    momentum_hi,
    momentum_lo,
    weight_decay_hi,
    weight_decay_lo,
    splits,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 4)
    param = role_pointer(record, start, 0, PARAM, ALIGNED)
    grad = role_pointer(record, start, 1, PARAM, ALIGNED)
    weight = role_pointer(record, start, 2, STATE, ALIGNED)
    buf = role_pointer(record, start, 3, STATE, ALIGNED)
    lr = scalar(lr_hi, lr_lo, STATE)
    momentum = scalar(momentum_hi, momentum_lo, STATE)
    weight_decay = scalar(weight_decay_hi, weight_decay_lo, STATE)
    k = tl.cast(splits, STATE)
    offs = tl.arange(0, BLOCK)
    if remaining >= BLOCK:  # full block: no mask, so loads and stores vectorize
        _sgd_block(param, grad, weight, buf, offs, None, lr, momentum, weight_decay, k, STATE, NESTEROV)
    else:
        _sgd_block(param, grad, weight, buf, offs, offs < remaining, lr, momentum, weight_decay, k, STATE, NESTEROV)


@triton.jit
def _adamw_block(
    param,
    grad,
    weight,
    exp_avg,
    exp_avg_sq,
    offs,
    mask,
    decay,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    bias2,
    eps,
    step_size,
    splits,
    STATE: tl.constexpr,
):
    h = div(load(grad, offs, mask, STATE), splits)
    # decoupled weight decay
    w = load(weight, offs, mask, STATE) * decay
    m = beta1 * load(exp_avg, offs, mask, STATE) + one_minus_beta1 * h
    v = beta2 * load(exp_avg_sq, offs, mask, STATE) + one_minus_beta2 * h * h
    denom = sqrt(div(v, bias2)) + eps
    w = w - div(step_size * m, denom)
    store(exp_avg, offs, m, mask)
    store(exp_avg_sq, offs, v, mask)
    store(weight, offs, w, mask)
    store(param, offs, w, mask)


@triton.jit
def _adamw_kernel(
    table,
    decay_hi,
    decay_lo,
    beta1_hi,
    beta1_lo,
    one_minus_beta1_hi,
    one_minus_beta1_lo,
    beta2_hi,
    beta2_lo,
    one_minus_beta2_hi,
    one_minus_beta2_lo,
    bias2_hi,
    bias2_lo,
    eps_hi,
    eps_lo,
    step_size_hi,
    step_size_lo,
    splits,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 5)
    param = role_pointer(record, start, 0, PARAM, ALIGNED)
    grad = role_pointer(record, start, 1, PARAM, ALIGNED)
    weight = role_pointer(record, start, 2, STATE, ALIGNED)
    exp_avg = role_pointer(record, start, 3, STATE, ALIGNED)
    exp_avg_sq = role_pointer(record, start, 4, STATE, ALIGNED)
    decay = scalar(decay_hi, decay_lo, STATE)
    beta1 = scalar(beta1_hi, beta1_lo, STATE)
    one_minus_beta1 = scalar(one_minus_beta1_hi, one_minus_beta1_lo, STATE)
    beta2 = scalar(beta2_hi, beta2_lo, STATE)
    one_minus_beta2 = scalar(one_minus_beta2_hi, one_minus_beta2_lo, STATE)
    bias2 = scalar(bias2_hi, bias2_lo, STATE)
    eps = scalar(eps_hi, eps_lo, STATE)
    step_size = scalar(step_size_hi, step_size_lo, STATE)
    k = tl.cast(splits, STATE)
    offs = tl.arange(0, BLOCK)
    if remaining >= BLOCK:  # full block: no mask, so loads and stores vectorize
        _adamw_block(
            param,
            grad,
            weight,
            exp_avg,
            exp_avg_sq,
            offs,
            None,
            decay,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            bias2,
            eps,
            step_size,
            k,
            STATE,
        )
    else:
        _adamw_block(
            param,
            grad,
            weight,
            exp_avg,
            exp_avg_sq,
            offs,
            offs < remaining,
            decay,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            bias2,
            eps,
            step_size,
            k,
            STATE,
        )


def sam_sq_norm(grads: list[torch.Tensor], weights: list[torch.Tensor], *, adaptive: bool) -> torch.Tensor:
    """Σ (T·g)² over all tensors (T = |w| if adaptive else 1) as a 0-dim tensor in the state dtype.

    Two stages, both on the device: one partial sum per block, then their sum.
    """
    table = tensor_table([grads, weights])
    state = weights[0].dtype
    if table.num_blocks == 0:
        return torch.zeros((), dtype=state, device=weights[0].device)
    partials = torch.empty(table.num_blocks, dtype=state, device=weights[0].device)
    _sq_norm_kernel[(table.num_blocks,)](
        table.table,
        partials,
        STATE=TL_DTYPES[state],
        GRAD=TL_DTYPES[grads[0].dtype],
        ADAPTIVE=bool(adaptive),
        ALIGNED=table.aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    # second stage
    return partials.sum()


def sam_perturb(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    weights: list[torch.Tensor],
    *,
    scale: torch.Tensor,
    adaptive: bool,
) -> None:
    """θ_i = w_i + scale·T_i²·g_i for every tensor, one launch; ``scale`` = ρ/‖T·g‖₂ is a
    0-dim device tensor (read in-kernel: no host synchronisation)."""
    table = tensor_table([params, grads, weights])
    if table.num_blocks == 0:
        return
    _perturb_kernel[(table.num_blocks,)](
        table.table,
        scale,
        PARAM=TL_DTYPES[params[0].dtype],
        STATE=TL_DTYPES[weights[0].dtype],
        ADAPTIVE=bool(adaptive),
        ALIGNED=table.aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )


def sam_update_sgd(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    weights: list[torch.Tensor],
    momentums: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    splits: int,
) -> None:
    """Heavy ball on grad/splits + δ·w, then θ = w, for every tensor in one launch."""
    table = tensor_table([params, grads, weights, momentums])
    if table.num_blocks == 0:
        return
    _sgd_kernel[(table.num_blocks,)](
        table.table,
        *split_float(lr),
        *split_float(momentum),
        *split_float(weight_decay),
        int(splits),
        PARAM=TL_DTYPES[params[0].dtype],
        STATE=TL_DTYPES[weights[0].dtype],
        NESTEROV=bool(nesterov),
        ALIGNED=table.aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )


def sam_update_adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
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
    """AdamW (``step`` counts from 1) on grad/splits, then θ = w, for every tensor in one launch."""
    table = tensor_table([params, grads, weights, momentums, variances])
    if table.num_blocks == 0:
        return
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    scalars = (1 - lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, bias2, eps, lr / bias1)
    _adamw_kernel[(table.num_blocks,)](
        table.table,
        *(part for x in scalars for part in split_float(x)),
        int(splits),
        PARAM=TL_DTYPES[params[0].dtype],
        STATE=TL_DTYPES[weights[0].dtype],
        ALIGNED=table.aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
