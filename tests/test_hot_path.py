"""The real step at kernel speed: no host synchronisation in a steady-state step, gradients and
launch tables that stay put, skipping decided on the device, the GradScaler handled in the kernels."""

import contextlib
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS, DEVICE

import sambayes

#: every backend that decides on the device (the eager backend, the spec, decides on the host)
DEVICE_SIDE = [b for b in AVAILABLE_BACKENDS if b != "eager"]
HOST_READS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")


@contextlib.contextmanager
def no_host_reads():
    """Tensor.item, __bool__, __float__, __int__, tolist and numpy raise: a host read of a tensor's
    value is what synchronises the host with a GPU. Triton's interpreter, which stands in for the GPU
    on the CPU, may still read its own tensors."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refusing(name):
        original = saved[name]

        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "triton" in caller and "interpreter" in caller:
                return original(self, *args, **kwargs)
            raise AssertionError(f"host read: Tensor.{name} at {caller}:{sys._getframe(1).f_lineno}")

        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, refusing(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(DEVICE)


def make(kind, model, backend):
    if kind == "bsam":
        return sambayes.BSAM(model, num_data=100, seed=0, backend=backend)
    return sambayes.SAM(model.parameters(), lr=0.1, base="sgd" if kind == "sam" else "adamw", backend=backend)


def train(model, opt, steps, *, splits=1, scaler=None, poison=None, set_to_none=False):
    """``steps`` steps on fixed data; ``poison`` = (step, closure call) that returns an inf loss."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g).to(DEVICE), torch.randint(0, 3, (8,), generator=g).to(DEVICE)
    chunks = sambayes.split_batch(x, y, splits=splits)
    for step in range(steps):
        calls = iter(range(2 * splits))

        def closure(j=0, step=step, calls=calls):
            call = next(calls)
            loss = F.cross_entropy(model(chunks[j][0]), chunks[j][1])
            if poison == (step, call):
                loss = loss * float("inf")
            (scaler.scale(loss) if scaler else loss).backward()
            return loss

        opt.step(closure, splits=splits, grad_scaler=scaler)
        if scaler:
            scaler.update()
        if set_to_none:
            opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backend", DEVICE_SIDE)
@pytest.mark.parametrize("kind", ["bsam", "sam", "adamw"])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "grad-scaler"])
@pytest.mark.parametrize("splits", [1, 2])
def test_a_steady_step_makes_no_host_read(backend, kind, scaled, splits):
    model = mlp()
    opt = make(kind, model, backend)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=4.0) if scaled else None
    train(model, opt, 2, splits=splits, scaler=scaler)  # warm-up: state, buffers, tables
    with no_host_reads():
        train(model, opt, 3, splits=splits, scaler=scaler)


def test_the_eager_backend_decides_on_the_host():
    """The test above can fail: the eager backend (the spec) reads the flag on the host."""
    model = mlp()
    opt = make("bsam", model, "eager")
    train(model, opt, 1)
    with pytest.raises(AssertionError, match="host read"), no_host_reads():
        train(model, opt, 1)


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


@pytest.mark.skipif("triton" not in AVAILABLE_BACKENDS, reason="the triton backend is not available here")
@pytest.mark.parametrize("splits", [1, 2])
def test_launch_tables_are_built_once(splits):
    """100 steps, .grad set to None between them: the number of cached Triton tables stays constant."""
    from sambayes.kernels import _multi_tensor

    model = mlp()
    opt = make("bsam", model, "triton")
    train(model, opt, 2, splits=splits, set_to_none=True)
    tables = _multi_tensor.cached_tables()
    train(model, opt, 100, splits=splits, set_to_none=True)
    assert _multi_tensor.cached_tables() == tables


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("kind", ["bsam", "sam", "adamw"])
@pytest.mark.parametrize("call", [0, 1, 2, 3], ids=["noisy-0", "perturbed-0", "noisy-1", "perturbed-1"])
def test_a_nonfinite_gradient_skips_the_step_untouched(backend, kind, call):
    """An inf in either pass of either sub-batch: state, parameters and counters as if the step
    never happened, except the skipped count; the warning comes once the count reaches the host."""
    model, reference = mlp(), mlp()
    opt, ref_opt = make(kind, model, backend), make(kind, reference, backend)
    train(model, opt, 2, splits=2)
    train(reference, ref_opt, 2, splits=2)

    def skipped_step():
        train(model, opt, 1, splits=2, poison=(0, call))
        return opt.skipped_steps  # waits for the count: the warning has come by now on any device

    with pytest.warns(RuntimeWarning, match="step skipped"):
        skipped_step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    assert opt.skipped_steps == 1 and int(opt.param_groups[0]["step"]) == 2
    assert opt.param_groups[0]["attempts"] == 3  # the noise moves on: a skipped step is an attempt


@pytest.mark.parametrize("backend", DEVICE_SIDE)
@pytest.mark.parametrize("call", [0, 1], ids=["noisy", "perturbed"])
def test_the_grad_scaler_backs_off_without_unscale(backend, call):
    """The kernels unscale and flag; scaler.update() sees the flag and halves the scale, state untouched."""
    model = mlp()
    opt = make("bsam", model, backend)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10)
    train(model, opt, 1, scaler=scaler)
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a scaler, skipped steps are its calibration: no warning
        train(model, opt, 1, scaler=scaler, poison=(0, call))
    assert scaler.get_scale() == 2.0**9
    for key, value in state.items():
        assert torch.equal(opt.state[next(model.parameters())][key], value)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_scaled_and_unscaled_runs_agree(backend):
    """A power-of-two scale unscales exactly: the same trajectory bit for bit."""
    runs = []
    for scaled in (False, True):
        model = mlp()
        opt = make("bsam", model, backend)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12, growth_interval=2) if scaled else None
        train(model, opt, 6, splits=2, scaler=scaler)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_old_checkpoints_load_and_the_noise_continues():
    """A checkpoint with plain step / skipped_steps counts (no attempts): the noise seed counts their sum."""
    model = mlp()
    opt = make("bsam", model, "auto")
    train(model, opt, 2)
    train(model, opt, 1, poison=(0, 0))  # one skipped step
    checkpoint = opt.state_dict()
    group = checkpoint["param_groups"][0]
    assert (group["step"], group["skipped_steps"], group.pop("attempts")) == (2, 1, 3)  # an old one had none
    resumed_model = mlp()
    resumed_model.load_state_dict(model.state_dict())
    resumed = make("bsam", resumed_model, "auto")
    resumed.load_state_dict(checkpoint)
    assert resumed.param_groups[0]["attempts"] == 3
    train(model, opt, 2)
    train(resumed_model, resumed, 2)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in AVAILABLE_BACKENDS])
@pytest.mark.parametrize("kind", ["bsam", "sam", "adamw"])
def test_no_sync_under_cuda_sync_debug_mode(backend, kind):
    """On a GPU: a steady step makes no synchronizing CUDA call at all."""
    model = mlp()
    opt = make(kind, model, backend)
    scaler = torch.amp.GradScaler("cuda", init_scale=4.0)
    train(model, opt, 2, splits=2, scaler=scaler)
    torch.cuda.set_sync_debug_mode("error")
    try:
        train(model, opt, 3, splits=2, scaler=scaler)
    finally:
        torch.cuda.set_sync_debug_mode(0)
