"""Checkpoints: a state dict checked whole before anything changes, saved with its DTensor layouts,
loaded into any sharding and with the optimizer's own state dtypes (docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import _distributed, _progress

#: state keys that hold one number per parameter (a count), not a tensor of its shape: torch.optim's name
SCALAR_KEYS = ("step",)


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
            # a DTensor is the whole tensor; a plain tensor the whole one or this rank's shard; a count one number
            fits = ((),) if key in SCALAR_KEYS else (whole,) if hasattr(value, "device_mesh") else (whole, shard)
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
            state["state"][pid] = {
                key: value if key in SCALAR_KEYS else _distributed.laid_out_as(value, params[pid])
                for key, value in saved.items()
            }


def local_parts(state_dict: dict[str, Any], by_id: dict) -> dict[str, Any]:
    """``state_dict`` with each state tensor replaced by what this rank keeps of it: the whole tensor (a
    single-process checkpoint: each rank cuts its shard out), this rank's shard, or a DTensor's local part."""
    return {
        **state_dict,
        "state": {
            pid: {
                key: value if key in SCALAR_KEYS else _distributed.local_part(value, by_id[pid])
                for key, value in saved.items()
            }
            for pid, saved in state_dict["state"].items()
        },
    }


def keep_state_dtypes(
    state: dict, saved_state: dict, by_id: dict, stored_dtype: Callable[[str, torch.Tensor], torch.dtype]
) -> None:
    """After torch's load (which casts state to the parameter dtype): each state tensor copied from the
    checkpoint in the dtype this optimizer keeps it in (float32 master state for low-precision parameters;
    float32 and bfloat16 stored state load into either)."""
    copies: dict[int, torch.Tensor] = {}  # a tensor several parameters share stays shared (SAM's step counts)
    for pid, saved in saved_state.items():
        p = by_id.get(pid)
        if p is None:
            continue
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                if id(value) not in copies:
                    with torch.inference_mode(False):  # a checkpoint callback may run under inference mode
                        copies[id(value)] = value.to(device=p.device, dtype=stored_dtype(key, p), copy=True)
                state[p][key] = copies[id(value)]


class Checkpoints:
    """``state_dict`` and ``load_state_dict`` of the optimizers, and their pickling (mixed into
    TwoPassOptimizer, before torch.optim.Optimizer, whose own methods do the dict handling)."""

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups: add what this class needs to step
        config = ("backend", "model", "bn_stats", "capturable", "keep_sums", "_hyperparameters")
        return {**super().__getstate__(), **{name: getattr(self, name) for name in config}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch's load_state_dict passes state and param_groups only
        if "_ledger" not in self.__dict__:  # unpickled (an older pickle may lack some options)
            hyperparameters = [k for k in self.defaults if k != "attempts"]
            options = dict(backend="auto", model=None, bn_stats="noisy", capturable=False, keep_sums=None)
            for name, value in {**options, "_hyperparameters": hyperparameters}.items():
                self.__dict__.setdefault(name, value)
            self._build()

    def state_dict(self) -> dict[str, Any]:
        """The state of every trainable parameter and the groups' hyperparameters and counters.

        Under FSDP2 each state tensor is a DTensor laid out as its parameter (sharing this
        rank's shard, as ``torch.optim``'s state is), so ``torch.distributed.checkpoint``
        saves it and loads it into any other sharding or into an unsharded model.
        """
        if self._step is not None:
            raise RuntimeError(f"state_dict() called in the middle of a step (optimizer is {self._step.phase})")
        if not self._samples_held:  # (inside sampled_params() the model holds a sample, not the weights)
            with torch.no_grad():  # state for parameters trainable since; weights set since the last step
                self._prepare_state()
        self._skips.receive(self.param_groups, wait=True)
        state = super().state_dict()
        state["state"] = {pid: saved for pid, saved in state["state"].items() if saved}  # none yet: on the meta device
        laid_out(state, self.param_groups)
        for group, saved in zip(self.param_groups, state["param_groups"]):
            saved.update(_progress.numbers(group))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint written by any backend.

        Checks all of it first and changes nothing if it does not fit (ValueError naming the
        first problem: another optimizer's state dict, other parameter shapes, a bad
        hyperparameter). A step in progress is abandoned (as :meth:`abort` does). Unlike
        ``torch.optim.Optimizer``, keeps float32 master state for low-precision parameters
        instead of casting it to the parameter dtype; each state tensor is cast to the dtype
        this optimizer keeps it in (so float32 and bfloat16 state checkpoints load into either).

        Each state tensor may be this rank's shard (a per-rank checkpoint), the whole tensor
        (a single-process checkpoint, under FSDP2 too: each rank cuts its shard out), or a
        DTensor (:meth:`state_dict` under FSDP2, ``torch.distributed.checkpoint``).
        """
        by_id = check(
            state_dict,
            self.param_groups,
            name=type(self).__name__,
            hyperparameters=self._hyperparameters,
            check_group=self._check_group,
            state_keys=self._state_keys(),
        )
        state_dict = local_parts(state_dict, by_id)
        self.abort()  # a step in progress (say, it crashed halfway): abandoned first
        super().load_state_dict(state_dict)  # casts state to the parameters' dtypes: undone next
        keep_state_dtypes(self.state, state_dict["state"], by_id, self._stored_dtype)
        for group in self.param_groups:
            _progress.loaded(group)
        # between steps the model holds the state it was saved with
        self._ledger.refresh(self.param_groups, self.state, rebuild=True)  # the state dicts were replaced
        with torch.no_grad():
            self._restore([s for s in self._ledger.slots if s.state])
        torch.clear_autocast_cache()
        self._skips = _progress.SkipReport(type(self).__name__, self.capturable, self._weights)
        self._skips.reported = sum(int(group["skipped_steps"]) for group in self.param_groups)
        self._ledger.record_versions()
