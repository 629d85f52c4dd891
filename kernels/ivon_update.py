"""IVON update: momentum, Hessian h = s − δ (with the correction that keeps it positive), then the mean with
the new precision s = h + δ, clipped, and θ = m, in one pass, with the means over samples folded in; on a
skipped step (the step's found-inf flag is set) the state stays as it was and θ = m. The gradient buffer is
zeroed for the next step. With one sample on one replica (``summed`` False) the curvature estimate comes from
the gradient itself and, for Price's estimator, the sample's noise regenerated in-kernel: no sum is kept.

Bytes per parameter: reads h (the gradient sum, param dtype), m, s, g_m and, summed, the curvature sum
(state); writes g_m, m, s (state), θ and the zeroed h (param dtype). float32: 40 B summed, 36 B for one
sample; bfloat16/float16 parameters 6 B less. Minimal for the state layout: the three state words are read
and written once each, the sums read once, the parameter written once.

With s and g_m stored in bfloat16 (``IVON(state_dtype=torch.bfloat16)``) 8 B less: float32 params 32 B
summed, 28 B for one sample. They are computed in float32 and stored with stochastic rounding, as in
bsam_update: element i takes word i mod 4 of Philox4x32-10(seed, counter i div 4), its high half for s, its
low half for g_m.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import IVON_UPDATE, step_args
from ._multi_tensor import (
    div_approx,
    for_block,
    launch,
    load,
    locate,
    randn_block,
    relative_base,
    scalar,
    sqrt_approx,
    step_value,
    store,
    store_stochastic,
    tensor_table,
    words_block,
    zero,
)
from .bsam_update import update_pointers


@triton.jit
def _update_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, OPTION: tl.constexpr):
    param, grad_sum, mean, precision, momentum, curvature_sum = pointers
    (run, inv_scale, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, half_sq, ess, weight_decay, radius,
     inv_bias1, inv_splits, noise_seed, seed) = scalars  # fmt: skip
    m = load(mean, offs, mask, STATE)
    if run:
        # the mean gradient over the k samples, unscaled (as x·(1/k): within an ulp, two divisions fewer)
        g = load(grad_sum, offs, mask, STATE) * inv_scale * inv_splits
        # the mean curvature estimate: from the sums (gradsq's squares unscaled twice), or the one sample's
        if OPTION // 2 == 1:
            c = load(curvature_sum, offs, mask, STATE) * inv_scale
            if OPTION % 2 == 0:
                c = c * inv_scale
            c = c * inv_splits
        elif OPTION % 2 == 1:
            c = randn_block(noise_seed, noise_index, offs.shape[0]).to(STATE) * g
        else:
            c = g * g
        s = load(precision, offs, mask, STATE, 1.0)  # masked lanes: no division by zero; bfloat16: exact
        g_m = load(momentum, offs, mask, STATE)
        h = s - weight_decay
        # the expected Hessian of the loss: sqrt(ess·s)·E[z·g], or ess·E[g²]
        if OPTION % 2 == 1:
            f = sqrt_approx(ess * s) * c
        else:
            f = ess * c
        # momentum
        g_m = beta1 * g_m + one_minus_beta1 * g
        # Hessian, with the correction that keeps it positive
        gap = h - f
        h = beta2 * h + one_minus_beta2 * f + div_approx(half_sq * (gap * gap), s)
        s = h + weight_decay
        # mean step, with the new precision, clipped (a NaN stays a NaN)
        direction = div_approx(g_m * inv_bias1 + weight_decay * m, s)
        direction = tl.where(direction < -radius, -radius, tl.where(direction > radius, radius, direction))
        m = m - lr * direction
        if precision.dtype.element_ty == tl.bfloat16:
            # stochastic rounding: one Philox word per element (noise_index: a multiple of 4), its low half
            # for the momentum, its high half for the precision
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


@triton.jit(do_not_specialize=["noise_seed", "seed"])  # a new seed each step: one compiled variant for all
def _ivon_update_kernel(
    table,
    found_inf,
    inv_scale_ptr,
    corrections_ptr,  # 1 − β1^t (or 1 without debiasing), float64 on the device
    lr: tl.float64,
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    half_one_minus_beta2_squared: tl.float64,
    ess: tl.float64,
    weight_decay: tl.float64,
    clip_radius: tl.float64,
    inv_splits: tl.float64,
    curvature_base,
    noise_seed,
    seed,
    lr_ptr,  # None, or lr in device memory (capturable)
    noise_seed_ptr,  # None, or the one sample's noise seed in device memory (capturable)
    seed_ptr,  # None, or the rounding seed in device memory (capturable)
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    STORED: tl.constexpr,  # the dtype precision and momentum are stored in: STATE or bfloat16
    SUMMED: tl.constexpr,
    PRICE: tl.constexpr,
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
        scalar(half_one_minus_beta2_squared, STATE),
        scalar(ess, STATE),
        scalar(weight_decay, STATE),
        scalar(clip_radius, STATE),
        (1.0 / tl.load(corrections_ptr)).to(STATE),  # in float64: one division per program
        scalar(inv_splits, STATE),
        step_value(noise_seed, noise_seed_ptr),
        step_value(seed, seed_ptr),
    )
    for_block(_update_block, pointers, scalars, start, remaining, noise_index, STATE, 2 * SUMMED + PRICE, BLOCK)


def ivon_update(
    params: list[torch.Tensor],
    grad_sums: list[torch.Tensor],
    means: list[torch.Tensor],
    precisions: list[torch.Tensor],
    momentums: list[torch.Tensor],
    curvature_sums: list[torch.Tensor],
    offsets: list[int],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    ess: float,
    weight_decay: float,
    clip_radius: float,
    debias: bool,
    price: bool,
    summed: bool,
    splits: int,
    noise_seed: int | torch.Tensor,
    seed: int | torch.Tensor,
) -> None:
    """The IVON update of every tensor, one launch per alignment class (docs/ivon.md)::

        g = grad_sum·inv_scale / splits
        c = curvature_sum·inv_scale / splits (price) or ·inv_scale² / splits (gradsq); not summed: z·g or g²
        (the divisions by splits and by 1 − β1^step as products with the reciprocals: within an ulp)
        f = sqrt(ess·precision)·c (price) or ess·c ;  h = precision − δ
        momentum  = β1·momentum + (1 − β1)·g
        precision = β2·h + (1 − β2)·f + ½(1 − β2)²·(h − f)²/precision + δ
        mean      = mean − lr·clip((momentum/(1 − β1^step) + δ·mean)/precision, ±clip_radius)
        param     = mean ;  grad_sum = 0

    or, when ``found_inf`` is set, only ``param = mean; grad_sum = 0``. ``params``, ``grad_sums``:
    contiguous, one dtype; the state tensors: contiguous, float64 for float64 params, float32 otherwise
    (``precisions`` and ``momentums`` may both be bfloat16 instead: stored with stochastic rounding from the
    stream ``seed``, element k of tensor i taking word (j mod 4) of ``tl.randint4x(seed, j div 4)``, j =
    offsets[i] + k); ``curvature_sums``: not read unless ``summed``; ``noise_seed``: the one sample's noise
    (not summed, ``price``), z at the same element index j. ``found_inf``, ``inv_scale``: float32 0-dim
    tensors; ``step``: float64 0-dim, updates taken counting this one. ``lr``, ``noise_seed`` and ``seed`` may
    be one-element float64 / int64 tensors on the device, read by the kernel (CUDA-graph capture).
    """
    roles = [params, grad_sums, means, precisions, momentums, curvature_sums]
    noise, rounding = price and not summed, bool(precisions) and precisions[0].dtype == torch.bfloat16
    if noise or rounding:  # blocks on multiples of 4 in element-index space: BLOCK/4 Philox calls each
        table = tensor_table(roles, IVON_UPDATE.kinds, offsets, noise_blocks=True)
    else:
        table = tensor_table(roles, IVON_UPDATE.kinds)
    noise_seed = noise_seed if noise else 0  # unused seeds: one compiled variant whatever they are
    seed = seed if rounding else 0
    # the debiasing of this step, on the device, in float64 as the host would compute it
    corrections = 1 - beta1**step if debias else torch.ones_like(step)
    lr, lr_ptr = step_args(lr, float)
    noise_seed, noise_seed_ptr = step_args(noise_seed, int)
    seed, seed_ptr = step_args(seed, int)
    scalars = (lr, beta1, 1 - beta1, beta2, 1 - beta2, 0.5 * (1 - beta2) ** 2, ess, weight_decay, clip_radius)
    launch(
        _ivon_update_kernel,
        table,
        found_inf,
        inv_scale,
        corrections,
        *(float(x) for x in scalars),
        1.0 / int(splits),
        relative_base(curvature_sums),
        noise_seed,
        seed,
        lr_ptr,
        noise_seed_ptr,
        seed_ptr,
        SUMMED=bool(summed),
        PRICE=bool(price),
    )
