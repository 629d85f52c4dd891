"""The demo's training: the recipe, the learning-rate schedule, the optimizers, training,
evaluation (clean, rotated and graded shifts) and the summary over seeds."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sambayes import BSAM, IVON, SAM, metrics, split_batch

from .data import SHIFTS, Data, shift_images
from .models import MLP

#: IVON is ivon-opt's, IVON (sambayes) sambayes's at the same hyperparameters, trained by the same loop
METHODS = ("SGD", "Adam", "SAM", "bSAM", "IVON", "IVON (sambayes)")
POSTERIOR_METHODS = ("bSAM", "IVON", "IVON (sambayes)")  # the methods with a posterior: a row at the mean and a BMA row
METRICS = ("accuracy", "nll", "ece", "auroc", "ood_auroc", "train_s")
SHIFT_METRICS = ("accuracy", "nll", "ece")


def ivon_available() -> bool:
    """Whether ``ivon`` (the ``ivon-opt`` package, optional) can be imported."""
    try:
        import ivon  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of the demo. The bSAM values are the paper's recipe adapted to
    1,347 images; every method's values, IVON's included, were picked on the validation
    split, and ``examples/sweep_digits.py`` is the evidence for each."""

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
    bsam_state_dtype: torch.dtype | None = None  # torch.bfloat16: precision and momentum in bfloat16
    # IVON (Shen et al., 2024): α, (β1, β2), h0, prior precision (δ = prior_precision / ess) and
    # MC samples per step; ess = n_train, the training-set size, untempered. ivon-opt scales α by
    # (h0 + δ), so α acts like SGD's α / (1 − momentum) = 4 here; β2 is the authors' 1 − 1e-5
    ivon_lr: float = 4.0
    ivon_betas: tuple[float, float] = (0.9, 0.99999)
    ivon_hess_init: float = 0.2
    ivon_prior_precision: float = 1.0
    ivon_train_samples: int = 1
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
    """The optimizer of ``method`` (one of :data:`METHODS`) with the recipe's hyperparameters.

    ivon-opt's IVON draws its noise from torch's global generator (``ivon.IVON`` takes no seed), which
    :func:`train` seeds with ``seed``; sambayes's takes ``seed``.
    """
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
            state_dtype=recipe.bsam_state_dtype,
        )
    if method in ("IVON", "IVON (sambayes)"):
        hyper = dict(
            lr=recipe.ivon_lr,
            ess=num_train,
            hess_init=recipe.ivon_hess_init,
            beta1=recipe.ivon_betas[0],
            beta2=recipe.ivon_betas[1],
            weight_decay=recipe.ivon_prior_precision / num_train,
        )
        if method == "IVON (sambayes)":
            return IVON(params, **hyper, seed=seed, backend=backend)
        import ivon

        return ivon.IVON(params, **hyper)
    raise ValueError(f"method={method!r}: choose one of {METHODS}")


class Trained(NamedTuple):
    model: torch.nn.Module
    optimizer: Any
    curves: dict[str, list[float]]  # per epoch: train_loss, test_accuracy, test_nll (bSAM, IVON: at the mean)
    seconds: float  # training wall time, evaluation excluded


def train(
    method: str,
    data: Data,
    recipe: Recipe,
    seed: int,
    backend: str = "auto",
    on_epoch: Callable[[], None] | None = None,
) -> Trained:
    """Train the recipe's MLP with ``method``; ``seed`` fixes init, batch order and the
    noise of bSAM and IVON.

    The train loss of SAM and bSAM is the loss at their perturbed points (what ``step`` returns),
    IVON's the loss at its sampled weights.
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
            elif method in ("IVON", "IVON (sambayes)"):  # the same code for both: ivon-opt's loop runs unchanged
                for _ in range(recipe.ivon_train_samples):  # as its authors train: gradients at sampled weights
                    with opt.sampled_params(train=True):
                        opt.zero_grad(set_to_none=True)
                        loss = F.cross_entropy(model(x), y)
                        loss.backward()
                opt.step()
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


@contextlib.contextmanager
def _sampled(opt: Any, sample: int) -> Iterator[None]:
    """The model holds posterior sample number ``sample`` of ``opt`` (BSAM or an IVON): the same
    weights for the same ``sample``, without touching torch's global generator."""
    if isinstance(opt, (BSAM, IVON)):
        with opt.sampled_params(seed=sample):
            yield
        return
    device = opt.param_groups[0]["params"][0].device  # IVON draws from the global generator
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        torch.manual_seed(sample)
        with opt.sampled_params():
            yield


@torch.no_grad()
def _bma(model: torch.nn.Module, opt: Any, x: torch.Tensor, samples: int) -> torch.Tensor:
    """Per-sample log-softmax [samples, batch, classes] float64 of ``opt``'s posterior (BSAM or
    IVON); sample s is the same on every call (see :func:`_sampled`)."""
    model.eval()
    try:
        out = []
        for s in range(samples):
            with _sampled(opt, s):
                out.append(torch.log_softmax(model(x).double(), dim=-1).cpu())
        return torch.stack(out)
    finally:
        model.train()


def evaluate(method: str, trained: Trained, data: Data, recipe: Recipe, shifts: bool = True) -> list[dict[str, Any]]:
    """Rows of metrics (see :data:`METRICS`) plus ``method``, the test ``probs`` / ``labels``
    kept for the reliability diagram, and (``shifts=True``) ``shift``: a list of dicts
    ``{shift, severity, level, accuracy, nll, ece}`` for every shift of :data:`SHIFTS` at
    severity 0 (the clean test set: the same numbers as the row's) to 5.

    bSAM and IVON give two rows each: at the mean and the BMA.
    """
    model, opt = trained.model, trained.optimizer
    n = len(data.y_test)
    shifted = [(s, k) for s in SHIFTS for k in range(1, len(SHIFTS[s]) + 1)] if shifts else []
    x_all = torch.cat([data.x_test, data.x_ood] + [shift_images(data.x_test, s, k) for s, k in shifted])
    posterior = method in POSTERIOR_METHODS
    predictions = [(f"{method} (mean)" if posterior else method, _probs_at_mean(model, x_all), None)]
    if posterior and recipe.samples > 0:
        log_probs = _bma(model, opt, x_all, recipe.samples)
        predictions.append(
            (f"{method} ({recipe.samples}-sample BMA)", metrics.bma_log_probs(log_probs).exp(), log_probs)
        )
    labels = data.y_test.cpu()

    def scores(probs: torch.Tensor, log_probs: torch.Tensor | None, part: int) -> dict[str, float]:
        rows = slice(part * n, (part + 1) * n)  # part 0: test, 1: rotated, 2 on: shifted
        nll = metrics.nll(probs[rows], labels) if log_probs is None else metrics.bma_nll(log_probs[:, rows], labels)
        accuracy = 100 * metrics.accuracy(probs[rows], labels)
        return {"accuracy": accuracy, "nll": nll, "ece": metrics.ece(probs[rows], labels, bins=recipe.ece_bins)}

    results = []
    for name, probs, log_probs in predictions:
        test, ood = probs[:n], probs[n : 2 * n]
        clean = scores(probs, log_probs, 0)
        row = {"method": name, **clean}
        row |= {
            "auroc": metrics.auroc(test, labels),
            "ood_auroc": metrics.ood_auroc(test, ood),
            "train_s": trained.seconds,
            "probs": test,
            "labels": labels,
        }
        if shifts:
            part = {key: 2 + i for i, key in enumerate(shifted)}
            row["shift"] = [
                {"shift": s, "severity": k, "level": ((0.0,) + SHIFTS[s])[k]}
                | (clean if k == 0 else scores(probs, log_probs, part[s, k]))  # severity 0: the clean test set
                for s in SHIFTS
                for k in range(len(SHIFTS[s]) + 1)
            ]
        results.append(row)
    return results


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method, in first-seen order: ``{metric}_mean``, ``{metric}_std`` (sample std,
    0 for one seed) and ``seeds``."""
    names = list(dict.fromkeys(r["method"] for r in rows))
    table = []
    for name in names:
        runs = [r for r in rows if r["method"] == name]
        table.append({"method": name, "seeds": len(runs)} | mean_std(runs, METRICS))
    return table


def mean_std(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """``{key}_mean`` and ``{key}_std`` (sample std, 0 for one run) of each key over ``runs``."""
    row = {}
    for key in keys:
        values = [r[key] for r in runs]
        row[f"{key}_mean"] = statistics.fmean(values)
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row
