"""The public step of two source trees of sambayes, measured in one run: alternating rounds, so that a change
of the machine's load hits both alike.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py /tmp/before . --numel 10_000_000 --tensors 100 --backend cpu --rounds 6

Each round times ``opt.step(closure)`` (bSAM; ``--optimizer sam`` for SAM-SGD) in a fresh process per tree, the
trees in alternating order, with ``sambayes.bench``'s problem as found in the tree itself and one closure for
both (autograd accumulates the given gradients into .grad, with no forward pass). Prints each round and the medians, and the ratio after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

# run inside each tree's process: its own sambayes, its own bench helpers
_PROBE = r"""
import json, sys, time, torch
try:
    from sambayes.cli import bench
except ImportError:  # a tree from before the command-line tools moved
    from sambayes import bench
numel, tensors, backend, optimizer, reps, threads = sys.argv[1:7]
if int(threads):
    torch.set_num_threads(int(threads))
torch.manual_seed(0)
shapes = bench.synthetic_shapes(int(numel), int(tensors))
params, grads = bench.params_and_grads(shapes, torch.float32, "cpu")
params = [torch.nn.Parameter(p) for p in params]
opt = bench.make_optimizer(optimizer, params, backend)
def closure():  # the same in both trees: autograd accumulates the given gradients (no forward pass)
    torch.autograd.backward(params, grads)
for _ in range(3):
    opt.step(closure)
times = []
for _ in range(int(reps)):
    start = time.perf_counter()
    opt.step(closure)
    times.append(time.perf_counter() - start)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def median_step(tree: pathlib.Path, args: argparse.Namespace) -> float:
    """The median seconds of a step in a fresh process importing sambayes from ``tree``."""
    # each tree its own build of the C++ extension: one shared cache would be rebuilt at every switch
    env = {**os.environ, "PYTHONPATH": str(tree), "SAMBAYES_BUILD_DIR": str(tree / ".sambayes-build")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(args.numel), str(args.tensors), args.backend, args.optimizer]
        + [str(args.reps), str(args.threads)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=pathlib.Path)
    parser.add_argument("after", type=pathlib.Path)
    parser.add_argument("--numel", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--optimizer", choices=("bsam", "sam"), default="bsam")
    parser.add_argument("--reps", type=int, default=15, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=6, help="processes per tree, alternating")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    times: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for name in order:
            times[name].append(median_step(trees[name], args))
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.2f} ms" for n in ("before", "after")))
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"median step: before {before * 1e3:.2f} ms, after {after * 1e3:.2f} ms, after/before {after / before:.3f}")


if __name__ == "__main__":
    main()
