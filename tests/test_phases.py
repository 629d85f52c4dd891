"""The phase registry (sambayes.phases) against everything that implements or describes a phase: the
eager spec, every backend's functions, the C++ op schemas, the Triton compile check, and the version
counters the dispatch moves for what a phase writes."""

import inspect

import pytest
import torch
from conftest import AVAILABLE_BACKENDS, DEVICE

from sambayes import backends, phases
from sambayes.backends import eager

NAMES = [phase.name for phase in phases.PHASES]


def _parameters(function) -> tuple[list[str], list[str]]:
    """(positional, keyword-only) parameter names of a backend function."""
    signature = inspect.signature(function)
    kinds = inspect.Parameter
    positional = [p.name for p in signature.parameters.values() if p.kind is kinds.POSITIONAL_OR_KEYWORD]
    keyword = [p.name for p in signature.parameters.values() if p.kind is kinds.KEYWORD_ONLY]
    return positional, keyword


def test_phase_names_are_unique_and_every_kind_is_known():
    assert len(set(NAMES)) == len(NAMES)
    for phase in phases.PHASES:
        assert {role.kind for role in phase.roles} <= set("PSRXI"), phase.name
        assert len(set(phase.arguments)) == len(phase.arguments), phase.name


@pytest.mark.parametrize("phase", phases.PHASES, ids=NAMES)
def test_the_eager_spec_takes_the_declared_arguments(phase):
    positional, keyword = _parameters(getattr(eager, phase.name))
    assert positional == [role.name for role in phase.roles] + list(phase.device_scalars)
    assert keyword == list(phase.scalars)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_every_backend_has_every_phase_with_the_eager_signature(backend):
    table = backends.implementations(backends.resolve(backend, DEVICE))
    assert list(table) == list(phases.PHASES)
    for phase, function in table.items():
        assert _parameters(function) == _parameters(getattr(eager, phase.name)), f"{backend}.{phase.name}"


def test_the_extension_op_schemas_match_the_declarations():
    """csrc/bindings.cpp: each phase's op takes the roles and device scalars in order, with the declared
    writes (the (a!) annotations torch.compile relies on), then the scalars (and optional tensor forms)."""
    if backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip(backends.why_unavailable("cpu", "cpu"))
    ops = torch.ops.sambayes_C
    for phase in phases.PHASES:
        arguments = getattr(ops, phase.name).default._schema.arguments
        names = [a.name for a in arguments]
        lists = [role.name for role in phase.roles] + list(phase.device_scalars)
        assert names[: len(lists)] == lists, phase.name
        assert names[len(lists) : len(lists) + len(phase.scalars)] == list(phase.scalars), phase.name
        assert all(name.endswith("_tensor") for name in names[len(lists) + len(phase.scalars) :]), phase.name
        written = {a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write}
        declared = {role.name for role in phase.roles if role.written}
        declared |= {"found_inf"} if phase.checks_grads else set()
        assert written == declared, phase.name


def test_the_compile_check_covers_every_phase():
    pytest.importorskip("triton")
    from sambayes.kernels import _compile_check

    assert list(_compile_check.KERNELS) == NAMES


def test_every_phase_test_runs_in_the_sanitizer_step():
    """CI's sanitizer step (.ci/run) names its test files: each phase's tests/test_<phase>.py is one of them."""
    import pathlib

    step = (pathlib.Path(__file__).parents[1] / ".ci" / "run").read_text()
    missing = [name for name in NAMES if f"tests/test_{name}.py" not in step]
    assert not missing, f"add to the sanitizer step of .ci/run: {missing}"


# ---- inputs for any phase, from its declaration alone ----------------------------------------------------
SCALARS = {
    "num_data": 50.0,
    "seed": 7,
    "rho": 0.05,
    "accumulate": True,
    "lr": 0.1,
    "beta1": 0.9,
    "beta2": 0.999,
    "weight_decay": 1e-3,
    "damping": 0.1,
    "splits": 2,
    "first": False,
    "last": False,
    "adaptive": True,
    "momentum": 0.9,
    "nesterov": True,
    "eps": 1e-8,
    "ess": 50.0,
    "clip_radius": 0.1,
    "debias": True,
    "price": True,
    "summed": True,
    "noise_seed": 9,
}


def _inputs(phase, sizes=(3, 1025)):
    """Valid arguments of ``phase`` on float32 parameters: (lists, scalars)."""
    lists = []
    for role in phase.roles:
        if role.kind == "I":
            lists.append([sum(sizes[:i]) for i in range(len(sizes))])
        else:  # precisions and sums of |·| must be positive; any value will do for the rest
            lists.append([torch.rand(n, device=DEVICE) + 0.5 for n in sizes])
    device_scalars = {
        "found_inf": torch.zeros((), device=DEVICE),
        "inv_scale": torch.ones((), device=DEVICE),
        "step": torch.ones((), dtype=torch.float64, device=DEVICE),
    }
    scalars = {name: device_scalars[name] for name in phase.device_scalars}
    scalars.update({name: SCALARS.get(name) for name in phase.scalars})
    if "scale" in phase.scalars:
        scalars["scale"] = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    return lists, scalars


@pytest.mark.parametrize("phase", phases.PHASES, ids=NAMES)
@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_the_dispatch_moves_the_versions_of_what_a_phase_writes_and_only_those(backend, phase):
    """The fused kernels write memory autograd does not see: the dispatch moves the version counters of
    the declared writes (autograd's check for stale saved tensors, the optimizers' for weights changed
    behind their back). Roles a phase only reads keep their versions."""
    lists, scalars = _inputs(phase)
    before = [[t._version for t in role] if isinstance(role[0], torch.Tensor) else None for role in lists]
    backends.run(backend, phase, *lists, **scalars)
    for role, tensors, versions in zip(phase.roles, lists, before):
        if versions is None:
            continue
        moved = [t._version > v for t, v in zip(tensors, versions)]
        assert all(moved) if role.written else not any(moved), f"{phase.name}: {role.name} {moved}"
