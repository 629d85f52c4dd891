"""The foreach backend: the eager backend's math as ``torch._foreach_*`` ops, one kernel
launch per op for all tensors of a bucket. Same arguments as :mod:`.eager`; see there
for the contract."""

from __future__ import annotations

import torch

from .. import _philox


def _upcast(tensors, dtype):
    # gradients/params in bf16/fp16 are read in the state dtype
    return [t.to(dtype) for t in tensors] if tensors[0].dtype != dtype else list(tensors)


@torch.no_grad()
def bsam_sample(params, means, precisions, offsets, *, num_data: float, seed: int) -> None:
    z = [
        _philox.randn_range(seed, offset, m.numel(), device=m.device).view(m.shape).to(m.dtype)
        for m, offset in zip(means, offsets)
    ]
    std = torch._foreach_mul(precisions, num_data)
    torch._foreach_sqrt_(std)
    torch._foreach_div_(z, std)
    torch._foreach_add_(z, means)
    torch._foreach_copy_(params, z)


@torch.no_grad()
def bsam_perturb(params, grads, means, precisions, curvature_sums, *, rho: float, accumulate: bool) -> None:
    g = _upcast(grads, means[0].dtype)
    theta = torch._foreach_div(g, precisions)
    torch._foreach_mul_(theta, rho)
    torch._foreach_add_(theta, means)
    torch._foreach_copy_(params, theta)
    a = torch._foreach_abs(g)
    torch._foreach_mul_(a, torch._foreach_sqrt(precisions))
    if accumulate:
        torch._foreach_add_(curvature_sums, a)
    else:
        torch._foreach_copy_(curvature_sums, a)


@torch.no_grad()
def bsam_update(
    params,
    grad_sums,
    means,
    precisions,
    momentums,
    curvature_sums,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    damping: float,
    splits: int,
) -> None:
    h = torch._foreach_div(_upcast(grad_sums, means[0].dtype), splits)
    torch._foreach_add_(h, means, alpha=weight_decay)
    torch._foreach_mul_(momentums, beta1)
    torch._foreach_add_(momentums, h, alpha=1 - beta1)
    torch._foreach_addcdiv_(means, momentums, precisions, value=-lr)
    a = torch._foreach_div(curvature_sums, splits)
    torch._foreach_add_(a, weight_decay + damping)
    torch._foreach_mul_(precisions, beta2)
    torch._foreach_add_(precisions, a, alpha=1 - beta2)
    torch._foreach_copy_(params, means)


@torch.no_grad()
def restore(params, weights) -> None:
    torch._foreach_copy_(params, weights)


@torch.no_grad()
def sam_sq_norm(grads, weights, *, adaptive: bool) -> torch.Tensor:
    g = _upcast(grads, weights[0].dtype)
    if adaptive:
        g = torch._foreach_mul(g, torch._foreach_abs(weights))
    norms = torch._foreach_norm(g)
    return torch.stack(norms).square().sum()


@torch.no_grad()
def sam_perturb(params, grads, weights, *, scale: torch.Tensor, adaptive: bool) -> None:
    e = torch._foreach_mul(_upcast(grads, weights[0].dtype), scale)
    if adaptive:
        torch._foreach_mul_(e, torch._foreach_mul(weights, weights))
    torch._foreach_add_(e, weights)
    torch._foreach_copy_(params, e)


@torch.no_grad()
def sam_update_sgd(
    params,
    grad_sums,
    weights,
    momentums,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    splits: int,
) -> None:
    d = torch._foreach_div(_upcast(grad_sums, weights[0].dtype), splits)
    torch._foreach_add_(d, weights, alpha=weight_decay)
    torch._foreach_mul_(momentums, momentum)
    torch._foreach_add_(momentums, d)
    if nesterov:
        torch._foreach_add_(d, momentums, alpha=momentum)
    else:
        d = momentums
    torch._foreach_add_(weights, d, alpha=-lr)
    torch._foreach_copy_(params, weights)


@torch.no_grad()
def sam_update_adamw(
    params,
    grad_sums,
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
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    h = torch._foreach_div(_upcast(grad_sums, weights[0].dtype), splits)
    torch._foreach_mul_(weights, 1 - lr * weight_decay)
    torch._foreach_mul_(momentums, beta1)
    torch._foreach_add_(momentums, h, alpha=1 - beta1)
    torch._foreach_mul_(variances, beta2)
    torch._foreach_addcmul_(variances, h, h, value=1 - beta2)
    denom = torch._foreach_div(variances, bias2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(weights, momentums, denom, value=-lr / bias1)
    torch._foreach_copy_(params, weights)
