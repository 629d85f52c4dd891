"""The model of the compiled code against the GPU: the share of copy bandwidth each fused kernel is
predicted at (``python -m sambayes.kernels._compile_check`` and its CUDA twin, docs/performance.md,
"Predicted from the compiled code") next to the share ``benchmarks/bench_step.py`` measured, per
kernel, tier and dtype; so that the first GPU run tests the model.

    python benchmarks/predicted_vs_measured.py --triton compiled.jsonl --cuda cuda.jsonl [--since 2026-12-06T10:00]

Reads the bench_step rows of a GPU (device not a CPU) written since ``--since`` (default: all),
the last measurement of each case; prints a markdown table and appends the rows to
``benchmarks/results/predicted_vs_measured.csv``. The prediction is for an H100 (132 SMs at 1.755 and
1.98 GHz, 2.9 TB/s for a copy): on another GPU it is a reference, not a prediction.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import pathlib

RESULTS = pathlib.Path(__file__).parent / "results"
#: bench_step's phases and the kernels that run them (the perturbation of the first sub-batch: the compiled
#: kernel accumulates, 4 B more per element)
KERNELS = {"sample": "bsam_sample", "perturb": "bsam_perturb", "update": "bsam_update"}
DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
FIELDS = [
    "date",
    "device",
    "commit",
    "tier",
    "kernel",
    "params",
    "stored",
    "instructions_per_element",
    "bytes_per_element",
    "pct_copy_predicted",
    "pct_copy_predicted_boost",
    "pct_copy_measured",
    "gbps_measured",
    "numel",
]


def predictions(path: pathlib.Path | None) -> dict:
    """(kernel, params, stored) -> report, of a compile check's JSON lines (capturable variants left out)."""
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("phase") and "pct_copy_predicted" in r and not r.get("capturable"):
            out[(r["phase"], r["param"], r.get("stored"))] = r
    return out


def measured(bench: pathlib.Path, since: str) -> dict:
    """(tier, kernel, params, stored) -> the last GPU row of bench_step.csv for it."""
    out = {}
    with bench.open() as f:
        for row in csv.DictReader(f):
            if "CPU" in row["device"] or "EPYC" in row["device"] or "Xeon" in row["device"] or row["date"] < since:
                continue
            impl, _, variant = row["impl"].partition(" ")
            if impl not in ("triton", "cuda") or variant not in ("", "bf16-state") or row["phase"] not in KERNELS:
                continue
            if row["dtype"] not in DTYPES or not row["pct_copy"]:
                continue
            stored = "bf16" if variant else None
            out[(impl, KERNELS[row["phase"]], DTYPES[row["dtype"]], stored)] = row
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", type=pathlib.Path, help="JSON lines of python -m sambayes.kernels._compile_check")
    parser.add_argument(
        "--cuda", type=pathlib.Path, help="JSON lines of python -m sambayes.kernels._compile_check_cuda"
    )
    parser.add_argument("--bench", type=pathlib.Path, default=RESULTS / "bench_step.csv")
    parser.add_argument("--since", default="", help="only bench rows from this ISO date on")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "predicted_vs_measured.csv")
    args = parser.parse_args(argv)
    predicted = {"triton": predictions(args.triton), "cuda": predictions(args.cuda)}
    rows = []
    for (tier, kernel, params, stored), row in sorted(measured(args.bench, args.since).items(), key=str):
        r = predicted[tier].get((kernel, params, stored))
        if r is None:
            continue
        rows.append(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "device": row["device"],
                "commit": row["commit"],
                "tier": tier,
                "kernel": kernel,
                "params": params,
                "stored": stored or "",
                "instructions_per_element": r["instructions_per_element"],
                "bytes_per_element": r["bytes_per_element"],
                "pct_copy_predicted": r["pct_copy_predicted"],
                "pct_copy_predicted_boost": r["pct_copy_predicted_boost"],
                "pct_copy_measured": round(float(row["pct_copy"]), 1),
                "gbps_measured": round(float(row["gbps"]), 1),
                "numel": row["numel"],
            }
        )
    print(
        "| tier | kernel | params | stored | instr/el | B/el | predicted % of copy (1.755 / 1.98 GHz) | measured % | GB/s |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['tier']} | {r['kernel']} | {r['params']} | {r['stored'] or '-'} | {r['instructions_per_element']} | "
            f"{r['bytes_per_element']} | {r['pct_copy_predicted']} / {r['pct_copy_predicted_boost']} | "
            f"{r['pct_copy_measured']} | {r['gbps_measured']} |"
        )
    if not rows:
        print("no GPU rows of bench_step.csv match a prediction")
        return
    new = not args.out.exists()
    with args.out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
