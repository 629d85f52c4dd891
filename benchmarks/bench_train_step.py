"""Time of one training step with bSAM and SAM relative to one SGD step, same model and batch.

A bSAM or SAM step takes two forward-backward passes where SGD takes one, so
2× an SGD step is the floor; the rest (noise, ascent, update, bookkeeping) is what
this measures above it. IVON, the variational peer, takes one pass per step: its floor
is 1× an AdamW step. Rows, for the CIFAR-style ResNet-18 of ``examples/``:

- ``fwd+bwd``: zero the gradients, forward, backward (no optimizer): the unit.
- ``sgd``: ``torch.optim.SGD`` (momentum 0.9, weight decay): one pass + its update.
- ``adamw``: ``torch.optim.AdamW`` (PyTorch's default implementation): one pass + its update.
- ``ivon``: ``ivon.IVON`` (``ivon-opt``, one Monte Carlo sample) as its README trains:
  ``with opt.sampled_params(train=True):`` zero the gradients, forward, backward; then
  ``opt.step()``. Skipped, with the reason, when ``ivon`` does not import.
- ``sam``, ``bsam``: ``opt.step(closure, splits=k)`` as ``examples/train.py`` calls it.
- ``sgd-opt``, ``adamw-opt``, ``ivon-opt``, ``sam-opt``, ``bsam-opt``: the optimizer alone,
  with a fixed gradient assigned where the backward passes would be (for IVON inside
  ``sampled_params``): the rest, measured directly (on a busy machine far less noisy than
  the difference of two whole steps).

Columns: median and 20/80 % quantiles of the wall time per step (the device is
synchronised around each step), the ratios to the SGD and to the AdamW medians, and the
time above the passes, ``(t − passes × t_fwd+bwd) / t_fwd+bwd``. The cases are timed in turn,
one step each per round, so drift in the machine's load hits them alike. Rows are
appended to ``benchmarks/results/train_step.csv`` with the device, date and versions.

    python benchmarks/bench_train_step.py --threads 1       # CPU: width 16, batch 32, k = 1
    python benchmarks/bench_train_step.py --device cuda     # GPU: width 64, batch 200, k = 1 and 8
"""

from __future__ import annotations

import argparse
import copy
import datetime
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

import sambayes
from sambayes import backends
from sambayes.bench import device_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
from bench_step import CsvRows
from cifar_resnet import ResNet18, train_step

try:
    import ivon
except ImportError as exc:  # the IVON rows are skipped, with this reason
    ivon, IVON_MISSING = None, f"{exc} (pip install ivon-opt)"

RESULTS = ROOT / "benchmarks" / "results" / "train_step.csv"
FIELDS = (
    "date",
    "sambayes",
    "torch",
    "device",
    "threads",
    "model",
    "batch",
    "amp",
    "method",
    "backend",
    "splits",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "vs_sgd",
    "above_passes",
    "peak_mib",
    "vs_adamw",
    "note",
)
# lr small enough that random data cannot drive the weights to inf (a skipped step would time less)
LR = 1e-4


def backend_name(backend: str, device: torch.device) -> str:
    """What ``backend`` runs on ``device``: "auto" resolved to the backend it picks."""
    return backends.pick(backend, device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(width: int, batch: int, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model (float32, training mode) and one normalized CIFAR-shaped batch [batch, 3, 32, 32] with labels."""
    torch.manual_seed(0)
    model = ResNet18(width).to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(10, (batch,), device=device)
    return model, images, labels


class Case(NamedTuple):
    method: str  # fwd+bwd, sgd, adamw, ivon, sam, bsam; "-opt": the optimizer alone, gradients given
    backend: str  # sambayes backend ("" for torch)
    splits: int
    passes: int  # forward-backward passes per step
    step: Callable[[], None]
    opt: object


def cases(base: torch.nn.Module, images, labels, args, device) -> list[Case]:
    """What is timed, each on its own copy of the model:

    - whole steps: ``fwd+bwd`` (the unit), ``sgd``, ``adamw``, ``ivon`` (if it imports), and
      ``sam`` / ``bsam`` for each backend and k;
    - the optimizer alone, ``sgd-opt`` / ``adamw-opt`` / ``ivon-opt`` / ``sam-opt`` / ``bsam-opt``:
      ``opt.step()`` (IVON: after entering and leaving ``sampled_params``), or the phases
      sample -> perturb (-> sample -> perturb)* -> update, with fixed gradients assigned in
      place of the backward passes: the cost above the passes, measured directly.
    """
    dtype = {"none": None, "bf16": torch.bfloat16}[args.amp]

    def fwd_bwd(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()

    def whole(model, opt, k):
        if ivon is not None and isinstance(opt, ivon.IVON):

            def ivon_step() -> None:
                with opt.sampled_params(train=True):
                    fwd_bwd(model)
                opt.step()

            return ivon_step
        return lambda: train_step(model, opt, images, labels, splits=k, dtype=dtype, scaler=None, max_grad_norm=None)

    def alone(params, grads, opt, k):
        def set_grads() -> None:
            for p, g in zip(params, grads):
                p.grad = g

        def step() -> None:
            if ivon is not None and isinstance(opt, ivon.IVON):
                with opt.sampled_params(train=True):
                    set_grads()
                opt.step()
                return
            if not isinstance(opt, (sambayes.BSAM, sambayes.SAM)):
                set_grads()
                opt.step()
                return
            for _ in range(k):
                opt.sample()
                set_grads()
                opt.perturb()
                set_grads()
            opt.update()

        return step

    unit_model = copy.deepcopy(base)
    fwd_bwd(unit_model)
    grads = [p.grad.detach().clone() for p in unit_model.parameters()]  # one real gradient, reused by the -opt rows
    out = [Case("fwd+bwd", "", 1, 1, lambda: fwd_bwd(unit_model), None)]
    one_pass = {
        "sgd": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4),
        "adamw": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=5e-4),
    }
    if ivon is not None:
        one_pass["ivon"] = lambda params: ivon.IVON(
            params, lr=LR, ess=200_000, weight_decay=40 / 200_000, hess_init=0.1, beta2=0.99999
        )
    for alone_ in (False, True):
        for method, make in one_pass.items():
            model = copy.deepcopy(base)
            opt = make(list(model.parameters()))
            step = alone(list(model.parameters()), grads, opt, 1) if alone_ else whole(model, opt, 1)
            out.append(Case(method + "-opt" * alone_, "", 1, 0 if alone_ else 1, step, opt))
    for alone_ in (False, True):
        for backend in args.backend.split(","):
            for k in (int(s) for s in args.splits.split(",")):
                for method in ("sam", "bsam"):
                    model = copy.deepcopy(base)
                    if method == "bsam":
                        opt = sambayes.BSAM(
                            model, num_data=200_000, lr=LR, rho=0.01, weight_decay=40 / 200_000, seed=0, backend=backend
                        )
                    else:
                        opt = sambayes.SAM(model, lr=LR, rho=0.05, momentum=0.9, weight_decay=5e-4, backend=backend)
                    step = alone(list(model.parameters()), grads, opt, k) if alone_ else whole(model, opt, k)
                    out.append(Case(method + "-opt" * alone_, backend, k, 0 if alone_ else 2, step, opt))
    return out


def measure(fns: list[Callable[[], None]], reps: int, warmup: int, device) -> list[list[float]]:
    """Seconds per call of each function, ``reps`` rounds of one call each, after ``warmup`` rounds."""
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(warmup + reps):
        for fn, seconds in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_ >= warmup:
                seconds.append(time.perf_counter() - start)
    return times


def peak_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=None, help="ResNet-18 width (default: 16 on CPU, 64 on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 32 on CPU, 200 on GPU)")
    parser.add_argument("--splits", default=None, help="comma-separated k for bsam/sam (default: 1 on CPU, 1,8 on GPU)")
    parser.add_argument("--backend", default="auto", help="comma-separated sambayes backends")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default: 30 on CPU, 100 on GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--csv", default=str(RESULTS), help="append rows here ('' for none)")
    parser.add_argument("--note", default="", help="free text stored with every row (e.g. machine load)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    args.width = args.width or (64 if gpu else 16)
    args.batch = args.batch or (200 if gpu else 32)
    args.splits = args.splits or ("1,8" if gpu else "1")
    args.reps = args.reps or (100 if gpu else 30)

    base, images, labels = setup(args.width, args.batch, device)
    timed = cases(base, images, labels, args, device)
    times = measure([case.step for case in timed], args.reps, args.warmup, device)
    for case in timed:
        skipped = case.opt.param_groups[0].get("skipped_steps", 0) if case.opt is not None else 0
        if skipped:
            raise RuntimeError(f"{case.method}: {skipped} steps skipped (non-finite gradients): the timing is invalid")
        params = [p for group in case.opt.param_groups for p in group["params"]] if case.opt is not None else []
        if not all(bool(torch.isfinite(p).all()) for p in params):  # IVON and the torch optimizers do not skip
            raise RuntimeError(f"{case.method}: the weights went non-finite: the timing is invalid")

    medians = {(c.method, c.backend, c.splits): statistics.median(t) for c, t in zip(timed, times)}
    unit, sgd, adamw = medians[("fwd+bwd", "", 1)], medians[("sgd", "", 1)], medians[("adamw", "", 1)]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    rows = []
    for case, seconds in zip(timed, times):
        quantiles = statistics.quantiles(seconds, n=10)
        median = statistics.median(seconds)
        peak = peak_mib(case.step, device)
        rows.append(
            {
                "date": date,
                "sambayes": sambayes.__version__,
                "torch": torch.__version__,
                "device": device_name(device, threads=False),
                "threads": torch.get_num_threads(),
                "model": f"resnet18-w{args.width}",
                "batch": args.batch,
                "amp": args.amp,
                "method": case.method,
                "backend": backend_name(case.backend, device) if case.backend else "",
                "splits": case.splits,
                "median_ms": round(1e3 * median, 3),
                "q20_ms": round(1e3 * quantiles[1], 3),
                "q80_ms": round(1e3 * quantiles[7], 3),
                "vs_sgd": round(median / sgd, 3),
                "above_passes": round((median - case.passes * unit) / unit, 3),
                "peak_mib": round(peak, 1) if peak is not None else "",
                "vs_adamw": round(median / adamw, 3),
                "note": args.note,
            }
        )

    print(
        f"{device_name(device, threads=False)}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"ResNet-18 width {args.width}, batch {args.batch}, amp {args.amp}, {args.reps} rounds"
    )
    print(
        f"{'method':9s} {'backend':8s} {'k':>2s} {'median ms':>10s} {'20%':>9s} {'80%':>9s} {'vs SGD':>7s} "
        f"{'vs AdamW':>8s} {'above passes':>13s}" + ("  peak MiB" if gpu else "")
    )
    for r in rows:
        print(
            f"{r['method']:9s} {r['backend']:8s} {r['splits']:2d} {r['median_ms']:10.2f} {r['q20_ms']:9.2f} "
            f"{r['q80_ms']:9.2f} {r['vs_sgd']:7.3f} {r['vs_adamw']:8.3f} {r['above_passes']:13.3f}"
            + (f"  {r['peak_mib']:8.0f}" if gpu else "")
        )
    print(
        "'above passes': (median − passes × fwd+bwd) / fwd+bwd; for the -opt rows (no passes): optimizer time / fwd+bwd"
    )
    for (method, backend, k), median in medians.items():
        if method in ("sam", "bsam"):
            alone = medians[(method + "-opt", backend, k)]
            print(
                f"{method} ({backend}, k={k}): step / SGD step = {median / sgd:.3f}, / AdamW step = "
                f"{median / adamw:.3f} (floor 2); from the parts: (2 fwd+bwd + {method}-opt) / (fwd+bwd + sgd-opt) = "
                f"{(2 * unit + alone) / (unit + medians[('sgd-opt', '', 1)]):.3f}"
            )
    if ivon is None:
        print(f"skipped ivon: {IVON_MISSING}")
    else:
        step, alone = medians[("ivon", "", 1)], medians[("ivon-opt", "", 1)]
        print(
            f"ivon: step / AdamW step = {step / adamw:.3f} (floor 1); from the parts: (fwd+bwd + ivon-opt) / "
            f"(fwd+bwd + adamw-opt) = {(unit + alone) / (unit + medians[('adamw-opt', '', 1)]):.3f}; "
            f"ivon-opt / adamw-opt = {alone / medians[('adamw-opt', '', 1)]:.2f}"
        )
    if args.csv:
        csv_rows = CsvRows(pathlib.Path(args.csv), {}, fields=list(FIELDS))
        for row in rows:
            csv_rows.add(**row)
    return rows


if __name__ == "__main__":
    main()
