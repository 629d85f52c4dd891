"""The public API: checkpoints, posterior, predict, schedulers, groups, bad input, skipping."""

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS

import sambayes

CPU_BACKENDS = [b for b in AVAILABLE_BACKENDS if b in ("eager", "foreach", "cpu")]


def small_mlp(dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def data(n=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------------------
# checkpoints

RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F, sambayes
    path, backend, method, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(torch.bfloat16)
    opt = (sambayes.BSAM(model.parameters(), num_data=50, lr=0.1, seed=123, backend=backend) if method == "bsam"
           else sambayes.SAM(model.parameters(), lr=0.1, base="adamw", backend=backend))
    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"])
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 5, generator=g).to(torch.bfloat16), torch.randint(0, 3, (16,), generator=g)
    def closure(j):
        loss = F.cross_entropy(model(x[j * 8:(j + 1) * 8]), y[j * 8:(j + 1) * 8]); loss.backward(); return loss
    for _ in range(steps):
        opt.step(closure, splits=2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    """
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_resume_in_fresh_process_is_bit_exact(tmp_path, backend, method):
    def make():
        model = small_mlp(torch.bfloat16)
        if method == "bsam":
            return model, sambayes.BSAM(model.parameters(), num_data=50, lr=0.1, seed=123, backend=backend)
        return model, sambayes.SAM(model.parameters(), lr=0.1, base="adamw", backend=backend)

    x, y = data()
    x = x.to(torch.bfloat16)

    def closure_j(model):
        def closure(j):
            loss = F.cross_entropy(model(x[j * 8 : (j + 1) * 8]), y[j * 8 : (j + 1) * 8])
            loss.backward()
            return loss

        return closure

    model, opt = make()
    for _ in range(6):
        opt.step(closure_j(model), splits=2)
    uninterrupted_model, uninterrupted_opt = model.state_dict(), opt.state_dict()

    model, opt = make()
    for _ in range(3):
        opt.step(closure_j(model), splits=2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(path), backend, method, "3"], check=True)
    resumed = torch.load(path)
    for key, value in uninterrupted_model.items():
        assert torch.equal(resumed["model"][key], value), key
    for pid, state in uninterrupted_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(resumed["opt"]["state"][pid][key]), torch.as_tensor(value)), key
    assert resumed["opt"]["param_groups"][0]["step"] == 6


def test_checkpoint_from_one_backend_loads_in_another():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model.parameters(), num_data=50, seed=5, backend="eager")
    opt.step(closure_for(model, x, y))
    saved = copy.deepcopy(opt.state_dict())  # like torch.optim, state_dict() holds references
    other = sambayes.BSAM(model.parameters(), num_data=50, backend="foreach")
    other.load_state_dict(saved)
    assert other.param_groups[0]["seed"] == 5
    opt.step(closure_for(model, x, y))
    expected = flat(model)
    other.load_state_dict(saved)  # puts the model back at the saved mean
    other.step(closure_for(model, x, y))
    torch.testing.assert_close(flat(model), expected, rtol=1e-6, atol=1e-7)


def test_state_dict_for_other_shapes_is_refused():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model.parameters(), num_data=50)
    opt.step(closure_for(model, x, y))
    other_model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    other = sambayes.BSAM(other_model.parameters(), num_data=50)
    with pytest.raises(ValueError, match=r"shape \(7, 5\).*shape \(8, 5\)"):
        other.load_state_dict(opt.state_dict())
    fewer = sambayes.BSAM(list(model.parameters())[:2], num_data=50)
    with pytest.raises(ValueError, match="4 parameters.*2"):
        fewer.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="base='adamw'"):
        sambayes.SAM(model.parameters(), lr=0.1).load_state_dict(
            sambayes.SAM(model.parameters(), lr=0.1, base="adamw").state_dict()
        )


def test_low_precision_state_survives_a_checkpoint():
    # torch.optim casts floating state to the parameter dtype on load; we keep float32 masters
    model = small_mlp(torch.bfloat16)
    x, y = data(dtype=torch.bfloat16)
    opt = sambayes.BSAM(model.parameters(), num_data=50)
    opt.step(closure_for(model, x, y))
    fresh = sambayes.BSAM(model.parameters(), num_data=50)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        assert fresh.state[p]["mean"].dtype == torch.float32
        assert torch.equal(fresh.state[p]["mean"], opt.state[p]["mean"])


def test_weights_loaded_into_the_model_between_steps_are_used():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model.parameters(), num_data=1e30, rho=0.0, lr=0.0)
    opt.step(closure_for(model, x, y))
    new_weights = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new_weights)
    opt.step(closure_for(model, x, y))  # lr = 0: the mean must simply be the loaded weights
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), new_weights[key])
        torch.testing.assert_close(opt.state[p]["mean"], new_weights[key])


# ---------------------------------------------------------------------------------------
# the posterior


def test_sampled_params_restores_the_mean_exactly_even_on_error():
    model = small_mlp(torch.bfloat16)
    x, y = data(dtype=torch.bfloat16)
    opt = sambayes.BSAM(model.parameters(), num_data=10)
    opt.step(closure_for(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params(seed=1):
        sample1 = flat(model)
        assert not torch.equal(sample1, torch.cat([b.flatten() for b in before]))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(KeyError), opt.sampled_params(seed=1):
        assert torch.equal(flat(model), sample1)  # a pure function of the seed
        raise KeyError("boom")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with opt.sampled_params(seed=2):
        assert not torch.equal(flat(model), sample1)


def test_predict_averages_softmax_over_posterior_samples():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))
    x, y = data()
    opt = sambayes.BSAM(model.parameters(), num_data=5)
    opt.step(closure_for(model, x, y))
    model.train()
    running_mean = model[1].running_mean.clone()
    probs = sambayes.predict(model, opt, x, samples=4, seed=10)
    assert model.training and torch.equal(model[1].running_mean, running_mean)  # eval inside, mode restored
    model.eval()
    manual = []
    for s in range(4):
        with opt.sampled_params(seed=10 + s):
            manual.append(torch.softmax(model(x), -1))
    torch.testing.assert_close(probs, torch.stack(manual).mean(0))
    torch.testing.assert_close(sambayes.predict(model, opt, x, samples=0), torch.softmax(model(x), -1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(x)))
    with pytest.raises(TypeError, match="BSAM"):
        sambayes.predict(model, sambayes.SAM(model.parameters(), lr=0.1), x, samples=2)
    with pytest.raises(ValueError, match="samples=-1"):
        sambayes.predict(model, opt, x, samples=-1)


# ---------------------------------------------------------------------------------------
# schedulers and groups


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
            opt.step(closure_for(model, x, y))
            sched.step()
            manual.param_groups[0]["lr"] = 0.2 * 0.5**t
            manual.sample()
            closure_for(manual_model, x, y)()
            manual.perturb()
            closure_for(manual_model, x, y)()
            manual.update()
    assert torch.equal(flat(model), flat(manual_model))


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
        opt.step(closure_for(model, x, y))
        for phase in ("sample", "perturb"):
            for o in (opt0, opt1):
                getattr(o, phase)()
            closure_for(twin, x, y)()
        opt0.update()
        opt1.update()
    torch.testing.assert_close(flat(model), flat(twin), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# bad input


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


def test_sparse_gradients_accumulate_into_the_dense_buffer():
    """An Embedding(sparse=True) trains exactly like a dense one: autograd adds its sparse
    gradient into the optimizer's dense gradient buffer."""
    finals = []
    for sparse in (True, False):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=sparse)
        opt = sambayes.BSAM(emb.parameters(), num_data=10, seed=1)

        def closure():
            loss = emb(torch.tensor([1, 2, 2])).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        finals.append(emb.weight.detach().clone())
    assert torch.equal(finals[0], finals[1])


def test_unknown_backend_reason_is_clear():
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        opt = sambayes.BSAM(small_mlp().parameters(), num_data=10, backend="cuda")
        opt.sample()


# ---------------------------------------------------------------------------------------
# skipped parameters and non-finite gradients


def test_frozen_and_unused_parameters_are_skipped():
    model = small_mlp()
    unused = torch.nn.Parameter(torch.ones(4))
    model[0].bias.requires_grad_(False)
    x, y = data()
    opt = sambayes.BSAM([*model.parameters(), unused], num_data=100, seed=0)
    frozen_before = model[0].bias.detach().clone()
    opt.step(closure_for(model, x, y))
    assert torch.equal(model[0].bias, frozen_before) and model[0].bias not in opt.state
    assert torch.equal(unused.detach(), torch.ones(4))  # sampled, then back at its untouched mean
    assert torch.equal(opt.state[unused]["momentum"], torch.zeros(4))
    assert torch.equal(opt.state[unused]["precision"], torch.ones(4))


@pytest.mark.parametrize("bad_pass", [0, 1])
@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_non_finite_gradient_skips_the_step(bad_pass, method):
    model = small_mlp()
    x, y = data()
    opt = (
        sambayes.BSAM(model.parameters(), num_data=100)
        if method == "bsam"
        else sambayes.SAM(model.parameters(), lr=0.1)
    )
    opt.step(closure_for(model, x, y))
    params_before = flat(model)
    state_before = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    calls = []

    def closure():
        loss = F.cross_entropy(model(x), y) * (float("inf") if len(calls) == bad_pass else 1.0)
        calls.append(1)
        loss.backward()
        return loss

    opt.sample()
    closure()
    opt.perturb()
    closure()
    with pytest.warns(RuntimeWarning, match="non-finite gradient, step skipped") as record:
        opt.update()
    assert record[0].filename == __file__  # the warning points at the caller
    assert torch.equal(flat(model), params_before)
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, state_before[pid][key])
    group = opt.param_groups[0]
    assert group["skipped_steps"] == 1 and group["step"] == 1
    opt.step(closure_for(model, x, y))  # and training goes on
    assert group["step"] == 2 and torch.isfinite(flat(model)).all()


# ---------------------------------------------------------------------------------------
# what a demanding user does to an optimizer


def test_float16_gradients_with_a_large_finite_norm_are_not_skipped():
    lin = torch.nn.Linear(100, 100, bias=False).half()
    opt = sambayes.BSAM(lin, num_data=100, lr=1e-3, seed=1)
    x = torch.ones(4, 100, dtype=torch.float16)

    def closure():
        loss = (lin(x).float() * 200.0).sum()  # elements of 800: a float16 2-norm would overflow
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    assert opt.param_groups[0]["skipped_steps"] == 0 and opt.param_groups[0]["step"] == 1


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
    opt.step(closure_for(model, x, y))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.backend == "foreach" and clone.model is not None
        assert getattr(clone, "base", "sgd") == getattr(opt, "base", "sgd")
        clone_model = clone.model
        clone.step(closure_for(clone_model, x, y))
    opt.step(closure_for(model, x, y))
    torch.testing.assert_close(flat(clone_model), flat(model), rtol=0, atol=0)


def test_an_exception_in_the_closure_leaves_the_model_at_rest():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model, num_data=10, seed=0)
    opt.step(closure_for(model, x, y))
    at_rest = flat(model)

    def failing():
        raise MemoryError("out of memory (simulated)")

    with pytest.raises(MemoryError):
        opt.step(failing)
    assert torch.equal(flat(model), at_rest)
    assert all(p.grad is None for p in model.parameters())
    opt.state_dict()  # usable again
    opt.step(closure_for(model, x, y))
    assert opt.param_groups[0]["step"] == 2
    opt.sample()
    opt.abort()  # the same by hand, for the phase API
    assert torch.equal(flat(model), torch.cat([opt.state[p]["mean"].flatten() for p in model.parameters()]))


def test_weights_assigned_through_data_are_used():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model, num_data=1e30, lr=0.0, rho=0.0)
    opt.step(closure_for(model, x, y))
    model[0].weight.data = torch.ones_like(model[0].weight)  # a new storage: the version counter stays
    opt.step(closure_for(model, x, y))
    assert torch.equal(opt.state[model[0].weight]["mean"], torch.ones_like(model[0].weight))


def test_zeroing_gradients_inside_a_split_step_loses_nothing():
    """The habit of other SAM libraries, zero_grad() in the closure: the optimizer keeps the sums
    over sub-batches outside .grad, so the step is the same as without it."""
    finals = []
    for zero in (True, False):
        model = small_mlp()
        x, y = data()
        opt = sambayes.BSAM(model, num_data=10, seed=0)
        chunks = sambayes.split_batch(x, y, splits=2)

        def closure(j, zero=zero, model=model, opt=opt, chunks=chunks):
            if zero:
                opt.zero_grad()
            loss = F.cross_entropy(model(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure, splits=2)
        finals.append(flat(model))
    assert torch.equal(finals[0], finals[1])


@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_zeroing_gradients_before_backward_with_an_unused_parameter(method):
    """zero_grad() at the top of the closure (Lightning's closure does it before each backward
    pass) leaves an unused parameter's .grad None: it got no gradient, which is no error; the
    step equals the one without zero_grad() and the unused parameter stays where it was."""
    finals = []
    for zero in (True, False):
        model, unused = small_mlp(), torch.nn.Linear(2, 2)
        before = flat(unused)
        x, y = data()
        both = torch.nn.ModuleList([model, unused])
        opt = sambayes.BSAM(both, num_data=10, seed=0) if method == "bsam" else sambayes.SAM(both, lr=0.1)
        chunks = sambayes.split_batch(x, y, splits=2)

        def closure(j, zero=zero, model=model, opt=opt, chunks=chunks):
            if zero:
                opt.zero_grad()
            loss = F.cross_entropy(model(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure, splits=2)
        assert torch.equal(flat(unused), before)
        assert unused.weight.grad is not None and not unused.weight.grad.any()  # its buffer is back, zero
        finals.append(flat(model))
    assert torch.equal(finals[0], finals[1])


def test_gradients_set_to_none_between_phases_are_an_error():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model, num_data=10, seed=0)
    opt.sample()
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad()  # the noisy pass's gradients are gone before perturb() could read them
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.perturb()
    opt.abort()
    assert torch.equal(flat(model), torch.cat([opt.state[p]["mean"].flatten() for p in model.parameters()]))


def test_numpy_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    opt = sambayes.BSAM(P, num_data=np.int64(1000), lr=np.float32(0.1))
    assert opt.param_groups[0]["num_data"] == 1000
