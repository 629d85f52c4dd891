"""The demo's tables: the summary as markdown, the CSV files, and the same for the shifts."""

from __future__ import annotations

import csv
import pathlib
from typing import Any

from .data import SHIFT_UNITS, SHIFTS
from .training import METRICS, SHIFT_METRICS, mean_std

_HEADERS = {
    "accuracy": "accuracy %",
    "nll": "NLL",
    "ece": "ECE",
    "auroc": "AUROC",
    "ood_auroc": "OOD AUROC",
    "train_s": "train s",
}
_DIGITS = {"accuracy": 2, "train_s": 1}  # decimals shown; 4 for the rest
SHIFT_FIELDS = ["method", "seed", "shift", "severity", "level"] + list(SHIFT_METRICS)


def _cell(row: dict[str, Any], key: str) -> str:
    digits = _DIGITS.get(key, 4)
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


def shift_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per method, seed, shift and severity (the ``shift`` lists of :func:`evaluate`'s
    rows, which carry ``seed``), with the keys of :data:`SHIFT_FIELDS`."""
    return [{"method": r["method"], "seed": r["seed"]} | s for r in rows for s in r["shift"]]


def summarize_shift(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method, shift and severity (first-seen order): ``{metric}_mean``,
    ``{metric}_std`` (sample std, 0 for one seed) and ``seeds``."""
    keys = list(dict.fromkeys((r["method"], r["shift"], r["severity"]) for r in runs))
    table = []
    for method, shift, severity in keys:
        group = [r for r in runs if (r["method"], r["shift"], r["severity"]) == (method, shift, severity)]
        row = {"method": method, "shift": shift, "severity": severity, "level": group[0]["level"], "seeds": len(group)}
        table.append(row | mean_std(group, SHIFT_METRICS))
    return table


def format_shift_markdown(table: list[dict[str, Any]]) -> str:
    """One markdown table per shift and metric: methods down, severities across, mean ± std."""
    methods = list(dict.fromkeys(r["method"] for r in table))
    blocks = []
    for shift in dict.fromkeys(r["shift"] for r in table):
        levels = (0.0,) + SHIFTS[shift]
        for key in SHIFT_METRICS:
            cells = {(r["method"], r["severity"]): _cell(r, key) for r in table if r["shift"] == shift}
            severities = sorted({s for _, s in cells})
            lines = [
                f"{shift}, {_HEADERS[key]} ({SHIFT_UNITS[shift]} at severity 0 .. {severities[-1]}: "
                + ", ".join(f"{levels[s]:g}" for s in severities)
                + ")",
                "",
                "| method | " + " | ".join(f"{s}" for s in severities) + " |",
                "| --- |" + " ---: |" * len(severities),
            ]
            lines += [f"| {m} | " + " | ".join(cells[m, s] for s in severities) + " |" for m in methods]
            blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def write_shift_table(runs: list[dict[str, Any]], out: pathlib.Path) -> list[dict[str, Any]]:
    """``shift_runs.csv`` (one row per method, seed, shift and severity), ``shift_results.csv``
    and ``shift_results.md`` (mean ± std over seeds); returns the summary."""
    table = summarize_shift(runs)
    with open(out / "shift_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SHIFT_FIELDS)
        writer.writeheader()
        for run in runs:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in run.items()})
    fields = ["method", "shift", "severity", "level", "seeds"] + [
        f"{k}_{s}" for k in SHIFT_METRICS for s in ("mean", "std")
    ]
    with open(out / "shift_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    (out / "shift_results.md").write_text(format_shift_markdown(table))
    return table
