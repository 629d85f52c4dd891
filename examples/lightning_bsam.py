"""Train with bSAM under PyTorch Lightning: automatic optimization, or manual optimization
with the phase API and m-sharpness sub-batches. ::

    python examples/lightning_bsam.py                       # automatic optimization (splits = 1)
    python examples/lightning_bsam.py --manual --splits 4   # manual optimization, 4 sub-batches per batch

The task is synthetic (an MLP learns the labels a random teacher network gives Gaussian
inputs; nothing to download): a few seconds on a CPU. It prints the test accuracy at the
posterior mean and of the Bayesian model average.

**Automatic optimization.** Lightning hands ``optimizer.step`` a closure that runs
``training_step``, zeroes the gradients and calls backward. ``BSAM.step`` calls it twice per
step (at a posterior sample, then at the adversarial point), so ``training_step`` runs twice
per step and the closure leaves exactly the gradients each pass needs; the trajectory is the
one of a plain ``opt.step(closure)`` loop. Lightning's closure takes no sub-batch index:
``splits=1`` only. What to avoid (``BSAMClassifier.on_fit_start`` refuses the first three):

- ``Trainer(gradient_clip_val=...)``: Lightning clips after *each* closure call, the noisy
  pass included, which changes the ascent and the precision. ``max_grad_norm`` here is passed
  to ``step()`` in ``optimizer_step`` and clips the averaged perturbed-point gradient.
- ``Trainer(accumulate_grad_batches=n > 1)``: Lightning runs the closure of the batches it
  accumulates outside the step, at the mean; bSAM discards those gradients when its step
  starts. Accumulate inside the passes with manual optimization instead.
- ``precision="16-mixed"`` (a GradScaler): Lightning runs the closure once itself and then
  calls ``step()`` without a closure (bSAM raises a TypeError). Use manual optimization, which
  hands Lightning's scaler to the phases. ``"bf16-mixed"`` needs no scaler and works.
- Metrics logged in ``training_step`` see both passes; log in ``on_train_batch_end``, whose
  ``outputs`` are those of the last closure call (the loss at the adversarial point).

**Manual optimization.** ``training_step`` runs the phases itself, with
``self.manual_backward``. ``self.optimizers()`` is Lightning's wrapper, whose attributes are
not the optimizer's (a phase called on it keeps the step's bookkeeping on the wrapper): call
the phases on the sambayes optimizer, ``self.optimizers().optimizer``. Lightning counts manual
steps (``trainer.global_step``, which ``max_steps`` and step-based checkpoints read) only in
the wrapper's ``step()``, which the phase API does not call: ``count_step`` counts each update.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import sambayes


# ---- data and model -------------------------------------------------------------------------
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
    """Shuffled by its own seeded generator, so a run's data order does not depend on anything
    else; the last partial batch is dropped, so that ``splits`` divides every batch."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)


def mlp(features: int, hidden: int, classes: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


# ---- Lightning ------------------------------------------------------------------------------
def count_step(trainer: L.Trainer) -> None:
    """Count one manual-optimization step in ``trainer.global_step``.

    Lightning counts a manual step when ``LightningOptimizer.step()`` runs, and the phase API
    does not call it: without this, ``global_step`` stays 0, ``max_steps`` never ends training
    and step-based checkpoints never fire (Lightning issue #16143). This is the counter that
    ``step()`` advances, saved in Lightning's checkpoints.
    """
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


class BSAMClassifier(L.LightningModule):
    """A classifier ``net`` trained with ``sambayes.BSAM(**bsam)`` and a cosine learning-rate
    schedule over the run; ``manual`` selects manual optimization (phase API, ``splits``
    sub-batches per batch). ``max_grad_norm`` clips the averaged perturbed-point gradient."""

    def __init__(
        self,
        net: torch.nn.Module,
        bsam: dict,
        *,
        manual: bool = False,
        splits: int = 1,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__()
        if splits > 1 and not manual:
            raise ValueError(f"splits={splits} needs manual optimization: Lightning's closure takes no sub-batch index")
        self.net, self.bsam, self.splits, self.max_grad_norm = net, bsam, splits, max_grad_norm
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self):
        # the module Lightning trains: under strategy="ddp" its DDP wrapper, so that the optimizer
        # skips the noisy pass's all-reduce and every replica draws its own noise
        optimizer = sambayes.BSAM(self.trainer.strategy.model, **self.bsam)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        if self.automatic_optimization:
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        return {"optimizer": optimizer, "lr_scheduler": schedule}  # stepped in training_step

    def on_fit_start(self) -> None:
        trainer = self.trainer
        if not self.automatic_optimization:
            return  # Lightning itself refuses gradient clipping and accumulation with manual optimization
        if trainer.gradient_clip_val:
            raise ValueError(
                "Trainer(gradient_clip_val=...) clips the gradients of both passes, the noisy one included; "
                "pass max_grad_norm to BSAMClassifier instead (it clips the averaged perturbed-point gradient)"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "Trainer(accumulate_grad_batches > 1) computes the accumulated gradients outside bSAM's step, "
                "at the mean, and bSAM discards them; accumulate inside the passes with manual optimization"
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "precision='16-mixed' runs Lightning's closure outside bSAM's step; use manual optimization "
                "(manual=True), which hands the GradScaler to the phases, or precision='bf16-mixed'"
            )

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            return F.cross_entropy(self(x), y)  # called twice per step, by BSAM.step through the closure
        return self._phases(x, y)

    def _phases(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One bSAM step with the phase API; the mean loss at the adversarial points, detached."""
        opt = self.optimizers().optimizer  # the sambayes optimizer, not Lightning's wrapper
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # precision="16-mixed"
        losses = []
        for j, (xb, yb) in enumerate(sambayes.split_batch(x, y, splits=self.splits)):
            opt.sample()  # θ = m + noise
            self.manual_backward(F.cross_entropy(self(xb), yb))  # scaled by Lightning with "16-mixed"
            opt.perturb(grad_scaler=scaler, sync=j == self.splits - 1)  # θ = m + ρ g / s; DDP: sync the last only
            loss = F.cross_entropy(self(xb), yb)
            self.manual_backward(loss)
            losses.append(loss.detach())
        opt.update(grad_scaler=scaler, max_grad_norm=self.max_grad_norm)  # average, update, θ = m
        if scaler is not None:
            scaler.update()  # Lightning updates its scaler only inside LightningOptimizer.step()
        self.lr_schedulers().step()
        count_step(self.trainer)
        return torch.stack(losses).mean()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure) -> None:
        # automatic optimization: BSAM.step calls Lightning's closure twice; keyword arguments reach it
        optimizer.step(closure=optimizer_closure, max_grad_norm=self.max_grad_norm)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        # bSAM zeroes the gradients it consumes; Lightning would set .grad to None before each pass
        # (harmless, but every pass would then allocate new gradient tensors)
        pass

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if outputs:  # empty when training_step returned None
            self.log("train_loss", outputs["loss"], prog_bar=True)  # the last pass's: at the adversarial point

    def validation_step(self, batch, batch_idx) -> None:
        x, y = batch  # between steps the parameters hold the posterior mean
        self.log("val_acc", (self(x).argmax(dim=1) == y).float().mean(), prog_bar=True)


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


def build(args: argparse.Namespace):
    """(module, train loader, test set) for ``args``."""
    train, test = synthetic_data(args.train, args.test, seed=args.seed)
    net = mlp(train.tensors[0].shape[1], args.hidden, 4, seed=args.seed)
    module = BSAMClassifier(
        net,
        bsam_hyperparameters(args, len(train)),
        manual=args.manual,
        splits=args.splits,
        max_grad_norm=args.max_grad_norm,
    )
    return module, train_loader(train, args.batch_size, args.seed), test


def make_trainer(args: argparse.Namespace, **overrides) -> L.Trainer:
    options = dict(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        enable_progress_bar=not args.no_progress,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**options, **overrides})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manual", action="store_true", help="manual optimization with the phase API")
    parser.add_argument("--splits", type=int, default=1, help="sub-batches per batch (m-sharpness; needs --manual)")
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
    parser.add_argument("--accelerator", default="cpu", help="Lightning's accelerator: cpu, gpu, auto")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed; 16-mixed (GPU) needs --manual")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.splits < 1:
        parser.error(f"--splits {args.splits}: must be >= 1")
    if args.splits > 1 and not args.manual:
        parser.error("--splits > 1 needs --manual: Lightning's closure takes no sub-batch index")
    if not 0 < args.batch_size <= args.train or args.batch_size % args.splits:
        parser.error(f"--batch-size {args.batch_size}: at most --train and a multiple of --splits")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    module, loader, test = build(args)
    trainer = make_trainer(args)
    start = time.perf_counter()
    trainer.fit(module, loader, DataLoader(test, batch_size=len(test)))
    seconds = time.perf_counter() - start

    opt = trainer.optimizers[0]  # the sambayes optimizer (trainer.optimizers are not wrapped)
    x, y = (t.to(module.device) for t in test.tensors)
    mean = sambayes.predict(module.net, opt, x, samples=0)
    bma = sambayes.predict(module.net, opt, x, samples=args.samples)
    results = {
        "mode": "manual" if args.manual else "automatic",
        "steps": trainer.global_step,
        "accuracy_mean": (mean.argmax(dim=1) == y).float().mean().item(),
        "accuracy_bma": (bma.argmax(dim=1) == y).float().mean().item(),
        "seconds": seconds,
    }
    print(
        f"{results['mode']} optimization, {results['steps']} steps in {seconds:.1f} s: test accuracy "
        f"{100 * results['accuracy_mean']:.1f} % at the mean, {100 * results['accuracy_bma']:.1f} % "
        f"({args.samples}-sample BMA)"
    )
    return results


if __name__ == "__main__":
    main()
