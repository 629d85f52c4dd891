"""The evidence for the demo's hyperparameters (``sambayes.cli.demo.Recipe``).

One change at a time around the defaults, each method on its own knobs, scored on a
validation split (the last 300 of the 1,347 training digits; the 450 test digits and
their shifted copies stay unseen), mean over seeds. Writes ``sweep_digits.md`` and
``sweep_digits.csv``. IVON's rows need ivon-opt (skipped, with a line saying so, without it).

    python examples/sweep_digits.py [--seeds 0 1] [--out docs/results]

About 1.5 minutes of CPU time with the C++ ``cpu`` backend (2 minutes on a busy 2-core
machine); the eager backend adds 2-3 minutes (bSAM's noise dominates).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import statistics
import time

import torch

from sambayes.cli import demo

# (method, changes to the default recipe); {} is the default itself
GRID: list[tuple[str, dict]] = (
    [("SGD", {})]
    + [("SGD", {"sgd_lr": v}) for v in (0.1, 0.2, 0.8)]
    + [("SGD", {"sgd_prior_precision": v}) for v in (0.1, 5.0, 25.0)]
    + [("Adam", {})]
    + [("Adam", {"adam_lr": v}) for v in (0.001, 0.003, 0.03)]
    + [("Adam", {"adam_prior_precision": v}) for v in (0.0, 1.0, 25.0)]
    + [("SAM", {})]
    + [("SAM", {"sam_lr": v}) for v in (0.2, 0.8)]
    + [("SAM", {"sam_rho": v}) for v in (0.05, 0.1, 0.4)]
    + [("SAM", {"sam_splits": 1})]
    + [("bSAM", {})]
    + [("bSAM", {"bsam_lr": v}) for v in (0.5, 2.0, 4.0)]
    + [("bSAM", {"bsam_betas": (0.9, v)}) for v in (0.9, 0.999)]
    + [("bSAM", {"bsam_prior_precision": v}) for v in (0.1, 5.0, 40.0)]
    + [("bSAM", {"bsam_rho": v}) for v in (0.0, 0.01, 0.1)]
    + [("bSAM", {"bsam_splits": v}) for v in (1, 8)]
    + [("bSAM", {"bsam_data_factor": v}) for v in (1.0, 16.0)]
    + [("bSAM", {"batch_size": 128})]
    + [("IVON", {})]
    + [("IVON", {"ivon_lr": 0.2, "ivon_hess_init": 1.0})]  # where the search started
    + [("IVON", {"ivon_lr": v}) for v in (1.0, 2.0, 8.0)]
    + [("IVON", {"ivon_hess_init": v}) for v in (0.05, 0.1, 0.5, 1.0)]
    + [("IVON", {"ivon_betas": v}) for v in ((0.9, 0.999), (0.9, 0.9999), (0.95, 0.99999))]
    + [("IVON", {"ivon_prior_precision": v}) for v in (0.1, 5.0, 25.0)]
    + [("IVON", {"ivon_train_samples": 4})]
    + [("IVON (sambayes)", {})]  # ivon-opt's recipe, which sambayes's IVON shares (not tuned on its own)
)
SCORES = ("accuracy", "nll", "ece")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent.parent / "docs" / "results")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = demo.load_digits(validation=True)
    default = demo.Recipe()
    grid = GRID
    if not demo.ivon_available():
        grid = [(method, change) for method, change in GRID if method != "IVON"]
        print("IVON skipped: ivon-opt is not installed (pip install 'sambayes[demo]')", flush=True)
    results = []
    start = time.perf_counter()
    for method, change in grid:
        recipe = dataclasses.replace(default, **change)
        rows = []
        for seed in args.seeds:
            trained = demo.train(method, data, recipe, seed, args.backend)
            rows += demo.evaluate(method, trained, data, recipe, shifts=False)
        for name in dict.fromkeys(r["method"] for r in rows):
            runs = [r for r in rows if r["method"] == name]
            result = {"method": name, "change": _describe(change)}
            result |= {k: statistics.fmean(r[k] for r in runs) for k in SCORES + ("train_s",)}
            results.append(result)
            print(f"{name:22s} {result['change']:28s} " + "  ".join(f"{k} {result[k]:.4f}" for k in SCORES), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sweep_digits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "change"] + list(SCORES) + ["train_s"])
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in results)
    lines = [
        (
            f"Validation split (1,047 train / 300 validation digits), mean over seeds {args.seeds}; "
            f"one change at a time from `sambayes.cli.demo.Recipe()` ({time.perf_counter() - start:.0f} s in all)."
        ),
        "",
        "| method | change from the default | accuracy % | NLL | ECE | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['change']} | {r['accuracy']:.2f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['train_s']:.1f} |"
        )
    (args.out / "sweep_digits.md").write_text("\n".join(lines) + "\n")
    print(f"wrote sweep_digits.md and sweep_digits.csv to {args.out}/ in {time.perf_counter() - start:.0f} s")


def _describe(change: dict) -> str:
    if not change:
        return "(default)"
    return ", ".join(f"{k} = {v}" for k, v in change.items())


if __name__ == "__main__":
    main()
