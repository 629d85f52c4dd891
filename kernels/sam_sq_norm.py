"""SAM's squared global gradient norm, Σ (T·g)² with T = |w| (adaptive) or 1, in two stages on the device.

Bytes per parameter: reads g (param dtype), and w when adaptive: 4 B (8 B) for
float32 parameters. Minimal: the norm needs every gradient before any parameter
can move, so the ascent (``sam_perturb``) is a second pass over g. The partial
sums (one per block) are reduced on the device: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import for_block, launch, load, locate, role_pointer, tensor_table


@triton.jit
def _sq_norm_block(pointers, offs, mask, scalars, noise_offset, STATE: tl.constexpr, ADAPTIVE: tl.constexpr):
    grad, weight = pointers
    tg = load(grad, offs, mask, STATE)
    if ADAPTIVE:
        tg = tg * tl.abs(load(weight, offs, mask, STATE))
    # masked lanes read 0 and add nothing
    return tl.sum(tg * tg, axis=0)


@triton.jit
def _sq_norm_kernel(
    table,
    partials,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, remaining, _, record = locate(table, 2)
    pointers = (role_pointer(record, start, 0, PARAM, ALIGNED), role_pointer(record, start, 1, STATE, ALIGNED))
    # first stage: one partial sum per block
    tl.store(partials + tl.program_id(0), for_block(_sq_norm_block, pointers, (), remaining, 0, STATE, ADAPTIVE, BLOCK))


def sam_sq_norm(grads: list[torch.Tensor], weights: list[torch.Tensor], *, adaptive: bool) -> torch.Tensor:
    """Σ (T·g)² over all tensors (T = |w| if adaptive else 1) as a 0-dim tensor in the state dtype."""
    table = tensor_table([grads, weights])
    partials = torch.zeros(max(table.num_blocks, 1), dtype=weights[0].dtype, device=weights[0].device)
    launch(_sq_norm_kernel, table, partials, param=grads[0].dtype, state=weights[0].dtype, ADAPTIVE=bool(adaptive))
    # second stage
    return partials.sum()
