"""Worker processes for tests/test_replication.py and the DCP tests of tests/test_checkpoints.py
(spawned, two ranks on gloo)."""

import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sambayes

STEPS = 10


class ToDouble(torch.nn.Module):
    def forward(self, x):
        return x.double()


def model_and_data(mixed=False):
    """A small MLP (with ``mixed``, its last layer in float64: float32 and float64 state) and 10 batches."""
    torch.manual_seed(1)
    layers = [torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)]
    model = torch.nn.Sequential(*layers[:2], ToDouble(), layers[2].double()) if mixed else torch.nn.Sequential(*layers)
    g = torch.Generator().manual_seed(3)
    return model, torch.randn(STEPS, 16, 6, generator=g), torch.randint(0, 4, (STEPS, 16), generator=g)


def make_optimizer(method, model, seed):
    if method == "bsam":
        return sambayes.BSAM(model, num_data=200, lr=0.1, rho=0.05, weight_decay=1e-3, seed=seed)
    if method == "ivon":
        return sambayes.IVON(model, lr=0.1, ess=200, hess_init=0.5, beta2=0.999, weight_decay=1e-3, seed=seed)
    return sambayes.SAM(model, lr=0.1, rho=0.05, weight_decay=1e-3)


def single_process(method, splits, order=None, mixed=False):
    """The reference: one process, the whole batch of 16, ``splits`` sub-batches (sub-batch j is chunk
    ``order[j]`` of the batch; IVON: ``splits`` samples, sample j's gradient on chunk ``order[j]``)."""
    model, xs, ys = model_and_data(mixed)
    opt = make_optimizer(method, model, seed=123)
    for x, y in zip(xs, ys):
        chunks = sambayes.split_batch(x, y, splits=splits)
        chunks = [chunks[i] for i in order] if order else chunks

        def closure(j=0):
            loss = F.cross_entropy(model(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

        if method == "ivon":  # the phase API: a sample per chunk
            for j in range(splits):
                opt.sample()
                closure(j)
            opt.update()
        else:
            opt.step(closure, splits=splits)
    return [p.detach().clone() for p in model.parameters()]


def worker(rank, world, init_file, out_dir, method, wrapper, splits=1):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, xs, ys = model_and_data(mixed=wrapper == "ddp-mixed")
    if wrapper == "ddp-params":  # the parameters alone, no module: the optimizer says what is lost
        net = torch.nn.parallel.DistributedDataParallel(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_optimizer(method, list(net.parameters()), seed=0)
        torch.save([str(w.message) for w in caught], f"{out_dir}/rank{rank}.pt")
        dist.barrier()
        net = None
        dist.destroy_process_group()
        os._exit(0)
    if wrapper == "ddp-compiled":  # the order PyTorch recommends: compile the DDP module
        net = torch.compile(torch.nn.parallel.DistributedDataParallel(model), backend="eager")
    elif wrapper.startswith("ddp"):
        net = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        net = fully_shard(model)
    if method == "ivon" and wrapper == "ddp":  # ivon-opt's sync=True without the module: refused, saying why
        try:
            sambayes.IVON(list(net.parameters()), lr=0.1, ess=200, sync=True)
        except ValueError as exc:
            torch.save(str(exc), f"{out_dir}/sync{rank}.pt")
    # ranks pass different seeds: the optimizer must agree on rank 0's
    opt = make_optimizer(method, net, seed=123 + rank)
    for x, y in zip(xs, ys):
        chunks = sambayes.split_batch(x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8], splits=splits)

        def closure(j=0):
            loss = F.cross_entropy(net(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

        opt.step(closure) if method == "ivon" else opt.step(closure, splits=splits)
    if wrapper == "fsdp2" and method != "sam":  # an evaluation leaves the root's parameters gathered
        x = xs[0][:8]
        with torch.no_grad():
            at_mean = torch.softmax(net(x), -1)
        averaged = sambayes.predict(net, opt, x, samples=4)
        with torch.no_grad():
            again = torch.softmax(net(x), -1)
        torch.save([at_mean, averaged, again], f"{out_dir}/predict{rank}.pt")
    # a checkpoint of this rank's state loads into a fresh optimizer (FSDP2: shard shapes)
    fresh = make_optimizer(method, net, seed=0)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], value), key
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    torch.save([p.detach().clone() for p in params], f"{out_dir}/rank{rank}.pt")
    # leave together, with the DDP reducer gone, so no gloo thread outlives its group
    dist.barrier()
    opt = fresh = net = None  # drop the DDP reducer before its process group
    dist.destroy_process_group()
    # skip interpreter teardown: gloo's threads can abort it ("terminate called without an
    # active exception") once in a few dozen runs; the results are saved already
    os._exit(0)


# ---- torch.distributed.checkpoint (tests/test_checkpoints.py) -------------------------------------

DCP_STEPS = 3  # K: steps before the checkpoint, and as many after it


def train_whole_batches(net, opt, xs, ys):
    """One step per batch, every rank on the whole batch: FSDP2's average of identical gradients is
    one process's gradient bit for bit, so the trajectory does not depend on the number of ranks."""
    for x, y in zip(xs, ys):

        def closure():
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def whole(t):
    """The whole tensor (gathered from every rank's shard for a DTensor: a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def parameters_and_state(model, opt):
    """{name: (parameter, {state key: tensor})} as whole tensors, the state read through opt.state_dict(),
    and the groups' counters and seed."""
    state = opt.state_dict()["state"]
    tensors = {
        name: (whole(p).clone(), {key: whole(value).clone() for key, value in state[i].items()})
        for i, (name, p) in enumerate(model.named_parameters())
    }
    group = opt.param_groups[0]
    counters = {key: int(group[key]) for key in ("step", "skipped_steps", "attempts")}
    return {"tensors": tensors, "counters": {**counters, "seed": group.get("seed")}}


def dcp_save(net, opt, path, **kwargs):
    """Model and optimizer through torch.distributed.checkpoint, as a training script saves them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(net, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path, **kwargs)


def dcp_load(net, opt, path, **kwargs):
    """As a training script resumes: the fresh model's and optimizer's state dicts say what to read
    (in their own sharding), dcp.load fills them in place, set_state_dict hands them over."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(net, opt)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path, **kwargs)
    set_state_dict(net, opt, model_state_dict=model_state, optim_state_dict=optim_state)


def dcp_worker(rank, world, init_file, out_dir):
    """FSDP2 on ``world`` ranks, for BSAM, SAM and IVON: K steps from scratch saved to ``<method>-<world>ranks``;
    then, in fresh modules, the one-process checkpoint ``<method>-1rank`` loaded (also as a plain state
    dict of whole tensors, ``<method>-1rank.pt``) and K more steps; then the gathered (full) optimizer
    state dict loaded into a fresh optimizer. Rank 0 saves what each stage holds, as whole tensors."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    k, results = DCP_STEPS, {}
    for method in ("bsam", "sam", "ivon"):
        model, xs, ys = model_and_data()
        net = fully_shard(model)
        opt = make_optimizer(method, net, seed=123 + rank)  # ranks agree on rank 0's seed
        train_whole_batches(net, opt, xs[:k], ys[:k])
        saved = parameters_and_state(net, opt)
        dcp_save(net, opt, f"{out_dir}/{method}-{world}ranks")

        net = fully_shard(model_and_data()[0])
        opt = make_optimizer(method, net, seed=0)  # the checkpoint's seed wins
        dcp_load(net, opt, f"{out_dir}/{method}-1rank")
        loaded = parameters_and_state(net, opt)

        other = fully_shard(model_and_data()[0])
        other_opt = make_optimizer(method, other, seed=0)
        other_opt.load_state_dict(torch.load(f"{out_dir}/{method}-1rank.pt"))  # each rank cuts its shards out
        from_whole = parameters_and_state(other, other_opt)

        train_whole_batches(net, opt, xs[k : 2 * k], ys[k : 2 * k])
        final = parameters_and_state(net, opt)

        full = StateDictOptions(full_state_dict=True)
        fresh = make_optimizer(method, net, seed=0)
        set_optimizer_state_dict(net, fresh, get_optimizer_state_dict(net, opt, options=full), options=full)
        from_full = parameters_and_state(net, fresh)
        results[method] = dict(saved=saved, loaded=loaded, from_whole=from_whole, final=final, from_full=from_full)

    with torch.device("meta"):
        model = model_and_data()[0]
    net = fully_shard(model)
    opt = make_optimizer("bsam", net, seed=0)
    state_before = len(opt.state)
    net.to_empty(device="cpu")  # FSDP2 keeps the parameters: the optimizer's are the materialised ones
    with torch.no_grad():
        for p in net.parameters():
            p.to_local().uniform_(-0.5, 0.5)
    xs, ys = model_and_data()[1:]
    train_whole_batches(net, opt, xs[:1], ys[:1])
    results["meta"] = dict(state_before=state_before, after=parameters_and_state(net, opt))
    if rank == 0:
        torch.save(results, f"{out_dir}/results-{world}ranks.pt")
    dist.barrier()
    net = opt = other = other_opt = fresh = None
    dist.destroy_process_group()
    os._exit(0)  # as worker(): no interpreter teardown racing gloo's threads
