"""Time of one training step with bSAM, SAM and IVON relative to one SGD step and one AdamW step, same model and batch.

A bSAM or SAM step takes two forward-backward passes where SGD takes one, so
2× an SGD step is the floor; the rest (noise, ascent, update, bookkeeping) is what
this measures above it. IVON, the variational peer, takes one pass per step: its floor
is 1× an AdamW step.

Models (``--model``, one per run: the shapes, batch and autocast defaults are each model's, and
every row names its model in the ``model`` column):

- ``resnet18`` (default): the CIFAR-style ResNet-18 of ``examples/cifar_resnet.py`` on one random
  normalized batch [batch, 3, 32, 32]; width 16, batch 32 on the CPU (64, 200 on a GPU); float32
  (``--amp bf16`` for autocast). Steps as ``examples/train.py`` takes them (its ``train_step``).
- ``gpt``: the GPT-style decoder of ``examples/gpt.py`` (imported from that file) on one batch of
  windows of its byte-level corpus; on the CPU the example's default shapes (4 layers, 4 heads,
  128 wide, block 64: 0.8M parameters) and batch (16 sequences), on a GPU GPT-2 small's shapes
  (12 × 768, block 1024) with batch 8; ``--n-layer``, ``--n-head``, ``--n-embd``, ``--block-size``
  change them. The forward pass runs under bfloat16 autocast as in the example (``--amp none``:
  float32). Steps as the example takes them (its ``lm_loss`` and ``train_step``; SAM, which the
  example does not train, with the same closure as bSAM); no gradient clipping. Its AdamW is the
  example's (weight decay on the matrices only, betas 0.9, 0.95) in PyTorch's fused implementation
  where the device has it, else foreach: the ``backend`` column says which.

Rows:

- ``fwd+bwd``: zero the gradients, forward, backward (no optimizer): the unit.
- ``sgd``: ``torch.optim.SGD`` (momentum 0.9, weight decay): one pass + its update.
- ``adamw``: ``torch.optim.AdamW``: one pass + its update (ResNet-18: PyTorch's default
  implementation; GPT: fused or foreach, above).
- ``ivon``: ``ivon.IVON`` (``ivon-opt``, one Monte Carlo sample) as its README trains:
  ``with opt.sampled_params(train=True):`` zero the gradients, forward, backward; then
  ``opt.step()``. Skipped, with the reason, when ``ivon`` does not import.
- ``IVON``: ``sambayes.IVON`` (one sample, Price's estimator) with ``opt.step(closure)``, the closure one
  pass (GPT: the example's ``train_step``) (``--backend``, shown resolved).
- ``sam``, ``bsam``: ``opt.step(closure, splits=k)`` (``--backend``, default ``auto``, shown resolved).
- ``sgd-opt``, ``adamw-opt``, ``ivon-opt``, ``IVON-opt``, ``sam-opt``, ``bsam-opt``: the optimizer alone,
  with a fixed gradient given through autograd where the backward passes would be (for ivon-opt
  inside ``sampled_params``; for sambayes's IVON ``sample()``, the gradient, ``update()``): the rest,
  measured directly (on a busy machine far less noisy than the difference of two whole steps).

Columns: median and 20/80 % quantiles of the wall time per step (the device is
synchronised around each step), the ratios to the SGD and to the AdamW medians, and the
time above the passes, ``(t − passes × t_fwd+bwd) / t_fwd+bwd``. The cases are timed in turn,
one step each per round, so drift in the machine's load hits them alike. Rows are
appended to ``benchmarks/results/train_step.csv`` with the device, date and versions.

    python benchmarks/bench_train_step.py --threads 1               # CPU: ResNet-18 width 16, batch 32, k = 1
    python benchmarks/bench_train_step.py --device cuda             # GPU: width 64, batch 200, k = 1 and 8
    python benchmarks/bench_train_step.py --model gpt --threads 2   # CPU: the example's GPT, batch 16, bf16
    python benchmarks/bench_train_step.py --model gpt --device cuda # GPU: GPT-2 small's shapes, batch 8
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
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
from sambayes.cli.bench import device_name

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


class Workload(NamedTuple):
    """One model and batch to time: what ``cases`` needs of it."""

    model: torch.nn.Module  # float32, training mode; each case trains its own copy
    label: str  # the CSV's model column
    description: str  # the header line's
    fwd_bwd: Callable[[torch.nn.Module], None]  # zero the gradients, forward, backward
    train_step: Callable[[torch.nn.Module, torch.optim.Optimizer, int], None]  # one whole step, k sub-batches
    make_adamw: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def setup(width: int, batch: int, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model (float32, training mode) and one normalized CIFAR-shaped batch [batch, 3, 32, 32] with labels."""
    torch.manual_seed(0)
    model = ResNet18(width).to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(10, (batch,), device=device)
    return model, images, labels


def resnet_workload(args, device: torch.device) -> Workload:
    """The CIFAR-style ResNet-18 of ``examples/cifar_resnet.py``, stepped by its ``train_step``."""
    model, images, labels = setup(args.width, args.batch, device)
    dtype = {"none": None, "bf16": torch.bfloat16}[args.amp]

    def fwd_bwd(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()

    def step(model, opt, k: int) -> None:
        if isinstance(opt, sambayes.IVON):  # the example trains bSAM and SAM: IVON with its closure, one pass
            opt.step(lambda: fwd_bwd(model))
            return
        train_step(model, opt, images, labels, splits=k, dtype=dtype, scaler=None, max_grad_norm=None)

    return Workload(
        model,
        f"resnet18-w{args.width}",
        f"ResNet-18 width {args.width}",
        fwd_bwd,
        step,
        lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=5e-4),  # PyTorch's default implementation
    )


def load_gpt():
    """``examples/gpt.py`` as the module ``gpt`` (registered first: its dataclasses look their module up)."""
    path = ROOT / "examples" / "gpt.py"
    module = sys.modules.get("gpt")
    if module is not None and pathlib.Path(getattr(module, "__file__", "")).resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location("gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpt"] = module
    spec.loader.exec_module(module)
    return module


def gpt_workload(args, device: torch.device) -> Workload:
    """The GPT of ``examples/gpt.py`` on one batch of its corpus's windows, int64 [batch, block_size],
    stepped by its ``train_step`` (SAM, which the example does not train: with the same closure as bSAM)."""
    gpt = load_gpt()
    config = gpt.GPTConfig(args.n_layer, args.n_head, args.n_embd, args.block_size)
    torch.manual_seed(0)
    model = gpt.GPT(config).to(device).train()
    corpus = gpt.load_corpus()
    offsets = gpt.batch_offsets(0, 0, args.batch, len(corpus.train), args.block_size)
    inputs, targets = (t.to(device) for t in gpt.windows(corpus.train, offsets, args.block_size))
    amp = args.amp == "bf16"

    def fwd_bwd(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        gpt.lm_loss(model, inputs, targets, amp).backward()

    def step(model, opt, k: int) -> None:
        if not isinstance(opt, sambayes.SAM):
            gpt.train_step(model, opt, inputs, targets, splits=k, amp=amp, max_grad_norm=None)
            return
        chunks = sambayes.split_batch(inputs, targets, splits=k)

        def closure(j: int = 0) -> torch.Tensor:
            loss = gpt.lm_loss(model, *chunks[j], amp)
            loss.backward()
            return loss

        opt.step(closure, splits=k)

    def make_adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        # the example's AdamW (weight decay on the matrices only), fused where the device has the kernel
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fast = {"fused": True} if device.type in fused_devices() else {"foreach": True}
        return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), **fast)

    label = f"gpt-l{args.n_layer}-h{args.n_head}-e{args.n_embd}-t{args.block_size}"
    described = (
        f"GPT {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size} "
        f"({gpt.count_parameters(model):,} parameters)"
    )
    return Workload(model, label, described, fwd_bwd, step, make_adamw)


def fused_devices() -> list[str]:
    """Device types with PyTorch's fused AdamW kernel (CUDA where PyTorch does not say)."""
    from torch.utils import _foreach_utils

    return getattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()


def implementation(opt: torch.optim.Optimizer | None) -> str:
    """Which implementation a torch optimizer was asked for: "fused", "foreach" or "" (PyTorch's default)."""
    defaults = opt.defaults if isinstance(opt, torch.optim.Optimizer) else {}
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else ""


class Case(NamedTuple):
    method: str  # fwd+bwd, sgd, adamw, ivon (ivon-opt's), IVON (sambayes's), sam, bsam; "-opt": the optimizer alone
    backend: str  # sambayes backend ("" for torch)
    splits: int
    passes: int  # forward-backward passes per step
    step: Callable[[], None]
    opt: object


def cases(work: Workload, args) -> list[Case]:
    """What is timed, each on its own copy of the model:

    - whole steps: ``fwd+bwd`` (the unit), ``sgd``, ``adamw``, ``ivon`` (if it imports), and
      ``sam`` / ``bsam`` for each backend and k;
    - the optimizer alone, ``sgd-opt`` / ``adamw-opt`` / ``ivon-opt`` / ``sam-opt`` / ``bsam-opt``:
      ``opt.step()`` (IVON: after entering and leaving ``sampled_params``), or the phases
      sample -> perturb (-> sample -> perturb)* -> update, with fixed gradients assigned in
      place of the backward passes: the cost above the passes, measured directly.
    """
    base, fwd_bwd = work.model, work.fwd_bwd

    def whole(model, opt, k):
        if ivon is not None and isinstance(opt, ivon.IVON):

            def ivon_step() -> None:
                with opt.sampled_params(train=True):
                    fwd_bwd(model)
                opt.step()

            return ivon_step
        return lambda: work.train_step(model, opt, k)

    def alone(params, grads, opt, k):
        def give_grads() -> None:  # a backward pass's effect on .grad, by autograd, without the pass
            torch.autograd.backward(params, grads)

        def step() -> None:
            if ivon is not None and isinstance(opt, ivon.IVON):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    give_grads()
                opt.step()
                return
            if isinstance(opt, sambayes.IVON):
                opt.sample()
                give_grads()
                opt.update()
                return
            if not isinstance(opt, (sambayes.BSAM, sambayes.SAM)):
                opt.zero_grad()  # torch.optim's loop (sambayes manages its gradient buffers itself)
                give_grads()
                opt.step()
                return
            for _ in range(k):
                opt.sample()
                give_grads()
                opt.perturb()
                give_grads()
            opt.update()

        return step

    unit_model = copy.deepcopy(base)
    fwd_bwd(unit_model)
    grads = [p.grad.detach().clone() for p in unit_model.parameters()]  # one real gradient, reused by the -opt rows
    out = [Case("fwd+bwd", "", 1, 1, lambda: fwd_bwd(unit_model), None)]
    one_pass = {
        "sgd": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4),
        "adamw": work.make_adamw,
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
            model = copy.deepcopy(base)  # sambayes's IVON, with ivon-opt's hyperparameters above
            opt = sambayes.IVON(
                model, lr=LR, ess=200_000, weight_decay=40 / 200_000, hess_init=0.1, seed=0, backend=backend
            )
            step = alone(list(model.parameters()), grads, opt, 1) if alone_ else whole(model, opt, 1)
            out.append(Case("IVON" + "-opt" * alone_, backend, 1, 0 if alone_ else 1, step, opt))
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
    parser.add_argument(
        "--model", choices=("resnet18", "gpt"), default="resnet18", help="what trains (default: resnet18)"
    )
    parser.add_argument("--width", type=int, default=None, help="ResNet-18 width (default: 16 on CPU, 64 on GPU)")
    parser.add_argument("--n-layer", type=int, default=None, help="GPT layers (default: 4 on CPU, 12 on GPU)")
    parser.add_argument("--n-head", type=int, default=None, help="GPT heads (default: 4 on CPU, 12 on GPU)")
    parser.add_argument("--n-embd", type=int, default=None, help="GPT width (default: 128 on CPU, 768 on GPU)")
    parser.add_argument("--block-size", type=int, default=None, help="GPT context (default: 64 on CPU, 1024 on GPU)")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size (default: ResNet-18 32 on CPU, 200 on GPU; GPT 16 sequences on CPU, 8 on GPU)",
    )
    parser.add_argument("--splits", default=None, help="comma-separated k for bsam/sam (default: 1 on CPU, 1,8 on GPU)")
    parser.add_argument("--backend", default="auto", help="comma-separated sambayes backends")
    parser.add_argument(
        "--amp", choices=("none", "bf16"), default=None, help="autocast (default: none for resnet18, bf16 for gpt)"
    )
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
    shapes = ("n_layer", "n_head", "n_embd", "block_size")
    other = ("width",) if args.model == "gpt" else shapes
    for key in (k for k in other if getattr(args, k) is not None):
        parser.error(f"--{key.replace('_', '-')} is not a shape of --model {args.model}")
    if args.model == "gpt":
        cpu_shapes = (4, 4, 128, 64)  # examples/gpt.py's defaults (GPTConfig)
        gpu_shapes = (12, 12, 768, 1024)  # GPT-2 small's (examples/gpt.py --gpt2-small)
        for key, default in zip(shapes, gpu_shapes if gpu else cpu_shapes):
            setattr(args, key, getattr(args, key) or default)
        args.batch = args.batch or (8 if gpu else 16)
        args.amp = args.amp or "bf16"
    else:
        args.width = args.width or (64 if gpu else 16)
        args.batch = args.batch or (200 if gpu else 32)
        args.amp = args.amp or "none"
    args.splits = args.splits or ("1,8" if gpu else "1")
    args.reps = args.reps or (100 if gpu else 30)

    work = gpt_workload(args, device) if args.model == "gpt" else resnet_workload(args, device)
    timed = cases(work, args)
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
                "model": work.label,
                "batch": args.batch,
                "amp": args.amp,
                "method": case.method,
                "backend": backend_name(case.backend, device) if case.backend else implementation(case.opt),
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
        f"{work.description}, batch {args.batch}, amp {args.amp}, {args.reps} rounds"
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
    for (method, backend, k), median in medians.items():
        if method == "IVON":
            alone = medians[("IVON-opt", backend, k)]
            versus = f"; ivon-opt's step / this step = {medians[('ivon', '', 1)] / median:.3f}" if ivon else ""
            print(
                f"IVON ({backend}): step / AdamW step = {median / adamw:.3f} (floor 1); from the parts: (fwd+bwd + "
                f"IVON-opt) / (fwd+bwd + adamw-opt) = {(unit + alone) / (unit + medians[('adamw-opt', '', 1)]):.3f}; "
                f"IVON-opt / adamw-opt = {alone / medians[('adamw-opt', '', 1)]:.2f}{versus}"
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
