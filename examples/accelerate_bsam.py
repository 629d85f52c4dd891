"""Train with bSAM in a Hugging Face accelerate loop, with the phase API. ::

    python examples/accelerate_bsam.py --cpu                  # one process on the CPU
    python examples/accelerate_bsam.py --cpu --splits 4       # 4 sub-batches per batch (m-sharpness)
    accelerate launch examples/accelerate_bsam.py --mixed-precision fp16   # GPUs, DDP, float16 AMP

The task is synthetic (an MLP learns the labels a random teacher network gives Gaussian
inputs; nothing to download): a few seconds on a CPU. It prints the test accuracy at the
posterior mean and of the Bayesian model average.

What ``accelerator.prepare`` does to the optimizer, and what to do about it:

- It returns an ``AcceleratedOptimizer`` that wraps the sambayes optimizer without its
  methods: run the phases on the sambayes optimizer, ``optimizer.optimizer``. Its
  ``state_dict()`` and ``load_state_dict()`` are the sambayes optimizer's (``save_state`` /
  ``load_state`` resume exactly); its ``zero_grad()`` is not needed (bSAM zeroes what it reads).
- Its ``step(closure)`` passes the closure through (``splits=1``, no mixed precision) but
  returns None instead of the loss; with a GradScaler (``fp16``) it calls the scaler's
  ``step()``, which cannot drive a two-pass step (it fails). Use the phases (or
  ``optimizer.optimizer.step(closure, splits=k, grad_scaler=accelerator.scaler)``).
- ``accelerator.backward(loss)`` scales the loss with ``fp16``: hand ``accelerator.scaler`` to
  ``perturb()`` and ``update()``, which unscale as they read, and call
  ``accelerator.scaler.update()`` after ``update()``. Never ``accelerator.clip_grad_norm_``
  between the passes (it would clip the noisy gradient too): ``update(max_grad_norm=...)``.
- ``prepare`` wraps the model in DDP when several processes run: create the optimizer from
  the *prepared* model, so that it skips the noisy pass's all-reduce and every replica draws
  its own noise (m-sharpness over ``processes x splits`` sub-batches).
- Keep ``gradient_accumulation_steps=1`` and don't use ``accelerator.accumulate``: they scale
  the loss and skip ``AcceleratedOptimizer.step()``, which the phases don't go through.
  Accumulate inside each pass instead (several backward calls between two phases).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import sambayes


# ---- data and model (as in lightning_bsam.py) ------------------------------------------------
def synthetic_data(num_train: int, num_test: int, features: int = 16, classes: int = 4, seed: int = 0):
    """Gaussian inputs [n, features] (float32) labelled [n] (int64) by a random teacher network
    (features -> 32 -> classes, tanh): (train, test) TensorDatasets, the same teacher for both."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(features, 32, generator=g) / features**0.5
    readout = torch.randn(32, classes, generator=g) / 32**0.5
    x = torch.randn(num_train + num_test, features, generator=g)
    y = (torch.tanh(x @ hidden) @ readout).argmax(dim=1)
    return TensorDataset(x[:num_train], y[:num_train]), TensorDataset(x[num_train:], y[num_train:])


def train_loader(data: TensorDataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled by its own seeded generator; the last partial batch is dropped, so that
    ``splits`` divides every batch."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)


def mlp(features: int, hidden: int, classes: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


def bsam_hyperparameters(args: argparse.Namespace, num_train: int) -> dict:
    return dict(
        num_data=args.data_factor * num_train,  # a tempered posterior (as the demo's recipe)
        lr=args.lr,
        betas=(0.9, 0.99),
        rho=args.rho,
        weight_decay=args.prior_precision / (args.data_factor * num_train),
        seed=args.seed,
        backend=args.backend,
    )


# ---- the loop ---------------------------------------------------------------------------------
def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    bsam: sambayes.BSAM,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    splits: int,
    max_grad_norm: float | None,
) -> torch.Tensor:
    """One bSAM step on the batch (x [batch, features], y [batch]) with the phase API; the mean
    loss at the adversarial points, detached."""
    scaler = accelerator.scaler  # a GradScaler with mixed_precision="fp16" on a GPU, else None
    losses = []
    for j, (xb, yb) in enumerate(sambayes.split_batch(x, y, splits=splits)):
        bsam.sample()  # θ = m + noise
        accelerator.backward(F.cross_entropy(model(xb), yb))
        bsam.perturb(grad_scaler=scaler, sync=j == splits - 1)  # θ = m + ρ g / s; DDP: sync the last pass only
        loss = F.cross_entropy(model(xb), yb)
        accelerator.backward(loss)
        losses.append(loss.detach())
    bsam.update(grad_scaler=scaler, max_grad_norm=max_grad_norm)  # average, update, θ = m
    if scaler is not None:
        scaler.update()  # accelerate updates its scaler only inside AcceleratedOptimizer.step()
    return torch.stack(losses).mean()


def setup(args: argparse.Namespace, accelerator: Accelerator):
    """(model, AcceleratedOptimizer, schedule, train loader, test set), prepared."""
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("gradient_accumulation_steps must be 1: accumulate inside bSAM's passes instead")
    train, test = synthetic_data(args.train, args.test, seed=args.seed)
    model = accelerator.prepare(mlp(train.tensors[0].shape[1], args.hidden, 4, seed=args.seed))
    # from the prepared model (the DDP wrapper when several processes run), then prepared itself
    bsam = sambayes.BSAM(model, **bsam_hyperparameters(args, len(train)))
    optimizer, loader = accelerator.prepare(bsam, train_loader(train, args.batch_size, args.seed))
    # a plain schedule, stepped once per update (accelerate's wrapper steps it once per process)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer.optimizer, T_max=args.epochs * len(loader))
    return model, optimizer, schedule, loader, test


def train(args: argparse.Namespace, accelerator: Accelerator, model, optimizer, schedule, loader) -> int:
    """Train for ``args.epochs`` epochs; returns the number of steps taken."""
    bsam = optimizer.optimizer  # the sambayes optimizer inside accelerate's AcceleratedOptimizer
    done = 0
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = train_step(accelerator, model, bsam, x, y, splits=args.splits, max_grad_norm=args.max_grad_norm)
            schedule.step()
            done += 1
        accelerator.print(f"epoch {epoch + 1}: loss {loss.item():.4f} (last batch, at the adversarial point)")
    return done


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=1, help="sub-batches per batch (m-sharpness)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train", type=int, default=2048, help="training examples")
    parser.add_argument("--test", type=int, default=1024, help="test examples")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--prior-precision", type=float, default=1.0)
    parser.add_argument("--data-factor", type=float, default=4.0, help="num_data = factor x training examples")
    parser.add_argument("--max-grad-norm", type=float, default=None)
    parser.add_argument("--samples", type=int, default=16, help="posterior samples of the Bayesian model average")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.splits < 1:
        parser.error(f"--splits {args.splits}: must be >= 1")
    if not 0 < args.batch_size <= args.train or args.batch_size % args.splits:
        parser.error(f"--batch-size {args.batch_size}: at most --train and a multiple of --splits")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    model, optimizer, schedule, loader, test = setup(args, accelerator)
    start = time.perf_counter()
    steps = train(args, accelerator, model, optimizer, schedule, loader)
    seconds = time.perf_counter() - start

    net = accelerator.unwrap_model(model)
    x, y = (t.to(accelerator.device) for t in test.tensors)
    mean = sambayes.predict(net, optimizer.optimizer, x, samples=0)
    bma = sambayes.predict(net, optimizer.optimizer, x, samples=args.samples)
    results = {
        "steps": steps,
        "accuracy_mean": (mean.argmax(dim=1) == y).float().mean().item(),
        "accuracy_bma": (bma.argmax(dim=1) == y).float().mean().item(),
        "seconds": seconds,
    }
    accelerator.print(
        f"{steps} steps in {seconds:.1f} s: test accuracy {100 * results['accuracy_mean']:.1f} % at the mean, "
        f"{100 * results['accuracy_bma']:.1f} % ({args.samples}-sample BMA)"
    )
    return results


if __name__ == "__main__":
    main()
