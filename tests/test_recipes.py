"""docs/architecture.md's recipes, followed: a backend added in a few lines trains as the one it delegates to,
an optimizer built from the hooks alone trains as torch.optim does, and no optimizer reads a private field
of the base class. (The recipe for a phase is held by tests/test_phases.py: each of its steps is checked
for every phase of the registry.)"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import sambayes
from sambayes import backends, phases
from sambayes._ledger import grads, params, states
from sambayes._posterior import GaussianPosterior
from sambayes.backends import eager
from sambayes.optimizer import TwoPassOptimizer


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _train(model, opt, steps=3, splits=2):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    chunks = sambayes.split_batch(x, y, splits=splits)
    for _ in range(steps):

        def closure(j=0):
            loss = F.cross_entropy(model(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

        opt.step(closure, splits=splits)


# ---- a backend ------------------------------------------------------------------------------------------
def test_a_backend_registered_as_the_recipe_says_trains_as_the_one_it_delegates_to(monkeypatch):
    calls = []

    def delegating(phase):
        def function(*args, **kwargs):
            calls.append(phase.name)
            return getattr(eager, phase.name)(*args, **kwargs)

        function.__signature__ = inspect.signature(getattr(eager, phase.name))
        return function

    toy = types.ModuleType("toy_backend")
    for phase in phases.PHASES:  # step 1: every phase function of eager.py, same arguments
        setattr(toy, phase.name, delegating(phase))
    original_import = backends._import
    # step 2: registered in NAMES and _import (no device rules: it runs anywhere; not in AUTO_ORDER)
    monkeypatch.setattr(backends, "NAMES", (*backends.NAMES, "toy"))
    monkeypatch.setattr(backends, "BACKENDS", (*backends.BACKENDS, "toy"))
    monkeypatch.setattr(backends, "_import", lambda name: toy if name == "toy" else original_import(name))
    backends._module.cache_clear()
    backends._pick.cache_clear()
    try:
        assert backends.why_unavailable("toy", "cpu") is None
        model, reference = _mlp(), _mlp()
        _train(model, sambayes.BSAM(model, num_data=100, seed=3, backend="toy"))
        _train(reference, sambayes.BSAM(reference, num_data=100, seed=3, backend="eager"))
    finally:
        backends._module.cache_clear()
        backends._pick.cache_clear()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert {"bsam_sample", "bsam_perturb", "fold_grads", "bsam_update"} <= set(calls)


# ---- an optimizer -----------------------------------------------------------------------------------------
class TwoPassSGD(TwoPassOptimizer):
    """SGD through the two passes: no ascent (SAM's perturbation with scale 0), SGD's update on the
    gradient at the weights. Built as docs/architecture.md says: its own hooks and the registry's phases."""

    rest_key = "weight"

    def __init__(self, params, *, lr: float) -> None:
        super().__init__(params, dict(lr=lr), backend="auto", model=None, bn_stats="noisy")

    def _check_group(self, group):
        sambayes._arguments.check_number("lr", group["lr"])

    def _state_keys(self):
        return {"weight", "momentum"}

    def _init_state(self, p, state, group):
        state["weight"] = p.detach().to(torch.float32, copy=True)
        state["momentum"] = torch.zeros_like(state["weight"])

    def _sample_group(self, step, index, group, slots):
        if step.split > 0:  # back from the previous sub-batch's (unmoved) perturbed point
            self._restore(slots)

    def _perturb(self, step, groups):
        for group, slots in groups:
            self._restore([s for s in slots if s not in step.written])
            written = step.written_in(slots)
            if written:  # θ = w + 0·g: the gradients consumed, the point unmoved
                scale = torch.zeros((), dtype=torch.float64)
                self._run(
                    phases.SAM_PERTURB,
                    params(written),
                    grads(written),
                    states(written, "weight"),
                    inv_scale=step.inv_scale,
                    scale=scale,
                    adaptive=False,
                )

    def _update_group(self, step, index, group, slots):
        if slots:
            self._run(
                phases.SAM_UPDATE_SGD,
                params(slots),
                grads(slots),
                states(slots, "weight"),
                states(slots, "momentum"),
                found_inf=step.found_inf,
                inv_scale=step.inv_scale,
                lr=group["lr"],
                momentum=0.0,
                weight_decay=0.0,
                nesterov=False,
                splits=step.split,
            )


def test_an_optimizer_built_from_the_hooks_trains_as_torch_sgd():
    model, reference = _mlp(), _mlp()
    _train(model, TwoPassSGD(model.parameters(), lr=0.1), splits=1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    for _ in range(3):
        sgd.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    state = TwoPassSGD(_mlp().parameters(), lr=0.1).state_dict()  # checkpoints come from the base
    assert {"step", "skipped_steps", "lr"} <= set(state["param_groups"][0])


class OnePassSGD(TwoPassSGD):
    """SGD as a one-pass optimizer (``passes = 1``, as IVON): each sample's gradient feeds the update, whose
    gradient is the mean over the samples (here all at the weights: plain SGD)."""

    passes = 1

    def _perturb(self, step, groups):  # pragma: no cover - a one-pass optimizer has no perturb()
        raise AssertionError("not called")


def test_a_one_pass_optimizer_averages_its_samples_and_has_no_perturb():
    x, y = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3
    model, reference = _mlp(), _mlp()
    opt = OnePassSGD(model.parameters(), lr=0.1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):

        def closure(j=0):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure, splits=3)  # three samples of the same batch, one gradient each
        sgd.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    opt.sample()
    with pytest.raises(RuntimeError, match="one gradient per sample"):
        opt.perturb()
    with pytest.raises(RuntimeError, match=r"sample\(\) -> backward \[repeat per sample\] -> update\(\)"):
        opt.step(closure)
    opt.abort()


def _private_fields_of_the_base() -> set[str]:
    """The private attributes TwoPassOptimizer gives itself (its units, the step in progress)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(TwoPassOptimizer)))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and node.attr.startswith("_")
    }


@pytest.mark.parametrize(
    "optimizer",
    [sambayes.BSAM, sambayes.SAM, sambayes.IVON, GaussianPosterior, TwoPassSGD, OnePassSGD],
    ids=lambda c: c.__name__,
)
def test_optimizers_read_no_private_field_of_the_base_class(optimizer):
    private = _private_fields_of_the_base()
    assert {"_ledger", "_step", "_replication"} <= private  # the check sees the fields it guards
    tree = ast.parse(textwrap.dedent(inspect.getsource(optimizer)))
    read = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
    }
    assert not read & private, f"{optimizer.__name__} reads {sorted(read & private)} of TwoPassOptimizer"
