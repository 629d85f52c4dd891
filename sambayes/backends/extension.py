"""The "cpu" and "cuda" backends: fused kernels of the C++/CUDA extension ``sambayes._C``.

One op call per phase per bucket, whatever the number of tensors: multithreaded,
vectorized C++ loops on CPU tensors and one CUDA launch on CUDA tensors, both running
the per-element math of ``csrc/sambayes_math.h`` (the Philox noise included, equal to
:mod:`sambayes._philox`). Same functions and arguments as :mod:`.eager`; see there for
the contract. Each forwards to the op of the same name, which names the arguments in its
schema (``csrc/bindings.cpp``; ``phases.op_functions``). The kernels index memory flat:
:mod:`sambayes.backends` sends them contiguous tensors only.

The ops are registered with ``torch.library`` as ``torch.ops.sambayes_C.*``, with fake
implementations here, so that ``torch.compile`` can trace around them.

``seed`` and ``lr`` may also be one-element tensors on the bucket's device (int64 and float64): the kernel reads
them on the device, so that a captured CUDA graph uses each replay's value.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .. import phases

if os.environ.get("SAMBAYES_NO_EXTENSION", "0") not in ("", "0"):
    raise ImportError("the C++ extension is turned off (SAMBAYES_NO_EXTENSION is set)")
_INSTALLED = __package__.rpartition(".")[0] + "._C"
if importlib.util.find_spec(_INSTALLED) is None:
    # installed without PyTorch at hand (a plain `pip install .`): compile it now, once, cached
    from .._build import cache_dir, compile_now

    _C = compile_now()
    #: where this process's extension came from, for `python -m sambayes info`
    BUILT = f"compiled on first use, cached in {cache_dir(torch)}"
else:
    try:
        _C = importlib.import_module(_INSTALLED)
    except Exception as exc:
        raise ImportError(
            f"the C++ extension sambayes._C does not load ({type(exc).__name__}: {exc}); rebuild it with "
            "`pip install --no-build-isolation -e .`, or delete it to have it compiled on first use"
        ) from exc
    BUILT = f"built at install ({_C.__file__})"

#: the extension was built with its CUDA kernels; if not, CUDA_NOTE says why
HAS_CUDA_KERNELS: bool = _C.cuda_compiled
CUDA_NOTE: str = _C.cuda_note

_ops = torch.ops.sambayes_C


def randn_range(seed: int, start: int, numel: int, device=None) -> torch.Tensor:
    """``sambayes._philox.randn_range`` from the compiled Philox: z(seed, start + i), float32 [numel]."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        _ops.philox_randn_(out, seed, start)
    return out


def philox_words(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four Philox4x32-10 words per counter, int64 [n, 4] holding uint32 values (CPU; for tests)."""
    return _ops.philox_words(counters.cpu(), seed)


# one function per phase of the registry, forwarding to its op (their arguments: csrc/bindings.cpp)
globals().update(phases.op_functions(_ops))


def _register_fakes() -> None:
    """Shape-only implementations, so that torch.compile traces the ops without running them: one per
    phase of :mod:`sambayes.phases` (a 0-dim state-dtype tensor where the phase returns one), and the
    test hooks."""

    def nothing(*args, **kwargs):
        return None

    def scalar_like(position: int):
        return lambda *args, **kwargs: args[position][0].new_empty(())

    for phase in phases.PHASES:
        state = next(i for i, role in enumerate(phase.roles) if role.kind in "SR") if phase.returns else None
        torch.library.register_fake(f"sambayes_C::{phase.name}", nothing if state is None else scalar_like(state))
    torch.library.register_fake("sambayes_C::philox_randn_", nothing)

    @torch.library.register_fake("sambayes_C::philox_words")
    def _(counters, seed):
        return counters.new_empty((counters.numel(), 4), dtype=torch.int64)


_register_fakes()
