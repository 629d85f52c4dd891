"""What users pass, checked with errors that name the bad value; ``split_batch``; and where a warning
points (the user's line, not ours)."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
from typing import Any

import torch

from . import _batchnorm, backends

#: the parameter dtypes every backend trains
PARAM_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_number(name: str, value: Any, *, low: float = 0.0, low_open: bool = False, high: float | None = None) -> None:
    """ValueError naming the argument unless low <(=) value (< high). A one-element tensor counts
    as its value (``lr=torch.tensor(0.1)``, as torch.optim accepts it)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
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
