"""The demo's verdicts: each claim as a paired comparison over seeds, with its interval.

Every method trains on the same seeds, and a seed fixes the initial weights and the batch order
of every method, so the runs pair up by seed. For two rows A and B of the table and one metric,
the verdict takes the per-seed differences d_i = A_i − B_i (i over the n seeds both have), their
mean and the 95 % interval mean ± t(0.975, n − 1) · sd / sqrt(n). When the interval excludes 0
the better row (by the metric's direction) is named; otherwise there is no clear difference.

The claims: accuracy, NLL, ECE, misclassification AUROC and OOD AUROC on the clean test set, and
accuracy, NLL and ECE under each graded shift (:data:`~.data.SHIFTS`), averaged over severities
1 to 5. The comparisons: the paper's (bSAM's BMA against SAM, SAM against SGD), bSAM at its mean
against SAM, bSAM against its peer IVON (both BMAs), and bSAM's BMA against its mean; and sambayes's
IVON against ivon-opt's at the same hyperparameters (both BMAs): they should not differ beyond the
seeds' noise.

The verdicts are computed from ``runs.csv`` and ``shift_runs.csv``, so anyone can recompute them
from a run's files (:func:`from_folder`), and set runs side by side (:func:`format_side_by_side`).
"""

from __future__ import annotations

import csv
import math
import pathlib
import statistics
from typing import Any, NamedTuple

from .data import SHIFTS


class Claim(NamedTuple):
    key: str  # a column of runs.csv, or "{shift}_{metric}" for the mean over a shift's severities 1..5
    label: str
    higher_is_better: bool
    digits: int


CLAIMS = (
    Claim("accuracy", "accuracy %", True, 2),
    Claim("nll", "NLL", False, 4),
    Claim("ece", "ECE", False, 4),
    Claim("auroc", "misclassification AUROC", True, 4),
    Claim("ood_auroc", "OOD AUROC (rotated)", True, 4),
) + tuple(
    Claim(f"{shift}_{metric}", f"{shift}: {label}", higher, digits)
    for shift in SHIFTS
    for metric, label, higher, digits in (
        ("accuracy", "accuracy %", True, 2),
        ("nll", "NLL", False, 4),
        ("ece", "ECE", False, 4),
    )
)

#: (A, B): rows of the table by their start and end ("bSAM", "BMA)" is "bSAM (32-sample BMA)")
COMPARISONS = (
    (("bSAM", "BMA)"), ("SAM", "")),
    (("SAM", ""), ("SGD", "")),
    (("bSAM", "(mean)"), ("SAM", "")),
    (("bSAM", "BMA)"), ("IVON", "BMA)")),
    (("bSAM", "BMA)"), ("bSAM", "(mean)")),
    (("IVON (sambayes)", "BMA)"), ("IVON", "BMA)")),
)
LEVEL = 0.95
FIELDS = ["a", "b", "claim", "seeds", "difference", "low", "high", "verdict"]


def _row_name(names: list[str], start: str, end: str) -> str | None:
    """The table row named ``start`` exactly (``end`` empty) or ``start (... end`` with no other parenthesis
    between ("IVON", "BMA)" is "IVON (32-sample BMA)", not "IVON (sambayes) (32-sample BMA)")."""
    if not end:
        return start if start in names else None
    prefix = start + " ("
    return next((n for n in names if n.startswith(prefix) and n.endswith(end) and "(" not in n[len(prefix) :]), None)


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (scipy, which scikit-learn, and so the demo, brings along)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def per_seed(runs: list[dict[str, Any]], shift_runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
    """{(row name, claim key): {seed: value}} from the rows of ``runs.csv`` and ``shift_runs.csv``."""
    values: dict[tuple[str, str], dict[int, float]] = {}
    for run in runs:
        for claim in CLAIMS:
            if claim.key in run:
                values.setdefault((run["method"], claim.key), {})[int(run["seed"])] = float(run[claim.key])
    by_shift: dict[tuple[str, str], dict[int, list[float]]] = {}
    for run in shift_runs:
        if int(run["severity"]) == 0:  # the clean test set
            continue
        for metric in ("accuracy", "nll", "ece"):
            key = (run["method"], f"{run['shift']}_{metric}")
            by_shift.setdefault(key, {}).setdefault(int(run["seed"]), []).append(float(run[metric]))
    for key, seeds in by_shift.items():
        values[key] = {seed: statistics.fmean(v) for seed, v in seeds.items()}
    return values


def compare(values: dict[tuple[str, str], dict[int, float]]) -> list[dict[str, Any]]:
    """One verdict per comparison and claim that the runs hold (rows missing from the runs, such as
    IVON without ivon-opt, are left out)."""
    names = list(dict.fromkeys(name for name, _ in values))
    verdicts = []
    for (a_start, a_end), (b_start, b_end) in COMPARISONS:
        a, b = _row_name(names, a_start, a_end), _row_name(names, b_start, b_end)
        if a is None or b is None:
            continue
        for claim in CLAIMS:
            if (a, claim.key) not in values or (b, claim.key) not in values:
                continue
            seeds = sorted(set(values[a, claim.key]) & set(values[b, claim.key]))
            diffs = [values[a, claim.key][s] - values[b, claim.key][s] for s in seeds]
            mean = statistics.fmean(diffs)
            if len(diffs) > 1:
                half = t_quantile(0.5 + LEVEL / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            else:
                half = math.nan  # one seed: no interval, no verdict
            low, high = mean - half, mean + half
            if low > 0 or high < 0:
                verdict = f"{a if (low > 0) == claim.higher_is_better else b} better"
            else:
                verdict = "no clear difference" if len(diffs) > 1 else "one seed: no verdict"
            verdicts.append(
                {
                    "a": a,
                    "b": b,
                    "claim": claim.label,
                    "seeds": len(diffs),
                    "difference": mean,
                    "low": low,
                    "high": high,
                    "verdict": verdict,
                    "digits": claim.digits,
                }
            )
    return verdicts


def _signed(x: float, digits: int) -> str:
    """``x`` with its sign, and 0 for what rounds to zero (not -0.00)."""
    return f"{x if round(x, digits) != 0 else 0.0:+.{digits}f}"


def _interval(v: dict[str, Any]) -> str:
    d = v["digits"]
    if math.isnan(v["low"]):
        return _signed(v["difference"], d)
    return f"{_signed(v['difference'], d)} [{_signed(v['low'], d)}, {_signed(v['high'], d)}]"


def format_verdicts(verdicts: list[dict[str, Any]]) -> str:
    """The verdicts as a markdown table."""
    level = f"{LEVEL:.0%}".replace("%", " %")
    lines = [
        f"| A − B | claim | seeds | mean difference [{level} interval] | verdict |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    lines += [
        f"| {v['a']} − {v['b']} | {v['claim']} | {v['seeds']} | {_interval(v)} | {v['verdict']} |" for v in verdicts
    ]
    return "\n".join(lines) + "\n"


def format_side_by_side(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Verdicts of several runs (``{label: verdicts}``, e.g. one per backend) in one markdown table,
    with a last column saying whether every run reached the same verdict."""
    labels = list(runs)
    keyed = {label: {(v["a"], v["b"], v["claim"]): v for v in verdicts} for label, verdicts in runs.items()}
    keys = list(dict.fromkeys(k for label in labels for k in keyed[label]))
    head = " | ".join(f"{label}: difference | {label}: verdict" for label in labels)
    lines = [f"| A − B | claim | {head} | same verdict |", "| --- | --- |" + " ---: | --- |" * len(labels) + " --- |"]
    for key in keys:
        cells, said = [], []
        for label in labels:
            v = keyed[label].get(key)
            cells += [_interval(v), v["verdict"]] if v else ["–", "–"]
            said.append(v["verdict"] if v else None)
        same = "yes" if len(set(said)) == 1 and None not in said else "**no**"
        lines.append(f"| {key[0]} − {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {same} |")
    return "\n".join(lines) + "\n"


def _read(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def from_folder(folder: pathlib.Path) -> list[dict[str, Any]]:
    """The verdicts of a demo run's folder, from its ``runs.csv`` and ``shift_runs.csv``."""
    shifted = folder / "shift_runs.csv"
    return compare(per_seed(_read(folder / "runs.csv"), _read(shifted) if shifted.is_file() else []))


def write_verdicts(verdicts: list[dict[str, Any]], out: pathlib.Path) -> None:
    """``verdicts.md`` and ``verdicts.csv`` (the interval's ends in full precision)."""
    (out / "verdicts.md").write_text(format_verdicts(verdicts))
    with open(out / "verdicts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for v in verdicts:
            writer.writerow({k: (f"{v[k]:.6g}" if isinstance(v[k], float) else v[k]) for k in FIELDS})
