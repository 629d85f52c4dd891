"""DDP and FSDP2 as the optimizer sees them: gradient synchronisation between passes,
replica ranks, where collectives run, and the local shards of DTensor parameters."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def unwrap(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """The module inside ``torch.compile``'s wrappers (``torch.compile(DDP(net))`` is DDP inside)."""
    while model is not None and hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model


def is_fsdp2(model: torch.nn.Module | None) -> bool:
    model = unwrap(model)
    return model is not None and hasattr(model, "set_requires_gradient_sync")


def reshard(model: torch.nn.Module | None) -> None:
    """Before the optimizer writes the parameters' shards: FSDP2 keeps a module's parameters gathered
    after a forward pass with no backward pass (an evaluation), and the next forward pass would use
    those stale copies instead of what was written. A no-op for modules already resharded."""
    if is_fsdp2(model):
        for module in unwrap(model).modules():
            if hasattr(module, "set_requires_gradient_sync") and hasattr(module, "reshard"):
                module.reshard()


def is_ddp(model: torch.nn.Module | None) -> bool:
    return isinstance(unwrap(model), torch.nn.parallel.DistributedDataParallel)


def set_grad_sync(model: torch.nn.Module | None, enabled: bool) -> None:
    """DDP's ``no_sync()`` / FSDP2's ``set_requires_gradient_sync``, as a switch (for the phase API)."""
    model = unwrap(model)
    if is_ddp(model):
        model.require_backward_grad_sync = enabled
    elif is_fsdp2(model):
        model.set_requires_gradient_sync(enabled)


def replica_rank(model: torch.nn.Module | None) -> tuple[int, int]:
    """(rank, world size) among data-parallel replicas that draw their own noise (DDP); (0, 1) otherwise."""
    if is_ddp(model) and dist.is_initialized():
        group = unwrap(model).process_group
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def process_group(model: torch.nn.Module | None):
    """The process group of a DDP or FSDP2 module (the default group when it keeps none)."""
    return getattr(unwrap(model), "process_group", None) or dist.group.WORLD


def comm_device(group) -> torch.device:
    """Where tensors for collectives of ``group`` must live (CUDA for NCCL)."""
    return (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def laid_out_as(shard: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A state tensor kept as ``p``'s local shard, as a DTensor laid out as ``p`` (sharing its storage), or
    ``shard`` itself for a plain ``p``: what ``torch.distributed.checkpoint`` saves and reshards."""
    if not hasattr(p, "device_mesh"):
        return shard
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def local_part(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """What this rank keeps of ``value`` for parameter ``p``: ``value`` is the whole tensor (a single-process
    checkpoint; the shard is cut out of it), this rank's shard already (a per-rank checkpoint), or a DTensor
    (laid out as ``p``: its local tensor; laid out otherwise: gathered first, a collective). The caller has
    checked that ``value`` has ``p``'s shape or its shard's."""
    if hasattr(value, "device_mesh"):
        if hasattr(p, "device_mesh") and value.device_mesh == p.device_mesh and value.placements == p.placements:
            return value.to_local()
        value = value.full_tensor()
    shard = local(p)
    if value.shape == shard.shape:
        return value
    start = global_offset(p)  # sharded on dim 0: the shard is a contiguous run of the flat tensor
    return value.reshape(-1)[start : start + shard.numel()].view(shard.shape)


def global_offset(p: torch.Tensor) -> int:
    """Flat index, in the whole parameter, of the first element of this rank's shard."""
    if not hasattr(p, "device_mesh"):
        return 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)) for pl in p.placements):
        raise NotImplementedError(f"sambayes supports DTensor parameters sharded on dim 0 only, got {p.placements}")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) * math.prod(p.shape[1:]) if len(offset) else 0
