"""bSAM ascent: θ = m + ρ·g/s and the curvature estimate sqrt(s)·|g| summed over sub-batches,
in one pass that also consumes the gradient: unscaled as read (GradScaler), checked for
inf/NaN (the step's found-inf flag), and zeroed for the next backward pass.

Bytes per parameter: reads g (param dtype), m, s (state), and for sub-batches after
the first the running curvature sum; writes θ and the zeroed g (param dtype) and the
sum. float32: 24 B (28 B when accumulating); bfloat16/float16: 18 B (22 B). With the
precision in bfloat16 (``BSAM(state_dtype=torch.bfloat16)``) 2 B less: float32 22 B (26 B),
bfloat16/float16 16 B (20 B). The
curvature cannot fold into s because s must stay the old precision until the update;
zeroing g here saves a separate pass before the next backward (which accumulates into it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import BSAM_PERTURB
from ._multi_tensor import (
    div,
    flag_nonfinite,
    for_block,
    launch,
    load,
    locate,
    relative_base,
    role_pointer,
    scalar,
    scratch_pointer,
    sqrt,
    store,
    tensor_table,
    zero,
)


@triton.jit
def _perturb_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, ACCUMULATE: tl.constexpr):
    param, grad, mean, precision, curvature_sum = pointers
    rho, found_inf, inv_scale = scalars
    # every load before the found-inf branch, so that they go out in one wave
    g = load(grad, offs, mask, STATE) * inv_scale
    m = load(mean, offs, mask, STATE)
    s = load(precision, offs, mask, STATE, 1.0)  # bfloat16: converted exactly
    if ACCUMULATE:
        a = load(curvature_sum, offs, mask, STATE)
    flag_nonfinite(g, found_inf)
    # adversarial point, from the mean
    store(param, offs, m + div(rho * g, s), mask)
    # curvature estimate of the precision update, summed over sub-batches
    if ACCUMULATE:
        a = a + sqrt(s) * tl.abs(g)
    else:
        a = sqrt(s) * tl.abs(g)
    store(curvature_sum, offs, a, mask)
    # the gradient is consumed: the perturbed-point pass accumulates into a zeroed buffer
    zero(grad, offs, mask)


@triton.jit
def _bsam_perturb_kernel(
    table,
    found_inf,
    inv_scale_ptr,
    rho: tl.float64,
    curvature_base,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    STORED: tl.constexpr,  # the dtype the precision is stored in: STATE or bfloat16
    ACCUMULATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 5)
    pointers = (
        role_pointer(record, start, 0, PARAM, ALIGNED),
        role_pointer(record, start, 1, PARAM, ALIGNED),
        role_pointer(record, start, 2, STATE, ALIGNED),
        role_pointer(record, start, 3, STORED, ALIGNED),
        scratch_pointer(record, start, 4, STATE, ALIGNED, curvature_base),
    )
    scalars = (scalar(rho, STATE), found_inf, tl.load(inv_scale_ptr).to(STATE))
    for_block(_perturb_block, pointers, scalars, start, remaining, 0, STATE, ACCUMULATE, BLOCK)


def bsam_perturb(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    means: list[torch.Tensor],
    precisions: list[torch.Tensor],
    curvature_sums: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    *,
    rho: float,
    accumulate: bool,
) -> None:
    """θ_i = m_i + ρ·g_i/s_i and curvature_sum_i (+)= sqrt(s_i)·|g_i| for every tensor, g = grad·inv_scale;
    found_inf = 1 if any g is inf or NaN; grads zeroed.

    ``params``, ``grads``: contiguous, one dtype (float64/32, bf16, fp16); ``means``,
    ``precisions``, ``curvature_sums``: contiguous state tensors (float64 for float64 params,
    float32 otherwise; ``precisions`` may be bfloat16 instead of float32, read only); ``found_inf``, ``inv_scale``: float32 0-dim tensors on the device.
    ``accumulate=False`` overwrites the sum (first sub-batch).
    """
    table = tensor_table([params, grads, means, precisions, curvature_sums], BSAM_PERTURB.kinds)
    launch(
        _bsam_perturb_kernel,
        table,
        found_inf,
        inv_scale,
        float(rho),
        relative_base(curvature_sums),
        ACCUMULATE=bool(accumulate),
    )
