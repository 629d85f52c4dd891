"""The ``sambayes`` command (also ``python -m sambayes``).

sambayes demo [--quick] [--seeds 0 1 2 3 4] [--device cpu] [--backend auto] [--out DIR]
sambayes info
sambayes bench [--numel 262_144] [--tensors 16] [--backends eager,cpu] [--device cpu] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the subcommand; returns the exit code."""
    from . import bench, demo

    parser = argparse.ArgumentParser(prog="sambayes", description="bSAM and SAM optimizers for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo",
        help="SGD, Adam, SAM and bSAM on the digits: accuracy, calibration, uncertainty, plots",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    commands.add_parser("info", help="which backends are available here, and why not")
    bench_parser = commands.add_parser(
        "bench",
        help="time one bSAM and SAM step with every backend here: the fastest for this machine",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import backends

        print(backends.info())
    elif args.command == "bench":
        try:
            bench.check_arguments(args)  # every flag, before anything is timed
        except ValueError as exc:
            bench_parser.error(str(exc))  # exits with code 2
        return bench.run(args)
    else:
        try:
            demo.check_arguments(args)  # every flag, before any training
        except ValueError as exc:
            demo_parser.error(str(exc))  # exits with code 2
        demo.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
