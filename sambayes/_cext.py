"""The "cpu" and "cuda" tiers: fused kernels of the C++/CUDA extension ``sambayes._C``.

One op call per phase per (device, dtype) group, whatever the number of tensors:
multithreaded, vectorized C++ loops on CPU tensors and one CUDA launch on CUDA
tensors, both running the per-element math of ``csrc/sambayes_math.h`` (the
Philox noise included, equal to :mod:`sambayes._philox`). Same functions and
arguments as :mod:`sambayes._eager`; see there for the contract.

The ops are registered with ``torch.library`` as ``torch.ops.sambayes_C.*``, with
fake implementations here, so that ``torch.compile`` can trace around them.
Tensors that are not contiguous (e.g. channels_last weights) go through the eager
tier, since the kernels index memory flat.
"""

from __future__ import annotations

import torch

from . import _eager

try:
    from . import _C
except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """None if this module can run tier ``name`` ("cpu" or "cuda") on ``device``, else why not."""
    device = torch.device(device)
    if _C is None:
        if _IMPORT_ERROR and "No module named 'sambayes._C'" in _IMPORT_ERROR:
            what = "the C++ extension sambayes._C was not built"
        else:
            what = f"the C++ extension sambayes._C does not load ({_IMPORT_ERROR})"
        return (
            f"{what}; rebuild it with `pip install --no-build-isolation -e .` (a C++ compiler and PyTorch "
            "are all it needs) and read the build output for the reason it failed"
        )
    if name == "cuda":
        if not _C.cuda_compiled:
            return f"sambayes._C has no CUDA kernels: {_C.cuda_note}"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is visible to PyTorch"
    return None


def has_kernels(device: torch.device | str) -> bool:
    """True if the extension has kernels for ``device``'s type (CPU, or CUDA when compiled)."""
    device = torch.device(device)
    return device.type in ("cpu", "cuda") and why_unavailable(device.type, device) is None


def randn_range(seed: int, start: int, numel: int, device=None) -> torch.Tensor:
    """``sambayes._philox.randn_range`` from the compiled Philox: z(seed, start + i), float32 [numel]."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        _ops().philox_randn_(out, seed, start)
    return out


def philox_words(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The four Philox4x32-10 words per offset, int64 [n, 4] holding uint32 values (CPU; for tests)."""
    return _ops().philox_words(offsets.cpu(), seed)


def _ops():
    if _C is None:
        raise RuntimeError(why_unavailable("cpu", "cpu"))
    return torch.ops.sambayes_C


def _contiguous(*lists) -> bool:
    return all(t.is_contiguous() for tensors in lists for t in tensors)


def _dense(grads):
    # gradients are only read: a contiguous copy is as good
    return [g if g.is_contiguous() else g.contiguous() for g in grads]


@torch.no_grad()
def bsam_sample(params, means, precisions, offsets, *, num_data: float, seed: int) -> None:
    """θ = m + z / sqrt(N·s), z = Philox noise at ``offsets[i] + element index``."""
    if not params:
        return
    if not _contiguous(params, means, precisions):
        return _eager.bsam_sample(params, means, precisions, offsets, num_data=num_data, seed=seed)
    _ops().bsam_sample(params, means, precisions, [int(o) for o in offsets], float(num_data), int(seed))


@torch.no_grad()
def bsam_perturb(params, grads, means, precisions, stats, *, rho: float, accumulate: bool) -> None:
    """θ = m + ρ·g/s; stats (+)= sqrt(s)·|g|."""
    if not params:
        return
    if not _contiguous(params, means, precisions, stats):
        return _eager.bsam_perturb(params, grads, means, precisions, stats, rho=rho, accumulate=accumulate)
    _ops().bsam_perturb(params, _dense(grads), means, precisions, stats, float(rho), bool(accumulate))


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
    """Momentum, mean (with the old precision), precision, then θ = m; grads and stats are sums over ``splits``."""
    if not params:
        return
    if not _contiguous(params, means, precisions, momentums, stats):
        return _eager.bsam_update(
            params,
            grads,
            means,
            precisions,
            momentums,
            stats,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            damping=damping,
            splits=splits,
        )
    _ops().bsam_update(
        params,
        _dense(grads),
        means,
        precisions,
        momentums,
        stats,
        float(lr),
        float(beta1),
        float(beta2),
        float(weight_decay),
        float(damping),
        int(splits),
    )


@torch.no_grad()
def restore(params, weights) -> None:
    """θ = m (or w for SAM)."""
    if not params:
        return
    if not _contiguous(params, weights):
        return _eager.restore(params, weights)
    _ops().restore(params, weights)


@torch.no_grad()
def sam_sq_norm(grads, weights, *, adaptive: bool) -> torch.Tensor:
    """Σ (T·g)², T = |w| if adaptive else 1: a 0-dim tensor in the state dtype, on the device."""
    if not grads or not _contiguous(weights):
        return _eager.sam_sq_norm(grads, weights, adaptive=adaptive)
    return _ops().sam_sq_norm(_dense(grads), weights, bool(adaptive))


@torch.no_grad()
def sam_perturb(params, grads, weights, *, scale: torch.Tensor, adaptive: bool) -> None:
    """w' = w + scale·T²·g; ``scale`` a 0-dim tensor on the device (no host sync on CUDA)."""
    if not params:
        return
    if not _contiguous(params, weights):
        return _eager.sam_perturb(params, grads, weights, scale=scale, adaptive=adaptive)
    _ops().sam_perturb(params, _dense(grads), weights, scale, bool(adaptive))


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
    if not params:
        return
    if not _contiguous(params, weights, momentums):
        return _eager.sam_update_sgd(
            params,
            grads,
            weights,
            momentums,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            splits=splits,
        )
    _ops().sam_update_sgd(
        params,
        _dense(grads),
        weights,
        momentums,
        float(lr),
        float(momentum),
        float(weight_decay),
        bool(nesterov),
        int(splits),
    )


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
    if not params:
        return
    if not _contiguous(params, weights, momentums, variances):
        return _eager.sam_update_adamw(
            params,
            grads,
            weights,
            momentums,
            variances,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
            splits=splits,
        )
    _ops().sam_update_adamw(
        params,
        _dense(grads),
        weights,
        momentums,
        variances,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        int(step),
        int(splits),
    )


def _register_fakes() -> None:
    """Shape-only implementations, so that torch.compile traces the ops without running them."""

    def nothing(*args, **kwargs):
        return None

    for op in (
        "bsam_sample",
        "bsam_perturb",
        "bsam_update",
        "restore",
        "sam_perturb",
        "sam_update_sgd",
        "sam_update_adamw",
        "philox_randn_",
    ):
        torch.library.register_fake(f"sambayes_C::{op}", nothing)

    @torch.library.register_fake("sambayes_C::sam_sq_norm")
    def _(grads, weights, adaptive):
        return weights[0].new_empty(())

    @torch.library.register_fake("sambayes_C::philox_words")
    def _(offsets, seed):
        return offsets.new_empty((offsets.numel(), 4), dtype=torch.int64)


if _C is not None:
    _register_fakes()
