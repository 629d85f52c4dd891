"""The BatchNorm policy of the two passes: which pass updates the running statistics."""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm

BN_POLICIES = ("noisy", "perturbed", "both")


def set_bn_stats_frozen(model: torch.nn.Module, frozen: bool, saved: list | None = None) -> list:
    """Stop (or resume) updates of BatchNorm running statistics; the forward pass is unchanged.

    A BatchNorm in training mode with ``track_running_stats=False`` normalises with
    the batch statistics, as before, but passes no running buffers, so they and
    ``num_batches_tracked`` stay as they are. Returns what to pass back to undo it
    (the layers it stopped: one walk over the model).
    """
    if frozen:
        saved = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        for m in saved:
            m.track_running_stats = False
        return saved
    for m in saved or []:
        m.track_running_stats = True
    return []


def freeze(model: torch.nn.Module | None, saved: list | None, frozen: bool) -> list | None:
    """Freeze (``frozen``) or resume the statistics of ``model``'s BatchNorm layers for the next pass;
    ``saved``: what the last call froze (None: nothing). Returns what is frozen now."""
    if model is None or frozen == (saved is not None):
        return saved
    if frozen:
        return set_bn_stats_frozen(model, True)
    set_bn_stats_frozen(model, False, saved)
    return None


def warn_if_bare(params: list[torch.Tensor], name: str, stacklevel: int) -> None:
    """For an optimizer given bare parameters (no module): warn when a BatchNorm layer in training use owns
    some of them, since its running statistics then update in both passes of each step; the fix is to pass
    the module. The layers are found among the live objects (once, at construction). ``stacklevel``: the
    caller's frame to point at, counted from the caller."""
    ours = {id(p) for p in params}
    for obj in gc.get_objects():
        if (
            issubclass(type(obj), _BatchNorm)  # not isinstance: no __class__ lookups on proxies (deprecated names)
            and obj.track_running_stats
            and any(id(p) in ours for p in obj.parameters(recurse=False))
        ):
            warnings.warn(
                f"{name} was given bare parameters of a model with BatchNorm layers: their running statistics "
                f"update in both passes of every step, where bn_stats='noisy' (the default) wants the noisy pass "
                f"only. Pass the module: {name}(model, ...) or model=model",
                UserWarning,
                stacklevel=stacklevel + 1,
            )
            return


@contextlib.contextmanager
def frozen_bn_stats(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``model`` do not update their running
    statistics (mean, variance, batch count); outputs are unchanged."""
    saved = set_bn_stats_frozen(model, True)
    try:
        yield
    finally:
        set_bn_stats_frozen(model, False, saved)
