"""The one dispatch layer: which backend computes a phase, on which tensors.

The optimizers call a phase (``bsam_sample``, ``bsam_perturb``, ... ; see
:mod:`sambayes.backends.eager`, the executable spec) only through :func:`run`::

    run(backend, "bsam_update", params, grad_sums, means, ..., lr=0.5, ...)

:func:`run` cuts the parallel lists into buckets by (device, dtype, layout) of
each tensor, calls the backend's function once per bucket, and owns every
fallback: a tensor with a non-contiguous role goes to :data:`FALLBACK` (eager,
which handles any strides), whatever the backend. The backend that ``"auto"``
or a name stands for on a device is resolved once per (backend, device) and
cached; the modules themselves only compute.

=========  =====================================================  ==============
backend    what                                                   devices
=========  =====================================================  ==============
eager      per-tensor PyTorch ops; the executable spec            any
foreach    ``torch._foreach_*`` over each bucket                  any
triton     fused Triton kernels (``sambayes.kernels``)             CUDA; CPU under
                                                                  TRITON_INTERPRET=1
cpu        fused C++ kernels of the extension ``sambayes._C``      CPU
cuda       fused CUDA kernels of the extension ``sambayes._C``     CUDA
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
import importlib
import warnings
from types import ModuleType
from typing import Any

import torch

NAMES = ("eager", "foreach", "triton", "cpu", "cuda", "cuda-emulated")
#: what ``backend=`` accepts
BACKENDS = ("auto",) + NAMES
#: first available wins, per device type
AUTO_ORDER = {"cuda": ("triton", "cuda", "foreach"), "cpu": ("cpu", "eager")}
_DEFAULT_AUTO = ("foreach",)
#: the backend of tensors the others cannot take (non-contiguous ones)
FALLBACK = "eager"

_MODULES = {"eager": "eager", "foreach": "foreach", "triton": "triton", "cpu": "extension", "cuda": "extension"}
_MODULES["cuda-emulated"] = "emulated"  # the CUDA kernels run on the CPU, for tests; never picked by "auto"

#: the lists each phase writes in place, by position: their version counters move after the
#: call, as after an in-place torch op (the fused kernels write memory autograd does not see)
WRITES = {
    "bsam_sample": (0,),
    "bsam_perturb": (0, 1, 4),
    "find_nonfinite": (),
    "fold_grads": (0, 1),
    "bsam_update": (0, 1, 2, 3, 4),
    "restore": (0,),
    "sam_sq_norm": (),
    "sam_perturb": (0, 1),
    "sam_update_sgd": (0, 1, 2, 3),
    "sam_update_adamw": (0, 1, 2, 3, 4),
}


@functools.cache
def _module(name: str) -> ModuleType | str:
    """The backend's module, or the reason it does not import."""
    try:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
        return f"{type(exc).__name__}: {exc}"


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """None if backend ``name`` can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    module = _module(name)
    if isinstance(module, str):
        return f"backend {name!r} is not available: {module}"
    if name == "cuda" and not module.HAS_CUDA_KERNELS:
        return f"backend 'cuda' is not available: sambayes._C has no CUDA kernels: {module.CUDA_NOTE}"
    if name == "cuda" and not torch.cuda.is_available():
        return "backend 'cuda' is not available: no CUDA device is visible to PyTorch"
    if name == "cuda-emulated" and device.type != "cpu":
        return f"backend 'cuda-emulated' runs the CUDA kernels on the CPU: CPU tensors only, got {device}"
    if name in ("cpu", "cuda") and device.type != name:
        return f"backend {name!r} runs on {name.upper()} tensors only, got parameters on {device}"
    if name == "triton" and device.type == "cpu" and not module.INTERPRETED:
        return (
            "backend 'triton' is not available on cpu: the Triton kernels were compiled for GPUs; "
            "set TRITON_INTERPRET=1 before importing sambayes"
        )
    if name == "triton" and device.type not in ("cuda", "cpu"):
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
    return None


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


def run(backend: str, op: str, *lists: list, **hyper: Any) -> list:
    """Phase ``op`` on parallel lists (entry i of each list belongs to tensor i), one call per bucket.

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
        results = [getattr(resolve(backend, device), op)(*lists, **_for_device(hyper, device))]
        _bump(op, lists)
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
        results.append(getattr(module, op)(*args, **_for_device(hyper, device)))
    _bump(op, lists)
    return results


def step_args(value, number) -> tuple:
    """(number argument, tensor argument) of a fused kernel for a step scalar (``seed``, ``lr``): a
    tensor goes as is, read by the kernel on the device (capturable), next to a dummy number; a Python
    number by value, through ``number`` (int, float), next to None."""
    if isinstance(value, torch.Tensor):
        return number(0), value
    return number(value), None


def _bump(op: str, lists: tuple) -> None:
    """Move the version counters of what ``op`` wrote (autograd's check for stale saved tensors,
    and the optimizers' for weights changed behind their back, then see every backend's writes)."""
    written = [t for position in WRITES[op] for t in lists[position]]
    if written:
        try:
            torch.autograd.graph.increment_version(written)
        except TypeError:  # PyTorch before 2.5 takes one tensor at a time
            for t in written:
                torch.autograd.graph.increment_version(t)


def _for_device(hyper: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The keywords of one bucket: a dict {device: value} gives its device's value."""
    return {k: v[device] if isinstance(v, dict) else v for k, v in hyper.items()}


def info() -> str:
    """A report of every backend (available or not, and why), versions and devices."""
    from .. import __version__

    lines = [f"sambayes {__version__}  torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"triton: not installed ({type(exc).__name__}); pip install 'sambayes[triton]'")
    extension = _module("cpu")
    lines.append(f"C++ extension: {extension if isinstance(extension, str) else extension.BUILT}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for i in range(torch.cuda.device_count()):
        lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    for dev in devices:
        lines.append(f"\n{dev} (auto picks: {pick('auto', dev)})")
        for name in NAMES:
            reason = why_unavailable(name, dev)
            lines.append(f"  {name:8s} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)
