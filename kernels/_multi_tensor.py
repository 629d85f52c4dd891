"""Multi-tensor launching, written once for every phase: one kernel launch for all tensors
of a bucket (see :mod:`sambayes.backends`), through a table of addresses.

Parameters stay ordinary, separately allocated tensors, so a kernel finds them
through a *tensor table*: one int64 device buffer laid out as

    [tensor index, element start] * num_blocks      one pair per program (block)
    [numel, noise offset, ptr_0, ..., ptr_{R-1}] * T  one record per tensor

where ``ptr_r`` is the address of the tensor's role ``r`` (param, grad, mean,
...). Program ``pid`` reads its pair, then its tensor's record, casts the
addresses to typed pointers and processes ``BLOCK`` elements starting at
``start``. A bucket's tensors are split by alignment, each part with its own
table and launch: where every role of a tensor is 16-byte aligned its full blocks
use 128-bit accesses, whatever the other tensors are.

Tables are built on the host once per list of tensors and cached, keyed by their own
content (addresses, sizes, noise offsets): a reallocated tensor changes the key, and
an equal key means an identical table, so a cached table is never stale. The
optimizers keep every tensor they pass (parameters, state, gradient buffers) at a
fixed address, so in steady state every launch finds its table: no host work, no
host-to-device copy. The running sums of a step (kind "X": ``grad_sum``,
``curvature_sum``) live only within the step, as views of one buffer that the allocator
may place anywhere: their table entries are offsets from the role's first tensor, whose
address the launch passes (:func:`relative_base`, :func:`scratch_pointer`), so a new
buffer with the same layout finds the same table.

CUDA graphs and streams: a captured launch keeps its table's address, so a table used during a
capture is held for the life of the process (a graph may be replayed at any time) and never
evicted; a table missing during a capture is refused with an error that says to warm up first (its
copy would be captured too). A table is copied to the device before :func:`tensor_table` returns,
so any stream may launch with it at once; used on a stream other than the one it was allocated on,
it is recorded on that stream (``record_stream``), so that its memory is reused only after the
launches queued there.

Noise (ALGORITHM.md, version 2): element i of a group takes lane i mod 4 of
``tl.randn4x(seed, i div 4)``. For the sampling kernel the blocks of a tensor are
placed in noise-index space: a tensor whose first element has noise index o starts
at element -(o mod 4) (masked), so that every block begins on a multiple of 4 and
draws its BLOCK normals from BLOCK/4 Philox calls. The update's stochastic rounding of
bfloat16 state draws its random words the same way (:func:`words_block`).

Stored state (kind "R"): bSAM's precision and momentum are kept in the state dtype or, with
float32 state, in bfloat16 (``BSAM(state_dtype=torch.bfloat16)``); the launch passes that dtype
as the constexpr ``STORED`` to the kernels whose tables have such roles. Loads convert to the
math dtype (exact); bfloat16 stores round stochastically (:func:`store_stochastic`).
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ..phases import master_dtype

#: Elements per program: 8 per thread at 4 warps, i.e. two 128-bit accesses per fp32 stream. Under
#: the interpreter (kernels defined with TRITON_INTERPRET set) each program costs milliseconds of
#: Python whatever its size, so blocks are larger there.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: the same, for the kernels: code for the interpreter (on the bits) where a GPU has an instruction
_INTERPRETED: tl.constexpr = tl.constexpr(INTERPRETED)
BLOCK = 8192 if INTERPRETED else 1024
NUM_WARPS = 4
#: warps per program of the kernels that take another number (the compile check reads the same), by kernel
#: name: the kernels that draw from Philox run their block on two warps, so that a thread's 16 elements share
#: the setup (table reads, pointers, the rounds' keys) that 8 share on four (when set: the sample 51-55
#: instructions per element instead of 56-63, IVON's one-sample update 146-149 instead of 160-163)
WARPS = {"_bsam_sample_kernel": 2, "_ivon_update_kernel": 2}
#: Cached tables (LRU): a few per optimizer, parameter group and phase is the working set.
_CACHE_SIZE = 256
_cache: OrderedDict[tuple, TensorTable] = OrderedDict()
#: tables used during a CUDA-graph capture: held, never evicted (the graph may replay them)
_held: dict[tuple, TensorTable] = {}

TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


class _Part:
    """One launch's table: the tensors of a bucket that share an alignment."""

    __slots__ = ("aligned", "num_blocks", "param", "state", "stored", "table")

    def __init__(
        self, rows: list[tuple[int, int, list[int]]], shifts: list[int], aligned: bool, device, param, state, stored
    ) -> None:
        numels = torch.tensor([numel for numel, _, _ in rows], dtype=torch.int64)
        shift = torch.tensor(shifts, dtype=torch.int64)
        records = torch.tensor([[numel, offset, *ptrs] for numel, offset, ptrs in rows], dtype=torch.int64)
        blocks_per_tensor = (numels + shift + BLOCK - 1) // BLOCK
        num_blocks = int(blocks_per_tensor.sum())
        tensor_index = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int64), blocks_per_tensor)
        first_block = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
        start = (torch.arange(num_blocks, dtype=torch.int64) - first_block[tensor_index]) * BLOCK - shift[tensor_index]
        host = torch.cat([torch.stack([tensor_index, start], 1).reshape(-1), records.reshape(-1)])
        # a blocking copy (once per list of tensors): on the device before any stream can launch with it
        self.table = host.to(device)
        self.num_blocks, self.aligned, self.param, self.state = num_blocks, aligned, param, state
        self.stored = stored  # the dtype of the kind-"R" roles; None where the table has none


class TensorTable:
    """The device tables of a list of tensors (see the module docstring), one per alignment class."""

    __slots__ = ("allocated_on", "num_blocks", "param", "parts", "state", "stored", "used_on")

    def __init__(
        self, roles: list[list[torch.Tensor]], kinds: str, noise_offsets: list[int] | None, noise_blocks: bool
    ) -> None:
        first = roles[0]
        self.param = first[0].dtype
        self.state = master_dtype(self.param)
        self.stored = stored_dtype(roles, kinds)
        if self.stored is not None and not (
            self.stored == self.state or (self.stored == torch.bfloat16 and self.state == torch.float32)
        ):
            raise TypeError(
                f"stored state of dtype {self.stored}: expected {self.state}"
                + (" or torch.bfloat16" if self.state == torch.float32 else "")
            )
        for r, (role, kind) in enumerate(zip(roles, kinds, strict=True)):
            if kind not in "PSXR":
                raise ValueError(f"role kind {kind!r}: one of P, S, X, R")
            want = self.param if kind == "P" else self.stored if kind == "R" else self.state
            for i, (a, b) in enumerate(zip(first, role, strict=True)):
                if a.numel() != b.numel():
                    raise ValueError(f"tensor of {b.numel()} elements where {a.numel()} were expected")
                if b.dtype != want:  # the kernel would read it with the wrong element size
                    raise TypeError(f"role {r}, tensor {i}: dtype {b.dtype}, expected {want}")
        offsets = noise_offsets if noise_offsets is not None else [0] * len(first)
        classes: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
        bases = [relative_base(role) if kind == "X" else 0 for role, kind in zip(roles, kinds)]
        for i, t in enumerate(first):
            shift = offsets[i] % 4 if noise_blocks else 0
            ptrs = [role[i].data_ptr() for role in roles]
            # 16-byte aligned bases, and blocks that start on multiples of BLOCK: 128-bit accesses
            aligned = shift == 0 and all(p % 16 == 0 for p in ptrs)
            classes[aligned][0].append((t.numel(), offsets[i], [p - base for p, base in zip(ptrs, bases)]))
            classes[aligned][1].append(shift)
        device = first[0].device
        self.parts = [
            _Part(rows, shifts, aligned, device, self.param, self.state, self.stored)
            for aligned, (rows, shifts) in classes.items()
            if rows
        ]
        self.parts = [part for part in self.parts if part.num_blocks]
        self.num_blocks = sum(part.num_blocks for part in self.parts)
        self.allocated_on = _current_stream(device)
        self.used_on: list = []  # the other streams that launched with it (recorded)


def tensor_table(
    roles: list[list[torch.Tensor]], kinds: str, noise_offsets: list[int] | None = None, *, noise_blocks: bool = False
) -> TensorTable:
    """The (cached) tables for parallel lists of tensors; ``roles[r][i]`` is role r of tensor i.

    All tensors must be contiguous; tensor i of every role has the same numel. ``kinds[r]`` is
    "P" where role r holds the parameter dtype (that of ``roles[0][0]``), "S" where it holds the
    state dtype (float64 for float64 parameters, float32 otherwise), "X" for a state-dtype role
    addressed relative to its first tensor (a kernel reads it with :func:`scratch_pointer`), "R"
    for stored state (bSAM's precision and momentum): the state dtype or, with float32 state,
    bfloat16, the same for every tensor of every "R" role (the launch passes it as ``STORED``);
    dtypes are checked when the table is built. ``noise_blocks``: place blocks on multiples of
    4 in noise-index space (the sampling kernel, the update's stochastic rounding).
    """
    addresses = []
    for role, kind in zip(roles, kinds):
        base = relative_base(role) if kind == "X" else 0
        # the base's alignment decides the table's aligned parts, so it is part of the key
        addresses.append((base % 16, *(t.data_ptr() - base for t in role)))
    key = (
        roles[0][0].device,
        roles[0][0].dtype,
        stored_dtype(roles, kinds),  # of two allowed dtypes: which one the launch passes
        kinds,
        noise_blocks,
        *(tuple(t.numel() for t in role) for role in roles),  # every role's sizes: checked when built
        tuple(noise_offsets) if noise_offsets is not None else None,
        *addresses,
    )
    device = roles[0][0].device
    capturing = _capturing(device)
    entry = _held.get(key) or _cache.get(key)
    if entry is None:
        if capturing:
            raise RuntimeError(
                "sambayes: the triton backend has no launch table for these tensors and cannot build one during "
                "the capture of a CUDA graph; run the captured steps once before capturing (a warm-up, as "
                "torch.cuda.graphs recommends), with the same tensors"
            )
        entry = _cache[key] = TensorTable(roles, kinds, noise_offsets, noise_blocks)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)  # the least recently used table that no graph holds
    elif key in _cache:
        _cache.move_to_end(key)
    if capturing and key in _cache:
        _held[key] = _cache.pop(key)
    stream = _current_stream(device)
    if stream != entry.allocated_on and stream not in entry.used_on:
        for part in entry.parts:
            _record_stream(part.table, stream)
        entry.used_on.append(stream)
    return entry


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _current_stream(device: torch.device):
    """The current stream of ``device`` (None off CUDA)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _record_stream(table: torch.Tensor, stream) -> None:
    """The allocator reuses ``table``'s memory only once the work queued on ``stream`` so far is done."""
    table.record_stream(stream)


def stored_dtype(roles: list[list[torch.Tensor]], kinds: str) -> torch.dtype | None:
    """The dtype of the kind-"R" roles (that of the first one's first tensor), None where there are none."""
    for role, kind in zip(roles, kinds):
        if kind == "R":
            return role[0].dtype
    return None


def relative_base(role: list[torch.Tensor]) -> int:
    """The address a kind-"X" role's table entries are relative to: its first tensor's."""
    return role[0].data_ptr()


def cached_tables() -> int:
    """How many tables are cached, held ones included (for tests: a steady training loop adds none)."""
    return len(_cache) + len(_held)


def warps(kernel) -> int:
    """The warps per program ``kernel`` is launched (and compiled) with."""
    return WARPS.get(kernel.__name__, NUM_WARPS)


def launch(kernel, table: TensorTable, *args, **constexprs) -> None:
    """``kernel[(one program per block)](table, *args, PARAM=, STATE=, ALIGNED=, BLOCK=, **constexprs)``,
    once per alignment class of the table; ``STORED=`` too where the table has kind-"R" roles.

    Hyperparameters go as Python floats to arguments annotated ``tl.float64``; the kernel
    rounds them to its math dtype with :func:`scalar`.
    """
    for part in table.parts:
        launch_part(kernel, part, *args, **constexprs)


def launch_part(kernel, part: _Part, *args, **constexprs) -> None:
    """:func:`launch` for one part of a table (a kernel that writes one value per block)."""
    if part.stored is not None:
        constexprs["STORED"] = TL_DTYPES[part.stored]
    kernel[(part.num_blocks,)](
        part.table,
        *args,
        PARAM=TL_DTYPES[part.param],
        STATE=TL_DTYPES[part.state],
        ALIGNED=part.aligned,
        BLOCK=BLOCK,
        num_warps=warps(kernel),
        **constexprs,
    )


@triton.jit
def locate(table, NUM_ROLES: tl.constexpr, block=None, num_blocks=None):
    """(start, remaining, noise index, record) of this program's block in the tensor table (or of
    ``block`` of the table's ``num_blocks``, for a kernel whose programs take several).

    ``start`` may be negative (a sampling block placed on a multiple of 4 in noise space).
    """
    pid = tl.program_id(0) if block is None else block
    index = tl.load(table + 2 * pid)
    start = tl.load(table + 2 * pid + 1)
    record = table + 2 * (tl.num_programs(0) if num_blocks is None else num_blocks) + index * (2 + NUM_ROLES)
    remaining = tl.load(record) - start
    noise_index = tl.load(record + 1) + start
    return start, remaining, noise_index, record


@triton.jit
def role_pointer(record, start, ROLE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to element ``start`` of role ``ROLE`` of the record's tensor."""
    ptr = tl.load(record + 2 + ROLE).to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:
        # start is a multiple of BLOCK, so the block's base keeps the tensor's 16-byte alignment
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def scratch_pointer(record, start, ROLE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, base):
    """:func:`role_pointer` for a kind-"X" role: the table holds an offset from ``base``."""
    ptr = (tl.load(record + 2 + ROLE) + base).to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def scalar(x, DTYPE: tl.constexpr):
    """A float64 hyperparameter in the math dtype: as is for float64; else rounded to nearest,
    as PyTorch rounds a Python float that meets a float32 tensor."""
    if DTYPE == tl.float64:
        return x
    else:
        return tl.cast(x, DTYPE)


@triton.jit
def step_value(value, pointer):
    """``value``, or what ``pointer`` holds when it is given: with ``capturable=True`` the kernel reads
    the step's lr or seed from device memory, so that a CUDA graph replays it with the current one."""
    if pointer is None:
        return value
    else:
        return tl.load(pointer)


@triton.jit
def for_block(
    BODY: tl.constexpr,
    pointers,
    scalars,
    start,
    remaining,
    noise_index,
    STATE: tl.constexpr,
    OPTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``BODY(pointers, offs, mask, scalars, noise_index, STATE, OPTION)`` on this program's block.

    A full block runs without a mask, so that its loads and stores vectorize; only the
    first (when placed before the tensor's start) and last block of a tensor run masked.
    Returns what BODY returns.
    """
    offs = tl.arange(0, BLOCK)
    if (start >= 0) & (remaining >= BLOCK):
        return BODY(pointers, offs, None, scalars, noise_index, STATE, OPTION)
    else:
        return BODY(pointers, offs, (offs >= -start) & (offs < remaining), scalars, noise_index, STATE, OPTION)


#: Philox4x32-10's round multipliers and key increments (ALGORITHM.md, "Noise")
PHILOX_ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)


@triton.jit
def philox(seed, counters):
    """Philox4x32-10 at ``counters`` (int64) under key ``seed``: the four uint32 words of each, exactly
    ``tl.randint4x(seed, counters)``. Each round's two products are one 32 x 32 -> 64-bit multiply each
    (high and low word at once, where ``tl.umulhi`` and a product make two)."""
    seed = tl.to_tensor(seed).to(tl.uint64)  # as tl.randint4x: a small seed may come as int32
    key0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    key1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = counters.to(tl.uint32)
    c1 = (counters >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        p = c0.to(tl.uint64) * PHILOX_ROUND_A
        q = c2.to(tl.uint64) * PHILOX_ROUND_B
        c0, c1, c2, c3 = (
            (q >> 32).to(tl.uint32) ^ c1 ^ key0,
            q.to(tl.uint32),
            (p >> 32).to(tl.uint32) ^ c3 ^ key1,
            p.to(tl.uint32),
        )
        key0 = key0 + PHILOX_KEY_A
        key1 = key1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def uniform(word):
    """Triton's ``uint_to_uniform_float``: the word read as int32, bit-inverted when negative, times
    4.6566127342e-10 (float32)."""
    x = word.to(tl.int32, bitcast=True)
    return tl.where(x < 0, ~x, x).to(tl.float32) * 4.6566127342e-10


@triton.jit
def sincos(x):
    """(sin x, cos x) for 0 <= x < 2^21, float32: Cephes sinf/cosf with one reduction for both, the
    polynomials of ``csrc/sambayes_math.h`` (``sincos_f32``): the quadrant k = x·2/π rounded by adding
    1.5·2^23 (k then in the sum's low bits), r = x − k·π/2 with π/2 in three parts. Box–Muller's angle
    is in [0, 2π): no large-argument path."""
    shifted = x * 0.6366197723675814 + 12582912.0  # 2/π, 1.5·2^23
    k = shifted - 12582912.0
    quadrant = shifted.to(tl.uint32, bitcast=True)
    r = ((x - k * 1.5703125) - k * 4.837512969970703125e-4) - k * 7.54978995489188216e-8
    r2 = r * r
    sin_r = ((-1.9515295891e-4 * r2 + 8.3321608736e-3) * r2 - 1.6666654611e-1) * r2 * r + r
    cos_r = ((2.443315711809948e-5 * r2 - 1.388731625493765e-3) * r2 + 4.166664568298827e-2) * r2 * r2 - 0.5 * r2 + 1.0
    # over quadrants 0 to 3: sin x is sin r, cos r, -sin r, -cos r; cos x is cos r, -sin r, -cos r, sin r
    swap = (quadrant & 1) != 0
    s = tl.where(swap, cos_r, sin_r)
    c = tl.where(swap, sin_r, cos_r)
    return tl.where((quadrant & 2) != 0, -s, s), tl.where(((quadrant + 1) & 2) != 0, -c, c)


@triton.jit
def normal_pair(a, b):
    """Box–Muller on two Philox words, as ``tl.randn4x``'s pair: (r·cos θ, r·sin θ) with
    r = sqrt(−2 ln max(1e-7, u(a))), θ = 2π·u(b), float32."""
    u1 = tl.maximum(1.0e-7, uniform(a))
    radius = tl.sqrt(-2.0 * tl.log(u1))  # approximate on a GPU (sqrt.approx), as tl.randn4x's
    sin_theta, cos_theta = sincos(6.283185307179586 * uniform(b))
    return radius * cos_theta, radius * sin_theta


@triton.jit
def randn_block(seed, noise_index, BLOCK: tl.constexpr):
    """The BLOCK normals of noise indices ``noise_index .. noise_index + BLOCK - 1`` (a multiple of 4):
    BLOCK/4 calls of ``randn4x`` (ALGORITHM.md, "Noise": Philox4x32-10, then Box–Muller on words 0, 1
    and on 2, 3), their four lanes interleaved in element order."""
    counters = noise_index // 4 + tl.arange(0, BLOCK // 4)
    w0, w1, w2, w3 = philox(seed, counters.to(tl.int64))
    z0, z1 = normal_pair(w0, w1)
    z2, z3 = normal_pair(w2, w3)
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


@triton.jit
def words_block(seed, noise_index, BLOCK: tl.constexpr):
    """The BLOCK random words (uint32) of element indices ``noise_index .. noise_index + BLOCK - 1``
    (a multiple of 4): element i takes word i mod 4 of Philox4x32-10 under key ``seed`` at counter
    i div 4 (:func:`philox`, ``tl.randint4x``); BLOCK/4 calls, their four words interleaved as in
    :func:`randn_block`."""
    counters = noise_index // 4 + tl.arange(0, BLOCK // 4)
    w0, w1, w2, w3 = philox(seed, counters.to(tl.int64))
    return tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))


@triton.jit
def flag_nonfinite(x, found_inf):
    """found_inf = 1 if any of ``x`` is inf or NaN (masked lanes must hold finite values)."""
    if tl.max(tl.where(tl.abs(x) < float("inf"), 0.0, 1.0), axis=0) > 0:
        tl.store(found_inf, 1.0)


@triton.jit
def div(x, y):
    """x / y correctly rounded (IEEE), as PyTorch divides."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def over_sqrt(z, x):
    """z / sqrt(x): float64 correctly rounded (two IEEE operations, as PyTorch); float32 as z·rsqrt(x), the
    reciprocal square root approximate (within 2 ulps on a GPU, one instruction instead of an IEEE
    square root and division with their slow-path checks)."""
    if x.dtype == tl.float64:
        return z / tl.sqrt(x)
    else:
        return z * tl.math.rsqrt(x)


#: whether this Triton's tl.math.fdiv takes approx=True (div.approx.f32); older ones divide with div.full.f32
FDIV_APPROX: tl.constexpr = tl.constexpr("approx" in inspect.signature(tl.math.fdiv).parameters)


@triton.jit
def div_approx(x, y):
    """x / y for a divisor of normal magnitude below 2^126 (a precision): float64 correctly rounded; float32
    approximate on a GPU (div.approx.f32, within 2 ulps: five instructions where an IEEE division is ten with
    a slow-path branch), as ``div_approx`` of csrc/sambayes_math.h."""
    if x.dtype == tl.float64:
        return x / y
    elif FDIV_APPROX:
        return tl.math.fdiv(x, y, approx=True)
    else:
        return x / y


@triton.jit
def sqrt_approx(x):
    """sqrt(x): float64 correctly rounded; float32 approximate on a GPU (sqrt.approx, within 1 ulp: one
    instruction where an IEEE square root is ten), as ``sqrt_approx`` of csrc/sambayes_math.h."""
    return tl.sqrt(x)


@triton.jit
def sqrt(x):
    """sqrt(x) correctly rounded (IEEE), as PyTorch computes it."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def load(ptr, offs, mask, DTYPE: tl.constexpr, OTHER: tl.constexpr = 0.0):
    """Load a block and convert it to the math dtype (``mask`` None: a full block; masked lanes read OTHER)."""
    if mask is None:
        return tl.load(ptr + offs).to(DTYPE)
    else:
        return tl.load(ptr + offs, mask=mask, other=OTHER).to(DTYPE)


@triton.jit
def rounded(value, DTYPE: tl.constexpr):
    """``value`` rounded to DTYPE to nearest even, as PyTorch rounds.

    float32 -> bfloat16: one conversion instruction for two values on a GPU (``cvt.rn.bf16x2.f32``);
    under the interpreter, which would truncate, on the bits. The same bits but for a NaN's payload
    (the GPU's canonical NaN 0x7FFF, the interpreter's quiet NaN 0x7FC0, as PyTorch's).
    """
    if DTYPE == tl.bfloat16 and value.dtype != DTYPE and not _INTERPRETED:
        return value.to(tl.float32).to(tl.bfloat16, fp_downcast_rounding="rtne")
    elif DTYPE == tl.bfloat16 and value.dtype != DTYPE:
        x = value.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        half = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        half = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, half).to(tl.uint16)  # NaN stays a quiet NaN
        return half.to(tl.bfloat16, bitcast=True)
    else:
        return value.to(DTYPE)


@triton.jit
def rounded_stochastic(value, r):
    """float32 ``value`` rounded to bfloat16 with the 16 random bits ``r`` (uint32, < 2^16) per value:
    ``(bits + r) >> 16`` on its float32 bits, so it rounds away from zero with probability (the dropped
    bits) / 2^16; inf stays inf (its low bits are zero), NaN becomes the quiet NaN 0x7FC0 (the sum could carry
    out of its payload). On the bits, as :func:`rounded`."""
    bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
    half = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, (bits + r) >> 16).to(tl.uint16)
    return half.to(tl.bfloat16, bitcast=True)


@triton.jit
def store_stochastic(ptr, offs, value, r, mask):
    """:func:`store` to a bfloat16 pointer with stochastic rounding (:func:`rounded_stochastic`)."""
    if mask is None:
        tl.store(ptr + offs, rounded_stochastic(value, r))
    else:
        tl.store(ptr + offs, rounded_stochastic(value, r), mask=mask)


@triton.jit
def store(ptr, offs, value, mask):
    """Round ``value`` to the pointer's dtype and store it (``mask`` None: a full block)."""
    if mask is None:
        tl.store(ptr + offs, rounded(value, ptr.dtype.element_ty))
    else:
        tl.store(ptr + offs, rounded(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def zero(ptr, offs, mask):
    """Store zeros in the pointer's dtype: a gradient buffer consumed, ready for the next backward pass."""
    store(ptr, offs, tl.zeros([offs.shape[0]], tl.float32), mask)
