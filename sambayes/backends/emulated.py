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
schema (``csrc/bindings.cpp``) names the arguments: lists and flags by position, hyperparameters by
keyword, and a step scalar given as a tensor (``lr``, ``seed``) as its ``<name>_tensor`` argument.
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

_CONVERT = {"int": int, "float": float, "bool": bool, "int[]": lambda values: [int(v) for v in values]}


@torch.no_grad()
def _call(name: str, args: tuple, kwargs: dict):
    """The op ``name`` with the backend function's arguments, placed by its schema."""
    op = getattr(ops, name).default
    values = dict(zip((a.name for a in op._schema.arguments), args))
    values.update(kwargs)
    call = []
    for argument in op._schema.arguments:
        kind = str(argument.type)
        if argument.name.endswith("_tensor") and argument.name[: -len("_tensor")] in values:
            scalar = values[argument.name[: -len("_tensor")]]  # a step scalar: the kernel reads the tensor
            call.append(scalar if isinstance(scalar, torch.Tensor) else None)
        elif isinstance(values[argument.name], torch.Tensor) and kind in ("int", "float"):
            call.append(_CONVERT[kind](0))  # given as a tensor: see its _tensor argument
        else:
            value = values[argument.name]
            call.append(_CONVERT[kind](value) if kind in _CONVERT else value)
    return op(*call)


def _phase_function(phase: phases.Phase):
    """The backend's function for ``phase``: forwards to its op, with the phase's signature."""

    def function(*args, **kwargs):
        return _call(phase.name, args, kwargs)

    function.__name__ = function.__qualname__ = phase.name
    function.__signature__ = phase.signature()
    return function


# one function per phase of the registry, as every backend has
for _phase in phases.PHASES:
    globals()[_phase.name] = _phase_function(_phase)


def randn_range(seed: int, start: int, numel: int) -> torch.Tensor:
    """z(seed, start + i), float32 [numel], from the CUDA noise kernel."""
    out = torch.empty(numel, dtype=torch.float32)
    if numel:
        ops.philox_randn_(out, seed, start)
    return out
