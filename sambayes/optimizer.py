"""What bSAM and SAM share: the phase order of a step of two gradient passes per sub-batch, and the
units it is built from (docs/architecture.md)::

    TwoPassOptimizer          construction, the phase API, step(closure, splits), the hooks
      ├─ _step.Step           the step in progress: phase, sub-batch, per-pass flags, sums, found-inf
      ├─ _ledger.Ledger       the parameter ledger: slots, lazy state, gradient buffers, versions
      ├─ _progress            counters across steps (step, skipped_steps, attempts), the skip report
      ├─ _replication         one policy per model: one process, DDP, FSDP2
      ├─ _checkpoint          state dicts: checked, saved with DTensor layouts, loaded
      └─ _amp                 the GradScaler adapter
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from . import _amp, _arguments, _batchnorm, _checkpoint, _progress, _replication, backends, phases
from ._arguments import check_number
from ._ledger import Ledger, Slot, grads, params, states
from ._step import PERTURBED, REST, SAMPLED, DeviceScalars, Step, SumPool, check_capture
from .phases import master_dtype

#: (group, its trainable parameters' slots) for every parameter group
Groups = list[tuple[dict[str, Any], list[Slot]]]


class TwoPassOptimizer(_checkpoint.Checkpoints, Optimizer):
    """Base of :class:`BSAM` and :class:`SAM`: a step of two gradient passes per sub-batch.

    Subclasses set ``rest_key`` (the state the parameters equal at rest) and implement the hooks:
    ``_check_group``, ``_state_keys``, ``_init_state``, ``_sample_group``, ``_perturb`` and
    ``_update_group`` (and, where they differ from the defaults, ``_stored_dtype``, ``_updated`` and
    ``_replica_statistics``). The hooks get the step in progress (:class:`sambayes._step.Step`) and
    the slots they work on as arguments; they call phases through :meth:`_run` and :meth:`_restore`.

    Gradients: each trainable parameter has one gradient buffer, attached as ``.grad`` whenever
    ``.grad`` is None and kept at the same address across passes and steps (see
    :class:`sambayes._ledger.Ledger`). Skipping: the phases that read gradients raise a per-device
    found-inf flag on an inf or NaN, and the update kernels leave the state untouched when it is set;
    the host never waits for the device to decide (see :mod:`sambayes._progress` for the counters).

    ``capturable=True`` (as torch.optim.Adam's): everything that changes from step to step is read by
    the kernels from device memory (the attempt count behind the noise and rounding seeds, hashed on
    the device; a tensor ``lr``), and the step copies nothing to the host, so that a whole step can be
    captured in a CUDA graph and replayed.
    """

    #: the state key the parameters hold at rest ("mean" for bSAM, "weight" for SAM)
    rest_key: str
    #: gradient passes per sub-batch: 2 (SAM, bSAM: a first pass, then one at the point the update's gradient
    #: is taken) or 1 (IVON: the gradient at each sample feeds the update; no perturb())
    passes: int = 2
    #: integer hyperparameters that every data-parallel replica takes from rank 0's first group
    rank0_hyperparameters: tuple[str, ...] = ()
    #: torch.amp.GradScaler.step(optimizer, closure) calls step(closure, grad_scaler=scaler)
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        defaults: dict[str, Any],
        backend: str,
        model: torch.nn.Module | None,
        bn_stats: str,
        keep_sums: bool | None = None,
        capturable: bool = False,
    ) -> None:
        params, model = _arguments.check_options(params, backend, model, bn_stats, keep_sums, capturable)
        #: "auto" or a backend name (sambayes.backends)
        self.backend = backend
        #: the step's changing scalars are read on the device and nothing is copied to the host (CUDA graphs)
        self.capturable = capturable
        #: keep the step's running sums allocated between steps (None: on the CPU only; see BSAM)
        self.keep_sums = keep_sums
        #: the module trained, when given: its BatchNorm statistics and gradient sync are managed
        self.model, self.bn_stats = model, bn_stats
        _replication.warn_without_model(model)
        defaults = dict(defaults, attempts=0, step=0, skipped_steps=0)
        self._hyperparameters = [k for k in defaults if k != "attempts"]  # what a checkpoint's groups carry
        super().__init__(params, defaults)
        self._build()  # after torch's fields: state before our units (benchmarks/bench_memory.py names by path)
        if model is None:
            params = [p for group in self.param_groups for p in group["params"]]
            _batchnorm.warn_if_bare(params, type(self).__name__, _arguments.caller_stacklevel())
        if not any(p.is_meta for group in self.param_groups for p in group["params"]):
            # the state exists from the start, as torch.distributed.checkpoint's get/set_optimizer_state_dict
            # need it (they would otherwise create it with step() and no closure); parameters changed before
            # the first step are taken as between steps. Parameters still on the meta device: at the first step
            with torch.no_grad():
                self._prepare_state()
        if self._replication.group is not None:
            for key in self.rank0_hyperparameters:
                value = self._replication.broadcast(self.param_groups[0][key])
                for group in self.param_groups:
                    group[key] = value

    def _build(self) -> None:
        """The units that are not checkpointed (rebuilt when unpickled)."""
        self._ledger = Ledger()
        self._pool = SumPool(self.keep_sums, self.backend)
        self._replication = _replication.policy(self.model)
        self._skips = _progress.SkipReport(type(self).__name__, self.capturable, self._weights)
        self._step: Step | None = None  # the step in progress
        self._scalars = DeviceScalars()  # every step's found-inf flags, and 1/scale without a GradScaler
        self._samples_held: list[int] = []  # the seeds of the sampled_params() blocks the model is in

    # ---- hyperparameters ----------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's duplicate warning: refused below instead
            super().add_param_group(param_group)
        try:
            _arguments.check_params(self.param_groups[-1]["params"], len(self.param_groups) - 1)
            _arguments.check_no_overlap(self.param_groups)
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a refused group must not stay and train
            raise

    # ---- hooks ------------------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - overridden
        """ValueError (or TypeError) naming the first bad hyperparameter of ``group``."""
        raise NotImplementedError

    def _state_keys(self) -> set[str]:  # pragma: no cover - overridden
        """The state keys of each parameter."""
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError  # pragma: no cover - overridden

    def _stored_dtype(self, key: str, param: torch.Tensor) -> torch.dtype:
        """The dtype state ``key`` of ``param`` is kept in (overridden where some keys are kept lower)."""
        return master_dtype(param.dtype)

    def _sample_group(self, step: Step, index: int, group: dict[str, Any], slots: list[Slot]) -> None:
        """Put the group's parameters where the first gradient of sub-batch ``step.split`` is taken."""
        raise NotImplementedError  # pragma: no cover - overridden

    def _perturb(self, step: Step, groups: Groups) -> None:
        """Move to the adversarial point from the gradients of ``step.written``, consuming them; restore
        the parameters without a gradient."""
        raise NotImplementedError  # pragma: no cover - overridden

    def _fold(self, step: Step, slots: list[Slot], first: bool, last: bool) -> None:
        """The gradients of the pass before the update (SAM, bSAM: the perturbed point) join their sums over
        sub-batches (``first``: the first of theirs; ``last``: the sums go back into .grad). A slot's only
        sub-batch (first and last): its buffer holds the sum already, and is checked for non-finite values."""
        if first and last:
            self._run(phases.FIND_NONFINITE, grads(slots), found_inf=step.found_inf)
            return
        if first:  # allocated, or kept from the last step if still of the right layout
            step.allocate("grad_sum")
        sums = step.sum_of("grad_sum", slots)
        self._run(phases.FOLD_GRADS, grads(slots), sums, found_inf=step.found_inf, first=first, last=last)

    def _updated(self, step: Step, slots: list[Slot]) -> list[Slot]:
        """The slots of a group that the update changes: those given a gradient in the step."""
        return step.with_grad(slots)

    def _replica_statistics(self, step: Step) -> list[torch.Tensor]:
        """Per-replica statistics to average across DDP replicas before the update (the gradients aside)."""
        return []

    def _update_group(self, step: Step, index: int, group: dict[str, Any], slots: list[Slot]) -> None:
        """Update the state of ``slots`` from the averaged gradients; the parameters back at rest."""
        raise NotImplementedError  # pragma: no cover - overridden

    # ---- what the hooks call ----------------------------------------------------------------------
    def _run(self, phase: phases.Phase, *lists: list, **scalars: Any) -> list:
        return backends.run(self.backend, phase, *lists, **scalars)

    def _restore(self, slots: list[Slot]) -> None:
        """θ = the rest state (bSAM's mean, SAM's weight) for ``slots``."""
        if slots:
            self._run(phases.RESTORE, params(slots), states(slots, self.rest_key))

    # ---- the phase API ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self) -> None:
        """Start sub-batch j: put the parameters where the first gradient is taken.

        bSAM: a sample θ = m + z/sqrt(N·s) of the posterior. SAM: the weights w
        (a point-mass posterior). Gives every parameter without a ``.grad`` its zeroed
        gradient buffer; from the second sub-batch on, adds the previous sub-batch's
        perturbed-point gradients to their running sums first. With a DDP ``model`` the
        backward pass that follows is not all-reduced (its gradient is only needed
        locally); BatchNorm statistics follow ``bn_stats``.
        """
        self._expect(REST, PERTURBED, action="sample")
        check_capture(type(self).__name__, self.capturable, self.backend, self._devices())
        self._replication.reshard()  # an evaluation since the last step may have left them gathered
        step = self._step
        if step is None:  # a new step
            self._skips.receive(self.param_groups)
            self._prepare_state()
            _arguments.check_materialized(self._ledger.slots)
            self._ledger.attach_grads(type(self).__name__)
            attempts = [_progress.attempts(group, self.capturable) for group in self.param_groups]
            flags = self._scalars.found_inf(self._devices())
            step = self._step = Step(self._run, self._ledger, self._pool, self._replication, flags, attempts)
        else:
            step.written = set(self._ledger.find_written("sample"))
            step.fold(self._fold, last=False)
        for index, (group, slots) in enumerate(self._groups()):
            self._sample_group(step, index, group, slots)
        if self.passes == 1:  # the gradient at this sample feeds the update: that pass begins now
            step.split += 1
            self._replication.grad_sync(False)  # local: the update averages the sums across replicas
            torch.clear_autocast_cache()
            step.phase = PERTURBED
            return
        self._replication.grad_sync(False)
        step.frozen_bn = _batchnorm.freeze(self.model, step.frozen_bn, self.bn_stats == "perturbed")
        torch.clear_autocast_cache()  # an autocast region open around the step keeps casts of the old weights
        step.phase = SAMPLED

    @torch.no_grad()
    def perturb(self, *, grad_scaler: torch.amp.GradScaler | None = None, sync: bool = True) -> None:
        """Move to the adversarial point from the gradients now in ``.grad``.

        Consumes those gradients (unscaling them as they are read if ``grad_scaler`` is
        given, and zeroing the buffers for the perturbed-point pass). An inf or NaN marks
        the step as skipped, decided on the device. ``sync=False`` keeps DDP from
        all-reducing the next backward pass: correct for all but the last sub-batch,
        since the sums are all-reduced with the last one.
        """
        if self.passes == 1:
            raise RuntimeError(f"{type(self).__name__} takes one gradient per sample: it has no perturb()")
        self._expect(SAMPLED, action="perturb")
        step = self._step
        step.written = set(self._ledger.find_written("perturb"))
        _arguments.warn_if_no_gradient(step.written, self._ledger.slots, "perturb", type(self).__name__)
        step.inv_scale = self._scalars.inv_scale(grad_scaler, self._devices())
        self._perturb(step, self._groups())  # subclasses restore the parameters without a gradient
        written = step.written_in(self._ledger.slots)
        self._ledger.grads_zeroed(written)
        step.ascended.update(written)
        if sync and self._replication.folds_before_last_pass and step.folded:
            # DDP all-reduces what .grad holds after the last pass: the sum so far goes back in first
            step.written = set()
            step.fold(self._fold, last=True)
            step.sums_in_grad = True
        step.split += 1
        self._replication.grad_sync(sync)
        step.frozen_bn = _batchnorm.freeze(self.model, step.frozen_bn, self.bn_stats == "noisy")
        torch.clear_autocast_cache()
        step.phase = PERTURBED

    @torch.no_grad()
    def update(self, *, grad_scaler: torch.amp.GradScaler | None = None, max_grad_norm: float | None = None) -> None:
        """Average the sub-batches' perturbed gradients (now in ``.grad``), update the
        state, and put the parameters back at rest; the gradient buffers are zeroed.

        ``grad_scaler``: the gradients are unscaled as the kernels read them, and the
        step's found-inf flag (an inf or NaN in either pass) is handed to the scaler, so
        that the ``grad_scaler.update()`` you call next backs off as PyTorch would.
        ``max_grad_norm``: clips the averaged perturbed-point gradient to this global
        2-norm first. A non-finite gradient of either pass (on any rank) skips the whole
        step, state untouched; the host does not wait for that decision.
        """
        self._expect(PERTURBED, action="update")
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low_open=True)
        step = self._step
        step.inv_scale = self._scalars.inv_scale(grad_scaler, self._devices())
        step.written = set(self._ledger.find_written("update"))
        folds = (step.split > 1 or self.passes == 1) and not step.sums_in_grad
        if folds:
            step.fold(self._fold, last=True)
        has_grad = step.with_grad(self._ledger.slots)
        _arguments.warn_if_no_gradient(has_grad, self._ledger.slots, "update", type(self).__name__)
        if has_grad and not folds:
            # .grad holds the whole sum, unread so far: the skip decision must come before the update
            self._run(phases.FIND_NONFINITE, grads(has_grad), found_inf=step.found_inf)
        step.agree_on_skipping()
        self._replication.average(self._replica_statistics(step))
        if max_grad_norm is not None and has_grad:
            step.clip(has_grad, max_grad_norm * step.split)
        for index, (group, slots) in enumerate(self._groups()):
            updated = self._updated(step, slots)
            _progress.count(group, step.flag_on(_progress.counters(group)[0].device))
            self._update_group(step, index, group, updated)
            self._ledger.grads_zeroed(updated)
            done = set(updated)
            self._restore([s for s in slots if s not in done])
            unused = [s for s in step.with_grad(slots) if s not in done]  # read, but no update: zeroed
            for grad in grads(unused):
                grad.zero_()
            self._ledger.grads_zeroed(unused)
        if _amp.enabled(grad_scaler):
            _amp.record_found_inf(grad_scaler, self, step.found_inf)
        self._skips.send(self.param_groups, warn=grad_scaler is None)  # with a scaler: its calibration
        self._end_step()
        self._skips.receive(self.param_groups)

    @torch.no_grad()
    def abort(self) -> None:
        """Abandon the step in progress: parameters back at rest, state untouched, gradients cleared.

        :meth:`step` calls it when the closure raises; call it yourself when a loop built
        on the phases gives up on a step halfway. A no-op at rest.
        """
        if self._step is None:
            return
        self._replication.reshard()  # a forward pass may have run without its backward pass
        self._restore(self._ledger.slots)
        self._ledger.drop_grads()
        self._end_step()

    def _end_step(self) -> None:
        step, self._step = self._step, None
        self._pool.give_back(step.sums)
        self._replication.grad_sync(True)
        _batchnorm.freeze(self.model, step.frozen_bn, False)
        torch.clear_autocast_cache()
        self._ledger.record_versions()
        self._opt_called = True  # tells torch's LR schedulers a step happened (phase API too)

    # ---- the closure API --------------------------------------------------------------------------
    def step(
        self,
        closure: Callable[..., Any] | None = None,
        splits: int = 1,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> torch.Tensor | None:
        """One whole step of ALGORITHM.md.

        ``closure()`` (``closure(j)`` for sub-batch j when ``splits > 1``) computes
        the loss, calls ``backward()`` (``grad_scaler.scale(loss).backward()`` with
        AMP) and returns the loss; it is called twice per sub-batch. Zeroing the
        gradients in it is not needed (the optimizer manages them) but harmless.
        Returns the mean loss at the perturbed points, detached, when the closure
        returns a loss (a one-element tensor or a number); otherwise what its last
        call returned (a tuple, a dict, None), as torch.optim returns the closure's
        value. With ``grad_scaler``, call ``grad_scaler.update()`` after the step, as usual.
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that computes the loss and calls backward(): "
                "the method takes two gradients per step; for custom loops use sample(), perturb(), update()"
            )
        _arguments.check_splits(splits)
        return self._take_step(
            (lambda j: closure(j)) if splits > 1 else (lambda j: closure()), splits, grad_scaler, max_grad_norm
        )

    def _take_step(self, call: Callable[[int], Any], splits: int, grad_scaler, max_grad_norm) -> Any:
        """``splits`` sub-batches (or samples), ``call(j)`` for each of their gradient passes, then the update;
        what :meth:`step` returns."""
        self._expect(REST, action="step")
        losses = []
        try:
            for j in range(splits):
                self.sample()
                if self.passes == 2:
                    with torch.enable_grad():
                        call(j)
                    self.perturb(grad_scaler=grad_scaler, sync=j == splits - 1)
                with torch.enable_grad():
                    losses.append(call(j))
            self.update(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        except BaseException:
            self.abort()  # e.g. an out-of-memory error the loop catches: leave the model at rest
            raise
        return _arguments.closure_result(losses)

    # ---- a posterior sample in the model (bSAM's sampled_params) -----------------------------------
    @contextlib.contextmanager
    def _holding_sample(self, seed: int, draw: Callable[[int, Groups], None]) -> Iterator[None]:
        """Within the block the model holds what ``draw(seed, groups)`` writes; on exit, also on an
        exception, what it held before: the rest state again, exactly, or the enclosing block's sample
        when blocks nest. Not in the middle of a step; no step can start inside the block."""
        if self._step is not None:
            self._expect(REST, action="sampled_params")
        with torch.no_grad():
            if not self._samples_held:
                self._prepare_state()
            self._samples_held.append(seed)
        try:
            with torch.no_grad():
                self._replication.reshard()  # forward passes without backward came before (evaluations)
                draw(seed, self._groups())
            torch.clear_autocast_cache()  # an evaluation under autocast must not reuse casts of other weights
            yield
        finally:
            with torch.no_grad():
                self._samples_held.pop()
                self._replication.reshard()
                if self._samples_held:
                    draw(self._samples_held[-1], self._groups())
                else:
                    self._restore(self._ledger.slots)
                    self._ledger.record_versions()
            torch.clear_autocast_cache()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far for a non-finite gradient (the largest count of any group; waits for the device)."""
        self._skips.receive(self.param_groups, wait=True)
        return max((int(_progress.counters(group)[1]) for group in self.param_groups), default=0)

    @property
    def backend_used(self) -> dict[torch.device, str]:
        """The backend that runs on each device of the parameters ("auto" resolved), e.g. {cpu: "cpu"}."""
        return {device: backends.pick(self.backend, device) for device in self._devices()}

    # ---- helpers ----------------------------------------------------------------------------------
    def _groups(self) -> Groups:
        return list(zip(self.param_groups, self._ledger.group_slots))

    def _prepare_state(self) -> None:
        self._ledger.prepare_state(self.param_groups, self.state, self._init_state, self._stored_dtype, self.rest_key)

    def _weights(self) -> list[torch.Tensor]:
        """What the parameters hold at rest: each trainable parameter's rest state."""
        return [s.state[self.rest_key] for s in self._ledger.slots if s.state]

    def _devices(self) -> list[torch.device]:
        return self._ledger.devices or [torch.device("cpu")]

    def _expect(self, *allowed: str, action: str) -> None:
        if self._samples_held:
            raise RuntimeError(
                f"{action}() inside a sampled_params() block: the model holds a posterior sample, not the "
                "weights a step starts from; leave the block first"
            )
        phase = REST if self._step is None else self._step.phase
        if phase not in allowed:
            shown = SAMPLED if self.passes == 1 and phase == PERTURBED else phase
            order = (
                "sample() -> backward -> perturb() -> backward [repeat per sub-batch] -> update()"
                if self.passes == 2
                else "sample() -> backward [repeat per sample] -> update()"
            )
            raise RuntimeError(f"{action}() called while the optimizer is {shown}; a step is {order}")
