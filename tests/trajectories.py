"""Saved trajectories of BSAM and SAM on every CPU backend, to hold refactors to bit-identical results.

``tests/data/trajectories.pt`` holds, for each scenario below and each backend, every step's loss,
parameters, state tensors and counters, as computed by the commit named in the file. A refactor of
the optimizer must reproduce them bit for bit (``tests/test_trajectories.py``); a change of
behaviour regenerates them on purpose, with a line in the commit saying which scenario moved:

    python tests/trajectories.py        # rewrites tests/data/trajectories.pt

Only the public API is used, so the same script runs on the commits before and after a refactor.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

import sambayes

PATH = pathlib.Path(__file__).parent / "data" / "trajectories.pt"
BACKENDS = ("eager", "foreach", "cpu", "triton")
STEPS = 4


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def _two_groups(model: torch.nn.Module, **second) -> list[dict]:
    first, last = list(model[0].parameters()), list(model[2].parameters())
    return [{"params": first}, {"params": last, **second}]


# name: (parameter dtype, optimizer builder, splits, max_grad_norm, GradScaler, (step, closure call) of an inf loss)
SCENARIOS = {
    "bsam": (
        torch.float32,
        lambda m, b: sambayes.BSAM(
            _two_groups(m, lr=0.2, weight_decay=1e-2), num_data=100, weight_decay=1e-3, seed=7, backend=b
        ),
        2,
        None,
        False,
        (2, 3),
    ),
    "bsam_clipped_bf16_state": (
        torch.float32,
        lambda m, b: sambayes.BSAM(m, num_data=50, rho=0.05, seed=2**40 + 3, state_dtype=torch.bfloat16, backend=b),
        1,
        0.5,
        False,
        None,
    ),
    "bsam_bf16_params_scaler_capturable": (
        torch.bfloat16,
        lambda m, b: sambayes.BSAM(m.parameters(), num_data=100, seed=11, capturable=True, backend=b),
        2,
        None,
        True,
        (1, 0),
    ),
    "bsam_float64": (
        torch.float64,
        lambda m, b: sambayes.BSAM(m.parameters(), num_data=100, lr=0.1, seed=5, backend=b),
        1,
        None,
        False,
        None,
    ),
    "sam_sgd_nesterov_adaptive": (
        torch.float32,
        lambda m, b: sambayes.SAM(
            m.parameters(), lr=0.1, momentum=0.9, nesterov=True, adaptive=True, weight_decay=1e-3, backend=b
        ),
        2,
        1.0,
        False,
        (1, 2),
    ),
    "sam_adamw": (
        torch.float32,
        lambda m, b: sambayes.SAM(_two_groups(m, lr=3e-3), lr=1e-2, base="adamw", weight_decay=1e-2, backend=b),
        1,
        None,
        True,
        (2, 1),
    ),
    "sam_fp16_params": (
        torch.float16,
        lambda m, b: sambayes.SAM(m.parameters(), lr=0.05, backend=b),
        2,
        None,
        False,
        None,
    ),
}


def run(name: str, backend: str) -> list[dict]:
    """Every step's loss, counters, parameters and state of scenario ``name`` on ``backend``."""
    dtype, build, splits, max_grad_norm, scaled, poison = SCENARIOS[name]
    model = _model(dtype)
    opt = build(model, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if scaled else None
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g).to(dtype), torch.randint(0, 3, (12,), generator=g)
    chunks = sambayes.split_batch(x, y, splits=splits)
    steps = []
    for step in range(STEPS):
        calls = iter(range(2 * splits))

        def closure(j=0, step=step, calls=calls):
            call = next(calls)
            loss = F.cross_entropy(model(chunks[j][0]).float(), chunks[j][1])
            if poison == (step, call):
                loss = loss * float("inf")
            (scaler.scale(loss) if scaler else loss).backward()
            return loss

        loss = opt.step(closure, splits=splits, grad_scaler=scaler, max_grad_norm=max_grad_norm)
        if scaler:
            scaler.update()
        steps.append(_flat(loss, model, opt.state_dict()))
    return steps


def _flat(loss: torch.Tensor, model: torch.nn.Module, saved: dict) -> torch.Tensor:
    """One step's loss, counters, parameters and state in one float64 tensor (exact for every dtype)."""
    counters = [float(g[key]) for g in saved["param_groups"] for key in ("step", "skipped_steps")]
    state = [saved["state"][pid][key] for pid in sorted(saved["state"]) for key in sorted(saved["state"][pid])]
    parts = [loss.reshape(1), torch.tensor(counters)] + [t.detach().flatten() for t in (*model.parameters(), *state)]
    return torch.cat([t.double() for t in parts])


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    data = {"commit": commit, "runs": {name: {b: run(name, b) for b in BACKENDS} for name in SCENARIOS}}
    torch.save(data, PATH)
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes) at {commit}")


if __name__ == "__main__":
    main()
