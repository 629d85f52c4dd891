"""Train a CIFAR-style ResNet-18 with bSAM (or SAM, or SGD) on one device.

The defaults are the paper's bSAM recipe for CIFAR-10 (Möllenhoff & Khan, ICLR 2023):
α = 0.5, β = (0.9, 0.999), ρ = 0.01, prior precision 40 (δ = 40 / N),
N = 4 × 50,000, γ = 0.1, s0 = 1, k = 8 sub-batches of batches of 200, 180 epochs,
5 warm-up epochs then cosine decay. ::

    python examples/train.py --data ~/data                     # CIFAR-10, one GPU
    python examples/train.py --synthetic 64 --width 4 --epochs 2 --batch-size 16 --splits 2   # seconds, CPU

Writes ``OUT/checkpoint.pt`` after every epoch and, with ``--checkpoint-every STEPS``, every STEPS
steps (atomically: a run killed at any moment, even while writing it, resumes with ``--resume``
from the last whole checkpoint and ends exactly as an uninterrupted run), ``OUT/log.jsonl`` (one
line per epoch) and ``OUT/results.json`` (test metrics at the mean and, for bSAM, of the Bayesian
model average).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import time

import cifar_resnet as cr
import torch
from tqdm import tqdm


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cr.add_arguments(parser)
    args = parser.parse_args(argv)
    cr.check_arguments(args)
    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, test, described = cr.load_data(args.data, args.synthetic)
    train, test = train.to(device), test.to(device)
    steps_per_epoch = len(train) // args.batch_size  # the last partial batch is dropped: sub-batches stay equal
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(train)} training images")
    print(f"{described}; {len(test)} test images; {args.optimizer} on {device}")

    torch.manual_seed(args.seed)
    model = cr.ResNet18(args.width).to(device)
    opt = cr.make_optimizer(args, model, len(train))
    schedule = cr.make_schedule(opt, steps_per_epoch, args)
    scaler = cr.make_scaler(args, device)
    first_epoch, first_step, loss_so_far, generator_state = 0, 0, 0.0, None
    checkpoint = cr.load_checkpoint(out, args, device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint["scaler"] is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        if "rng" in checkpoint:  # checkpoints from before step-level checkpoints lack it
            torch.set_rng_state(checkpoint["rng"])
        if checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        first_epoch, first_step = checkpoint["epoch"], checkpoint.get("step_in_epoch", 0)
        loss_so_far, generator_state = checkpoint.get("loss_so_far", 0.0), checkpoint.get("generator")
        where = f"step {first_step} of epoch {first_epoch + 1}" if first_step else f"epoch {first_epoch}"
        print(f"resumed from {out / cr.CHECKPOINT} after {where}")

    cr.start_log(out, checkpoint)
    checkpoints_written = 0

    def save(epoch: int, step_in_epoch: int, loss_sum: float, generator: torch.Generator | None, log_row=None) -> None:
        """The whole training state: a resumed run continues exactly as an uninterrupted one."""
        nonlocal checkpoints_written
        checkpoints_written += 1
        cr.save_checkpoint(
            out,
            kill_midway=checkpoints_written == args.kill_in_checkpoint,
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            scheduler=schedule.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            loss_so_far=loss_sum,
            generator=generator.get_state() if generator is not None else None,
            log_row=log_row,
            args=vars(args),
        )

    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(first_epoch, last_epoch):
        model.train()
        generator = cr.epoch_generator(args.seed, epoch)
        order = torch.randperm(len(train), generator=generator).to(device)
        start_step = first_step if epoch == first_epoch else 0
        if start_step:  # mid-epoch: the generator as it was after the last step done
            generator.set_state(generator_state)
        loss_sum = torch.full((), loss_so_far if start_step else 0.0, device=device)
        start = time.perf_counter()
        bar = tqdm(
            range(start_step, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress
        )
        for i in bar:
            batch = order[i * args.batch_size : (i + 1) * args.batch_size]
            images = cr.normalize(cr.augment(train.images[batch], generator))
            loss = cr.train_step(
                model,
                opt,
                images,
                train.labels[batch],
                splits=args.splits,
                dtype=cr.amp_dtype(args),
                scaler=scaler,
                max_grad_norm=args.max_grad_norm,
            )
            schedule.step()
            loss_sum += loss.float()
            if i % 20 == 0:  # .item() waits for the device: not every step
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.4f}")
            step = epoch * steps_per_epoch + i + 1  # steps done in all
            if args.checkpoint_every and step % args.checkpoint_every == 0 and i + 1 < steps_per_epoch:
                save(epoch, i + 1, loss_sum.item(), generator)
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: as a node failure would
        seconds = time.perf_counter() - start
        test_metrics = cr.evaluate(model, opt, test, batch_size=args.eval_batch_size)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / steps_per_epoch,
            "lr": schedule.get_last_lr()[0],
            "seconds": round(seconds, 3),
            **{f"test_{k}": v for k, v in test_metrics.items()},
        }
        save(epoch + 1, 0, 0.0, None, log_row=row)  # the row too: a kill before the next line loses nothing
        cr.append_log(out, row)
        print(json.dumps(row))

    if last_epoch < args.epochs:
        print(f"stopped after epoch {last_epoch}; continue with --resume")
        return {}
    results = cr.final_metrics(model, opt, test, args)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(cr.format_metrics(results))
    return results


if __name__ == "__main__":
    main()
