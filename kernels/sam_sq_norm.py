"""SAM's squared global gradient norm, Σ (T·g)² with T = |w| (adaptive) or 1, in two stages on
the device; g is unscaled as read (GradScaler) and checked for inf/NaN (the step's found-inf flag).

Bytes per parameter: reads g (param dtype), and w when adaptive: 4 B (8 B) for
float32 parameters. Minimal: the norm needs every gradient before any parameter
can move, so the ascent (``sam_perturb``) is a second pass over g. The partial
sums (one per program of SPAN blocks) are reduced on the device: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..phases import SAM_SQ_NORM
from ._multi_tensor import BLOCK, NUM_WARPS, TL_DTYPES, for_block, load, locate, role_pointer, tensor_table

#: table blocks per program: one reduction across the program's threads for SPAN blocks, whose cost a
#: block of 2-byte gradients would not carry (docs/performance.md: bf16 at 83% of copy with one block)
SPAN = 4


@triton.jit
def _sq_norm_block(pointers, offs, mask, scalars, noise_index, STATE: tl.constexpr, ADAPTIVE: tl.constexpr):
    grad, weight = pointers
    inv_scale, terms = scalars
    g = load(grad, offs, mask, STATE) * inv_scale
    # g·0 + g: g where it is finite, NaN where it is not (inf·0 is NaN), which marks the sum (the squares of
    # finite values are never NaN: at most inf), so that one reduction gives both the sum and the check
    g = g * 0.0 + g
    tg = g * tl.abs(load(weight, offs, mask, STATE)) if ADAPTIVE else g
    # masked lanes read 0 and add nothing
    return terms + tg * tg


@triton.jit
def _sq_norm_terms(
    terms,
    table,
    num_blocks,
    block,
    inv_scale,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``terms`` plus the terms (T·g)² of one block of the table (NaN where g is not finite, 0 past the
    tensor), elementwise."""
    start, remaining, _, record = locate(table, 2, block, num_blocks)
    pointers = (role_pointer(record, start, 0, PARAM, ALIGNED), role_pointer(record, start, 1, STATE, ALIGNED))
    return for_block(_sq_norm_block, pointers, (inv_scale, terms), start, remaining, 0, STATE, ADAPTIVE, BLOCK)


@triton.jit(do_not_specialize=["num_blocks"])
def _sq_norm_kernel(
    table,
    num_blocks,
    partials,
    found_inf,
    inv_scale_ptr,
    PARAM: tl.constexpr,
    STATE: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    SPAN: tl.constexpr,
):
    inv_scale = tl.load(inv_scale_ptr).to(STATE)
    # blocks pid·SPAN .. pid·SPAN + SPAN − 1 of the table, the first always there; the sum starts from its
    # terms (a sum that starts from zeros has a layout of its own: each block's terms would move into it
    # through shared memory)
    first = tl.program_id(0) * SPAN
    terms = _sq_norm_terms(0.0, table, num_blocks, first, inv_scale, PARAM, STATE, ADAPTIVE, ALIGNED, BLOCK)
    for k in tl.static_range(1, SPAN):
        if first + k < num_blocks:
            terms = _sq_norm_terms(
                terms, table, num_blocks, first + k, inv_scale, PARAM, STATE, ADAPTIVE, ALIGNED, BLOCK
            )
    # first stage: one partial sum per program
    partial = tl.sum(terms, axis=0)
    if partial != partial:  # noqa: PLR0124 (NaN: a non-finite gradient)
        tl.store(found_inf, 1.0)
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
    programs = [triton.cdiv(part.num_blocks, SPAN) for part in table.parts]
    # every program writes its own partial: no memset, unless there is no block at all
    make = torch.empty if sum(programs) else torch.zeros
    partials = make(max(sum(programs), 1), dtype=table.state, device=weights[0].device)
    first = 0
    for part, count in zip(table.parts, programs):  # one launch per alignment class, each into its own partials
        _sq_norm_kernel[(count,)](
            part.table,
            part.num_blocks,
            partials[first:],
            found_inf,
            inv_scale,
            PARAM=TL_DTYPES[part.param],
            STATE=TL_DTYPES[part.state],
            ADAPTIVE=bool(adaptive),
            ALIGNED=part.aligned,
            BLOCK=BLOCK,
            SPAN=SPAN,
            num_warps=NUM_WARPS,
        )
        first += count
    # second stage
    return partials.sum()
