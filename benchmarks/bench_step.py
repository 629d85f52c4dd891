"""Time one bSAM step and one IVON step, as users pay them and phase by phase, for every implementation.

    python benchmarks/bench_step.py                                # CPU-friendly default size
    python benchmarks/bench_step.py --preset gpt2                  # GPT-2 small shapes (124M, 148 tensors)
    python benchmarks/bench_step.py --preset resnet50
    python benchmarks/bench_step.py --numel 10_000_000 --tensors 100 --impls cpu,eager,torch
    python benchmarks/bench_step.py --launch-bound                 # 1,000 tensors of 1,000: host time per step
    python benchmarks/bench_step.py --launch-bound --capturable    # also capturable=True (on CUDA: a graph replay)

Implementations: every backend of ``sambayes.backends.NAMES`` available on the device,
``torch`` (a plain per-tensor PyTorch bSAM step as a user would write it, noise from
``torch.randn_like``), ``torch.compile`` of its phases, ``pytorch_optimizer``'s BSAM, ``ivon`` (IVON of ``ivon-opt``,
the variational peer: one gradient per step where bSAM takes two), ``torch.optim.AdamW`` (fused,
and foreach: its own step) and a device-to-device copy.

Rows (``phase``):

- ``step``: what users pay, the public ``opt.step(closure)`` (``torch``: the plain step with the
  same closure). The closure stands for the two backward passes: it puts the given gradients
  into ``.grad`` as autograd would (assigns when ``.grad`` is None, else adds), so it costs what
  autograd's accumulation costs and no forward/backward.
- ``kernels``: the phases a step launches, back to back, with no optimizer around them;
- ``sample``, ``perturb``, ``check``, ``update``: each phase alone (``check`` = find_nonfinite).
- ``ivon`` (``ivon-opt``'s IVON): ``step`` is a training step's optimizer part as IVON's README writes
  it, with one gradient: ``with opt.sampled_params(train=True): opt.zero_grad(); <the closure, once>``,
  then ``opt.step()``; ``kernels`` is its optimizer work alone, the gradient already in ``.grad``:
  ``sampled_params(train=True)`` entered and left (sample, then restore and collect the gradient),
  then ``opt.step()``. Byte counts and "x floor" are those of sambayes's IVON below.
- ``IVON <backend>`` (``sambayes.IVON``, one sample, Price's estimator): ``step`` is the public
  ``opt.step(closure)`` with the closure once; ``sample``, ``check`` and ``update`` its phases
  (``bsam_sample``, ``find_nonfinite``, ``ivon_update`` computing the curvature from the gradient
  and the regenerated noise); ``kernels`` the three back to back. Its floor is a copy of 44 B per
  float32 parameter (sample 12, update 32); the closing lines compare its step with ivon-opt's,
  the floor, bSAM's and AdamW's. ``noise`` (the ``cpu`` backend): the normals a step draws (the
  sample's, and the update's again for Price's estimator), alone, into a 4 MB buffer the caches hold:
  the arithmetic of the spec's noise with this generator, without memory traffic.

GB/s divides the minimal bytes of a phase (the kernels' docstrings) by the time, whatever the
implementation moves; "% copy" compares with a copy of the parameters measured in the same run,
and "x floor" divides a step's time by the floor: the time of a copy, in the same run, that
moves 68 bytes per float32 parameter (sample 12, ascent 20, update 36). That copy is as large
as a step's working set; a parameter-sized copy can run from a large last-level cache. Timing: median and 20/80% quantiles, by
``triton.testing.do_bench`` on CUDA, by a plain loop on the CPU. Each row is appended to
``benchmarks/results/bench_step.csv`` as soon as it is measured (a timeout keeps what was done).
The problem, the public step and the timing are ``sambayes.cli.bench``'s, which also serves the quick
form of this benchmark that users run: ``python -m sambayes bench``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import pathlib
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import sambayes
from sambayes import backends
from sambayes.cli.bench import (
    HYPER,
    closure_for,
    device_name,
    floor_bytes,
    measure,
    measure_copy,
    params_and_grads,
    public_step,
    sync,
    synthetic_shapes,
    why_not_timed,
)

RESULTS = pathlib.Path(__file__).parent / "results" / "bench_step.csv"
PHASES = ("step", "kernels", "sample", "perturb", "check", "update", "noise")


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


#: the prefix of the rows of sambayes.IVON
IVON = "IVON"
#: the suffix of the rows of BSAM(state_dtype=torch.bfloat16)
BF16_STATE = "bf16-state"
#: the suffix of the rows of BSAM(capturable=True)
CAPTURABLE = "capturable"


# ---- byte counts: the minimal traffic of each phase (the kernels' docstrings) -------------
def minimal_bytes(phase: str, param_bytes: int, state_bytes: int, stored_bytes: int | None = None) -> int:
    """Bytes per parameter a fused implementation must move (one sub-batch); ``stored_bytes``: those
    of the precision and the momentum (2 with ``state_dtype=torch.bfloat16``), else the state's."""
    p, s = param_bytes, state_bytes
    q = s if stored_bytes is None else stored_bytes
    per_phase = {
        "sample": s + q + p,  # read m, s; write θ
        "perturb": 3 * p + 2 * s + q,  # read g, m, s; write θ, the curvature sum, the zeroed g
        "check": p,  # read h
        "update": 3 * p + 3 * s + 4 * q,  # read h, m, s, g_m, curvature; write g_m, m, s, θ, the zeroed h
        "adamw": 3 * p + 4 * s,  # read p, g, m, v; write p, m, v
        "copy": 2 * p,
    }
    per_phase["kernels"] = per_phase["sample"] + per_phase["perturb"] + per_phase["check"] + per_phase["update"]
    per_phase["step"] = per_phase["kernels"] + 2 * 3 * p  # + autograd's accumulation in each of the two passes
    return per_phase[phase]


def ivon_minimal_bytes(phase: str, param_bytes: int, state_bytes: int, stored_bytes: int | None = None) -> int:
    """Bytes per parameter of one sambayes IVON step with one sample (Price's estimator), as
    :func:`minimal_bytes` counts bSAM's (``stored_bytes``: precision and momentum)."""
    p, s = param_bytes, state_bytes
    q = s if stored_bytes is None else stored_bytes
    per_phase = {
        "sample": s + q + p,  # read m, s; write θ
        "check": p,  # read g
        "update": 3 * p + 2 * s + 4 * q,  # read g, m, s, g_m; write g_m, m, s, θ, the zeroed g
        "noise": 0,  # arithmetic alone
    }
    per_phase["kernels"] = per_phase["sample"] + per_phase["check"] + per_phase["update"]
    per_phase["step"] = per_phase["kernels"] + 3 * p  # + autograd's accumulation in the one pass
    return per_phase[phase]


# ---- the problem ---------------------------------------------------------------------------
class Problem:
    """Parameters, given gradients and bSAM state for the shapes, as lists of tensors."""

    def __init__(self, shapes, dtype, device, stored=None):
        state = torch.float64 if dtype == torch.float64 else torch.float32
        stored = stored or state  # precision and momentum: torch.bfloat16 with state_dtype=torch.bfloat16
        self.device, self.dtype, self.shapes = device, dtype, shapes
        self.params, self.grads = params_and_grads(shapes, dtype, device)
        self.means = [p.to(state) for p in self.params]
        self.precisions = [(torch.rand(s, dtype=state, device=device) + 1).to(stored) for s in shapes]
        self.momentums = [torch.zeros(s, dtype=stored, device=device) for s in shapes]
        self.curvature_sums = [torch.zeros(s, dtype=state, device=device) for s in shapes]
        self.offsets = [0]
        for p in self.params[:-1]:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.numel = sum(p.numel() for p in self.params)
        self.found_inf = torch.zeros((), device=device)
        self.inv_scale = torch.ones((), device=device)


def backend_phases(module, pb: Problem):
    """The phases of one step of a sambayes backend, called directly (kernel-only)."""
    h = HYPER
    flags = {"found_inf": pb.found_inf, "inv_scale": pb.inv_scale}
    phases = {
        "sample": lambda: module.bsam_sample(
            pb.params, pb.means, pb.precisions, pb.offsets, num_data=h["num_data"], seed=1
        ),
        "perturb": lambda: module.bsam_perturb(
            pb.params, pb.grads, pb.means, pb.precisions, pb.curvature_sums, **flags, rho=h["rho"], accumulate=False
        ),
        "check": lambda: module.find_nonfinite(pb.grads, pb.found_inf),
        "update": lambda: module.bsam_update(
            pb.params,
            pb.grads,
            pb.means,
            pb.precisions,
            pb.momentums,
            pb.curvature_sums,
            pb.offsets,
            **flags,
            lr=h["lr"],
            beta1=h["beta1"],
            beta2=h["beta2"],
            weight_decay=h["weight_decay"],
            damping=h["damping"],
            splits=1,
            seed=2,
        ),
    }
    parts = [phases[name] for name in ("sample", "perturb", "check", "update")]
    phases["kernels"] = lambda: [f() for f in parts]
    return phases


def ivon_backend_phases(module, pb: Problem):
    """The phases of one sambayes IVON step (one sample) of a backend, called directly (kernel-only)."""
    h = HYPER
    step = torch.ones((), dtype=torch.float64, device=pb.device)
    phases = {
        "sample": lambda: module.bsam_sample(
            pb.params, pb.means, pb.precisions, pb.offsets, num_data=h["num_data"], seed=1
        ),
        "check": lambda: module.find_nonfinite(pb.grads, pb.found_inf),
        "update": lambda: module.ivon_update(
            pb.params,
            pb.grads,
            pb.means,
            pb.precisions,
            pb.momentums,
            pb.means,  # one sample: the curvature comes from the gradient and its noise, no sum is read
            pb.offsets,
            pb.found_inf,
            pb.inv_scale,
            step,
            lr=h["lr"],
            beta1=h["beta1"],
            beta2=0.99999,
            ess=h["num_data"],
            weight_decay=h["weight_decay"],
            clip_radius=math.inf,
            debias=True,
            price=True,
            summed=False,
            splits=1,
            noise_seed=3,
            seed=2,
        ),
    }
    parts = [phases[name] for name in ("sample", "check", "update")]
    phases["kernels"] = lambda: [f() for f in parts]
    return phases


def cpu_noise(numel: int, draws: int):
    """``draws`` passes of ``numel`` normals (ALGORITHM.md, "Noise") by the CPU extension, into a buffer of 2^20
    (4 MB: it stays in the last-level cache, so this times the generator's arithmetic, not memory)."""
    buffer = torch.empty(min(numel, 1 << 20))
    randn = torch.ops.sambayes_C.philox_randn_

    def draw():
        for seed in range(draws):
            for start in range(0, numel, buffer.numel()):
                randn(buffer[: numel - start], seed, start)

    return draw


def plain_sample(params, means, precisions, num_data: float):
    for param, mean, precision in zip(params, means, precisions):
        param.copy_(mean + torch.randn_like(mean) / torch.sqrt(num_data * precision))


def plain_perturb(params, grads, means, precisions, curvature_sums, rho: float):
    for param, grad, mean, precision, curvature_sum in zip(params, grads, means, precisions, curvature_sums):
        g = grad.to(mean.dtype)
        param.copy_(mean + rho * g / precision)
        curvature_sum.copy_(torch.sqrt(precision) * g.abs())


def plain_update(params, grads, means, precisions, momentums, curvature_sums, lr, beta1, beta2, weight_decay, damping):
    for param, grad, mean, precision, momentum, curvature_sum in zip(
        params, grads, means, precisions, momentums, curvature_sums
    ):
        momentum.mul_(beta1).add_((1 - beta1) * (grad.to(mean.dtype) + weight_decay * mean))
        mean.sub_(lr * momentum / precision)
        precision.mul_(beta2).add_((1 - beta2) * (curvature_sum + weight_decay + damping))
        param.copy_(mean)


def plain_phases(pb: Problem, wrap=lambda f: f):
    h = HYPER
    sample, perturb, update = wrap(plain_sample), wrap(plain_perturb), wrap(plain_update)
    phases = {
        "sample": lambda: sample(pb.params, pb.means, pb.precisions, h["num_data"]),
        "perturb": lambda: perturb(pb.params, pb.grads, pb.means, pb.precisions, pb.curvature_sums, h["rho"]),
        "update": lambda: update(
            pb.params,
            pb.grads,
            pb.means,
            pb.precisions,
            pb.momentums,
            pb.curvature_sums,
            h["lr"],
            h["beta1"],
            h["beta2"],
            h["weight_decay"],
            h["damping"],
        ),
    }
    parts = [phases[name] for name in ("sample", "perturb", "update")]
    phases["kernels"] = lambda: [f() for f in parts]
    return phases


def plain_step(pb: Problem):
    """A plain per-tensor bSAM step as a user would write it, with the same closure as the public step
    (the user sets .grad to None before each pass, so the closure assigns)."""
    h = HYPER
    params = [torch.nn.Parameter(p.clone()) for p in pb.params]
    closure = closure_for(params, pb.grads)

    @torch.no_grad()
    def step():
        plain_sample(params, pb.means, pb.precisions, h["num_data"])
        for p in params:
            p.grad = None
        closure()
        plain_perturb(params, [p.grad for p in params], pb.means, pb.precisions, pb.curvature_sums, h["rho"])
        for p in params:
            p.grad = None
        closure()
        hyper = [h[k] for k in ("lr", "beta1", "beta2", "weight_decay", "damping")]
        plain_update(params, [p.grad for p in params], pb.means, pb.precisions, pb.momentums, pb.curvature_sums, *hyper)

    return step


def pytorch_optimizer_phases(pb: Problem):
    from pytorch_optimizer import BSAM

    params = [torch.nn.Parameter(p.clone()) for p in pb.params]
    for p, g in zip(params, pb.grads):
        p.grad = g
    opt = BSAM(params, num_data=int(HYPER["num_data"]), lr=HYPER["lr"], rho=HYPER["rho"])
    phases = {"sample": opt.first_step, "perturb": opt.second_step, "update": opt.third_step}
    phases["kernels"] = lambda: [f() for f in (opt.first_step, opt.second_step, opt.third_step)]
    return phases


def ivon_phases(pb: Problem):
    """IVON (``ivon.IVON``, one Monte Carlo sample) on its own copies of the parameters: ``step``
    (sampling, the one gradient's write as autograd does it after ``zero_grad()``, the update) and
    ``kernels`` (sampling and the update, the gradient already in ``.grad``). ImportError without ivon-opt."""
    import ivon

    h = HYPER
    params = [torch.nn.Parameter(p.clone()) for p in pb.params]
    for p, g in zip(params, pb.grads):
        p.grad = g.clone()
    opt = ivon.IVON(params, lr=h["lr"], ess=h["num_data"], weight_decay=h["weight_decay"], beta1=h["beta1"])
    closure = closure_for(params, pb.grads)

    def step():
        with opt.sampled_params(train=True):
            opt.zero_grad(set_to_none=True)
            closure()
        opt.step()

    def optimizer_work():
        with opt.sampled_params(train=True):
            pass
        opt.step()

    return {"step": step, "kernels": optimizer_work}


def adamw_step(pb: Problem, **kind):
    params = [torch.nn.Parameter(p.clone()) for p in pb.params]
    for p, g in zip(params, pb.grads):
        p.grad = g
    adamw = torch.optim.AdamW(params, lr=1e-3, **kind)
    adamw.step()
    return adamw.step


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


def implementations(args, device, pb: Problem):
    """(name, {phase: callable}) for every requested implementation that can run here; skips with reasons."""
    wanted = set(args.impls.split(",")) if args.impls else None
    out, skipped = [], []

    def want(name):
        return wanted is None or name in wanted

    for name in backends.NAMES:
        if not (want(name) or want(f"{IVON} {name}") or want(IVON)):
            continue
        reason = why_not_timed(name, device)
        if reason:
            skipped.append((name, reason))
            continue
        if want(name):
            phases = backend_phases(backends.resolve(name, device), pb)
            phases["step"] = public_step("bsam", pb.params, pb.grads, name)[0]
            out.append((name, phases))
        if (
            want(name) and args.bf16_state and pb.dtype != torch.float64
        ):  # BSAM(state_dtype=torch.bfloat16), same gradients
            lean = Problem(pb.shapes, pb.dtype, device, stored=torch.bfloat16)
            lean.params, lean.grads, lean.means = pb.params, pb.grads, pb.means
            phases = backend_phases(backends.resolve(name, device), lean)
            phases["step"] = public_step("bsam", pb.params, pb.grads, name, state_dtype=torch.bfloat16)[0]
            out.append((f"{name} {BF16_STATE}", phases))
        if (
            want(name) and args.capturable
        ):  # the seeds hashed on the device: what capturable=True costs a step not captured
            out.append(
                (f"{name} {CAPTURABLE}", {"step": public_step("bsam", pb.params, pb.grads, name, capturable=True)[0]})
            )
        if want(f"{IVON} {name}") or want(IVON):
            phases = ivon_backend_phases(backends.resolve(name, device), pb)
            phases["step"] = public_step("ivon", pb.params, pb.grads, name)[0]
            if name == "cpu":  # the sample's noise and the update's, drawn again
                phases["noise"] = cpu_noise(pb.numel, draws=2)
            out.append((f"{IVON} {name}", phases))
            if args.bf16_state and pb.dtype != torch.float64:
                lean = Problem(pb.shapes, pb.dtype, device, stored=torch.bfloat16)
                lean.params, lean.grads, lean.means = pb.params, pb.grads, pb.means
                phases = ivon_backend_phases(backends.resolve(name, device), lean)
                phases["step"] = public_step("ivon", pb.params, pb.grads, name, state_dtype=torch.bfloat16)[0]
                out.append((f"{IVON} {name} {BF16_STATE}", phases))
    if want("torch"):
        out.append(("torch", {**plain_phases(pb), "step": plain_step(pb)}))
    if want("torch.compile"):
        out.append(("torch.compile", plain_phases(pb, wrap=torch.compile)))
    if want("pytorch_optimizer"):
        try:
            out.append(("pytorch_optimizer", pytorch_optimizer_phases(pb)))
        except ImportError as exc:
            skipped.append(("pytorch_optimizer", str(exc)))
    if want("ivon"):
        try:
            out.append(("ivon", ivon_phases(pb)))
        except ImportError as exc:
            skipped.append(("ivon", f"{exc} (pip install ivon-opt)"))
    for name, kind in (("adamw_fused", {"fused": True}), ("adamw_foreach", {"foreach": True})):
        if want(name):
            try:
                out.append((name, {"adamw": adamw_step(pb, **kind)}))
            except (RuntimeError, ValueError) as exc:
                skipped.append((name, str(exc).splitlines()[0]))
    return out, skipped


def launch_bound(args, device) -> list[tuple[str, str, object]]:
    """1,000 tensors of 1,000 elements: where the host's work per tensor decides the step time.

    ``closure`` is the cost of the two backward passes' accumulation alone (1,000 ``add_`` each):
    what a sambayes step costs beyond it is the optimizer's own host time."""
    pb = Problem([(1000,)] * 1000, torch.float32, device)
    params = [torch.nn.Parameter(p.clone()) for p in pb.params]
    for p in params:
        p.grad = torch.zeros_like(p)
    closure = closure_for(params, pb.grads)
    cases = [("closure", "closure", lambda: (closure(), closure()))]
    for name in ("triton", "cuda", "cpu"):  # the fused backends
        if why_not_timed(name, device) is None:
            cases.append((name, "step", public_step("bsam", pb.params, pb.grads, name)[0]))
            if args.capturable:
                step = public_step("bsam", pb.params, pb.grads, name, capturable=True)[0]
                cases.append((f"{name} {CAPTURABLE}", "step", step))
            if args.capturable and device.type == "cuda":
                try:
                    cases.append((f"{name} graph", "replay", captured_step(pb, name)))
                except RuntimeError as exc:  # reported, not fatal: the other rows still count
                    print(f"skipped {name} graph: {str(exc).splitlines()[0]}")
    try:
        cases.append(("ivon", "step", ivon_phases(pb)["step"]))
    except ImportError as exc:
        print(f"skipped ivon: {exc} (pip install ivon-opt)")
    for name, kind in (("adamw_fused", {"fused": True}), ("adamw_foreach", {"foreach": True})):
        try:
            cases.append((name, "adamw", adamw_step(pb, **kind)))
        except (RuntimeError, ValueError) as exc:
            print(f"skipped {name}: {str(exc).splitlines()[0]}")
    return pb, cases


def captured_step(pb: Problem, backend: str):
    """The public step with capturable=True, captured once in a CUDA graph after three warm-up
    steps (as torch.cuda.graphs asks): returns the graph's replay, one whole step."""
    step = public_step("bsam", pb.params, pb.grads, backend, capturable=True)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def host_time(fn, device, reps: int) -> float:
    """Median host microseconds per call: until the call returns (on a GPU the kernels may still run)."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
        sync(device)
    return statistics.median(times)


class CsvRows:
    """Rows appended to the CSV one by one, as they are measured (``fields``: the columns; default
    this script's). A file with other columns is first rewritten with these, old rows kept."""

    def __init__(self, path: pathlib.Path, common: dict, fields: list[str] | None = None) -> None:
        self.path, self.common, self.rows, self.fields = path, common, [], list(fields or FIELDS)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            with open(path, newline="", encoding="utf-8") as f:
                old = list(csv.DictReader(f))
            if old and list(old[0]) != self.fields:  # an older layout: rewrite it with today's columns
                with open(path, "w", newline="", encoding="utf-8") as f:
                    writer = csv.DictWriter(f, fieldnames=self.fields)
                    writer.writeheader()
                    writer.writerows({k: row.get(k, "") for k in self.fields} for row in old)

    def add(self, **row) -> dict:
        row = dict(self.common, **row)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in self.fields})
        self.rows.append(row)
        return row


FIELDS = [
    "date", "device", "sambayes", "commit", "torch", "triton", "size", "numel", "tensors", "dtype", "note",
    "impl", "phase", "median_ms", "q20_ms", "q80_ms", "reps", "bytes", "gbps", "pct_copy", "x_floor",
    "host_us", "peak_mb", "error",
]  # fmt: skip


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
    parser.add_argument("--impls", default="", help="comma-separated subset, e.g. cpu,torch,adamw_fused,copy")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    parser.add_argument("--launch-bound", action="store_true", help="1,000 tensors of 1,000: host time per step")
    parser.add_argument(
        "--bf16-state",
        action="store_true",
        help=f"also each sambayes backend with BSAM(state_dtype=torch.bfloat16) (rows '<backend> {BF16_STATE}')",
    )
    parser.add_argument(
        "--capturable",
        action="store_true",
        help=f"also the public step of each sambayes backend with BSAM(capturable=True) (rows '<backend> {CAPTURABLE}')",
    )
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
        "dtype": args.dtype,
        "note": args.note,
    }
    if args.launch_bound:
        return main_launch_bound(args, device, common)

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
    rows = CsvRows(args.out, dict(common, size=size_name, numel=pb.numel, tensors=len(shapes)))

    # the bandwidth reference: a device-to-device copy of a buffer as large as the parameters
    copy_ms = measure_copy(pb.numel, dtype, device, args.budget, args.reps)
    copy_gbps = 2 * pb.numel * param_bytes / copy_ms[0] / 1e6
    # the floor of a step: a copy that moves the step's minimal bytes, so as large as its working set
    # (a parameter-sized copy may run from a large last-level cache, a step's working set does not)
    floor_numel = floor_bytes(param_bytes, state_bytes) * pb.numel // (2 * param_bytes)
    floor_ms = measure_copy(floor_numel, dtype, device, args.budget, args.reps)[0]
    print(
        f"\n{common['device']} | torch {torch.__version__} | triton {triton_version} | {size_name}: "
        f"{pb.numel:,} {args.dtype} parameters in {len(shapes)} tensors | copy {copy_gbps:.1f} GB/s; "
        f"floor of a step {floor_ms:.2f} ms (a copy of its {floor_bytes(param_bytes, state_bytes)} B per parameter, "
        f"{2 * floor_numel * param_bytes / floor_ms / 1e6:.1f} GB/s)"
    )
    header = (
        f"{'impl':18s} {'phase':8s} {'median ms':>10s} {'20%':>9s} {'80%':>9s} {'GB/s':>8s} {'% copy':>7s} "
        f"{'x floor':>8s} {'peak MB':>8s}"
    )
    print(header)
    print("-" * len(header))

    def show(r):
        if r["error"]:
            tqdm.write(f"{r['impl']:18s} {r['phase']:8s} error: {r['error']}")
            return
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        x_floor = f"{r['x_floor']:.2f}" if r["x_floor"] != "" else ""
        gbps = f"{r['gbps']:.2f}" if r["gbps"] != "" else ""
        pct_copy = f"{r['pct_copy']:.1f}" if r["pct_copy"] != "" else ""
        tqdm.write(
            f"{r['impl']:18s} {r['phase']:8s} {r['median_ms']:10.3f} {r['q20_ms']:9.3f} {r['q80_ms']:9.3f} "
            f"{gbps:>8s} {pct_copy:>7s} {x_floor:>8s} {peak:>8s}"
        )

    show(
        rows.add(
            impl="copy",
            phase="copy",
            median_ms=copy_ms[0],
            q20_ms=copy_ms[1],
            q80_ms=copy_ms[2],
            reps=copy_ms[3],
            bytes=2 * pb.numel * param_bytes,
            gbps=copy_gbps,
            pct_copy=100.0,
            x_floor="",
            peak_mb=copy_ms[4],
            error="",
        )
    )
    impls, skipped = implementations(args, device, pb)
    ivon_rows = any(name == "ivon" or name.startswith(f"{IVON} ") for name, _ in impls)
    if ivon_rows:  # IVON's floor: a copy of its 44 B per float32 parameter, in the same run
        ivon_floor_numel = floor_bytes(param_bytes, state_bytes, "ivon") * pb.numel // (2 * param_bytes)
        ivon_floor_ms = measure_copy(ivon_floor_numel, dtype, device, args.budget, args.reps)[0]
        print(
            f"floor of an IVON step {ivon_floor_ms:.2f} ms (a copy of {floor_bytes(param_bytes, state_bytes, 'ivon')} B per parameter)"
        )

    def bytes_and_floor(name: str, phase: str) -> tuple[int | str, float]:
        """The minimal bytes of a row and the floor its step is compared with (bSAM's or IVON's)."""
        stored_bytes = 2 if name.endswith(BF16_STATE) else state_bytes
        if name == "ivon" or name.startswith(f"{IVON} "):
            return ivon_minimal_bytes(phase, param_bytes, state_bytes, stored_bytes) * pb.numel, ivon_floor_ms
        return minimal_bytes(phase, param_bytes, state_bytes, stored_bytes) * pb.numel, floor_ms

    cases = [(name, phase, table[phase]) for phase in PHASES + ("adamw",) for name, table in impls if phase in table]
    cases = [(name, phase, fn) for name, phase, fn in cases if phase in phases or phase == "adamw"]
    for name, phase, fn in tqdm(cases, desc="bench_step", unit="case", leave=False):
        nbytes, floor = bytes_and_floor(name, phase)
        try:
            median, q20, q80, reps, peak = measure(fn, device, args.budget, args.reps)
            # a raised flag would have timed the skip path of every later update (once per case: no sync inside)
            if pb.found_inf.item() != 0:
                raise RuntimeError("found_inf was raised: the timed update skipped")
            gbps = nbytes / median / 1e6 if nbytes else ""
            x_floor = median / floor if phase in ("step", "kernels", "noise") else ""
            row = dict(
                median_ms=median, q20_ms=q20, q80_ms=q80, reps=reps, gbps=gbps,
                pct_copy=100 * gbps / copy_gbps if nbytes else "", x_floor=x_floor, peak_mb=peak, error="",
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a failing implementation is a result, not a crash
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            row = dict(median_ms=math.nan, q20_ms=math.nan, q80_ms=math.nan, reps=0, gbps=math.nan, pct_copy=math.nan,
                       x_floor="", peak_mb=None, error=error)  # fmt: skip
        show(rows.add(impl=name, phase=phase, bytes=nbytes, **row))
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    for phase in ("step", "kernels"):
        times = {r["impl"]: r["median_ms"] for r in rows.rows if r["phase"] == phase and not r["error"]}
        for fused in ("triton", "cuda", "cpu"):
            if fused in times:
                ratios = ", ".join(
                    f"{times[other] / times[fused]:.2f}x vs {other}"
                    for other in ("torch", "torch.compile", "pytorch_optimizer", "eager", "foreach")
                    if other in times
                )
                print(f"{phase} of {fused}: {times[fused] / floor_ms:.2f}x the floor; faster by {ratios}")
    print_ivon_comparison(rows.rows)
    print(f"appended {len(rows.rows)} rows to {args.out}", file=sys.stderr)


def print_ivon_comparison(rows: list[dict]) -> None:
    """ivon-opt's step (one gradient) beside each sambayes backend's bSAM step (two), and each sambayes IVON
    step beside ivon-opt's, its floor, the bSAM step of its backend and AdamW's."""
    times = {(r["impl"], r["phase"]): r["median_ms"] for r in rows if not r["error"]}
    floors = {(r["impl"], r["phase"]): r["x_floor"] for r in rows if r["x_floor"] != "" and not r["error"]}
    if ("ivon", "step") in times:
        step, work = times["ivon", "step"], times.get(("ivon", "kernels"))
        line = f"ivon: step {step:.3f} ms (one gradient)" + (
            f", its optimizer work alone {work:.3f} ms" if work else ""
        )
        ratios = [
            f"{step / times[b, 'step']:.2f}x the bSAM step of {b}" for b in backends.NAMES if (b, "step") in times
        ]
        print(line + ("; the step is " + ", ".join(ratios) if ratios else ""))
    for name, phase in list(times):
        if not name.startswith(f"{IVON} ") or phase != "step":
            continue
        step, backend = times[name, phase], name.split()[1]
        parts = [f"{floors[name, 'step']:.2f}x its floor"]
        if (name, "noise") in floors:
            parts.append(f"its noise alone {floors[name, 'noise']:.2f}x")
        if ("ivon", "step") in times:
            parts.append(f"{times['ivon', 'step'] / step:.1f}x faster than ivon-opt's")
        if (backend, "step") in times:
            parts.append(f"{step / times[backend, 'step']:.2f}x the bSAM step of {backend}")
        if ("adamw_fused", "adamw") in times:
            parts.append(f"{step / times['adamw_fused', 'adamw']:.1f}x AdamW's (fused, the update alone)")
        print(f"{name}: step {step:.3f} ms, " + ", ".join(parts))


def main_launch_bound(args, device, common) -> None:
    pb, cases = launch_bound(args, device)
    rows = CsvRows(args.out, dict(common, size="launch-bound 1000x1000", numel=pb.numel, tensors=1000))
    print(f"\n{common['device']} | 1,000 float32 tensors of 1,000 elements: host time per step (median)")
    for name, phase, fn in cases:
        us = host_time(fn, device, args.reps)
        rows.add(impl=name, phase=phase, host_us=us, error="")
        print(f"{name:18s} {phase:8s} {us:10.1f} us", flush=True)
    if any(name == "ivon" for name, _, _ in cases):
        print("ivon: one gradient per step (it writes .grad once), bSAM two")
    print(f"appended {len(rows.rows)} rows to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
