"""``python -m sambayes demo``: SGD, Adam, SAM-SGD, bSAM and IVON (ivon-opt's, and sambayes's at the same
hyperparameters: "IVON (sambayes)") on scikit-learn's
handwritten digits, compared on accuracy, calibration and uncertainty, clean and under
graded shifts, with plots, and a verdict on each claim: a comparison paired by seed, with
its 95 % interval.

The data are the 1,797 bundled 8×8 digits (no download), split once and for all
(permutation seed 0) into 1,347 training and 450 test images. The out-of-distribution
set is the 450 test images rotated by 90°; the graded shifts are the same images with
Gaussian noise or Gaussian blur at five severities each (:data:`SHIFTS`). Every method
trains the same MLP with the same warm-up + cosine schedule; each seed fixes the
initialisation, the batch order and the noise of bSAM and IVON, so the same seeds give
the same tables.

Needs the ``[demo]`` extra (scikit-learn, matplotlib, ivon-opt), imported only when used;
``--no-plots`` does not need matplotlib, and without ivon-opt the IVON rows are skipped
(with one line saying so).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Any

import torch

from sambayes import backends

from .._common import first_line
from . import verdicts
from .data import NUM_TEST, SHIFTS, Data, _missing_extras, load_digits, shift_images
from .models import MLP
from .plots import plot_curves, plot_reliability, plot_shift, two_moons
from .tables import format_markdown, format_shift_markdown, shift_runs, summarize_shift, write_shift_table, write_table
from .training import (
    METHODS,
    METRICS,
    POSTERIOR_METHODS,
    SHIFT_METRICS,
    Recipe,
    Trained,
    evaluate,
    ivon_available,
    lr_factor,
    make_optimizer,
    summarize,
    train,
)

__all__ = [
    "METHODS",
    "METRICS",
    "MLP",
    "NUM_TEST",
    "POSTERIOR_METHODS",
    "SHIFTS",
    "SHIFT_METRICS",
    "Data",
    "Recipe",
    "Trained",
    "add_arguments",
    "backend_name",
    "check_arguments",
    "evaluate",
    "format_markdown",
    "format_shift_markdown",
    "ivon_available",
    "load_digits",
    "lr_factor",
    "make_optimizer",
    "plot_curves",
    "plot_reliability",
    "plot_shift",
    "run",
    "shift_images",
    "shift_runs",
    "summarize",
    "summarize_shift",
    "train",
    "two_moons",
    "verdicts",
    "write_shift_table",
    "write_table",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="2 epochs, 4 BMA samples, short two-moons fit (for tests)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        metavar="SEED",
        help="seeds to run and average over (default: 0 1 2 3 4)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--backend", default="auto", type=str.lower, choices=backends.BACKENDS, help="sambayes backend (default: auto)"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("sambayes-demo"),
        help="folder for the table and the figures (default: ./sambayes-demo)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        type=_method,
        metavar="METHOD",
        help=f"methods to train, in any case (default: {' '.join(map(_spelling, METHODS))}; IVON (ivon-opt's) is "
        "skipped when ivon-opt is not installed)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for this tiny MLP, and thread-count-proof results)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the figures (then matplotlib is not needed)")


def _spelling(method: str) -> str:
    """How ``method`` is written on the command line: ``IVON-sambayes`` for "IVON (sambayes)"."""
    return method.replace(" (sambayes)", "-sambayes")


def _method(text: str) -> str:
    """The method of :data:`METHODS` that ``text`` names, in any case (``bsam``, ``ivon``, ``ivon-sambayes``)."""
    names = {_spelling(name).lower(): name for name in METHODS} | {name.lower(): name for name in METHODS}
    if text.lower() not in names:
        spellings = " ".join(_spelling(name) for name in METHODS)
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {spellings} (any case)")
    return names[text.lower()]


def backend_name(backend: str, device: torch.device | str) -> str:
    """The backend that ``backend`` ("auto" included) stands for on ``device`` (e.g. ``"eager"``)."""
    return backends.pick(backend, device)


def check_arguments(args: argparse.Namespace) -> None:
    """Check everything :func:`run` needs before any training starts, and create ``args.out``.

    Raises ValueError with one line saying which flag is wrong and why (the command turns
    it into a usage error, exit code 2).
    """
    missing = _missing_extras(plots=not args.no_plots)
    if missing:
        raise ValueError(f"the demo needs {' and '.join(missing)}: pip install 'sambayes[demo]'")
    for flag, values in (("--seeds", args.seeds), ("--methods", args.methods or [])):
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise ValueError(f"{flag}: {repeated[0]} is given twice")
    negative = [seed for seed in args.seeds if seed < 0]
    if negative:
        raise ValueError(f"--seeds: {negative[0]} is negative; seeds are integers >= 0")
    if args.methods is not None and "IVON" in args.methods and not ivon_available():
        raise ValueError("--methods IVON needs ivon-opt: pip install 'sambayes[demo]'")
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
        raise ValueError(f"--device {args.device} is not usable here: {first_line(exc)}") from None
    try:
        backends.resolve(args.backend, device)
    except RuntimeError as exc:
        raise ValueError(f"--backend {args.backend}: {first_line(exc)}") from None
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, or no permission
        raise ValueError(f"--out {args.out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(args.out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: the folder is not writable")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train, evaluate, print and write everything; returns the summary table.

    ``args.methods`` None means all of :data:`METHODS`, less IVON when ivon-opt is not
    installed (then one line says so). ValueError (before any training) if an argument is
    wrong; see :func:`check_arguments`.
    """
    check_arguments(args)
    from tqdm.auto import tqdm

    methods = list(args.methods) if args.methods is not None else list(METHODS)
    if args.methods is None and not ivon_available():
        methods.remove("IVON")
        print("sambayes demo: IVON skipped: ivon-opt is not installed (pip install 'sambayes[demo]')", flush=True)

    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    recipe = Recipe().quick() if args.quick else Recipe()
    out = args.out
    picked = backend_name(args.backend, args.device)
    print(
        f"sambayes demo: digits, {len(args.seeds)} seed(s) {args.seeds}, device {args.device}, "
        f"backend {args.backend} -> {picked}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    data = load_digits(device=args.device)
    start = time.perf_counter()
    rows, curves = [], {}
    with tqdm(total=len(methods) * len(args.seeds) * recipe.epochs, unit="epoch", file=sys.stderr) as bar:
        for method in methods:
            for seed in args.seeds:
                bar.set_description(f"{method} seed {seed}")
                trained = train(method, data, recipe, seed, args.backend, on_epoch=lambda: bar.update(1))
                curves.setdefault(method, []).append(trained.curves)
                rows += [dict(r, seed=seed) for r in evaluate(method, trained, data, recipe)]
    table = summarize(rows)
    print()
    print(format_markdown(table))
    write_table(table, rows, out)
    shifted = shift_runs(rows)
    write_shift_table(shifted, out)
    judged = verdicts.from_folder(out)  # from the files just written: anyone can recompute them
    print(f"\nVerdicts: paired by seed, {verdicts.LEVEL:.0%} intervals ({len(args.seeds)} seeds)\n")
    print(verdicts.format_verdicts(judged))
    verdicts.write_verdicts(judged, out)
    written = ["results.md", "results.csv", "runs.csv", "shift_runs.csv", "shift_results.csv", "shift_results.md"]
    written += ["verdicts.md", "verdicts.csv"]
    if not args.no_plots:
        plot_reliability(rows, out / "reliability.png", recipe.ece_bins)
        plot_curves(curves, out / "training_curves.png")
        plot_shift(shifted, out / "shift.png", recipe.ece_bins)
        two_moons(
            out / "two_moons.png",
            seed=args.seeds[0],
            steps=100 if args.quick else 800,
            samples=recipe.samples,
            backend=args.backend,
            device=args.device,
        )
        written += ["reliability.png", "training_curves.png", "shift.png", "two_moons.png"]
    print(f"wrote {', '.join(written)} to {out}/ in {time.perf_counter() - start:.1f} s (backend {picked})")
    return table
