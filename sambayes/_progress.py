"""What lives across steps and goes into checkpoints: each group's step counters, and the report
of skipped steps (docs/architecture.md).

Per group: ``group["step"]`` (updates taken) and ``group["skipped_steps"]`` (steps skipped for a
non-finite gradient) are 0-dim tensors on the group's device, counted there without a host sync;
``group["attempts"]`` (their sum) is a host int, which the noise seeds count. A checkpoint holds
them as plain numbers (torch.optim keeps counters in the groups too).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ._arguments import caller_stacklevel
from ._ledger import trainable


def counters(group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's (step, skipped_steps) as 0-dim tensors on its device (numbers after a checkpoint
    load or at construction become tensors here)."""
    params = trainable(group) or group["params"]
    device = params[0].device if params and not params[0].is_meta else torch.device("cpu")  # meta: no values yet
    for key, dtype in (("step", torch.float64), ("skipped_steps", torch.int64)):
        value = group[key]
        if not isinstance(value, torch.Tensor) or value.device != device:
            with torch.inference_mode(False):  # read under inference mode (a validation loop), counted outside
                group[key] = torch.as_tensor(value, dtype=dtype).to(device)
    return group["step"], group["skipped_steps"]


def attempts(group: dict[str, Any], on_device: bool) -> int | torch.Tensor:
    """The group's attempts before the step that starts now: the host count, or (``on_device``, for
    capturable=True) step + skipped_steps as a 0-dim int64 tensor computed on the device, so that a
    captured step replays with the count the device holds then."""
    if not on_device:
        return group["attempts"]
    step, skipped = counters(group)
    return step.long() + skipped


def count(group: dict[str, Any], flag: torch.Tensor) -> None:
    """On the device: step += 1 unless ``flag`` (a skipped step), skipped_steps += 1 if it; on the host:
    attempts += 1."""
    step, skipped = counters(group)
    flag = flag.to(step.device)
    step.add_(1 - flag.double())
    skipped.add_(flag.long())
    group["attempts"] += 1


def numbers(group: dict[str, Any]) -> dict[str, int]:
    """The counters as a checkpoint keeps them: plain ints (attempts too, which a load recomputes, since
    torch.distributed.checkpoint's flattened state dicts expect every key of the live groups)."""
    step, skipped = counters(group)
    return {"step": int(step), "skipped_steps": int(skipped), "attempts": int(step) + int(skipped)}


def loaded(group: dict[str, Any]) -> None:
    """The counters of a group just loaded from a checkpoint, as ints (attempts = their sum)."""
    group["step"], group["skipped_steps"] = int(group["step"]), int(group["skipped_steps"])
    group["attempts"] = group["step"] + group["skipped_steps"]


class HostCopy:
    """A 0-dim int64 device value on its way to the host, without waiting for it: a pinned copy and an event
    on a GPU, a plain copy on the CPU; :meth:`ready` asks, :meth:`read` waits and reads."""

    def __init__(self, value: torch.Tensor) -> None:
        pinned = value.device.type == "cuda"
        self.host = torch.empty((), dtype=torch.int64, pin_memory=pinned)
        self.host.copy_(value, non_blocking=pinned)
        self.event = None
        if pinned:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(value.device))  # the copy's stream, whatever the current device

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def read(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        # the bytes of our own host copy: not Tensor.item(), which the no-host-sync tests forbid
        return int.from_bytes(bytes(self.host.untyped_storage().tolist()), "little", signed=True)


class SkipReport:
    """Warns about steps skipped since the last report, once their count has reached the host.

    After each update the total skipped count is copied to host memory without waiting (:meth:`send`);
    :meth:`receive` reads it when the copy is done (at once on the CPU; on a GPU at a later step), or,
    with ``wait``, after waiting for it (``skipped_steps``, ``state_dict()``). ``capturable=True``
    copies nothing per step: the count is copied and read only with ``wait``.

    ``weights()``: the tensors the model holds at rest. When a warning is due, a check whether they are
    finite starts the same way, and the first warning after its result reached the host says so when they
    are not (a step whose weights hold inf or NaN skips, and so does every later one).
    """

    def __init__(self, name: str, capturable: bool, weights: Callable[[], list[torch.Tensor]]) -> None:
        self.name, self.capturable, self.weights = name, capturable, weights
        self.in_flight: tuple[HostCopy, bool] | None = None  # (the skipped count on its way, warn)
        self.weights_check: HostCopy | None = None  # the count of non-finite weight tensors on its way
        self.reported = 0  # the count already warned about

    def send(self, param_groups: list[dict[str, Any]], warn: bool, now: bool = False) -> None:
        """Start copying the total skipped count to the host (no wait); with ``capturable=True`` only
        ``now`` (a copy to the host would be part of a captured step)."""
        if self.capturable and not now:
            return
        skipped = [counters(group)[1] for group in param_groups]
        total = skipped[0] if len(skipped) == 1 else torch.stack([c.to(skipped[0].device) for c in skipped]).amax()
        self.in_flight = (HostCopy(total), warn)

    def receive(self, param_groups: list[dict[str, Any]], *, wait: bool = False) -> None:
        """Warn if the count that reached the host has grown (``wait``: wait for it first)."""
        if self.in_flight is None and wait and self.capturable:
            self.send(param_groups, warn=True, now=True)
        if self.in_flight is None or not (wait or self.in_flight[0].ready()):
            return
        copy, warn = self.in_flight
        total = copy.read()
        self.in_flight = None
        if total > self.reported and warn:
            warnings.warn(
                f"{self.name}: non-finite gradient, step skipped (skipped so far: {total}){self._weights_note()}",
                RuntimeWarning,
                stacklevel=caller_stacklevel(),
            )
        self.reported = max(self.reported, total)

    def _weights_note(self) -> str:
        """What the last check of the weights found (started now if none is on its way; on the CPU it is done
        at once), as the warning's last words."""
        if self.weights_check is None:
            weights = [t for t in self.weights() if t.numel()]
            if weights:
                bad = [(~torch.isfinite(t)).any() for t in weights]
                self.weights_check = HostCopy(torch.stack([b.to(bad[0].device) for b in bad]).sum())
        if self.weights_check is None or not self.weights_check.ready():
            return ""
        bad, self.weights_check = self.weights_check.read(), None
        if not bad:
            return ""
        return (
            f"; {bad} weight tensors hold inf or NaN, so every step will skip until they are reset: "
            "load a checkpoint from before they diverged"
        )
