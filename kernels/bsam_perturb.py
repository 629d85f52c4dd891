"""bSAM ascent: θ = m + ρ·g/s, and the precision statistic sqrt(s)·|g| summed over sub-batches, in one pass.

Bytes per parameter: reads g (param dtype), m, s (state), and for sub-batches
after the first the running statistic; writes θ (param dtype) and the statistic.
float32: 20 B (24 B when accumulating); bfloat16/float16: 16 B (20 B). Minimal
for the state layout: g is needed twice here (θ and the statistic), is read
once, and is consumed now because the next backward pass overwrites it; the
statistic cannot fold into s because s must stay the old precision until the update.
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
def _perturb_block(param, grad, mean, precision, stat, offs, mask, rho, STATE: tl.constexpr, ACCUMULATE: tl.constexpr):
    g = load(grad, offs, mask, STATE)
    m = load(mean, offs, mask, STATE)
    s = load(precision, offs, mask, STATE, 1.0)
    # adversarial point, from the mean
    store(param, offs, m + div(rho * g, s), mask)
    # precision statistic, summed over sub-batches
    a = sqrt(s) * tl.abs(g)
    if ACCUMULATE:
        a = load(stat, offs, mask, STATE) + a
    store(stat, offs, a, mask)


@triton.jit
def _bsam_perturb_kernel(
    table,
    rho_hi,
    rho_lo,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 5)
    param = role_pointer(record, start, 0, PARAM, ALIGNED)
    grad = role_pointer(record, start, 1, PARAM, ALIGNED)
    mean = role_pointer(record, start, 2, STATE, ALIGNED)
    precision = role_pointer(record, start, 3, STATE, ALIGNED)
    stat = role_pointer(record, start, 4, STATE, ALIGNED)
    rho = scalar(rho_hi, rho_lo, STATE)
    offs = tl.arange(0, BLOCK)
    if remaining >= BLOCK:  # full block: no mask, so loads and stores vectorize
        _perturb_block(param, grad, mean, precision, stat, offs, None, rho, STATE, ACCUMULATE)
    else:
        _perturb_block(param, grad, mean, precision, stat, offs, offs < remaining, rho, STATE, ACCUMULATE)


def bsam_perturb(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    means: list[torch.Tensor],
    precisions: list[torch.Tensor],
    stats: list[torch.Tensor],
    *,
    rho: float,
    accumulate: bool,
) -> None:
    """θ_i = m_i + ρ·g_i/s_i and stat_i (+)= sqrt(s_i)·|g_i| for every tensor, one launch.

    ``params``, ``grads``: contiguous, one dtype (float64/32, bf16, fp16); ``means``,
    ``precisions``, ``stats``: contiguous state tensors (float64 for float64 params,
    float32 otherwise). ``accumulate=False`` overwrites the statistic (first sub-batch).
    """
    table = tensor_table([params, grads, means, precisions, stats])
    if table.num_blocks == 0:
        return
    _bsam_perturb_kernel[(table.num_blocks,)](
        table.table,
        *split_float(rho),
        PARAM=TL_DTYPES[params[0].dtype],
        STATE=TL_DTYPES[means[0].dtype],
        ACCUMULATE=bool(accumulate),
        ALIGNED=table.aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
