"""The demo's figures (matplotlib, imported only when a figure is drawn): reliability
diagrams, training curves, and SAM against bSAM on two moons."""

from __future__ import annotations

import pathlib
from typing import Any

import torch
import torch.nn.functional as F

from sambayes import BSAM, SAM, metrics

from .models import MLP
from .training import _bma, _probs_at_mean, lr_factor


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
