"""Checkpoints: a state dict checked whole before anything changes, saved with its DTensor layouts,
loaded into any sharding and with the optimizer's own state dtypes (docs/architecture.md)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import _distributed


def check(
    state_dict: Any,
    param_groups: list[dict[str, Any]],
    *,
    name: str,
    hyperparameters: list[str],
    check_group: Callable[[dict[str, Any]], None],
    state_keys: set[str],
) -> dict:
    """ValueError naming the first way ``state_dict`` does not fit an optimizer ``name`` over
    ``param_groups``; else {saved parameter id: parameter}."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError("state_dict: expected a dict with 'state' and 'param_groups', as state_dict() returns")  # noqa: TRY004
    saved_groups, state = state_dict["param_groups"], state_dict.get("state")
    if not isinstance(state, dict):
        raise ValueError("state_dict['state']: expected a dict {parameter id: state}")  # noqa: TRY004
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer has {len(param_groups)}")
    by_id = {}
    for index, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(group["params"]):
            count = len(saved.get("params", ())) if isinstance(saved, dict) else "no"
            raise ValueError(
                f"group {index} of state_dict has {count} parameters, this optimizer's has {len(group['params'])}"
            )
        missing = [k for k in hyperparameters if k not in saved]
        if missing:
            raise ValueError(
                f"group {index} of state_dict lacks {missing}: not a {name} state dict "
                f"(it has {sorted(k for k in saved if k != 'params')})"
            )
        try:
            check_group({**{k: saved[k] for k in hyperparameters}, "params": group["params"]})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"group {index} of state_dict: {exc}") from None
        by_id.update(zip(saved["params"], group["params"]))
    for pid, saved in state.items():
        p = by_id.get(pid)
        if p is None:
            raise ValueError(f"state_dict has state for parameter {pid!r}, which none of its groups lists")
        if not isinstance(saved, dict) or set(saved) != state_keys:
            keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(
                f"state of parameter {pid} has {keys}, a {name} keeps {sorted(state_keys)}: "
                "is this another optimizer's state dict?"
            )
        whole, shard = tuple(p.shape), tuple(_distributed.local(p).shape)  # FSDP2: this rank's shard
        for key, value in saved.items():
            # a DTensor is the whole tensor; a plain tensor the whole one or this rank's shard
            fits = (whole,) if hasattr(value, "device_mesh") else (whole, shard)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape not in fits:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"state_dict does not fit this model: state {key!r} of parameter {pid} has shape {got}, "
                    f"the parameter has shape {whole}" + (f" (this rank's shard: {shard})" if shard != whole else "")
                )
    return by_id


def laid_out(state: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """Under FSDP2, each state tensor of ``torch.optim``'s state dict as a DTensor laid out as its parameter
    (sharing this rank's shard), so that ``torch.distributed.checkpoint`` saves it and loads it into any
    other sharding or into an unsharded model."""
    params = [p for group in param_groups for p in group["params"]]  # torch's numbering of the ids
    for pid, saved in list(state["state"].items()):
        if hasattr(params[pid], "device_mesh"):  # a new dict: torch's state_dict hands out the live one
            state["state"][pid] = {key: _distributed.laid_out_as(value, params[pid]) for key, value in saved.items()}


def local_parts(state_dict: dict[str, Any], by_id: dict) -> dict[str, Any]:
    """``state_dict`` with each state tensor replaced by what this rank keeps of it: the whole tensor (a
    single-process checkpoint: each rank cuts its shard out), this rank's shard, or a DTensor's local part."""
    return {
        **state_dict,
        "state": {
            pid: {key: _distributed.local_part(value, by_id[pid]) for key, value in saved.items()}
            for pid, saved in state_dict["state"].items()
        },
    }


def keep_state_dtypes(
    state: dict, saved_state: dict, by_id: dict, stored_dtype: Callable[[str, torch.Tensor], torch.dtype]
) -> None:
    """After torch's load (which casts state to the parameter dtype): each state tensor copied from the
    checkpoint in the dtype this optimizer keeps it in (float32 master state for low-precision parameters;
    float32 and bfloat16 stored state load into either)."""
    for pid, saved in saved_state.items():
        p = by_id.get(pid)
        if p is None:
            continue
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                state[p][key] = value.to(device=p.device, dtype=stored_dtype(key, p), copy=True)
