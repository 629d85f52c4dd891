"""What ``train.py`` and ``train_ddp.py`` share: a CIFAR-style ResNet-18, CIFAR-10 (or
synthetic CIFAR-shaped data), augmentation in torch, the paper's recipe, the optimizers,
one training step, evaluation and checkpoints.

CIFAR-10 is read from the python-pickle batches (``cifar-10-batches-py/`` from
https://www.cs.toronto.edu/~kriz/cifar.html) with pickle and numpy only; without
them, or with ``--synthetic N``, the scripts train on N synthetic CIFAR-shaped images
whose class is a smooth random colour pattern under noise: learnable, so a short
run shows the loss fall.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pathlib
import pickle
import signal
from typing import Any

import torch
import torch.nn.functional as F

import sambayes
from sambayes import metrics

OPTIMIZERS = ("bsam", "sam", "sgd")
CLASSES = 10
# per-channel mean and std of the CIFAR-10 training images, in [0, 1] units
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# defaults that depend on the optimizer: the paper's bSAM recipe and its SAM-SGD / SGD baselines
DEFAULT_LR = {"bsam": 0.5, "sam": 0.03, "sgd": 0.03}
DEFAULT_RHO = {"bsam": 0.01, "sam": 0.05}
CHECKPOINT = "checkpoint.pt"


# ---- the model --------------------------------------------------------------------------
class BasicBlock(torch.nn.Module):
    """Two 3×3 convolutions with BatchNorm and a residual connection (1×1 conv when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = torch.nn.Sequential(
                torch.nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(torch.nn.Module):
    """ResNet-18 for 32×32 images (3×3 stem, no max-pool): [batch, 3, 32, 32] float -> [batch, classes] logits.

    ``width`` is the number of channels of the first stage (64 in the paper: 11.2M
    parameters); the stages have width, 2·width, 4·width, 8·width channels.
    """

    def __init__(self, width: int = 64, classes: int = CLASSES) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width={width}: must be >= 1")
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width), torch.nn.ReLU()
        )
        blocks, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            blocks += [BasicBlock(channels, out, stride), BasicBlock(out, out, 1)]
            channels = out
        self.blocks = torch.nn.Sequential(*blocks)
        self.head = torch.nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ---- the data ---------------------------------------------------------------------------
class Images:
    """Images as uint8 [n, 3, 32, 32] and labels as int64 [n], on one device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Images:
        return Images(self.images.to(device), self.labels.to(device))


def _read_batch(path: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), torch.tensor(batch[b"labels"], dtype=torch.int64)


def find_cifar10(data_dir: str | os.PathLike | None) -> pathlib.Path | None:
    """The ``cifar-10-batches-py`` folder in (or at) ``data_dir``, or None if it is not there."""
    if data_dir is None:
        return None
    for folder in (pathlib.Path(data_dir) / "cifar-10-batches-py", pathlib.Path(data_dir)):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return folder
    return None


def load_cifar10(folder: pathlib.Path) -> tuple[Images, Images]:
    """(train, test): the 50,000 training images of ``data_batch_1..5`` and the 10,000 of ``test_batch``."""
    parts = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    train = Images(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return train, Images(*_read_batch(folder / "test_batch"))


def synthetic_cifar(num_train: int, num_test: int, seed: int = 0) -> tuple[Images, Images]:
    """CIFAR-shaped (train, test) data: class c is a fixed smooth random colour pattern
    (a 4×4 grid upsampled to 32×32) plus per-image noise, stored as uint8. Same
    ``seed``, same data; the test images are drawn from the same classes."""
    generator = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(CLASSES, 3, 4, 4, generator=generator), size=32, mode="bilinear")

    def draw(n: int) -> Images:
        labels = torch.randint(CLASSES, (n,), generator=generator)
        noise = 0.25 * torch.randn(n, 3, 32, 32, generator=generator)
        pixels = (0.5 * templates[labels] + 0.25 + noise).clamp(0, 1)
        return Images((255 * pixels).round().to(torch.uint8), labels)

    return draw(num_train), draw(num_test)


def load_data(data_dir: str | None, synthetic: int | None, seed: int = 0) -> tuple[Images, Images, str]:
    """(train, test, description): CIFAR-10 from ``data_dir`` unless ``synthetic`` is set or the
    files are missing; then ``synthetic`` (default 5,000) synthetic training images and a quarter as many test images."""
    folder = find_cifar10(data_dir)
    if synthetic is None and folder is not None:
        train, test = load_cifar10(folder)
        return train, test, f"CIFAR-10 from {folder}"
    n = synthetic or 5000
    train, test = synthetic_cifar(n, max(n // 4, 16), seed)
    why = "" if synthetic is not None else f" (no cifar-10-batches-py in {data_dir!r})"
    return train, test, f"synthetic CIFAR-shaped data, {n} training images{why}"


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [batch, 3, 32, 32] -> float32 standardized per channel with the CIFAR-10 statistics."""
    mean = torch.tensor(CIFAR_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The standard CIFAR augmentation on a uint8 batch [batch, 3, H, W]: a random H×W crop of
    the image zero-padded by 4 pixels on every side, then a horizontal flip with probability 1/2.

    The random numbers come from ``generator`` (a CPU generator), so an epoch's
    augmentation is a function of its seed on every device.
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    top = torch.randint(9, (batch,), generator=generator).to(images.device)
    left = torch.randint(9, (batch,), generator=generator).to(images.device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
    rows = top[:, None] + torch.arange(height, device=images.device)  # [batch, H]
    cols = left[:, None] + torch.arange(width, device=images.device)  # [batch, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel = torch.arange(3, device=images.device)[None, :, None, None]
    return padded[index, channel, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one epoch's batch order and augmentation (on process ``rank``):
    a resumed run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)


# ---- the recipe ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line both scripts share; the defaults are the paper's bSAM recipe for CIFAR-10."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    arg = parser.add_argument
    arg("--optimizer", choices=OPTIMIZERS, default="bsam", help="bsam (default), sam (SAM-SGD) or sgd")
    arg("--epochs", type=int, default=180)
    arg("--warmup-epochs", type=int, default=5, help="linear warm-up of the learning rate, then cosine decay to 0")
    arg("--batch-size", type=int, default=200, help="images per step (with train_ddp.py: over all processes)")
    arg(
        "--splits",
        type=int,
        default=8,
        help="k: sub-batches with their own noise and ascent (m-sharpness); with train_ddp.py: over all processes",
    )
    arg("--lr", type=float, default=None, help="default: 0.5 for bsam, 0.03 for sam and sgd")
    arg("--rho", type=float, default=None, help="default: 0.01 for bsam, 0.05 for sam")
    arg("--prior-precision", type=float, default=40.0, help="bsam: weight_decay = prior precision / N")
    arg("--data-factor", type=float, default=4.0, help="bsam: N = data factor × training images (augmentation)")
    arg("--damping", type=float, default=0.1, help="bsam: γ")
    arg("--init-precision", type=float, default=1.0, help="bsam: s0")
    arg(
        "--weight-decay",
        type=float,
        default=5e-4,
        help="sam and sgd: 5e-4, i.e. the paper's prior precision 25 over CIFAR-10's 50,000 images",
    )
    arg("--max-grad-norm", type=float, default=None, help="clip the (perturbed-point) gradient to this 2-norm")
    arg(
        "--bn-stats",
        choices=("noisy", "perturbed", "both"),
        default="noisy",
        help="bsam/sam: which pass updates the BatchNorm running statistics",
    )
    arg("--width", type=int, default=64, help="channels of ResNet-18's first stage (64: the standard model)")
    arg("--data", default="data", help="folder holding cifar-10-batches-py/ (synthetic data if it is missing)")
    arg("--synthetic", type=int, default=None, metavar="N", help="use N synthetic training images instead of CIFAR-10")
    arg("--device", default=default_device)
    arg("--backend", default="auto", help="sambayes backend: auto, eager, foreach, triton, cpu or cuda")
    arg("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype; fp16 adds a GradScaler")
    arg("--seed", type=int, default=0, help="fixes the initialisation, the batch order, augmentation and noise")
    arg("--samples", type=int, default=32, help="bsam: posterior samples of the final Bayesian model average")
    arg("--eval-batch-size", type=int, default=500)
    arg("--out", default="out/train", help="folder for checkpoint.pt, log.jsonl and results.json")
    arg("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    arg(
        "--stop-after",
        type=int,
        default=None,
        metavar="EPOCH",
        help="exit after this epoch, as a job time limit would (continue with --resume)",
    )
    arg("--no-progress", action="store_true", help="no progress bar")
    arg(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also write the checkpoint every STEPS steps (0: at the end of each epoch only)",
    )
    # fault injection, for the kill-and-resume test: SIGKILL after a step, or halfway through a checkpoint write
    arg("--kill-at", type=int, default=None, metavar="STEP", help=argparse.SUPPRESS)
    arg("--kill-in-checkpoint", type=int, default=None, metavar="N", help=argparse.SUPPRESS)


def check_arguments(args: argparse.Namespace, world_size: int = 1) -> None:
    """SystemExit with a message for a batch that cannot be cut as asked."""
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes")
    if args.optimizer != "sgd":
        if args.splits % world_size:
            raise SystemExit(f"--splits {args.splits} is not divisible by the {world_size} processes")
        if args.batch_size % args.splits:
            raise SystemExit(f"--splits {args.splits} does not divide --batch-size {args.batch_size}")


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module, num_train: int) -> torch.optim.Optimizer:
    """The optimizer of ``args.optimizer`` with the recipe's hyperparameters. ``model`` may be
    DDP-wrapped: bSAM and SAM then skip the all-reduce of the noisy pass themselves."""
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    if args.optimizer == "bsam":
        num_data = args.data_factor * num_train
        return sambayes.BSAM(
            model,
            num_data=num_data,
            lr=lr,
            betas=(0.9, 0.999),
            rho=args.rho if args.rho is not None else 0.01,
            weight_decay=args.prior_precision / num_data,
            damping=args.damping,
            init_precision=args.init_precision,
            seed=args.seed,
            backend=args.backend,
            bn_stats=args.bn_stats,
        )
    if args.optimizer == "sam":
        return sambayes.SAM(
            model,
            lr=lr,
            rho=args.rho if args.rho is not None else 0.05,
            momentum=0.9,
            weight_decay=args.weight_decay,
            backend=args.backend,
            bn_stats=args.bn_stats,
        )
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps (from 1/warmup to 1), then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_schedule(opt: torch.optim.Optimizer, steps_per_epoch: int, args: argparse.Namespace):
    """Per-step schedule of the learning rate: ``warmup_epochs`` linear, then cosine to 0 at ``epochs``."""
    total, warmup = args.epochs * steps_per_epoch, min(args.warmup_epochs, args.epochs) * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup))


def make_scaler(args: argparse.Namespace, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 autocast; bfloat16 has float32's range and needs none."""
    return torch.amp.GradScaler(device.type) if args.amp == "fp16" else None


def amp_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]


# ---- one step -----------------------------------------------------------------------------
def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    splits: int,
    dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float | None,
) -> torch.Tensor:
    """One optimizer step on a normalized batch [batch, 3, 32, 32] with labels [batch]; returns
    the mean loss (for bSAM and SAM: at the perturbed points), detached, on the device.

    bSAM and SAM call the closure twice per sub-batch (noisy or current point, then the
    adversarial point); the optimizer zeroes, unscales and clips the gradients itself.
    """
    device_type = images.device.type

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            return F.cross_entropy(model(x), y)

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if isinstance(opt, (sambayes.BSAM, sambayes.SAM)):
        chunks = sambayes.split_batch(images, labels, splits=splits)

        def closure(j: int = 0) -> torch.Tensor:
            loss = loss_of(*chunks[j])
            backward(loss)
            return loss

        loss = opt.step(closure, splits=splits, grad_scaler=scaler, max_grad_norm=max_grad_norm)
    else:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(images, labels)
        backward(loss)
        if max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
    if scaler is not None:
        scaler.update()
    return loss.detach()


# ---- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: torch.nn.Module, opt: torch.optim.Optimizer, test: Images, *, batch_size: int, samples: int = 0
) -> dict[str, float]:
    """Test accuracy, NLL and ECE (20 bins) of the predictive distribution: at the mean (or the
    weights) with ``samples=0``, else the Bayesian model average of ``samples`` posterior samples
    (bSAM only; sample s is ``opt.sampled_params(seed=s)`` for every batch). The model runs in
    eval mode (BatchNorm uses its running statistics). The BMA's NLL is the log-mean-exp of the
    per-sample float64 log-softmax (ALGORITHM.md), so a confident mistake gives a large finite
    NLL, not the inf of log(0) that averaging float32 softmaxes would."""
    if samples > 0 and not isinstance(opt, sambayes.BSAM):
        raise TypeError(f"samples={samples} needs a BSAM optimizer (a posterior); got {type(opt).__name__}")
    was_training = model.training
    model.eval()
    try:
        if samples == 0:
            log_probs = _log_softmax(model, test, batch_size)[None]
        else:
            sample_log_probs = []
            for s in range(samples):
                with opt.sampled_params(seed=s):
                    sample_log_probs.append(_log_softmax(model, test, batch_size))
            log_probs = torch.stack(sample_log_probs)
    finally:
        model.train(was_training)
    labels = test.labels.cpu()
    probs = metrics.bma_log_probs(log_probs).exp()
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "nll": metrics.bma_nll(log_probs, labels),
        "ece": metrics.ece(probs, labels, bins=20),
    }


def _log_softmax(model: torch.nn.Module, test: Images, batch_size: int) -> torch.Tensor:
    """Float64 log-softmax [n, classes] of the model on every test image, on the CPU."""
    return torch.cat(
        [
            torch.log_softmax(model(normalize(test.images[i : i + batch_size])).double(), dim=-1).cpu()
            for i in range(0, len(test), batch_size)
        ]
    )


def final_metrics(model: torch.nn.Module, opt: torch.optim.Optimizer, test: Images, args) -> dict[str, Any]:
    """Test metrics at the mean and, for bSAM, of the ``args.samples``-sample Bayesian model average."""
    results = {"at_mean": evaluate(model, opt, test, batch_size=args.eval_batch_size)}
    if isinstance(opt, sambayes.BSAM) and args.samples > 0:
        results[f"bma_{args.samples}"] = evaluate(
            model, opt, test, batch_size=args.eval_batch_size, samples=args.samples
        )
    return results


def format_metrics(results: dict[str, dict[str, float]]) -> str:
    return "\n".join(
        f"{name:>8s}: " + "  ".join(f"{k} {100 * v:.2f}%" if k == "accuracy" else f"{k} {v:.4f}" for k, v in m.items())
        for name, m in results.items()
    )


# ---- checkpoints and logs ---------------------------------------------------------------------
def save_checkpoint(out: pathlib.Path, *, kill_midway: bool = False, **state: Any) -> None:
    """Write ``out/checkpoint.pt`` atomically: a temporary file, flushed and fsync'ed, then renamed over
    the old one (and the folder fsync'ed), so a crash at any moment leaves a whole checkpoint.

    ``kill_midway`` (fault injection for tests): SIGKILL this process halfway through the temporary file.
    """
    path, temporary = out / CHECKPOINT, out / (CHECKPOINT + ".tmp")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    with open(temporary, "wb") as f:
        if kill_midway:
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(out, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def load_checkpoint(out: pathlib.Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint to resume from (None without ``--resume`` or without a checkpoint);
    SystemExit if it was written for another optimizer or model width."""
    path = out / CHECKPOINT
    if not args.resume or not path.is_file():
        return None
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    for key in ("optimizer", "width"):
        if checkpoint["args"][key] != getattr(args, key):
            raise SystemExit(f"{path} was written with --{key} {checkpoint['args'][key]}, not {getattr(args, key)}")
    return checkpoint


def start_log(out: pathlib.Path, checkpoint: dict[str, Any] | None) -> None:
    """A fresh run starts a new ``log.jsonl``; a resumed one first logs the row of the epoch its checkpoint
    ended, which a run killed between that checkpoint and its log write never wrote."""
    if checkpoint is None:
        (out / "log.jsonl").unlink(missing_ok=True)
    elif checkpoint.get("log_row") is not None:
        append_log(out, checkpoint["log_row"])


def append_log(out: pathlib.Path, row: dict[str, Any]) -> None:
    """Append an epoch's row unless the log has it already (so a resumed run never logs an epoch twice)."""
    path = out / "log.jsonl"
    logged = path.read_text().splitlines() if path.is_file() else []
    if any(json.loads(line)["epoch"] == row["epoch"] for line in logged if line.strip()):
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
