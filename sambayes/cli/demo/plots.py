"""The demo's figures (matplotlib, imported only when a figure is drawn): reliability
diagrams, training curves, accuracy / NLL / ECE under graded shifts, and SAM against
bSAM on two moons.

Only the methods with a posterior (bSAM, both IVONs) are labelled "(mean)" or "BMA": the others
have one set of weights and no mean to speak of."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from sambayes import BSAM, SAM, metrics

from .data import SHIFT_UNITS, SHIFTS
from .models import MLP
from .training import METHODS, POSTERIOR_METHODS, SHIFT_METRICS, _bma, _probs_at_mean, lr_factor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the object API needs no display backend

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_reliability(rows: list[dict[str, Any]], path: pathlib.Path, bins: int = 20) -> Figure:
    """One reliability diagram per method (test predictions of all seeds pooled), with the
    number of points per confidence bin underneath (log scale: a bin of one point shows);
    at most four methods side by side, then the next row.

    Each panel's title gives the *pooled* ECE, of all seeds' points together; the table's
    ECE is the mean of the per-seed ECEs, so the two differ slightly.
    """
    from matplotlib.patches import Patch

    names = list(dict.fromkeys(r["method"] for r in rows))
    columns = min(4, len(names))
    lines = -(-len(names) // columns)  # rows of methods
    fig = _figure(2.9 * columns, 4.8 * lines)
    axes = fig.subplots(2 * lines, columns, sharey="row", height_ratios=(3, 1) * lines, squeeze=False)
    for i in range(len(names), lines * columns):  # the empty places of the last row
        axes[2 * (i // columns), i % columns].set_visible(False)
        axes[2 * (i // columns) + 1, i % columns].set_visible(False)
    width = 1.0 / bins
    over = {"facecolor": "none", "edgecolor": "tab:red", "hatch": "////", "lw": 0.8}
    under = {"facecolor": "none", "edgecolor": "tab:orange", "hatch": "\\\\\\\\", "lw": 0.8}
    most = 1
    for i, name in enumerate(names):
        top, bottom = axes[2 * (i // columns), i % columns], axes[2 * (i // columns) + 1, i % columns]
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
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("confidence (max probability)", fontsize=8)
        most = max(most, int(rel.counts.max()))
    for line in range(lines):
        axes[2 * line + 1, 0].set_ylim(0.5, 2 * most)  # below 1, so that a bin holding one point has a visible bar
        axes[2 * line, 0].set_ylabel("accuracy")
        axes[2 * line + 1, 0].set_ylabel("points (log)", fontsize=8)
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
    return fig


def plot_curves(curves: dict[str, list[dict[str, list[float]]]], path: pathlib.Path) -> Figure:
    """Per-epoch train loss, test error and test NLL; mean over seeds, band = min..max.

    bSAM and IVON are evaluated at their posterior mean (labelled "(mean)"); the other
    methods at their weights. The test error (1 − accuracy) is on a log scale, so that
    epoch 1 and the last epochs' fractions of a percent both show.
    """
    fig = _figure(12, 3.4)
    axes = fig.subplots(1, 3)
    panels = (
        ("train_loss", "train loss (SAM, bSAM: perturbed point; IVON: sampled)", True),
        ("test_error", "test error (1 − accuracy)", True),
        ("test_nll", "test NLL", True),
    )
    for ax, (key, title, log) in zip(axes, panels):
        for method, runs in curves.items():
            if key == "test_error":
                values = 1 - torch.tensor([run["test_accuracy"] for run in runs], dtype=torch.float64)
            else:
                values = torch.tensor([run[key] for run in runs], dtype=torch.float64)
            epochs = torch.arange(1, values.shape[1] + 1)
            label = f"{method} (mean)" if method in POSTERIOR_METHODS and key != "train_loss" else method
            line = ax.plot(epochs, values.mean(0), label=label, lw=1.5)[0]
            ax.fill_between(epochs, values.min(0).values, values.max(0).values, color=line.get_color(), alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].yaxis.set_major_formatter(lambda value, _: f"{100 * value:g} %")
    axes[1].legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    return fig


def _family(name: str) -> str:
    """The method of a table row: the longest method of :data:`METHODS` it starts with ("IVON (sambayes) (mean)"
    is IVON (sambayes)'s, "IVON (mean)" ivon-opt's)."""
    return max((m for m in METHODS if name == m or name.startswith(m + " (")), key=len, default=name.split(" (")[0])


def _style(name: str, families: list[str]) -> dict[str, Any]:
    """One colour per method family (SGD, ..., IVON (sambayes): matplotlib's cycle, in the order given);
    solid for a point estimate or a posterior mean, dashed for a BMA."""
    family = _family(name)
    return {"color": f"C{families.index(family) % 10}", "ls": "--" if "BMA" in name else "-"}


def plot_shift(runs: list[dict[str, Any]], path: pathlib.Path, bins: int = 20) -> Figure:
    """Accuracy, NLL and ECE against the severity of each shift (rows: the shifts of
    :data:`SHIFTS`; columns: the metrics), one line per method row of the table (mean over
    seeds) with a band of ± one sample standard deviation. Severity 0 is the clean test set.

    ``runs``: dicts with the keys of ``tables.SHIFT_FIELDS`` (one per method, seed, shift, severity);
    ``bins``: the ECE's bins, for the title.
    """
    names = list(dict.fromkeys(r["method"] for r in runs))
    families = list(dict.fromkeys(_family(name) for name in names))
    shifts = [s for s in SHIFTS if any(r["shift"] == s for r in runs)]
    fig = _figure(12, 3.3 * len(shifts) + 0.6)
    axes = fig.subplots(len(shifts), len(SHIFT_METRICS), squeeze=False)
    titles = {"accuracy": "accuracy %", "nll": "NLL (nats, log scale)", "ece": f"ECE ({bins} bins)"}
    by_key = {(r["method"], r["shift"], r["severity"], r["seed"]): r for r in runs}
    for i, shift in enumerate(shifts):
        severities = sorted({r["severity"] for r in runs if r["shift"] == shift})
        levels = (0.0,) + SHIFTS[shift]
        for ax, key in zip(axes[i], SHIFT_METRICS):
            for name in names:
                seeds = list(dict.fromkeys(r["seed"] for r in runs if r["method"] == name))
                values = torch.tensor(
                    [[by_key[name, shift, k, seed][key] for k in severities] for seed in seeds], dtype=torch.float64
                )
                mean = values.mean(0)
                std = values.std(0) if len(values) > 1 else torch.zeros_like(mean)
                style = _style(name, families)
                ax.plot(severities, mean, label=name, lw=1.4, marker="o", ms=3, **style)
                ax.fill_between(severities, mean - std, mean + std, color=style["color"], alpha=0.12, lw=0)
            ax.set_xticks(severities, [f"{k}\n{levels[k]:g}" for k in severities], fontsize=8)
            ax.set_xlabel(f"severity / {SHIFT_UNITS[shift]}", fontsize=8)
            ax.set_title(f"{shift}: {titles[key]}", fontsize=9)
            if key == "nll":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(names), fontsize=8, frameon=False)
    fig.suptitle(
        "Digits test set under graded shifts (mean over seeds, band ± 1 std; severity 0 = clean; "
        "dashed: Bayesian model average)",
        fontsize=10,
    )
    fig.savefig(path, bbox_inches="tight")
    return fig


def two_moons(
    path: pathlib.Path,
    seed: int = 0,
    steps: int = 800,
    samples: int = 32,
    backend: str = "auto",
    device: torch.device | str = "cpu",
) -> Figure:
    """The authors' 2D picture: SAM's point estimate next to bSAM's posterior on two moons.

    Both train an MLP (2 → 32 → 32 → 2) full-batch for ``steps`` steps on 200 points
    (N = 200, prior precision 1; SAM: α 0.05, ρ 0.05; bSAM: α 1, β2 0.99, ρ 0.01).
    Shading: confidence (max probability, 0.5 .. 1) of SAM at its weights and of bSAM's
    ``samples``-sample BMA. Black line: SAM's decision boundary, and bSAM's at the mean;
    thin lines: boundaries of 10 posterior samples (fewer if ``samples`` < 10).
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
            title = (
                f"bSAM: {samples}-sample BMA; black: boundary at the mean; red: {min(10, samples)} posterior samples"
            )
        else:
            probs = mean_probs
            title = "SAM: point estimate; black: its decision boundary"
        conf = torch.maximum(probs, 1 - probs).numpy()
        # confidence is max(p, 1 − p) >= 0.5: the levels span all of it, nothing extends below
        filled = ax.contourf(gx, gy, conf, levels=levels, cmap="viridis")
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
        if method == "bSAM":
            handles.append(Line2D([], [], color="black", lw=1.8, label="decision boundary at the mean"))
            handles.append(Line2D([], [], color="tab:red", lw=0.7, label="boundaries of posterior samples"))
        else:  # a point estimate: no posterior, no mean
            handles.append(Line2D([], [], color="black", lw=1.8, label="decision boundary"))
        ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.9)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-2.5, 3.5)
        ax.set_ylim(-2.0, 2.5)
    fig.colorbar(filled, ax=axes, label="predictive confidence (max probability)", shrink=0.9)
    fig.savefig(path, bbox_inches="tight")
    return fig
