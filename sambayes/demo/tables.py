"""The demo's tables: the summary as markdown, and the CSV files."""

from __future__ import annotations

import csv
import pathlib
from typing import Any

from .training import METRICS

_HEADERS = {
    "accuracy": "accuracy %",
    "nll": "NLL",
    "ece": "ECE",
    "auroc": "AUROC",
    "ood_auroc": "OOD AUROC",
    "train_s": "train s",
}


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
