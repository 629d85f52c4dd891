"""Skipping a step for a non-finite gradient (sambayes/_progress.py: the counters and the skip report,
decided on the device), and the GradScaler (sambayes/_amp.py, its one adapter).

A non-finite gradient in either pass skips the step with the state untouched and warns (without a
GradScaler: with one, skipped steps are its calibration and ``scaler.update()`` backs off); a large
but finite float16 norm is not skipped; the kernels unscale, so scaled and unscaled runs agree; the
GradScaler through the closure API, the phase API, clipping, ``scaler.step(optimizer, closure)``;
and the private state of ``torch.amp.GradScaler`` that the adapter relies on, checked against the
PyTorch installed.
"""

import importlib.metadata
import re
import warnings

import pytest
import test_training
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS, DEVICE
from harness import cross_entropy_closure, data, flat, linear, small_mlp
from test_hot_path import DEVICE_SIDE, make, mlp, train

import sambayes
from sambayes import _amp

# ---- a non-finite gradient skips the step --------------------------------------------------------


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
    opt.step(cross_entropy_closure(model, x, y))
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
    opt.step(cross_entropy_closure(model, x, y))  # and training goes on
    assert group["step"] == 2 and torch.isfinite(flat(model)).all()


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


# ---- the GradScaler ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_grad_scaler_is_exact_and_skips_on_inf(method):
    x, y = test_training.batch()
    plain_model, scaled_model = test_training.mlp(), test_training.mlp()
    plain, scaled = test_training.make(method, plain_model), test_training.make(method, scaled_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)

    def closure_for(model, scale_by=None, poison_call=None):
        calls = []

        def closure():
            loss = F.cross_entropy(model(x), y)
            if len(calls) == poison_call:
                loss = loss * float("inf")
            calls.append(1)
            (scale_by.scale(loss) if scale_by else loss).backward()
            return loss

        return closure

    for _ in range(3):
        plain.step(closure_for(plain_model))
        scaled.step(closure_for(scaled_model, scaler), grad_scaler=scaler)
        scaler.update()
    # scaling by a power of two and unscaling once per pass is exact
    assert torch.equal(flat(plain_model), flat(scaled_model))
    assert scaler.get_scale() == 2.0**13  # grew after two clean steps

    for bad_pass in (0, 1):
        before = flat(scaled_model)
        scale = scaler.get_scale()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a scaler's skipped steps are its calibration: no warning
            scaled.step(closure_for(scaled_model, scaler, poison_call=bad_pass), grad_scaler=scaler)
        scaler.update()
        assert scaler.get_scale() == scale / 2  # backed off, as PyTorch would
        assert torch.equal(flat(scaled_model), before)
    assert scaled.param_groups[0]["skipped_steps"] == 2


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


def test_grad_scaler_with_the_phase_api():
    x, y = test_training.batch()
    model = test_training.mlp()
    opt = sambayes.BSAM(model, num_data=100, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    reference_model = test_training.mlp()
    reference = sambayes.BSAM(reference_model, num_data=100, seed=1)
    for _ in range(2):
        for xb, yb in sambayes.split_batch(x, y, splits=2):
            opt.sample()
            scaler.scale(F.cross_entropy(model(xb), yb)).backward()
            opt.perturb(grad_scaler=scaler)
            scaler.scale(F.cross_entropy(model(xb), yb)).backward()
        opt.update(grad_scaler=scaler)
        scaler.update()
        chunks = sambayes.split_batch(x, y, splits=2)

        def closure(j):
            loss = F.cross_entropy(reference_model(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

        reference.step(closure, splits=2)
    assert torch.equal(flat(model), flat(reference_model))


def test_update_with_a_scaler_and_no_gradient_at_all():
    """No parameter got a gradient: the step changes nothing, and scaler.update() still has its flag."""
    m, _ = linear()
    opt = sambayes.BSAM(m, num_data=10, seed=0)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=8.0)
    scaler.scale(torch.ones((), device=DEVICE))  # the scale exists, as after any scaled backward
    weights = [p.detach().clone() for p in m.parameters()]
    opt.sample()
    with pytest.warns(RuntimeWarning, match="gave no parameter a gradient"):
        opt.perturb(grad_scaler=scaler)
    with pytest.warns(RuntimeWarning, match="gave no parameter a gradient"):
        opt.update(grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 8.0
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), weights))


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


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast + GradScaler on CUDA needs a GPU")
@pytest.mark.parametrize("method", ["bsam", "sam"])
def test_float16_autocast_with_grad_scaler_on_cuda(method):
    x, y = (t.cuda() for t in test_training.batch())
    finals = {}
    for amp in (False, True):
        model = test_training.mlp().cuda()
        opt = test_training.make(method, model)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)

        def closure():
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss

        losses = []
        for _ in range(30):
            losses.append(opt.step(closure, grad_scaler=scaler if amp else None).item())
            scaler.update()
        assert losses[-1] < losses[0] - 0.1
        finals[amp] = flat(model)
    torch.testing.assert_close(finals[True], finals[False], rtol=0, atol=0.05)


# ---- the GradScaler's private state, as sambayes/_amp.py reads and writes it --------------------
#: the one OptState value the adapter sets
STEPPED = torch.amp.grad_scaler.OptState.STEPPED


def test_the_installed_torch_is_one_sambayes_supports():
    """The tests below pin sambayes/_amp.py's use of GradScaler's private state (``_scale``,
    ``_per_optimizer_states``, ``OptState.STEPPED``) to the PyTorch installed, which must be one of
    the versions the package declares (setup.py's install_requires): run on each of them."""
    try:
        requires = importlib.metadata.requires("sambayes") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sambayes is not installed: no declared torch requirement to read")
    declared = [r for r in requires if re.match(r"torch\s*>=", r)]
    assert declared, requires
    minimum = declared[0].split(">=")[1].split(",")[0].strip()
    assert torch.__version__ >= minimum, f"torch {torch.__version__} is older than the supported {declared[0]}"


def test_the_grad_scaler_holds_its_scale_where_the_adapter_reads_it():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scaler._scale is None  # created by the first scale(): the adapter says so
    with pytest.raises(RuntimeError, match="no scale yet"):
        _amp.inv_scale(scaler, [torch.device("cpu")])
    model = small_mlp()
    x, y = data()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    assert isinstance(scaler._scale, torch.Tensor) and scaler._scale.dtype == torch.float32
    assert scaler._scale.numel() == 1 and scaler._scale.item() == 2.0**10
    inv = _amp.inv_scale(scaler, [torch.device("cpu")])
    assert list(inv) == [torch.device("cpu")] and inv[torch.device("cpu")].item() == 2.0**-10
    # the adapter indexes the per-optimizer states by id(optimizer): a fresh one (READY, no flags) on first use
    opt = sambayes.BSAM(model, num_data=100, seed=0)
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"] is torch.amp.grad_scaler.OptState.READY and state["found_inf_per_device"] == {}


@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "inf"])
def test_the_grad_scaler_backs_off_on_the_flag_the_adapter_hands_it(poisoned):
    """After opt.step(closure, grad_scaler=scaler) the scaler's state for the optimizer is STEPPED with
    the step's found-inf flag, as its own unscale_ and step would leave it: update() halves the
    scale after an inf, and keeps it after finite gradients."""
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model, num_data=100, seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def closure():
        loss = F.cross_entropy(model(x), y) * (float("inf") if poisoned else 1.0)
        scaler.scale(loss).backward()
        return loss

    opt.step(closure, grad_scaler=scaler)
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"] is STEPPED
    assert {device: flag.item() for device, flag in state["found_inf_per_device"].items()} == {
        torch.device("cpu"): float(poisoned)
    }
    scaler.update()
    assert scaler.get_scale() == (2.0**9 if poisoned else 2.0**10)
    assert opt.param_groups[0]["skipped_steps"] == int(poisoned)


def test_scaler_step_calls_the_optimizer_through_torchs_contract():
    """``scaler.step(opt, closure)``: torch sees ``_step_supports_amp_scaling`` and calls
    ``opt.step(closure, grad_scaler=scaler)`` (warning that it will stop passing itself, a
    FutureWarning): the same run, losses and scales as calling ``opt.step`` so, an inf step included.
    torch's step() asserts that the scale exists, which on a fresh scaler only a scale() call before
    the step makes so (the closure's scaled backward comes too late): refused, and no step begun."""
    model = small_mlp()
    fresh = torch.amp.GradScaler("cpu")
    opt = sambayes.BSAM(model, num_data=100, seed=0)
    with pytest.raises(AssertionError, match="_scale is None"):
        fresh.step(opt, cross_entropy_closure(model, *data()))
    assert opt.state_dict()["param_groups"][0]["step"] == 0  # at rest: a step in progress would raise
    runs = []
    for through_scaler in (False, True):
        model = small_mlp()
        x, y = data()
        opt = sambayes.BSAM(model, num_data=100, seed=0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        scaler.scale(torch.ones(()))  # the scale exists, as after any scaled backward
        losses, scales = [], []
        for step in range(4):

            def closure(step=step):
                loss = F.cross_entropy(model(x), y) * (float("inf") if step == 2 else 1.0)
                scaler.scale(loss).backward()
                return loss

            if through_scaler:  # (the closure positionally: torch refuses closure=... with a scaler)
                with pytest.warns(FutureWarning, match="GradScaler is going to stop passing itself"):
                    losses.append(scaler.step(opt, closure))
            else:
                losses.append(opt.step(closure, grad_scaler=scaler))
            scaler.update()
            scales.append(scaler.get_scale())
        assert opt.param_groups[0]["skipped_steps"] == 1
        runs.append((flat(model), torch.stack(losses), scales))
    (direct, direct_losses, direct_scales), (through, through_losses, through_scales) = runs
    assert direct_scales == through_scales == [2.0**11, 2.0**12, 2.0**11, 2.0**12]
    torch.testing.assert_close(through_losses, direct_losses, rtol=0, atol=0, equal_nan=True)  # NaN: the inf step
    assert torch.equal(through, direct)
