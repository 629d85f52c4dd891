"""The demo's training: the recipe, the learning-rate schedule, the optimizers, training,
evaluation and the summary over seeds."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sambayes import BSAM, SAM, metrics, split_batch

from .data import Data
from .models import MLP

METHODS = ("SGD", "Adam", "SAM", "bSAM")
METRICS = ("accuracy", "nll", "ece", "auroc", "ood_auroc", "train_s")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of the demo. The bSAM values are the paper's recipe adapted to
    1,347 images; ``examples/sweep_digits.py`` is the evidence for each change."""

    epochs: int = 30
    batch_size: int = 64
    warmup_epochs: int = 3  # linear warm-up, then cosine decay to 0 (every method)
    hidden: tuple[int, ...] = (128,)
    # SGD and SAM-SGD: heavy-ball momentum 0.9, δ = prior_precision / N
    sgd_lr: float = 0.4
    sgd_prior_precision: float = 1.0
    adam_lr: float = 0.01
    adam_prior_precision: float = 0.1
    sam_lr: float = 0.4
    sam_rho: float = 0.2
    sam_splits: int = 4
    # bSAM: α, β, ρ, k, prior precision, γ, s0 as in ALGORITHM.md; N = data_factor · n_train
    bsam_lr: float = 1.0
    bsam_betas: tuple[float, float] = (0.9, 0.99)
    bsam_rho: float = 0.05
    bsam_splits: int = 4
    bsam_prior_precision: float = 1.0
    bsam_data_factor: float = 4.0  # a tempered posterior, as the paper's N = 4 × 50,000; see the sweep
    bsam_damping: float = 0.1
    bsam_init_precision: float = 1.0
    samples: int = 32  # posterior samples in the Bayesian model average
    ece_bins: int = 20

    def quick(self) -> Recipe:
        """A few-second version for tests: 2 epochs, 4 samples."""
        return dataclasses.replace(self, epochs=2, warmup_epochs=1, samples=4)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps (from 1/warmup to 1), then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(method: str, model: torch.nn.Module, recipe: Recipe, num_train: int, seed: int, backend: str):
    """The optimizer of ``method`` (one of :data:`METHODS`) with the recipe's hyperparameters."""
    params = model.parameters()
    if method == "SGD":
        return torch.optim.SGD(
            params, lr=recipe.sgd_lr, momentum=0.9, weight_decay=recipe.sgd_prior_precision / num_train
        )
    if method == "Adam":
        return torch.optim.Adam(params, lr=recipe.adam_lr, weight_decay=recipe.adam_prior_precision / num_train)
    if method == "SAM":
        return SAM(
            params,
            lr=recipe.sam_lr,
            rho=recipe.sam_rho,
            momentum=0.9,
            weight_decay=recipe.sgd_prior_precision / num_train,
            backend=backend,
        )
    if method == "bSAM":
        num_data = recipe.bsam_data_factor * num_train
        return BSAM(
            params,
            num_data=num_data,
            lr=recipe.bsam_lr,
            betas=recipe.bsam_betas,
            rho=recipe.bsam_rho,
            weight_decay=recipe.bsam_prior_precision / num_data,
            damping=recipe.bsam_damping,
            init_precision=recipe.bsam_init_precision,
            seed=seed,
            backend=backend,
        )
    raise ValueError(f"method={method!r}: choose one of {METHODS}")


class Trained(NamedTuple):
    model: torch.nn.Module
    optimizer: Any
    curves: dict[str, list[float]]  # per epoch: train_loss, test_accuracy, test_nll (at the mean)
    seconds: float  # training wall time, evaluation excluded


def train(
    method: str,
    data: Data,
    recipe: Recipe,
    seed: int,
    backend: str = "auto",
    on_epoch: Callable[[], None] | None = None,
) -> Trained:
    """Train the recipe's MLP with ``method``; ``seed`` fixes init, batch order and bSAM noise.

    The train loss of SAM and bSAM is the loss at their perturbed points (what ``step`` returns).
    """
    device = data.x_train.device
    torch.manual_seed(seed)
    model = MLP(64, recipe.hidden, 10).to(device)
    num_train = len(data.y_train)
    opt = make_optimizer(method, model, recipe, num_train, seed, backend)
    steps_per_epoch = num_train // recipe.batch_size  # drop the last partial batch: sub-batches stay equal
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup))
    splits = {"SAM": recipe.sam_splits, "bSAM": recipe.bsam_splits}.get(method, 1)
    order_generator = torch.Generator().manual_seed(seed)
    curves: dict[str, list[float]] = {"train_loss": [], "test_accuracy": [], "test_nll": []}
    seconds = 0.0
    for _ in range(recipe.epochs):
        start = time.perf_counter()
        order = torch.randperm(num_train, generator=order_generator).to(device)
        losses = []
        for i in range(steps_per_epoch):
            batch = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            x, y = data.x_train[batch], data.y_train[batch]
            if splits > 1:
                subs = split_batch(x, y, splits=splits)

                def closure(j: int, subs=subs) -> torch.Tensor:
                    loss = F.cross_entropy(model(subs[j][0]), subs[j][1])
                    loss.backward()
                    return loss

                loss = opt.step(closure, splits=splits)
            elif method in ("SAM", "bSAM"):

                def closure(x=x, y=y) -> torch.Tensor:
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                loss = opt.step(closure)
            else:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            schedule.step()
            losses.append(loss.detach())
        seconds += time.perf_counter() - start
        probs = _probs_at_mean(model, data.x_test)
        curves["train_loss"].append(torch.stack(losses).mean().item())
        curves["test_accuracy"].append(metrics.accuracy(probs, data.y_test))
        curves["test_nll"].append(metrics.nll(probs, data.y_test))
        if on_epoch is not None:
            on_epoch()
    return Trained(model, opt, curves, seconds)


@torch.no_grad()
def _probs_at_mean(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    try:
        return torch.softmax(model(x).double(), dim=-1).cpu()
    finally:
        model.train()


@torch.no_grad()
def _bma(model: torch.nn.Module, opt: BSAM, x: torch.Tensor, samples: int) -> torch.Tensor:
    """Per-sample log-softmax [samples, batch, classes] float64 (sample s: ``sampled_params(seed=s)``)."""
    model.eval()
    try:
        out = []
        for s in range(samples):
            with opt.sampled_params(seed=s):
                out.append(torch.log_softmax(model(x).double(), dim=-1).cpu())
        return torch.stack(out)
    finally:
        model.train()


def evaluate(method: str, trained: Trained, data: Data, recipe: Recipe) -> list[dict[str, Any]]:
    """Rows of metrics (see :data:`METRICS`) plus ``method`` and the test ``probs`` / ``labels``
    kept for the reliability diagram. bSAM gives two rows: at the mean and the BMA."""
    model, opt = trained.model, trained.optimizer
    x_both = torch.cat([data.x_test, data.x_ood])
    n = len(data.y_test)
    predictions = [(method if method != "bSAM" else "bSAM (mean)", _probs_at_mean(model, x_both))]
    bma_nll = None
    if method == "bSAM" and recipe.samples > 0:
        log_probs = _bma(model, opt, x_both, recipe.samples)
        bma = metrics.bma_log_probs(log_probs)
        bma_nll = metrics.bma_nll(log_probs[:, :n], data.y_test)
        predictions.append((f"bSAM ({recipe.samples}-sample BMA)", bma.exp()))
    rows = []
    labels = data.y_test.cpu()
    for name, probs in predictions:
        test, ood = probs[:n], probs[n:]
        rows.append(
            {
                "method": name,
                "accuracy": 100 * metrics.accuracy(test, labels),
                "nll": bma_nll if "BMA" in name else metrics.nll(test, labels),
                "ece": metrics.ece(test, labels, bins=recipe.ece_bins),
                "auroc": metrics.auroc(test, labels),
                "ood_auroc": metrics.ood_auroc(test, ood),
                "train_s": trained.seconds,
                "probs": test,
                "labels": labels,
            }
        )
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method, in first-seen order: ``{metric}_mean``, ``{metric}_std`` (sample std,
    0 for one seed) and ``seeds``."""
    names = list(dict.fromkeys(r["method"] for r in rows))
    table = []
    for name in names:
        runs = [r for r in rows if r["method"] == name]
        row: dict[str, Any] = {"method": name, "seeds": len(runs)}
        for key in METRICS:
            values = [r[key] for r in runs]
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(row)
    return table
