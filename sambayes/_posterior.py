"""The Gaussian posterior q(θ) = N(m, diag(1/(N·s))) that BSAM and IVON learn, and the state it lives in:
``mean`` (m, the weights at rest), ``precision`` (s) and ``momentum``, the last two in bfloat16 with
``state_dtype=torch.bfloat16``. Its samples come from the counter-based noise (ALGORITHM.md, "Noise"): a
step's, drawn by ``BSAM_SAMPLE``, and a posterior sample for prediction (``sampled_params``); its spread is
``posterior_std``. N is bSAM's ``num_data``, IVON's ``ess``."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any

import torch

from . import _distributed, _philox, phases
from ._ledger import Slot, offsets, params, states
from ._step import Step, devices_of
from .phases import master_dtype

#: the stored state of a Gaussian-posterior optimizer, per parameter
STATE_KEYS = frozenset({"mean", "precision", "momentum"})


class GaussianPosterior:
    """Mixed into :class:`~sambayes.BSAM` and :class:`~sambayes.IVON` before their base class.

    Subclasses say what N is for a group (:meth:`_num_data`) and the precision of a parameter without
    state yet (:meth:`_initial_precision`); they set ``state_dtype`` (None or torch.bfloat16) before the
    base class's constructor.
    """

    #: the dtype of ``precision`` and ``momentum``: None for the mean's, or torch.bfloat16
    state_dtype: torch.dtype | None = None

    def _num_data(self, group: dict[str, Any]) -> float:  # pragma: no cover - overridden
        """N of the group: σ² = 1/(N·s)."""
        raise NotImplementedError

    def _initial_precision(self, group: dict[str, Any]) -> float:  # pragma: no cover - overridden
        """s of a new parameter of the group."""
        raise NotImplementedError

    # ---- state ----------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "state_dtype": self.state_dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict, with the state and groups only
        self.__dict__.setdefault("state_dtype", None)

    def _state_keys(self) -> set[str]:
        return set(STATE_KEYS)

    def _stored_dtype(self, key: str, param: torch.Tensor) -> torch.dtype:
        if self.state_dtype is None or key == "mean":
            return master_dtype(param.dtype)
        if param.dtype == torch.float64:  # given so, or cast so after construction (model.double())
            raise ValueError(
                f"a parameter of shape {tuple(param.shape)} is float64: state_dtype={self.state_dtype} is for "
                "float32, bfloat16 and float16 parameters (float64 ones keep float64 state: use the default)"
            )
        return self.state_dtype

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["mean"] = _distributed.local(p).detach().to(master_dtype(p.dtype), copy=True)
        state["precision"] = torch.full_like(
            state["mean"], self._initial_precision(group), dtype=self._stored_dtype("precision", p)
        )
        state["momentum"] = torch.zeros_like(state["mean"], dtype=self._stored_dtype("momentum", p))

    # ---- a step's noise ---------------------------------------------------------------------------------
    def _seed(self, step: Step, index: int, group: dict[str, Any], slots: list[Slot], stream: int) -> int | dict:
        """``noise_seed(seed, group, attempts, stream)`` of this step (a sample's noise, or the rounding
        stream): from the host's count, or with capturable=True hashed on the device from its counters, so
        that a captured step replays with the count the device holds then ({device: 0-dim int64 tensor})."""
        attempts = step.attempts[index]
        if not isinstance(attempts, torch.Tensor):
            return _philox.noise_seed(group["seed"], index, attempts, stream)
        key = _philox.noise_seed_on_device(group["seed"], index, attempts, stream)
        return {device: key.to(device) for device in devices_of(slots)}

    def _rounding_seed(self, step: Step, index: int, group: dict[str, Any], slots: list[Slot]) -> int | dict:
        """The seed of the update's stochastic rounding of bfloat16 state (its own stream of the step), or 0."""
        if self.state_dtype is None:
            return 0
        return self._seed(step, index, group, slots, _philox.ROUNDING_STREAM)

    def _sample_group(self, step: Step, index: int, group: dict[str, Any], slots: list[Slot]) -> None:
        """θ = m + z/sqrt(N·s), z the noise of this step's sample (sub-batch) ``step.split``."""
        self._draw(group, slots, self._seed(step, index, group, slots, step.noise_split()))

    def _draw(self, group: dict[str, Any], slots: list[Slot], seed: int | dict) -> None:
        """θ = m + z/sqrt(N·s) for the group's trainable parameters, z from Philox(seed) (an int, or
        {device: 0-dim int64 tensor} with capturable=True)."""
        if slots:
            self._run(
                phases.BSAM_SAMPLE,
                params(slots),
                states(slots, "mean"),
                states(slots, "precision"),
                offsets(slots),
                num_data=self._num_data(group),
                seed=seed,
            )

    # ---- the posterior ----------------------------------------------------------------------------------
    def _posterior(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]]:
        """(param, precision, group) for every parameter of the groups, in their order: the initial precision
        for a trainable parameter without state yet, None for a frozen one (not sampled: σ = 0)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not p.requires_grad:
                    yield p, None, group
                elif state:
                    yield p, state["precision"].to(master_dtype(p.dtype)), group  # bfloat16 state: in float32
                else:
                    local = _distributed.local(p)
                    yield p, torch.full_like(local, self._initial_precision(group), dtype=master_dtype(p.dtype)), group

    @torch.no_grad()
    def posterior_variance(self) -> list[torch.Tensor]:
        """σ² = 1/(N·s) for every parameter of the groups, in their order (zip it with them), in its shape
        and master dtype; 0 for a frozen parameter, which ``sampled_params`` does not sample."""
        return self._of_precision(torch.reciprocal)

    @torch.no_grad()
    def posterior_std(self) -> list[torch.Tensor]:
        """σ = 1/sqrt(N·s) for every parameter of the groups, in their order (zip it with them), in its shape
        and master dtype; 0 for a frozen parameter, which ``sampled_params`` does not sample."""
        return self._of_precision(torch.rsqrt)

    def _of_precision(self, f) -> list[torch.Tensor]:
        """f(N·s) for every parameter of the groups, in their order; 0 for a frozen one."""
        return [
            torch.zeros_like(_distributed.local(p), dtype=master_dtype(p.dtype))
            if s is None
            else f(self._num_data(g) * s)
            for p, s, g in self._posterior()
        ]

    def _posterior_sample(self, seed: int) -> contextlib.AbstractContextManager[None]:
        """Within the block the model holds the posterior sample of ``seed`` (see BSAM.sampled_params)."""
        seed = check_seed(seed, allow_none=False)
        return self._holding_sample(seed, self._draw_posterior)

    def _draw_posterior(self, seed: int, groups: list) -> None:
        for index, (group, slots) in enumerate(groups):
            self._draw(group, slots, _philox.noise_seed(seed, index, _philox.POSTERIOR_STREAM, 0))


def check_state_dtype(state_dtype: Any) -> torch.dtype | None:
    if state_dtype not in (None, torch.bfloat16):
        raise ValueError(
            f"state_dtype={state_dtype!r}: None (precision and momentum in the mean's dtype) or torch.bfloat16"
        )
    return state_dtype


#: [torch's initial seed, optimizers given seed=None since this process saw it]
_seeds_derived: list = [None, 0]


def derived_seed() -> int:
    """A seed derived from torch's seed without drawing from torch's generator: a hash of
    ``torch.initial_seed()`` (which ``torch.manual_seed`` sets) and of how many optimizers of this process
    took a seed under it before. A script that calls ``torch.manual_seed`` gets the same noise on every run,
    optimizers built one after the other get different seeds, and the user's shuffling and dropout streams
    stay as they are."""
    initial = torch.initial_seed()
    if _seeds_derived[0] != initial:
        _seeds_derived[:] = [initial, 0]
    count = _seeds_derived[1]
    _seeds_derived[1] += 1
    return _philox.noise_seed(initial % 2**64, count, _philox.DERIVED_SEED_STREAM, 0)  # below 2^63


def check_seed(seed: Any, *, allow_none: bool) -> int:
    """A seed: an integer in [0, 2^64) (numpy's included); None derives one from torch's seed."""
    if seed is None and allow_none:
        return derived_seed()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed={seed!r}: expected an integer in [0, 2**64)" + (" or None" if allow_none else ""))
    return int(seed)
