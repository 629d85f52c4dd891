"""The eager backend: per-tensor PyTorch ops that read like ALGORITHM.md. The executable spec.

One bSAM step (ALGORITHM.md, "bSAM, one step"), and the phase that computes each line::

    for j in 1..k:
        θ = m + z_j / sqrt(N·s)                   bsam_sample
        g_j = ∇ L_Bj(θ)                           backward pass into the zeroed .grad
        θ = m + ρ·g_j / s                         bsam_perturb (.grad consumed, zeroed)
        curvature_sum += sqrt(s)·|g_j|            bsam_perturb (sum over j)
        h_j = ∇ L_Bj(θ)                           backward pass into the zeroed .grad
        grad_sum += h_j                           fold_grads (k > 1; float32 for low-precision
                                                  parameters); find_nonfinite checks h (k = 1)
    h̄ = grad_sum / k ;  ā = curvature_sum / k     bsam_update: the means over sub-batches
    g_m = β1·g_m + (1 − β1)·(h̄ + δ·m)             bsam_update
    m   = m − α·g_m / s                           bsam_update (old precision)
    s   = β2·s + (1 − β2)·(ā + δ + γ)             bsam_update
    θ   = m                                       bsam_update

SAM-SGD: ``restore`` (w), backward, ``sam_sq_norm`` (‖g_j‖²), ``sam_perturb``
(w + ρ·g_j/‖g_j‖), backward, ``fold_grads``; then ``sam_update_sgd`` or
``sam_update_adamw`` on h̄ = grad_sum / k.

IVON (docs/ivon.md), one pass per sample j of k: ``bsam_sample`` (θ = m + z_j/sqrt(ess·s)),
backward, ``ivon_accumulate`` (the sums over samples of g_j and of z_j·g_j or g_j²; with one
sample on one replica the update computes the curvature itself), then ``ivon_update``.

A step is skipped (state untouched, θ back at rest) when a gradient of either pass is
inf or NaN: the phases that read a gradient set the step's ``found_inf`` flag (a float32
0-dim tensor per device, as torch's GradScaler keeps it) and the update reads it. They
also unscale what they read by ``inv_scale`` (1/scale of a GradScaler, else 1), and a
phase that consumes a gradient zeroes it: the next backward pass accumulates into it.

Every backend exposes these functions with these arguments (:mod:`sambayes.backends`
calls them). Each call gets the tensors of one bucket as parallel lists:

- ``params``: the model's parameters (float64/32, bfloat16, float16), written in place;
- ``grads``, ``grad_sums``: their gradient buffers (at update time: the sum over
  sub-batches), in the parameter dtype;
- state (``means``, ``precisions``, ``momentums``, ``curvature_sums``, ``weights``,
  ``variances``) and the running sums of ``fold_grads``: float64 for float64
  parameters, float32 otherwise; with ``BSAM(state_dtype=torch.bfloat16)``, bSAM's
  ``precisions`` and ``momentums`` are bfloat16 (stored with stochastic rounding);
- ``offsets``: each tensor's first element index in its group's flat concatenation
  (the noise's and the rounding stream's element index);
- the step scalars ``seed`` (a Philox key in [0, 2^63)) and ``lr``: Python numbers, or 0-dim
  int64 / float64 tensors on the bucket's device, which the fused backends read on the device
  (``capturable=True``: a CUDA graph replays the step with the values they hold then).

All math runs in the state dtype (the mean's). The noise z comes from :mod:`sambayes._philox`, the
reference generator; this module depends on nothing else of the package. The eager
backend decides on the host whether a step is skipped; the others decide on the device.
"""

from __future__ import annotations

import torch

from .. import _philox


@torch.no_grad()
def bsam_sample(params, means, precisions, offsets, *, num_data: float, seed: int) -> None:
    """θ = m + z / sqrt(N·s): a sample of the posterior, z ~ N(0, I) from Philox."""
    # z of element i of the group's flat concatenation (ALGORITHM.md, "Noise")
    for param, mean, precision, z in zip(params, means, precisions, _philox.randn_tensors(seed, offsets, means)):
        # noisy sample
        param.copy_(mean + z / torch.sqrt(num_data * precision.to(mean.dtype)))


@torch.no_grad()
def bsam_perturb(
    params, grads, means, precisions, curvature_sums, found_inf, inv_scale, *, rho: float, accumulate: bool
) -> None:
    """θ = m + ρ·g/s (from the mean, not the noisy point); curvature_sum (+)= sqrt(s)·|g|."""
    for param, grad, mean, precision, curvature_sum in zip(params, grads, means, precisions, curvature_sums):
        g = grad.to(mean.dtype) * inv_scale
        _flag_nonfinite(g, found_inf)
        s = precision.to(mean.dtype)
        # adversarial point
        param.copy_(mean + rho * g / s)
        # curvature estimate of the precision update, summed over sub-batches
        a = torch.sqrt(s) * g.abs()
        curvature_sum.copy_(curvature_sum + a if accumulate else a)
        grad.zero_()


@torch.no_grad()
def find_nonfinite(grads, found_inf) -> None:
    """found_inf = 1 if a gradient is inf or NaN (the perturbed-point gradient, k = 1)."""
    for grad in grads:
        _flag_nonfinite(grad, found_inf)


@torch.no_grad()
def fold_grads(grads, grad_sums, found_inf, *, first: bool, last: bool) -> None:
    """grad_sum (+)= h_j in the state dtype; the last sub-batch puts the total back in .grad.
    found_inf = 1 if the sum is inf or NaN, as rounded into .grad at the end (where a float16 sum
    of finite gradients may overflow)."""
    for grad, grad_sum in zip(grads, grad_sums):
        _fold(grad, grad_sum, grad.to(grad_sum.dtype), found_inf, first, last)


def _fold(grad, grad_sum, g, found_inf, first: bool, last: bool) -> None:
    """g, a pass's gradient in the state dtype, joins grad_sum (and .grad is zeroed for the next pass); the last
    pass puts the total back in .grad instead (``first`` and ``last``: .grad keeps g)."""
    total = g if first else grad_sum + g
    if last:
        grad.copy_(total)
        _flag_nonfinite(grad, found_inf)
    else:
        _flag_nonfinite(total, found_inf)
        grad_sum.copy_(total)
        grad.zero_()


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
    """Momentum, mean (with the old precision), precision, then θ = m; a skipped step only θ = m.
    bfloat16 precision and momentum: computed in the mean's dtype, stored with stochastic rounding
    (the rounding stream ``seed``, element index ``offsets[i] + k``; see :mod:`sambayes._philox`)."""
    skip = bool(found_inf)
    for param, grad_sum, mean, precision, momentum, curvature_sum, offset in zip(
        params, grad_sums, means, precisions, momentums, curvature_sums, offsets
    ):
        if not skip:
            # the means over the k sub-batches
            h = grad_sum.to(mean.dtype) * inv_scale / splits
            a = curvature_sum / splits
            s, g_m = precision.to(mean.dtype), momentum.to(mean.dtype)
            # momentum
            g_m = beta1 * g_m + (1 - beta1) * (h + weight_decay * mean)
            # mean step, divided by the precision before this step's update
            mean.copy_(mean - lr * g_m / s)
            # precision
            s = beta2 * s + (1 - beta2) * (a + weight_decay + damping)
            if precision.dtype == torch.bfloat16:  # unbiased: increments below half an ulp survive on average
                word = _philox.rounding_words(seed, offset, precision.numel(), precision.device).view(precision.shape)
                s, g_m = _philox.round_stochastic(s, word >> 16), _philox.round_stochastic(g_m, word & 0xFFFF)
            precision.copy_(s)
            momentum.copy_(g_m)
        # the model holds the mean between steps
        param.copy_(mean)
        grad_sum.zero_()


@torch.no_grad()
def restore(params, weights) -> None:
    """θ = m (or w for SAM): the model back at rest."""
    for param, weight in zip(params, weights):
        param.copy_(weight)


@torch.no_grad()
def sam_sq_norm(grads, weights, found_inf, inv_scale, *, adaptive: bool) -> torch.Tensor:
    """Σ (T·g)², T = |w| if adaptive else 1, as a 0-dim tensor in the state dtype."""
    total = torch.zeros((), dtype=weights[0].dtype, device=weights[0].device)
    for grad, weight in zip(grads, weights):
        g = grad.to(weight.dtype) * inv_scale
        _flag_nonfinite(g, found_inf)
        tg = g * (weight.abs() if adaptive else 1.0)
        total = total + (tg * tg).sum()
    return total


@torch.no_grad()
def sam_perturb(params, grads, weights, inv_scale, *, scale: torch.Tensor, adaptive: bool) -> None:
    """w' = w + scale·T²·g with scale = ρ/‖T·g‖₂ (a 0-dim tensor: no host sync)."""
    for param, grad, weight in zip(params, grads, weights):
        g = grad.to(weight.dtype) * inv_scale
        # adversarial point
        param.copy_(weight + scale * (weight * weight if adaptive else 1.0) * g)
        grad.zero_()


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
    """Heavy ball on the mean perturbed-point gradient, then θ = w; a skipped step only θ = w."""
    skip = bool(found_inf)
    for param, grad_sum, weight, buf in zip(params, grad_sums, weights, momentums):
        if not skip:
            d = grad_sum.to(weight.dtype) * inv_scale / splits + weight_decay * weight
            # heavy ball, no dampening
            buf.copy_(momentum * buf + d)
            # nesterov looks ahead along the new buffer
            direction = d + momentum * buf if nesterov else buf
            weight.copy_(weight - lr * direction)
        param.copy_(weight)
        grad_sum.zero_()


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
    """AdamW on the mean perturbed-point gradient, then θ = w; a skipped step only θ = w.
    ``step``: updates taken, counting this one (a 0-dim float64 tensor)."""
    skip = bool(found_inf)
    bias1, bias2 = 1 - beta1 ** float(step), 1 - beta2 ** float(step)
    for param, grad_sum, weight, momentum, variance in zip(params, grad_sums, weights, momentums, variances):
        if not skip:
            h = grad_sum.to(weight.dtype) * inv_scale / splits
            # decoupled weight decay
            weight.copy_(weight * (1 - lr * weight_decay))
            momentum.copy_(beta1 * momentum + (1 - beta1) * h)
            variance.copy_(beta2 * variance + (1 - beta2) * h * h)
            denom = torch.sqrt(variance / bias2) + eps
            weight.copy_(weight - (lr / bias1) * momentum / denom)
        param.copy_(weight)
        grad_sum.zero_()


@torch.no_grad()
def ivon_accumulate(
    grads, grad_sums, curvature_sums, offsets, found_inf, *, seed: int, price: bool, first: bool, last: bool
) -> None:
    """Sample j's gradient g joins the sums over samples, in the state dtype and unscaled (the update unscales):
    grad_sum (+)= g and curvature_sum (+)= z·g (``price``: z the sample's noise, Philox(``seed``) at element
    ``offsets[i] + k``) or g² (gradsq). g is consumed (zeroed); ``last``: the gradient sum goes into .grad
    instead (``first`` and ``last``: .grad keeps g). found_inf = 1 if the sum is inf or NaN, as rounded into
    .grad at the last sample."""
    noise = _philox.randn_tensors(seed, offsets, curvature_sums) if price else [None] * len(grads)
    for grad, grad_sum, curvature_sum, z in zip(grads, grad_sums, curvature_sums, noise):
        g = grad.to(curvature_sum.dtype)
        # the sample's curvature estimate: Price's theorem (z·g), or the squared gradient
        c = z * g if price else g * g
        curvature_sum.copy_(c if first else curvature_sum + c)
        # the gradient sum over samples, as fold_grads sums sub-batches
        _fold(grad, grad_sum, g, found_inf, first, last)


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
    """IVON's update (docs/ivon.md): momentum, Hessian h = s − δ, then the mean with the new precision
    s = h + δ, clipped, and θ = m; a skipped step only θ = m. ``step``: updates taken counting this one (a
    0-dim float64 tensor; debiasing). ``summed``: the curvature from the sums over samples; else (one sample,
    one replica) from .grad and the noise of ``noise_seed`` (curvature_sums not read). bfloat16 precision and
    momentum: stored with stochastic rounding, as bsam_update's."""
    skip = bool(found_inf)
    bias1 = 1 - beta1 ** float(step) if debias else 1.0
    # one sample (not summed) with Price's estimator: its noise z, regenerated
    noise = _philox.randn_tensors(noise_seed, offsets, means) if price and not summed else curvature_sums
    for param, grad_sum, mean, precision, momentum, curvature_sum, z, offset in zip(
        params, grad_sums, means, precisions, momentums, curvature_sums, noise, offsets
    ):
        if not skip:
            # the mean gradient over the k samples, unscaled
            g = grad_sum.to(mean.dtype) * inv_scale / splits
            # the mean curvature estimate: from the sums (unscaled; gradsq's squares twice), or the one sample's
            if summed:
                c = (curvature_sum * inv_scale if price else curvature_sum * inv_scale * inv_scale) / splits
            else:
                c = z * g if price else g * g
            s, g_m = precision.to(mean.dtype), momentum.to(mean.dtype)
            h = s - weight_decay
            # the expected Hessian of the loss: by Price's theorem sqrt(ess·s)·E[z·g], or ess·E[g²]
            f = torch.sqrt(ess * s) * c if price else ess * c
            # momentum
            g_m = beta1 * g_m + (1 - beta1) * g
            # Hessian, with the correction that keeps it positive
            h = beta2 * h + (1 - beta2) * f + 0.5 * (1 - beta2) ** 2 * (h - f).square() / s
            s = h + weight_decay
            # mean step, with the new precision, clipped
            mean.copy_(mean - lr * torch.clamp((g_m / bias1 + weight_decay * mean) / s, -clip_radius, clip_radius))
            if precision.dtype == torch.bfloat16:  # unbiased: increments below half an ulp survive on average
                word = _philox.rounding_words(seed, offset, precision.numel(), precision.device).view(precision.shape)
                s, g_m = _philox.round_stochastic(s, word >> 16), _philox.round_stochastic(g_m, word & 0xFFFF)
            precision.copy_(s)
            momentum.copy_(g_m)
        # the model holds the mean between steps
        param.copy_(mean)
        grad_sum.zero_()


def _flag_nonfinite(x: torch.Tensor, found_inf: torch.Tensor) -> None:
    """found_inf = 1 if x holds an inf or NaN (the max-norm: no overflow, unlike a 2-norm)."""
    if x.numel() and not torch.isfinite(x).all():
        found_inf.fill_(1.0)
