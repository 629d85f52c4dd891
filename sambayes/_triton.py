"""The triton tier: every phase is one fused Triton kernel launch per (device, dtype)
group, noise drawn in-kernel. Same arguments as ``_eager``; see there for the contract.

The kernels live in :mod:`sambayes.kernels` (one file per phase, byte counts in
their docstrings). They read each tensor through a cached table of addresses,
so they need contiguous tensors; a tensor with any non-contiguous role (rare:
parameters that are views) takes the eager tier's path, with the same math and
the same noise.

Triton is optional: importing this module without it raises an ImportError that
says how to get it, which :mod:`sambayes.backends` reports when the tier is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch

try:
    import triton
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("Triton is not installed; pip install 'sambayes[triton]'") from exc

# tl.randn with 64-bit offsets is Philox4x32 (the noise of every other tier) from Triton 3.4 on;
# older versions switch to Philox4x64 and would draw other numbers
if tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) < (3, 4):  # pragma: no cover
    raise ImportError(f"Triton {triton.__version__} is too old: the triton tier needs Triton >= 3.4")

from . import _eager
from .kernels import bsam_perturb as _bsam_perturb
from .kernels import bsam_sample as _bsam_sample
from .kernels import bsam_update as _bsam_update
from .kernels import restore as _restore
from .kernels import sam as _sam


def _interpreted() -> bool:
    # the kernels are interpreter functions iff TRITON_INTERPRET was set when they were defined
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_restore._restore_kernel, InterpretedFunction)


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if the Triton kernels can run on ``device``, else why not."""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _interpreted():
            return None
        return "the Triton kernels were compiled for GPUs; set TRITON_INTERPRET=1 before importing sambayes"
    return f"the Triton kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), not {device.type}"


def _on_their_device(fn):
    """Launch on the tensors' GPU: Triton launches on the current device and its stream."""

    @functools.wraps(fn)
    def wrapper(tensors, *args, **kwargs):
        device = tensors[0].device if len(tensors) else torch.device("cpu")
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return fn(tensors, *args, **kwargs)

    return wrapper


def _split(*roles: list) -> tuple[list[int], list[int]]:
    """(indices every kernel can take: all roles contiguous, the other indices)."""
    fused, rest = [], []
    for i, tensors in enumerate(zip(*roles)):
        (fused if all(t.is_contiguous() for t in tensors) else rest).append(i)
    return fused, rest


def _pick(indices: list[int], *roles: list) -> list[list]:
    return [[role[i] for i in indices] for role in roles]


@torch.no_grad()
@_on_their_device
def bsam_sample(params, means, precisions, offsets, *, num_data: float, seed: int) -> None:
    """θ = m + z / sqrt(N·s): a sample of the posterior, z ~ N(0, I) from Philox."""
    fused, rest = _split(params, means, precisions)
    if rest:
        _eager.bsam_sample(*_pick(rest, params, means, precisions, offsets), num_data=num_data, seed=seed)
    if fused:
        _bsam_sample.bsam_sample(*_pick(fused, params, means, precisions, offsets), num_data=num_data, seed=seed)


@torch.no_grad()
@_on_their_device
def bsam_perturb(params, grads, means, precisions, stats, *, rho: float, accumulate: bool) -> None:
    """θ = m + ρ·g/s (from the mean, not the noisy point); stats += sqrt(s)·|g|."""
    roles = (params, grads, means, precisions, stats)
    fused, rest = _split(*roles)
    if rest:
        _eager.bsam_perturb(*_pick(rest, *roles), rho=rho, accumulate=accumulate)
    if fused:
        _bsam_perturb.bsam_perturb(*_pick(fused, *roles), rho=rho, accumulate=accumulate)


@torch.no_grad()
@_on_their_device
def bsam_update(
    params,
    grads,
    means,
    precisions,
    momentums,
    stats,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    damping: float,
    splits: int,
) -> None:
    """Momentum, mean (with the old precision), precision, then θ = m."""
    roles = (params, grads, means, precisions, momentums, stats)
    hyper = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "weight_decay": weight_decay,
        "damping": damping,
        "splits": splits,
    }
    fused, rest = _split(*roles)
    if rest:
        _eager.bsam_update(*_pick(rest, *roles), **hyper)
    if fused:
        _bsam_update.bsam_update(*_pick(fused, *roles), **hyper)


@torch.no_grad()
@_on_their_device
def restore(params, weights) -> None:
    """θ = m (or w for SAM): the model back at rest."""
    fused, rest = _split(params, weights)
    if rest:
        _eager.restore(*_pick(rest, params, weights))
    if fused:
        _restore.restore(*_pick(fused, params, weights))


@torch.no_grad()
@_on_their_device
def sam_sq_norm(grads, weights, *, adaptive: bool) -> torch.Tensor:
    """Σ (T·g)², T = |w| if adaptive else 1, as a 0-dim tensor in the state dtype (no host sync)."""
    fused, rest = _split(grads, weights)
    total = _sam.sam_sq_norm(*_pick(fused, grads, weights), adaptive=adaptive) if fused else None
    if rest:
        other = _eager.sam_sq_norm(*_pick(rest, grads, weights), adaptive=adaptive)
        total = other if total is None else total + other
    return total


@torch.no_grad()
@_on_their_device
def sam_perturb(params, grads, weights, *, scale: torch.Tensor, adaptive: bool) -> None:
    """w' = w + scale·T²·g with scale = ρ/‖T·g‖₂ (a 0-dim tensor: no host sync)."""
    fused, rest = _split(params, grads, weights)
    if rest:
        _eager.sam_perturb(*_pick(rest, params, grads, weights), scale=scale, adaptive=adaptive)
    if fused:
        _sam.sam_perturb(*_pick(fused, params, grads, weights), scale=scale, adaptive=adaptive)


@torch.no_grad()
@_on_their_device
def sam_update_sgd(
    params,
    grads,
    weights,
    momentums,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    splits: int,
) -> None:
    """Heavy ball on the mean perturbed-point gradient, then θ = w."""
    roles = (params, grads, weights, momentums)
    hyper = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov, "splits": splits}
    fused, rest = _split(*roles)
    if rest:
        _eager.sam_update_sgd(*_pick(rest, *roles), **hyper)
    if fused:
        _sam.sam_update_sgd(*_pick(fused, *roles), **hyper)


@torch.no_grad()
@_on_their_device
def sam_update_adamw(
    params,
    grads,
    weights,
    momentums,
    variances,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    splits: int,
) -> None:
    """AdamW on the mean perturbed-point gradient (``step`` counts from 1), then θ = w."""
    roles = (params, grads, weights, momentums, variances)
    hyper = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "weight_decay": weight_decay,
        "step": step,
        "splits": splits,
    }
    fused, rest = _split(*roles)
    if rest:
        _eager.sam_update_adamw(*_pick(rest, *roles), **hyper)
    if fused:
        _sam.sam_update_adamw(*_pick(fused, *roles), **hyper)
