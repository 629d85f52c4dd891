"""Checkpoints through torch.distributed.checkpoint (DCP): FSDP2 on two ranks (gloo, CPU) and one process.

A run is saved after K steps and resumed for K more, on another number of ranks; it must end where
the uninterrupted run ends. Every rank trains on the whole batch, so FSDP2's averaged gradient is
one process's bit for bit and bSAM's trajectory does not depend on the sharding: the comparison is
exact. SAM's ascent divides by the global gradient norm, which FSDP2 sums per shard and then across
ranks: its rounding depends on the sharding (with or without a checkpoint), so SAM's resumed run is
compared to float32 rounding, and its checkpoint itself exactly.
"""

import copy
import warnings

import dist_workers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

K = dist_workers.DCP_STEPS
METHODS = ("bsam", "sam")


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


# ---- one process, no process group -----------------------------------------------------------------


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
    keys = {"mean", "precision", "momentum"} if method == "bsam" else {"weight", "momentum"}
    assert state["state"].keys() == {name for name, _ in model.named_parameters()}
    assert all(s.keys() == keys for s in state["state"].values())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert int(opt.param_groups[0]["step"]) == 0


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


# ---- FSDP2 on two ranks, and one process ---------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of the module: one process in this one, two ranks in one spawn (see dcp_worker)."""
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


@pytest.mark.parametrize("method", METHODS)
def test_saved_on_two_ranks_resumed_in_one_process(runs, method):
    run = runs[method]
    assert_same(run["one_rank"]["loaded"], run["two_ranks"]["saved"])  # the checkpoint is exact
    assert_same(run["two_ranks"]["saved"], run["reference_k"], exact=method == "bsam")
    assert_same(run["one_rank"]["final"], run["reference"], exact=method == "bsam")


@pytest.mark.parametrize("method", METHODS)
def test_saved_in_one_process_resumed_on_two_ranks(runs, method):
    run = runs[method]
    assert_same(run["two_ranks"]["loaded"], run["reference_k"])  # the checkpoint is exact
    assert_same(run["two_ranks"]["final"], run["reference"], exact=method == "bsam")


@pytest.mark.parametrize("method", METHODS)
def test_whole_tensor_and_full_state_dicts_load_under_fsdp2(runs, method):
    """A one-process state dict given to load_state_dict() on each rank (each cuts its shards out), and
    DCP's full_state_dict option (gathered on every rank, handed back as DTensors) load exactly."""
    run = runs[method]["two_ranks"]
    assert_same(run["from_whole"], run["loaded"])
    assert_same(run["from_full"], run["final"])


def test_an_optimizer_built_on_the_meta_device_creates_its_state_at_the_first_step(runs):
    """FSDP2's meta-device initialisation with the optimizer built first (fully_shard, optimizer,
    to_empty, weights): the state cannot exist before the weights do, so it comes with the first step."""
    meta = runs["meta"]
    assert meta["state_before"] == 0
    assert meta["after"]["counters"]["step"] == 1
    for name, (param, state) in meta["after"]["tensors"].items():
        assert torch.equal(state["mean"], param), name  # at rest: the mean
