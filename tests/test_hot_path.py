"""The real step at kernel speed (sambayes/_step.py's device scalars, the backends' launch tables): no
host synchronisation in a steady-state step, with or without a GradScaler, on any backend that
decides on the device; launch tables built once. Its helpers (mlp, make, train) serve
test_ledger.py, test_checkpoints.py, test_skipping.py and test_capturable.py, where the skipping,
GradScaler, gradient-storage and checkpoint tests of the real step are."""

import contextlib
import sys

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


@pytest.mark.slow
@pytest.mark.skipif("triton" not in AVAILABLE_BACKENDS, reason="the triton backend is not available here")
@pytest.mark.parametrize("splits", [1, 2])
def test_launch_tables_are_built_once(splits):
    """20 steps, .grad set to None between them: the number of cached Triton tables stays constant (a table
    built per step would add a few each step, far below the cache's 256)."""
    from sambayes.kernels import _multi_tensor

    model = mlp()
    opt = make("bsam", model, "triton")
    train(model, opt, 2, splits=splits, set_to_none=True)
    tables = _multi_tensor.cached_tables()
    train(model, opt, 20, splits=splits, set_to_none=True)
    assert _multi_tensor.cached_tables() == tables


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
