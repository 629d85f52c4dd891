"""``python -m sambayes bench``: which backend runs an optimizer step fastest on this machine.

Times the public ``opt.step(closure)`` of bSAM, SAM and IVON with every backend that can run on
each device (default: the CPU, and the current CUDA device if there is one), on synthetic
float32 parameters (default: 262,144 in 16 tensors of unequal, odd sizes). The closure
stands for the backward passes (two for bSAM and SAM, one for IVON with one sample): it puts
fixed gradients into ``.grad`` as autograd would (it adds into the optimizer's gradient
buffers), so the time is the optimizer's own, with no model. The table gives the median
milliseconds per step, the ratio to the fastest backend for the same optimizer, and "x
floor": the step's time over that of a copy, in the same run, of the bytes a step must move
at least (float32: 68 B per parameter for bSAM, 40 B for SAM, 44 B for IVON). The last line names the fastest backend and whether ``backend="auto"``
picks it. Backends that cannot run here are listed with the reason.

Timing: wall time per step on the CPU; on CUDA the time between events recorded before and
after each step (waits for the host included). The full benchmark, phase by phase, beside
plain PyTorch, ``torch.compile``, other libraries and AdamW, with CSV records, is
``benchmarks/bench_step.py`` in the source tree; it shares this module's setup and timing.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from tqdm import tqdm

from .. import backends
from ..bsam import BSAM
from ..ivon import IVON
from ..sam import SAM
from ._common import first_line, why_unavailable

#: hyperparameters of the timed steps (the values do not change the work of a step)
HYPER = {
    "num_data": 50_000.0,
    "rho": 0.05,
    "lr": 0.1,
    "beta1": 0.9,
    "beta2": 0.999,
    "weight_decay": 1e-4,
    "damping": 0.1,
    "momentum": 0.9,
}
OPTIMIZERS = {"bsam": "bSAM", "sam": "SAM", "ivon": "IVON"}
WARMUP = 1  # untimed steps per row: the first allocates the state (and Triton compiles its kernels)
ROW_BUDGET_S = 0.5  # a row stops timing after this many seconds (at least 3 steps): slow tiers stay quick


# ---- the problem ---------------------------------------------------------------------------
def synthetic_shapes(numel: int, tensors: int) -> list[tuple[int, ...]]:
    """``tensors`` flat tensors of odd, unequal sizes adding up to ``numel`` (>= ``tensors``)."""
    weights = [1.0 + (7 * i % 13) / 6 for i in range(tensors)]
    sizes = [max(1, int(numel * w / sum(weights))) | 1 for w in weights]
    sizes[0] += numel - sum(sizes)
    if sizes[0] < 1:  # a few elements per tensor: the odd rounding overshot
        sizes = [numel - tensors + 1] + [1] * (tensors - 1)
    return [(n,) for n in sizes]


def params_and_grads(shapes, dtype: torch.dtype, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Standard normal parameters and gradients of the given shapes (from torch's generator)."""
    params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    return params, grads


def closure_for(params: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], None]:
    """One backward pass's effect on .grad, by autograd itself: the backward of the leaf parameters with the
    given gradients (no forward graph), which accumulates them into .grad as a model's backward pass would
    (a new tensor where .grad is None, else in place) and runs the parameters' gradient hooks."""

    def closure():
        torch.autograd.backward(params, grads)

    return closure


def make_optimizer(optimizer: str, params: list[torch.nn.Parameter], backend: str, **options) -> BSAM | SAM | IVON:
    """``sambayes.BSAM`` (``optimizer="bsam"``), ``sambayes.SAM`` (SGD base) or ``sambayes.IVON`` (one sample,
    ess = N) with :data:`HYPER`; ``options``: further keywords of the optimizer."""
    h = HYPER
    if optimizer == "bsam":
        return BSAM(params, num_data=h["num_data"], lr=h["lr"], rho=h["rho"], seed=1, backend=backend, **options)
    if optimizer == "ivon":
        ivon = dict(lr=h["lr"], ess=h["num_data"], weight_decay=h["weight_decay"], beta1=h["beta1"])
        return IVON(params, **ivon, seed=1, backend=backend, **options)
    return SAM(
        params,
        lr=h["lr"],
        rho=h["rho"],
        momentum=h["momentum"],
        weight_decay=h["weight_decay"],
        backend=backend,
        **options,
    )


def public_step(optimizer: str, params: list[torch.Tensor], grads: list[torch.Tensor], backend: str, **options):
    """``opt.step(closure)`` on the optimizer's own copies of ``params``, the closure adding ``grads``;
    returns (the step as a function of no arguments, the optimizer). ``options``: see make_optimizer."""
    copies = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make_optimizer(optimizer, copies, backend, **options)
    closure = closure_for(copies, grads)
    return (lambda: opt.step(closure)), opt


def floor_bytes(param_bytes: int, state_bytes: int, optimizer: str = "bsam") -> int:
    """Bytes per parameter a step must move at least, each word read and written once per phase.

    bSAM: sample (read m, s; write θ), ascent (read g, m, s; write θ, the curvature sum),
    update (read h, m, s, g_m, curvature sum; write g_m, m, s, θ): 68 B in float32.
    SAM: norm (read g), ascent (read g, w; write θ), update (read h, w, buf; write w, buf, θ): 40 B.
    IVON (one sample): sample (read m, s; write θ), update (read g, m, s, g_m; write g_m, m, s, θ): 44 B.
    """
    p, s = param_bytes, state_bytes
    if optimizer == "bsam":
        return (2 * s + p) + (2 * p + 3 * s) + (2 * p + 7 * s)
    if optimizer == "ivon":
        return (2 * s + p) + (2 * p + 6 * s)
    return p + (2 * p + s) + (2 * p + 4 * s)


def why_not_timed(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can be timed on ``device``, else why not (:func:`._common.why_unavailable`,
    and Triton under its CPU interpreter, which runs but says nothing about speed)."""
    reason = why_unavailable(backend, device)
    if reason is None and backend == "triton" and device.type != "cuda":
        reason = "runs under the Triton interpreter on the CPU: a correctness tool, not a benchmark"
    if reason is None and backend == "cuda-emulated":
        reason = "emulates the CUDA kernels on the CPU: a correctness tool, not a benchmark"
    return reason


# ---- timing --------------------------------------------------------------------------------
class Timing(NamedTuple):
    """Milliseconds per call (median, 20 % and 80 % quantiles), timed calls, peak extra device MB."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int
    peak_mb: float | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    fns: list[Callable[[], object]],
    device: torch.device,
    repeats: int,
    *,
    warmup: int = 0,
    budget_s: float | None = None,
    tick: Callable[[], object] | None = None,
) -> tuple[list[list[float]], list[Exception | None]]:
    """Milliseconds of each timed call of each function, and what each raised (None if nothing).

    The functions are called in turn, one call each per round, so drift in the machine's load
    hits them alike: ``warmup`` untimed rounds, then up to ``repeats`` timed ones. A function
    leaves the rounds once its timed calls took ``budget_s`` seconds (after at least 3 calls),
    or when it raises. ``tick()`` follows every call, untimed.
    CPU: wall time. CUDA: the time between events recorded before and after each call on the
    current stream, one sync at the end: the device's time per call, a wait for the host included.
    """
    cuda = device.type == "cuda"
    marks: list[list] = [[] for _ in fns]  # (start, end) per timed call: events on CUDA, seconds on the CPU
    spent = [0.0] * len(fns)
    errors: list[Exception | None] = [None] * len(fns)
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        for round_ in range(warmup + repeats):
            for i, fn in enumerate(fns):
                done = len(marks[i]) >= 3 and budget_s is not None and spent[i] > budget_s
                if errors[i] is not None or done:
                    continue
                start = torch.cuda.Event(enable_timing=True) if cuda else None
                host = time.perf_counter()
                try:
                    if cuda:
                        start.record()
                    fn()
                    end = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
                    if cuda:
                        end.record()
                except Exception as exc:  # noqa: BLE001 - a failing function is a result, not a crash
                    errors[i] = exc
                    continue
                if round_ >= warmup:
                    marks[i].append((start, end) if cuda else (host, end))
                    spent[i] += time.perf_counter() - host
                if tick is not None:
                    tick()
        if cuda:
            torch.cuda.synchronize(device)
    if cuda:
        return [[start.elapsed_time(end) for start, end in m] for m in marks], errors
    return [[(end - start) * 1000 for start, end in m] for m in marks], errors


def summarize(times_ms: list[float], peak_mb: float | None = None) -> Timing:
    """Median and 20/80 % quantiles of the times."""
    if len(times_ms) == 1:
        return Timing(times_ms[0], times_ms[0], times_ms[0], 1, peak_mb)
    q = statistics.quantiles(times_ms, n=10, method="inclusive")
    return Timing(statistics.median(times_ms), q[1], q[7], len(times_ms), peak_mb)


def measure(fn: Callable[[], object], device: torch.device, budget_s: float, max_reps: int) -> Timing:
    """About ``budget_s`` seconds of timing: on CUDA by ``triton.testing.do_bench`` (reps -1; peak
    extra memory measured), else by :func:`time_rounds`, at most ``max_reps`` calls after a warm-up."""
    if device.type == "cuda":
        fn()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        try:
            import triton.testing
        except ImportError:  # no Triton: events around each call
            return summarize(_times_or_raise([fn], device, max_reps, budget_s=budget_s), peak)
        median, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=int(budget_s * 1000) // 4)
        return Timing(median, q20, q80, -1, peak)
    fn()  # warm-up: compiles, fills caches
    first = _times_or_raise([fn], device, 1)[0] / 1000
    reps = max(1, min(max_reps, int(budget_s / max(first, 1e-9))))
    return summarize(_times_or_raise([fn], device, reps))


def _times_or_raise(fns, device, repeats, **options) -> list[float]:
    """:func:`time_rounds` of one function: its times, or what it raised."""
    (times,), (error,) = time_rounds(fns, device, repeats, **options)
    if error is not None:
        raise error
    return times


def copy_of(numel: int, dtype: torch.dtype, device) -> Callable[[], object]:
    """A device-to-device copy of ``numel`` elements, as a function (its buffers live as long as it)."""
    src = torch.empty(numel, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def measure_copy(numel: int, dtype: torch.dtype, device, budget_s: float, max_reps: int) -> Timing:
    """:func:`measure` of a device-to-device copy of ``numel`` elements (buffers freed on return)."""
    return measure(copy_of(numel, dtype, device), device, budget_s, max_reps)


def device_name(device: torch.device, threads: bool = True) -> str:
    """The GPU's name, or the CPU model with its cores (and torch's threads, if ``threads``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores" + (f", {torch.get_num_threads()} threads)" if threads else ")")


# ---- the command ---------------------------------------------------------------------------
def _count(text: str) -> int:
    """A whole number written with or without separators: 262144, 262_144, 262,144."""
    try:
        return int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 262_144)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--numel",
        type=_count,
        default=262_144,
        metavar="N",
        help="parameters in all (default: 262,144; underscores and commas allowed)",
    )
    parser.add_argument("--tensors", type=int, default=16, metavar="T", help="parameter tensors (default: 16)")
    parser.add_argument(
        "--backends",
        default=",".join(backends.NAMES),
        metavar="LIST",
        help=f"comma-separated backends to time (default: all of {','.join(backends.NAMES)} that can run)",
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="LIST",
        help="comma-separated torch devices (default: cpu, and cuda when PyTorch sees a GPU)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=20,
        metavar="R",
        help=f"timed steps per row after {WARMUP} untimed, fewer past {ROW_BUDGET_S} s (default: 20)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's choice; 1 is steadier on a machine that others load)",
    )


def _error_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {first_line(exc)[:200]}"


def check_arguments(args: argparse.Namespace) -> None:
    """Check the flags before anything is timed; sets ``args.devices`` (torch devices) and
    ``args.backend_list``. Raises ValueError with one line saying which flag is wrong and why
    (the command turns it into a usage error, exit code 2)."""
    if args.numel < 1:
        raise ValueError(f"--numel {args.numel}: need at least 1 parameter")
    if args.tensors < 1:
        raise ValueError(f"--tensors {args.tensors}: need at least 1 tensor")
    if args.tensors > args.numel:
        raise ValueError(f"--tensors {args.tensors}: more tensors than --numel {args.numel} parameters")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: need at least 1 timed step")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: need at least 1")
    names = [name.strip().lower() for name in args.backends.split(",") if name.strip()]
    unknown = [name for name in names if name not in backends.NAMES]
    if unknown:
        listed = ", ".join(repr(name) for name in dict.fromkeys(unknown))
        raise ValueError(
            f"--backends {args.backends}: unknown backend{'s' if len(unknown) > 1 else ''} {listed}; "
            f"choose from {','.join(backends.NAMES)}"
        )
    if not names:
        raise ValueError(f"--backends {args.backends!r}: name at least one of {','.join(backends.NAMES)}")
    args.backend_list = list(dict.fromkeys(names))
    if args.device is None:
        args.device = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    args.devices = []
    for text in dict.fromkeys(name.strip().lower() for name in args.device.split(",") if name.strip()):
        try:
            device = torch.device(text)
        except RuntimeError:
            raise ValueError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {text}: this PyTorch ({torch.__version__}) sees no CUDA device")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        try:
            torch.empty(1, device=device)  # an index out of range, or a device type this build lacks
        except Exception as exc:  # noqa: BLE001 - whatever the device type, the reason is in the message
            raise ValueError(f"--device {text} is not usable here: {first_line(exc)}") from None
        args.devices.append(device)
    if not args.devices:
        raise ValueError(f"--device {args.device!r}: name at least one device")
    for device in args.devices:
        reasons = [why_not_timed(name, device) for name in args.backend_list]
        if all(reasons):
            raise ValueError(f"--backends {args.backends}: none can run on {device}: {reasons[0]}")


class Row(NamedTuple):
    device: torch.device
    optimizer: str  # "bsam", "sam" or "ivon"
    backend: str
    timing: Timing | None
    error: str


def _time_device(args, device: torch.device, progress) -> tuple[list[Row], dict[str, float], list[str]]:
    """The rows of one device, the floor copies' medians (ms) by optimizer, the skipped backends' lines.

    Every step and the floor copies are timed in the same rounds (:func:`time_rounds`)."""
    shapes = synthetic_shapes(args.numel, args.tensors)
    torch.manual_seed(0)
    params, grads = params_and_grads(shapes, torch.float32, device)
    reasons = {name: why_not_timed(name, device) for name in args.backend_list}
    skipped = [f"skipped {name} on {device}: {reason}" for name, reason in reasons.items() if reason]
    cases, rows = [], []  # cases: (optimizer, backend or "floor", step, optimizer object or None)
    for optimizer in OPTIMIZERS:
        copy = copy_of(floor_bytes(4, 4, optimizer) * args.numel // 8, torch.float32, device)
        cases.append((optimizer, "floor", copy, None))
    for optimizer, backend in ((o, b) for o in OPTIMIZERS for b, reason in reasons.items() if reason is None):
        try:
            cases.append((optimizer, backend, *public_step(optimizer, params, grads, backend)))
        except Exception as exc:  # noqa: BLE001 - a backend that cannot even start is a result
            rows.append(Row(device, optimizer, backend, None, _error_line(exc)))
    progress.set_postfix_str(str(device))
    times, errors = time_rounds(
        [step for _, _, step, _ in cases],
        device,
        args.repeats,
        warmup=WARMUP,
        budget_s=ROW_BUDGET_S,
        tick=progress.update,
    )
    floors = {}
    for (optimizer, backend, _, opt), ms, exc in zip(cases, times, errors):
        error = _error_line(exc) if exc is not None else ""
        if not error and opt is not None and opt.skipped_steps:  # a skipped step would have timed the skip path
            error = f"{opt.skipped_steps} steps were skipped for non-finite gradients"
        if backend == "floor":
            floors[optimizer] = summarize(ms).median_ms if ms and not error else math.nan
        else:
            rows.append(Row(device, optimizer, backend, None if error else summarize(ms), error))
    order = {(o, b): i for i, (o, b) in enumerate((o, b) for o in OPTIMIZERS for b in args.backend_list)}
    return sorted(rows, key=lambda r: order[r.optimizer, r.backend]), floors, skipped


def _verdict(device: torch.device, rows: list[Row]) -> str:
    """One line: the fastest backend on ``device`` (by bSAM; SAM's too when it differs) and what "auto" picks."""
    best = {}
    for optimizer in OPTIMIZERS:
        ok = [r for r in rows if r.optimizer == optimizer and r.timing is not None]
        if ok:
            best[optimizer] = min(ok, key=lambda r: r.timing.median_ms)
    if not best:
        return f"on {device}: no backend ran"
    first = best.get("bsam") or best["sam"]
    name = OPTIMIZERS[first.optimizer]
    line = f'fastest on {device}: backend="{first.backend}" ({first.timing.median_ms:.3f} ms per {name} step'
    if "sam" in best and best["sam"].backend != first.backend:
        line += f'; for SAM backend="{best["sam"].backend}", {best["sam"].timing.median_ms:.3f} ms'
    auto = backends.pick("auto", device)
    if auto == first.backend:
        return line + '); backend="auto" picks it'
    auto_row = next((r for r in rows if r.optimizer == first.optimizer and r.backend == auto and r.timing), None)
    if auto_row is None:
        return line + f'); backend="auto" picks "{auto}", not timed here'
    slower = auto_row.timing.median_ms / first.timing.median_ms
    return line + f'); backend="auto" picks "{auto}", {slower:.2f}x slower here: pass backend="{first.backend}"'


def format_table(rows: list[Row], floors: dict[str, float]) -> list[str]:
    """The table of one device: a header and a line per row."""
    fastest = {
        opt: min((r.timing.median_ms for r in rows if r.optimizer == opt and r.timing), default=None)
        for opt in OPTIMIZERS
    }
    header = (
        f"{'optimizer':9s} {'backend':8s} {'ms/step':>9s} {'20%':>9s} {'80%':>9s} {'steps':>5s} "
        f"{'x fastest':>9s} {'x floor':>8s}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        name = OPTIMIZERS[r.optimizer]
        if r.timing is None:
            lines.append(f"{name:9s} {r.backend:8s} error: {r.error}")
            continue
        t = r.timing
        lines.append(
            f"{name:9s} {r.backend:8s} {t.median_ms:9.3f} {t.q20_ms:9.3f} {t.q80_ms:9.3f} {t.reps:5d} "
            f"{t.median_ms / fastest[r.optimizer]:9.2f} {t.median_ms / floors[r.optimizer]:8.2f}"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    """Time, print the tables and the verdicts; returns the exit code (1 if a backend failed)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    calls = len(OPTIMIZERS) * (WARMUP + args.repeats)  # per backend, and for the floor copies
    per_device = [calls * (1 + sum(why_not_timed(name, d) is None for name in args.backend_list)) for d in args.devices]
    results = []
    with tqdm(total=sum(per_device), desc="sambayes bench", unit="step", leave=False, file=sys.stderr) as progress:
        for device, target in zip(args.devices, itertools.accumulate(per_device)):
            results.append((device, *_time_device(args, device, progress)))
            progress.update(target - progress.n)  # rows cut short by their time budget, or failed
    failed = False
    verdicts = []
    for device, rows, floors, skipped in results:
        floor_text = ", ".join(f"{OPTIMIZERS[o]} {floor_bytes(4, 4, o)} B: {ms:.3f} ms" for o, ms in floors.items())
        print(
            f"\n{device}: {device_name(device)} | torch {torch.__version__} | {args.numel:,} float32 parameters "
            f"in {args.tensors} tensors | median of up to {args.repeats} steps, {ROW_BUDGET_S} s per row"
        )
        print("\n".join(format_table(rows, floors)))
        print(f"floor: a copy of the bytes per parameter a step must move ({floor_text})")
        for line in skipped:
            print(line)
        failed |= any(r.timing is None for r in rows)
        verdicts.append(_verdict(device, rows))
    print()
    print("\n".join(verdicts))
    return 1 if failed else 0
