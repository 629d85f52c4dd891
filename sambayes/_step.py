"""The step in progress: what torch.optim's ``step()`` keeps in local variables, kept here as one
object because a step spans the calls of the phase API (docs/architecture.md).

Created by the first ``sample()`` of a step and dropped by ``update()`` or ``abort()``. A step is

    at rest → sampled → perturbed → (sampled → perturbed)* → at rest

one ``sample()`` and one ``perturb()`` per sub-batch, then ``update()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import _amp, backends
from ._ledger import Ledger, Slot, grads
from ._replication import Local
from .phases import master_dtype

REST, SAMPLED, PERTURBED = "at rest", "sampled", "perturbed"


class DeviceScalars:
    """The 0-dim tensors every step uses, one per device, allocated once (fixed addresses: a captured CUDA
    graph reads them in every replay): the found-inf flags, and 1/scale = 1 without a GradScaler."""

    def __init__(self) -> None:
        self.flags: dict[torch.device, torch.Tensor] = {}
        self.ones: dict[torch.device, torch.Tensor] = {}

    def found_inf(self, devices: list[torch.device]) -> dict[torch.device, torch.Tensor]:
        """The found-inf flag per device (float32 0-dim tensors, as torch's GradScaler keeps them)."""
        for device in devices:
            if device not in self.flags:
                with torch.inference_mode(False):
                    self.flags[device] = torch.zeros((), dtype=torch.float32, device=device)
        return self.flags

    def inv_scale(self, grad_scaler, devices: list[torch.device]) -> dict[torch.device, torch.Tensor]:
        """1/scale per device: the GradScaler's (read on the device, no host sync), or 1."""
        if _amp.enabled(grad_scaler):
            return _amp.inv_scale(grad_scaler, devices)
        for device in devices:
            if device not in self.ones:
                with torch.inference_mode(False):
                    self.ones[device] = torch.ones((), dtype=torch.float32, device=device)
        return self.ones


def check_capture(name: str, capturable: bool, backend: str, devices: list[torch.device]) -> None:
    """RuntimeError if a CUDA graph is capturing a step of optimizer ``name`` and its replays would be wrong."""
    cuda = [d for d in devices if d.type == "cuda"]  # (CPU training: no CUDA call at all)
    if not cuda or not torch.cuda.is_current_stream_capturing():
        return
    if not capturable:  # the graph would keep this step's seeds: every replay the same noise
        raise RuntimeError(
            f"{name} step captured in a CUDA graph, but the optimizer was built with capturable=False: each "
            "replay would reuse this step's noise seed and copy counts to the host. Pass capturable=True"
        )
    if any(backends.pick(backend, d) == "eager" for d in cuda):
        raise RuntimeError(
            f"{name} step captured in a CUDA graph on the 'eager' backend, which decides on the host whether "
            "a step is skipped: use backend='auto' (or 'triton', 'cuda', 'foreach')"
        )


class SumPool:
    """The running sums of a step (``grad_sum``, ``curvature_sum``: one tensor per slot, in the master
    dtype), allocated by the first phase that needs them and given back at the step's end.

    ``keep`` (the optimizers' ``keep_sums``): whether the sums stay allocated between steps; None: on
    the CPU only, where freed memory goes back to the system and comes back page by page (+23% of a
    step), while elsewhere the caching allocator hands the same memory back. For the tabled backends
    (Triton, CUDA) the sums are views of one buffer per (device, dtype), 16-byte aligned, whose launch
    tables hold offsets from its start and so stay cached wherever the allocator puts it; elsewhere,
    one tensor each (see :func:`sambayes.backends.scratch_in_one_buffer`).
    """

    def __init__(self, keep: bool | None, backend: str) -> None:
        self.keep, self.backend = keep, backend
        self.kept: dict[str, dict[Slot, torch.Tensor]] = {}  # name -> {slot: sum} kept from the last step

    def keeps(self, device: torch.device) -> bool:
        return self.keep if self.keep is not None else device.type == "cpu"

    def allocate(self, name: str, slots: list[Slot]) -> dict[Slot, torch.Tensor]:
        """A sum ``name`` for every slot: kept from the last step where it still fits, else new."""
        kept, sums = self.kept.pop(name, {}), {}
        by_buffer: dict[tuple[torch.device, torch.dtype], list[Slot]] = {}
        for s in slots:
            by_buffer.setdefault((s.local.device, master_dtype(s.param.dtype)), []).append(s)
        for (device, dtype), group in by_buffer.items():
            old = [kept.get(s) for s in group]
            if all(
                t is not None and t.shape == s.local.shape and t.dtype == dtype and t.device == device
                for t, s in zip(old, group)
            ):
                sums.update(zip(group, old))
            elif not backends.scratch_in_one_buffer(self.backend, device):
                sums.update((s, torch.empty_like(s.local, dtype=dtype)) for s in group)
            else:
                align = max(1, 16 // dtype.itemsize)
                sizes = [-(-s.local.numel() // align) * align for s in group]
                flat = torch.empty(sum(sizes), dtype=dtype, device=device)
                for s, piece in zip(group, flat.split(sizes)):
                    sums[s] = piece[: s.local.numel()].view(s.local.shape)
        return sums

    def give_back(self, sums: dict[str, dict[Slot, torch.Tensor]]) -> None:
        """The step is over: keep its sums where :meth:`keeps` says so, drop the rest."""
        for name, by_slot in sums.items():
            keeps = {device: self.keeps(device) for device in {t.device for t in by_slot.values()}}
            kept = {s: t for s, t in by_slot.items() if keeps[t.device]}
            if kept:
                self.kept[name] = kept


class Step:
    """One step in progress, from its first ``sample()`` to its ``update()`` or ``abort()``.

    The optimizer's phases and the hooks of BSAM and SAM read and change it; nothing of it outlives
    the step but the sums a :class:`SumPool` keeps.
    """

    def __init__(
        self,
        run: Callable[..., list],
        ledger: Ledger,
        pool: SumPool,
        replication: Local,
        found_inf: dict[torch.device, torch.Tensor],
        attempts: list[int | torch.Tensor],
    ) -> None:
        self.run, self.ledger, self.pool, self.replication = run, ledger, pool, replication
        self.phase = REST
        #: sub-batches whose perturbed pass has begun (perturb() calls so far); ALGORITHM.md's k at update()
        self.split = 0
        #: the slots the backward pass that just finished gave a gradient
        self.written: set[Slot] = set()
        #: slots with an ascent this step (bSAM: they have a curvature estimate)
        self.ascended: set[Slot] = set()
        #: slots whose grad_sum holds earlier sub-batches' perturbed-point gradients
        self.folded: set[Slot] = set()
        #: the sums went back into .grad before the last pass (DDP all-reduces what .grad holds)
        self.sums_in_grad = False
        #: name -> {slot: running sum} (see SumPool)
        self.sums: dict[str, dict[Slot, torch.Tensor]] = {}
        #: per device: raised by a non-finite gradient of either pass (float32 0-dim, as GradScaler's)
        self.found_inf = found_inf
        #: per device: 1/scale of the GradScaler, or 1
        self.inv_scale: dict[torch.device, torch.Tensor] = {}
        #: the BatchNorm layers whose running statistics the current pass leaves alone
        self.frozen_bn: list | None = None
        #: per group: the attempts before this step, from which its noise and rounding seeds derive
        self.attempts = attempts
        for flag in found_inf.values():
            flag.zero_()

    # ---- what a phase sees ---------------------------------------------------------------------
    def written_in(self, slots: list[Slot]) -> list[Slot]:
        """The slots among ``slots`` that the last backward pass gave a gradient."""
        return [s for s in slots if s in self.written]

    def noise_split(self) -> int:
        """The noise's sub-batch index of the current sub-batch (DDP replicas draw their own)."""
        return self.replication.noise_split(self.split)

    def with_grad(self, slots: list[Slot]) -> list[Slot]:
        """The slots given a gradient in this step's perturbed passes (written now, or summed before)."""
        return [s for s in slots if s in self.written or s in self.folded]

    def sum_of(self, name: str, slots: list[Slot]) -> list[torch.Tensor]:
        return [self.sums[name][s] for s in slots]

    def allocate(self, name: str) -> None:
        """Give every slot its running sum ``name`` (a no-op when it has one)."""
        if name not in self.sums:
            self.sums[name] = self.pool.allocate(name, self.ledger.slots)

    # ---- between passes ------------------------------------------------------------------------
    def fold(self, fold_slots: Callable[[Step, list[Slot], bool, bool], None], *, last: bool) -> None:
        """The gradients just computed join their sums over sub-batches: ``fold_slots(step, slots, first, last)``
        (the optimizer's ``_fold``) runs once for the slots whose first sub-batch this is and once for those
        summed before; ``last``: the sums go back into .grad, where the update reads them."""
        written = self.written_in(self.ledger.slots)
        first = [s for s in written if s not in self.folded]
        later = [s for s in (self.ledger.slots if last else written) if s in self.folded]
        for slots, is_first in ((first, True), (later, False)):
            if slots:
                fold_slots(self, slots, is_first, last)
        if not last:
            self.folded.update(first)
            self.ledger.grads_zeroed(written)

    def agree_on_skipping(self) -> None:
        """One flag for the whole step: across this process's devices, and across ranks."""
        flags = list(self.found_inf.values())
        if len(flags) > 1:
            combined = torch.stack([f.to(flags[0].device) for f in flags]).amax()
            for f in flags:
                f.copy_(combined)
        if self.replication.group is not None:
            self.replication.agree(flags)

    def clip(self, slots: list[Slot], max_norm: float) -> None:
        """Scale the gradient sums so that their global 2-norm (unscaled) is at most max_norm; on the device."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in grads(slots):
            by_device.setdefault(grad.device, []).append(grad)
        squares = [
            # float32 norms: a float16 norm of scaled gradients overflows where the gradients do not
            (torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).double() * self.inv_scale[device])
            .square()
            .sum()
            for device, tensors in by_device.items()
        ]
        norm = self.global_sum(squares).sqrt()
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0).float()
        for device, tensors in by_device.items():
            torch._foreach_mul_(tensors, factor.to(device))

    def global_sum(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """The float64 sum of 0-dim partial sums, on the first one's device; under FSDP2 over every rank's
        shards too (DDP replicas hold whole, already averaged gradients)."""
        device = partials[0].device
        return self.replication.total(torch.stack([p.to(device=device, dtype=torch.float64) for p in partials]).sum())

    def flag_on(self, device: torch.device) -> torch.Tensor:
        """The step's found-inf flag for a counter on ``device`` (the flags agree by update time)."""
        return self.found_inf[device] if device in self.found_inf else next(iter(self.found_inf.values()))


def devices_of(slots: list[Slot]) -> list[torch.device]:
    """The devices of the slots' tensors, in first-seen order."""
    return list(dict.fromkeys(s.local.device for s in slots))


def per_device(value: Any, slots: list[Slot]) -> Any:
    """A step scalar (``lr``) for the kernels: a number by value; a tensor (say, one a scheduler fills)
    as a float64 0-dim tensor on each device of ``slots``, which the kernels read there (no host sync)."""
    if not isinstance(value, torch.Tensor):
        return value
    return {device: value.to(device=device, dtype=torch.float64).reshape(()) for device in devices_of(slots)}
