"""The one place that touches ``torch.amp.GradScaler``'s private state (tests/test_skipping.py pins it to the
supported PyTorch versions).

The optimizers unscale gradients inside their kernels and decide skipping on the device, so they
read the scaler's scale without a host sync and hand it the step's found-inf flag as the scaler's
own ``unscale_`` would have. ``GradScaler.step(optimizer, closure)`` works through torch's contract
for optimizers that scale themselves (``_step_supports_amp_scaling``): it calls
``optimizer.step(closure, grad_scaler=scaler)`` (with torch's FutureWarning), once the scaler has a scale:
torch checks for one before the closure's first ``scale(loss)``, so the very first step must be
``optimizer.step(closure, grad_scaler=scaler)`` (or follow a ``scaler.scale(...)``).
"""

from __future__ import annotations

import torch


def enabled(grad_scaler: torch.amp.GradScaler | None) -> bool:
    return grad_scaler is not None and grad_scaler.is_enabled()


def inv_scale(grad_scaler: torch.amp.GradScaler, devices: list[torch.device]) -> dict[torch.device, torch.Tensor]:
    """1/scale on each device, read from the scaler's device tensor (``get_scale()`` would sync)."""
    scale = grad_scaler._scale
    if scale is None:
        raise RuntimeError("grad_scaler has no scale yet: call grad_scaler.scale(loss).backward() in the closure")
    # as GradScaler.unscale_ computes it: the reciprocal in float64
    inv = scale.double().reciprocal().float()
    return {device: inv.to(device) for device in devices}


def record_found_inf(
    grad_scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, flags: dict[torch.device, torch.Tensor]
) -> None:
    """Hand the step's flag to the scaler as its own unscale_ would, so that update() backs off on it."""
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"] = {device: flag.clone() for device, flag in flags.items()}
    state["stage"] = torch.amp.grad_scaler.OptState.STEPPED
