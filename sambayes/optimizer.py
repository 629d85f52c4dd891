"""What bSAM and SAM share: two gradient passes per sub-batch, the phase API,
gradient bookkeeping, non-finite skipping and checkpoints (docs/architecture.md)."""

from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from . import _batchnorm, _distributed, backends

# phases of a step, in order: at rest -> sampled -> perturbed -> (sampled -> perturbed)* -> at rest
_REST, _SAMPLED, _PERTURBED = "at rest", "sampled", "perturbed"


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """float64 state for float64 parameters, float32 master state otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def check_number(name: str, value: Any, *, low: float = 0.0, low_open: bool = False, high: float | None = None) -> None:
    """ValueError naming the argument unless low <(=) value (< high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    if value < low or (low_open and value == low) or (high is not None and value >= high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{name}={value!r}: must be {bound}")


def check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas={betas!r}: expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, high=1.0)


def split_batch(*tensors: torch.Tensor, splits: int) -> list[tuple[torch.Tensor, ...]]:
    """Cut a minibatch into ``splits`` equal consecutive sub-batches (ALGORITHM.md's B_1..B_k).

    Returns one tuple of views per sub-batch. ValueError if ``splits`` does not
    divide the batch size (dimension 0) or the tensors disagree on it.
    """
    _check_splits(splits)
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"split_batch: tensors have different batch sizes {sorted(sizes)}")
    (size,) = sizes
    if size % splits:
        raise ValueError(f"splits={splits} does not divide the batch size {size}")
    return list(zip(*(t.chunk(splits) for t in tensors)))


def _check_splits(splits: Any) -> None:
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits={splits!r}: must be an integer >= 1")


class TwoPassOptimizer(Optimizer):
    """Base of :class:`BSAM` and :class:`SAM`.

    Subclasses set ``_rest_key`` (the state tensor the parameters equal at rest),
    implement ``_init_state``, ``_sample_group``, ``_perturb`` and ``_update_group``,
    and validate their hyperparameters in ``_check_group``.
    """

    _rest_key = "mean"

    def __init__(
        self, params, defaults: dict[str, Any], backend: str, model: torch.nn.Module | None, bn_stats: str
    ) -> None:
        self.backend = backends.check_backend(backend)
        if isinstance(params, torch.nn.Module):
            if model is not None and model is not params:
                raise ValueError("pass the model either as params or as model=, not two different ones")
            model, params = params, params.parameters()
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model={type(model).__name__}: expected a torch.nn.Module (or DDP / FSDP2 module)")
        if bn_stats not in _batchnorm.BN_POLICIES:
            raise ValueError(f"bn_stats={bn_stats!r}: choose one of {_batchnorm.BN_POLICIES}")
        #: the module trained, when given: its BatchNorm statistics and gradient sync are managed
        self.model, self.bn_stats = model, bn_stats
        self._bn_saved: dict | None = None  # BatchNorm flags while their statistics are frozen
        defaults = dict(defaults, step=0, skipped_steps=0)
        super().__init__(params, defaults)
        self._phase = _REST
        self._split = 0  # sub-batches sampled since the last update
        self._skip = False  # a non-finite gradient was seen in this step
        self._grad_sums: dict[torch.Tensor, torch.Tensor | None] = {}  # perturbed-gradient sums, stashed
        self._versions: dict[torch.Tensor, tuple[int, int]] = {}  # (version, storage) when we last wrote it
        self._ascended: set[torch.Tensor] = set()  # params that got a gradient in perturb() this step
        self._handed_back: dict[torch.Tensor, torch.Tensor] = {}  # gradient sums perturb() put back in .grad
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}  # per-parameter buffers of subclasses, not checkpointed

    # ---- hyperparameters -------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a refused group must not stay and train
            raise

    def _check_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups: add what this class needs to step
        return {**super().__getstate__(), "backend": self.backend, "model": self.model, "bn_stats": self.bn_stats}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, value in (("backend", "auto"), ("model", None), ("bn_stats", "noisy"), ("_bn_saved", None)):
            self.__dict__.setdefault(name, value)
        for name, value in (("_phase", _REST), ("_split", 0), ("_skip", False)):
            self.__dict__.setdefault(name, value)
        self.__dict__.setdefault("_grad_sums", {})
        self.__dict__.setdefault("_versions", {})
        self.__dict__.setdefault("_ascended", set())
        self.__dict__.setdefault("_handed_back", {})
        self.__dict__.setdefault("_scratch", {})

    # ---- bookkeeping ------------------------------------------------------------------
    @staticmethod
    def _trainable(group: dict[str, Any]) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.requires_grad]

    def _states(self, params: list[torch.Tensor], key: str) -> list[torch.Tensor]:
        return [self.state[p][key] for p in params]

    def _prepare_state(self, group: dict[str, Any]) -> None:
        """Create state lazily; follow parameters that were moved or overwritten since we last wrote them."""
        for p in self._trainable(group):
            state = self.state[p]
            if not state:
                self._init_state(p, state, group)
                self._versions[p] = self._version_of(p)
                continue
            rest = state[self._rest_key]
            if rest.device != p.device or rest.dtype != state_dtype(p):  # module.to(...) moved or cast them
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        state[key] = value.to(p.device, state_dtype(p))
                rest = state[self._rest_key]
            if self._versions.get(p) != self._version_of(p):
                # the user changed the weights (e.g. model.load_state_dict): they win,
                # unless they are just the rounding of our higher-precision copy
                weights = _distributed.local(p).detach()
                if not torch.equal(weights, rest.to(p.dtype)):
                    rest.copy_(weights)
                self._versions[p] = self._version_of(p)

    @staticmethod
    def _version_of(p: torch.Tensor) -> tuple[int, int]:
        # in-place writes bump _version; `p.data = new` swaps the storage
        return p._version, _distributed.local(p).data_ptr()

    def _record_versions(self) -> None:
        for group in self.param_groups:
            for p in self._trainable(group):
                self._versions[p] = self._version_of(p)

    @staticmethod
    def _local(params: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the backends write: the tensors themselves, or this rank's shards (FSDP2)."""
        return [_distributed.local(p) for p in params]

    def _grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        grads = [_distributed.local(p.grad) for p in params]
        for p, g in zip(params, grads):
            if g.is_sparse:
                raise TypeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of shape {tuple(p.shape)})"
                )
        return grads

    @staticmethod
    def _all_finite(grads: list[torch.Tensor]) -> bool:
        """One host sync per device. The max-norm is non-finite iff some element is (a 2-norm
        could overflow: float16 gradients of 800 over 10^4 elements)."""
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            by_device[g.device].append(g)
        return all(
            bool(torch.stack([n.float() for n in torch._foreach_norm(gs, ord=math.inf)]).isfinite().all())
            for gs in by_device.values()
        )

    def _with_grad(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(params with a gradient, params without one) of the group's trainable params."""
        params = self._trainable(group)
        return [p for p in params if p.grad is not None], [p for p in params if p.grad is None]

    def _restore(self, params: list[torch.Tensor]) -> None:
        if params:
            backends.run(self.backend, "restore", self._local(params), self._states(params, self._rest_key))

    def _check_grad_sums_kept(self, action: str) -> None:
        """The perturbed gradients of earlier sub-batches live in .grad: zeroing them loses them."""
        if self.model is not None and (_distributed.is_ddp(self.model) or _distributed.is_fsdp2(self.model)):
            return  # their reducers may legitimately swap .grad for a bucket view
        for p, grad_sum in self._handed_back.items():
            if p.grad is not grad_sum:
                raise RuntimeError(
                    f"{action}(): the gradients that perturb() put back in .grad were replaced (zero_grad() or "
                    "set to None inside the step?); they hold the earlier sub-batches' perturbed gradients. "
                    "Don't zero gradients between sample() and update(): the optimizer manages them"
                )

    def _expect(self, *phases: str, action: str) -> None:
        if self._phase not in phases:
            raise RuntimeError(
                f"{action}() called while the optimizer is {self._phase}; a step is "
                "sample() -> backward -> perturb() -> backward [repeat per sub-batch] -> update()"
            )

    # ---- the model between passes ------------------------------------------------------
    def _freeze_bn(self, frozen: bool) -> None:
        if self.model is None or frozen == (self._bn_saved is not None):
            return
        if frozen:
            self._bn_saved = _batchnorm.set_bn_stats_frozen(self.model, True)
        else:
            _batchnorm.set_bn_stats_frozen(self.model, False, self._bn_saved)
            self._bn_saved = None

    def _noise_split(self) -> int:
        """Sub-batch index for the noise: DDP replicas interleave, so each draws its own."""
        rank, world = _distributed.replica_rank(self.model)
        return self._split * world + rank

    def _sync_group(self):
        """The process group over which the skip decision must agree, or None."""
        if (
            _distributed.is_ddp(self.model) or _distributed.is_fsdp2(self.model)
        ) and torch.distributed.is_initialized():
            return getattr(self.model, "process_group", None) or torch.distributed.group.WORLD
        return None

    @staticmethod
    def _unscale(grads: list[torch.Tensor], grad_scaler) -> bool:
        """Divide gradients by the scaler's scale in place; True if all are finite."""
        inv_scale = 1.0 / grad_scaler.get_scale()
        finite = True
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            by_device[g.device].append(g)
        for device, gs in by_device.items():
            found_inf = torch.zeros((), device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(gs, found_inf, torch.full((), inv_scale, device=device))
            finite = finite and not bool(found_inf)
        return finite

    # ---- the phase API ----------------------------------------------------------------
    @torch.no_grad()
    def sample(self) -> None:
        """Start sub-batch j: put the parameters where the first gradient is taken.

        bSAM: a sample θ = m + z/sqrt(N·s) of the posterior. SAM: the weights w
        (a point-mass posterior). Clears the gradients; from the second
        sub-batch on, it sets aside the running sum of the perturbed-point
        gradients, which :meth:`perturb` puts back. With a DDP ``model`` the
        backward pass that follows is not all-reduced (its gradient is only
        needed locally); BatchNorm statistics follow ``bn_stats``.
        """
        self._expect(_REST, _PERTURBED, action="sample")
        self._check_grad_sums_kept("sample")
        for group in self.param_groups:
            if self._split == 0:
                self._prepare_state(group)
            for p in self._trainable(group):
                if self._split > 0:
                    self._grad_sums[p] = p.grad
                p.grad = None
        for index, group in enumerate(self.param_groups):
            self._sample_group(index, group)
        if _distributed.is_ddp(self.model):
            _distributed.set_grad_sync(self.model, False)
        self._freeze_bn(self.bn_stats == "perturbed")
        self._phase = _SAMPLED

    @torch.no_grad()
    def perturb(self, *, grad_scaler: torch.amp.GradScaler | None = None, sync: bool = True) -> None:
        """Move to the adversarial point from the gradients now in ``.grad``.

        Consumes those gradients (unscaling them first if ``grad_scaler`` is given)
        and hands ``.grad`` back to the perturbed-point pass, holding the sum of the
        previous sub-batches' perturbed gradients. A non-finite gradient marks the
        step as skipped and puts the parameters back at rest. ``sync=False`` keeps
        DDP from all-reducing the next backward pass: correct for all but the last
        sub-batch, since the sums are all-reduced with the last one.
        """
        self._expect(_SAMPLED, action="perturb")
        with_grad = [p for group in self.param_groups for p in self._with_grad(group)[0]]
        grads = self._grads(with_grad)
        finite = self._unscale(grads, grad_scaler) if grad_scaler is not None else self._all_finite(grads)
        self._skip = self._skip or not finite
        if self._skip:
            for group in self.param_groups:
                self._restore(self._trainable(group))
        else:
            self._perturb()
            self._ascended.update(with_grad)
        for group in self.param_groups:
            for p in self._trainable(group):
                p.grad = self._grad_sums.pop(p, None)
                if p.grad is not None:
                    self._handed_back[p] = p.grad
        self._split += 1
        if _distributed.is_ddp(self.model):
            _distributed.set_grad_sync(self.model, sync)
        self._freeze_bn(self.bn_stats == "noisy")
        self._phase = _PERTURBED

    @torch.no_grad()
    def update(self, *, grad_scaler: torch.amp.GradScaler | None = None, max_grad_norm: float | None = None) -> None:
        """Average the sub-batches' perturbed gradients (now in ``.grad``), update the
        state, and put the parameters back at rest.

        ``grad_scaler``: unscales the gradients through ``grad_scaler.unscale_(self)``
        and records an inf of either pass there, so that the ``grad_scaler.update()``
        you call next backs off as PyTorch would. ``max_grad_norm``: clips the
        averaged perturbed-point gradient to this global 2-norm first. Skips the
        whole step, state untouched, if a gradient of either pass was not finite
        (on any rank).
        """
        self._expect(_PERTURBED, action="update")
        self._check_grad_sums_kept("update")
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low_open=True)
        with_grad = [p for group in self.param_groups for p in self._with_grad(group)[0]]
        grads = self._grads(with_grad)
        # scaled or not, a non-finite gradient stays non-finite: decide before unscaling
        self._skip = self._skip or not self._all_finite(grads)
        sync_group = self._sync_group()
        if sync_group is not None:  # a rank's noisy pass (or FSDP2 shard) is its own: agree on skipping
            flag = torch.tensor(
                float(self._skip), device=grads[0].device if grads else _distributed.comm_device(sync_group)
            )
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=sync_group)
            self._skip = bool(flag)
        if grad_scaler is not None:
            if self._skip and grads:  # the scaler inspects this pass only: show it the step's inf
                grads[0].fill_(float("inf"))
            grad_scaler.unscale_(self)
        if not self._skip:
            self._reduce_across_replicas()
            if max_grad_norm is not None and with_grad:
                # .grad holds the sum over sub-batches: clip that to splits × the bound
                torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm * self._split)
        for group in self.param_groups:
            if self._skip:
                self._restore(self._trainable(group))
                group["skipped_steps"] += 1
                continue
            updated = [p for p in self._with_grad(group)[0] if self._has_ascent(p)]
            updated_set = set(updated)
            untouched = [p for p in self._trainable(group) if p not in updated_set]
            group["step"] += 1
            self._update_group(group, updated)
            self._restore(untouched)
        if self._skip and grad_scaler is None:  # with a scaler, skipped steps are its calibration
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient, step skipped "
                f"(skipped so far: {self.param_groups[0]['skipped_steps']})",
                RuntimeWarning,
                stacklevel=3,  # the caller of update(), past torch.no_grad's wrapper
            )
        self._end_step()

    def _reduce_across_replicas(self) -> None:
        """Average per-replica statistics other than the gradients (DDP averages those)."""

    def _has_ascent(self, p: torch.Tensor) -> bool:
        return True

    def _end_step(self) -> None:
        self._split, self._skip, self._phase = 0, False, _REST
        self._grad_sums.clear()
        self._handed_back.clear()
        self._ascended.clear()
        if _distributed.is_ddp(self.model):
            _distributed.set_grad_sync(self.model, True)
        self._freeze_bn(False)
        self._record_versions()
        self._opt_called = True  # tells torch's LR schedulers a step happened (phase API too)

    @torch.no_grad()
    def abort(self) -> None:
        """Abandon the step in progress: parameters back at rest, state untouched, gradients cleared.

        :meth:`step` calls it when the closure raises; call it yourself when a loop built
        on the phases gives up on a step halfway. A no-op at rest.
        """
        if self._phase == _REST:
            return
        for group in self.param_groups:
            self._restore(self._trainable(group))
            for p in self._trainable(group):
                p.grad = None
        self._end_step()

    # ---- the closure API --------------------------------------------------------------
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
        AMP) and returns the loss; it is called twice per sub-batch. Do not zero
        the gradients in it: the optimizer manages them. Returns the mean loss at
        the perturbed points, detached. With ``grad_scaler``, call
        ``grad_scaler.update()`` after the step, as usual.
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that computes the loss and calls backward(): "
                "the method takes two gradients per step; for custom loops use sample(), perturb(), update()"
            )
        _check_splits(splits)
        self._expect(_REST, action="step")
        losses = []
        try:
            for j in range(splits):
                self.sample()
                with torch.enable_grad():
                    closure(j) if splits > 1 else closure()
                self.perturb(grad_scaler=grad_scaler, sync=j == splits - 1)
                with torch.enable_grad():
                    loss = closure(j) if splits > 1 else closure()
                losses.append(loss)
            self.update(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        except BaseException:
            self.abort()  # e.g. an out-of-memory error the loop catches: leave the model at rest
            raise
        if any(loss is None for loss in losses):
            return None
        return torch.stack([torch.as_tensor(loss).detach() for loss in losses]).mean()

    # ---- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._phase != _REST:
            raise RuntimeError(f"state_dict() called in the middle of a step (optimizer is {self._phase})")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint written by any backend. Refuses one for other parameter shapes.

        Unlike ``torch.optim.Optimizer``, keeps float32 master state for
        low-precision parameters instead of casting it to the parameter dtype.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(f"state_dict has {len(saved_ids)} parameters, this optimizer has {len(params)}")
        by_id = dict(zip(saved_ids, params))
        for pid, saved in state_dict["state"].items():
            p = by_id.get(pid)
            for key, value in saved.items():
                shape = _distributed.local(p).shape if p is not None else None  # FSDP2: this rank's shard
                if p is not None and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shape:
                    raise ValueError(
                        f"state_dict does not fit this model: state {key!r} of parameter {pid} has shape "
                        f"{tuple(value.shape)}, the parameter has shape {tuple(shape)}"
                    )
        super().load_state_dict(state_dict)
        for pid, saved in state_dict["state"].items():
            p = by_id.get(pid)
            if p is None:
                continue
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=state_dtype(p), copy=True)
        # between steps the model holds the state it was saved with
        with torch.no_grad():
            for group in self.param_groups:
                self._restore([p for p in self._trainable(group) if self.state.get(p)])
        self._phase, self._split, self._skip = _REST, 0, False
        self._grad_sums.clear()
        self._record_versions()
