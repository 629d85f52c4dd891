"""The demo's verdicts of several runs side by side (one column pair per run), with a last column
saying whether every run reached the same verdict. ::

    python -m sambayes demo --seeds $(seq 0 99) --backend cpu --no-plots --out runs/cpu
    python -m sambayes demo --seeds $(seq 0 99) --backend eager --no-plots --out runs/eager
    python examples/demo_verdicts.py runs/cpu runs/eager --out runs/verdicts.md

Each folder is a demo run's ``--out``; its name labels its columns. The verdicts are recomputed
from each run's ``runs.csv`` and ``shift_runs.csv`` (``sambayes.cli.demo.verdicts``).
"""

from __future__ import annotations

import argparse
import pathlib

from sambayes.cli.demo import verdicts


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="demo output folders (their names label them)")
    parser.add_argument("--out", type=pathlib.Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    names = [run.resolve().name for run in args.runs]
    if len(set(names)) < len(names):
        parser.error(f"the folders' names label the columns and must differ: {names}")
    table = verdicts.format_side_by_side({name: verdicts.from_folder(run) for name, run in zip(names, args.runs)})
    print(table, end="")
    if args.out is not None:
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
