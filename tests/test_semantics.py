"""torch.optim's behaviour as the contract in real training loops (issue: eight defects found by trying it as a
user would): autocast around the step, backward passes between steps, inference mode, in-place changes of
.grad, tied weights, closure return values, deferred (meta) initialization, and the smaller ones. Where
torch.optim is the reference, the tests compare with it directly: SAM with rho = 0 is SGD (or AdamW) through
two gradient passes."""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sambayes

CPU_BACKENDS = [b for b in AVAILABLE_BACKENDS if b in ("eager", "foreach", "cpu", "triton")]
KINDS = ["bsam", "sam-sgd", "sam-adamw"]


def _model(unused: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)]
    model = torch.nn.Sequential(*layers)
    if unused:
        model.head = torch.nn.Linear(3, 2)  # never in the forward pass: no gradient, ever
    return model


def _forward(model, x):
    return model[2](model[1](model[0](x)))


def _data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _make(kind, model, backend, rho=None, **kwargs):
    if kind == "bsam":
        return sambayes.BSAM(model, num_data=100, seed=3, backend=backend, weight_decay=1e-2, **kwargs)
    base = kind.split("-")[1]
    extra = dict(momentum=0.9) if base == "sgd" else {}
    return sambayes.SAM(
        model,
        lr=0.05,
        base=base,
        rho=0.05 if rho is None else rho,
        weight_decay=1e-2,
        backend=backend,
        **extra,
        **kwargs,
    )


def _reference(kind, params):
    """torch.optim's optimizer that SAM (rho = 0) with these hyperparameters is."""
    if kind == "sam-sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=1e-2)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _closure(model, x, y, *, before=None, after=None, returns=None):
    def closure():
        if before:
            before()
        loss = F.cross_entropy(_forward(model, x), y)
        loss.backward()
        if after:
            after()
        return loss if returns is None else returns(loss)

    return closure


# ---- 1. autocast around the step ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_around_the_step_trains_as_autocast_inside_the_closure(backend, kind):
    """autocast caches the cast of each weight while its region is open: without the cache cleared when the
    optimizer moves the weights, the second pass would run on the first pass's weights (SAM = SGD)."""
    x, y = _data()
    finals = []
    for around in (True, False):
        model = _model()
        opt = _make(kind, model, backend)

        def closure(model=model, around=around):
            inside = contextlib.nullcontext() if around else torch.autocast("cpu", dtype=torch.bfloat16)
            with inside:
                loss = F.cross_entropy(_forward(model, x).float(), y)
            loss.backward()
            return loss

        for _ in range(3):
            if around:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step(closure)
            else:
                opt.step(closure)
        finals.append(_flat(model))
    assert torch.equal(finals[0], finals[1])
    if kind != "bsam":  # and the ascent did something: rho = 0 trains otherwise
        model = _model()
        opt = _make(kind, model, backend, rho=0.0)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                opt.step(_closure(model, x, y))
        assert not torch.equal(_flat(model), finals[0])


def test_autocast_around_an_evaluation_with_posterior_samples():
    """predict() under autocast: each posterior sample is evaluated, not the cast of the first one."""
    x, y = _data()
    model = _model()
    opt = _make("bsam", model, "eager")
    opt.step(_closure(model, x, y))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = []
        for seed in (1, 2):
            with opt.sampled_params(seed=seed):
                outputs.append(_forward(model, x))
        at_mean = _forward(model, x)
    assert not torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[1], at_mean)


# ---- 2. a backward pass between steps ------------------------------------------------------------------------
@pytest.mark.parametrize("zero_grad", ["none", "zeros", "no zero_grad"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_backward_pass_between_steps_does_not_leak_into_the_next(backend, kind, zero_grad):
    x, y = _data()
    finals = []
    for diagnose in (True, False):
        model = _model()
        opt = _make(kind, model, backend)
        for _ in range(3):
            opt.step(_closure(model, x, y))
            if diagnose:  # a diagnostic backward (gradient norms for a log), then zero_grad() or not
                (F.cross_entropy(_forward(model, x), y) * 1000).backward()
                norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
                assert norm > 0  # .grad holds the diagnostic gradients until the next step
                if zero_grad != "no zero_grad":
                    opt.zero_grad(set_to_none=zero_grad == "none")
        finals.append(_flat(model))
    assert torch.equal(finals[0], finals[1])


@pytest.mark.parametrize("kind", ["sam-sgd", "sam-adamw"])
def test_diagnostic_backwards_and_zero_grad_follow_torch_optim(kind):
    x, y = _data()
    model, reference = _model(), _model()
    opt, torch_opt = _make(kind, model, "eager", rho=0.0), _reference(kind, reference.parameters())
    for _ in range(3):
        opt.step(_closure(model, x, y))
        torch_opt.zero_grad()
        _closure(reference, x, y)()
        torch_opt.step()
        for m, o in ((model, opt), (reference, torch_opt)):  # a diagnostic backward, then zero_grad()
            F.cross_entropy(_forward(m, x), y).backward()
            o.zero_grad()
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-5, atol=1e-6)


# ---- 3. inference mode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reading_the_optimizer_under_inference_mode_does_not_break_training(backend, kind):
    x, y = _data()
    model = _model()
    opt = _make(kind, model, backend)
    with torch.inference_mode():  # a validation loop or a checkpoint callback before the first step
        saved = opt.state_dict()
        assert opt.skipped_steps == 0
    opt.step(_closure(model, x, y))
    opt.load_state_dict(saved)
    with torch.inference_mode():  # ... and after a load
        opt.state_dict()
        assert opt.skipped_steps == 0
    for _ in range(2):
        opt.step(_closure(model, x, y))
    assert int(opt.state_dict()["param_groups"][0]["step"]) == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_created_or_cast_under_inference_mode_trains(backend):
    x, y = _data()
    model = _model()
    model[0].requires_grad_(False)
    opt = _make("bsam", model, backend)
    opt.step(_closure(model, x, y))
    model[0].requires_grad_(True)  # unfrozen: its state is created by the next thing that needs it
    with torch.inference_mode():
        sambayes.predict(model, opt, x, samples=2)
    opt.step(_closure(model, x, y))
    model.double()  # state cast by the next thing that needs it
    with torch.inference_mode():
        opt.state_dict()
    opt.step(_closure(model, x.double(), y))
    assert all(v.dtype == torch.float64 for v in opt.state[model[0].weight].values())


# ---- 4. in-place changes of .grad inside the closure ------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    ["clip_grad_norm_", "zero_grad(set_to_none=False)"],
)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_in_place_changes_of_grad_give_no_gradient_to_an_unused_parameter(backend, kind, change):
    """torch.optim leaves a parameter alone whose .grad is None: in-place ops skip it. Here the parameter
    keeps a zeroed buffer as .grad, and in-place changes of it are not gradients."""
    x, y = _data()
    model = _model(unused=True)
    head = [p.detach().clone() for p in model.head.parameters()]
    opt = _make(kind, model, backend)
    start = {key: value.clone() for key, value in opt.state[model.head.weight].items()}

    def before():
        if change.startswith("zero_grad"):
            opt.zero_grad(set_to_none=False)

    def after():
        if change == "clip_grad_norm_":
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)  # a no-op in value

    for _ in range(3):
        opt.step(_closure(model, x, y, before=before, after=after))
    assert all(torch.equal(p, q) for p, q in zip(model.head.parameters(), head))
    for key, value in opt.state[model.head.weight].items():
        assert torch.equal(value, start[key]), f"the unused parameter's {key} changed"


@pytest.mark.parametrize("kind", ["sam-sgd", "sam-adamw"])
def test_clipping_inside_the_closure_follows_torch_optim_with_an_unused_head(kind):
    x, y = _data()
    model, reference = _model(unused=True), _model(unused=True)
    opt, torch_opt = _make(kind, model, "eager", rho=0.0), _reference(kind, reference.parameters())

    def clip(m):
        return lambda: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5)

    for _ in range(3):
        opt.step(_closure(model, x, y, after=clip(model)))
        torch_opt.zero_grad()
        _closure(reference, x, y, after=clip(reference))()
        torch_opt.step()
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fresh_optimizer", [False, True])
@pytest.mark.parametrize("kind", ["sam-sgd", "sam-adamw"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_gradient_left_on_a_layer_frozen_since_does_not_reach_the_clipping_norm(backend, kind, fresh_optimizer):
    """A backward pass between steps, then the first layer frozen (and, or not, the optimizer rebuilt from
    its checkpoint): the step starts as after zero_grad(), so the frozen layer's .grad is None in the closure
    and clipping there scales the gradients as torch.optim's loop does. (Found by the random loops below.)"""
    x, y = _data()
    model, reference = _model(unused=True), _model(unused=True)
    opt, torch_opt = _make(kind, model, backend, rho=0.0), _reference(kind, reference.parameters())

    def clip(m):
        return lambda: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.3)

    opt.step(_closure(model, x, y))
    torch_opt.zero_grad()
    _closure(reference, x, y)()
    torch_opt.step()
    F.cross_entropy(_forward(model, x), y).backward()  # a diagnostic backward, its gradients left in .grad
    if fresh_optimizer:
        saved = opt.state_dict()
        opt = _make(kind, model, backend, rho=0.0)
        opt.load_state_dict(saved)
    for m in (model, reference):
        m[0].requires_grad_(False)
    seen = []
    opt.step(_closure(model, x, y, before=lambda: seen.append(model[0].weight.grad), after=clip(model)))
    torch_opt.zero_grad()
    _closure(reference, x, y, after=clip(reference))()
    torch_opt.step()
    assert seen == [None, None]
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=2e-5, atol=2e-6)


# ---- 6. tied weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_two_parameters_over_one_tensor_are_refused_naming_both(kind):
    emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    head.weight = torch.nn.Parameter(emb.weight)  # the mistake: a second Parameter object over one storage
    with pytest.raises(ValueError, match=r"parameter 0 of group 0 .* parameter 1 of group 0 .*overlap"):
        _make(kind, [emb.weight, head.weight], "eager")
    opt = _make(kind, [emb.weight], "eager")
    with pytest.raises(ValueError, match="overlap in memory"):
        opt.add_param_group({"params": [head.weight]})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    head.weight = emb.weight  # tied right: one Parameter, listed once
    _make(kind, torch.nn.ModuleList([emb, head]), "eager")


def test_views_of_one_buffer_that_do_not_overlap_are_accepted():
    flat = torch.zeros(20)
    params = [torch.nn.Parameter(flat[:10]), torch.nn.Parameter(flat[10:])]
    sambayes.SAM(params, lr=0.1)


# ---- 7. what the closure returns --------------------------------------------------------------------------------
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("returns", ["tuple", "dict", "int", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_step_returns_what_the_closure_returns_and_steps_once(kind, returns, splits):
    x, y = _data()
    model = _model()
    opt = _make(kind, model, "eager")
    chunks = sambayes.split_batch(x, y, splits=splits)
    shape = {
        "tuple": lambda loss, out: (loss, out),
        "dict": lambda loss, out: {"loss": loss, "logits": out},
        "int": lambda loss, out: 7,
        "none": lambda loss, out: None,
    }[returns]

    def closure(j=0):
        out = _forward(model, chunks[j][0])
        loss = F.cross_entropy(out, chunks[j][1])
        loss.backward()
        return shape(loss, out)

    result = opt.step(closure, splits=splits)
    assert int(opt.state_dict()["param_groups"][0]["step"]) == 1
    if returns == "tuple":
        assert isinstance(result, tuple) and result[1].shape == (12 // splits, 3)
    elif returns == "dict":
        assert set(result) == {"loss", "logits"}
    elif returns == "int":
        assert float(result) == 7.0
    else:
        assert result is None


# ---- 8. deferred initialization on the meta device ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_an_optimizer_built_on_meta_parameters_trains_after_to_empty(kind, monkeypatch):
    """Deferred initialization, as under FSDP2: the optimizer is built on the meta device, the module is
    materialized in place (FSDP2 keeps its Parameter objects; so does torch with swapping on) and initialized."""
    monkeypatch.setattr(torch.__future__, "_swap_module_params_on_conversion", True)
    x, y = _data()
    with torch.device("meta"):
        model = _model()
    opt = _make(kind, model, "eager")
    assert opt.state_dict()["state"] == {}  # no state for parameters without values, and none left behind
    with pytest.raises(RuntimeError, match="meta device"):
        opt.step(_closure(model, x, y))
    model.to_empty(device="cpu")
    assert not opt.param_groups[0]["params"][0].is_meta
    reference = _model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            p.copy_(q)
    reference_opt = _make(kind, reference, "eager")
    for _ in range(2):
        opt.step(_closure(model, x, y))
        reference_opt.step(_closure(reference, x, y))
    assert torch.equal(_flat(model), _flat(reference))


# ---- the smaller ones ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_keep_sums_survives_deepcopy_and_pickle(kind):
    opt = _make(kind, _model(), "eager", keep_sums=False)
    assert copy.deepcopy(opt).keep_sums is False
    assert pickle.loads(pickle.dumps(opt)).keep_sums is False


def test_posterior_std_has_one_tensor_per_parameter_in_order():
    x, y = _data()
    model = _model()
    model[0].bias.requires_grad_(False)  # frozen: not sampled, σ = 0
    opt = _make("bsam", model, "eager")
    opt.step(_closure(model, x, y))
    stds = opt.posterior_std()
    assert [s.shape for s in stds] == [p.shape for p in model.parameters()]
    assert not stds[1].any() and stds[0].all() and stds[2].all()
    bias = model[0].bias.detach().clone()
    with opt.sampled_params(seed=1):
        assert torch.equal(model[0].bias, bias)  # σ = 0: what sampling does to it


def test_non_finite_weights_are_named_in_the_skip_warning():
    x, y = _data()
    model = _model()
    opt = _make("sam-sgd", model, "eager")
    opt.step(_closure(model, x, y))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # weights diverged (or were loaded so)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # skipped: the warning comes when the count reaches the host (on the CPU at once)
            opt.step(_closure(model, x, y))
    assert any("weight tensors hold inf or NaN" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_an_integer_tensor_learning_rate_is_accepted():
    x, y = _data()
    model = _model()
    opt = sambayes.SAM(model, lr=torch.tensor(1), rho=0.0)
    opt.step(_closure(model, x, y))
    assert not torch.equal(_flat(model), _flat(_model()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["sam-sgd", "sam-adamw"])
def test_a_zero_gradient_is_a_zero_perturbation_and_the_plain_base_step(kind, backend):
    """A loss whose gradient is exactly zero (a dead ReLU layer): ‖g‖ = 0 must give no perturbation (not a
    division by zero) and the base optimizer's step on the zero gradient (weight decay, momentum)."""
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(4, 2), None
    reference = copy.deepcopy(model)
    x = torch.randn(6, 4)

    def closure(m):
        def run():
            loss = (m(x) * 0.0).sum()
            loss.backward()
            return loss

        return run

    opt, torch_opt = _make(kind, model, backend), _reference(kind, reference.parameters())
    for _ in range(3):
        opt.step(closure(model))
        torch_opt.zero_grad()
        closure(reference)()
        torch_opt.step()
    assert torch.isfinite(_flat(model)).all()
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-6, atol=1e-7)


# ---- the step protocol against torch.optim, on random training loops ----------------------------------------
STEP = st.fixed_dictionaries(
    {
        "zero_grad": st.sampled_from(["none", "set_to_none", "zeros", "inside"]),
        "diagnostic_backward": st.sampled_from(["no", "then zero_grad", "left in .grad"]),
        "frozen": st.booleans(),  # the first layer frozen for this step
        "clip": st.sampled_from([None, 0.3, 1e9]),
        "autocast": st.sampled_from(["no", "inside", "around"]),
        "returns": st.sampled_from(["loss", "tuple", "dict", "none"]),
        "checkpoint": st.booleans(),  # a save and a load into a fresh optimizer after the step
    }
)


@pytest.mark.parametrize("backend", [b for b in ("eager", "cpu") if b in AVAILABLE_BACKENDS])
@pytest.mark.parametrize("kind", ["sam-sgd", "sam-adamw"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=2, max_size=6))
def test_random_training_loops_follow_torch_optim(kind, backend, steps):
    """SAM with rho = 0 is its base optimizer through two gradient passes: whatever the loop around it does
    (zero_grad variants, extra backward passes, freezing, clipping, autocast, closure return values,
    checkpoints), it must train as the plain torch.optim loop does, step for step."""
    x, y = _data()
    model, reference = _model(unused=True), _model(unused=True)
    opt, torch_opt = _make(kind, model, backend, rho=0.0), _reference(kind, reference.parameters())
    for config in steps:
        for m in (model, reference):
            m[0].requires_grad_(not config["frozen"])
        clip = config["clip"]

        def forward(m, autocast):
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                out = _forward(m, x)
                return out, F.cross_entropy(out.float(), y)

        def closure(config=config, clip=clip):
            if config["zero_grad"] == "inside":
                opt.zero_grad()
            out, loss = forward(model, config["autocast"] == "inside")
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            return {"loss": loss, "tuple": (loss, out), "dict": {"loss": loss}, "none": None}[config["returns"]]

        if config["zero_grad"] in ("set_to_none", "zeros"):
            opt.zero_grad(set_to_none=config["zero_grad"] == "set_to_none")
        if config["autocast"] == "around":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                opt.step(closure)
        else:
            opt.step(closure)
        # the plain torch.optim loop
        torch_opt.zero_grad()
        _, loss = forward(reference, config["autocast"] != "no")
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        torch_opt.step()
        if config["diagnostic_backward"] != "no":
            forward(model, False)[1].backward()
            if config["diagnostic_backward"] == "then zero_grad":
                opt.zero_grad()
        if config["checkpoint"]:
            saved, saved_torch = opt.state_dict(), torch_opt.state_dict()
            opt, torch_opt = _make(kind, model, backend, rho=0.0), _reference(kind, reference.parameters())
            opt.load_state_dict(copy.deepcopy(saved))
            torch_opt.load_state_dict(copy.deepcopy(saved_torch))
        torch.testing.assert_close(_flat(model), _flat(reference), rtol=2e-5, atol=2e-6)


# ---- 5. AdamW's step counts, per parameter ---------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_layer_unfrozen_late_takes_torch_adamws_first_update(backend):
    """torch.optim.AdamW counts steps per parameter: a layer unfrozen after 20 steps starts its bias
    correction at 1, not at 21 (which would make its first update 2.5 times as large)."""
    x, y = _data()
    model, reference = _model(), _model()
    opt, torch_opt = _make("sam-adamw", model, backend, rho=0.0), _reference("sam-adamw", reference.parameters())
    for step in range(23):
        for m in (model, reference):
            m[0].requires_grad_(step >= 20)
        opt.step(_closure(model, x, y))
        torch_opt.zero_grad()
        _closure(reference, x, y)()
        torch_opt.step()
        torch.testing.assert_close(_flat(model), _flat(reference), rtol=2e-5, atol=2e-6)
    counts = {p: float(opt.state[p]["step"]) for p in model.parameters()}
    assert counts[model[0].weight] == 3 and counts[model[2].weight] == 23
    assert opt.state[model[0].weight]["step"] is opt.state[model[0].bias]["step"]  # one count per history


def test_sam_adamw_checkpoints_keep_each_parameters_count_and_old_ones_load():
    x, y = _data()
    model = _model()
    opt = _make("sam-adamw", model, "eager")
    model[0].requires_grad_(False)
    opt.step(_closure(model, x, y))
    model[0].requires_grad_(True)
    opt.step(_closure(model, x, y))
    saved = opt.state_dict()
    assert [float(s["step"]) for s in saved["state"].values()] == [1, 1, 2, 2]
    again = _make("sam-adamw", _model(), "eager")
    again.load_state_dict(copy.deepcopy(saved))
    assert [float(s["step"]) for s in again.state_dict()["state"].values()] == [1, 1, 2, 2]
    old = copy.deepcopy(saved)  # written before each parameter kept its count: the group's is used
    for s in old["state"].values():
        del s["step"]
    again.load_state_dict(old)
    assert [float(s["step"]) for s in again.state_dict()["state"].values()] == [2, 2, 2, 2]
