"""The eager tier: per-tensor PyTorch ops that read like ALGORITHM.md. The executable spec.

Every tier (this one, ``_foreach``, ``_triton``, ``_cext``) exposes the same
functions with the same arguments. Each call receives the tensors of one
(device, dtype) group of one parameter group, as parallel lists:

- ``params``: the model's parameters (float64/32, bfloat16, float16), written in place;
- ``grads``: their gradients, same dtype;
- state (``means``, ``precisions``, ``momentums``, ``stats``, ``weights``,
  ``variances``): float64 for float64 parameters, float32 otherwise.

All math runs in the state dtype. ``stats`` holds the running sum over
sub-batches of the precision statistic sqrt(s)*|g|; ``grads`` at update time
holds the running sum of the perturbed-point gradients.
"""

from __future__ import annotations

import torch

from . import _cext, _philox


def _noise(seed: int, offset: int, like: torch.Tensor) -> torch.Tensor:
    # z for elements offset .. offset + numel of the group's flat concatenation; the compiled
    # Philox when built (same words, z within a few float32 ulps), else the integer-op emulation
    draw = _cext.randn_range if _cext_kernels(like.device) else _philox.randn_range
    z = draw(seed, offset, like.numel(), device=like.device)
    return z.view(like.shape).to(like.dtype)


def _cext_kernels(device: torch.device) -> bool:
    try:
        return _cext.has_kernels(device)
    except Exception:  # noqa: BLE001 - an unbuilt or broken extension just means: emulate
        return False


@torch.no_grad()
def bsam_sample(params, means, precisions, offsets, *, num_data: float, seed: int) -> None:
    """θ = m + z / sqrt(N·s): a sample of the posterior, z ~ N(0, I) from Philox."""
    for param, mean, precision, offset in zip(params, means, precisions, offsets):
        z = _noise(seed, offset, mean)
        # noisy sample
        param.copy_(mean + z / torch.sqrt(num_data * precision))


@torch.no_grad()
def bsam_perturb(params, grads, means, precisions, stats, *, rho: float, accumulate: bool) -> None:
    """θ = m + ρ·g/s (from the mean, not the noisy point); stats += sqrt(s)·|g|."""
    for param, grad, mean, precision, stat in zip(params, grads, means, precisions, stats):
        g = grad.to(mean.dtype)
        # adversarial point
        param.copy_(mean + rho * g / precision)
        # precision statistic, summed over sub-batches
        a = torch.sqrt(precision) * g.abs()
        stat.copy_(stat + a if accumulate else a)


@torch.no_grad()
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
    for param, grad, mean, precision, momentum, stat in zip(params, grads, means, precisions, momentums, stats):
        h = grad.to(mean.dtype) / splits
        a = stat / splits
        # momentum
        momentum.copy_(beta1 * momentum + (1 - beta1) * (h + weight_decay * mean))
        # mean step, divided by the precision before this step's update
        mean.copy_(mean - lr * momentum / precision)
        # precision
        precision.copy_(beta2 * precision + (1 - beta2) * (a + weight_decay + damping))
        # the model holds the mean between steps
        param.copy_(mean)


@torch.no_grad()
def restore(params, weights) -> None:
    """θ = m (or w for SAM): the model back at rest."""
    for param, weight in zip(params, weights):
        param.copy_(weight)


@torch.no_grad()
def sam_sq_norm(grads, weights, *, adaptive: bool) -> torch.Tensor:
    """Σ (T·g)², T = |w| if adaptive else 1, as a 0-dim tensor in the state dtype."""
    total = torch.zeros((), dtype=weights[0].dtype, device=weights[0].device)
    for grad, weight in zip(grads, weights):
        tg = grad.to(weight.dtype) * (weight.abs() if adaptive else 1.0)
        total = total + (tg * tg).sum()
    return total


@torch.no_grad()
def sam_perturb(params, grads, weights, *, scale: torch.Tensor, adaptive: bool) -> None:
    """w' = w + scale·T²·g with scale = ρ/‖T·g‖₂ (a 0-dim tensor: no host sync)."""
    for param, grad, weight in zip(params, grads, weights):
        g = grad.to(weight.dtype)
        # adversarial point
        param.copy_(weight + scale * (weight * weight if adaptive else 1.0) * g)


@torch.no_grad()
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
    for param, grad, weight, buf in zip(params, grads, weights, momentums):
        d = grad.to(weight.dtype) / splits + weight_decay * weight
        # heavy ball, no dampening
        buf.copy_(momentum * buf + d)
        # nesterov looks ahead along the new buffer
        direction = d + momentum * buf if nesterov else buf
        weight.copy_(weight - lr * direction)
        param.copy_(weight)


@torch.no_grad()
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
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    for param, grad, weight, m, v in zip(params, grads, weights, momentums, variances):
        h = grad.to(weight.dtype) / splits
        # decoupled weight decay
        weight.copy_(weight * (1 - lr * weight_decay))
        m.copy_(beta1 * m + (1 - beta1) * h)
        v.copy_(beta2 * v + (1 - beta2) * h * h)
        denom = torch.sqrt(v / bias2) + eps
        weight.copy_(weight - (lr / bias1) * m / denom)
        param.copy_(weight)
