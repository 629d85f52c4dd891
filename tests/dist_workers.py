"""Worker processes for tests/test_distributed.py (spawned, two ranks on gloo)."""

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
    return sambayes.SAM(model, lr=0.1, rho=0.05, weight_decay=1e-3)


def single_process(method, splits, order=None, mixed=False):
    """The reference: one process, the whole batch of 16, ``splits`` sub-batches
    (sub-batch j is chunk ``order[j]`` of the batch)."""
    model, xs, ys = model_and_data(mixed)
    opt = make_optimizer(method, model, seed=123)
    for x, y in zip(xs, ys):
        chunks = sambayes.split_batch(x, y, splits=splits)
        chunks = [chunks[i] for i in order] if order else chunks

        def closure(j=0):
            loss = F.cross_entropy(model(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

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
    # ranks pass different seeds: the optimizer must agree on rank 0's
    opt = make_optimizer(method, net, seed=123 + rank)
    for x, y in zip(xs, ys):
        chunks = sambayes.split_batch(x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8], splits=splits)

        def closure(j=0):
            loss = F.cross_entropy(net(chunks[j][0]), chunks[j][1])
            loss.backward()
            return loss

        opt.step(closure, splits=splits)
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
