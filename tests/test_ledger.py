"""The parameter ledger, sambayes/_ledger.py: one slot per trainable parameter, its lazy state, its
gradient buffer and the version counters that tell the optimizer who wrote what.

Gradient buffers: the same storage across passes and steps, zeroed after a step, unused and frozen
parameters, ``.grad`` set to None, sparse gradients. Version counters: another optimizer's training
seen, a stale graph refused, weights assigned through ``.data`` or loaded between steps, a model cast
between steps.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS, DEVICE
from harness import cross_entropy_closure, data, flat, linear, small_mlp, square_closure
from test_hot_path import make, mlp, train

import sambayes

# ---- gradient buffers ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("splits", [1, 2])
def test_gradients_keep_their_storage(backend, splits):
    """.grad stays at one address across passes and steps, even when set to None between steps."""
    model = mlp()
    opt = make("bsam", model, backend)
    train(model, opt, 1, splits=splits)
    addresses = [p.grad.data_ptr() for p in model.parameters()]
    train(model, opt, 5, splits=splits, set_to_none=True)
    opt.sample()  # attaches the buffers again
    assert [p.grad.data_ptr() for p in model.parameters()] == addresses
    opt.abort()


def test_grad_is_zero_after_a_step():
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=10, seed=0)
    opt.step(square_closure(m, x))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m.parameters())


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


def test_frozen_and_unused_parameters_are_skipped():
    model = small_mlp()
    unused = torch.nn.Parameter(torch.ones(4))
    model[0].bias.requires_grad_(False)
    x, y = data()
    opt = sambayes.BSAM([*model.parameters(), unused], num_data=100, seed=0)
    frozen_before = model[0].bias.detach().clone()
    opt.step(cross_entropy_closure(model, x, y))
    assert torch.equal(model[0].bias, frozen_before) and model[0].bias not in opt.state
    assert torch.equal(unused.detach(), torch.ones(4))  # sampled, then back at its untouched mean
    assert torch.equal(opt.state[unused]["momentum"], torch.zeros(4))
    assert torch.equal(opt.state[unused]["precision"], torch.ones(4))


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


# ---- version counters: who wrote the weights -----------------------------------------------------


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_another_optimizers_training_is_seen(backend):
    """Two optimizers take turns on one model: a's posterior samples must not revert b's training."""
    m, x = linear()
    a = sambayes.BSAM(m, num_data=100, seed=0, backend=backend)
    for _ in range(3):
        a.step(square_closure(m, x))
    b = sambayes.BSAM(m, num_data=100, seed=1, backend=backend)
    for _ in range(3):
        b.step(square_closure(m, x))
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
    opt.step(square_closure(m, x))
    loss = m(x).pow(2).mean()  # saves the last layer's weight: its input's gradient needs it
    opt.sample()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    opt.abort()


def test_weights_assigned_through_data_are_used():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model, num_data=1e30, lr=0.0, rho=0.0)
    opt.step(cross_entropy_closure(model, x, y))
    model[0].weight.data = torch.ones_like(model[0].weight)  # a new storage: the version counter stays
    opt.step(cross_entropy_closure(model, x, y))
    assert torch.equal(opt.state[model[0].weight]["mean"], torch.ones_like(model[0].weight))


def test_weights_loaded_into_the_model_between_steps_are_used():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model.parameters(), num_data=1e30, rho=0.0, lr=0.0)
    opt.step(cross_entropy_closure(model, x, y))
    new_weights = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new_weights)
    opt.step(cross_entropy_closure(model, x, y))  # lr = 0: the mean must simply be the loaded weights
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), new_weights[key])
        torch.testing.assert_close(opt.state[p]["mean"], new_weights[key])


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_a_model_cast_between_steps_keeps_training(backend):
    """model.double() between steps: the state and the sums over sub-batches follow the new dtype,
    and every backend goes on as eager does."""
    results = []
    for b in ("eager", backend):
        m, x = linear()
        opt = sambayes.BSAM(m, num_data=10, seed=0, backend=b)
        opt.step(square_closure(m, x), splits=2)
        m.double()
        x = x.double()
        for _ in range(2):
            opt.step(square_closure(m, x), splits=2)
        assert opt.state[m.weight]["mean"].dtype == torch.float64
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
