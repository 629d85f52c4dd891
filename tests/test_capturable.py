"""capturable=True: the step's changing scalars (noise and rounding seeds, a tensor lr) are read
from device memory and nothing goes to the host, so that a whole step can be captured in a CUDA
graph. On the CPU: the seed hash on the device equals the host's, every backend takes its step
scalars as tensors with the same results, and capturable steps equal plain ones. On a GPU: a
captured step, replayed, equals steps taken one by one. A capturable checkpoint's resumed run is in
test_checkpoints.py."""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS, DEVICE
from harness import BLOCK, flag, inv_scale, module, nan_like, normal, offsets_of, positive
from test_hot_path import mlp, no_host_reads, train

import sambayes
from sambayes import _philox, backends

#: words at the edges of 64 bits: the hash must wrap exactly as the host's arithmetic modulo 2^64
EDGES = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def test_the_seed_hash_on_the_device_equals_the_hosts():
    rng = random.Random(0)
    cases = [(seed, group, step, split) for seed in EDGES for group in (0, 3) for step in EDGES[:7] for split in EDGES]
    cases += [(rng.getrandbits(64), rng.getrandbits(8), rng.getrandbits(63), rng.getrandbits(64)) for _ in range(300)]
    for seed, group, step, split in cases:
        on_device = _philox.noise_seed_on_device(seed, group, torch.tensor(step, device=DEVICE), split)
        assert on_device.dtype == torch.int64 and on_device.device.type == torch.device(DEVICE).type
        assert int(on_device) == _philox.noise_seed(seed, group, step, split), (seed, group, step, split)


# ---- every backend takes its step scalars as device tensors -------------------------------------
#: the seed and lr of the tests below: the seed's high word matters (>= 2^32)
SEED, LR = 2**40 + 12345, 0.037
SIZES = [7, BLOCK + 1, 1]


def on_device(value, dtype):
    return torch.tensor(value, dtype=dtype, device=DEVICE)


def lr_tolerance(backend):
    # foreach folds a number lr into one addcdiv/add(alpha) op, a tensor lr into a multiply and a subtract
    return (1e-6, 1e-6) if backend == "foreach" else (0.0, 0.0)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("stored", [None, torch.bfloat16], ids=["", "bf16state"])
def test_sample_reads_the_seed_from_a_tensor(backend, stored):
    means = normal(SIZES, torch.float32)
    precisions = [p.to(stored) if stored else p for p in positive(SIZES, torch.float32)]
    by_value, by_tensor = nan_like(means), nan_like(means)  # poisoned: every element must be written
    offsets = offsets_of(SIZES)
    module(backend).bsam_sample(by_value, means, precisions, offsets, num_data=50.0, seed=SEED)
    module(backend).bsam_sample(by_tensor, means, precisions, offsets, num_data=50.0, seed=on_device(SEED, torch.int64))
    for a, b in zip(by_tensor, by_value):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("stored", [None, torch.bfloat16], ids=["", "bf16state"])
def test_the_bsam_update_reads_lr_and_seed_from_tensors(backend, dtype, stored):
    torch.manual_seed(1)
    grads, means = normal(SIZES, dtype), normal(SIZES, torch.float32)
    precisions = [p.to(stored) if stored else p for p in positive(SIZES, torch.float32)]
    momentums = [m.to(stored) if stored else m for m in normal(SIZES, torch.float32)]
    curvature_sums = positive(SIZES, torch.float32)
    runs = []
    for lr, seed in ((LR, SEED), (on_device(LR, torch.float64), on_device(SEED, torch.int64))):
        state = [[t.clone() for t in ts] for ts in (grads, means, precisions, momentums)]
        params = nan_like(grads)
        module(backend).bsam_update(
            params, *state, curvature_sums, offsets_of(SIZES), flag(), inv_scale(),
            lr=lr, beta1=0.9, beta2=0.999, weight_decay=1e-3, damping=0.1, splits=2, seed=seed,
        )  # fmt: skip
        runs.append([params, *state])
    atol, rtol = lr_tolerance(backend)
    for name, by_value, by_tensor in zip(("params", "grads", "means", "precisions", "momentums"), *runs):
        for a, b in zip(by_tensor, by_value):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=False, msg=name)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_the_sam_updates_read_lr_from_a_tensor(backend, base):
    torch.manual_seed(2)
    grads, weights, momentums = (normal(SIZES, torch.float32) for _ in range(3))
    variances = positive(SIZES, torch.float32)
    runs = []
    for lr in (LR, on_device(LR, torch.float64)):
        state = [[t.clone() for t in ts] for ts in (grads, weights, momentums, variances)]
        params = nan_like(grads)
        if base == "sgd":
            module(backend).sam_update_sgd(
                params, *state[:3], flag(), inv_scale(),
                lr=lr, momentum=0.9, weight_decay=1e-3, nesterov=True, splits=2,
            )  # fmt: skip
        else:
            module(backend).sam_update_adamw(
                params, *state, flag(), inv_scale(), on_device(3.0, torch.float64),
                lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, splits=2,
            )  # fmt: skip
        runs.append([params, *state])
    atol, rtol = lr_tolerance(backend)
    for by_value, by_tensor in zip(*runs):
        for a, b in zip(by_tensor, by_value):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=False)


# ---- the optimizers ------------------------------------------------------------------------------
def make(kind, model, backend, capturable, lr=None, **kw):
    if kind == "bsam":
        return sambayes.BSAM(
            model, num_data=100, lr=0.05 if lr is None else lr, seed=2**63 + 5, backend=backend,
            capturable=capturable, **kw,
        )  # fmt: skip
    base = "sgd" if kind == "sam" else "adamw"
    return sambayes.SAM(
        model.parameters(), lr=0.1 if lr is None else lr, base=base, backend=backend, capturable=capturable
    )


def skip_warnings(caught):
    # (Triton's interpreter warns of its own on the inf's NaNs)
    return [w for w in caught if "step skipped" in str(w.message)]


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("kind", ["bsam", "bsam-bf16", "sam", "adamw"])
def test_capturable_steps_equal_plain_ones(backend, kind):
    """Four steps of two sub-batches, the third skipped for an inf: the same weights, state and
    counters with the seeds hashed on the device and a tensor lr (foreach: to the rounding of lr)."""
    extra = {"state_dtype": torch.bfloat16} if kind == "bsam-bf16" else {}
    kind = kind.split("-")[0]
    runs = []
    for capturable in (False, True):
        model = mlp()
        lr = on_device(0.05, torch.float64) if capturable else 0.05
        opt = make(kind, model, backend, capturable, lr=lr, **extra)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, opt, 4, splits=2, poison=(2, 0))
        # capturable: nothing reaches the host during the steps, the warning comes when the count is read
        assert len(skip_warnings(caught)) == (0 if capturable else 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert opt.skipped_steps == 1
        assert len(skip_warnings(caught)) == (1 if capturable else 0)
        runs.append((weights(model), opt.state_dict()))
    (plain, plain_state), (captured, captured_state) = runs
    atol, rtol = lr_tolerance(backend)
    for a, b in zip(captured, plain):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    for group, other in zip(captured_state["param_groups"], plain_state["param_groups"]):
        assert (group["step"], group["skipped_steps"], group["attempts"]) == (3, 1, 4)
        assert (other["step"], other["skipped_steps"], other["attempts"]) == (3, 1, 4)


@pytest.mark.parametrize("backend", [b for b in AVAILABLE_BACKENDS if b != "eager"])
@pytest.mark.parametrize("kind", ["bsam", "bsam-bf16", "sam", "adamw"])
def test_a_capturable_step_makes_no_host_read(backend, kind):
    extra = {"state_dtype": torch.bfloat16} if kind == "bsam-bf16" else {}
    model = mlp()
    opt = make(kind.split("-")[0], model, backend, True, lr=on_device(0.05, torch.float64), **extra)
    train(model, opt, 2, splits=2)  # warm-up: state, buffers, tables
    with no_host_reads():
        train(model, opt, 3, splits=2, poison=(1, 0))


@pytest.mark.parametrize("stored", [None, torch.bfloat16], ids=["", "bf16state"])
def test_the_seeds_follow_the_counters_on_the_device(stored):
    """What a graph replay sees: the host's attempt count is stale (here: wrong on purpose) and only
    the device's step counters move. The capturable noise and rounding follow the device's."""
    backend = "cpu" if "cpu" in AVAILABLE_BACKENDS else "foreach"
    runs = {}
    for capturable, tamper in ((True, False), (True, True), (False, False), (False, True)):
        model = mlp()
        opt = make("bsam", model, backend, capturable, state_dtype=stored)
        for _ in range(3):
            train(model, opt, 1, splits=2)
            if tamper:
                opt.param_groups[0]["attempts"] = 1000
        runs[capturable, tamper] = weights(model)
    assert all(torch.equal(a, b) for a, b in zip(runs[True, True], runs[True, False]))
    assert all(torch.equal(a, b) for a, b in zip(runs[True, False], runs[False, False]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[False, True], runs[False, False]))  # the test can fail


@pytest.mark.parametrize("kind", ["bsam", "adamw"])
def test_a_scheduler_drives_a_tensor_lr_on_the_device(kind):
    """torch's LR schedulers fill a tensor lr in place: the kernels read each step's value."""
    backend = "cpu" if "cpu" in AVAILABLE_BACKENDS else "foreach"
    runs = []
    for lr in (0.05, on_device(0.05, torch.float64)):
        model = mlp()
        opt = make(kind, model, backend, isinstance(lr, torch.Tensor), lr=lr)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):  # the same batch each step
            train(model, opt, 1, splits=2)
            scheduler.step()
        runs.append(weights(model))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], weights(mlp())))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_capturable_is_checked_and_pickled():
    with pytest.raises(ValueError, match="capturable"):
        make("bsam", mlp(), "auto", "yes")
    opt = make("sam", mlp(), "auto", True)
    assert opt.capturable and opt.__getstate__()["capturable"]


# ---- on a GPU: a captured step replays -----------------------------------------------------------
def steps_or_replays(backend, kind, captured, between=lambda: None):
    """Three warm-up steps on a side stream, then five steps (the lr tensor halved before each):
    taken one by one, or one step captured in a CUDA graph and replayed five times, ``between()``
    called after the capture. The weights and the optimizer's state_dict after."""
    extra = {"state_dtype": torch.bfloat16} if kind == "bsam-bf16" else {}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g).cuda(), torch.randint(0, 3, (8,), generator=g).cuda()
    model = mlp().cuda()
    lr = torch.tensor(0.05, dtype=torch.float64, device="cuda")
    opt = make(kind.split("-")[0], model, backend, True, lr=lr, **extra)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for _ in range(3):
            opt.step(closure)
    torch.cuda.current_stream().wait_stream(side)
    if captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step(closure)
        between()
    for _ in range(5):
        lr.mul_(0.5)
        graph.replay() if captured else opt.step(closure)
    torch.cuda.synchronize()
    return weights(model), opt.state_dict()


def assert_same_run(got, want):
    (got_weights, got_state), (want_weights, want_state) = got, want
    for a, b in zip(got_weights, want_weights):
        assert torch.equal(a, b)
    for pid, state in got_state["state"].items():
        for key, value in state.items():
            assert torch.equal(value, want_state["state"][pid][key]), key
    assert got_state["param_groups"][0]["step"] == want_state["param_groups"][0]["step"] == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA graphs")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda", "foreach") if b in AVAILABLE_BACKENDS])
@pytest.mark.parametrize("kind", ["bsam", "bsam-bf16", "sam", "adamw"])
def test_a_captured_step_replays_as_steps_taken_one_by_one(backend, kind):
    """One step captured and replayed five times equals five steps taken one by one: the noise and
    rounding of each replay follow the step counters on the device."""
    assert_same_run(steps_or_replays(backend, kind, True), steps_or_replays(backend, kind, False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA graphs")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in AVAILABLE_BACKENDS])
def test_a_captured_step_replays_after_the_table_cache_has_cycled(backend):
    """Between the capture and the replays, 300 other lists of tensors pass through the backend's
    launch-table cache (it keeps 256): the tables the graph launches with are held, not freed and
    reused, so the replays still equal steps taken one by one."""
    module = backends.resolve(backend, "cuda")
    others = [([torch.zeros(3, device="cuda")], [torch.ones(3, device="cuda")]) for _ in range(300)]

    def cycle():
        for params, weights_ in others:
            module.restore(params, weights_)

    assert_same_run(steps_or_replays(backend, "bsam", True, cycle), steps_or_replays(backend, "bsam", False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA graphs")
@pytest.mark.parametrize("capturable, backend", [(False, "auto"), (True, "eager")], ids=["not-capturable", "eager"])
def test_a_capture_that_would_replay_wrongly_is_refused(capturable, backend):
    """capturable=False would replay one step's noise forever; the eager backend reads the flag on the host."""
    model = mlp().cuda()
    opt = make("bsam", model, backend, capturable)
    x, y = torch.randn(8, 5, device="cuda"), torch.randint(0, 3, (8,), device="cuda")

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    torch.cuda.synchronize()
    match = "capturable=True" if not capturable else "eager"
    with pytest.raises(RuntimeError, match=match), torch.cuda.graph(torch.cuda.CUDAGraph()):
        opt.step(closure)
