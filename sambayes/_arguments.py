"""What users pass, checked with errors that name the bad value; ``split_batch``; and where a warning
points (the user's line, not ours)."""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import os
import sys
import warnings
from typing import Any

import torch

from . import _batchnorm, backends

#: the parameter dtypes every backend trains
PARAM_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_number(name: str, value: Any, *, low: float = 0.0, low_open: bool = False, high: float | None = None) -> None:
    """ValueError naming the argument unless low <(=) value (< high). A one-element tensor counts
    as its value (``lr=torch.tensor(0.1)``, as torch.optim accepts it)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    if value < low or (low_open and value == low) or (high is not None and value >= high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{name}={value!r}: must be {bound}")


def check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas={betas!r}: expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, high=1.0)


def check_splits(splits: Any) -> None:
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits={splits!r}: must be an integer >= 1")


def check_params(params: list[torch.Tensor], index: int) -> None:
    """TypeError for a parameter the backends cannot train, ValueError for one listed twice."""
    seen = set()
    for i, p in enumerate(params):
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(
                f"parameter {i} of group {index} (shape {tuple(p.shape)}) has dtype {p.dtype}; sambayes trains "
                f"float64, float32, bfloat16 and float16 parameters"
            )
        if id(p) in seen:
            raise ValueError(f"parameter {i} of group {index} (shape {tuple(p.shape)}) is listed twice")
        seen.add(id(p))


def check_no_overlap(param_groups: list[dict[str, Any]]) -> None:
    """ValueError naming two parameters that overlap in memory (two Parameter objects over one tensor, the
    mistake ``head.weight = nn.Parameter(emb.weight)``): the optimizer would keep a state for each, the
    last restore would win and one gradient would be lost. Tied weights share one Parameter object."""
    spans: dict[int, list[tuple[int, int, int, int]]] = {}  # storage -> (first byte, end, group, index)
    for g, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            t = p.to_local() if hasattr(p, "to_local") else p
            if t.is_meta or t.numel() == 0:
                continue
            first = t.storage_offset() * t.element_size()
            extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
            spans.setdefault(t.untyped_storage().data_ptr(), []).append(
                (first, first + extent * t.element_size(), g, i)
            )
    for ranges in spans.values():
        ranges.sort()
        for (_, end, g, i), (start, _, h, j) in itertools.pairwise(ranges):
            if start < end:
                a, b = param_groups[g]["params"][i], param_groups[h]["params"][j]
                raise ValueError(
                    f"parameter {i} of group {g} (shape {tuple(a.shape)}) and parameter {j} of group {h} (shape "
                    f"{tuple(b.shape)}) overlap in memory: two Parameter objects over one tensor train as two "
                    "parameters and one gradient would be lost. To tie weights, share the Parameter object "
                    "(head.weight = emb.weight, not nn.Parameter(emb.weight))"
                )


def check_materialized(slots: list) -> None:
    """RuntimeError before a step on parameters still on the meta device (deferred initialization)."""
    meta = [s for s in slots if s.param.is_meta]
    if meta:
        raise RuntimeError(
            f"{len(meta)} parameters (the first of shape {tuple(meta[0].param.shape)}) are on the meta device: "
            "materialize and initialize them (module.to_empty(device=...), then reset_parameters()) before the "
            "first step"
        )


def check_options(
    params: Any, backend: Any, model: Any, bn_stats: Any, keep_sums: Any, capturable: Any
) -> tuple[Any, torch.nn.Module | None]:
    """The optimizers' options checked; (params, model) with a module given as ``params`` taken as both."""
    backends.check_backend(backend)
    if keep_sums not in (None, True, False):
        raise ValueError(f"keep_sums={keep_sums!r}: True, False or None (on the CPU only)")
    if capturable not in (True, False):
        raise ValueError(f"capturable={capturable!r}: True or False")
    if isinstance(params, torch.nn.Module):
        if model is not None and model is not params:
            raise ValueError("pass the model either as params or as model=, not two different ones")
        model, params = params, params.parameters()
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model={type(model).__name__}: expected a torch.nn.Module (or DDP / FSDP2 module)")
    if bn_stats not in _batchnorm.BN_POLICIES:
        raise ValueError(f"bn_stats={bn_stats!r}: choose one of {_batchnorm.BN_POLICIES}")
    return params, model


def split_batch(*tensors: torch.Tensor, splits: int) -> list[tuple[torch.Tensor, ...]]:
    """Cut a minibatch into ``splits`` equal consecutive sub-batches (ALGORITHM.md's B_1..B_k).

    Returns one tuple of views per sub-batch. ValueError if ``splits`` does not
    divide the batch size (dimension 0) or the tensors disagree on it.
    """
    check_splits(splits)
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"split_batch: tensors have different batch sizes {sorted(sizes)}")
    (size,) = sizes
    if size % splits:
        raise ValueError(f"splits={splits} does not divide the batch size {size}")
    return list(zip(*(t.chunk(splits) for t in tensors)))


def warn_if_no_gradient(given: Any, slots: list, action: str, name: str) -> None:
    """RuntimeWarning when a pass gave no trainable parameter a gradient: the closure (or loop) most likely
    forgot ``backward()``, and the step would update nothing."""
    if slots and not given:
        warnings.warn(
            f"{name}.{action}(): the backward pass before it gave no parameter a gradient: does the closure "
            "call loss.backward() (grad_scaler.scale(loss).backward() with AMP)? Nothing is updated",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )


def closure_result(values: list[Any]) -> Any:
    """What ``step(closure)`` returns: the mean of the perturbed passes' losses, detached, when each call
    returned a loss (a one-element tensor or a real number); otherwise the last call's value as it is."""
    losses = all(
        (isinstance(v, torch.Tensor) and v.numel() == 1) or (isinstance(v, numbers.Real) and not isinstance(v, bool))
        for v in values
    )
    if not losses:
        return values[-1]
    if len(values) == 1:
        return torch.as_tensor(values[0]).detach()
    tensors = [torch.as_tensor(v).detach().reshape(()) for v in values]
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype) if t.is_floating_point() else dtype
    return torch.stack([t.to(dtype) for t in tensors]).mean()


# this package, torch (no_grad's wrapper) and contextlib: frames between the user's call and a warning
_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(torch.__file__) + os.sep,
    contextlib.__file__,
)


def caller_stacklevel() -> int:
    """The stacklevel of the first frame outside sambayes and torch: the user's call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
