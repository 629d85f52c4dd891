"""SAM's squared global gradient norm, Σ (T·g)² with T = |w| (adaptive) or 1, in two stages on
the device; g is unscaled as read (GradScaler) and checked for inf/NaN (the step's found-inf flag).

Bytes per parameter: reads g (param dtype), and w when adaptive: 4 B (8 B) for
float32 parameters. Minimal: the norm needs every gradient before any parameter
can move, so the ascent (``sam_perturb``) is a second pass over g. The partial
sums (one per block) are reduced on the device: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import SAM_SQ_NORM
from ._multi_tensor import flag_nonfinite, for_block, launch_part, load, locate, role_pointer, tensor_table


@triton.jit
def _sq_norm_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, ADAPTIVE: tl.constexpr):
    grad, weight = pointers
    found_inf, inv_scale = scalars
    tg = load(grad, offs, mask, STATE) * inv_scale
    flag_nonfinite(tg, found_inf)
    if ADAPTIVE:
        tg = tg * tl.abs(load(weight, offs, mask, STATE))
    # masked lanes read 0 and add nothing
    return tl.sum(tg * tg, axis=0)


@triton.jit
def _sq_norm_kernel(
    table,
    partials,
    found_inf,
    inv_scale_ptr,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 2)
    pointers = (role_pointer(record, start, 0, PARAM, ALIGNED), role_pointer(record, start, 1, STATE, ALIGNED))
    scalars = (found_inf, tl.load(inv_scale_ptr).to(STATE))
    # first stage: one partial sum per block
    partial = for_block(_sq_norm_block, pointers, scalars, start, remaining, 0, STATE, ADAPTIVE, BLOCK)
    tl.store(partials + tl.program_id(0), partial)


def sam_sq_norm(
    grads: list[torch.Tensor],
    weights: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    *,
    adaptive: bool,
) -> torch.Tensor:
    """Σ (T·g)² over all tensors (g = grad·inv_scale, T = |w| if adaptive else 1) as a 0-dim tensor
    in the state dtype; found_inf = 1 if any g is inf or NaN."""
    table = tensor_table([grads, weights], SAM_SQ_NORM.kinds)
    # every block writes its own partial: no memset, unless there is no block at all
    make = torch.empty if table.num_blocks else torch.zeros
    partials = make(max(table.num_blocks, 1), dtype=table.state, device=weights[0].device)
    first = 0
    for part in table.parts:  # one launch per alignment class, each into its own partials
        launch_part(
            _sq_norm_kernel,
            part,
            partials[first:],
            found_inf,
            inv_scale,
            ADAPTIVE=bool(adaptive),
        )
        first += part.num_blocks
    # second stage
    return partials.sum()
