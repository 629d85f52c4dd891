"""Time the optimizer work of one bSAM step, phase by phase and whole, for every implementation.

    python benchmarks/bench_step.py                                # CPU-friendly default size
    python benchmarks/bench_step.py --preset gpt2                  # GPT-2 small shapes (124M, 148 tensors)
    python benchmarks/bench_step.py --preset resnet50
    python benchmarks/bench_step.py --numel 10_000_000 --tensors 100 --impls cpu,eager,torch

Implementations: every backend of ``sambayes.backends.NAMES`` available on the device
(called directly, one call per phase), ``torch`` (a plain per-tensor PyTorch step
as a user would write it, noise from ``torch.randn_like``), ``torch.compile`` of
that step, ``pytorch_optimizer``'s BSAM, ``torch.optim.AdamW(fused=True)`` (the
bandwidth anchor, its own step) and a device-to-device copy.

Phases: ``sample`` (θ = m + z/sqrt(N·s)), ``perturb`` (θ = m + ρ·g/s and the
curvature sum), ``update`` and ``step`` (the three in a row, one sub-batch: the
optimizer work of a step, no forward/backward). GB/s divides the documented
minimal bytes of a phase (docs/triton.md) by the time, whatever the implementation
moves; "% copy" compares with the copy measured in the same run. Timing: median
and 20/80% quantiles, by ``triton.testing.do_bench`` on CUDA, by a plain loop on
the CPU. Rows are appended to ``benchmarks/results/bench_step.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import sambayes
from sambayes import backends

RESULTS = pathlib.Path(__file__).parent / "results" / "bench_step.csv"
PHASES = ("sample", "perturb", "update", "step")
HYPER = {
    "num_data": 50_000.0,
    "rho": 0.05,
    "lr": 0.1,
    "beta1": 0.9,
    "beta2": 0.999,
    "weight_decay": 1e-4,
    "damping": 0.1,
}


# ---- shapes ------------------------------------------------------------------------------
def gpt2_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M parameters, 148 tensors), Hugging Face layout."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """ResNet-50 (25.6M parameters, 161 tensors): convolutions, batch-norm affine, classifier."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out = 4 * width
            shapes += [
                (width, in_channels, 1, 1),
                (width,),
                (width,),
                (width, width, 3, 3),
                (width,),
                (width,),
                (out, width, 1, 1),
                (out,),
                (out,),
            ]
            if block == 0:
                shapes += [(out, in_channels, 1, 1), (out,), (out,)]
            in_channels = out
    return shapes + [(1000, 2048), (1000,)]


def synthetic_shapes(numel: int, tensors: int) -> list[tuple[int, ...]]:
    """``tensors`` flat tensors of odd, unequal sizes adding up to ``numel``."""
    weights = [1.0 + (7 * i % 13) / 6 for i in range(tensors)]
    sizes = [max(1, int(numel * w / sum(weights))) | 1 for w in weights]
    sizes[0] += numel - sum(sizes)
    return [(n,) for n in sizes]


# ---- byte counts: the minimal traffic of each phase (docs/triton.md) ------------------------
def minimal_bytes(phase: str, param_bytes: int, state_bytes: int) -> int:
    """Bytes per parameter a fused implementation must move (one sub-batch, no accumulation)."""
    p, s = param_bytes, state_bytes
    per_phase = {"sample": 2 * s + p, "perturb": 2 * p + 3 * s, "update": 2 * p + 7 * s}
    per_phase["step"] = sum(per_phase.values())
    per_phase["adamw"] = 3 * p + 4 * s  # read p, g, m, v; write p, m, v
    per_phase["copy"] = 2 * p
    return per_phase[phase]


# ---- the problem ---------------------------------------------------------------------------
class Problem:
    """Parameters, gradients and bSAM state for the shapes, as lists of tensors."""

    def __init__(self, shapes, dtype, device):
        state = torch.float64 if dtype == torch.float64 else torch.float32
        self.params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        self.grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        self.means = [p.to(state) for p in self.params]
        self.precisions = [torch.rand(s, dtype=state, device=device) + 1 for s in shapes]
        self.momentums = [torch.zeros(s, dtype=state, device=device) for s in shapes]
        self.stats = [torch.zeros(s, dtype=state, device=device) for s in shapes]
        self.offsets = [0]
        for p in self.params[:-1]:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.numel = sum(p.numel() for p in self.params)


def backend_phases(backend, pb: Problem):
    h = HYPER
    phases = {
        "sample": lambda: backend.bsam_sample(
            pb.params, pb.means, pb.precisions, pb.offsets, num_data=h["num_data"], seed=1
        ),
        "perturb": lambda: backend.bsam_perturb(
            pb.params, pb.grads, pb.means, pb.precisions, pb.stats, rho=h["rho"], accumulate=False
        ),
        "update": lambda: backend.bsam_update(
            pb.params,
            pb.grads,
            pb.means,
            pb.precisions,
            pb.momentums,
            pb.stats,
            lr=h["lr"],
            beta1=h["beta1"],
            beta2=h["beta2"],
            weight_decay=h["weight_decay"],
            damping=h["damping"],
            splits=1,
        ),
    }
    return phases


def plain_sample(params, means, precisions, num_data: float):
    for param, mean, precision in zip(params, means, precisions):
        param.copy_(mean + torch.randn_like(mean) / torch.sqrt(num_data * precision))


def plain_perturb(params, grads, means, precisions, stats, rho: float):
    for param, grad, mean, precision, stat in zip(params, grads, means, precisions, stats):
        g = grad.to(mean.dtype)
        param.copy_(mean + rho * g / precision)
        stat.copy_(torch.sqrt(precision) * g.abs())


def plain_update(params, grads, means, precisions, momentums, stats, lr, beta1, beta2, weight_decay, damping):
    for param, grad, mean, precision, momentum, stat in zip(params, grads, means, precisions, momentums, stats):
        momentum.mul_(beta1).add_((1 - beta1) * (grad.to(mean.dtype) + weight_decay * mean))
        mean.sub_(lr * momentum / precision)
        precision.mul_(beta2).add_((1 - beta2) * (stat + weight_decay + damping))
        param.copy_(mean)


def plain_phases(pb: Problem, wrap=lambda f: f):
    h = HYPER
    sample, perturb, update = wrap(plain_sample), wrap(plain_perturb), wrap(plain_update)
    return {
        "sample": lambda: sample(pb.params, pb.means, pb.precisions, h["num_data"]),
        "perturb": lambda: perturb(pb.params, pb.grads, pb.means, pb.precisions, pb.stats, h["rho"]),
        "update": lambda: update(
            pb.params,
            pb.grads,
            pb.means,
            pb.precisions,
            pb.momentums,
            pb.stats,
            h["lr"],
            h["beta1"],
            h["beta2"],
            h["weight_decay"],
            h["damping"],
        ),
    }


def pytorch_optimizer_phases(pb: Problem):
    from pytorch_optimizer import BSAM

    params = [torch.nn.Parameter(p.clone()) for p in pb.params]
    for p, g in zip(params, pb.grads):
        p.grad = g
    opt = BSAM(params, num_data=int(HYPER["num_data"]), lr=HYPER["lr"], rho=HYPER["rho"])
    return {"sample": opt.first_step, "perturb": opt.second_step, "update": opt.third_step}


def with_step(phases):
    if set(phases) >= {"sample", "perturb", "update"}:
        parts = [phases["sample"], phases["perturb"], phases["update"]]
        phases["step"] = lambda: [f() for f in parts]
    return phases


# ---- timing --------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, budget_s: float, max_reps: int) -> tuple[float, float, float, int, float | None]:
    """(median, 20%, 80%) milliseconds, repetitions, peak extra device memory in MB (None on CPU)."""
    if device.type == "cuda":
        import triton.testing

        fn()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        median, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=int(budget_s * 1000) // 4)
        return median, q20, q80, -1, peak
    fn()  # warm-up: compiles, fills caches
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    reps = max(1, min(max_reps, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    if len(times) == 1:
        return times[0], times[0], times[0], 1, None
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7], reps, None


def measure_copy(numel: int, dtype, device, budget_s: float, max_reps: int):
    """``measure`` of a device-to-device copy of ``numel`` elements (buffers freed on return)."""
    src = torch.empty(numel, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), device, budget_s, max_reps)


# ---- main ----------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            cwd=pathlib.Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            check=False,
            text=True,
            timeout=10,
            cwd=pathlib.Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def implementations(args, device, pb: Problem):
    """(name, {phase: callable}) for every requested implementation that can run here; skips with reasons."""
    wanted = set(args.impls.split(",")) if args.impls else None
    out, skipped = [], []

    def want(name):
        return wanted is None or name in wanted

    for name in backends.NAMES:
        if not want(name):
            continue
        reason = backends.why_unavailable(name, device)
        if reason is None and name == "triton" and device.type != "cuda":
            reason = "runs under the Triton interpreter on the CPU: a correctness tool, not a benchmark"
        if reason:
            skipped.append((name, reason))
            continue
        out.append((name, with_step(backend_phases(backends.resolve(name, device), pb))))
    if want("torch"):
        out.append(("torch", with_step(plain_phases(pb))))
    if want("torch.compile"):
        out.append(("torch.compile", with_step(plain_phases(pb, wrap=torch.compile))))
    if want("pytorch_optimizer"):
        try:
            out.append(("pytorch_optimizer", with_step(pytorch_optimizer_phases(pb))))
        except ImportError as exc:
            skipped.append(("pytorch_optimizer", str(exc)))
    if want("adamw_fused"):
        params = [torch.nn.Parameter(p.clone()) for p in pb.params]
        for p, g in zip(params, pb.grads):
            p.grad = g
        try:
            adamw = torch.optim.AdamW(params, lr=1e-3, fused=True)
            adamw.step()
            out.append(("adamw_fused", {"adamw": adamw.step}))
        except (RuntimeError, ValueError) as exc:
            skipped.append(("adamw_fused", str(exc).splitlines()[0]))
    return out, skipped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("gpt2", "resnet50"), help="parameter shapes of a real model")
    parser.add_argument(
        "--numel",
        type=lambda s: int(s.replace("_", "")),
        default=262_144,
        help="total parameters of the synthetic problem (ignored with --preset)",
    )
    parser.add_argument("--tensors", type=int, default=16, help="number of synthetic tensors")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="parameter dtype (state is float32)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", default="", help="comma-separated subset, e.g. triton,cuda,torch,adamw_fused,copy")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of timing per case")
    parser.add_argument("--reps", type=int, default=50, help="at most this many timed runs per case (CPU)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="CSV file to append to")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (0: its default)")
    parser.add_argument("--note", default="", help="free text stored with every row (e.g. machine load)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = (
        {"gpt2": gpt2_shapes, "resnet50": resnet50_shapes}[args.preset]()
        if args.preset
        else synthetic_shapes(args.numel, args.tensors)
    )
    size_name = args.preset or f"{args.numel}x{args.tensors}"
    torch.manual_seed(0)
    pb = Problem(shapes, dtype, device)
    param_bytes, state_bytes = pb.params[0].element_size(), pb.means[0].element_size()
    phases = args.phases.split(",")

    # the bandwidth reference: a device-to-device copy of a buffer as large as the parameters
    copy_ms = measure_copy(pb.numel, dtype, device, args.budget, args.reps)
    copy_gbps = 2 * pb.numel * param_bytes / copy_ms[0] / 1e6

    impls, skipped = implementations(args, device, pb)
    cases = [
        (name, phase, fn) for name, table in impls for phase, fn in table.items() if phase in phases or phase == "adamw"
    ]
    triton_version = "none"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    common = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "sambayes": sambayes.__version__,
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "size": size_name,
        "numel": pb.numel,
        "tensors": len(shapes),
        "dtype": args.dtype,
        "note": args.note,
    }
    rows = [
        dict(
            common,
            impl="copy",
            phase="copy",
            median_ms=copy_ms[0],
            q20_ms=copy_ms[1],
            q80_ms=copy_ms[2],
            reps=copy_ms[3],
            bytes=2 * pb.numel * param_bytes,
            gbps=copy_gbps,
            pct_copy=100.0,
            peak_mb=copy_ms[4],
            error="",
        )
    ]
    for name, phase, fn in tqdm(cases, desc="bench_step", unit="case"):
        nbytes = minimal_bytes(phase, param_bytes, state_bytes) * pb.numel
        try:
            median, q20, q80, reps, peak = measure(fn, device, args.budget, args.reps)
            gbps = nbytes / median / 1e6
            rows.append(
                dict(
                    common,
                    impl=name,
                    phase=phase,
                    median_ms=median,
                    q20_ms=q20,
                    q80_ms=q80,
                    reps=reps,
                    bytes=nbytes,
                    gbps=gbps,
                    pct_copy=100 * gbps / copy_gbps,
                    peak_mb=peak,
                    error="",
                )
            )
        except Exception as exc:  # noqa: BLE001 - a failing implementation is a result, not a crash
            rows.append(
                dict(
                    common,
                    impl=name,
                    phase=phase,
                    median_ms=math.nan,
                    q20_ms=math.nan,
                    q80_ms=math.nan,
                    reps=0,
                    bytes=nbytes,
                    gbps=math.nan,
                    pct_copy=math.nan,
                    peak_mb=None,
                    error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                )
            )

    print(
        f"\n{common['device']} | torch {torch.__version__} | triton {triton_version} | {size_name}: "
        f"{pb.numel:,} {args.dtype} parameters in {len(shapes)} tensors | copy {copy_gbps:.1f} GB/s"
    )
    header = (
        f"{'impl':18s} {'phase':8s} {'median ms':>10s} {'20%':>9s} {'80%':>9s} {'GB/s':>8s} {'% copy':>7s} "
        f"{'peak MB':>8s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["error"]:
            print(f"{r['impl']:18s} {r['phase']:8s} error: {r['error']}")
            continue
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        print(
            f"{r['impl']:18s} {r['phase']:8s} {r['median_ms']:10.3f} {r['q20_ms']:9.3f} {r['q80_ms']:9.3f} "
            f"{r['gbps']:8.2f} {r['pct_copy']:7.1f} {peak:>8s}"
        )
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    step = {r["impl"]: r["median_ms"] for r in rows if r["phase"] == "step" and not r["error"]}
    for fused in ("triton", "cuda", "cpu"):
        if fused in step:
            ratios = ", ".join(
                f"{step[other] / step[fused]:.1f}x vs {other}"
                for other in ("torch", "torch.compile", "pytorch_optimizer", "eager", "foreach")
                if other in step
            )
            print(f"whole step, {fused}: {ratios}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with open(args.out, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
