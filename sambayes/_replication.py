"""How a step runs across data-parallel ranks: one policy per kind of model, chosen at construction.

=================  ==========================================================================
:class:`Local`     one process (or a model the optimizer was not given): nothing to agree on
:class:`DDP`       DistributedDataParallel: the noisy pass is not all-reduced (each replica draws
                   its own noise: m-sharpness across devices), the perturbed pass is, with the
                   sums over sub-batches put back into ``.grad`` first; the skip decision and
                   bSAM's curvature sums are agreed on across replicas
:class:`FSDP2`     fully_shard: every rank holds a shard of each parameter and draws what the
                   whole tensor would; gradient sync as DDP's, norms summed over the shards
=================  ==========================================================================
"""

from __future__ import annotations

import warnings

import torch

from . import _distributed
from ._arguments import caller_stacklevel


class Local:
    """One process: the policy every other one refines."""

    #: the process group across which ranks agree (None: no collective runs)
    group = None
    #: (rank, world size) among replicas that draw their own noise
    rank, world = 0, 1
    #: .grad must hold the whole sum over sub-batches when the last backward pass runs (it is all-reduced)
    folds_before_last_pass = False

    def __init__(self, model: torch.nn.Module | None) -> None:
        self.model = model

    def noise_split(self, split: int) -> int:
        """The noise's sub-batch index of sub-batch ``split``: replicas interleave, so each draws its own."""
        return split * self.world + self.rank

    def reshard(self) -> None:
        """Before the optimizer writes the parameters (FSDP2 may hold them gathered after an evaluation)."""

    def grad_sync(self, enabled: bool) -> None:
        """Whether the next backward pass all-reduces its gradients."""

    def broadcast(self, value: int) -> int:
        """Rank 0's ``value`` (an integer in [0, 2^64)) on every rank."""
        return value

    def agree(self, flags: list[torch.Tensor]) -> None:
        """Every rank's largest found-inf flag into ``flags`` (one per device, equal already): all ranks
        skip a step or none."""

    def average(self, sums: list[torch.Tensor]) -> None:
        """Average per-replica statistics other than the gradients (which DDP averages), in place."""

    def total(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over parameters (the squared norm of SAM and of clipping) over every rank's shards."""
        return partial


class DDP(Local):
    folds_before_last_pass = True

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.group = _distributed.process_group(model)
        self.rank, self.world = _distributed.replica_rank(model)
        self._device = _distributed.comm_device(self.group)

    def grad_sync(self, enabled: bool) -> None:
        _distributed.set_grad_sync(self.model, enabled)

    def broadcast(self, value: int) -> int:
        bits = torch.tensor([value - 2**64 if value >= 2**63 else value], device=self._device)  # int64 bits
        torch.distributed.broadcast(bits, src=0, group=self.group)
        return int(bits) % 2**64

    def agree(self, flags: list[torch.Tensor]) -> None:
        # a rank's noisy pass (or FSDP2 shard) is its own: agree on skipping
        agreed = flags[0].to(self._device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=self.group)
        for flag in flags:
            flag.copy_(agreed)

    def average(self, sums: list[torch.Tensor]) -> None:
        for dtype in dict.fromkeys(s.dtype for s in sums):  # first-seen order: the same on every rank
            same = [s for s in sums if s.dtype == dtype]
            flat = torch.cat([s.flatten() for s in same])
            torch.distributed.all_reduce(flat, group=self.group)
            flat /= self.world
            torch._foreach_copy_(same, [f.view_as(s) for f, s in zip(flat.split([s.numel() for s in same]), same)])


class FSDP2(DDP):
    """(rank, world) stay (0, 1): every rank draws what the whole tensor would, one noise stream sharded."""

    folds_before_last_pass = False

    def reshard(self) -> None:
        _distributed.reshard(self.model)

    def grad_sync(self, enabled: bool) -> None:
        """FSDP2 reduce-scatters every pass: its gradients are sharded, no pass is only local."""

    def average(self, sums: list[torch.Tensor]) -> None:
        """Each rank holds whole-batch statistics of its own shard: nothing to average."""

    def total(self, partial: torch.Tensor) -> torch.Tensor:
        device = partial.device
        partial = partial.to(self._device)
        torch.distributed.all_reduce(partial, group=self.group)
        return partial.to(device)


def policy(model: torch.nn.Module | None) -> Local:
    """The replication policy of the module being trained."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if initialized and _distributed.is_ddp(model):
        return DDP(model)
    if initialized and _distributed.is_fsdp2(model):
        return FSDP2(model)
    return Local(model)


_warned_about_model = False


def warn_without_model(model: torch.nn.Module | None) -> None:
    """Once per process: data-parallel training without ``model=`` loses what the optimizer does for it."""
    global _warned_about_model
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if model is not None or _warned_about_model or not distributed or torch.distributed.get_world_size() < 2:
        return
    _warned_about_model = True
    warnings.warn(
        "torch.distributed is initialized with several ranks but the optimizer was given no model: pass the "
        "DDP or FSDP2 module (model=... or in place of the parameters). Without it the noisy pass is all-reduced "
        "(an extra all-reduce per sub-batch) and every rank draws the same noise (no m-sharpness across ranks)",
        RuntimeWarning,
        stacklevel=caller_stacklevel(),
    )
