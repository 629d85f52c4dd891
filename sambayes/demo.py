"""``python -m sambayes demo``: SGD, Adam, SAM-SGD and bSAM on scikit-learn's handwritten
digits, compared on accuracy, calibration and uncertainty, with plots.

The data are the 1,797 bundled 8×8 digits (no download), split once and for all
(permutation seed 0) into 1,347 training and 450 test images. The shifted
(out-of-distribution) set is the 450 test images rotated by 90°. Every method trains
the same MLP with the same warm-up + cosine schedule; each seed fixes the
initialisation, the batch order and bSAM's noise, so the same seeds give the same table.

Needs the ``[demo]`` extra (scikit-learn, matplotlib), imported only when used;
``--no-plots`` needs scikit-learn only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import backends, metrics
from ._base import split_batch
from ._models import MLP
from .bsam import BSAM
from .sam import SAM

METHODS = ("SGD", "Adam", "SAM", "bSAM")
NUM_TEST = 450  # of the 1,797 digits; the rest train
METRICS = ("accuracy", "nll", "ece", "auroc", "ood_auroc", "train_s")
_HEADERS = {
    "accuracy": "accuracy %",
    "nll": "NLL",
    "ece": "ECE",
    "auroc": "AUROC",
    "ood_auroc": "OOD AUROC",
    "train_s": "train s",
}


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


class Data(NamedTuple):
    """Float32 images [n, 8, 8] in [0, 1] and int64 labels [n]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_ood: torch.Tensor  # the test images rotated by 90°: same pixels, not a digit pose seen in training


def _missing_extras(plots: bool) -> list[str]:
    """The packages of the ``[demo]`` extra that cannot be imported (matplotlib only for ``plots``)."""
    missing = []
    for module in ("sklearn", "matplotlib") if plots else ("sklearn",):
        try:
            __import__(module)
        except ImportError:
            missing.append({"sklearn": "scikit-learn"}.get(module, module))
    return missing


def load_digits(validation: bool = False, device: torch.device | str = "cpu") -> Data:
    """The digits split: 1,347 train / 450 test (fixed permutation, seed 0).

    ``validation=True`` holds out the last 300 training images as the evaluation set
    instead (for tuning; the test images stay unseen).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[NUM_TEST:], order[:NUM_TEST]
    if validation:
        train, test = train[:-300], train[-300:]
    x_test = images[test]
    data = Data(images[train], labels[train], x_test, labels[test], torch.rot90(x_test, 1, dims=(1, 2)))
    return Data(*(t.to(device) for t in data))


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


def _cell(row: dict[str, Any], key: str) -> str:
    digits = {"accuracy": 2, "train_s": 1}.get(key, 4)
    return f"{row[key + '_mean']:.{digits}f} ± {row[key + '_std']:.{digits}f}"


def format_markdown(table: list[dict[str, Any]]) -> str:
    """The summary as a markdown table, mean ± std over seeds."""
    lines = [
        "| method | " + " | ".join(_HEADERS[k] for k in METRICS) + " |",
        "| --- |" + " ---: |" * len(METRICS),
    ]
    for row in table:
        lines.append(f"| {row['method']} | " + " | ".join(_cell(row, k) for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: list[dict[str, Any]], rows: list[dict[str, Any]], out: pathlib.Path) -> None:
    """``results.md`` (summary), ``results.csv`` (summary) and ``runs.csv`` (one row per method and seed)."""
    (out / "results.md").write_text(format_markdown(table))
    summary_fields = ["method", "seeds"] + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=summary_fields)
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "seed"] + list(METRICS))
        writer.writeheader()
        for row in rows:
            writer.writerow({"method": row["method"], "seed": row["seed"]} | {k: f"{row[k]:.6g}" for k in METRICS})


# ---- plots ------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the object API needs no display backend

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_reliability(rows: list[dict[str, Any]], path: pathlib.Path, bins: int = 20) -> None:
    """One reliability diagram per method (test predictions of all seeds pooled), with the
    number of points per confidence bin underneath (log scale: a bin of one point shows).

    Each panel's title gives the *pooled* ECE, of all seeds' points together; the table's
    ECE is the mean of the per-seed ECEs, so the two differ slightly.
    """
    from matplotlib.patches import Patch

    names = list(dict.fromkeys(r["method"] for r in rows))
    fig = _figure(2.9 * len(names), 4.8)
    axes = fig.subplots(2, len(names), sharex=True, sharey="row", height_ratios=(3, 1), squeeze=False)
    width = 1.0 / bins
    over = {"facecolor": "none", "edgecolor": "tab:red", "hatch": "////", "lw": 0.8}
    under = {"facecolor": "none", "edgecolor": "tab:orange", "hatch": "\\\\\\\\", "lw": 0.8}
    most = 1
    for column, name in enumerate(names):
        top, bottom = axes[0, column], axes[1, column]
        runs = [r for r in rows if r["method"] == name]
        probs, labels = torch.cat([r["probs"] for r in runs]), torch.cat([r["labels"] for r in runs])
        rel = metrics.reliability(probs, labels, bins)
        full = rel.counts > 0
        centers = ((rel.edges[1:] + rel.edges[:-1]) / 2)[full].numpy()
        acc, conf = rel.accuracy[full], rel.confidence[full]
        top.bar(centers, acc.numpy(), width=width, color="tab:blue", edgecolor="white", lw=0.5)
        # the gap spans accuracy .. mean confidence: red above the accuracy bar, orange inside it
        overconfident = (conf > acc).numpy()
        for mask, style in ((overconfident, over), (~overconfident, under)):
            top.bar(
                centers[mask],
                (conf - acc).abs().numpy()[mask],
                bottom=torch.minimum(acc, conf).numpy()[mask],
                width=width,
                **style,
            )
        top.plot([0, 1], [0, 1], "k--", lw=0.8)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(f"{name}\npooled ECE {rel.ece:.4f}", fontsize=9)
        bottom.bar(centers, rel.counts[full].numpy(), width=width, color="0.5")
        bottom.set_yscale("log")
        bottom.set_xlabel("confidence (max probability)", fontsize=8)
        most = max(most, int(rel.counts.max()))
    axes[1, 0].set_ylim(0.5, 2 * most)  # below 1, so that a bin holding one point has a visible bar
    axes[0, 0].set_ylabel("accuracy")
    axes[1, 0].set_ylabel("points (log)", fontsize=8)
    handles = [
        Patch(color="tab:blue", label="accuracy of the bin"),
        Patch(**over, label="gap, overconfident: mean confidence above accuracy"),
        Patch(**under, label="gap, underconfident: mean confidence below accuracy"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    fig.suptitle(
        f"Reliability on the digits test set ({bins} bins, all seeds pooled; dashed: perfect calibration)",
        fontsize=10,
    )
    fig.savefig(path, bbox_inches="tight")


def plot_curves(curves: dict[str, list[dict[str, list[float]]]], path: pathlib.Path) -> None:
    """Per-epoch train loss, test error and test NLL at the mean; mean over seeds, band = min..max.

    The test error (1 − accuracy) is on a log scale, so that epoch 1 and the last epochs'
    fractions of a percent both show.
    """
    fig = _figure(12, 3.4)
    axes = fig.subplots(1, 3)
    panels = (
        ("train_loss", "train loss (SAM, bSAM: at the perturbed point)", True),
        ("test_error", "test error (1 − accuracy, at the mean)", True),
        ("test_nll", "test NLL (at the mean)", True),
    )
    for ax, (key, title, log) in zip(axes, panels):
        for method, runs in curves.items():
            if key == "test_error":
                values = 1 - torch.tensor([run["test_accuracy"] for run in runs], dtype=torch.float64)
            else:
                values = torch.tensor([run[key] for run in runs], dtype=torch.float64)
            epochs = torch.arange(1, values.shape[1] + 1)
            line = ax.plot(epochs, values.mean(0), label=method, lw=1.5)[0]
            ax.fill_between(epochs, values.min(0).values, values.max(0).values, color=line.get_color(), alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].yaxis.set_major_formatter(lambda value, _: f"{100 * value:g} %")
    axes[1].legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight")


def two_moons(
    path: pathlib.Path,
    seed: int = 0,
    steps: int = 800,
    samples: int = 32,
    backend: str = "auto",
    device: torch.device | str = "cpu",
) -> None:
    """The authors' 2D picture: SAM's point estimate next to bSAM's posterior on two moons.

    Both train an MLP (2 → 32 → 32 → 2) full-batch for ``steps`` steps on 200 points
    (N = 200, prior precision 1; SAM: α 0.05, ρ 0.05; bSAM: α 1, β2 0.99, ρ 0.01).
    Shading: confidence (max probability) of SAM at its weights and of bSAM's
    ``samples``-sample BMA. Black line: the decision boundary at the mean; thin lines:
    boundaries of 10 posterior samples (fewer if ``samples`` < 10).
    """
    from sklearn.datasets import make_moons

    points, classes = make_moons(n_samples=200, noise=0.15, random_state=seed)
    x = torch.tensor(points, dtype=torch.float32, device=device)
    y = torch.tensor(classes, dtype=torch.int64, device=device)
    grid_x, grid_y = torch.meshgrid(torch.linspace(-2.5, 3.5, 150), torch.linspace(-2.0, 2.5, 150), indexing="xy")
    grid = torch.stack([grid_x.flatten(), grid_y.flatten()], 1).to(device)

    fits = {}
    for method in ("SAM", "bSAM"):
        torch.manual_seed(seed)
        model = MLP(2, (32, 32), 2).to(device)
        if method == "SAM":
            opt = SAM(model.parameters(), lr=0.05, rho=0.05, momentum=0.9, weight_decay=1 / len(y), backend=backend)
        else:
            opt = BSAM(
                model.parameters(),
                num_data=len(y),
                lr=1.0,
                betas=(0.9, 0.99),
                rho=0.01,
                weight_decay=1 / len(y),
                seed=seed,
                backend=backend,
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, steps // 10))

        def closure(model=model) -> torch.Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(steps):
            opt.step(closure)
            schedule.step()
        fits[method] = (model, opt)

    from matplotlib.lines import Line2D

    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    gx, gy = grid_x.numpy(), grid_y.numpy()
    shape = grid_x.shape
    levels = torch.linspace(0.5, 1.0, 11).numpy()
    for ax, (method, (model, opt)) in zip(axes, fits.items()):
        mean_probs = _probs_at_mean(model, grid)[:, 1].reshape(shape)
        if method == "bSAM":
            log_probs = _bma(model, opt, grid, samples)
            probs = metrics.bma_log_probs(log_probs).exp()[:, 1].reshape(shape)
            for s in range(min(10, samples)):
                ax.contour(
                    gx,
                    gy,
                    log_probs[s, :, 1].exp().reshape(shape).numpy(),
                    levels=[0.5],
                    colors="tab:red",
                    linewidths=0.7,
                    alpha=0.8,
                )
            title = f"bSAM: {samples}-sample BMA; red: {min(10, samples)} posterior samples"
        else:
            probs = mean_probs
            title = "SAM: point estimate"
        conf = torch.maximum(probs, 1 - probs).numpy()
        filled = ax.contourf(gx, gy, conf, levels=levels, cmap="viridis", extend="min")
        ax.contour(gx, gy, mean_probs.numpy(), levels=[0.5], colors="black", linewidths=1.8)
        pts = points
        for label, color in ((0, "white"), (1, "tab:orange")):
            ax.scatter(
                pts[classes == label, 0],
                pts[classes == label, 1],
                s=10,
                c=color,
                edgecolors="black",
                linewidths=0.5,
                label=f"class {label} (training point)",
            )
        handles, _ = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="black", lw=1.8, label="decision boundary at the mean"))
        if method == "bSAM":
            handles.append(Line2D([], [], color="tab:red", lw=0.7, label="boundaries of posterior samples"))
        ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.9)
        ax.set_title(title + "; black: boundary at the mean", fontsize=9)
        ax.set_xlim(-2.5, 3.5)
        ax.set_ylim(-2.0, 2.5)
    fig.colorbar(filled, ax=axes, label="predictive confidence (max probability)", shrink=0.9)
    fig.savefig(path, bbox_inches="tight")


# ---- the command ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="2 epochs, 4 BMA samples, short two-moons fit (for tests)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        metavar="SEED",
        help="seeds to run and average over (default: 0 1 2)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--backend", default="auto", choices=backends.BACKENDS, help="sambayes tier (default: auto)")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("sambayes-demo"),
        help="folder for the table and the figures (default: ./sambayes-demo)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to train")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for this tiny MLP, and thread-count-proof results)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the figures (then matplotlib is not needed)")


def tier_name(backend: str, device: torch.device | str) -> str:
    """The tier that ``backend`` resolves to on ``device`` (e.g. ``"eager"``)."""
    module = backends.resolve(backend, device).__name__.rsplit("._", 1)[-1]
    return {"cext": torch.device(device).type}.get(module, module)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_arguments(args: argparse.Namespace) -> None:
    """Check everything :func:`run` needs before any training starts, and create ``args.out``.

    Raises ValueError with one line saying which flag is wrong and why (the command turns
    it into a usage error, exit code 2).
    """
    missing = _missing_extras(plots=not args.no_plots)
    if missing:
        raise ValueError(f"the demo needs {' and '.join(missing)}: pip install 'sambayes[demo]'")
    for flag, values in (("--seeds", args.seeds), ("--methods", args.methods)):
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise ValueError(f"{flag}: {repeated[0]} is given twice")
    negative = [seed for seed in args.seeds if seed < 0]
    if negative:
        raise ValueError(f"--seeds: {negative[0]} is negative; seeds are integers >= 0")
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: need at least 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this PyTorch ({torch.__version__}) sees no CUDA device")
    if device.type == "meta":
        raise ValueError("--device meta: meta tensors hold no data to train on")
    try:
        torch.empty(1, device=device)  # an index out of range, or a device type this build lacks
    except Exception as exc:  # noqa: BLE001 - whatever the device type, the reason is in the message
        raise ValueError(f"--device {args.device} is not usable here: {_first_line(exc)}") from None
    try:
        backends.resolve(args.backend, device)
    except RuntimeError as exc:
        raise ValueError(f"--backend {args.backend}: {_first_line(exc)}") from None
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, or no permission
        raise ValueError(f"--out {args.out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(args.out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: the folder is not writable")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train, evaluate, print and write everything; returns the summary table.

    ValueError (before any training) if an argument is wrong; see :func:`check_arguments`.
    """
    check_arguments(args)
    from tqdm.auto import tqdm

    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    recipe = Recipe().quick() if args.quick else Recipe()
    out = args.out
    tier = tier_name(args.backend, args.device)
    print(
        f"sambayes demo: digits, {len(args.seeds)} seed(s) {args.seeds}, device {args.device}, "
        f"backend {args.backend} -> {tier}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    data = load_digits(device=args.device)
    start = time.perf_counter()
    rows, curves = [], {}
    with tqdm(total=len(args.methods) * len(args.seeds) * recipe.epochs, unit="epoch", file=sys.stderr) as bar:
        for method in args.methods:
            for seed in args.seeds:
                bar.set_description(f"{method} seed {seed}")
                trained = train(method, data, recipe, seed, args.backend, on_epoch=lambda: bar.update(1))
                curves.setdefault(method, []).append(trained.curves)
                rows += [dict(r, seed=seed) for r in evaluate(method, trained, data, recipe)]
    table = summarize(rows)
    print()
    print(format_markdown(table))
    write_table(table, rows, out)
    written = ["results.md", "results.csv", "runs.csv"]
    if not args.no_plots:
        plot_reliability(rows, out / "reliability.png", recipe.ece_bins)
        plot_curves(curves, out / "training_curves.png")
        two_moons(
            out / "two_moons.png",
            seed=args.seeds[0],
            steps=100 if args.quick else 800,
            samples=recipe.samples,
            backend=args.backend,
            device=args.device,
        )
        written += ["reliability.png", "training_curves.png", "two_moons.png"]
    print(f"wrote {', '.join(written)} to {out}/ in {time.perf_counter() - start:.1f} s (backend {tier})")
    return table
