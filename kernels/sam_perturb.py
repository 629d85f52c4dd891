"""SAM ascent: w' = w + ρ·T²·g/‖T·g‖₂ (T = |w| for adaptive SAM, else 1), in one pass.

Bytes per parameter: reads g (param dtype) and w (state), writes θ (param
dtype): 12 B for float32 parameters. The scale ρ/‖T·g‖₂ is a 0-dim device
tensor read in-kernel: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import for_block, launch, load, locate, role_pointer, store, tensor_table


@triton.jit
def _perturb_block(pointers, offs, mask, scalars, noise_offset, STATE: tl.constexpr, ADAPTIVE: tl.constexpr):
    param, grad, weight = pointers
    (scale,) = scalars
    g = load(grad, offs, mask, STATE)
    w = load(weight, offs, mask, STATE)
    # adversarial point: w + ρ·T²·g/‖T·g‖
    if ADAPTIVE:
        store(param, offs, w + scale * (w * w) * g, mask)
    else:
        store(param, offs, w + scale * g, mask)


@triton.jit
def _sam_perturb_kernel(
    table,
    scale_ptr,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 3)
    pointers = (
        role_pointer(record, start, 0, PARAM, ALIGNED),
        role_pointer(record, start, 1, PARAM, ALIGNED),
        role_pointer(record, start, 2, STATE, ALIGNED),
    )
    scale = tl.load(scale_ptr).to(STATE)
    for_block(_perturb_block, pointers, (scale,), remaining, 0, STATE, ADAPTIVE, BLOCK)


def sam_perturb(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    weights: list[torch.Tensor],
    *,
    scale: torch.Tensor,
    adaptive: bool,
) -> None:
    """θ_i = w_i + scale·T_i²·g_i for every tensor, one launch; ``scale`` = ρ/‖T·g‖₂ is a
    0-dim device tensor in the state dtype (read in-kernel: no host synchronisation)."""
    table = tensor_table([params, grads, weights])
    launch(
        _sam_perturb_kernel,
        table,
        scale,
        param=params[0].dtype,
        state=weights[0].dtype,
        ADAPTIVE=bool(adaptive),
    )
