"""The Python calls and files of sambayes that one optimizer step passes through (steady state).

    python benchmarks/step_calls.py [--backend cpu] [--splits 2] [--optimizer bsam] [--functions]

Counts ``sys.setprofile`` call events whose code lives in this package (a generator's resumption
counts as a call, as the profiler reports it), for a bSAM (or SAM) step on a small MLP after three
warm-up steps: what a reader of the code follows, and the interpreter overhead of a launch-bound step.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys

import torch
import torch.nn.functional as F

import sambayes


def count(optimizer: str, backend: str, splits: int) -> collections.Counter:
    """{(file, function): calls} of one steady-state step."""
    root = pathlib.Path(sambayes.__file__).resolve().parent.parent
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    if optimizer == "bsam":
        opt = sambayes.BSAM(model, num_data=100, seed=0, backend=backend)
    else:
        opt = sambayes.SAM(model, lr=0.1, backend=backend)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    chunks = sambayes.split_batch(x, y, splits=splits)

    def closure(j=0):
        loss = F.cross_entropy(model(chunks[j][0]), chunks[j][1])
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure, splits=splits)
    calls: collections.Counter = collections.Counter()
    here = os.path.abspath(__file__)

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(str(root)) and path != here:
            calls[(os.path.relpath(path, root), frame.f_code.co_name)] += 1

    sys.setprofile(profile)
    opt.step(closure, splits=splits)
    sys.setprofile(None)
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=("bsam", "sam"), default="bsam")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--splits", type=int, default=2)
    parser.add_argument("--functions", action="store_true", help="list every function with its calls")
    args = parser.parse_args(argv)
    calls = count(args.optimizer, args.backend, args.splits)
    files: collections.Counter = collections.Counter()
    for (path, _), n in calls.items():
        files[path] += n
    print(f"{sum(calls.values())} calls of {len(calls)} functions in {len(files)} files")
    for path, n in files.most_common():
        print(f"  {n:5d}  {path}")
    if args.functions:
        for (path, name), n in calls.most_common():
            print(f"  {n:5d}  {path}:{name}")


if __name__ == "__main__":
    main()
