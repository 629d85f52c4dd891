"""The optimizer's frame, sambayes/optimizer.py (TwoPassOptimizer, BSAM's and SAM's construction; the
checks of sambayes/_arguments.py): construction and hyperparameter checks, the phase order and the
closure API, pickling and deepcopy, parameter groups, LR schedulers, a tensor lr, refused dtypes,
0-element parameters, the phase API with a functional loss, an exception in the closure.

Elsewhere: the ledger (test_ledger.py), checkpoints (test_checkpoints.py), skipping and the
GradScaler (test_skipping.py), replication (test_replication.py), BSAM's and SAM's own hooks
(test_bsam.py, test_sam.py), the phase registry (test_phases.py).
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS, DEVICE
from harness import cross_entropy_closure, data, flat, linear, small_mlp, square_closure

import sambayes

# ---- construction: hyperparameters and parameters checked ----------------------------------------


P = [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_data=0), "num_data=0"),
        (dict(num_data=-5), "num_data=-5"),
        (dict(num_data=10, lr=-0.1), "lr=-0.1"),
        (dict(num_data=10, rho=-1.0), "rho=-1.0"),
        (dict(num_data=10, betas=(1.0, 0.9)), r"betas\[0\]=1.0"),
        (dict(num_data=10, betas=(0.9, -0.1)), r"betas\[1\]=-0.1"),
        (dict(num_data=10, betas=(0.9,)), "betas="),
        (dict(num_data=10, damping=-0.5), "damping=-0.5"),
        (dict(num_data=10, init_precision=0.0), "init_precision=0.0"),
        (dict(num_data=10, weight_decay=-1e-3), "weight_decay=-0.001"),
        (dict(num_data=float("nan")), "num_data=nan"),
        (dict(num_data=10, backend="fastest"), "backend='fastest'"),
        (dict(num_data=10, seed=-1), "seed=-1"),
    ],
)
def test_bsam_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sambayes.BSAM(P, **kwargs)


def test_bad_group_hyperparameter_is_refused():
    with pytest.raises(ValueError, match="lr=-1"):
        sambayes.BSAM([{"params": P, "lr": -1}], num_data=10)
    opt = sambayes.BSAM(P, num_data=10)
    with pytest.raises(ValueError, match="rho=-2"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "rho": -2})
    assert len(opt.param_groups) == 1  # the refused group is not kept


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(lr=0.1, rho=-0.1), "rho=-0.1"),
        (dict(lr=0.1, momentum=1.0), "momentum=1.0"),
        (dict(lr=0.1, base="lion"), "base='lion'"),
        (dict(lr=0.1, base="adamw", betas=(0.9, 1.5)), r"betas\[1\]=1.5"),
        (dict(lr=0.1, base="adamw", eps=0.0), "eps=0.0"),
        (dict(lr=0.1, nesterov=True, momentum=0.0), "nesterov"),
        (dict(lr=0.1, backend="gpu"), "backend='gpu'"),
    ],
)
def test_sam_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sambayes.SAM(P, **kwargs)


def test_numpy_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    opt = sambayes.BSAM(P, num_data=np.int64(1000), lr=np.float32(0.1))
    assert opt.param_groups[0]["num_data"] == 1000


def test_a_tensor_learning_rate_is_accepted():
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0, lr=torch.tensor(0.1))
    opt.step(square_closure(m, x))
    with pytest.raises(ValueError, match="lr="):
        sambayes.BSAM(m, num_data=100, lr=torch.tensor(float("nan")))


def test_a_parameter_listed_twice_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="listed twice"):
        sambayes.BSAM([p, p], num_data=1)
    with pytest.raises(ValueError, match="listed twice"):
        sambayes.SAM([p, torch.nn.Parameter(torch.ones(1)), p], lr=0.1)


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


def test_unknown_backend_reason_is_clear():
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        opt = sambayes.BSAM(small_mlp().parameters(), num_data=10, backend="cuda")
        opt.sample()


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
        opt.step(square_closure(m, x), splits=splits)
    assert not torch.equal(m.linear.weight, before) and m.empty.shape == (0, 3)


# ---- the phase order and the closure API ---------------------------------------------------------


@pytest.mark.parametrize("make", [lambda ps: sambayes.BSAM(ps, num_data=10), lambda ps: sambayes.SAM(ps, lr=0.1)])
def test_bad_step_calls(make):
    model = small_mlp()
    opt = make(model.parameters())
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    for splits in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match=f"splits={splits!r}"):
            opt.step(lambda j=0: None, splits=splits)
    x, y = data(n=10)
    with pytest.raises(ValueError, match="splits=4 does not divide the batch size 10"):
        sambayes.split_batch(x, y, splits=4)
    with pytest.raises(RuntimeError, match="perturb\\(\\) called while the optimizer is at rest"):
        opt.perturb()
    opt.sample()
    with pytest.raises(RuntimeError, match="update\\(\\) called while the optimizer is sampled"):
        opt.update()
    with pytest.raises(RuntimeError, match="middle of a step"):
        opt.state_dict()


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


def test_an_exception_in_the_closure_leaves_the_model_at_rest():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model, num_data=10, seed=0)
    opt.step(cross_entropy_closure(model, x, y))
    at_rest = flat(model)

    def failing():
        raise MemoryError("out of memory (simulated)")

    with pytest.raises(MemoryError):
        opt.step(failing)
    assert torch.equal(flat(model), at_rest)
    assert all(p.grad is None for p in model.parameters())
    opt.state_dict()  # usable again
    opt.step(cross_entropy_closure(model, x, y))
    assert opt.param_groups[0]["step"] == 2
    opt.sample()
    opt.abort()  # the same by hand, for the phase API
    assert torch.equal(flat(model), torch.cat([opt.state[p]["mean"].flatten() for p in model.parameters()]))


# ---- pickling and deepcopy -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_deepcopy_and_pickle_give_working_optimizers(method):
    import pickle

    model = small_mlp()
    x, y = data()
    opt = (
        sambayes.BSAM(model, num_data=50, seed=3, backend="foreach")
        if method == "bsam"
        else sambayes.SAM(model, lr=0.1, base="adamw", backend="foreach")
    )
    opt.step(cross_entropy_closure(model, x, y))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.backend == "foreach" and clone.model is not None
        assert getattr(clone, "base", "sgd") == getattr(opt, "base", "sgd")
        clone_model = clone.model
        clone.step(cross_entropy_closure(clone_model, x, y))
    opt.step(cross_entropy_closure(model, x, y))
    torch.testing.assert_close(flat(clone_model), flat(model), rtol=0, atol=0)


# ---- parameter groups and LR schedulers ----------------------------------------------------------


def test_two_groups_with_their_own_hyperparameters():
    """A two-group optimizer equals one optimizer per group run in lockstep (noise-free)."""
    x, y = data()
    model = small_mlp()
    groups = lambda m: [
        {"params": list(m[0].parameters()), "lr": 0.05, "rho": 0.2, "weight_decay": 0.1},
        {"params": list(m[2].parameters()), "lr": 0.3, "betas": (0.5, 0.9), "damping": 1.0},
    ]
    opt = sambayes.BSAM(groups(model), num_data=1e30, rho=0.01)
    twin = small_mlp()
    g0, g1 = groups(twin)
    opt0 = sambayes.BSAM(g0["params"], num_data=1e30, **{k: v for k, v in g0.items() if k != "params"})
    opt1 = sambayes.BSAM(g1["params"], num_data=1e30, rho=0.01, **{k: v for k, v in g1.items() if k != "params"})
    for _ in range(3):
        opt.step(cross_entropy_closure(model, x, y))
        for phase in ("sample", "perturb"):
            for o in (opt0, opt1):
                getattr(o, phase)()
            cross_entropy_closure(twin, x, y)()
        opt0.update()
        opt1.update()
    torch.testing.assert_close(flat(model), flat(twin), rtol=0, atol=0)


def test_lr_scheduler_drives_the_learning_rate():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model.parameters(), num_data=1e30, lr=0.2, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    manual_model = small_mlp()
    manual = sambayes.BSAM(manual_model.parameters(), num_data=1e30, lr=0.2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        for t in range(4):
            assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**t)
            opt.step(cross_entropy_closure(model, x, y))
            sched.step()
            manual.param_groups[0]["lr"] = 0.2 * 0.5**t
            manual.sample()
            cross_entropy_closure(manual_model, x, y)()
            manual.perturb()
            cross_entropy_closure(manual_model, x, y)()
            manual.update()
    assert torch.equal(flat(model), flat(manual_model))
