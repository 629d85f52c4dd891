"""IVON: the variational online Newton optimizer of "Variational Learning is Effective for Large Deep
Networks" (Shen et al., ICML 2024), exactly as its authors' ``ivon-opt`` 0.1.3 computes it (docs/ivon.md)."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import _distributed, _philox, _progress, phases
from ._arguments import caller_stacklevel, check_number
from ._ledger import Slot, grads, offsets, params, states
from ._posterior import GaussianPosterior, check_seed, check_state_dtype
from ._step import Step, per_device
from .optimizer import TwoPassOptimizer

#: the Hessian estimators of ``hess_approx``: Price's theorem (reparametrization), the squared gradient
HESSIAN_ESTIMATORS = ("price", "gradsq")
#: the options that are the optimizer's, not a group's (as ivon-opt keeps them)
_OPTIONS = ("mc_samples", "hess_approx", "sync", "debias", "rescale_lr")


class IVON(GaussianPosterior, TwoPassOptimizer):
    r"""IVON (Shen et al., ICML 2024) as ``ivon-opt`` 0.1.3 computes it, fused (docs/ivon.md).

    Learns a Gaussian posterior :math:`q(θ) = N(m, \mathrm{diag}(1/(\mathrm{ess}·s)))` with
    s = h + δ: h estimates the Hessian of the loss, δ is the weight decay. One step, with k =
    ``mc_samples`` samples on the same minibatch::

        for j in 1..k:
            z_j ~ N(0, I)                                 # Philox, a function of (seed, step, j, element)
            θ   = m + z_j / sqrt(ess·s)                    # a sample of the posterior
            g_j = ∇ L(θ)
        ḡ = mean_j g_j ;  c̄ = mean_j z_j·g_j  (price)  or  mean_j g_j²  (gradsq)
        f   = sqrt(ess·s)·c̄  (price)  or  ess·c̄  (gradsq)  # the expected Hessian of the loss
        g_m = β1·g_m + (1 − β1)·ḡ                        # momentum
        h   = β2·h + (1 − β2)·f + ½(1 − β2)²·(h − f)²/s    # Hessian (h = s − δ), kept positive
        s   = h + δ
        m   = m − α·clip((g_m/(1 − β1^t) + δ·m)/s, ±r)    # mean, with the new precision
        θ   = m

    with t the step count (``debias=False``: no 1 − β1^t), α = ``lr``·(``hess_init`` + δ) (``rescale_lr=False``:
    α = ``lr``) and r = ``clip_radius``.

    Code written for ``ivon-opt`` runs with the import changed: the same arguments and defaults, and its
    training loop::

        for _ in range(train_samples):
            with opt.sampled_params(train=True):   # θ = a sample; on exit the mean again
                opt.zero_grad()
                loss_fn(model(x), y).backward()
        opt.step()                                  # the update from the samples' gradients

    or ``opt.step(closure)``: ``mc_samples`` gradient passes (the closure, called without arguments on the
    same batch each time, computes the loss and calls backward()), then the update.

    Args:
        params: parameters or parameter groups (lr, ess, hess_init, beta1, beta2, weight_decay and
            clip_radius may be set per group), or the module trained.
        lr: α >= 0. ``ess``: the effective sample size > 0 (the training-set size, as ivon-opt suggests).
        hess_init: h0 > 0, the initial Hessian. ``beta1``: in [0, 1). ``beta2``: in [0, 1].
        weight_decay: δ >= 0, the prior precision divided by ess.
        mc_samples: k, samples (gradient passes) per ``step(closure)``, an integer >= 1.
        hess_approx: "price" (z·g, the authors' default) or "gradsq" (g²).
        clip_radius: r > 0 (inf: no clipping).
        sync: ivon-opt's averaging of the statistics across data-parallel replicas; here they are averaged
            whenever ``model`` is a DDP module, once per step (one all-reduce of the gradient and curvature
            sums), each replica drawing its own noise. True with several ranks needs the DDP (or FSDP2) module.
        debias: divide the momentum by 1 − β1^t. ``rescale_lr``: α = lr·(hess_init + δ).
        seed: the noise's seed, as :class:`~sambayes.BSAM`'s.
        backend: which implementation runs the phases, as :class:`~sambayes.BSAM`'s.
        model: the module trained, where ``params`` are its parameters, as :class:`~sambayes.BSAM`'s.
        keep_sums: whether the running sums of a step (with k > 1, or under DDP) are kept between steps, as
            :class:`~sambayes.BSAM`'s.
        capturable: steps with no host sync, for CUDA graphs, as :class:`~sambayes.BSAM`'s.
        state_dtype: None keeps ``precision`` and ``momentum`` in the mean's dtype; ``torch.bfloat16``
            stores them in bfloat16 with stochastic rounding, as :class:`~sambayes.BSAM`'s (8 bytes per
            parameter; see docs/ivon.md on the Hessian's small steps).

    State per parameter: ``mean`` (m), ``precision`` (s = h + δ) and ``momentum`` (g_m); per group ``step``,
    ``skipped_steps``, ``attempts`` and ``seed`` as :class:`~sambayes.BSAM`'s. Between steps the model's
    parameters hold the mean. ``load_state_dict`` also takes an ``ivon-opt`` state dict.
    """

    rest_key = "mean"
    passes = 1  # a gradient per sample, taken at the sample
    rank0_hyperparameters = ("seed",)  # replicas share one noise seed, whatever each was given
    hessian_approx_methods = HESSIAN_ESTIMATORS

    def __init__(
        self,
        params,
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        hess_approx: str = "price",
        clip_radius: float = float("inf"),
        sync: bool = False,
        debias: bool = True,
        rescale_lr: bool = True,
        *,
        seed: int | None = None,
        backend: str = "auto",
        model: torch.nn.Module | None = None,
        keep_sums: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
    ) -> None:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, numbers.Integral) or mc_samples < 1:
            raise ValueError(f"mc_samples={mc_samples!r}: must be an integer >= 1")
        if hess_approx not in HESSIAN_ESTIMATORS:
            raise ValueError(f"hess_approx={hess_approx!r}: choose one of {HESSIAN_ESTIMATORS}")
        for name, value in (("sync", sync), ("debias", debias), ("rescale_lr", rescale_lr)):
            if value not in (True, False):
                raise ValueError(f"{name}={value!r}: True or False")
        trained = model if model is not None else params if isinstance(params, torch.nn.Module) else None
        if sync and _replicas() > 1 and not (_distributed.is_ddp(trained) or _distributed.is_fsdp2(trained)):
            raise ValueError(
                "sync=True with several ranks: pass the DDP (or FSDP2) module (model=... or in place of the "
                "parameters); the gradient and curvature sums are then averaged across replicas once per step"
            )
        #: samples (gradient passes) per step(closure)
        self.mc_samples = int(mc_samples)
        #: the Hessian estimator: "price" or "gradsq"
        self.hess_approx = hess_approx
        #: ivon-opt's flag (checked above; under DDP the statistics are averaged whatever it says)
        self.sync = sync
        #: the momentum divided by 1 − β1^t
        self.debias = debias
        #: α = lr·(hess_init + δ)
        self.rescale_lr = rescale_lr
        #: the dtype of ``precision`` and ``momentum``: None for the mean's, or torch.bfloat16
        self.state_dtype = check_state_dtype(state_dtype)
        self._closure_running = False  # step(closure) has drawn this pass's sample (see sampled_params)
        self._posterior_draws = 0  # sampled_params() blocks given no seed so far
        defaults = dict(
            lr=lr,
            ess=ess,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            clip_radius=clip_radius,
            seed=check_seed(seed, allow_none=True),
        )
        super().__init__(params, defaults, backend, model, "noisy", keep_sums, capturable)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{name: getattr(self, name) for name in _OPTIONS}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict, with the state and groups only
        options = dict(mc_samples=1, hess_approx="price", sync=False, debias=True, rescale_lr=True)
        for name, value in {**options, "_closure_running": False, "_posterior_draws": 0}.items():
            self.__dict__.setdefault(name, value)

    def _check_group(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            self._stored_dtype("precision", p)  # ValueError for a float64 parameter with bfloat16 state
        group["seed"] = check_seed(group["seed"], allow_none=True)
        check_number("lr", group["lr"])
        check_number("ess", group["ess"], low_open=True)
        check_number("hess_init", group["hess_init"], low_open=True)
        check_number("beta1", group["beta1"], high=1.0)
        check_number("beta2", group["beta2"])
        if group["beta2"] > 1:
            raise ValueError(f"beta2={group['beta2']!r}: must be <= 1")
        check_number("weight_decay", group["weight_decay"])
        radius = group["clip_radius"]
        if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not radius > 0:
            raise ValueError(f"clip_radius={radius!r}: must be > 0 (inf: no clipping)")

    def _num_data(self, group: dict[str, Any]) -> float:
        return group["ess"]

    def _initial_precision(self, group: dict[str, Any]) -> float:
        return group["hess_init"] + group["weight_decay"]  # s = h + δ

    # ---- phases -----------------------------------------------------------------------
    def _fold(self, step: Step, slots: list[Slot], first: bool, last: bool) -> None:
        if last and _one_sample(step):  # the update takes the sample's curvature from .grad and its noise
            super()._fold(step, slots, first, last)  # the gradient checked for inf and NaN
            return
        step.allocate("grad_sum")
        step.allocate("curvature_sum")
        price = self.hess_approx == "price"
        sample = step.replication.noise_split(step.split - 1)  # the sample whose gradient this is
        for index, group in enumerate(self.param_groups):
            members = [s for s in slots if s.group is group]
            if not members:
                continue
            self._run(
                phases.IVON_ACCUMULATE,
                grads(members),
                step.sum_of("grad_sum", members),
                step.sum_of("curvature_sum", members),
                offsets(members),  # element index: the noise's counter
                found_inf=step.found_inf,
                seed=self._seed(step, index, group, members, sample) if price else 0,
                price=price,
                first=first,
                last=last,
            )

    def _replica_statistics(self, step: Step) -> list[torch.Tensor]:
        # every pass is local (each replica draws its own noise): the sums over samples are averaged, the
        # gradients' in .grad and the curvature's, in parameter order, the same on every rank
        if step.replication.world == 1:
            return []
        slots = step.with_grad(step.ledger.slots)
        return grads(slots) + step.sum_of("curvature_sum", slots)

    def _update_group(self, step: Step, index: int, group: dict[str, Any], slots: list[Slot]) -> None:
        if not slots:
            return
        price, summed = self.hess_approx == "price", not _one_sample(step)
        lr = per_device(group["lr"], slots)
        if self.rescale_lr:  # ivon-opt's α = lr·(h0 + δ)
            scale = group["hess_init"] + group["weight_decay"]
            lr = {device: rate * scale for device, rate in lr.items()} if isinstance(lr, dict) else lr * scale
        one_sample_noise = step.replication.noise_split(0)
        self._run(
            phases.IVON_UPDATE,
            params(slots),
            grads(slots),
            states(slots, "mean"),
            states(slots, "precision"),
            states(slots, "momentum"),
            step.sum_of("curvature_sum", slots) if summed else states(slots, "mean"),  # (not read: one sample)
            offsets(slots),  # element index: the noise's and the rounding stream's counter
            found_inf=step.found_inf,
            inv_scale=step.inv_scale,
            step=_progress.counters(group)[0],  # this update included: the debiasing's t
            lr=lr,
            beta1=group["beta1"],
            beta2=group["beta2"],
            ess=group["ess"],
            weight_decay=group["weight_decay"],
            clip_radius=group["clip_radius"],
            debias=self.debias,
            price=price,
            summed=summed,
            splits=step.split,
            noise_seed=self._seed(step, index, group, slots, one_sample_noise) if price and not summed else 0,
            seed=self._rounding_seed(step, index, group, slots),  # bfloat16 state: its stream of this step
        )

    # ---- the API of ivon-opt ----------------------------------------------------------
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> Any:
        """One IVON step.

        With ``closure``: ``mc_samples`` gradient passes, each at a new sample of the posterior (the
        closure computes the loss on the same batch, calls ``backward()`` and returns the loss; it may
        enter ``sampled_params(train=True)`` itself, as ivon-opt's closures do), then the update. Returns
        the mean of the losses, detached. Without: the update from the gradients of the samples taken
        since the last step with ``sampled_params(train=True)``; returns None.

        ``grad_scaler``: the gradients are unscaled as the kernels read them and the scaler is told of an
        inf or NaN (call ``grad_scaler.update()`` after). ``max_grad_norm``: clips the mean gradient over
        the samples to this global 2-norm. A non-finite gradient skips the step, state untouched.
        """
        if closure is None:
            self.update(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
            return None
        self._closure_running = True
        try:
            return self._take_step(lambda j: closure(), self.mc_samples, grad_scaler, max_grad_norm)
        finally:
            self._closure_running = False

    def sampled_params(self, train: bool = False, seed: int | None = None) -> contextlib.AbstractContextManager[None]:
        """Within the block the model holds a sample θ ~ N(m, 1/(ess·s)) of the posterior; on exit the mean.

        ``train=True`` (ivon-opt's training loop): the sample of the step in progress (a new one per block,
        drawn from the step's noise), and the gradient computed in the block feeds the next :meth:`step`
        (don't set .grad to None between the block and the next one or the step). ``train=False``: a sample
        for prediction, the one of ``seed`` (an integer: the same sample each time), or with ``seed=None`` the
        next of this optimizer's sequence (successive blocks give different samples, as ivon-opt's do; a
        seeded run gives the same ones). On exit, also on an exception, the parameters hold what they held
        before (see :meth:`BSAM.sampled_params <sambayes.BSAM.sampled_params>`).
        """
        if train:
            return self._training_sample()
        if seed is None:
            seed = _philox.noise_seed(self.param_groups[0]["seed"], self._posterior_draws, _philox.POSTERIOR_STREAM, 1)
            self._posterior_draws += 1
        return self._posterior_sample(seed)

    @contextlib.contextmanager
    def _training_sample(self) -> Iterator[None]:
        if self._closure_running:  # inside step(closure), which drew this pass's sample already
            yield
            return
        self.sample()
        try:
            yield
        except BaseException:
            self.abort()  # the pass failed: the step is abandoned, the model back at rest
            raise
        with torch.no_grad():  # the mean again (ivon-opt's block leaves it so); the gradient waits in .grad
            self._restore([s for _, slots in self._groups() for s in slots])
        torch.clear_autocast_cache()

    # ---- ivon-opt's state dicts ----------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this class (see ``TwoPassOptimizer.load_state_dict``), or one of ``ivon-opt``'s
        ``IVON.state_dict()`` over the same parameter groups: its flat per-group ``momentum`` and ``hess``
        become each parameter's ``momentum`` and ``precision`` = ``hess`` + ``weight_decay``, the mean is taken
        from the parameters (load the model's weights too, before or after), and its hyperparameters replace
        the groups' (the seed stays). ivon-opt does not save its step count: put ``current_step`` (its
        ``IVON.current_step``) into the dict, or the count is taken as 0 if the momentum is zero and otherwise
        as large enough that 1 − β1^t = 1 (the debiasing no longer acts), with a warning."""
        if _from_ivon_opt(state_dict):
            state_dict = self._converted(state_dict)
        super().load_state_dict(state_dict)

    def _converted(self, saved: dict[str, Any]) -> dict[str, Any]:
        """An ivon-opt state dict as this class's (checked by the base's load for everything else)."""
        groups = saved["param_groups"]
        count = saved.get("state", {}).get("count", 0)
        if count:
            raise ValueError(
                f"state_dict: an ivon-opt state dict saved in the middle of a step ({count} samples taken and not "
                "yet used by step()): save it between steps"
            )
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        momentum_zero = all(not bool(torch.as_tensor(g["momentum"]).any()) for g in groups)
        step = saved.get("current_step")
        if step is None:
            beta1 = max(float(g["beta1"]) for g in groups)
            step = 0 if momentum_zero else _steps_until_debiased(beta1)
            if step:
                warnings.warn(
                    f"IVON.load_state_dict: the ivon-opt state dict has no current_step; its step count is taken as "
                    f"{step}, after which 1 - beta1^t = 1 (add state_dict['current_step'] = ivon_opt.current_step)",
                    UserWarning,
                    stacklevel=caller_stacklevel(),
                )
        state, converted, pid = {}, [], 0
        for index, (ours, theirs) in enumerate(zip(self.param_groups, groups)):
            hyper = {k: theirs[k] for k in ("lr", "ess", "hess_init", "beta1", "beta2", "weight_decay", "clip_radius")}
            hess, momentum = torch.as_tensor(theirs["hess"]), torch.as_tensor(theirs["momentum"])
            numel = sum(p.numel() for p in ours["params"])
            if hess.numel() != numel or momentum.numel() != numel:
                raise ValueError(
                    f"group {index} of the ivon-opt state dict holds {hess.numel()} Hessian values, this "
                    f"optimizer's group has {numel} parameter elements"
                )
            ids, start = [], 0
            for p in ours["params"]:
                piece = slice(start, start + p.numel())
                if p.requires_grad:
                    state[pid] = {
                        "mean": _distributed.local(p).detach().clone(),
                        "precision": (hess[piece] + hyper["weight_decay"]).view(p.shape).to(p.device),
                        "momentum": momentum[piece].view(p.shape).to(p.device),
                    }
                ids.append(pid)
                pid, start = pid + 1, start + p.numel()
            converted.append({**hyper, "seed": ours["seed"], "step": step, "skipped_steps": 0, "params": ids})
        return {"state": state, "param_groups": converted}


def _one_sample(step: Step) -> bool:
    """At the update (step.split = k): one sample on one replica; the update computes the curvature estimate itself, from the gradient in .grad
    and the sample's noise, and no sums are kept. (DDP replicas each draw their own noise: their estimates are
    summed locally and averaged before the update.)"""
    return step.split == 1 and step.replication.world == 1


def _replicas() -> int:
    """The number of ranks of torch.distributed's default group (1 when it is not initialized)."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if initialized else 1


def _from_ivon_opt(state_dict: Any) -> bool:
    """Whether ``state_dict`` is ivon-opt's: its groups hold the flat ``hess`` and ``momentum`` buffers."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    return isinstance(groups, list) and bool(groups) and all(isinstance(g, dict) and "hess" in g for g in groups)


def _steps_until_debiased(beta1: float) -> int:
    """The smallest t with 1 − β1^t == 1 in float64."""
    if beta1 == 0:
        return 1
    t = max(1, math.ceil(math.log(2.0**-54) / math.log(beta1)))
    while 1 - beta1**t != 1:
        t += 1
    return t
