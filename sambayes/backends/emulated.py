"""The "cuda-emulated" backend: the CUDA kernels (``csrc/*_cuda.cu``) run on CPU tensors.

The CUDA sources are compiled by the C++ compiler for the host, unchanged but for the mechanical
differences ``csrc/multi_tensor_cuda.cuh`` collects (launch, stream and guard types, the dispatch
key), on an execution layer of this project (``csrc/cuda_emulated.cpp``): each block's threads run
as fibers, so that ``__syncthreads``, shared memory and warp shuffles work. The table cache, chunk
plan, vector and scalar paths, per-row alignment and reductions of the CUDA tier execute here, in
CI, on every phase test. It shows nothing about streams, graphs (their stubs are set by tests),
the code nvcc generates, or timing (docs/cext.md). It is never picked by ``"auto"``.

A test tool, so it is off unless ``SAMBAYES_CUDA_EMULATED`` is set (tests/conftest.py sets it on
machines without a GPU): ``1`` for the plain build, or variants of ``sambayes._build.EMULATED_VARIANTS``
joined by ``+``: ``sanitized`` (AddressSanitizer and UndefinedBehaviorSanitizer; run with libasan
preloaded), ``fma`` (products fused into FMAs as nvcc fuses them), ``sanitized+fma`` (CI's step).
Compiled on first use and cached (``sambayes._build.compile_emulated``).

Same functions and arguments as :mod:`.eager`. Each forwards to the op of the same name, whose
schema (``csrc/bindings.cpp``) names the arguments (``phases.op_functions``, as for the extension).
"""

from __future__ import annotations

import os

import torch

from .. import phases
from .._build import compile_emulated, emulated_name

_SETTING = os.environ.get("SAMBAYES_CUDA_EMULATED", "0")
if _SETTING in ("", "0"):
    raise ImportError("the emulated CUDA tier is a test tool: set SAMBAYES_CUDA_EMULATED=1 to compile and use it")
#: which build runs: "" (plain), or variants of sambayes._build.EMULATED_VARIANTS joined by "+"
BUILD = "" if _SETTING == "1" else _SETTING
_C = compile_emulated(BUILD)
#: the build's ops, and its test hooks: set_stream, set_capturing, counters, clear_tables, inject_fault
ops = getattr(torch.ops, emulated_name(BUILD))

# one function per phase of the registry, as every backend has
globals().update(phases.op_functions(ops))


def randn_range(seed: int, start: int, numel: int) -> torch.Tensor:
    """z(seed, start + i), float32 [numel], from the CUDA noise kernel."""
    out = torch.empty(numel, dtype=torch.float32)
    if numel:
        ops.philox_randn_(out, seed, start)
    return out
