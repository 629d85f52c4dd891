"""SAM ascent: w' = w + ρ·T²·g/‖T·g‖₂ (T = |w| for adaptive SAM, else 1), in one pass that
consumes the gradient: unscaled as read (GradScaler) and zeroed for the next backward pass.

Bytes per parameter: reads g (param dtype) and w (state), writes θ and the zeroed g
(param dtype): 16 B for float32 parameters. The scale ρ/‖T·g‖₂ is a 0-dim device
tensor read in-kernel: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import SAM_PERTURB
from ._multi_tensor import for_block, launch, load, locate, role_pointer, store, tensor_table, zero


@triton.jit
def _perturb_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, ADAPTIVE: tl.constexpr):
    param, grad, weight = pointers
    scale, inv_scale = scalars
    g = load(grad, offs, mask, STATE) * inv_scale
    w = load(weight, offs, mask, STATE)
    # adversarial point: w + ρ·T²·g/‖T·g‖
    if ADAPTIVE:
        store(param, offs, w + scale * (w * w) * g, mask)
    else:
        store(param, offs, w + scale * g, mask)
    # the gradient is consumed: the perturbed-point pass accumulates into a zeroed buffer
    zero(grad, offs, mask)


@triton.jit
def _sam_perturb_kernel(
    table,
    scale_ptr,
    inv_scale_ptr,
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
    scalars = (tl.load(scale_ptr).to(STATE), tl.load(inv_scale_ptr).to(STATE))
    for_block(_perturb_block, pointers, scalars, start, remaining, 0, STATE, ADAPTIVE, BLOCK)


def sam_perturb(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    weights: list[torch.Tensor],
    inv_scale: torch.Tensor,
    *,
    scale: torch.Tensor,
    adaptive: bool,
) -> None:
    """θ_i = w_i + scale·T_i²·g_i for every tensor (g = grad·inv_scale), grads zeroed; ``scale`` =
    ρ/‖T·g‖₂ is a 0-dim device tensor in the state dtype (read in-kernel: no host synchronisation)."""
    table = tensor_table([params, grads, weights], SAM_PERTURB.kinds)
    launch(
        _sam_perturb_kernel,
        table,
        scale,
        inv_scale,
        ADAPTIVE=bool(adaptive),
    )
