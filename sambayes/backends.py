"""Which implementation ("tier") runs the optimizer math, and why.

Tiers, all with the same functions and the same state keys (see ``_eager``):

=========  =====================================================  ==============
name       what                                                   devices
=========  =====================================================  ==============
eager      per-tensor PyTorch ops; the executable spec            any
foreach    ``torch._foreach_*`` over each (device, dtype) group    any
triton     fused Triton kernels (``sambayes.kernels``)             CUDA; CPU under
                                                                  TRITON_INTERPRET=1
cpu        fused C++ kernels of the extension ``sambayes._C``      CPU
cuda       fused CUDA kernels of the extension ``sambayes._C``     CUDA
=========  =====================================================  ==============

``backend="auto"`` takes, per (device, dtype) group, the first available of
``AUTO_ORDER[device type]``. The order follows the measurements in
``benchmarks/results``: on a 2-core CPU the fused C++ tier is 2.4x faster than
eager, which beats foreach (foreach makes one full pass over all tensors per op,
so nothing stays in cache). On CUDA the order triton, cuda, foreach is provisional:
both fused tiers move the minimal bytes, and the GPU benchmark
(``benchmarks/gpu_check.sh``) has not been run yet.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

TIERS = ("eager", "foreach", "triton", "cpu", "cuda")
BACKENDS = ("auto",) + TIERS

#: First available wins, per device type.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "foreach"),
    "cpu": ("cpu", "eager"),
}
_DEFAULT_AUTO = ("foreach",)

_MODULES = {"eager": "._eager", "foreach": "._foreach", "triton": "._triton", "cpu": "._cext", "cuda": "._cext"}
_loaded: dict[str, ModuleType | str] = {}


def _import(name: str) -> ModuleType | str:
    """The tier's module, or the reason it cannot be imported (cached)."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name], __package__)
        except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
            _loaded[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """None if tier ``name`` can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if name not in TIERS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    module = _import(name)
    if isinstance(module, str):
        return f"backend {name!r} is not available: {module}"
    reason = getattr(module, "why_unavailable", lambda *_: None)(name, device)
    if reason:
        return f"backend {name!r} is not available on {device}: {reason}"
    if name == "cpu" and device.type != "cpu":
        return f"backend 'cpu' runs on CPU tensors only, got parameters on {device}"
    if name == "cuda" and device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors only, got parameters on {device}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
    return None


def resolve(backend: str, device: torch.device | str) -> ModuleType:
    """The tier module that runs ``backend`` on ``device``; a clear error if it cannot."""
    device = torch.device(device)
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, _DEFAULT_AUTO):
            if why_unavailable(name, device) is None:
                return _import(name)
        return _import("eager")
    reason = why_unavailable(backend, device)
    if reason:
        raise RuntimeError(reason)
    return _import(backend)


def pick(backend: str, device: torch.device | str) -> str:
    """The name of the backend that ``backend`` ("auto" included) runs on ``device``; RuntimeError if none can."""
    device = torch.device(device)
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, _DEFAULT_AUTO):
            if why_unavailable(name, device) is None:
                return name
        return "eager"
    reason = why_unavailable(backend, device)
    if reason:
        raise RuntimeError(reason)
    return backend


def check_backend(backend: object) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
    return backend


def info() -> str:
    """A report of every tier (available or not, and why), versions and devices."""
    lines = [f"sambayes {_version()}  torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"triton: not installed ({type(exc).__name__}); pip install 'sambayes[triton]'")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for i in range(torch.cuda.device_count()):
        lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    for dev in devices:
        picked = resolve("auto", dev).__name__.rsplit("._", 1)[-1]
        lines.append(f"\n{dev} (auto picks: {_tier_name(picked, dev)})")
        for name in TIERS:
            reason = why_unavailable(name, dev)
            lines.append(f"  {name:8s} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def _tier_name(module_name: str, device: str) -> str:
    return {"cext": "cpu" if device == "cpu" else "cuda"}.get(module_name, module_name)


def _version() -> str:
    from . import __version__

    return __version__
