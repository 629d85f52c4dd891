"""Checkpoints, sambayes/_checkpoint.py: ``state_dict`` and ``load_state_dict`` (checked whole before
anything changes, any backend, float32 masters and bfloat16 stored state kept, DTensor layouts), and
torch.distributed.checkpoint (DCP) with FSDP2.

Resuming: in a fresh process, across backends, across state dtypes, capturable, on the triton
backend, from an old checkpoint without ``attempts``; refusing: other shapes, another optimizer's
state dict, bad values, a BSAM dict given to SAM; a load in the middle of a step.

DCP (workers in tests/dist_workers.py): FSDP2 on two ranks (gloo, CPU) and
one process. A run is saved after K steps and resumed for K more, on another number of ranks; it
must end where the uninterrupted run ends. Every rank trains on the whole batch, so FSDP2's averaged
gradient is one process's bit for bit and bSAM's trajectory does not depend on the sharding: the
comparison is exact. SAM's ascent divides by the global gradient norm, which FSDP2 sums per shard and
then across ranks: its rounding depends on the sharding (with or without a checkpoint), so SAM's
resumed run is compared to float32 rounding, and its checkpoint itself exactly.
"""

import copy
import io
import subprocess
import sys
import textwrap
import warnings

import dist_workers
import pytest
import test_bf16_state
import test_capturable
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import AVAILABLE_BACKENDS, DEVICE
from harness import CPU_BACKENDS, cross_entropy_closure, data, flat, linear, small_mlp, square_closure
from test_hot_path import make, mlp, train

import sambayes
from sambayes import BSAM

BF16 = torch.bfloat16
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


# ---- resuming a run ------------------------------------------------------------------------------


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F, sambayes
    path, backend, method, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(torch.bfloat16)
    opt = (sambayes.BSAM(model.parameters(), num_data=50, lr=0.1, seed=123, backend=backend) if method == "bsam"
           else sambayes.IVON(model.parameters(), lr=0.1, ess=50, mc_samples=2, seed=123, backend=backend)
           if method == "ivon" else sambayes.SAM(model.parameters(), lr=0.1, base="adamw", backend=backend))
    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"])
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 5, generator=g).to(torch.bfloat16), torch.randint(0, 3, (16,), generator=g)
    def closure(j=0):
        loss = F.cross_entropy(model(x[j * 8:(j + 1) * 8]), y[j * 8:(j + 1) * 8]); loss.backward(); return loss
    for _ in range(steps):
        opt.step(closure) if method == "ivon" else opt.step(closure, splits=2)  # IVON: two samples
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    """
)


#: IVON in a fresh process once, on the fused CPU tier where it is here: test_ivon.py resumes it bit for bit on
#: every backend in one process; this adds only what a new process could change, which no backend owns
RESUMED = [(method, backend) for method in ("bsam", "sam") for backend in CPU_BACKENDS]
RESUMED.append(("ivon", "cpu" if "cpu" in CPU_BACKENDS else "eager"))


@pytest.mark.slow
@pytest.mark.parametrize("method,backend", RESUMED, ids=[f"{m}-{b}" for m, b in RESUMED])
def test_resume_in_fresh_process_is_bit_exact(tmp_path, backend, method):
    def make():
        model = small_mlp(torch.bfloat16)
        if method == "bsam":
            return model, sambayes.BSAM(model.parameters(), num_data=50, lr=0.1, seed=123, backend=backend)
        if method == "ivon":
            return model, sambayes.IVON(model.parameters(), lr=0.1, ess=50, mc_samples=2, seed=123, backend=backend)
        return model, sambayes.SAM(model.parameters(), lr=0.1, base="adamw", backend=backend)

    def step(opt, closure):
        opt.step(closure) if method == "ivon" else opt.step(closure, splits=2)  # IVON: two samples

    x, y = data()
    x = x.to(torch.bfloat16)

    def closure_j(model):
        def closure(j=0):
            loss = F.cross_entropy(model(x[j * 8 : (j + 1) * 8]), y[j * 8 : (j + 1) * 8])
            loss.backward()
            return loss

        return closure

    model, opt = make()
    for _ in range(6):
        step(opt, closure_j(model))
    uninterrupted_model, uninterrupted_opt = model.state_dict(), opt.state_dict()

    model, opt = make()
    for _ in range(3):
        step(opt, closure_j(model))
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
    opt.step(cross_entropy_closure(model, x, y))
    saved = copy.deepcopy(opt.state_dict())  # like torch.optim, state_dict() holds references
    other = sambayes.BSAM(model.parameters(), num_data=50, backend="foreach")
    other.load_state_dict(saved)
    assert other.param_groups[0]["seed"] == 5
    opt.step(cross_entropy_closure(model, x, y))
    expected = flat(model)
    other.load_state_dict(saved)  # puts the model back at the saved mean
    other.step(cross_entropy_closure(model, x, y))
    torch.testing.assert_close(flat(model), expected, rtol=1e-6, atol=1e-7)


def test_low_precision_state_survives_a_checkpoint():
    # torch.optim casts floating state to the parameter dtype on load; we keep float32 masters
    model = small_mlp(torch.bfloat16)
    x, y = data(dtype=torch.bfloat16)
    opt = sambayes.BSAM(model.parameters(), num_data=50)
    opt.step(cross_entropy_closure(model, x, y))
    fresh = sambayes.BSAM(model.parameters(), num_data=50)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        assert fresh.state[p]["mean"].dtype == torch.float32
        assert torch.equal(fresh.state[p]["mean"], opt.state[p]["mean"])


def test_a_resumed_run_with_bf16_state_equals_an_uninterrupted_one():
    net = test_bf16_state.make_net()
    opt = BSAM(net.parameters(), num_data=100, state_dtype=BF16, seed=9)
    test_bf16_state.train_steps(opt, net, 3)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    test_bf16_state.train_steps(opt, net, 3)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_net = test_bf16_state.make_net()
    resumed_net.load_state_dict(saved["model"])
    resumed = BSAM(resumed_net.parameters(), num_data=100, state_dtype=BF16, seed=0)
    resumed.load_state_dict(saved["opt"])
    test_bf16_state.train_steps(resumed, resumed_net, 3)
    for a, b in zip(opt.state.values(), resumed.state.values()):
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_checkpoints_load_across_state_dtypes():
    net = test_bf16_state.make_net()
    full = BSAM(net.parameters(), num_data=100, seed=1)
    test_bf16_state.train_steps(full, net, 2)
    lean = BSAM(net.parameters(), num_data=100, state_dtype=BF16, seed=1)
    lean.load_state_dict(full.state_dict())  # float32 state rounded to nearest into bfloat16
    for a, b in zip(full.state.values(), lean.state.values()):
        assert torch.equal(b["mean"], a["mean"]) and torch.equal(b["precision"], a["precision"].to(BF16))
    again = BSAM(net.parameters(), num_data=100, seed=1)
    again.load_state_dict(lean.state_dict())
    assert all(s["precision"].dtype == torch.float32 for s in again.state.values())
    assert all(v.dtype == torch.float32 for v in again.posterior_variance())
    assert all(v.dtype == torch.float32 for v in lean.posterior_std())


# a step skipped on purpose: the checkpoint holds the skip
@pytest.mark.filterwarnings("ignore:.*non-finite gradient, step skipped:RuntimeWarning")
def test_a_capturable_checkpoint_resumes_the_same_run():
    backend = "cpu" if "cpu" in AVAILABLE_BACKENDS else "foreach"
    model = mlp()
    opt = test_capturable.make("bsam", model, backend, True, state_dtype=torch.bfloat16)
    train(model, opt, 2, splits=2, poison=(1, 0))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())  # not the live tensors
    train(model, opt, 2, splits=2)
    resumed_model = mlp()
    resumed_model.load_state_dict(saved_model)
    resumed = test_capturable.make("bsam", resumed_model, backend, True, state_dtype=torch.bfloat16)
    resumed.load_state_dict(saved)
    train(resumed_model, resumed, 2, splits=2)
    for a, b in zip(test_capturable.weights(model), test_capturable.weights(resumed_model)):
        assert torch.equal(a, b)


# a step skipped on purpose: the checkpoint holds the skip
@pytest.mark.filterwarnings("ignore:.*non-finite gradient, step skipped:RuntimeWarning")
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


def test_triton_checkpoint_resume_and_recreate():
    """state_dict / load_state_dict / a fresh optimizer: the resumed run equals the uninterrupted one."""
    import test_triton_backend  # skips this test where Triton is not installed

    xs, ys = test_triton_backend.make_data(6)
    model = test_triton_backend.make_model(torch.float32)
    opt = test_triton_backend.bsam(model, "triton")
    test_triton_backend.train(model, opt, xs, ys)
    straight = [p.detach().clone() for p in model.parameters()]

    model = test_triton_backend.make_model(torch.float32)
    opt = test_triton_backend.bsam(model, "triton")
    test_triton_backend.train(model, opt, xs[:3], ys[:3])
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict()}
    resumed = test_triton_backend.make_model(torch.float32, seed=99)
    resumed.load_state_dict(checkpoint["model"])
    opt = test_triton_backend.bsam(resumed, "triton")
    opt.load_state_dict(checkpoint["opt"])
    test_triton_backend.train(resumed, opt, xs[3:], ys[3:])
    for a, b in zip(resumed.parameters(), straight):
        assert torch.equal(a, b)


def test_triton_model_to_and_load_state_dict_between_steps():
    """The user overwrites the weights between steps: the backend follows (the cached tables stay right)."""
    import test_triton_backend  # skips this test where Triton is not installed

    xs, ys = test_triton_backend.make_data(4)
    model = test_triton_backend.make_model(torch.float32)
    opt = test_triton_backend.bsam(model, "triton")
    test_triton_backend.train(model, opt, xs[:2], ys[:2])
    fresh = test_triton_backend.make_model(torch.float32, seed=3)
    model.load_state_dict(fresh.state_dict())
    model.to(DEVICE)
    test_triton_backend.train(model, opt, xs[2:], ys[2:])
    eager_model = test_triton_backend.make_model(torch.float32)
    eager_opt = test_triton_backend.bsam(eager_model, "eager")
    test_triton_backend.train(eager_model, eager_opt, xs[:2], ys[:2])
    eager_model.load_state_dict(fresh.state_dict())
    test_triton_backend.train(eager_model, eager_opt, xs[2:], ys[2:])
    assert test_triton_backend.relative_error(list(model.parameters()), list(eager_model.parameters())) <= 1e-6


# ---- refusing what does not fit, before anything changes -----------------------------------------


def test_state_dict_for_other_shapes_is_refused():
    model = small_mlp()
    x, y = data()
    opt = sambayes.BSAM(model.parameters(), num_data=50)
    opt.step(cross_entropy_closure(model, x, y))
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


def _foreign_state_dicts(model):
    adam = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    adam.step()
    sam = sambayes.SAM(model.parameters(), lr=0.1)
    sam.step(square_closure(model, torch.randn(4, 3, device=DEVICE)))
    return {"torch.optim.Adam": adam.state_dict(), "SAM": sam.state_dict()}


@pytest.mark.parametrize("foreign", ["torch.optim.Adam", "SAM"])
def test_a_foreign_state_dict_leaves_the_optimizer_bitwise_unchanged(foreign):
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0)
    opt.step(square_closure(m, x))
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
    opt.step(square_closure(m, x))  # and it still trains


def test_a_bsam_state_dict_is_refused_by_sam():
    m, x = linear()
    bsam = sambayes.BSAM(m, num_data=100, seed=0)
    bsam.step(square_closure(m, x))
    sam = sambayes.SAM(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a SAM state dict"):
        sam.load_state_dict(bsam.state_dict())
    sam.step(square_closure(m, x))


def test_bad_values_in_a_state_dict_are_named():
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0)
    opt.step(square_closure(m, x))
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["num_data"] = -1
    with pytest.raises(ValueError, match="num_data=-1"):
        opt.load_state_dict(state)
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["mean"] = state["state"][0]["mean"][:1]
    with pytest.raises(ValueError, match="'mean' of parameter 0"):
        opt.load_state_dict(state)


def test_load_state_dict_mid_step_resets_it_and_training_goes_on():
    """A crash in sub-batch 1 of 2 (say, out of memory in a hand-written loop), gradients set to None,
    then the last checkpoint: the step in progress is abandoned and training goes on."""
    m, x = linear()
    opt = sambayes.BSAM(m, num_data=100, seed=0)
    opt.step(square_closure(m, x), splits=2)
    checkpoint = copy.deepcopy(opt.state_dict())
    opt.sample()
    square_closure(m, x)()
    opt.perturb(sync=False)
    square_closure(m, x)()
    opt.sample()  # sub-batch 1: the crash comes before its backward pass
    opt.zero_grad(set_to_none=True)
    opt.load_state_dict(checkpoint)
    assert all(torch.equal(p, checkpoint["state"][i]["mean"]) for i, p in enumerate(m.parameters()))
    for _ in range(2):
        opt.step(square_closure(m, x), splits=2)
    opt.abort()  # a no-op at rest


# ---- torch.distributed.checkpoint, one process ---------------------------------------------------


K = dist_workers.DCP_STEPS
METHODS = ("bsam", "sam", "ivon")


def assert_same(got, want, exact=True):
    """Parameters and state of parameters_and_state(), bitwise (or to float32 rounding), and the counters."""
    assert got["counters"] == want["counters"]
    assert got["tensors"].keys() == want["tensors"].keys()
    for name, (param, state) in want["tensors"].items():
        got_param, got_state = got["tensors"][name]
        assert got_state.keys() == state.keys(), name
        for what, a, b in [("parameter", got_param, param)] + [(k, got_state[k], state[k]) for k in state]:
            assert a.dtype == b.dtype and a.shape == b.shape, (name, what)
            if exact:
                assert torch.equal(a, b), f"{name} {what}: max difference {(a - b).abs().max().item()}"
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, n=name, w=what: f"{n} {w}: {m}")


def one_process_run(method, steps, seed=123):
    model, xs, ys = dist_workers.model_and_data()
    opt = dist_workers.make_optimizer(method, model, seed=seed)
    dist_workers.train_whole_batches(model, opt, xs[:steps], ys[:steps])
    return model, opt


@needs_gloo
@pytest.mark.parametrize("method", METHODS)
def test_a_fresh_optimizer_gives_dcp_its_whole_state_without_a_step(method):
    """get_optimizer_state_dict() on an optimizer that has not stepped would create the state with
    step() and no closure, which a two-pass step refuses: the state exists from the start instead."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = dist_workers.model_and_data()[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt = dist_workers.make_optimizer(method, model, seed=0)
    opt.step = lambda *args, **kwargs: pytest.fail("get_optimizer_state_dict() called step()")
    state = get_optimizer_state_dict(model, opt)
    keys = {"weight", "momentum"} if method == "sam" else {"mean", "precision", "momentum"}
    assert state["state"].keys() == {name for name, _ in model.named_parameters()}
    assert all(s.keys() == keys for s in state["state"].values())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert int(opt.param_groups[0]["step"]) == 0


@needs_gloo
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("method", METHODS)
def test_get_and_set_optimizer_state_dict_resume_a_run_exactly(method, flatten):
    """Without FSDP: K steps, the state dicts by FQN (nested, or flattened as torchtitan saves them),
    a fresh model and optimizer, K more steps."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    reference = dist_workers.parameters_and_state(*one_process_run(method, 2 * K))
    model, opt = one_process_run(method, K)
    saved = copy.deepcopy((model.state_dict(), get_optimizer_state_dict(model, opt, options=options)))

    model, xs, ys = dist_workers.model_and_data()
    opt = dist_workers.make_optimizer(method, model, seed=0)  # the checkpoint's seed wins
    model.load_state_dict(saved[0])
    set_optimizer_state_dict(model, opt, saved[1], options=options)
    dist_workers.train_whole_batches(model, opt, xs[K : 2 * K], ys[K : 2 * K])
    assert_same(dist_workers.parameters_and_state(model, opt), reference)


# ---- torch.distributed.checkpoint, FSDP2 on two ranks and one process ----------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every DCP run of the module: one process in this one, two ranks in one spawn (see dcp_worker)."""
    out = tmp_path_factory.mktemp("dcp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same matrix products
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # no_dist=True says it
            return _all_runs(out)
    finally:
        torch.set_num_threads(threads)


def _all_runs(out):
    runs = {}
    for method in METHODS:
        reference_k = dist_workers.parameters_and_state(*one_process_run(method, K))
        reference = dist_workers.parameters_and_state(*one_process_run(method, 2 * K))
        model, opt = one_process_run(method, K)
        dist_workers.dcp_save(model, opt, out / f"{method}-1rank", no_dist=True)
        torch.save(opt.state_dict(), out / f"{method}-1rank.pt")
        runs[method] = dict(reference_k=reference_k, reference=reference)

    mp.spawn(dist_workers.dcp_worker, args=(2, str(out / "init"), str(out)), nprocs=2)
    two_ranks = torch.load(out / "results-2ranks.pt")

    for method in METHODS:
        model, xs, ys = dist_workers.model_and_data()  # an unsharded model, in one process
        opt = dist_workers.make_optimizer(method, model, seed=0)
        dist_workers.dcp_load(model, opt, out / f"{method}-2ranks", no_dist=True)
        loaded = dist_workers.parameters_and_state(model, opt)
        dist_workers.train_whole_batches(model, opt, xs[K : 2 * K], ys[K : 2 * K])
        final = dist_workers.parameters_and_state(model, opt)
        runs[method].update(two_ranks=two_ranks[method], one_rank=dict(loaded=loaded, final=final))
    runs["meta"] = two_ranks["meta"]
    return runs


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("method", METHODS)
def test_saved_on_two_ranks_resumed_in_one_process(runs, method):
    run = runs[method]
    assert_same(run["one_rank"]["loaded"], run["two_ranks"]["saved"])  # the checkpoint is exact
    assert_same(run["two_ranks"]["saved"], run["reference_k"], exact=method != "sam")
    assert_same(run["one_rank"]["final"], run["reference"], exact=method != "sam")


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("method", METHODS)
def test_saved_in_one_process_resumed_on_two_ranks(runs, method):
    run = runs[method]
    assert_same(run["two_ranks"]["loaded"], run["reference_k"])  # the checkpoint is exact
    assert_same(run["two_ranks"]["final"], run["reference"], exact=method != "sam")


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("method", METHODS)
def test_whole_tensor_and_full_state_dicts_load_under_fsdp2(runs, method):
    """A one-process state dict given to load_state_dict() on each rank (each cuts its shards out), and
    DCP's full_state_dict option (gathered on every rank, handed back as DTensors) load exactly."""
    run = runs[method]["two_ranks"]
    assert_same(run["from_whole"], run["loaded"])
    assert_same(run["from_full"], run["final"])


@pytest.mark.slow
@needs_gloo
def test_an_optimizer_built_on_the_meta_device_creates_its_state_at_the_first_step(runs):
    """FSDP2's meta-device initialisation with the optimizer built first (fully_shard, optimizer,
    to_empty, weights): the state cannot exist before the weights do, so it comes with the first step."""
    meta = runs["meta"]
    assert meta["state_before"] == 0
    assert meta["after"]["counters"]["step"] == 1
    for name, (param, state) in meta["after"]["tensors"].items():
        assert torch.equal(state["mean"], param), name  # at rest: the mean
