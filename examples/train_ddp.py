"""Train a CIFAR-style ResNet-18 with bSAM (or SAM, or SGD) on several processes with
DistributedDataParallel: the recipe and command line of ``train.py``, launched by torchrun. ::

    torchrun --nproc_per_node=8 examples/train_ddp.py --data ~/data          # 8 GPUs (nccl)
    torchrun --nproc_per_node=2 examples/train_ddp.py --synthetic 64 --width 4 --epochs 2 \\
        --batch-size 16 --splits 2 --device cpu                              # 2 CPU processes (gloo)

``--batch-size`` and ``--splits`` count over all processes, so a run computes the
same algorithm whatever the number of processes: each of W processes takes
batch-size / W images per step, cut into splits / W sub-batches, each with its own
noise and adversarial point (m-sharpness across devices). The optimizer is given
the DDP module: the noisy pass then runs without all-reduce, and the perturbed-point
gradients and bSAM's precision statistic are averaged over the processes, so the
replicas stay identical. Process 0 writes the checkpoints, logs and results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import time

import cifar_resnet as cr
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cr.add_arguments(parser)
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        results, exit_message = train(args, cuda), None
    except SystemExit as exc:  # a bad argument or checkpoint: every process raises the same one
        results, exit_message = {}, exc.code
    # Leave together, with the DDP module and optimizer (train's locals) freed first: gloo can
    # abort a process ("terminate called without an active exception") that destroys its group
    # while another still uses it. Any other exception ends this process alone (torchrun stops
    # the rest), so it skips the barrier, which the others might never reach.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if exit_message is not None:
        raise SystemExit(exit_message)
    return results


def train(args: argparse.Namespace, cuda: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device(args.device)
    if cuda:
        torch.cuda.set_device(device)
    cr.check_arguments(args, world)
    batch_size, splits = args.batch_size // world, max(1, args.splits // world)  # this process's share
    out = pathlib.Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    train_set, test, described = cr.load_data(args.data, args.synthetic)
    train_set, test = train_set.to(device), test.to(device)
    # DistributedSampler hands each process its own shard of a permutation that changes every epoch
    sampler = DistributedSampler(
        range(len(train_set)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    if rank == 0:
        print(f"{described}; {len(test)} test images; {args.optimizer} on {world} × {device.type}")

    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = cr.ResNet18(args.width).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    opt = cr.make_optimizer(args, ddp, len(train_set))  # the DDP module: bSAM/SAM manage its gradient sync
    schedule = cr.make_schedule(opt, steps_per_epoch, args)
    scaler = cr.make_scaler(args, device)
    first_epoch = 0
    checkpoint = cr.load_checkpoint(out, args, device)
    if checkpoint is not None:  # every process loads the same checkpoint: the replicas start identical
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint["scaler"] is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        first_epoch = checkpoint["epoch"]
        if rank == 0:
            print(f"resumed from {out / cr.CHECKPOINT} after epoch {first_epoch}")

    if rank == 0:
        cr.start_log(out, checkpoint)
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(first_epoch, last_epoch):
        ddp.train()
        sampler.set_epoch(epoch)
        indices = torch.tensor(list(sampler), device=device)
        generator = cr.epoch_generator(args.seed, epoch, rank)
        loss_sum, start = torch.zeros((), device=device), time.perf_counter()
        bar = tqdm(
            range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0 or args.no_progress
        )
        for i in bar:
            batch = indices[i * batch_size : (i + 1) * batch_size]
            images = cr.normalize(cr.augment(train_set.images[batch], generator))
            loss = cr.train_step(
                ddp,
                opt,
                images,
                train_set.labels[batch],
                splits=splits,
                dtype=cr.amp_dtype(args),
                scaler=scaler,
                max_grad_norm=args.max_grad_norm,
            )
            schedule.step()
            loss_sum += loss.float()
            if i % 20 == 0:  # .item() waits for the device: not every step (this process's loss)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.4f}")
        seconds = time.perf_counter() - start
        dist.all_reduce(loss_sum)  # the mean over all processes, for the log
        if rank == 0:
            test_metrics = cr.evaluate(
                model, opt, test, batch_size=args.eval_batch_size
            )  # the plain module: no collectives
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum.item() / (world * steps_per_epoch),
                "lr": schedule.get_last_lr()[0],
                "seconds": round(seconds, 3),
                **{f"test_{k}": v for k, v in test_metrics.items()},
            }
            cr.save_checkpoint(
                out,
                model=model.state_dict(),
                optimizer=opt.state_dict(),
                scheduler=schedule.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                epoch=epoch + 1,
                log_row=row,  # a kill before the log write loses nothing: the resumed run writes it
                args=vars(args),
                world_size=world,
            )
            cr.append_log(out, row)
            print(json.dumps(row))
        dist.barrier()  # nobody runs ahead while process 0 evaluates and writes

    if last_epoch < args.epochs:
        if rank == 0:
            print(f"stopped after epoch {last_epoch}; continue with --resume")
        return {}
    results = {}
    if rank == 0:
        results = cr.final_metrics(model, opt, test, args)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(cr.format_metrics(results))
    dist.barrier()
    return results


if __name__ == "__main__":
    main()
