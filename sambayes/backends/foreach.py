"""The foreach backend: the eager backend's math as ``torch._foreach_*`` ops, one kernel
launch per op for all tensors of a bucket. Same arguments as :mod:`.eager`; see there
for the contract. Like the fused backends, it decides on skipping on the device (no
host synchronisation): a skipped step keeps the state through ``torch.where``."""

from __future__ import annotations

import math

import torch

from .. import _philox


def _upcast(tensors, dtype):
    # gradients/params in bf16/fp16 are read in the state dtype
    return [t.to(dtype) for t in tensors] if tensors[0].dtype != dtype else list(tensors)


def _flag_nonfinite(tensors, found_inf) -> None:
    """found_inf = 1 if any tensor holds an inf or NaN: max-norms, on the device."""
    nonempty = [t for t in tensors if t.numel()]
    if nonempty:
        bad = (~torch.stack(torch._foreach_norm(nonempty, ord=math.inf)).isfinite()).any()
        found_inf.copy_(torch.maximum(found_inf, bad.to(found_inf.dtype)))


def _unless_skipped(found_inf, targets, values) -> None:
    """targets = values, except on a skipped step."""
    run = found_inf == 0
    torch._foreach_copy_(targets, [torch.where(run, v, t) for t, v in zip(targets, values)])


@torch.no_grad()
def bsam_sample(params, means, precisions, offsets, *, num_data: float, seed: int) -> None:
    z = _philox.randn_tensors(seed, offsets, means)
    std = torch._foreach_mul(_upcast(precisions, means[0].dtype), num_data)
    torch._foreach_sqrt_(std)
    torch._foreach_div_(z, std)
    torch._foreach_add_(z, means)
    torch._foreach_copy_(params, z)


@torch.no_grad()
def bsam_perturb(
    params, grads, means, precisions, curvature_sums, found_inf, inv_scale, *, rho: float, accumulate: bool
) -> None:
    g = torch._foreach_mul(_upcast(grads, means[0].dtype), inv_scale)
    _flag_nonfinite(g, found_inf)
    precisions = _upcast(precisions, means[0].dtype)
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
    torch._foreach_zero_(grads)


@torch.no_grad()
def find_nonfinite(grads, found_inf) -> None:
    _flag_nonfinite(grads, found_inf)


@torch.no_grad()
def fold_grads(grads, grad_sums, found_inf, *, first: bool, last: bool) -> None:
    _fold(grads, grad_sums, _upcast(grads, grad_sums[0].dtype), found_inf, first, last)


def _fold(grads, grad_sums, g, found_inf, first: bool, last: bool) -> None:
    """g, a pass's gradients in the state dtype, join grad_sums (eager._fold)."""
    total = g if first else torch._foreach_add(grad_sums, g)
    if last:
        torch._foreach_copy_(grads, total)
        _flag_nonfinite(grads, found_inf)  # the sum as rounded into .grad: a float16 sum may overflow
    else:
        _flag_nonfinite(total, found_inf)
        torch._foreach_copy_(grad_sums, total)
        torch._foreach_zero_(grads)


@torch.no_grad()
def bsam_update(
    params,
    grad_sums,
    means,
    precisions,
    momentums,
    curvature_sums,
    offsets,
    found_inf,
    inv_scale,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    damping: float,
    splits: int,
    seed: int,
) -> None:
    dtype = means[0].dtype
    h = torch._foreach_mul(_upcast(grad_sums, dtype), inv_scale)
    torch._foreach_div_(h, splits)
    torch._foreach_add_(h, means, alpha=weight_decay)
    new_momentums = torch._foreach_mul(_upcast(momentums, dtype), beta1)
    torch._foreach_add_(new_momentums, h, alpha=1 - beta1)
    if isinstance(lr, torch.Tensor):  # on the device (capturable): no Python number to fold in
        new_means = _minus_lr_times(means, torch._foreach_div(new_momentums, _upcast(precisions, dtype)), lr)
    else:
        new_means = torch._foreach_addcdiv(means, new_momentums, _upcast(precisions, dtype), value=-lr)
    a = torch._foreach_div(curvature_sums, splits)
    torch._foreach_add_(a, weight_decay + damping)
    new_precisions = torch._foreach_mul(_upcast(precisions, dtype), beta2)
    torch._foreach_add_(new_precisions, a, alpha=1 - beta2)
    if precisions[0].dtype == torch.bfloat16:  # stochastic rounding (see sambayes._philox), a tensor at a time
        new_precisions, new_momentums = _rounded_stochastically(new_precisions, new_momentums, offsets, seed)
    for targets, values in ((momentums, new_momentums), (means, new_means), (precisions, new_precisions)):
        _unless_skipped(found_inf, targets, values)
    torch._foreach_copy_(params, means)
    torch._foreach_zero_(grad_sums)


def _rounded_stochastically(precisions: list, momentums: list, offsets: list[int], seed: int) -> tuple[list, list]:
    """New float32 precisions and momentums as bfloat16, rounded stochastically: element k of tensor i takes the
    rounding word of element offsets[i] + k of the stream ``seed``, its high half for the precision."""
    rounded_precisions, rounded_momentums = [], []
    for precision, momentum, offset in zip(precisions, momentums, offsets):
        word = _philox.rounding_words(seed, offset, precision.numel(), precision.device).view(precision.shape)
        rounded_precisions.append(_philox.round_stochastic(precision, word >> 16))
        rounded_momentums.append(_philox.round_stochastic(momentum, word & 0xFFFF))
    return rounded_precisions, rounded_momentums


def _minus_lr_times(bases: list, directions: list, lr) -> list:
    """bases − lr·directions, new tensors; ``lr`` a number, or a 0-dim tensor on the device (read there)."""
    if isinstance(lr, torch.Tensor):
        return torch._foreach_sub(bases, torch._foreach_mul(directions, lr.to(bases[0].dtype)))
    return torch._foreach_add(bases, directions, alpha=-lr)


@torch.no_grad()
def restore(params, weights) -> None:
    torch._foreach_copy_(params, weights)


@torch.no_grad()
def sam_sq_norm(grads, weights, found_inf, inv_scale, *, adaptive: bool) -> torch.Tensor:
    g = torch._foreach_mul(_upcast(grads, weights[0].dtype), inv_scale)
    _flag_nonfinite(g, found_inf)
    if adaptive:
        g = torch._foreach_mul(g, torch._foreach_abs(weights))
    norms = torch._foreach_norm(g)
    return torch.stack(norms).square().sum()


@torch.no_grad()
def sam_perturb(params, grads, weights, inv_scale, *, scale: torch.Tensor, adaptive: bool) -> None:
    e = torch._foreach_mul(_upcast(grads, weights[0].dtype), inv_scale)
    torch._foreach_mul_(e, scale)
    if adaptive:
        torch._foreach_mul_(e, torch._foreach_mul(weights, weights))
    torch._foreach_add_(e, weights)
    torch._foreach_copy_(params, e)
    torch._foreach_zero_(grads)


@torch.no_grad()
def sam_update_sgd(
    params,
    grad_sums,
    weights,
    momentums,
    found_inf,
    inv_scale,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    splits: int,
) -> None:
    d = torch._foreach_mul(_upcast(grad_sums, weights[0].dtype), inv_scale)
    torch._foreach_div_(d, splits)
    torch._foreach_add_(d, weights, alpha=weight_decay)
    new_momentums = torch._foreach_mul(momentums, momentum)
    torch._foreach_add_(new_momentums, d)
    if nesterov:
        torch._foreach_add_(d, new_momentums, alpha=momentum)
    else:
        d = new_momentums
    new_weights = _minus_lr_times(weights, d, lr)
    _unless_skipped(found_inf, momentums, new_momentums)
    _unless_skipped(found_inf, weights, new_weights)
    torch._foreach_copy_(params, weights)
    torch._foreach_zero_(grad_sums)


@torch.no_grad()
def sam_update_adamw(
    params,
    grad_sums,
    weights,
    momentums,
    variances,
    found_inf,
    inv_scale,
    step,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    splits: int,
) -> None:
    # the bias corrections on the device, in float64 as the host would compute them
    bias2 = 1 - beta2**step
    step_size = lr / (1 - beta1**step)
    h = torch._foreach_mul(_upcast(grad_sums, weights[0].dtype), inv_scale)
    torch._foreach_div_(h, splits)
    decay = 1 - lr * weight_decay
    new_weights = torch._foreach_mul(weights, decay.to(weights[0].dtype) if isinstance(decay, torch.Tensor) else decay)
    new_momentums = torch._foreach_mul(momentums, beta1)
    torch._foreach_add_(new_momentums, h, alpha=1 - beta1)
    new_variances = torch._foreach_mul(variances, beta2)
    torch._foreach_addcmul_(new_variances, h, h, value=1 - beta2)
    denom = torch._foreach_div(new_variances, bias2.to(weights[0].dtype))
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(new_momentums, denom)
    torch._foreach_mul_(update, step_size.to(weights[0].dtype))
    torch._foreach_sub_(new_weights, update)
    for targets, values in ((momentums, new_momentums), (variances, new_variances), (weights, new_weights)):
        _unless_skipped(found_inf, targets, values)
    torch._foreach_copy_(params, weights)
    torch._foreach_zero_(grad_sums)


@torch.no_grad()
def ivon_accumulate(
    grads, grad_sums, curvature_sums, offsets, found_inf, *, seed: int, price: bool, first: bool, last: bool
) -> None:
    g = _upcast(grads, curvature_sums[0].dtype)
    c = (
        torch._foreach_mul(_philox.randn_tensors(seed, offsets, curvature_sums), g)
        if price
        else torch._foreach_mul(g, g)
    )
    if first:
        torch._foreach_copy_(curvature_sums, c)
    else:
        torch._foreach_add_(curvature_sums, c)
    _fold(grads, grad_sums, g, found_inf, first, last)


@torch.no_grad()
def ivon_update(
    params,
    grad_sums,
    means,
    precisions,
    momentums,
    curvature_sums,
    offsets,
    found_inf,
    inv_scale,
    step,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    ess: float,
    weight_decay: float,
    clip_radius: float,
    debias: bool,
    price: bool,
    summed: bool,
    splits: int,
    noise_seed: int,
    seed: int,
) -> None:
    dtype = means[0].dtype
    # the debiasing on the device, in float64 as the host would compute it
    bias1 = (1 - beta1**step).to(dtype) if debias else 1.0
    g = torch._foreach_mul(_upcast(grad_sums, dtype), inv_scale)
    torch._foreach_div_(g, splits)
    if summed:
        c = torch._foreach_mul(curvature_sums, inv_scale)
        if not price:
            torch._foreach_mul_(c, inv_scale)
        torch._foreach_div_(c, splits)
    else:
        c = torch._foreach_mul(_philox.randn_tensors(noise_seed, offsets, means) if price else g, g)
    s = _upcast(precisions, dtype)
    h = torch._foreach_sub(s, weight_decay)
    if price:
        f = torch._foreach_mul(s, ess)
        torch._foreach_sqrt_(f)
        torch._foreach_mul_(f, c)
    else:
        f = torch._foreach_mul(c, ess)
    new_momentums = torch._foreach_mul(_upcast(momentums, dtype), beta1)
    torch._foreach_add_(new_momentums, g, alpha=1 - beta1)
    # h = β2·h + (1 − β2)·f + ½(1 − β2)²·(h − f)²/s
    correction = torch._foreach_sub(h, f)
    torch._foreach_mul_(correction, correction)
    torch._foreach_mul_(correction, 0.5 * (1 - beta2) ** 2)
    torch._foreach_div_(correction, s)
    new_precisions = torch._foreach_mul(h, beta2)
    torch._foreach_add_(new_precisions, f, alpha=1 - beta2)
    torch._foreach_add_(new_precisions, correction)
    torch._foreach_add_(new_precisions, weight_decay)
    direction = torch._foreach_div(new_momentums, bias1)
    torch._foreach_add_(direction, means, alpha=weight_decay)
    torch._foreach_div_(direction, new_precisions)
    torch._foreach_clamp_min_(direction, -clip_radius)
    torch._foreach_clamp_max_(direction, clip_radius)
    new_means = _minus_lr_times(means, direction, lr)
    if precisions[0].dtype == torch.bfloat16:  # stochastic rounding (see sambayes._philox), a tensor at a time
        new_precisions, new_momentums = _rounded_stochastically(new_precisions, new_momentums, offsets, seed)
    for targets, values in ((momentums, new_momentums), (means, new_means), (precisions, new_precisions)):
        _unless_skipped(found_inf, targets, values)
    torch._foreach_copy_(params, means)
    torch._foreach_zero_(grad_sums)
