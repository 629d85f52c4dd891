"""Defects found by using the optimizers as an adversarial user would, each with its reproducer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS, DEVICE

import sambayes


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).to(DEVICE), torch.randn(8, 3, device=DEVICE)


def closure_for(model, x):
    def closure(j=0):
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    return closure


# ---- D1: every backend moves the version counters of what it writes --------------------------


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_another_optimizers_training_is_seen(backend):
    """Two optimizers take turns on one model: a's posterior samples must not revert b's training."""
    m, x = linear()
    a = sambayes.BSAM(m, num_data=100, seed=0, backend=backend)
    for _ in range(3):
        a.step(closure_for(m, x))
    b = sambayes.BSAM(m, num_data=100, seed=1, backend=backend)
    for _ in range(3):
        b.step(closure_for(m, x))
    weights = m.weight.detach().clone()
    sambayes.predict(m, a, x, samples=2)
    assert torch.equal(m.weight, weights)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_a_stale_graph_raises(backend):
    """A graph built before sample() moved the weights: backward refuses, as after any in-place op."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(DEVICE)
    x = torch.randn(8, 3, device=DEVICE)
    opt = sambayes.BSAM(m, num_data=100, seed=0, backend=backend)
    opt.step(closure_for(m, x))
    loss = m(x).pow(2).mean()  # saves the last layer's weight: its input's gradient needs it
    opt.sample()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    opt.abort()


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_no_step_inside_sampled_params(backend):
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0, backend=backend)
    opt.step(closure_for(m, x))
    mean = m.weight.detach().clone()
    with opt.sampled_params(seed=1):
        with pytest.raises(RuntimeError, match="sampled_params"):
            opt.step(closure_for(m, x))
        with pytest.raises(RuntimeError, match="sampled_params"):
            opt.sample()
    assert torch.equal(m.weight, mean)


# ---- D2: 0-element parameters --------------------------------------------------------------------


class WithEmpty(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.empty = torch.nn.Parameter(torch.zeros(0, 3))

    def forward(self, x):
        return self.linear(x) + self.empty.sum()  # a gradient of 0 elements


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("kind", ["bsam", "sam", "adamw"])
def test_zero_element_parameters_train(backend, kind):
    torch.manual_seed(0)
    m = WithEmpty().to(DEVICE)
    x = torch.randn(8, 3, device=DEVICE)
    if kind == "bsam":
        opt = sambayes.BSAM(m, num_data=100, seed=0, backend=backend)
    else:
        opt = sambayes.SAM(m.parameters(), lr=0.1, base="sgd" if kind == "sam" else "adamw", backend=backend)
    before = m.linear.weight.detach().clone()
    for splits in (1, 2):
        opt.step(closure_for(m, x), splits=splits)
    assert not torch.equal(m.linear.weight, before) and m.empty.shape == (0, 3)


# ---- D3: load_state_dict in the middle of a step -------------------------------------------------


def test_load_state_dict_mid_step_resets_it_and_training_goes_on():
    """A crash in sub-batch 1 of 2 (say, out of memory in a hand-written loop), gradients set to None,
    then the last checkpoint: the step in progress is abandoned and training goes on."""
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0)
    opt.step(closure_for(m, x), splits=2)
    checkpoint = copy.deepcopy(opt.state_dict())
    opt.sample()
    closure_for(m, x)()
    opt.perturb(sync=False)
    closure_for(m, x)()
    opt.sample()  # sub-batch 1: the crash comes before its backward pass
    opt.zero_grad(set_to_none=True)
    opt.load_state_dict(checkpoint)
    assert all(torch.equal(p, checkpoint["state"][i]["mean"]) for i, p in enumerate(m.parameters()))
    for _ in range(2):
        opt.step(closure_for(m, x), splits=2)
    opt.abort()  # a no-op at rest


# ---- D4: a foreign state dict is refused before anything changes ---------------------------------


def _foreign_state_dicts(model):
    adam = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    adam.step()
    sam = sambayes.SAM(model.parameters(), lr=0.1)
    sam.step(closure_for(model, torch.randn(4, 3, device=DEVICE)))
    return {"torch.optim.Adam": adam.state_dict(), "SAM": sam.state_dict()}


@pytest.mark.parametrize("foreign", ["torch.optim.Adam", "SAM"])
def test_a_foreign_state_dict_leaves_the_optimizer_bitwise_unchanged(foreign):
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0)
    opt.step(closure_for(m, x))
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="not a BSAM state dict"):
        opt.load_state_dict(_foreign_state_dicts(m)[foreign])
    for p, w in zip(m.parameters(), weights):
        p.data.copy_(w)  # the foreign optimizers moved them; ours must not have been touched
    after = opt.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for pid, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][pid][key], value)
    opt.step(closure_for(m, x))  # and it still trains


def test_a_bsam_state_dict_is_refused_by_sam():
    m, x = linear()
    bsam = sambayes.BSAM(m, num_data=100, seed=0)
    bsam.step(closure_for(m, x))
    sam = sambayes.SAM(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a SAM state dict"):
        sam.load_state_dict(bsam.state_dict())
    sam.step(closure_for(m, x))


def test_bad_values_in_a_state_dict_are_named():
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0)
    opt.step(closure_for(m, x))
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["num_data"] = -1
    with pytest.raises(ValueError, match="num_data=-1"):
        opt.load_state_dict(state)
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["mean"] = state["state"][0]["mean"][:1]
    with pytest.raises(ValueError, match="'mean' of parameter 0"):
        opt.load_state_dict(state)


# ---- D5: dtypes the backends cannot train ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.uint8])
def test_unsupported_dtypes_are_refused_with_the_parameter_named(dtype):
    ok = torch.nn.Parameter(torch.zeros(2))
    bad = torch.zeros(3, 4, dtype=dtype)
    bad = torch.nn.Parameter(bad, requires_grad=dtype.is_complex)
    with pytest.raises(TypeError, match=r"parameter 1 of group 0 \(shape \(3, 4\)\)"):
        sambayes.BSAM([ok, bad], num_data=1)
    opt = sambayes.SAM([ok], lr=0.1)
    with pytest.raises(TypeError, match="parameter 0 of group 1"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1


# ---- D6: SAM-SGD's groups are SGD's -------------------------------------------------------------------


def test_sam_sgd_groups_carry_momentum_and_no_betas():
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd_group = sambayes.SAM(p, lr=0.1).param_groups[0]
    assert "momentum" in sgd_group and "betas" not in sgd_group and "eps" not in sgd_group
    adamw_group = sambayes.SAM(p, lr=0.1, base="adamw").param_groups[0]
    assert "betas" in adamw_group and "momentum" not in adamw_group and "nesterov" not in adamw_group
    with pytest.raises(ValueError, match="belong to base='adamw'"):
        sambayes.SAM(p, lr=0.1, betas=(0.8, 0.9))
    with pytest.raises(ValueError, match="belong to base='sgd'"):
        sambayes.SAM(p, lr=0.1, base="adamw", momentum=0.5)


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_schedulers_cycle_sam_momentum_as_for_sgd(scheduler):
    def make(cls, **kw):
        p = [torch.nn.Parameter(torch.zeros(2))]
        opt = cls(p, lr=0.1, momentum=0.9, **kw)
        if scheduler == "OneCycleLR":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, cycle_momentum=True)
        else:
            sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.1, max_lr=1.0, step_size_up=3, cycle_momentum=True)
        return opt, sched

    sam, sam_sched = make(sambayes.SAM)
    sgd, sgd_sched = make(torch.optim.SGD)
    for _ in range(5):
        sam._opt_called = sgd._opt_called = True  # a step happened, as far as the scheduler is concerned
        sam_sched.step()
        sgd_sched.step()
        assert sam.param_groups[0]["momentum"] == sgd.param_groups[0]["momentum"]
        assert sam.param_groups[0]["lr"] == sgd.param_groups[0]["lr"]


# ---- D8: the small ones -----------------------------------------------------------------------------


def test_a_tensor_learning_rate_is_accepted():
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0, lr=torch.tensor(0.1))
    opt.step(closure_for(m, x))
    with pytest.raises(ValueError, match="lr="):
        sambayes.BSAM(m, num_data=100, lr=torch.tensor(float("nan")))


def test_seeds_are_integers_below_2_to_the_64():
    p = [torch.nn.Parameter(torch.zeros(2))]
    np = pytest.importorskip("numpy")
    assert sambayes.BSAM(p, num_data=1, seed=np.int64(7)).param_groups[0]["seed"] == 7
    assert sambayes.BSAM(p, num_data=1, seed=2**64 - 1).param_groups[0]["seed"] == 2**64 - 1
    for bad in (2**64, -1, 1.5, "3", True):
        with pytest.raises(ValueError, match="seed="):
            sambayes.BSAM(p, num_data=1, seed=bad)


def test_nested_sampled_params_return_to_the_outer_sample():
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=10, seed=0)
    opt.step(closure_for(m, x))
    mean = m.weight.detach().clone()
    with opt.sampled_params(seed=1):
        outer = m.weight.detach().clone()
        with opt.sampled_params(seed=2):
            assert not torch.equal(m.weight, outer)
        assert torch.equal(m.weight, outer)
    assert torch.equal(m.weight, mean)


def test_a_parameter_listed_twice_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="listed twice"):
        sambayes.BSAM([p, p], num_data=1)
    with pytest.raises(ValueError, match="listed twice"):
        sambayes.SAM([p, torch.nn.Parameter(torch.ones(1)), p], lr=0.1)


def test_update_with_a_scaler_and_no_gradient_at_all():
    """No parameter got a gradient: the step changes nothing, and scaler.update() still has its flag."""
    m, _ = linear()
    opt = sambayes.BSAM(m, num_data=10, seed=0)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=8.0)
    scaler.scale(torch.ones((), device=DEVICE))  # the scale exists, as after any scaled backward
    weights = [p.detach().clone() for p in m.parameters()]
    opt.sample()
    opt.perturb(grad_scaler=scaler)
    opt.update(grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 8.0
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), weights))


def test_grad_is_zero_after_a_step():
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=10, seed=0)
    opt.step(closure_for(m, x))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m.parameters())


def test_phase_api_with_functional_loss():
    """The phase API with several backward calls per pass (plain accumulation): the same step as one
    backward over the whole batch."""
    losses = []
    for chunks in (1, 2):
        m, x = linear()
        opt = sambayes.SAM(m.parameters(), lr=0.1)
        opt.sample()
        for part in x.chunk(chunks):
            (F.mse_loss(m(part), torch.zeros_like(m(part)), reduction="sum") / x.numel()).backward()
        opt.perturb()
        for part in x.chunk(chunks):
            (F.mse_loss(m(part), torch.zeros_like(m(part)), reduction="sum") / x.numel()).backward()
        opt.update()
        assert int(opt.param_groups[0]["step"]) == 1
        losses.append([p.detach().clone() for p in m.parameters()])
    for whole, halves in zip(*losses):
        torch.testing.assert_close(halves, whole, rtol=1e-6, atol=1e-7)
        assert not torch.equal(whole, linear()[0].weight) or whole.dim() == 1  # it moved


# ---- found in review -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_a_model_cast_between_steps_keeps_training(backend):
    """model.double() between steps: the state and the sums over sub-batches follow the new dtype,
    and every backend goes on as eager does."""
    results = []
    for b in ("eager", backend):
        m, x = linear()
        opt = sambayes.BSAM(m, num_data=10, seed=0, backend=b)
        opt.step(closure_for(m, x), splits=2)
        m.double()
        x = x.double()
        for _ in range(2):
            opt.step(closure_for(m, x), splits=2)
        assert opt.state[m.weight]["mean"].dtype == torch.float64
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", [b for b in AVAILABLE_BACKENDS if b != "triton"])
def test_clipping_float16_gradients_under_a_large_scale(backend):
    """max_grad_norm with float16 parameters and a GradScaler whose scaled gradients have a float16
    norm beyond 65504 (while every gradient is finite): the step is the unscaled one, not zero."""
    results = []
    for scale in (1.0, 2.0**16):
        m, x = linear()
        m.half()
        x = x.half()
        opt = sambayes.SAM(m.parameters(), lr=0.1, backend=backend)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=scale)

        def closure(j=0):
            loss = m(x).float().mean() * 1.5  # scaled: the bias gradient is 49152, its float16 norm inf
            scaler.scale(loss).backward()
            if scale > 1:
                assert all(g.isfinite().all() for g in (m.weight.grad, m.bias.grad))
                assert not torch.linalg.vector_norm(m.bias.grad).isfinite()
            return loss

        before = [p.detach().clone() for p in m.parameters()]
        opt.step(closure, grad_scaler=scaler, max_grad_norm=1.0)
        scaler.update()
        assert opt.skipped_steps == 0
        assert any(not torch.equal(p, b) for p, b in zip(m.parameters(), before)), "the step was lost"
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)
