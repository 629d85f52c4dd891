"""The one dispatch layer: which backend computes a phase, on which tensors.

The optimizers call a phase (:mod:`sambayes.phases` declares each; see
:mod:`sambayes.backends.eager`, the executable spec) only through :func:`run`::

    run(backend, phases.BSAM_UPDATE, params, grad_sums, means, ..., lr=0.5, ...)

:func:`run` cuts the parallel lists into buckets by (device, dtype, layout) of
each tensor, calls the backend's function once per bucket, and owns every
fallback: a tensor with a non-contiguous role goes to :data:`FALLBACK` (eager,
which handles any strides), whatever the backend. The backend that ``"auto"``
or a name stands for on a device is resolved once per (backend, device) and
cached; the modules themselves only compute, each phase in a function named as
the phase with the arguments of its declaration.

=========  =====================================================  ==============
backend    what                                                   devices
=========  =====================================================  ==============
eager      per-tensor PyTorch ops; the executable spec            any
foreach    ``torch._foreach_*`` over each bucket                  any
triton     fused Triton kernels (``sambayes.kernels``)             CUDA; CPU under
                                                                  TRITON_INTERPRET=1
cpu        fused C++ kernels of the extension ``sambayes._C``      CPU
cuda       fused CUDA kernels of the extension ``sambayes._C``     CUDA
cuda-      the CUDA kernels compiled for the host, on fibers        CPU (a test tool:
emulated   (``csrc/cuda_emulated.cpp``): every CUDA phase in CI     SAMBAYES_CUDA_EMULATED)
=========  =====================================================  ==============

``backend="auto"`` takes the first available of ``AUTO_ORDER[device type]``. The
order follows ``benchmarks/results``: on a 2-core CPU the fused C++ backend is
2.4x faster than eager, which beats foreach (foreach makes one full pass over all
tensors per op, so nothing stays in cache). On CUDA the order triton, cuda,
foreach is provisional: both fused backends move the minimal bytes, and the GPU
benchmark (``benchmarks/gpu_check.sh``) has not been run yet.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from .. import _build, phases

NAMES = ("eager", "foreach", "triton", "cpu", "cuda", "cuda-emulated")
#: what ``backend=`` accepts
BACKENDS = ("auto",) + NAMES
#: first available wins, per device type
AUTO_ORDER = {"cuda": ("triton", "cuda", "foreach"), "cpu": ("cpu", "eager")}
_DEFAULT_AUTO = ("foreach",)
#: the backend of tensors the others cannot take (non-contiguous ones)
FALLBACK = "eager"


def _import(name: str) -> ModuleType:
    """The module of backend ``name``, imported on first use (Triton and the extension load only then)."""
    if name == "eager":
        from . import eager as module
    elif name == "foreach":
        from . import foreach as module
    elif name == "triton":
        from . import triton as module
    elif name == "cuda-emulated":  # the CUDA kernels on the CPU: a test tool, never picked by "auto"
        from . import emulated as module
    else:  # "cpu" and "cuda": the two device halves of the C++/CUDA extension
        from . import extension as module
    return module


@functools.cache
def _module(name: str) -> ModuleType | str:
    """The backend's module, or the reason it does not import."""
    _tried.add(name)
    try:
        return _import(name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
        return f"{type(exc).__name__}: {exc}"


@functools.cache
def implementations(module: ModuleType) -> dict[phases.Phase, Callable]:
    """A backend module's function for each phase (each is named as its phase)."""
    missing = [phase.name for phase in phases.PHASES if not callable(getattr(module, phase.name, None))]
    if missing:
        raise TypeError(f"backend module {module.__name__} lacks the phases {missing}")
    return {phase: getattr(module, phase.name) for phase in phases.PHASES}


def why_unavailable(name: str, device: torch.device | str, *, load: bool = True) -> str | None:
    """None if backend ``name`` can run on ``device``, else a sentence saying why not.

    ``load=False`` answers without loading the C++ extension (which a plain install compiles on first
    use): its backends count as available where it is built or can be compiled here.
    """
    device = torch.device(device)
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "cuda" and not torch.cuda.is_available():
        return "backend 'cuda' is not available: no CUDA device is visible to PyTorch"
    if name in ("cpu", "cuda") and device.type != name:
        return f"backend {name!r} runs on {name.upper()} tensors only, got parameters on {device}"
    if name == "cuda-emulated" and device.type != "cpu":
        return f"backend 'cuda-emulated' runs the CUDA kernels on the CPU: CPU tensors only, got {device}"
    if name in COMPILED and not load and name not in _tried:
        reason = _unbuildable(name)
        return None if reason is None else f"backend {name!r} is not available: {reason}"
    module = _module(name)
    if isinstance(module, str):
        return f"backend {name!r} is not available: {module}"
    if name == "cuda" and not module.HAS_CUDA_KERNELS:
        return f"backend 'cuda' is not available: sambayes._C has no CUDA kernels: {module.CUDA_NOTE}"
    if name == "triton" and device.type == "cpu" and not module.INTERPRETED:
        return (
            "backend 'triton' is not available on cpu: the Triton kernels were compiled for GPUs; "
            "they run on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 set before importing "
            "sambayes), for testing: slow"
        )
    if name == "triton" and device.type not in ("cuda", "cpu"):
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
    return None


#: the backends whose module this process has imported, or tried to (see _module)
_tried: set[str] = set()


#: the backends compiled from csrc/ (on first use where the install did not build them)
COMPILED = ("cpu", "cuda", "cuda-emulated")


def _unbuildable(name: str) -> str | None:
    """Why backend ``name``'s compiled code can neither load nor compile here, without loading or compiling
    it; None if it is built (the installed extension) or can be compiled."""
    if name == "cuda-emulated" and os.environ.get("SAMBAYES_CUDA_EMULATED", "0") in ("", "0"):
        return "the emulated CUDA tier is a test tool: set SAMBAYES_CUDA_EMULATED=1 to compile and use it"
    if name != "cuda-emulated" and os.environ.get("SAMBAYES_NO_EXTENSION", "0") not in ("", "0"):
        return "the C++ extension is turned off (SAMBAYES_NO_EXTENSION is set)"
    if name != "cuda-emulated" and importlib.util.find_spec("sambayes._C") is not None:
        return None
    missing = _build.missing_tools()
    return None if not missing else "it is not built and cannot compile here: missing " + "; ".join(missing)


def pick(backend: str, device: torch.device | str) -> str:
    """The backend that ``backend`` ("auto" included) stands for on ``device`` (cached);
    RuntimeError saying why if it cannot run there."""
    return _pick(backend, torch.device(device))


@functools.cache
def _pick(backend: str, device: torch.device) -> str:
    if backend == "auto":
        order = AUTO_ORDER.get(device.type, _DEFAULT_AUTO)
        reasons = {name: why_unavailable(name, device) for name in order}
        chosen = next((name for name in order if reasons[name] is None), FALLBACK)
        if chosen != order[0]:  # never a silent fall-back: said once per device (this function is cached)
            passed = "; ".join(reasons[name] for name in order if reasons[name] is not None)
            warnings.warn(
                f"sambayes: backend 'auto' runs {chosen!r} on {device.type}, slower than the preferred "
                f"{order[0]!r}: {passed}. `python -m sambayes info` says more.",
                stacklevel=2,
            )
        return chosen
    reason = why_unavailable(check_backend(backend), device)
    if reason:
        raise RuntimeError(reason)
    return backend


def resolve(backend: str, device: torch.device | str) -> ModuleType:
    """The module that computes for ``backend`` on ``device`` (cached)."""
    return _module(pick(backend, device))


#: the backends that launch through cached tables of addresses (see kernels/_multi_tensor.py)
TABLED = ("triton", "cuda", "cuda-emulated")


def scratch_in_one_buffer(backend: str, device: torch.device | str) -> bool:
    """Whether a step's running sums on ``device`` should be views of one buffer: the tabled
    backends address them relative to it, so their tables survive the buffer's reallocation.
    Elsewhere separate tensors are better: on the CPU, freed tensors of the same sizes come back
    from the heap at once, while one large buffer is mapped afresh, page by page, every step."""
    return pick(backend, device) in TABLED


def check_backend(backend: object) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
    return backend


def run(backend: str, phase: phases.Phase, *lists: list, **scalars: Any) -> list:
    """``phase`` on parallel lists (entry i of each list belongs to tensor i), one call per bucket.

    Tensor i goes to the bucket of (device, dtype of ``lists[0][i]``, whether all its tensors
    are contiguous). A keyword given as a dict {device: value} passes each bucket its device's
    value (the step's found-inf flag, 1/scale). Returns the calls' results in bucket order (None
    for the phases that write in place; 0-dim partial sums for ``sam_sq_norm``).
    """
    tensor_lists = [values for values in lists if values and isinstance(values[0], torch.Tensor)]
    first = lists[0][0]
    device, dtype = first.device, first.dtype
    if all(t.dtype == dtype and t.device == device for t in lists[0]) and all(
        all(map(torch.Tensor.is_contiguous, values)) for values in tensor_lists
    ):  # the common case: one bucket, the backend's own
        results = [implementations(resolve(backend, device))[phase](*lists, **_for_device(scalars, device))]
        _bump(phase, lists)
        return results
    buckets: dict[tuple, list[int]] = {}
    for i, tensors in enumerate(zip(*lists)):
        first = tensors[0]
        dense = all(t.is_contiguous() for t in tensors if isinstance(t, torch.Tensor))
        buckets.setdefault((first.device, first.dtype, dense), []).append(i)
    results = []
    for (device, _, dense), index in buckets.items():
        module = resolve(backend, device) if dense else _module(FALLBACK)
        args = [[values[i] for i in index] for values in lists]
        results.append(implementations(module)[phase](*args, **_for_device(scalars, device)))
    _bump(phase, lists)
    return results


def _bump(phase: phases.Phase, lists: tuple) -> None:
    """Move the version counters of what ``phase`` wrote (autograd's check for stale saved tensors,
    and the optimizers' for weights changed behind their back, then see every backend's writes)."""
    written = [t for position in phase.writes for t in lists[position]]
    if written:
        try:
            torch.autograd.graph.increment_version(written)
        except TypeError:  # PyTorch before 2.5 takes one tensor at a time
            for t in written:
                torch.autograd.graph.increment_version(t)


def _for_device(hyper: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The keywords of one bucket: a dict {device: value} gives its device's value."""
    return {k: v[device] if isinstance(v, dict) else v for k, v in hyper.items()}
