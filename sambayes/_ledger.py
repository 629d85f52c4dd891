"""The parameter ledger: one slot per trainable parameter, its lazily created state, its gradient
buffer, and the version counters that tell the optimizer who wrote what (docs/architecture.md)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import _distributed
from .phases import master_dtype


class Slot:
    """One trainable parameter as the optimizer keeps it between phases and steps."""

    __slots__ = (
        "__weakref__",
        "given",
        "grad",
        "grad_local",
        "grad_version",
        "group",
        "hook_id",
        "hooked",
        "local",
        "offset",
        "param",
        "sharded",
        "state",
        "version",
    )

    def __init__(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        self.param, self.group, self.offset, self.state = param, group, 0, {}
        self.sharded = hasattr(param, "to_local")  # a DTensor (FSDP2): the backends get its local shard
        self.local = _distributed.local(param)
        self.version = None  # (version, storage) of the parameter when we last wrote it
        self.grad = self.grad_local = None  # the gradient buffer (.grad) and its local tensor
        self.grad_version = -1  # the buffer's version when a phase last left it zeroed
        self.given = False  # autograd accumulated a gradient into .grad since the ledger last looked
        _watch(self)

    def version_now(self) -> tuple[int, int]:
        # in-place writes bump _version; `p.data = new` swaps the storage
        return self.param._version, self.local.data_ptr()

    def adopt(self, grad: torch.Tensor) -> None:
        """Take ``grad`` as this parameter's gradient buffer, as it stands."""
        self.grad, self.grad_local = grad, _distributed.local(grad)
        self.grad_version = self.grad_local._version

    def changed_since_zeroed(self) -> bool:
        """Whether the buffer was written since a phase (or the ledger) last left it zero."""
        return self.given or self.grad_local._version != self.grad_version

    def zero(self) -> None:
        """Zero the buffer (a rare path: what was written there is not a gradient of this step)."""
        self.grad_local.zero_()
        self.grad_version, self.given = self.grad_local._version, False


def _watch(slot: Slot) -> None:
    """Mark ``slot.given`` whenever autograd accumulates into its parameter's .grad (a backward pass, DDP's
    all-reduce, FSDP2's reduce-scatter): torch.optim's "given a gradient", told apart from in-place changes of
    the buffer (clipping, ``zero_grad(set_to_none=False)``). The hook holds the slot weakly and goes with it."""
    ref = weakref.ref(slot)

    def accumulated(param: torch.Tensor) -> None:
        s = ref()
        if s is not None:
            s.given = True

    handle = slot.param.register_post_accumulate_grad_hook(accumulated)
    weakref.finalize(slot, handle.remove)
    slot.hook_id, slot.hooked = handle.id, slot.param._cdata  # the tensor whose autograd metadata holds it


def _rewatch(slot: Slot) -> None:
    """The slot's hook back on its parameter after a swap: the parameter object kept the hooks' dict, but the
    tensor it now holds does not call it until the dict is assigned to it again (torch registers it then)."""
    hooks = getattr(slot.param, "_post_accumulate_grad_hooks", None)
    if hooks is not None and slot.hook_id in hooks:
        slot.param._post_accumulate_grad_hooks = hooks
        slot.hooked = slot.param._cdata
    else:
        _watch(slot)


def _watched(slot: Slot) -> bool:
    """Whether the slot's hook is still on its parameter: ``torch.utils.swap_tensors`` (``module.to_empty()``,
    ``load_state_dict(assign=True)`` with swapping on) gives the parameter object another tensor, and the hook
    stays with the old one."""
    return slot.param._cdata == slot.hooked


# ---- what the backends get, as parallel lists ------------------------------------------------------
def params(slots: list[Slot]) -> list[torch.Tensor]:
    """What the backends write: the parameters themselves, or this rank's shards (FSDP2)."""
    return [s.local for s in slots]


def grads(slots: list[Slot]) -> list[torch.Tensor]:
    """The gradient buffers the backends read and write (this rank's shards under FSDP2)."""
    return [s.grad_local for s in slots]


def states(slots: list[Slot], key: str) -> list[torch.Tensor]:
    """State ``key`` of each slot (``mean``, ``precision``, ...)."""
    return [s.state[key] for s in slots]


def offsets(slots: list[Slot]) -> list[int]:
    """Each tensor's first element index in its group's flat concatenation (the noise's element index)."""
    return [s.offset for s in slots]


def trainable(group: dict[str, Any]) -> list[torch.Tensor]:
    """The parameters of a group that the optimizer trains: those that require a gradient."""
    return [p for p in group["params"] if p.requires_grad]


class Ledger:
    """The slots of an optimizer's trainable parameters, in group order, and what they hold.

    Gradients: each slot's buffer is attached as ``.grad`` whenever ``.grad`` is None and kept at
    the same address across passes and steps. A backward pass accumulates into it while it is zero;
    the phase that consumes it zeroes it again, and :meth:`grads_zeroed` records the buffer's
    version then, so that :meth:`find_written` sees from the version whether the next pass gave
    the parameter a gradient.
    """

    def __init__(self) -> None:
        self.slots: list[Slot] = []  # one per trainable parameter, in group order
        self.group_slots: list[list[Slot]] = []  # the same, per parameter group
        self.devices: list[torch.device] = []  # their devices, in first-seen order
        self.frozen: list[torch.Tensor] = []  # the groups' parameters that do not require a gradient

    # ---- slots and state ---------------------------------------------------------------------
    def refresh(self, param_groups: list[dict[str, Any]], state: dict, rebuild: bool = False) -> None:
        """One slot per trainable parameter, in group order: rebuilt when the trainable parameters
        change (or ``rebuild``: the state dicts were replaced), keeping each parameter's buffers."""
        groups = [trainable(group) for group in param_groups]
        self.frozen = [p for group in param_groups for p in group["params"] if not p.requires_grad]
        current = [p for params in groups for p in params]
        same = len(current) == len(self.slots) and all(s.param is p for s, p in zip(self.slots, current))
        if same and not rebuild:
            for s in self.slots:
                if s.sharded:  # a DTensor's local view is looked up again each step
                    s.local = _distributed.local(s.param)
            return
        old = {id(s.param): s for s in self.slots}
        self.group_slots = []
        for group, params in zip(param_groups, groups):
            offsets, start = {}, 0
            for p in group["params"]:  # element index: position in the group's flat concatenation
                offsets[id(p)] = start + _distributed.global_offset(p)  # a shard draws what the whole tensor would
                start += p.numel()
            slots = []
            for p in params:
                slot = old.get(id(p)) or Slot(p, group)
                slot.group, slot.offset, slot.local = group, offsets[id(p)], _distributed.local(p)
                slot.state = state[p]
                slots.append(slot)
            self.group_slots.append(slots)
        self.slots = [s for slots in self.group_slots for s in slots]
        self.devices = list(dict.fromkeys(s.param.device for s in self.slots))

    def prepare_state(
        self,
        param_groups: list[dict[str, Any]],
        state: dict,
        init_state: Callable[[torch.Tensor, dict, dict], None],
        stored_dtype: Callable[[str, torch.Tensor], torch.dtype],
        rest_key: str,
    ) -> None:
        """Create state lazily (``init_state``); follow parameters that were moved or overwritten since
        we last wrote them (state ``rest_key`` is what the parameters hold at rest). Under inference mode too
        (``predict()``, ``state_dict()`` in a validation loop), the state made is made as ordinary tensors,
        which the steps outside it can update."""
        with torch.inference_mode(False):
            self._prepare_state(param_groups, state, init_state, stored_dtype, rest_key)

    def _prepare_state(self, param_groups, state, init_state, stored_dtype, rest_key) -> None:
        self.refresh(param_groups, state)
        moved: dict[int, tuple] = {}  # (source, copy): a tensor several parameters share stays shared (SAM's counts)
        for s in self.slots:
            p, slot_state = s.param, s.state
            if not slot_state:
                if p.is_meta:  # no values yet (deferred initialization): its state comes at the first step
                    continue
                init_state(p, slot_state, s.group)
                s.version = s.version_now()
                if p.device not in self.devices:  # materialized since (deferred initialization)
                    self.devices = list(dict.fromkeys(s.param.device for s in self.slots))
                continue
            rest = slot_state[rest_key]
            if rest.device != p.device or rest.dtype != master_dtype(p.dtype):  # module.to(...) moved or cast them
                for key, value in slot_state.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        if id(value) not in moved:  # (the source kept alive: its id is not reused meanwhile)
                            moved[id(value)] = (value, value.to(p.device, stored_dtype(key, p)))
                        slot_state[key] = moved[id(value)][1]
                rest = slot_state[rest_key]
                self.devices = list(dict.fromkeys(s.param.device for s in self.slots))
            if s.version != s.version_now():
                # the user changed the weights (e.g. model.load_state_dict): they win,
                # unless they are just the rounding of our higher-precision copy
                weights = s.local.detach()
                if not torch.equal(weights, rest.to(p.dtype)):
                    rest.copy_(weights)
                s.version = s.version_now()

    def record_versions(self) -> None:
        """The parameters hold what we wrote: remember their versions to see later writes by others."""
        for s in self.slots:
            s.version = s.version_now()

    # ---- gradient buffers ------------------------------------------------------------------------
    def attach_grads(self, optimizer_name: str) -> None:
        """Give every trainable parameter its zeroed gradient buffer as .grad, at the start of a step.

        A step starts from zero gradients, as after torch's ``zero_grad()``: what a backward pass
        outside the step left in a buffer (a diagnostic backward, then ``zero_grad()`` or not) is
        discarded, and a tensor assigned to .grad between steps becomes the buffer, zeroed. A frozen
        parameter's .grad becomes None, as ``zero_grad()`` leaves it (what a backward pass left there before
        it was frozen would otherwise reach a clipping norm taken in the closure).
        """
        for p in self.frozen:
            p.grad = None
        for s in self.slots:
            p = s.param
            if not _watched(s):
                _rewatch(s)
            if p.grad is s.grad and s.grad is not None:  # steady state: our buffer, zeroed by the phases
                if s.changed_since_zeroed():
                    s.zero()
                continue
            if p.grad is None:
                buffer = s.grad
                if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype or buffer.device != p.device:
                    with torch.inference_mode(False):
                        buffer = torch.zeros_like(p)  # a DTensor for a DTensor parameter (FSDP2)
                elif s.changed_since_zeroed():
                    s.zero()  # written after the last step, then zero_grad(): not this step's
                p.grad = buffer
            elif p.grad is not s.grad:
                p.grad.zero_()  # a .grad set between steps: the optimizer's buffer from now on
            if p.grad.is_sparse:
                raise TypeError(
                    f"{optimizer_name} does not support sparse gradients (parameter of shape {tuple(p.shape)})"
                )
            s.adopt(p.grad)
            s.given = False

    def find_written(self, action: str) -> list[Slot]:
        """The slots that the backward pass just finished gave a gradient, as torch.optim counts them: autograd
        accumulated into .grad (``Slot.given``), or a new tensor is there (installed by autograd after
        ``zero_grad()``, by DDP as its bucket view, or by the user).

        In-place changes alone (clipping, ``zero_grad(set_to_none=False)``) give no gradient: the buffer of a
        parameter the pass did not reach stays zero and the parameter is not updated, as torch.optim leaves a
        parameter whose .grad is None. .grad set to None inside a step after the pass gave a gradient loses
        what the optimizer keeps there, so it is an error; set to None otherwise (``zero_grad()`` before the
        backward pass, as Lightning's closure does) the buffer goes back.
        """
        written = []
        for s in self.slots:
            grad = s.param.grad
            if grad is None:
                if s.given:
                    raise RuntimeError(
                        f"{action}(): the gradient of a parameter was set to None inside a step (zero_grad()?); "
                        "the optimizer keeps this step's gradients there. Don't zero gradients between sample() "
                        "and update(): the optimizer manages them"
                    )
                if s.grad is not None:  # an unused parameter: nothing was lost
                    if s.changed_since_zeroed():
                        s.zero()
                    s.param.grad = s.grad
                continue
            if grad is not s.grad:
                s.adopt(grad)  # a new tensor: its content is this pass's gradient
                written.append(s)
            elif s.given:
                written.append(s)
            elif s.grad_local._version != s.grad_version:
                s.zero()  # changed in place, but no gradient: discarded, as if .grad had been None
            s.given = False
        return written

    @staticmethod
    def grads_zeroed(slots: list[Slot]) -> None:
        """The phases zeroed these buffers: remember their versions to see the next pass's writes."""
        for s in slots:
            s.grad_version = s.grad_local._version

    def drop_grads(self) -> None:
        """Zero every buffer and detach it from its parameter (a step abandoned: .grad None, as after
        torch's ``zero_grad()``), keeping the buffer for the next step."""
        for s in self.slots:
            if s.grad is not None:
                s.zero()
            s.param.grad = None
