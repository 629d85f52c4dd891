"""The evidence for ``BSAM(state_dtype=torch.bfloat16)``: bSAM trained with float32 and with
bfloat16 precision and momentum (stochastic rounding), same seeds, everything else equal.

Two runs of the digits MLP (``sambayes.cli.demo``), every seed given:

- the demo: its recipe as is (30 epochs, β2 = 0.99);
- longer: 4x the epochs with the paper's β2 = 0.999, where each precision step is 0.001 of the
  gap to its target, far below bfloat16's resolution (2^-8 relative): the case stochastic
  rounding is for.

Test accuracy, NLL and ECE at the posterior mean and for the 32-sample BMA; for each, the
seed-paired difference bfloat16 − float32 next to the seed noise (the sample std over seeds of
the float32 runs). Writes ``bf16_state.md``, ``bf16_state.csv`` and ``bf16_state.png`` (test
NLL per epoch, both state dtypes).

    python examples/bf16_state.py [--seeds 0 1 2 3 4] [--out docs/results] [--quick]

About 2 minutes on a 2-core CPU with the ``cpu`` backend.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import statistics
import time

import torch
from tqdm.auto import tqdm

from sambayes.cli import demo

STATES = {"float32": None, "bfloat16": torch.bfloat16}
SCORES = ("accuracy", "nll", "ece")


def runs(quick: bool) -> dict[str, demo.Recipe]:
    recipe = demo.Recipe().quick() if quick else demo.Recipe()
    longer = dataclasses.replace(recipe, epochs=4 * recipe.epochs, warmup_epochs=4 * recipe.warmup_epochs)
    return {
        f"demo ({recipe.epochs} epochs, β2 {recipe.bsam_betas[1]})": recipe,
        f"longer ({longer.epochs} epochs, β2 0.999)": dataclasses.replace(longer, bsam_betas=(0.9, 0.999)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent.parent / "docs" / "results")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--quick", action="store_true", help="2 and 8 epochs, 4 BMA samples (for tests)")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure (then matplotlib is not needed)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the demo: fastest for this tiny MLP, and thread-count-proof
    data = demo.load_digits()
    start = time.perf_counter()
    recipes = runs(args.quick)
    rows, curves = [], {}
    total = sum(r.epochs for r in recipes.values()) * len(STATES) * len(args.seeds)
    with tqdm(total=total, unit="epoch") as bar:
        for run, recipe in recipes.items():
            for state, dtype in STATES.items():
                for seed in args.seeds:
                    bar.set_description(f"{run.split(' (')[0]} {state} seed {seed}")
                    trained = demo.train(
                        "bSAM",
                        data,
                        dataclasses.replace(recipe, bsam_state_dtype=dtype),
                        seed,
                        args.backend,
                        on_epoch=lambda: bar.update(1),
                    )
                    curves.setdefault((run, state), []).append(trained.curves["test_nll"])
                    for row in demo.evaluate("bSAM", trained, data, recipe, shifts=False):
                        rows.append({"run": run, "state": state, "seed": seed, "prediction": row["method"]} | row)
    table = summarize(rows, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    write(table, rows, args.out, args.seeds, time.perf_counter() - start)
    print((args.out / "bf16_state.md").read_text())
    if not args.no_plot:
        plot(curves, args.out / "bf16_state.png")
    print(f"wrote bf16_state.md, bf16_state.csv{'' if args.no_plot else ', bf16_state.png'} to {args.out}/")


def summarize(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Per (run, prediction, score): float32 mean ± std, bfloat16 mean ± std, and the paired
    difference (mean ± std over seeds)."""
    table = []
    keys = dict.fromkeys((r["run"], r["prediction"].replace("bSAM ", "")) for r in rows)
    for run, prediction in keys:
        for score in SCORES:
            by_state = {
                state: [
                    next(
                        r[score]
                        for r in rows
                        if r["run"] == run
                        and r["state"] == state
                        and r["seed"] == seed
                        and prediction in r["prediction"]
                    )
                    for seed in seeds
                ]
                for state in STATES
            }
            diffs = [b - f for f, b in zip(by_state["float32"], by_state["bfloat16"])]
            entry = {"run": run, "prediction": prediction, "score": score}
            for state, values in by_state.items():
                entry[f"{state}_mean"], entry[f"{state}_std"] = _mean_std(values)
            entry["diff_mean"], entry["diff_std"] = _mean_std(diffs)
            table.append(entry)
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write(table: list[dict], rows: list[dict], out: pathlib.Path, seeds: list[int], seconds: float) -> None:
    with open(out / "bf16_state.csv", "w", newline="") as f:
        fields = ["run", "state", "seed", "prediction", *SCORES, "train_s"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    digits = {"accuracy": 2, "nll": 4, "ece": 4}
    lines = [
        (
            f"bSAM on the digits MLP with float32 and with bfloat16 precision and momentum (stochastic rounding); "
            f"seeds {seeds}, test split, {seconds:.0f} s in all. Δ: bfloat16 − float32 paired by seed (mean ± std); "
            "seed noise: the std over seeds of the float32 runs."
        ),
        "",
        "| run | prediction | score | float32 | bfloat16 | Δ | seed noise |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for e in table:
        d = digits[e["score"]]
        lines.append(
            f"| {e['run']} | {e['prediction']} | {e['score']} | {e['float32_mean']:.{d}f} ± {e['float32_std']:.{d}f} "
            f"| {e['bfloat16_mean']:.{d}f} ± {e['bfloat16_std']:.{d}f} | {e['diff_mean']:+.{d}f} ± {e['diff_std']:.{d}f} "
            f"| {e['float32_std']:.{d}f} |"
        )
    (out / "bf16_state.md").write_text("\n".join(lines) + "\n")


def plot(curves: dict[tuple[str, str], list[list[float]]], path: pathlib.Path) -> None:
    """Test NLL at the posterior mean per epoch, mean over seeds with a min..max band; one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_ = list(dict.fromkeys(run for run, _ in curves))
    fig, axes = plt.subplots(1, len(runs_), figsize=(5 * len(runs_), 3.4), squeeze=False)
    for ax, run in zip(axes[0], runs_):
        for i, state in enumerate(STATES):
            values = torch.tensor(curves[run, state], dtype=torch.float64)
            epochs = torch.arange(1, values.shape[1] + 1)
            ax.plot(epochs, values.mean(0), color=f"C{i}", ls="-" if i == 0 else "--", label=f"{state} state")
            ax.fill_between(epochs, values.min(0).values, values.max(0).values, color=f"C{i}", alpha=0.2)
        ax.set_title(f"bSAM, {run}: test NLL at the mean", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
