"""Optimizer memory: the bytes an optimizer keeps between steps, and its peak during one step.

    python benchmarks/bench_memory.py                     # every row (CPU, and CUDA when PyTorch sees a GPU)
    python benchmarks/bench_memory.py --markdown          # and the README table
    python benchmarks/bench_memory.py --optimizers bsam --tiers cpu --dtypes float32 --splits 1,2

Rows: ``sambayes.BSAM`` (``bsam``; ``bsam-bf16`` with ``state_dtype=torch.bfloat16``), ``sambayes.SAM`` with ``base="sgd"`` (``sam-sgd``) and
``base="adamw"`` (``sam-adamw``) and ``sambayes.IVON`` (``sambayes-ivon``; ``sambayes-ivon-bf16``) on every tier (backend) that can run on the device (Triton on the
CPU only runs in its interpreter, which copies through NumPy: skipped); ``torch.optim.AdamW``
with ``foreach=True`` and ``fused=True`` (``adamw``); ``pytorch_optimizer.BSAM``
(``pytorch_optimizer``, its default: foreach once gradients exist); IVON of ``ivon-opt`` (``ivon``,
``ivon.IVON`` with one Monte Carlo sample). Each for float32, bfloat16 and float16 parameters; sambayes
with ``splits`` 1 and 2 (sambayes's IVON: 1 and 2 samples), the others with one gradient pass per step
(splits 1 only).

The problem: ``sambayes.cli.bench``'s synthetic parameters and given gradients (default 1,000,000
parameters in 7 flat tensors of odd, unequal sizes); no model, so no activations. A step is the
optimizer's part of a training step, the gradient writes of the backward passes included (a
closure puts the given gradients into ``.grad`` as autograd would: assigned when ``.grad`` is
None, else added):

- sambayes: ``opt.step(closure, splits=k)`` (the closure runs twice per sub-batch); its IVON
  ``opt.step(closure)`` with ``mc_samples=k`` (the closure runs once per sample);
- AdamW: ``opt.zero_grad(); closure(); opt.step()``;
- pytorch_optimizer.BSAM: ``opt.step(closure)`` with a closure that calls ``opt.zero_grad()`` first
  (its step runs it twice; gradients are there before the first step, as its first phase needs);
- IVON: ``with opt.sampled_params(train=True): opt.zero_grad(); closure()``, then ``opt.step()``.

``--steps`` steps (default 3) are taken; the last one is measured, so whatever the first steps
create lazily is there.

**Kept between steps** (bytes per parameter): after the steps before the measured one, every
tensor reachable from the optimizer object, deduplicated by storage (a storage counts once, with
its whole size, however many views of it are reachable), leaving out the storages of the
parameters and of their ``.grad``. Reachable: the optimizer's attributes (``__dict__`` and
``__slots__``) and, recursively, the keys and values of dicts, the items of lists, tuples and sets,
and the attributes of other objects; modules, classes and functions are not entered. That is
``state``, tensors in ``param_groups`` (step counters; IVON's ``momentum`` and ``hess``), and
whatever else the optimizer keeps (sambayes's ledger slots and kept sums, its found-inf
flags). The 0-dim tensors among them (counters, flags) add a few dozen bytes in all: +0.00 B per
parameter at this size. The ``held`` column breaks the bytes down by where they were found. (IVON
makes its parameters views of one flat buffer of the means: that buffer counts as the parameters.)

**Peak during a step** (bytes per parameter, **parameters and gradients included**)::

    peak = P + max over the step of allocated(t) - allocated(start of the step)

with P the bytes of the parameters, their gradients and the kept storages at the start of the
measured step (storage accounting as above) and allocated(t) the bytes of live tensors:

- CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and every free of
  PyTorch's CPU allocator, with its size and address, in order (read from its event tree,
  ``kineto_results.experimental_event_tree()``); temporaries inside aten ops and
  inside the extension's kernels go through the same allocator and are included. The profile
  starts before the parameters are created, so allocated(t) is the running sum of the sizes of
  the blocks allocated since then and not yet freed (a free is matched to its allocation by
  address; blocks from before the profile, the given gradients, are never freed during it).
  Exact to the byte for tensor memory; memory that is not a tensor's (Python objects, a kernel's
  ``std::vector``) is not counted. As a check, ``other`` = allocated(start) - P: the bytes live
  at the step's start that neither the parameters, their gradients nor the optimizer hold (0
  unless something caches or leaks tensors).
- CUDA: ``torch.cuda.memory_allocated`` just before the step, ``reset_peak_memory_stats``, the
  step, ``max_memory_allocated``: the caching allocator's bytes (blocks rounded up to 512 B).
  ``other`` is not measured there.

Each row is printed and appended to ``benchmarks/results/bench_memory.csv`` with the device, date,
sambayes version and the commit of the sambayes checkout measured (``--label before`` marks rows
of an older commit, measured by pointing PYTHONPATH at a worktree of it). ``--markdown`` prints
the README table of this run, and a before/after table for bSAM when the CSV holds ``before``
rows of the same device and size.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import pathlib
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

import sambayes
from sambayes import backends
from sambayes.cli.bench import HYPER, closure_for, device_name, make_optimizer, params_and_grads, sync, synthetic_shapes
from sambayes.cli.bench import why_not_timed as why_not_measured

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_memory.csv"
DTYPES = ("float32", "bfloat16", "float16")
SAMBAYES = ("bsam", "bsam-bf16", "sam-sgd", "sam-adamw", "sambayes-ivon", "sambayes-ivon-bf16")
OPTIMIZERS = SAMBAYES + ("adamw", "pytorch_optimizer", "ivon")
NAMES = {
    "bsam": "bSAM",
    "bsam-bf16": "bSAM bf16 state",
    "sam-sgd": "SAM-SGD",
    "sam-adamw": "SAM-AdamW",
    "adamw": "torch AdamW",
    "pytorch_optimizer": "pytorch_optimizer.BSAM",
    "sambayes-ivon": "IVON (sambayes)",
    "sambayes-ivon-bf16": "IVON (sambayes) bf16 state",
    "ivon": "IVON (ivon-opt)",
}
FIELDS = [
    "date", "device", "sambayes", "commit", "torch", "label", "note", "numel", "tensors", "dtype",
    "optimizer", "tier", "splits", "steps", "method", "params_grads_bytes", "kept_bytes", "kept_b",
    "peak_bytes", "peak_b", "other_bytes", "held", "error",
]  # fmt: skip


# ---- what the optimizer keeps: storage accounting -----------------------------------------
class Held(NamedTuple):
    """Storages reachable from an optimizer, parameters and gradients left out."""

    bytes: int  # all of them, each storage once
    scalar_bytes: int  # of which 0-dim tensors' (counters, flags)
    by_name: dict[str, int]  # the others' bytes by where each storage was first found (indices as [*])


_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, torch.nn.Module)


def reachable_tensors(root: object) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor reachable from ``root``: attributes (``__dict__``, ``__slots__``),
    dict keys and values, list, tuple and set items, recursively; modules, classes, functions not entered."""
    seen: set[int] = set()
    stack: list[tuple[str, object]] = [("", root)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield path.lstrip("."), obj
            continue
        if isinstance(obj, _OPAQUE) and obj is not root:
            continue
        children: list[tuple[str, object]] = []
        if isinstance(obj, dict):
            for key, value in obj.items():
                name = f"{path}.{key}" if isinstance(key, str) else f"{path}[*]"
                children += [(f"{path}[*]", key), (name, value)]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = [(f"{path}[*]", item) for item in obj]
        else:
            names = list(getattr(obj, "__dict__", {}))
            names += [n for cls in type(obj).__mro__ for n in getattr(cls, "__slots__", ()) if isinstance(n, str)]
            children = [(f"{path}.{n}", getattr(obj, n, None)) for n in dict.fromkeys(names) if n != "__dict__"]
        stack.extend(reversed(children))


def _storage(t: torch.Tensor) -> tuple[torch.device, int, int]:
    """(device, address, bytes) of the storage behind ``t``."""
    storage = t.untyped_storage()
    return t.device, storage.data_ptr(), storage.nbytes()


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None entries skipped)."""
    return sum({_storage(t)[:2]: _storage(t)[2] for t in tensors if t is not None}.values())


def held_by(optimizer: object, params: list[torch.Tensor]) -> Held:
    """What ``optimizer`` keeps: the distinct storages reachable from it, other than the parameters' and
    their gradients'."""
    excluded = {_storage(t)[:2] for p in params for t in (p, p.grad) if t is not None}
    total = scalars = 0
    by_name: dict[str, int] = {}
    for path, tensor in reachable_tensors(optimizer):
        device, address, nbytes = _storage(tensor)
        if (device, address) in excluded or nbytes == 0:
            continue
        excluded.add((device, address))
        total += nbytes
        if tensor.dim() == 0:
            scalars += nbytes
        else:
            by_name[path] = by_name.get(path, 0) + nbytes
    return Held(total, scalars, by_name)


def held_text(held: Held, numel: int) -> str:
    """``state[*].mean 4.00, ...; 24 B in 0-dim tensors``: bytes per parameter by where they were found."""
    text = ", ".join(f"{name} {nbytes / numel:.2f}" for name, nbytes in held.by_name.items())
    return text + (f"; {held.scalar_bytes} B in 0-dim tensors" if held.scalar_bytes else "")


# ---- the peak: allocations during a step ----------------------------------------------------
class AllocationTrace:
    """CPU: every allocation and free of PyTorch's CPU allocator while the block runs (``torch.profiler``,
    ``profile_memory=True``); :meth:`span` marks the measured step. CUDA: the allocator's counters."""

    SPAN = "bench_memory: measured step"

    def __init__(self, device: torch.device) -> None:
        self.device, self.base, self.top = device, 0, 0
        self.profile = None
        if device.type == "cpu":
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self):
        if self.profile is not None:
            self.profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.profile is not None:
            self.profile.__exit__(*exc)

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        if self.profile is not None:
            with torch.profiler.record_function(self.SPAN):
                yield
            return
        sync(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        sync(self.device)
        self.top = torch.cuda.max_memory_allocated(self.device)

    def live_bytes(self) -> tuple[int, int]:
        """Bytes allocated and live at the span's start, and at most during it (CPU: since the profile
        began; CUDA: all the device's)."""
        if self.profile is None:
            return self.base, self.top
        from torch._C._profiler import _EventType

        events, span = [], None
        stack = list(reversed(self.profile.profiler.kineto_results.experimental_event_tree()))
        while stack:  # depth first, in recorded order
            event = stack.pop()
            if event.tag == _EventType.Allocation:
                events.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.ptr))
            elif event.name == self.SPAN:
                span = (event.start_time_ns, event.end_time_ns)
            stack.extend(reversed(event.children))
        if span is None:
            raise RuntimeError("the profile has no measured step")
        events.sort(key=lambda e: e[0])  # stable: ties keep the recorded order
        live, sizes, base, top = 0, {}, None, None
        for time_ns, size, address in events:
            if time_ns >= span[0] and base is None:
                base = top = live
            if time_ns > span[1]:
                break
            if size > 0:
                sizes[address] = size
                live += size
            elif address in sizes:  # a block allocated before the profile: never counted
                live -= sizes.pop(address)
            if base is not None:
                top = max(top, live)
        if base is None:
            base = top = live
        return base, top


# ---- the rows -------------------------------------------------------------------------------
class Measured(NamedTuple):
    numel: int
    params_grads: int  # bytes of the parameters and their gradients at the step's start
    held: Held  # what the optimizer keeps between steps
    peak: int  # bytes at most during the step, parameters and gradients included
    other: int | None  # bytes live at the step's start that nobody above holds (CPU)
    tier: str  # what ran, when the optimizer decides (pytorch_optimizer)


Maker = Callable[[list[torch.nn.Parameter], list[torch.Tensor]], tuple[object, Callable[[], object]]]


def maker(optimizer: str, tier: str, splits: int, keep_sums: bool | None = None) -> Maker:
    """A function of (parameters, given gradients) returning (the optimizer, one step of it);
    ``keep_sums``: sambayes's option (None: kept between steps on the CPU only)."""

    def make(params, grads):
        h = HYPER
        closure = closure_for(params, grads)
        if optimizer in SAMBAYES:
            if optimizer == "sam-adamw":
                opt = sambayes.SAM(
                    params,
                    lr=h["lr"],
                    rho=h["rho"],
                    weight_decay=h["weight_decay"],
                    base="adamw",
                    backend=tier,
                    keep_sums=keep_sums,
                )
            elif optimizer == "bsam-bf16":  # precision and momentum in bfloat16
                opt = make_optimizer("bsam", params, tier, keep_sums=keep_sums, state_dtype=torch.bfloat16)
            elif optimizer.startswith("sambayes-ivon"):  # splits: samples, the closure once each
                stored = torch.bfloat16 if optimizer.endswith("bf16") else None
                opt = make_optimizer("ivon", params, tier, keep_sums=keep_sums, state_dtype=stored, mc_samples=splits)
                return opt, lambda: opt.step(closure)
            else:
                opt = make_optimizer("bsam" if optimizer == "bsam" else "sam", params, tier, keep_sums=keep_sums)
            return opt, lambda: opt.step(lambda *j: closure(), splits=splits)
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=h["lr"], weight_decay=h["weight_decay"], **{tier: True})

            def step():
                opt.zero_grad()
                closure()
                opt.step()

            return opt, step
        if optimizer == "pytorch_optimizer":
            from pytorch_optimizer import BSAM

            opt = BSAM(params, num_data=int(h["num_data"]), lr=h["lr"], rho=h["rho"])
            closure()  # its first phase skips parameters without a gradient

            def one_pass():
                opt.zero_grad()
                closure()

            return opt, lambda: opt.step(one_pass)
        import ivon

        opt = ivon.IVON(params, lr=h["lr"], ess=h["num_data"], weight_decay=h["weight_decay"], beta1=h["beta1"])

        def step():
            with opt.sampled_params(train=True):
                opt.zero_grad()
                closure()
            opt.step()

        return opt, step

    return make


def measure(make: Maker, shapes, dtype: torch.dtype, device: torch.device, steps: int = 3) -> Measured:
    """Kept and peak bytes of the optimizer ``make`` builds, on the given shapes (see the module docstring)."""
    torch.manual_seed(0)
    sources, grads = params_and_grads(shapes, dtype, device)  # before the trace: never counted
    gc.collect()
    with AllocationTrace(device) as trace:
        params = [torch.nn.Parameter(p.clone()) for p in sources]
        opt, step = make(params, grads)
        for _ in range(steps - 1):
            step()
        sync(device)
        params_grads = storage_bytes([t for p in params for t in (p, p.grad)])
        held = held_by(opt, params)
        with trace.span():
            step()
    base, top = trace.live_bytes()
    other = base - params_grads - held.bytes if trace.profile is not None else None
    tier = ""
    if hasattr(opt, "_can_use_foreach"):  # pytorch_optimizer decides per group
        tier = "foreach" if opt._can_use_foreach(opt.param_groups[0]) else "per-tensor"
    numel = sum(p.numel() for p in params)
    del opt, step, params
    return Measured(numel, params_grads, held, params_grads + held.bytes + top - base, other, tier)


def cases(args, device: torch.device) -> tuple[list[tuple[str, str, int]], list[str]]:
    """(optimizer, tier, splits) to measure on ``device``, and lines saying what is skipped and why."""
    out, skipped = [], []
    for optimizer in args.optimizer_list:
        if optimizer in SAMBAYES:
            tiers = []
            for tier in args.tier_list:
                reason = why_not_measured(tier, device)
                if reason:
                    line = f"skipped {tier} on {device}: {reason}"
                    skipped += [line] if line not in skipped else []
                else:
                    tiers.append(tier)
            out += [(optimizer, tier, k) for tier in tiers for k in args.split_list]
            continue
        try:
            __import__({"adamw": "torch", "pytorch_optimizer": "pytorch_optimizer", "ivon": "ivon"}[optimizer])
        except ImportError as exc:
            skipped.append(f"skipped {NAMES[optimizer]}: {exc}")
            continue
        tiers = ("foreach", "fused") if optimizer == "adamw" else ("",)
        out += [(optimizer, tier, 1) for tier in tiers]
    return out, skipped


def package_commit() -> str:
    """The commit of the sambayes checkout measured (``+dirty`` with uncommitted changes to tracked files)."""
    where = pathlib.Path(sambayes.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            cwd=where,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().replace("-dirty", "+dirty") if out.returncode == 0 else "unknown"


# ---- output -----------------------------------------------------------------------------------
def _b(value) -> str:
    return "" if value in ("", None) else f"{float(value):.2f}"


def print_row(row: dict) -> None:
    name = NAMES.get(row["optimizer"], row["optimizer"])
    head = f"{name:23s} {row['tier']:10s} {row['dtype']:9s} {row['splits']!s:>6s}"
    if row["error"]:
        print(f"{head}  error: {row['error']}", flush=True)
        return
    params_grads = float(row["params_grads_bytes"]) / int(row["numel"])
    print(
        f"{head} {_b(row['kept_b']):>8s} {_b(row['peak_b']):>8s} {params_grads:>11.2f} "
        f"{row['other_bytes']!s:>7s}  {row['held']}",
        flush=True,
    )


HEADER = (
    f"{'optimizer':23s} {'tier':10s} {'dtype':9s} {'splits':>6s} {'kept B':>8s} {'peak B':>8s} "
    f"{'params+grads':>11s} {'other':>7s}  held (B per parameter)"
)


def _label(row: dict) -> str:
    name = NAMES.get(row["optimizer"], row["optimizer"])
    return f"{name}, {row['tier']}" if row["tier"] else name


def markdown(rows: list[dict], dtypes: list[str]) -> list[str]:
    """One line per optimizer and tier: per dtype, the bytes kept and the peak with 1 and 2 sub-batches."""
    table: dict[str, dict[tuple[str, int], dict]] = {}
    for row in rows:
        if not row["error"]:
            table.setdefault(_label(row), {})[row["dtype"], int(row["splits"])] = row
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    head = ["optimizer, tier"]
    for dtype in dtypes:
        head += [f"{short[dtype]} kept", f"{short[dtype]} peak k=1", f"{short[dtype]} peak k=2"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for label, cells in table.items():
        line = [label]
        for dtype in dtypes:
            one, two = cells.get((dtype, 1)), cells.get((dtype, 2))
            kept = dict.fromkeys(_b(r["kept_b"]) for r in (one, two) if r)  # k=1, then k=2 where it differs
            line += [
                " / ".join(kept) or "",
                _b(one["peak_b"]) if one else "",
                _b(two["peak_b"]) if two else "–",
            ]
        lines.append("| " + " | ".join(line) + " |")
    return lines


def before_after(rows: list[dict], path: pathlib.Path, dtypes: list[str]) -> list[str]:
    """bSAM's rows of this run beside the latest ``before`` rows in the CSV of the same device and size:
    per tier and splits, for each dtype, the bytes kept and the peak, before -> now."""
    if not rows or not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        old = list(csv.DictReader(f))
    size = (rows[0]["device"], str(rows[0]["numel"]), str(rows[0]["tensors"]))
    same = [
        r
        for r in old
        if r.get("label") == "before" and r["optimizer"] == "bsam" and not r["error"]
        and (r["device"], r["numel"], r["tensors"]) == size
    ]  # fmt: skip
    now = {(r["tier"], str(r["splits"]), r["dtype"]): r for r in rows if r["optimizer"] == "bsam" and not r["error"]}
    if not same or not now:
        return []
    latest = max(r["date"] for r in same)
    before = {(r["tier"], r["splits"], r["dtype"]): r for r in same if r["date"] == latest}
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    head = ["tier", "splits"] + [f"{short[d]} {what}" for d in dtypes for what in ("kept", "peak")]
    commits = next(iter(before.values()))["commit"], next(iter(now.values()))["commit"]
    lines = [
        f"bSAM before (commit {commits[0]}) -> now (commit {commits[1]}), bytes per parameter:",
        "",
        "| " + " | ".join(head) + " |",
        "| --- | ---: |" + " ---: |" * (len(head) - 2),
    ]
    for tier, splits in dict.fromkeys((t, k) for t, k, _ in now):
        cells = [tier, splits]
        for dtype in dtypes:
            b, n = before.get((tier, splits, dtype)), now.get((tier, splits, dtype))
            for column in ("kept_b", "peak_b"):
                cells.append(f"{_b(b[column])} -> {_b(n[column])}" if b and n else "")
        if any(cells[2:]):
            lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---- the command ------------------------------------------------------------------------------
def _list(text: str, allowed, what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in allowed]
    if bad or not names:
        raise SystemExit(f"bench_memory: {what} {text!r}: choose from {','.join(allowed)}")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=lambda s: int(s.replace("_", "")), default=1_000_000, help="parameters")
    parser.add_argument("--tensors", type=int, default=7, help="parameter tensors (default: 7)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset")
    parser.add_argument("--tiers", default=",".join(backends.NAMES), help="sambayes backends (default: all here)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="parameter dtypes")
    parser.add_argument("--splits", default="1,2", help="sambayes sub-batches per step (default: 1,2)")
    parser.add_argument("--steps", type=int, default=3, help="steps per row, the last one measured (default: 3)")
    parser.add_argument("--device", default=None, help="comma-separated (default: cpu, and cuda if visible)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="CSV file to append to")
    parser.add_argument("--label", default="", help="stored with every row; 'before' marks an older commit")
    parser.add_argument("--note", default="", help="free text stored with every row")
    parser.add_argument("--markdown", action="store_true", help="print the README table at the end")
    parser.add_argument(
        "--keep-sums",
        choices=("auto", "yes", "no"),
        default="auto",
        help="sambayes's keep_sums: auto (None: kept between steps on the CPU only), yes, no",
    )
    args = parser.parse_args(argv)
    args.optimizer_list = _list(args.optimizers, OPTIMIZERS, "--optimizers")
    args.tier_list = _list(args.tiers, backends.NAMES, "--tiers")
    dtypes = _list(args.dtypes, DTYPES, "--dtypes")
    args.split_list = [int(k) for k in _list(args.splits, [str(k) for k in range(1, 65)], "--splits")]
    if args.steps < 1 or args.tensors < 1 or args.numel < args.tensors:
        raise SystemExit("bench_memory: need --steps >= 1 and --numel >= --tensors >= 1")
    devices = [
        torch.device(d) for d in (args.device or ("cpu,cuda" if torch.cuda.is_available() else "cpu")).split(",")
    ]
    if any(d.type not in ("cpu", "cuda") for d in devices):
        raise SystemExit(f"bench_memory: --device {args.device}: cpu or cuda devices only")
    shapes = synthetic_shapes(args.numel, args.tensors)
    numel = sum(s[0] for s in shapes)
    common = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "sambayes": sambayes.__version__,
        "commit": package_commit(),
        "torch": torch.__version__,
        "label": args.label,
        "note": args.note,
        "numel": numel,
        "tensors": len(shapes),
        "steps": args.steps,
    }
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_step import CsvRows  # the sibling script's CSV conventions (benchmarks/results)

    rows = []
    for device in devices:
        method = "profiler allocations" if device.type == "cpu" else "cuda max_memory_allocated"
        csv_rows = CsvRows(args.out, dict(common, device=device_name(device, threads=False), method=method), FIELDS)
        todo, skipped = cases(args, device)
        print(
            f"\n{device}: {device_name(device, threads=False)} | torch {torch.__version__} | sambayes "
            f"{sambayes.__version__} ({common['commit']}) | {numel:,} parameters in {len(shapes)} tensors | "
            f"bytes per parameter; peak includes parameters and gradients ({method})"
        )
        print(HEADER)
        print("-" * len(HEADER))
        for dtype_name in dtypes:
            for optimizer, tier, splits in todo:
                key = dict(dtype=dtype_name, optimizer=optimizer, tier=tier, splits=splits)
                try:
                    keep = {"auto": None, "yes": True, "no": False}[args.keep_sums]
                    make = maker(optimizer, tier, splits, keep)
                    m = measure(make, shapes, getattr(torch, dtype_name), device, args.steps)
                    row = csv_rows.add(
                        # sambayes rows with keep_sums set say so in their tier
                        **dict(
                            key,
                            tier=(tier or m.tier)
                            + (f" keep_sums={keep}" if keep is not None and optimizer in SAMBAYES else ""),
                        ),
                        params_grads_bytes=m.params_grads,
                        kept_bytes=m.held.bytes,
                        kept_b=m.held.bytes / m.numel,
                        peak_bytes=m.peak,
                        peak_b=m.peak / m.numel,
                        other_bytes="" if m.other is None else m.other,
                        held=held_text(m.held, m.numel),
                        error="",
                    )
                except Exception as exc:  # noqa: BLE001 - a row that fails is a result, not a crash
                    row = csv_rows.add(**key, error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
                print_row(row)
                rows.append(row)
        for line in skipped:
            print(line)
    print(f"appended {len(rows)} rows to {args.out}", file=sys.stderr)
    if args.markdown:
        for device in devices:
            mine = [r for r in rows if r["device"] == device_name(device, threads=False)]
            print(f"\n{device_name(device, threads=False)}, {numel:,} parameters in {len(shapes)} tensors:\n")
            print("\n".join(markdown(mine, dtypes)))
            extra = before_after(mine, args.out, dtypes)
            if extra:
                print("\n" + "\n".join(extra))
    return rows


if __name__ == "__main__":
    main()
