"""A small GPT-style language model trained with bSAM, IVON and AdamW at the same budget.

A decoder-only transformer built from ``torch.nn`` modules (token and learned position
embeddings, pre-LayerNorm blocks with causal self-attention through
``F.scaled_dot_product_attention``, a GELU MLP, an output head tied to the token embedding),
trained byte by byte on text that ships with Python: the source files of a fixed, sorted list
of standard-library modules (``CORPUS_MODULES``), read from this interpreter's own standard
library, nothing downloaded. ``--optimizer both`` trains bSAM and AdamW one after the other from
the same initial weights on the same batches for the same number of steps (and tokens), then
plots their loss curves and writes a table: validation loss and perplexity, tokens per second
and optimizer memory; ``--optimizer ivon`` trains sambayes's IVON (one sample per step, ess =
the training tokens) into the same comparison. ::

    python examples/gpt.py                                     # both optimizers, CPU-sized (minutes)
    python examples/gpt.py --optimizer bsam --steps 50         # one optimizer
    python examples/gpt.py --optimizer ivon                    # IVON, added to the table
    torchrun --nproc_per_node=2 examples/gpt.py --dist ddp     # DistributedDataParallel
    torchrun --nproc_per_node=2 examples/gpt.py --dist fsdp2   # FSDP2 (fully_shard)
    python examples/gpt.py --gpt2-small --device cuda          # GPT-2 small's shapes (12 × 768, block 1024)

Under torchrun, ``--batch-size`` and ``--splits`` count over all processes, and a run computes
what one process computes with the same flags: with DDP each process takes whole sub-batches
(``--splits`` defaults to one per process there); with FSDP2 each takes a share of every
sub-batch (FSDP2 averages every backward pass over the processes, so a sub-batch spans them all).
Backends: nccl on CUDA, gloo on the CPU.

Outputs in ``--out`` (default ``out/gpt``): per optimizer a folder (``bsam/``, ``ivon/``, ``adamw/``) with
``checkpoint.pt`` (step-level and atomic: ``--checkpoint-every``, ``--resume``; under FSDP2 with the
shards in ``dcp-STEP/``, written by ``torch.distributed.checkpoint``), ``log.jsonl``
(one row per ``--log-every`` steps: training loss, learning rate, seconds, and the validation
loss every ``--eval-every`` steps) and ``summary.json``; and, for every optimizer trained into
``--out`` with the same model, data and budget, ``loss.png``, ``results.md`` and ``results.csv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import hashlib
import io
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import sambayes

OPTIMIZERS = ("bsam", "ivon", "adamw")
BOTH = ("bsam", "adamw")  # --optimizer both
CHECKPOINT = "checkpoint.pt"
# The corpus: these standard-library modules' source files (a module's .py file, or a package's
# __init__.py), in this sorted order; 1.65 MB with Python 3.11. The bytes differ a little between
# Python versions, so the run prints the corpus's SHA-256.
CORPUS_MODULES = (
    "_pydecimal",
    "argparse",
    "ast",
    "calendar",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "json.decoder",
    "json.encoder",
    "logging",
    "random",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest.case",
)
VOCAB_SIZE = 256  # bytes
# what a checkpoint must share with the run that resumes it: the model, the data and the recipe
RESUME_KEYS = (
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "dropout",
    "batch_size",
    "splits",
    "steps",
    "warmup",
    "lr_bsam",
    "lr_ivon",
    "lr_adamw",
    "min_lr_ratio",
    "seed",
    "val_fraction",
    "amp",
)
# what the runs compared in one table must share (the optimizer's own knobs aside)
BUDGET_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "batch_size", "steps", "seed", "val_fraction")


# ---- the model --------------------------------------------------------------------------------
@dataclasses.dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    vocab_size: int = VOCAB_SIZE
    dropout: float = 0.0


#: GPT-2 small's shapes (with a byte vocabulary: 85.8M parameters instead of GPT-2's 124M with 50,257 tokens)
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)


class CausalSelfAttention(torch.nn.Module):
    """Multi-head self-attention in which position t sees positions <= t: [B, T, C] -> [B, T, C]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = torch.nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = torch.nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = torch.nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        # [B, T, 3C] -> three [B, heads, T, C / heads]
        q, k, v = (
            t.view(batch, length, self.n_head, channels // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(channels, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, channels)))


class MLP(torch.nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = torch.nn.GELU(approximate="tanh")
        self.proj = torch.nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = torch.nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(torch.nn.Module):
    """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = torch.nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(torch.nn.Module):
    """Decoder-only transformer: token ids int64 [B, T] (T <= block_size) -> logits [B, T, vocab_size].

    GPT-2's layout and initialisation: weights N(0, 0.02), the projections into the residual stream
    N(0, 0.02 / sqrt(2 · n_layer)), biases 0; the output head shares the token embedding's weight.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = torch.nn.Embedding(config.block_size, config.n_embd)
        self.drop = torch.nn.Dropout(config.dropout)
        self.blocks = torch.nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = torch.nn.LayerNorm(config.n_embd)
        self.head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied: one parameter, listed once by parameters()
        for name, module in self.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and module is not self.head:
                residual = name.endswith(".proj")  # attention's and the MLP's output projections
                std = 0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    torch.nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        if length > self.config.block_size:
            raise ValueError(f"sequence of {length} tokens, longer than block_size={self.config.block_size}")
        positions = torch.arange(length, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters, each once (the tied head is the embedding)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- the corpus -----------------------------------------------------------------------------
@dataclasses.dataclass
class Corpus:
    """Training and validation bytes (uint8 [n] each) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    description: str


def corpus_files() -> list[pathlib.Path]:
    """The source files of ``CORPUS_MODULES`` in this interpreter's standard library, in that order."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for module in CORPUS_MODULES:
        base = stdlib.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                files.append(candidate)
                break
        else:
            raise SystemExit(f"the corpus needs the standard library's {module} module, not found under {stdlib}")
    return files


def load_corpus(val_fraction: float = 0.1) -> Corpus:
    """Bytes of the corpus files: the first (1 - val_fraction) of each file for training, the rest
    for validation (so both see every file's style), each part concatenated in file order."""
    if not 0 < val_fraction < 1:
        raise SystemExit(f"--val-fraction {val_fraction}: must be in (0, 1)")
    train, val, digest = bytearray(), bytearray(), hashlib.sha256()
    files = corpus_files()
    for path in files:
        data = path.read_bytes()
        digest.update(data)
        cut = round(len(data) * (1 - val_fraction))
        train += data[:cut]
        val += data[cut:]
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8).clone()
    described = (
        f"{len(files)} standard-library sources of Python {sys.version_info.major}.{sys.version_info.minor}, "
        f"{len(train):,} training and {len(val):,} validation bytes (sha256 {digest.hexdigest()[:12]})"
    )
    return Corpus(as_tensor(train), as_tensor(val), described)


def batch_offsets(step: int, seed: int, batch_size: int, num_bytes: int, block_size: int) -> torch.Tensor:
    """Start offsets int64 [batch_size] of step ``step``'s training windows: a function of (seed, step)
    alone, so every optimizer, every process count and a resumed run see the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(num_bytes - block_size, (batch_size,), generator=generator)


def local_rows(batch_size: int, splits: int, rank: int, world: int, mode: str) -> torch.Tensor:
    """The rows of the global batch that process ``rank`` trains on, int64, in its sub-batch order.

    The global batch is cut into ``splits`` sub-batches, as one process would cut it. DDP: process r
    takes the sub-batches r, r + world, ... (bSAM draws the noise of sub-batch j · world + r for its
    j-th, the index one process gives that sub-batch). FSDP2: every process takes its share of each
    sub-batch (FSDP2 averages each backward pass over the processes, so a sub-batch spans them all).
    """
    chunks = torch.arange(batch_size).view(splits, batch_size // splits)
    if mode == "fsdp2":
        return chunks.chunk(world, dim=1)[rank].flatten()
    return chunks[rank::world].flatten()


def windows(data: torch.Tensor, offsets: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), int64 [len(offsets), block_size] each: targets are inputs shifted by one byte."""
    index = offsets[:, None] + torch.arange(block_size + 1)
    tokens = data[index].long()
    return tokens[:, :-1], tokens[:, 1:]


# ---- distributed ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """Where this process runs: its device, rank, process count and how the model is distributed."""

    device: torch.device
    rank: int = 0
    world: int = 1
    mode: str = "none"  # none, ddp or fsdp2

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """The sums over all processes of a few float64 numbers (the numbers themselves with one process)."""
        if self.mode == "none":
            return values
        comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=comm)
        dist.all_reduce(tensor)
        return tensor.tolist()


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def wrap(model: GPT, run: Run) -> torch.nn.Module:
    """The module that trains: the model itself, DDP around it, or the model sharded in place by FSDP2
    (each block, then the root, which holds the embeddings and the tied head)."""
    if run.mode == "ddp":
        cuda = run.device.type == "cuda"
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if cuda else None)
    if run.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    return model


# ---- optimizers and schedule -----------------------------------------------------------------------
def make_optimizer(name: str, args: argparse.Namespace, net: torch.nn.Module, num_tokens: int):
    """bSAM or IVON (given the module: under DDP bSAM skips the noisy pass's all-reduce itself, IVON
    averages its sums once per step), or AdamW."""
    if name == "bsam":
        # N counts training tokens, not sequences: the loss is the mean over token predictions, each a
        # term of the log-likelihood; training windows start anywhere, so there is no fixed sequence count
        num_data = args.data_factor * num_tokens
        return sambayes.BSAM(
            net,
            num_data=num_data,
            lr=args.lr_bsam,
            betas=(0.9, args.beta2_bsam),
            rho=args.rho,
            weight_decay=args.prior_precision / num_data,
            damping=args.damping,
            init_precision=args.init_precision,
            seed=args.seed,
            backend=args.backend,
            state_dtype=torch.bfloat16 if args.bsam_state == "bfloat16" else None,
        )
    if name == "ivon":
        # ess counts training tokens, as bSAM's N; α = lr·(h0 + δ) (ivon-opt's rescaling)
        return sambayes.IVON(
            net,
            lr=args.lr_ivon,
            ess=num_tokens,
            hess_init=args.hess_init,
            weight_decay=args.prior_precision / num_tokens,
            clip_radius=args.clip_radius,
            seed=args.seed,
            backend=args.backend,
            state_dtype=torch.bfloat16 if args.ivon_state == "bfloat16" else None,
        )
    # GPT-2's convention: weight decay on the matrices only, not on biases and LayerNorm gains
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr_adamw, betas=(0.9, 0.95))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` of the peak at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ---- one step and evaluation ------------------------------------------------------------------------
def lm_loss(net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, amp: bool) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats); the forward pass under bfloat16 autocast when ``amp``."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def train_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    splits: int,
    amp: bool,
    max_grad_norm: float | None,
    probe: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One optimizer step on this process's batch [b, T]; returns the mean loss, detached (bSAM: at
    the perturbed points; IVON: at the sampled weights). bSAM calls the closure twice per sub-batch,
    IVON once per sample, and both manage the gradients themselves; ``probe`` runs after the last
    backward pass of the step (when the optimizer holds all of its scratch)."""
    if isinstance(opt, sambayes.BSAM):
        chunks = sambayes.split_batch(inputs, targets, splits=splits)
        passes = 0

        def closure(j: int = 0) -> torch.Tensor:
            nonlocal passes
            loss = lm_loss(net, *chunks[j], amp)
            loss.backward()
            passes += 1
            if probe is not None and passes == 2 * splits:
                probe()
            return loss

        return opt.step(closure, splits=splits, max_grad_norm=max_grad_norm)
    if isinstance(opt, sambayes.IVON):

        def sampled_pass() -> torch.Tensor:
            loss = lm_loss(net, inputs, targets, amp)
            loss.backward()
            if probe is not None:
                probe()
            return loss

        return opt.step(sampled_pass, max_grad_norm=max_grad_norm)
    opt.zero_grad(set_to_none=True)
    loss = lm_loss(net, inputs, targets, amp)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
    opt.step()
    if probe is not None:
        probe()
    return loss.detach()


@torch.no_grad()
def evaluate(net: torch.nn.Module, val: torch.Tensor, args: argparse.Namespace, run: Run) -> float:
    """Mean validation loss (nats per byte) over ``eval_batches × batch_size`` fixed windows, evenly
    spaced over the validation bytes, at the current weights (bSAM: the posterior mean); each
    process takes its share of the windows (FSDP2 needs every process in each forward pass)."""
    count = args.eval_batches * args.batch_size
    offsets = torch.linspace(0, len(val) - args.block_size - 1, count).long()
    mine = offsets.chunk(run.world)[run.rank]
    was_training = net.training
    net.eval()
    total = 0.0
    try:
        for part in mine.split(args.batch_size // run.world):
            inputs, targets = windows(val, part, args.block_size)
            loss = lm_loss(net, inputs.to(run.device), targets.to(run.device), args.amp == "bf16")
            total += loss.item() * len(part)
    finally:
        net.train(was_training)
        # FSDP2 keeps the root's parameters unsharded after a forward pass without backward; the
        # optimizer writes the shards (bSAM's noisy sample next), which the next forward must all-gather
        for module in net.modules():
            if run.mode == "fsdp2" and hasattr(module, "reshard"):
                module.reshard()
    total, n = run.all_sum([total, float(len(mine))])
    return total / n


# ---- optimizer memory ----------------------------------------------------------------------------
def optimizer_bytes(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the tensors ``opt`` holds now, parameters and gradients excluded (this process's shards).

    ``state``: every tensor in ``opt.state``; ``held``: those plus every other tensor reachable from
    the optimizer's attributes, its parameter groups' values and its own helper objects (sambayes
    keeps per-parameter scratch such as ``grad_sum`` and ``curvature_sum`` in its step and sum pool).
    A storage shared by several tensors counts once; modules (``opt.model``) are not searched.
    """
    excluded = set()
    params = [p for group in opt.param_groups for p in group["params"]] + list(model.parameters())
    for p in params:  # the optimizer's (sharded) parameters and the module's (unsharded, under FSDP2)
        for t in (p, p.grad):
            if t is not None:
                excluded.add(_storage_key(local(t)))
    seen: set[tuple] = set()
    visited: dict[int, Any] = {}  # id -> the object, kept alive so that its id is not reused during the walk

    def walk(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            t = local(obj)
            key = _storage_key(t)
            if key in excluded or key in seen:
                return 0
            seen.add(key)
            return t.untyped_storage().nbytes()
        if isinstance(obj, torch.nn.Module) or id(obj) in visited:
            return 0
        visited[id(obj)] = obj
        if isinstance(obj, dict):
            return sum(walk(k) + walk(v) for k, v in obj.items())
        if isinstance(obj, (list, tuple, set)):
            return sum(walk(v) for v in obj)
        if type(obj).__module__.startswith("sambayes"):  # the optimizer's own helpers (slots, records)
            slots = [getattr(cls, "__slots__", ()) for cls in type(obj).__mro__]
            names = [n for names in slots for n in ((names,) if isinstance(names, str) else names)]
            values = [getattr(obj, n, None) for n in names] + list(getattr(obj, "__dict__", {}).values())
            return sum(walk(v) for v in values)
        return 0

    state = walk(list(opt.state.values()))  # its keys are the parameters
    rest = sum(walk({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups)
    rest += walk({k: v for k, v in vars(opt).items() if k not in ("state", "param_groups")})
    return {"state": state, "held": state + rest}


def optimizer_memory(opt: torch.optim.Optimizer, model: torch.nn.Module, in_step: int, run: Run) -> dict[str, float]:
    """Optimizer bytes now (``state``, ``held``), ``in_step`` (measured during the step) and the parameters
    they are for: one process's under DDP (identical replicas), every process's shards summed under FSDP2;
    ``held_here``: this process's."""
    now = optimizer_bytes(opt, model)
    parameters = sum(local(p).numel() for group in opt.param_groups for p in group["params"])
    values = [now["state"], now["held"], in_step, parameters]
    if run.mode == "fsdp2":
        values = run.all_sum(values)
    return dict(zip(("state", "held", "in_step", "parameters"), values), held_here=now["held"])


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


# ---- checkpoints and logs ----------------------------------------------------------------------------
def atomic_save(path: pathlib.Path, state: dict[str, Any], *, kill_midway: bool = False) -> None:
    """``torch.save`` to ``path`` atomically: a temporary file, flushed and fsync'ed, renamed over the old
    one, then the folder fsync'ed; a crash at any moment leaves the old file or the new one, whole.

    ``kill_midway`` (fault injection for tests): SIGKILL this process halfway through the temporary file.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        if kill_midway:
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class Checkpoints:
    """Step-level checkpoints of one optimizer's run in ``folder``.

    One process, or DDP (whose replicas are identical): process 0 writes ``checkpoint.pt``, the whole
    state, atomically. FSDP2: every process saves its shards of the model and optimizer state with
    ``torch.distributed.checkpoint`` (DCP) into ``dcp-STEP/``; once all have, process 0 writes
    ``checkpoint.pt`` (the schedule, counters and log state) naming that folder, and only then are
    older folders deleted, so a crash at any moment leaves a consistent set. DCP reshards on loading:
    an FSDP2 checkpoint resumes on any number of processes, or in one process.
    """

    def __init__(self, folder: pathlib.Path, run: Run, kill_in_checkpoint: int | None = None) -> None:
        self.folder, self.run, self.kill_in_checkpoint, self.written = folder, run, kill_in_checkpoint, 0

    def save(self, model: torch.nn.Module, opt, schedule, common: dict[str, Any]) -> None:
        self.written += 1
        kill = self.written == self.kill_in_checkpoint
        common = dict(common, scheduler=schedule.state_dict(), world_size=self.run.world)
        if self.run.mode != "fsdp2":
            if self.run.is_main:
                state = dict(common, model=model.state_dict(), optimizer=opt.state_dict())
                atomic_save(self.folder / CHECKPOINT, state, kill_midway=kill)
            self.run.barrier()
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"dcp-{common['step']:08d}"
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(self.folder / name))
        self.run.barrier()
        if self.run.is_main:
            atomic_save(self.folder / CHECKPOINT, dict(common, dcp=name), kill_midway=kill)
        self.run.barrier()
        if self.run.is_main:
            for old in self.folder.glob("dcp-*"):
                if old.name != name:
                    shutil.rmtree(old)

    def load(self, model: torch.nn.Module, opt, schedule, args: argparse.Namespace) -> dict[str, Any] | None:
        """Restore model, optimizer and schedule from the last checkpoint; its other entries (None: none)."""
        path = self.folder / CHECKPOINT
        if not path.is_file():
            return None
        checkpoint = torch.load(path, map_location=self.run.device, weights_only=False)
        for key in RESUME_KEYS:
            if checkpoint["args"].get(key) != getattr(args, key):
                raise SystemExit(f"{path} was written with --{key.replace('_', '-')} {checkpoint['args'].get(key)}")
        if "dcp" in checkpoint:  # FSDP2's: loaded into this run's sharding, whatever it is
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(model, opt)  # what to read, laid out as this run holds it
            with warnings.catch_warnings():  # in one process DCP says it loads in one process: that is the intent
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(
                    {"model": model_state, "optim": optim_state},
                    checkpoint_id=str(self.folder / checkpoint["dcp"]),
                    no_dist=self.run.mode == "none",  # one process reads every shard
                )
            set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)
        else:
            if self.run.mode == "fsdp2":
                raise SystemExit(f"{path} was written without FSDP2: resume it without --dist fsdp2")
            model.load_state_dict(checkpoint["model"])
            opt.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["scheduler"])
        return checkpoint


def read_log(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a ``log.jsonl`` (a line cut short by a crash is left out)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_log(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ---- training one optimizer ------------------------------------------------------------------------
def train(name: str, args: argparse.Namespace, corpus: Corpus, run: Run, out: pathlib.Path) -> dict[str, Any] | None:
    """Train ``name`` for ``args.steps`` steps; its summary (None when stopped early by ``--stop-after``)."""
    folder = out / name
    if run.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    run.barrier()
    log_path, summary_path = folder / "log.jsonl", folder / "summary.json"
    config = GPTConfig(args.n_layer, args.n_head, args.n_embd, args.block_size, dropout=args.dropout)
    torch.manual_seed(args.seed)  # the same initial weights for every optimizer and process
    model = GPT(config).to(run.device)
    num_params = count_parameters(model)
    net = wrap(model, run)
    opt = make_optimizer(name, args, net, len(corpus.train))
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, args.steps, warmup, args.min_lr_ratio)
    )
    checkpoints = Checkpoints(folder, run, args.kill_in_checkpoint)
    first_step, train_seconds, loss_sum, loss_count, rows = 0, 0.0, 0.0, 0, []
    memory: dict[str, Any] = {}  # optimizer bytes during the last step and after it
    checkpoint = checkpoints.load(model, opt, schedule, args) if args.resume else None
    if checkpoint is not None:
        first_step, train_seconds = checkpoint["step"], checkpoint["train_seconds"]
        loss_sum, loss_count = checkpoint["loss_sum"], checkpoint["loss_count"]
        memory = checkpoint["memory"]
        # rows logged after the checkpoint are logged again as the steps after it are replayed
        rows = [row for row in read_log(log_path) if row["step"] <= first_step]
        if first_step == args.steps and summary_path.is_file():
            if run.is_main:
                print(f"{name}: finished already ({summary_path})")
            return json.loads(summary_path.read_text())
        if run.is_main:
            print(f"{name}: resumed from {folder / CHECKPOINT} after step {first_step}")
    if run.is_main:
        write_log(log_path, rows)
        summary_path.unlink(missing_ok=True)

    splits = args.splits if run.mode == "fsdp2" else args.splits // run.world
    tokens_per_step = args.batch_size * args.block_size
    rows_here = local_rows(args.batch_size, args.splits, run.rank, run.world, run.mode)
    amp = args.amp == "bf16"
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)

    def log(step: int, lr: float) -> None:
        nonlocal loss_sum, loss_count, rows
        row: dict[str, Any] = {"step": step, "tokens": step * tokens_per_step, "lr": lr}
        if loss_count:
            total, count = run.all_sum([loss_sum, float(loss_count)])
            row["train_loss"] = total / count
        if step % args.eval_every == 0 or step == args.steps:
            row["val_loss"] = evaluate(net, corpus.val, args, run)
        row["seconds"] = round(train_seconds, 3)
        loss_sum, loss_count = 0.0, 0
        if run.is_main:
            rows.append(row)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def probe() -> None:
        memory["in_step"] = optimizer_bytes(opt, model)["held"]

    if first_step == 0:
        log(0, schedule.get_last_lr()[0])  # the loss of the initial weights
    bar = tqdm(
        range(first_step, last),
        desc=name,
        initial=first_step,
        total=args.steps,
        disable=not run.is_main or args.no_progress,
    )
    for step in bar:
        offsets = batch_offsets(step, args.seed, args.batch_size, len(corpus.train), args.block_size)
        inputs, targets = windows(corpus.train, offsets[rows_here], args.block_size)
        torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + run.rank)  # dropout: a function of the step
        start = time.perf_counter()
        loss = train_step(
            net,
            opt,
            inputs.to(run.device),
            targets.to(run.device),
            splits=splits,
            amp=amp,
            max_grad_norm=args.max_grad_norm or None,
            probe=probe if step + 1 == args.steps else None,
        )
        schedule.step()
        loss_sum += loss.item()  # waits for the device: the step time below is the step's
        loss_count += 1
        train_seconds += time.perf_counter() - start
        done = step + 1
        if done % args.log_every == 0 or done == args.steps or done % args.eval_every == 0:
            lr = schedule.get_last_lr()[0]
            log(done, lr)
            bar.set_postfix(
                loss=f"{rows[-1].get('train_loss', float('nan')):.3f}" if run.is_main else "", lr=f"{lr:.2e}"
            )
        if done == args.steps:  # what the optimizer holds between steps (saved with the last checkpoint)
            memory.update(optimizer_memory(opt, model, memory.pop("in_step"), run))
        if (args.checkpoint_every and done % args.checkpoint_every == 0) or done == last:
            checkpoints.save(
                model,
                opt,
                schedule,
                dict(
                    step=done,
                    train_seconds=train_seconds,
                    loss_sum=loss_sum,
                    loss_count=loss_count,
                    memory=memory,
                    args=vars(args),
                ),
            )
        if done == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: as a node failure would
    bar.close()
    if last < args.steps:
        if run.is_main:
            print(f"{name}: stopped after step {last}; continue with --resume")
        return None

    final = next(row["val_loss"] for row in reversed(rows) if "val_loss" in row) if run.is_main else float("nan")
    summary = {
        "optimizer": name,
        "parameters": num_params,
        "steps": args.steps,
        "tokens": args.steps * tokens_per_step,
        "passes_per_step": 2 if name == "bsam" else 1,  # IVON: one sample per step
        "final_val_loss": final,
        "val_perplexity": math.exp(final),
        "val_bits_per_byte": final / math.log(2),
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": args.steps * tokens_per_step / train_seconds if train_seconds else float("nan"),
        "state_bytes_per_param": memory["state"] / memory["parameters"],
        "held_bytes_per_param": memory["held"] / memory["parameters"],
        "in_step_bytes_per_param": memory["in_step"] / memory["parameters"],
        "optimizer_mib_per_process": memory["held_here"] / 2**20,
        "processes": run.world,
        "dist": run.mode,
        "device": str(run.device.type),
        "args": {k: getattr(args, k) for k in BUDGET_KEYS},
    }
    if run.is_main:
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    run.barrier()
    return summary


# ---- the comparison ---------------------------------------------------------------------------------
def comparable_summaries(out: pathlib.Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The summaries in ``out`` of runs with this run's model, data and budget, in OPTIMIZERS order."""
    budget = {k: getattr(args, k) for k in BUDGET_KEYS}
    found = []
    for name in OPTIMIZERS:
        path = out / name / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            if summary["args"] == budget:
                found.append(summary)
    return found


TABLE = (
    ("optimizer", "optimizer", "{}"),
    ("steps", "steps", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("final val loss (nats/byte)", "final_val_loss", "{:.4f}"),
    ("val perplexity", "val_perplexity", "{:.3f}"),
    ("val bits/byte", "val_bits_per_byte", "{:.3f}"),
    ("fwd+bwd per step", "passes_per_step", "{}"),
    ("train s", "train_seconds", "{:.1f}"),
    ("tokens/s", "tokens_per_second", "{:,.0f}"),
    ("optimizer state B/param", "state_bytes_per_param", "{:.2f}"),
    ("held between steps B/param", "held_bytes_per_param", "{:.2f}"),
    ("held during a step B/param", "in_step_bytes_per_param", "{:.2f}"),
)


TABLE_NOTES = """\
Validation loss: mean next-byte cross-entropy on fixed windows of the held-out tail of every corpus file,
at the weights (bSAM, IVON: the posterior mean); perplexity = exp(loss), bits/byte = loss / ln 2. Tokens/s:
training bytes per second of training steps (evaluation and checkpoints excluded), over all processes;
a bSAM step takes two forward-backward passes, an IVON step one (at a sample of its posterior). Optimizer bytes per parameter (float32 parameters; under
FSDP2 the shards of all processes, summed): "state" is every tensor in `optimizer.state`; "held between
steps" adds every other tensor the optimizer keeps after a step (flags, counters, scratch); "held during
a step" is the same count inside the step, after its last backward pass (bSAM: its sums over the
sub-batches too). Parameters and gradients are not counted, nor AdamW's temporaries inside `step()`.
"""


def write_results(out: pathlib.Path, summaries: list[dict[str, Any]], description: str) -> None:
    """``results.md`` (a markdown table and how it was made) and ``results.csv``."""
    header = "| " + " | ".join(title for title, _, _ in TABLE) + " |"
    align = "| --- | " + " | ".join("---:" for _ in TABLE[1:]) + " |"
    lines = [header, align]
    for s in summaries:
        lines.append("| " + " | ".join(fmt.format(s[key]) for _, key, fmt in TABLE) + " |")
    (out / "results.md").write_text(description + "\n\n" + "\n".join(lines) + "\n\n" + TABLE_NOTES)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for _, key, _ in TABLE] + ["parameters", "processes", "dist"])
        writer.writeheader()
        for s in summaries:
            writer.writerow({key: s[key] for key in writer.fieldnames})


def plot(out: pathlib.Path, summaries: list[dict[str, Any]]) -> None:
    """``loss.png``: training and validation loss against tokens, and validation loss against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"bsam": "tab:red", "ivon": "tab:green", "adamw": "tab:blue"}
    labels = {"bsam": "bSAM", "ivon": "IVON", "adamw": "AdamW"}
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in summaries:
        name = s["optimizer"]
        rows = read_log(out / name / "log.jsonl")
        train = [(r["tokens"], r["train_loss"]) for r in rows if "train_loss" in r]
        val = [(r["tokens"], r["seconds"], r["val_loss"]) for r in rows if "val_loss" in r]
        by_tokens.plot(
            *zip(*train),
            color=colors[name],
            alpha=0.45,
            lw=1,
            label=f"{labels[name]} train" + {"bsam": " (perturbed points)", "ivon": " (samples)"}.get(name, ""),
        )
        by_tokens.plot(
            [v[0] for v in val], [v[2] for v in val], "o-", color=colors[name], ms=3, label=f"{labels[name]} val"
        )
        by_time.plot(
            [v[1] for v in val], [v[2] for v in val], "o-", color=colors[name], ms=3, label=f"{labels[name]} val"
        )
    by_tokens.set(xlabel="training tokens", ylabel="loss (nats per byte)", title="loss at the same budget of tokens")
    by_time.set(xlabel="training seconds (wall clock)", ylabel="validation loss", title="validation loss against time")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


# ---- command line -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arg = parser.add_argument
    arg("--optimizer", choices=(*OPTIMIZERS, "both"), default="both", help="both: bSAM, then AdamW, same budget")
    arg("--lr-ivon", type=float, default=0.2, help="IVON's lr (α = lr·(h0 + δ), as ivon-opt rescales it)")
    arg("--hess-init", type=float, default=0.01, help="IVON's h0")
    arg("--clip-radius", type=float, default=1e-3, help="IVON's clip_radius: each mean step clipped to ±lr·(h0 + δ)·r")
    arg(
        "--ivon-state",
        choices=("float32", "bfloat16"),
        default="float32",
        help="IVON's precision and momentum: float32, or bfloat16 with stochastic rounding (8 B per parameter)",
    )
    arg("--n-layer", type=int, default=GPTConfig.n_layer)
    arg("--n-head", type=int, default=GPTConfig.n_head)
    arg("--n-embd", type=int, default=GPTConfig.n_embd)
    arg("--block-size", type=int, default=GPTConfig.block_size, help="context length in bytes")
    arg("--dropout", type=float, default=0.0)
    arg("--gpt2-small", action="store_true", help="GPT-2 small's shapes: 12 layers, 12 heads, 768 wide, block 1024")
    arg("--batch-size", type=int, default=16, help="sequences per step (under torchrun: over all processes)")
    arg("--steps", type=int, default=200, help="optimizer steps for each optimizer")
    arg("--warmup", type=int, default=None, help="linear warm-up steps (default: a tenth of --steps), then cosine")
    arg("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to this fraction of the peak")
    arg("--lr-adamw", type=float, default=2e-3)
    arg("--weight-decay", type=float, default=0.1, help="AdamW's decoupled weight decay (matrices only)")
    arg("--lr-bsam", type=float, default=0.5, help="bSAM's α")
    arg("--beta2-bsam", type=float, default=0.99, help="bSAM's β2")
    arg("--rho", type=float, default=0.01, help="bSAM's ρ")
    arg("--prior-precision", type=float, default=1.0, help="bSAM and IVON: weight_decay = prior precision / N (ess)")
    arg("--data-factor", type=float, default=1.0, help="bSAM: N = data factor × training tokens")
    arg("--damping", type=float, default=0.1, help="bSAM's γ")
    arg("--init-precision", type=float, default=1.0, help="bSAM's s0")
    arg(
        "--bsam-state",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bSAM's precision and momentum: float32, or bfloat16 with stochastic rounding (8 B per parameter)",
    )
    arg(
        "--splits",
        type=int,
        default=None,
        help="bSAM: sub-batches with their own noise and ascent (m-sharpness), over all processes "
        "(default: 1; with DDP one per process, each draws its own noise)",
    )
    arg(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="clip the gradient (bSAM: perturbed-point) to this 2-norm; 0: no clipping",
    )
    arg("--amp", choices=("bf16", "none"), default="bf16", help="bfloat16 autocast of the forward pass (CPU too)")
    arg("--val-fraction", type=float, default=0.1, help="the tail of each corpus file kept for validation")
    arg("--eval-every", type=int, default=None, help="validation loss every this many steps (default: --steps / 10)")
    arg("--eval-batches", type=int, default=8, help="validation windows: this many batches of --batch-size")
    arg("--log-every", type=int, default=10)
    arg("--seed", type=int, default=0, help="fixes the initial weights, the batches and bSAM's and IVON's noise")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arg("--backend", default="auto", help="sambayes backend: auto, eager, foreach, triton, cpu or cuda")
    arg("--threads", type=int, default=None, help="torch threads per process (on a small, busy CPU: 1)")
    arg(
        "--dist",
        choices=("none", "ddp", "fsdp2"),
        default=None,
        help="under torchrun: ddp (default there) or fsdp2; none: one process",
    )
    arg("--out", default="out/gpt")
    arg("--resume", action="store_true", help="continue from the checkpoints in --out where they exist")
    arg("--checkpoint-every", type=int, default=0, metavar="STEPS", help="also checkpoint every STEPS steps")
    arg("--stop-after", type=int, default=None, metavar="STEP", help="exit after this step (continue with --resume)")
    arg("--no-progress", action="store_true", help="no progress bar")
    # fault injection for the kill-and-resume test: SIGKILL after a step, or halfway through a checkpoint write
    arg("--kill-at", type=int, default=None, help=argparse.SUPPRESS)
    arg("--kill-in-checkpoint", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpt2_small:
        for key, value in GPT2_SMALL.items():
            setattr(args, key, value)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 10)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if args.dist is None:
        args.dist = "ddp" if world > 1 else "none"
    if args.splits is None:
        args.splits = world if args.dist == "ddp" else 1
    return args


def check_arguments(args: argparse.Namespace, world: int) -> None:
    """SystemExit naming the first flag that cannot work."""
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps", "log_every", "eval_every"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 1")
    if args.n_embd % args.n_head:
        raise SystemExit(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.splits < 1 or args.batch_size % args.splits:
        raise SystemExit(f"--splits {args.splits} does not divide --batch-size {args.batch_size}")
    if args.dist == "fsdp2" and (args.batch_size // args.splits) % world:
        raise SystemExit(
            f"--batch-size {args.batch_size} / --splits {args.splits}: "
            f"a sub-batch must split over the {world} processes"
        )
    if args.dist != "fsdp2" and args.splits % world:
        raise SystemExit(f"--splits {args.splits} is not divisible by the {world} processes (DDP: whole sub-batches)")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the command line ``argv``; the summaries of the runs in the table. Under torchrun it joins the
    process group (nccl on CUDA, gloo on the CPU); called in a process that has one already, it uses that."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    own_group = args.dist != "none" and not dist.is_initialized()
    if own_group:
        if "RANK" not in os.environ:
            raise SystemExit(f"--dist {args.dist} needs torchrun: torchrun --nproc_per_node=N examples/gpt.py ...")
        dist.init_process_group("nccl" if torch.device(args.device).type == "cuda" else "gloo")
    try:
        summaries, exit_message = compare(args), None
    except SystemExit as exc:  # a bad flag or checkpoint: every process raises the same one
        summaries, exit_message = [], exc.code
    gc.collect()  # the DDP modules and optimizers go before their process group
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    if own_group:
        # leave together: gloo can abort a process that destroys its group while another still uses it
        dist.barrier()
        dist.destroy_process_group()
    if exit_message is not None:
        raise SystemExit(exit_message if main_process else 1)  # the message once
    return summaries


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train the optimizers asked for; write the plot and the table of every comparable run in ``--out``."""
    if args.dist != "none":
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(args.device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        run = Run(device, rank, world, args.dist)
    else:
        run = Run(torch.device(args.device))
    check_arguments(args, run.world)
    out = pathlib.Path(args.out)
    if run.is_main:
        out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.val_fraction)
    if len(corpus.val) <= args.block_size + 1:
        raise SystemExit(f"--block-size {args.block_size} is longer than the {len(corpus.val)} validation bytes")
    names = BOTH if args.optimizer == "both" else (args.optimizer,)
    if run.is_main:
        with torch.device("meta"):
            params = count_parameters(GPT(GPTConfig(args.n_layer, args.n_head, args.n_embd, args.block_size)))
        where = f"{run.world} processes ({run.mode}, {run.device.type})" if run.world > 1 else str(run.device)
        print(f"corpus: {corpus.description}")
        print(
            f"model: {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size}, "
            f"{params:,} parameters; {args.steps} steps of {args.batch_size} × {args.block_size} bytes on {where}"
        )
    for name in names:
        if train(name, args, corpus, run, out) is None:
            return []
    summaries = comparable_summaries(out, args)
    if run.is_main and summaries:
        described = (
            f"{summaries[0]['parameters']:,}-parameter GPT ({args.n_layer} layers, {args.n_head} heads, "
            f"{args.n_embd} wide, block {args.block_size}); {args.steps} steps of {args.batch_size} sequences; "
            f"corpus: {corpus.description}; {run.world} process(es), {run.mode}, {run.device.type}, "
            f"autocast {args.amp}"
        )
        write_results(out, summaries, described)
        plot(out, summaries)
        print((out / "results.md").read_text())
    return summaries


if __name__ == "__main__":
    main()
