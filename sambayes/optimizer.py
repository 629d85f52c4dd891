"""What bSAM and SAM share: two gradient passes per sub-batch, the phase API,
gradient bookkeeping, non-finite skipping and checkpoints (docs/architecture.md)."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import warnings
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from . import _batchnorm, _distributed, backends

# phases of a step, in order: at rest -> sampled -> perturbed -> (sampled -> perturbed)* -> at rest
_REST, _SAMPLED, _PERTURBED = "at rest", "sampled", "perturbed"
#: the parameter dtypes every backend trains
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """float64 state for float64 parameters, float32 master state otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def check_number(name: str, value: Any, *, low: float = 0.0, low_open: bool = False, high: float | None = None) -> None:
    """ValueError naming the argument unless low <(=) value (< high). A one-element tensor counts
    as its value (``lr=torch.tensor(0.1)``, as torch.optim accepts it)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
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


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside sambayes and torch: the user's call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


# this package, torch (no_grad's wrapper) and contextlib: frames between the user's call and a warning
_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(torch.__file__) + os.sep,
    contextlib.__file__,
)


_warned_about_model = False


def _warn_if_distributed_without_model(model: torch.nn.Module | None) -> None:
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
        stacklevel=4,
    )


def _check_splits(splits: Any) -> None:
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits={splits!r}: must be an integer >= 1")


def devices_of(slots: list) -> list[torch.device]:
    """The devices of the slots' tensors, in first-seen order."""
    return list(dict.fromkeys(s.local.device for s in slots))


class _Slot:
    """One trainable parameter as the optimizer keeps it between phases and steps."""

    __slots__ = (
        "ascended",
        "curvature_sum",
        "folded",
        "grad",
        "grad_local",
        "grad_sum",
        "grad_version",
        "group",
        "local",
        "offset",
        "param",
        "sharded",
        "state",
        "version",
        "written",
    )  # fmt: skip

    def __init__(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        self.param, self.group, self.offset, self.state = param, group, 0, {}
        self.sharded = hasattr(param, "to_local")  # a DTensor (FSDP2): the backends get its local shard
        self.local = _distributed.local(param)
        self.version = None  # (version, storage) of the parameter when we last wrote it
        self.grad = self.grad_local = None  # the gradient buffer (.grad) and its local tensor
        self.grad_version = -1  # the buffer's version when a phase last left it zeroed
        self.grad_sum = self.curvature_sum = None  # sums over the sub-batches of a step (see _scratch)
        self.written = self.ascended = self.folded = False  # this pass / this step

    def version_now(self) -> tuple[int, int]:
        # in-place writes bump _version; `p.data = new` swaps the storage
        return self.param._version, self.local.data_ptr()

    def adopt(self, grad: torch.Tensor) -> None:
        """Take ``grad`` as this parameter's gradient buffer, as it stands."""
        self.grad, self.grad_local = grad, _distributed.local(grad)
        self.grad_version = self.grad_local._version


class TwoPassOptimizer(Optimizer):
    """Base of :class:`BSAM` and :class:`SAM`.

    Subclasses set ``_rest_key`` (the state tensor the parameters equal at rest),
    implement ``_init_state``, ``_sample_group``, ``_perturb`` and ``_update_group``,
    and validate their hyperparameters in ``_check_group``.

    Gradients: each trainable parameter has one gradient buffer, attached as ``.grad``
    whenever ``.grad`` is None and kept at the same address across passes and steps.
    Every backward pass accumulates into it while it is zero; the phase that consumes a
    gradient (the ascent, the sum over sub-batches, the update) zeroes it again. Whether
    a pass gave a parameter a gradient is read from the buffer's version counter.

    Skipping: the phases that read gradients raise a per-device found-inf flag on an inf
    or NaN, and the update kernels leave the state untouched when it is set; the host
    never waits for the device to decide. ``group["step"]`` (updates taken) and
    ``group["skipped_steps"]`` are 0-dim device tensors; ``group["attempts"]`` (their
    sum, which the noise seed counts) is a host int.

    ``capturable=True`` (as torch.optim.Adam's): everything that changes from step to step
    is read by the kernels from device memory (the attempt count behind the noise and
    rounding seeds, hashed on the device; a tensor ``lr``), and the step copies nothing to
    the host, so that a whole step can be captured in a CUDA graph and replayed.
    """

    _rest_key = "mean"

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
        self.backend = backends.check_backend(backend)
        if keep_sums not in (None, True, False):
            raise ValueError(f"keep_sums={keep_sums!r}: True, False or None (on the CPU only)")
        if capturable not in (True, False):
            raise ValueError(f"capturable={capturable!r}: True or False")
        #: the step's changing scalars are read on the device and nothing is copied to the host (CUDA graphs)
        self.capturable = bool(capturable)
        #: keep the step's running sums allocated between steps (None: on the CPU only; see BSAM)
        self.keep_sums = keep_sums
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
        _warn_if_distributed_without_model(model)
        self._bn_saved: list | None = None  # the BatchNorm layers whose statistics are frozen now
        defaults = dict(defaults, attempts=0, step=0, skipped_steps=0)
        self._hyperparameters = [k for k in defaults if k != "attempts"]  # what a checkpoint's groups carry
        super().__init__(params, defaults)
        self._init_scratch()
        if not any(p.is_meta for group in self.param_groups for p in group["params"]):
            # the state exists from the start, as torch.distributed.checkpoint's get/set_optimizer_state_dict
            # need it (they would otherwise create it with step() and no closure); parameters changed before
            # the first step are taken as between steps. Parameters still on the meta device: at the first step
            with torch.no_grad():
                self._prepare_state()

    def _init_scratch(self) -> None:
        """What lives between the phases of a step, and buffers kept across steps (not checkpointed)."""
        self._phase = _REST
        self._split = 0  # sub-batches sampled since the last update
        self._slots: list[_Slot] = []  # one per trainable parameter, in group order
        self._slot_devices: list[torch.device] = []  # their devices
        self._group_slots: list[list[_Slot]] = []  # the same, per parameter group
        self._unfolded = False  # the sums went back into .grad before the last pass (DDP all-reduces them)
        self._found_inf: dict[torch.device, torch.Tensor] = {}  # this step's flag per device
        self._ones: dict[torch.device, torch.Tensor] = {}  # inv_scale without a GradScaler
        self._skip_report: tuple | None = None  # (host copy of the skipped count, event, warn) in flight
        self._posterior_seeds: list[int] = []  # the seeds of the sampled_params() blocks the model is in
        self._skips_reported = 0

    # ---- hyperparameters -------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's duplicate warning: refused below instead
            super().add_param_group(param_group)
        try:
            self._check_params(self.param_groups[-1]["params"], len(self.param_groups) - 1)
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a refused group must not stay and train
            raise

    @staticmethod
    def _check_params(params: list[torch.Tensor], index: int) -> None:
        """TypeError for a parameter the backends cannot train, ValueError for one listed twice."""
        seen = set()
        for i, p in enumerate(params):
            if p.dtype not in _DTYPES:
                raise TypeError(
                    f"parameter {i} of group {index} (shape {tuple(p.shape)}) has dtype {p.dtype}; sambayes trains "
                    f"float64, float32, bfloat16 and float16 parameters"
                )
            if id(p) in seen:
                raise ValueError(f"parameter {i} of group {index} (shape {tuple(p.shape)}) is listed twice")
            seen.add(id(p))

    def _check_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups: add what this class needs to step
        return {
            **super().__getstate__(),
            "backend": self.backend,
            "model": self.model,
            "bn_stats": self.bn_stats,
            "capturable": self.capturable,
            "_hyperparameters": self._hyperparameters,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, value in (
            ("backend", "auto"),
            ("model", None),
            ("bn_stats", "noisy"),
            ("_bn_saved", None),
            ("keep_sums", None),
            ("capturable", False),
        ):
            self.__dict__.setdefault(name, value)
        self.__dict__.setdefault("_hyperparameters", [k for k in self.defaults if k != "attempts"])
        self._init_scratch()

    # ---- bookkeeping ------------------------------------------------------------------
    @staticmethod
    def _trainable(group: dict[str, Any]) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.requires_grad]

    def _refresh_slots(self, rebuild: bool = False) -> None:
        """One slot per trainable parameter, in group order: rebuilt when the trainable parameters
        change (or ``rebuild``: the state dicts were replaced), keeping each parameter's buffers."""
        groups = [self._trainable(group) for group in self.param_groups]
        current = [p for params in groups for p in params]
        same = len(current) == len(self._slots) and all(s.param is p for s, p in zip(self._slots, current))
        if same and not rebuild:
            for s in self._slots:
                if s.sharded:  # a DTensor's local view is looked up again each step
                    s.local = _distributed.local(s.param)
            return
        old = {id(s.param): s for s in self._slots}
        self._group_slots = []
        for group, params in zip(self.param_groups, groups):
            offsets, start = {}, 0
            for p in group["params"]:  # element index: position in the group's flat concatenation
                offsets[id(p)] = start + _distributed.global_offset(p)  # a shard draws what the whole tensor would
                start += p.numel()
            slots = []
            for p in params:
                slot = old.get(id(p)) or _Slot(p, group)
                slot.group, slot.offset, slot.local = group, offsets[id(p)], _distributed.local(p)
                slot.state = self.state[p]
                slots.append(slot)
            self._group_slots.append(slots)
        self._slots = [s for slots in self._group_slots for s in slots]
        self._slot_devices = list(dict.fromkeys(s.param.device for s in self._slots))

    def _prepare_state(self) -> None:
        """Create state lazily; follow parameters that were moved or overwritten since we last wrote them."""
        self._refresh_slots()
        for s in self._slots:
            p, state = s.param, s.state
            if not state:
                self._init_state(p, state, s.group)
                s.version = s.version_now()
                continue
            rest = state[self._rest_key]
            if rest.device != p.device or rest.dtype != state_dtype(p):  # module.to(...) moved or cast them
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        state[key] = value.to(p.device, self._state_dtype(key, p))
                rest = state[self._rest_key]
                self._slot_devices = list(dict.fromkeys(s.param.device for s in self._slots))
            if s.version != s.version_now():
                # the user changed the weights (e.g. model.load_state_dict): they win,
                # unless they are just the rounding of our higher-precision copy
                weights = s.local.detach()
                if not torch.equal(weights, rest.to(p.dtype)):
                    rest.copy_(weights)
                s.version = s.version_now()

    def _counters(self, group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's (step, skipped_steps) as 0-dim tensors on its device (ints after a checkpoint load)."""
        params = self._trainable(group) or group["params"]
        device = params[0].device if params else torch.device("cpu")
        for key, dtype in (("step", torch.float64), ("skipped_steps", torch.int64)):
            value = group[key]
            if not isinstance(value, torch.Tensor) or value.device != device:
                group[key] = torch.as_tensor(value, dtype=dtype).to(device)
        return group["step"], group["skipped_steps"]

    def _attempts_on_device(self, group: dict[str, Any], *, counted: bool) -> torch.Tensor:
        """The group's step attempts before this step (step + skipped_steps), a 0-dim int64 tensor on
        its device, for ``capturable=True``; ``counted``: the update has counted this step already."""
        step, skipped = self._counters(group)
        return step.long() + skipped - int(counted)

    @staticmethod
    def _lr(group: dict[str, Any], slots: list[_Slot]) -> float | dict[torch.device, torch.Tensor]:
        """The group's lr for the update kernels: a number by value; a tensor (say, one a scheduler fills)
        as a float64 0-dim tensor on each device, which the kernels read there (no host sync)."""
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor):
            return lr
        return {device: lr.to(device=device, dtype=torch.float64).reshape(()) for device in devices_of(slots)}

    def _record_versions(self) -> None:
        for s in self._slots:
            s.version = s.version_now()

    @staticmethod
    def _states(slots: list[_Slot], key: str) -> list[torch.Tensor]:
        return [s.state[key] for s in slots]

    @staticmethod
    def _local(slots: list[_Slot]) -> list[torch.Tensor]:
        """What the backends write: the tensors themselves, or this rank's shards (FSDP2)."""
        return [s.local for s in slots]

    @staticmethod
    def _grads(slots: list[_Slot]) -> list[torch.Tensor]:
        """The gradient buffers the backends read and write (this rank's shards under FSDP2)."""
        return [s.grad_local for s in slots]

    def _restore(self, slots: list[_Slot]) -> None:
        if slots:
            backends.run(self.backend, "restore", self._local(slots), self._states(slots, self._rest_key))

    def _expect(self, *phases: str, action: str) -> None:
        if self._posterior_seeds:
            raise RuntimeError(
                f"{action}() inside a sampled_params() block: the model holds a posterior sample, not the "
                "weights a step starts from; leave the block first"
            )
        if self._phase not in phases:
            raise RuntimeError(
                f"{action}() called while the optimizer is {self._phase}; a step is "
                "sample() -> backward -> perturb() -> backward [repeat per sub-batch] -> update()"
            )

    # ---- gradient buffers ---------------------------------------------------------------
    def _attach_grads(self) -> None:
        """Give every trainable parameter whose .grad is None its (zeroed) gradient buffer."""
        for s in self._slots:
            p = s.param
            if p.grad is s.grad and s.grad is not None:  # steady state: our buffer, zeroed
                s.grad_version = s.grad_local._version
                continue
            if p.grad is None:
                buffer = s.grad
                if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype or buffer.device != p.device:
                    buffer = torch.zeros_like(p)  # a DTensor for a DTensor parameter (FSDP2)
                p.grad = buffer
            elif p.grad is not s.grad:
                p.grad.zero_()  # a .grad set between steps: the optimizer's buffer from now on
            if p.grad.is_sparse:
                raise TypeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of shape {tuple(p.shape)})"
                )
            s.adopt(p.grad)

    def _find_written(self, action: str) -> None:
        """Mark the parameters that the backward pass just finished gave a gradient (``slot.written``).

        A pass accumulates into the zeroed buffer (its version moves) or installs a new
        .grad (DDP's bucket views, a user's assignment). .grad set to None inside a step
        after a pass wrote into the buffer has lost the gradients the optimizer keeps
        there, so it is an error; set to None while the buffer was still untouched
        (``zero_grad()`` before the backward pass, as Lightning's closure does) it means
        that the pass gave the parameter no gradient, and the buffer goes back.
        """
        for s in self._slots:
            grad = s.param.grad
            if grad is None and s.grad is not None and s.grad_local._version == s.grad_version:
                s.param.grad, s.written = s.grad, False  # an unused parameter: nothing was lost
                continue
            if grad is None:
                raise RuntimeError(
                    f"{action}(): the gradient of a parameter was set to None inside a step (zero_grad()?); "
                    "the optimizer keeps this step's gradients there. Don't zero gradients between sample() "
                    "and update(): the optimizer manages them"
                )
            if grad is not s.grad:
                s.adopt(grad)  # a new tensor: its content is this pass's gradient
                s.written = True
            else:
                s.written = s.grad_local._version != s.grad_version

    @staticmethod
    def _consumed(slots: list[_Slot]) -> None:
        """The phases zeroed these buffers: remember their versions to see the next pass's writes."""
        for s in slots:
            s.grad_version = s.grad_local._version

    def _fold(self, *, last: bool) -> None:
        """The perturbed-point gradients just computed join their sums (splits > 1), by bucket of (first, last)."""
        flags = self._flags()
        written = [s for s in self._slots if s.written]
        first = [s for s in written if not s.folded]
        later = [s for s in (self._slots if last else written) if s.folded]  # last: earlier sums go back to .grad
        if last and first:  # their only sub-batch: the buffer holds the sum already
            backends.run(self.backend, "find_nonfinite", self._grads(first), found_inf=flags)
            first = []
        for slots, is_first in ((first, True), (later, False)):
            if slots:
                if is_first:  # allocated, or kept from the last step if still of the right layout
                    self._scratch("grad_sum")
                sums = [s.grad_sum for s in slots]
                backends.run(
                    self.backend, "fold_grads", self._grads(slots), sums, found_inf=flags, first=is_first, last=last
                )
        for s in first:
            s.folded = True
        if not last:
            self._consumed(written)

    def _scratch(self, name: str) -> None:
        """Give every slot its running sum ``name`` of this step ("grad_sum", "curvature_sum"):
        allocated now and dropped when the step ends, so that between steps the optimizer holds its
        state and nothing else, or kept from the last step where ``keep_sums`` says so (the CPU).

        For the tabled backends the sums are views of one buffer per (device, state dtype), 16-byte
        aligned, whose launch tables hold offsets from its start and so stay cached wherever the
        allocator puts it; elsewhere, one tensor each (see backends.scratch_in_one_buffer).
        """
        by_buffer: dict[tuple[torch.device, torch.dtype], list[_Slot]] = {}
        for s in self._slots:
            by_buffer.setdefault((s.local.device, state_dtype(s.param)), []).append(s)
        for (device, dtype), slots in by_buffer.items():
            kept = [getattr(s, name) for s in slots]
            if all(
                t is not None and t.shape == s.local.shape and t.dtype == dtype and t.device == device
                for t, s in zip(kept, slots)
            ):
                continue  # kept from the last step (keep_sums)
            if not backends.scratch_in_one_buffer(self.backend, device):
                for s in slots:
                    setattr(s, name, torch.empty_like(s.local, dtype=dtype))
                continue
            align = max(1, 16 // dtype.itemsize)
            sizes = [-(-s.local.numel() // align) * align for s in slots]
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            for s, piece in zip(slots, flat.split(sizes)):
                setattr(s, name, piece[: s.local.numel()].view(s.local.shape))

    def _keeps_sums(self, device: torch.device) -> bool:
        # on the CPU, freed memory goes back to the system and comes back page by page: +23% of a step
        return self.keep_sums if self.keep_sums is not None else device.type == "cpu"

    # ---- the step's flags ---------------------------------------------------------------
    def _devices(self) -> list[torch.device]:
        return self._slot_devices or [torch.device("cpu")]

    def _flags(self) -> dict[torch.device, torch.Tensor]:
        """This step's found-inf flag per device (float32 0-dim tensors, as torch's GradScaler keeps them)."""
        for device in self._devices():
            if device not in self._found_inf:
                self._found_inf[device] = torch.zeros((), dtype=torch.float32, device=device)
        return self._found_inf

    def _inv_scale(self, grad_scaler) -> dict[torch.device, torch.Tensor]:
        """1/scale per device: the GradScaler's (read on the device, no host sync), or 1."""
        devices = self._devices()
        if grad_scaler is None or not grad_scaler.is_enabled():
            for device in devices:
                if device not in self._ones:
                    self._ones[device] = torch.ones((), dtype=torch.float32, device=device)
            return self._ones
        scale = grad_scaler._scale  # the device tensor behind get_scale(), which would sync
        if scale is None:
            raise RuntimeError("grad_scaler has no scale yet: call grad_scaler.scale(loss).backward() in the closure")
        # as GradScaler.unscale_ computes it: the reciprocal in float64
        inv = scale.double().reciprocal().float()
        return {device: inv.to(device) for device in devices}

    def _agree_on_skipping(self) -> None:
        """One flag for the whole step: across this process's devices, and across ranks (DDP, FSDP2)."""
        flags = list(self._flags().values())
        if len(flags) > 1:
            combined = torch.stack([f.to(flags[0].device) for f in flags]).amax()
            for f in flags:
                f.copy_(combined)
        sync_group = self._sync_group()
        if sync_group is not None:  # a rank's noisy pass (or FSDP2 shard) is its own: agree on skipping
            flag = flags[0].to(_distributed.comm_device(sync_group))
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=sync_group)
            for f in flags:
                f.copy_(flag)

    def _count(self, group: dict[str, Any]) -> None:
        """On the device: step += 1 unless skipped, skipped_steps += 1 if skipped; on the host: attempts += 1."""
        step, skipped = self._counters(group)
        flag = self._found_inf[step.device] if step.device in self._found_inf else next(iter(self._flags().values()))
        flag = flag.to(step.device)
        step.add_(1 - flag.double())
        skipped.add_(flag.long())
        group["attempts"] += 1

    def _report_skips(self, *, wait: bool = False) -> None:
        """Warn about steps skipped since the last report, once their count has reached the host.

        The count is copied to host memory after each update without waiting; it is read here
        when the copy is done (at once on the CPU; on a GPU at a later step), or, with ``wait``,
        after waiting for it (``skipped_steps``, ``state_dict()``). ``capturable=True`` copies
        nothing per step: the count is copied and read only with ``wait``.
        """
        if self._skip_report is None and wait and self.capturable:
            self._send_skip_count(warn=True, now=True)
        if self._skip_report is None:
            return
        host, event, warn = self._skip_report
        if event is not None:
            if not wait and not event.query():
                return
            event.synchronize()
        # the bytes of our own host copy: not Tensor.item(), which the no-host-sync tests forbid
        total = int.from_bytes(bytes(host.untyped_storage().tolist()), "little", signed=True)
        self._skip_report = None
        if total > self._skips_reported and warn:
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient, step skipped (skipped so far: {total})",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )
        self._skips_reported = max(self._skips_reported, total)

    def _send_skip_count(self, warn: bool, now: bool = False) -> None:
        """Start copying the total skipped count to the host (no wait); with ``capturable=True`` only
        ``now`` (a copy to the host would be part of a captured step)."""
        if self.capturable and not now:
            return
        counts = [self._counters(group)[1] for group in self.param_groups]
        total = counts[0] if len(counts) == 1 else torch.stack([c.to(counts[0].device) for c in counts]).amax()
        pinned = total.device.type == "cuda"
        host = torch.empty((), dtype=torch.int64, pin_memory=pinned)
        host.copy_(total, non_blocking=pinned)
        event = None
        if pinned:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(total.device))  # the copy's stream, whatever the current device
        self._skip_report = (host, event, warn)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far for a non-finite gradient (the largest count of any group; waits for the device)."""
        self._report_skips(wait=True)
        return max((int(self._counters(group)[1]) for group in self.param_groups), default=0)

    def _check_capture(self) -> None:
        """RuntimeError if a CUDA graph is capturing this step and its replays would be wrong."""
        cuda = [d for d in self._devices() if d.type == "cuda"]  # (CPU training: no CUDA call at all)
        if not cuda or not torch.cuda.is_current_stream_capturing():
            return
        name = type(self).__name__
        if not self.capturable:  # the graph would keep this step's seeds: every replay the same noise
            raise RuntimeError(
                f"{name} step captured in a CUDA graph, but the optimizer was built with capturable=False: each "
                "replay would reuse this step's noise seed and copy counts to the host. Pass capturable=True"
            )
        if any(backends.pick(self.backend, d) == "eager" for d in cuda):
            raise RuntimeError(
                f"{name} step captured in a CUDA graph on the 'eager' backend, which decides on the host whether "
                "a step is skipped: use backend='auto' (or 'triton', 'cuda', 'foreach')"
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
            return _distributed.process_group(self.model)
        return None

    # ---- the phase API ----------------------------------------------------------------
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
        self._expect(_REST, _PERTURBED, action="sample")
        self._check_capture()
        _distributed.reshard(self.model)  # an evaluation since the last step may have left them gathered
        if self._split == 0:
            self._report_skips()
            self._prepare_state()
            self._attach_grads()
            for flag in self._flags().values():
                flag.zero_()
        else:
            self._find_written("sample")
            self._fold(last=False)
        for index, group in enumerate(self.param_groups):
            self._sample_group(index, group, self._group_slots[index])
        if _distributed.is_ddp(self.model):
            _distributed.set_grad_sync(self.model, False)
        self._freeze_bn(self.bn_stats == "perturbed")
        self._phase = _SAMPLED

    @torch.no_grad()
    def perturb(self, *, grad_scaler: torch.amp.GradScaler | None = None, sync: bool = True) -> None:
        """Move to the adversarial point from the gradients now in ``.grad``.

        Consumes those gradients (unscaling them as they are read if ``grad_scaler`` is
        given, and zeroing the buffers for the perturbed-point pass). An inf or NaN marks
        the step as skipped, decided on the device. ``sync=False`` keeps DDP from
        all-reducing the next backward pass: correct for all but the last sub-batch,
        since the sums are all-reduced with the last one.
        """
        self._expect(_SAMPLED, action="perturb")
        self._find_written("perturb")
        self._perturb(self._inv_scale(grad_scaler))  # subclasses restore the parameters without a gradient
        written = [s for s in self._slots if s.written]
        self._consumed(written)
        for s in written:
            s.ascended = True
        if sync and _distributed.is_ddp(self.model) and any(s.folded for s in self._slots):
            # DDP all-reduces what .grad holds after the last pass: the sum so far goes back in first
            for s in self._slots:
                s.written = False
            self._fold(last=True)
            self._unfolded = True
        self._split += 1
        if _distributed.is_ddp(self.model):
            _distributed.set_grad_sync(self.model, sync)
        self._freeze_bn(self.bn_stats == "noisy")
        self._phase = _PERTURBED

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
        self._expect(_PERTURBED, action="update")
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low_open=True)
        inv_scale = self._inv_scale(grad_scaler)
        self._find_written("update")
        if self._split > 1 and not self._unfolded:
            self._fold(last=True)
        has_grad = [s for s in self._slots if s.written or s.folded]
        if has_grad and (self._split == 1 or self._unfolded):
            # .grad holds the whole sum, unread so far: the skip decision must come before the update
            backends.run(self.backend, "find_nonfinite", self._grads(has_grad), found_inf=self._flags())
        self._agree_on_skipping()
        self._reduce_across_replicas()
        if max_grad_norm is not None and has_grad:
            self._clip(has_grad, max_grad_norm * self._split, inv_scale)
        for index, (group, slots) in enumerate(zip(self.param_groups, self._group_slots)):
            updated = [s for s in slots if (s.written or s.folded) and self._has_ascent(s)]
            self._count(group)
            self._update_group(index, group, updated, inv_scale)
            self._consumed(updated)
            done = {id(s) for s in updated}
            self._restore([s for s in slots if id(s) not in done])
            self._zero([s for s in slots if (s.written or s.folded) and id(s) not in done])
        if grad_scaler is not None and grad_scaler.is_enabled():
            self._record_in(grad_scaler)
        self._send_skip_count(warn=grad_scaler is None)  # with a scaler, skipped steps are its calibration
        self._end_step()
        self._report_skips()

    def _zero(self, slots: list[_Slot]) -> None:
        """Gradients read but not used by an update (no ascent): zeroed for the next step."""
        for grad in self._grads(slots):
            grad.zero_()
        self._consumed(slots)

    def _clip(self, slots: list[_Slot], max_norm: float, inv_scale) -> None:
        """Scale the gradient sums so that their global 2-norm (unscaled) is at most max_norm; on the device."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in self._grads(slots):
            by_device.setdefault(grad.device, []).append(grad)
        squares = [
            # float32 norms: a float16 norm of scaled gradients overflows where the gradients do not
            (torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double() * inv_scale[device])
            .square()
            .sum()
            for device, grads in by_device.items()
        ]
        norm = self._global_sum(squares).sqrt()
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0).float()
        for device, grads in by_device.items():
            torch._foreach_mul_(grads, factor.to(device))

    def _global_sum(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """The float64 sum of 0-dim partial sums, on the first one's device; under FSDP2 over every rank's
        shards too (DDP replicas hold whole, already averaged gradients)."""
        device = partials[0].device
        total = torch.stack([p.to(device=device, dtype=torch.float64) for p in partials]).sum()
        if _distributed.is_fsdp2(self.model) and self._sync_group() is not None:
            total = total.to(_distributed.comm_device(self._sync_group()))
            torch.distributed.all_reduce(total, group=self._sync_group())
            total = total.to(device)
        return total

    def _record_in(self, grad_scaler) -> None:
        """Hand the step's flag to the scaler as its own unscale_ would, so that update() backs off on it."""
        state = grad_scaler._per_optimizer_states[id(self)]
        state["found_inf_per_device"] = {device: flag.clone() for device, flag in self._flags().items()}
        state["stage"] = torch.amp.grad_scaler.OptState.STEPPED

    def _reduce_across_replicas(self) -> None:
        """Average per-replica statistics other than the gradients (DDP averages those)."""

    def _has_ascent(self, slot: _Slot) -> bool:
        return True

    def _end_step(self) -> None:
        self._split, self._phase = 0, _REST
        self._unfolded = False
        for s in self._slots:
            s.written = s.ascended = s.folded = False
            if not self._keeps_sums(s.local.device):  # between steps the optimizer holds its state only
                s.grad_sum = s.curvature_sum = None
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
        _distributed.reshard(self.model)  # a forward pass may have run without its backward pass
        self._restore(self._slots)
        for s in self._slots:
            if s.grad is not None:
                s.grad_local.zero_()
                s.grad_version = s.grad_local._version
            s.param.grad = None
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
        if len(losses) == 1:
            return torch.as_tensor(losses[0]).detach()
        return torch.stack([torch.as_tensor(loss).detach() for loss in losses]).mean()

    # ---- checkpoints ------------------------------------------------------------------
    def _state_keys(self) -> set[str]:
        """The state keys of each parameter (overridden)."""
        return {self._rest_key}

    def _state_dtype(self, key: str, param: torch.Tensor) -> torch.dtype:
        """The dtype state ``key`` of ``param`` is kept in (overridden where some keys are kept lower)."""
        return state_dtype(param)

    def _check_state_dict(self, state_dict: Any) -> dict:
        """ValueError naming the first way ``state_dict`` does not fit this optimizer; else {saved id: param}."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError("state_dict: expected a dict with 'state' and 'param_groups', as state_dict() returns")  # noqa: TRY004
        saved_groups, state = state_dict["param_groups"], state_dict.get("state")
        if not isinstance(state, dict):
            raise ValueError("state_dict['state']: expected a dict {parameter id: state}")  # noqa: TRY004
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        by_id = {}
        required = self._hyperparameters
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(group["params"]):
                count = len(saved.get("params", ())) if isinstance(saved, dict) else "no"
                raise ValueError(
                    f"group {index} of state_dict has {count} parameters, this optimizer's has {len(group['params'])}"
                )
            missing = [k for k in required if k not in saved]
            if missing:
                raise ValueError(
                    f"group {index} of state_dict lacks {missing}: not a {type(self).__name__} state dict "
                    f"(it has {sorted(k for k in saved if k != 'params')})"
                )
            try:
                self._check_group({**{k: saved[k] for k in required}, "params": group["params"]})
            except (ValueError, TypeError) as exc:
                raise ValueError(f"group {index} of state_dict: {exc}") from None
            by_id.update(zip(saved["params"], group["params"]))
        expected = self._state_keys()
        for pid, saved in state.items():
            p = by_id.get(pid)
            if p is None:
                raise ValueError(f"state_dict has state for parameter {pid!r}, which none of its groups lists")
            if not isinstance(saved, dict) or set(saved) != expected:
                keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
                raise ValueError(
                    f"state of parameter {pid} has {keys}, a {type(self).__name__} keeps {sorted(expected)}: "
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
                        f"the parameter has shape {whole}"
                        + (f" (this rank's shard: {shard})" if shard != whole else "")
                    )
        return by_id

    def state_dict(self) -> dict[str, Any]:
        """The state of every trainable parameter and the groups' hyperparameters and counters.

        Under FSDP2 each state tensor is a DTensor laid out as its parameter (sharing this
        rank's shard, as ``torch.optim``'s state is), so ``torch.distributed.checkpoint``
        saves it and loads it into any other sharding or into an unsharded model.
        """
        if self._phase != _REST:
            raise RuntimeError(f"state_dict() called in the middle of a step (optimizer is {self._phase})")
        if not self._posterior_seeds:  # (inside sampled_params() the model holds a sample, not the weights)
            with torch.no_grad():  # state for parameters trainable since; weights set since the last step
                self._prepare_state()
        self._report_skips(wait=True)
        state = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]  # torch's numbering of the ids
        for pid, saved in list(state["state"].items()):
            if hasattr(params[pid], "device_mesh"):  # a new dict: super() hands out the live one
                state["state"][pid] = {
                    key: _distributed.laid_out_as(value, params[pid]) for key, value in saved.items()
                }
        for group, saved in zip(self.param_groups, state["param_groups"]):
            step, skipped = self._counters(group)
            # plain numbers in the checkpoint; attempts too (= step + skipped_steps, recomputed on load),
            # since DCP's flattened state dicts expect every key of the live groups
            saved["step"], saved["skipped_steps"] = int(step), int(skipped)
            saved["attempts"] = int(step) + int(skipped)
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
        by_id = self._check_state_dict(state_dict)
        state_dict = {
            **state_dict,
            "state": {
                pid: {key: _distributed.local_part(value, by_id[pid]) for key, value in saved.items()}
                for pid, saved in state_dict["state"].items()
            },
        }
        if self._phase != _REST:  # a step in progress (say, it crashed halfway): abandoned first
            self.abort()
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["step"], group["skipped_steps"] = int(group["step"]), int(group["skipped_steps"])
            group["attempts"] = group["step"] + group["skipped_steps"]
        for pid, saved in state_dict["state"].items():
            p = by_id.get(pid)
            if p is None:
                continue
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=self._state_dtype(key, p), copy=True)
        # between steps the model holds the state it was saved with
        self._refresh_slots(rebuild=True)  # the state dicts were replaced
        with torch.no_grad():
            self._restore([s for s in self._slots if s.state])
        self._phase, self._split = _REST, 0
        self._unfolded = False
        self._skips_reported = sum(int(group["skipped_steps"]) for group in self.param_groups)
        self._record_versions()
