"""sambayes.IVON (sambayes/ivon.py) against its authors' code, ivon-opt 0.1.3, which the tests hand the spec's
noise: step for step in float64 on the eager backend, every other backend against eager; its API (ivon-opt's
training loop and closures, step(closure), the posterior for prediction), its hyperparameter checks, skipping
and the GradScaler, capturable steps, bfloat16 state, checkpoints and the loader of ivon-opt's state dicts.
DDP and FSDP2 are in test_replication.py, DCP checkpoints in test_checkpoints.py."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS, DEVICE
from test_hot_path import DEVICE_SIDE, no_host_reads

import sambayes
from sambayes import _philox

ivon = pytest.importorskip("ivon")

SEED = 7
#: the tolerance of requirement 2: float64, eager, step for step
EXACT = 1e-12


class SpecNoiseIVON(ivon.IVON):
    """ivon-opt's IVON drawing the spec's noise: its sampled_params calls torch.randn once per group, which
    returns z of sambayes's stream for that group, step and sample (ALGORITHM.md, "Noise")."""

    def __init__(self, *args, seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed, self.sample_index = seed, 0

    def _sample_params(self):
        noise = iter(
            [
                _philox.randn_range(_philox.noise_seed(self.seed, index, self.current_step, self.sample_index), 0, n)
                for index, n in enumerate(group["numel"] for group in self.param_groups)
            ]
        )
        self.sample_index += 1
        randn = torch.randn
        torch.randn = lambda numel, device=None, dtype=None: next(noise).to(device=device, dtype=dtype)
        try:
            return super()._sample_params()
        finally:
            torch.randn = randn

    def _update(self) -> None:
        super()._update()
        self.sample_index = 0


def mlp(dtype=torch.float64) -> torch.nn.Sequential:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(DEVICE, dtype)


def batch(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 5, generator=g).to(DEVICE, dtype), torch.randint(0, 3, (16,), generator=g).to(DEVICE)


def two_groups(model: torch.nn.Module, clip_radius: float) -> list[dict]:
    """Two groups of other hyperparameters: the second with its own lr, weight decay and a clipping radius."""
    return [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 0.05, "weight_decay": 1e-3, "clip_radius": clip_radius},
    ]


def closure_of(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def ivon_opt_step(opt, model, x, y, samples: int) -> None:
    """A step as ivon-opt's README trains."""
    for _ in range(samples):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
    opt.step()


def hessians(opt: sambayes.IVON, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = precision − δ, momentum) per group of ``opt``, flat, as ivon-opt keeps them."""
    h, g = [], []
    for group in opt.param_groups:
        h.append(torch.cat([opt.state[p]["precision"].flatten() - group["weight_decay"] for p in group["params"]]))
        g.append(torch.cat([opt.state[p]["momentum"].flatten() for p in group["params"]]))
    return h, g


def largest_difference(reference, ref_model, ours, our_model) -> float:
    """max |a − b| / max(1, |b|) over the parameters, each group's Hessian and momentum."""
    pairs = list(zip(our_model.parameters(), ref_model.parameters()))
    h, g = hessians(ours, our_model)
    pairs += [(h[i], group["hess"]) for i, group in enumerate(reference.param_groups)]
    pairs += [(g[i], group["momentum"]) for i, group in enumerate(reference.param_groups)]
    return max(((a - b).abs() / b.abs().clamp_min(1)).max().item() for a, b in pairs)


def run_against_ivon_opt(hess_approx, samples, debias, rescale_lr, *, style="closure", clip_radius=0.02, steps=8):
    """Both optimizers from the same weights on the same batch with an lr schedule; the largest difference
    after each step."""
    x, y = batch()
    ref_model, our_model = mlp(), mlp()
    hyper = dict(lr=0.1, ess=100, hess_init=0.5, weight_decay=1e-2, beta2=0.999, mc_samples=samples)
    hyper.update(hess_approx=hess_approx, debias=debias, rescale_lr=rescale_lr)
    reference = SpecNoiseIVON(two_groups(ref_model, clip_radius), seed=SEED, **hyper)
    ours = sambayes.IVON(two_groups(our_model, clip_radius), seed=SEED, backend="eager", **hyper)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)) for o in (reference, ours)]
    differences = []
    for _ in range(steps):
        ivon_opt_step(reference, ref_model, x, y, samples)
        if style == "closure":
            ours.step(closure_of(our_model, x, y))
        else:
            ivon_opt_step(ours, our_model, x, y, samples)
        for schedule in schedules:
            schedule.step()
        differences.append(largest_difference(reference, ref_model, ours, our_model))
    return differences, ref_model


#: every pair of values of two factors in one of four runs: the estimator, the samples, and debiasing with lr
#: rescaling (both on, or both off)
PAIRWISE = [("price", 1, True), ("price", 3, False), ("gradsq", 1, False), ("gradsq", 3, True)]


@pytest.mark.parametrize(
    "hess_approx,samples,debias", PAIRWISE, ids=[f"{h}-{k}-{'debiased' if d else 'raw'}" for h, k, d in PAIRWISE]
)
def test_equals_ivon_opt_step_for_step_in_float64(hess_approx, samples, debias):
    differences, _ = run_against_ivon_opt(hess_approx, samples, debias, debias)
    assert max(differences) < EXACT, differences


def test_the_clipping_acts_in_the_runs_against_ivon_opt():
    """Without the second group's radius ivon-opt's trajectory is another one: the runs above test clipping."""
    clipped = run_against_ivon_opt("price", 3, True, True)[1]
    unclipped = run_against_ivon_opt("price", 3, True, True, clip_radius=math.inf)[1]
    assert not torch.allclose(clipped[2].weight, unclipped[2].weight)


@pytest.mark.parametrize("samples", [1, 3])
def test_ivon_opts_training_loop_runs_unchanged(samples):
    """The README's loop (sampled_params(train=True), zero_grad, backward; step()) on sambayes.IVON."""
    differences, _ = run_against_ivon_opt("price", samples, True, True, style="loop", steps=4)
    assert max(differences) < EXACT, differences


@pytest.mark.parametrize("samples", [1, 2])
@pytest.mark.parametrize("backend", [b for b in AVAILABLE_BACKENDS if b != "eager"])
def test_every_backend_trains_as_eager(backend, samples):
    """float32, against the eager spec: the compiled noise agrees to a few ulps, the rest to float32 rounding."""
    x, y = batch(torch.float32)
    finals = []
    for name in ("eager", backend):
        model = mlp(torch.float32)
        opt = sambayes.IVON(two_groups(model, 0.5), lr=0.1, ess=100, mc_samples=samples, seed=SEED, backend=name)
        for _ in range(4):
            opt.step(closure_of(model, x, y))
        finals.append((torch.cat([p.detach().flatten() for p in model.parameters()]), hessians(opt, model)))
    (want, (want_h, want_g)), (got, (got_h, got_g)) = finals
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_h + got_g, want_h + want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- the API ------------------------------------------------------------------------------------------


def test_the_loop_the_closure_and_ivon_opts_closures_take_the_same_steps():
    """step(closure), the sampled_params(train=True) loop, and a closure that enters sampled_params(train=True)
    itself (as ivon-opt's closures must) draw the same samples and take the same steps, bit for bit."""
    x, y = batch()
    finals = []
    for style in ("closure", "loop", "ivon-opt closure"):
        model = mlp()
        opt = sambayes.IVON(model, lr=0.1, ess=100, mc_samples=2, seed=SEED, backend="eager")
        for _ in range(3):
            if style == "loop":
                ivon_opt_step(opt, model, x, y, 2)
            elif style == "closure":
                opt.step(closure_of(model, x, y))
            else:

                def closure(opt=opt, model=model):
                    with opt.sampled_params(train=True):
                        opt.zero_grad()
                        loss = F.cross_entropy(model(x), y)
                        loss.backward()
                    return loss

                opt.step(closure)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(finals[0], finals[1]) and torch.equal(finals[0], finals[2])


def test_the_model_holds_the_mean_outside_a_training_sample_and_a_sample_inside():
    x, y = batch()
    model = mlp()
    opt = sambayes.IVON(model, lr=0.1, ess=100, seed=SEED)
    opt.step(closure_of(model, x, y))
    mean = [opt.state[p]["mean"].clone() for p in model.parameters()]
    with opt.sampled_params(train=True):
        inside = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(x), y).backward()
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), mean))  # the mean again
    assert not any(torch.equal(p, m) for p, m in zip(inside, mean))  # a sample inside
    std = opt.posterior_std()
    for p, m, s in zip(inside, mean, std):  # within 6 σ of the mean, σ = 1/sqrt(ess·s)
        assert ((p - m).abs() <= 6 * s).all()
    opt.step()  # the update from that sample's gradient
    assert not any(torch.equal(p, m) for p, m in zip(model.parameters(), mean))
    with pytest.raises(RuntimeError, match="at rest"):
        opt.step()  # no sample since: nothing to update from


def test_a_failed_pass_in_a_training_sample_abandons_the_step():
    model = mlp()
    opt = sambayes.IVON(model, lr=0.1, ess=100, seed=SEED)
    mean = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="boom"), opt.sampled_params(train=True):
        raise ValueError("boom")
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), mean))
    opt.step(closure_of(model, *batch()))  # and training goes on


def test_posterior_samples_for_prediction():
    x, y = batch()
    model = mlp()
    opt = sambayes.IVON(model, lr=0.1, ess=100, seed=SEED)
    for _ in range(2):
        opt.step(closure_of(model, x, y))
    variance, std = opt.posterior_variance(), opt.posterior_std()
    for p, v, s in zip(model.parameters(), variance, std):
        state = opt.state[p]
        torch.testing.assert_close(v, 1 / (100 * state["precision"]))
        torch.testing.assert_close(s, torch.rsqrt(100 * state["precision"]))

    def sample(**kwargs):
        with opt.sampled_params(**kwargs):
            return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(sample(seed=3), sample(seed=3))  # a seed: the same sample
    assert not torch.equal(sample(seed=3), sample(seed=4))
    assert not torch.equal(sample(), sample())  # none: the next of a sequence, as ivon-opt's are fresh draws
    probs = sambayes.predict(model, opt, x, samples=4)
    assert probs.shape == (16, 3) and torch.allclose(probs.sum(-1), torch.ones(16, dtype=probs.dtype))
    assert not torch.allclose(probs, sambayes.predict(model, opt, x, samples=0))


def test_a_sequence_of_unseeded_posterior_samples_repeats_with_the_seed():
    draws = []
    for _ in range(2):
        model = mlp()
        opt = sambayes.IVON(model, lr=0.1, ess=100, seed=SEED)
        for _ in range(3):
            with opt.sampled_params():
                draws.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(draws[:3], draws[3:]))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(ess=0), "ess=0"),
        (dict(hess_init=0.0), "hess_init=0.0"),
        (dict(beta1=1.0), "beta1=1.0"),
        (dict(beta2=1.5), "beta2=1.5"),
        (dict(weight_decay=-1e-4), "weight_decay=-0.0001"),
        (dict(mc_samples=0), "mc_samples=0"),
        (dict(hess_approx="hutchinson"), "hess_approx='hutchinson'"),
        (dict(clip_radius=0.0), "clip_radius=0.0"),
        (dict(debias=None), "debias=None"),
        (dict(seed=-1), "seed=-1"),
        (dict(state_dtype=torch.float16), "state_dtype=torch.float16"),
    ],
)
def test_hyperparameters_are_checked(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        sambayes.IVON(mlp(torch.float32), **{"lr": 0.1, "ess": 100, **changes})


def test_the_arguments_and_defaults_are_ivon_opts():
    import inspect

    theirs = inspect.signature(ivon.IVON.__init__).parameters
    ours = inspect.signature(sambayes.IVON.__init__).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name
        assert list(ours).index(name) == list(theirs).index(name), name  # positional too


# ---- skipping, the GradScaler, capturable, bfloat16 state, no host reads -------------------------------


@pytest.mark.parametrize("samples,bad_sample", [(1, 0), (2, 1)], ids=["1-sample", "2-samples-last"])
@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_a_nonfinite_gradient_of_any_sample_skips_the_step(backend, samples, bad_sample):
    x, y = batch(torch.float32)
    model = mlp(torch.float32)
    opt = sambayes.IVON(model, lr=0.1, ess=100, mc_samples=samples, seed=SEED, backend=backend)
    opt.step(closure_of(model, x, y))
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    calls = []

    def poisoned():
        loss = F.cross_entropy(model(x), y) * (math.inf if len(calls) == bad_sample else 1.0)
        calls.append(1)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step(poisoned)
    assert opt.skipped_steps == 1
    for p in model.parameters():
        assert torch.equal(p, state[p]["mean"])
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[p].items())
    opt.step(closure_of(model, x, y))  # and the next step trains
    assert int(opt.param_groups[0]["step"]) == 2


@pytest.mark.parametrize("samples", [1, 2])
@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_a_grad_scaler_unscales_exactly_and_backs_off_on_inf(backend, samples):
    x, y = batch(torch.float32)
    runs = []
    for scaled in (False, True):
        model = mlp(torch.float32)
        opt = sambayes.IVON(
            model, lr=0.1, ess=100, mc_samples=samples, hess_approx="gradsq", seed=SEED, backend=backend
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None

        def closure(model=model, scaler=scaler):
            loss = F.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            return loss

        for _ in range(3):
            opt.step(closure, grad_scaler=scaler)
            if scaler:
                scaler.update()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])  # a power of two unscales exactly, gradsq's squares too

    def infinite():
        loss = F.cross_entropy(model(x), y) * math.inf
        scaler.scale(loss).backward()
        return loss

    before, scale = runs[1], scaler.get_scale()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scaler's skipped steps are its calibration: no warning
        opt.step(infinite, grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), before)


#: (samples, stored state dtype): one sample (no sums) in float32 state, two in bfloat16 state
SAMPLES_AND_STATE = [pytest.param(1, None, id="1-state"), pytest.param(2, torch.bfloat16, id="2-bf16state")]


@pytest.mark.parametrize("samples,stored", SAMPLES_AND_STATE)
@pytest.mark.parametrize("backend", [b for b in AVAILABLE_BACKENDS if b != "eager"])
def test_capturable_steps_equal_plain_ones(backend, samples, stored):
    """capturable=True: the seeds hashed on the device from the counters, a tensor lr; the same numbers (foreach
    folds a number lr into one add(alpha) op, a tensor lr into a multiply and a subtract: an ulp apart)."""
    x, y = batch(torch.float32)
    finals = []
    for capturable in (False, True):
        model = mlp(torch.float32)
        lr = torch.tensor(0.1, dtype=torch.float64, device=DEVICE) if capturable else 0.1
        opt = sambayes.IVON(
            model,
            lr=lr,
            ess=100,
            mc_samples=samples,
            seed=SEED,
            backend=backend,
            capturable=capturable,
            state_dtype=stored,
        )
        for _ in range(3):
            opt.step(closure_of(model, x, y))
        keys = ("mean", "precision", "momentum")
        finals.append([torch.cat([opt.state[p][k].float().flatten() for p in model.parameters()]) for k in keys])
    for a, b in zip(*finals):
        if backend == "foreach":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", DEVICE_SIDE)
def test_a_steady_step_reads_nothing_on_the_host(backend):
    x, y = batch(torch.float32)
    model = mlp(torch.float32)
    opt = sambayes.IVON(model, lr=0.1, ess=100, mc_samples=2, seed=SEED, backend=backend)
    opt.step(closure_of(model, x, y))
    opt.step(closure_of(model, x, y))
    with no_host_reads():
        opt.step(closure_of(model, x, y))


def test_bfloat16_state_keeps_8_bytes_and_follows_float32_state():
    x, y = batch(torch.float32)
    runs = []
    for stored in (None, torch.bfloat16):
        model = mlp(torch.float32)
        opt = sambayes.IVON(model, lr=0.05, ess=100, seed=SEED, state_dtype=stored)
        for _ in range(20):
            opt.step(closure_of(model, x, y))
        runs.append((torch.cat([p.detach().flatten() for p in model.parameters()]), opt))
    (plain, _), (lean, opt) = runs
    for state in opt.state.values():
        assert state["mean"].dtype == torch.float32
        assert state["precision"].dtype == state["momentum"].dtype == torch.bfloat16
    assert not torch.equal(plain, lean)
    torch.testing.assert_close(lean, plain, rtol=0, atol=2e-3)  # stochastic rounding of the state, not of m
    with pytest.raises(ValueError, match="float64"):
        sambayes.IVON(mlp(), lr=0.1, ess=100, state_dtype=torch.bfloat16)


# ---- checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("samples,stored", SAMPLES_AND_STATE)
@pytest.mark.parametrize("backend", [b for b in AVAILABLE_BACKENDS if b != "triton"])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(backend, samples, stored):
    x, y = batch(torch.float32)

    def make():
        model = mlp(torch.float32)
        opt = sambayes.IVON(model, lr=0.1, ess=100, mc_samples=samples, seed=SEED, backend=backend, state_dtype=stored)
        return model, opt

    model, opt = make()
    for _ in range(4):
        opt.step(closure_of(model, x, y))
    uninterrupted = [p.detach().clone() for p in model.parameters()], opt.state_dict()
    model, opt = make()
    for _ in range(2):
        opt.step(closure_of(model, x, y))
    saved = torch.load(_roundtrip(model.state_dict(), opt.state_dict()), weights_only=False)
    model, opt = make()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    for _ in range(2):
        opt.step(closure_of(model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), uninterrupted[0]))
    for pid, state in uninterrupted[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(opt.state_dict()["state"][pid][key], value), key
    assert opt.param_groups[0]["step"] == 4


def _roundtrip(*objects):
    import io

    buffer = io.BytesIO()
    torch.save(objects, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("samples", [1, 3])
def test_an_ivon_opt_state_dict_loads_and_training_goes_on_as_ivon_opts(samples):
    """ivon-opt trained 3 steps and saved; its state dict (with its current_step) loaded into sambayes.IVON
    over a copy of the model: the next steps of both agree to float64 rounding."""
    x, y = batch()
    ref_model, our_model = mlp(), mlp()
    hyper = dict(lr=0.1, ess=100, hess_init=0.5, weight_decay=1e-2, beta2=0.999, mc_samples=samples)
    reference = SpecNoiseIVON(two_groups(ref_model, 0.02), seed=SEED, **hyper)
    for _ in range(3):
        ivon_opt_step(reference, ref_model, x, y, samples)
    saved = dict(reference.state_dict(), current_step=reference.current_step)
    our_model.load_state_dict(ref_model.state_dict())
    ours = sambayes.IVON(
        two_groups(our_model, math.inf), lr=1.0, ess=1.0, seed=SEED, mc_samples=samples, backend="eager"
    )
    ours.load_state_dict(saved)
    assert ours.param_groups[1]["clip_radius"] == 0.02 and ours.param_groups[0]["lr"] == 0.1
    assert int(ours.param_groups[0]["step"]) == 3
    assert largest_difference(reference, ref_model, ours, our_model) < EXACT
    for _ in range(3):
        ivon_opt_step(reference, ref_model, x, y, samples)
        ours.step(closure_of(our_model, x, y))
    assert largest_difference(reference, ref_model, ours, our_model) < EXACT


def test_an_ivon_opt_state_dict_without_its_step_count_says_what_is_assumed():
    x, y = batch()
    model = mlp()
    reference = ivon.IVON(model.parameters(), lr=0.1, ess=100)
    fresh = reference.state_dict()
    ours = sambayes.IVON(mlp(), lr=0.1, ess=100, seed=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.load_state_dict(fresh)  # a zero momentum: taken as step 0, no warning
    assert int(ours.param_groups[0]["step"]) == 0
    ivon_opt_step(reference, model, x, y, 1)
    with pytest.warns(UserWarning, match=r"no current_step; its step count is taken as \d+"):
        ours.load_state_dict(reference.state_dict())
    assumed = int(ours.param_groups[0]["step"])
    assert 1 - 0.9**assumed == 1.0 and 1 - 0.9 ** (assumed - 1) != 1.0  # the first count where debiasing stops
    with opt_in_the_middle_of_a_step(reference, model, x, y), pytest.raises(ValueError, match="middle of a step"):
        ours.load_state_dict(reference.state_dict())


@contextlib.contextmanager
def opt_in_the_middle_of_a_step(reference, model, x, y):
    with reference.sampled_params(train=True):
        reference.zero_grad()
        F.cross_entropy(model(x), y).backward()
    yield
