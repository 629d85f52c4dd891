"""SAM (Foret et al., 2021), the paper's SAM-SGD baseline, with adaptive SAM and an AdamW base."""

from __future__ import annotations

import collections
from typing import Any

import torch

from . import _distributed, phases
from ._arguments import check_betas, check_number
from ._ledger import Slot, grads, params, states
from ._step import Step, per_device
from .optimizer import Groups, TwoPassOptimizer
from .phases import master_dtype

BASES = ("sgd", "adamw")


def _with_step_counts(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of SAM(base="adamw") written before each parameter kept its own "step": every parameter
    gets its group's count (what the update used then)."""
    state = dict(state_dict["state"])
    for group in state_dict["param_groups"]:
        count = torch.tensor(float(group.get("step", 0)), dtype=torch.float64)
        for pid in group["params"]:
            if pid in state and isinstance(state[pid], dict) and "step" not in state[pid]:
                state[pid] = {**state[pid], "step": count}
    return {**state_dict, "state": state}


class SAM(TwoPassOptimizer):
    r"""Sharpness-aware minimization; with ``base="sgd"`` exactly the paper's SAM-SGD::

        for j in 1..k:
            g_j = ∇ L_Bj(w)
            w'  = w + ρ · g_j / ‖g_j‖₂             # global 2-norm over all parameters
            h_j = ∇ L_Bj(w')
        h̄   = mean_j h_j
        buf = μ·buf + h̄ + δ·w                     # heavy ball, no dampening
        w   = w − α·buf                            # (nesterov: w − α·(h̄ + δ·w + μ·buf))

    ``adaptive=True`` is ASAM (Kwon et al., 2021): w' = w + ρ·T²g/‖T·g‖₂ with T = |w|.
    ``base="adamw"`` replaces the last two lines with AdamW on h̄ (``betas``, ``eps``,
    decoupled ``weight_decay``).

    State per parameter: ``weight`` (w; float32 master weights for low-precision
    parameters), ``momentum`` (the heavy-ball buffer, or AdamW's first moment) and,
    for AdamW, ``variance`` (its second moment). Per group: ``step`` and ``skipped_steps``
    (0-dim device tensors), ``attempts`` (a host int).
    Between steps the model's parameters hold w. ``model``, ``bn_stats``, ``keep_sums`` and
    ``capturable``: as for :class:`BSAM` (with DDP, each replica takes its own ascent: m-sharpness
    across devices).
    """

    rest_key = "weight"

    def __init__(
        self,
        params,
        *,
        lr: float,
        rho: float = 0.05,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        adaptive: bool = False,
        base: str = "sgd",
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        backend: str = "auto",
        model: torch.nn.Module | None = None,
        bn_stats: str = "noisy",
        keep_sums: bool | None = None,
        capturable: bool = False,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"base={base!r}: choose one of {BASES}")
        self.base = base
        # each base carries its own hyperparameters only, as torch.optim.SGD and AdamW do: schedulers
        # that cycle momentum find `momentum` (SGD) or `betas` (AdamW), never an unused one
        defaults = dict(lr=lr, rho=rho, weight_decay=weight_decay, adaptive=adaptive)
        if base == "sgd":
            if betas is not None or eps is not None:
                raise ValueError("betas and eps belong to base='adamw'; base='sgd' takes momentum and nesterov")
            defaults.update(momentum=0.9 if momentum is None else momentum, nesterov=nesterov)
        else:
            if momentum is not None or nesterov:
                raise ValueError("momentum and nesterov belong to base='sgd'; base='adamw' takes betas and eps")
            betas = (0.9, 0.999) if betas is None else betas
            defaults.update(betas=tuple(betas) if isinstance(betas, list) else betas, eps=1e-8 if eps is None else eps)
        self._fresh_steps: dict[int, dict[torch.device, torch.Tensor]] = {}  # per group: the count of new parameters
        super().__init__(params, defaults, backend, model, bn_stats, keep_sums, capturable)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"])
        check_number("rho", group["rho"])
        check_number("weight_decay", group["weight_decay"])
        flags = ("adaptive", "nesterov") if self.base == "sgd" else ("adaptive",)
        for flag in flags:
            if not isinstance(group[flag], bool):
                raise TypeError(f"{flag}={group[flag]!r}: expected True or False")
        if self.base == "sgd":
            check_number("momentum", group["momentum"], high=1.0)
            if group["nesterov"] and group["momentum"] == 0:
                raise ValueError("nesterov=True needs momentum > 0")
        else:
            check_betas(group["betas"])
            check_number("eps", group["eps"], low_open=True)

    def _state_keys(self) -> set[str]:
        return {"weight", "momentum"} | ({"variance", "step"} if self.base == "adamw" else set())

    def _stored_dtype(self, key: str, param: torch.Tensor) -> torch.dtype:
        return torch.float64 if key == "step" else master_dtype(param.dtype)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        dtype = master_dtype(p.dtype)
        state["weight"] = _distributed.local(p).detach().to(dtype, copy=True)
        state["momentum"] = torch.zeros_like(state["weight"])
        if self.base == "adamw":
            state["variance"] = torch.zeros_like(state["weight"])
            # AdamW's updates taken by this parameter (its bias correction), as torch.optim.AdamW keeps them:
            # one 0-dim tensor shared by every parameter of the group with the same history (one launch each)
            fresh = self._fresh_steps.setdefault(id(group), {})
            if p.device not in fresh:
                fresh[p.device] = torch.zeros((), dtype=torch.float64, device=p.device)
            state["step"] = fresh[p.device]

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "base": self.base}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("base", "sgd")
        self.__dict__.setdefault("_fresh_steps", {})

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["base"] = self.base
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base = state_dict.get("base", self.base)
        if base != self.base:
            raise ValueError(f"state_dict is for SAM(base={base!r}), this optimizer has base={self.base!r}")
        state_dict = {k: v for k, v in state_dict.items() if k != "base"}
        if self.base == "adamw":
            state_dict = _with_step_counts(state_dict)
        super().load_state_dict(state_dict)
        if self.base == "adamw":
            self._share_equal_steps()

    def _share_equal_steps(self) -> None:
        """One count tensor per (group, device, value) again after a load (which copies each): one launch
        per history, not per parameter. Reads the counts on the host, as loading does anyway."""
        self._fresh_steps = {}
        for group in self.param_groups:
            shared: dict[tuple, torch.Tensor] = {}
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    count = state["step"]
                    state["step"] = shared.setdefault((count.device, float(count)), count)

    # ---- phases -----------------------------------------------------------------------
    def _sample_group(self, step: Step, index: int, group: dict[str, Any], slots: list[Slot]) -> None:
        if step.split > 0:  # the previous sub-batch left the parameters at its adversarial point
            self._restore(slots)

    def _perturb(self, step: Step, groups: Groups) -> None:
        work = []
        for group, slots in groups:
            self._restore([s for s in slots if s not in step.written])
            written = step.written_in(slots)
            if written:
                work.append((group, written))
        if not work:
            return
        # the global 2-norm over all parameters, kept on the device (no host sync)
        sq = [
            partial
            for group, ps in work
            for partial in self._run(
                phases.SAM_SQ_NORM,
                grads(ps),
                states(ps, "weight"),
                found_inf=step.found_inf,
                inv_scale=step.inv_scale,
                adaptive=group["adaptive"],
            )
        ]
        norm = step.global_sum(sq).sqrt()
        for group, ps in work:
            scale = torch.where(norm > 0, group["rho"] / norm, torch.zeros_like(norm))
            self._run(
                phases.SAM_PERTURB,
                params(ps),
                grads(ps),
                states(ps, "weight"),
                inv_scale=step.inv_scale,
                # float64, on each bucket's device: each bucket reads it in its own state dtype
                scale={device: scale.to(device) for device in {s.param.device for s in ps}},
                adaptive=group["adaptive"],
            )

    def _update_group(self, step: Step, index: int, group: dict[str, Any], slots: list[Slot]) -> None:
        if not slots:
            return
        tensors = (params(slots), grads(slots), states(slots, "weight"), states(slots, "momentum"))
        flags = dict(found_inf=step.found_inf, inv_scale=step.inv_scale)
        if self.base == "sgd":
            self._run(
                phases.SAM_UPDATE_SGD,
                *tensors,
                **flags,
                lr=per_device(group["lr"], slots),
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                splits=step.split,
            )
        else:
            beta1, beta2 = group["betas"]
            for counter, members in self._count_adamw_steps(step, group, slots):
                self._run(
                    phases.SAM_UPDATE_ADAMW,
                    params(members),
                    grads(members),
                    states(members, "weight"),
                    states(members, "momentum"),
                    states(members, "variance"),
                    **flags,
                    step=counter,  # this update included
                    lr=per_device(group["lr"], members),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    splits=step.split,
                )

    def _count_adamw_steps(self, step: Step, group: dict[str, Any], slots: list[Slot]) -> list:
        """Count this update (on the device, unless skipped) for each parameter it updates, and return
        [(count, the slots that share it)]. Parameters share one count while their histories agree; one that
        gets no gradient now (unused, frozen) keeps the old count and the others move on with a copy."""
        classes: dict[int, list[Slot]] = {}
        for s in slots:
            classes.setdefault(id(s.state["step"]), []).append(s)
        sharing = collections.Counter(id(self.state[p]["step"]) for p in group["params"] if self.state.get(p))
        counts = []
        for key, members in classes.items():
            counter = members[0].state["step"]
            if len(members) < sharing[key]:  # others keep this count: the updated ones take a copy
                counter = counter.clone()
                for s in members:
                    s.state["step"] = counter
            fresh = self._fresh_steps.get(id(group), {})
            if fresh.get(counter.device) is counter:  # counted now: no longer the count of new parameters
                del fresh[counter.device]
            counter.add_(1 - step.flag_on(counter.device).double())
            counts.append((counter, members))
        return counts
