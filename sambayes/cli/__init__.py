"""The ``sambayes`` command (also ``python -m sambayes``): the tools around the library, kept apart
from it. ``demo`` trains every method on the digits and judges the claims, ``bench`` times the
backends here, ``info`` reports what runs here."""

from __future__ import annotations

import argparse

from ._common import plain


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the subcommand; returns the exit code."""
    from . import bench, demo, info

    parser = argparse.ArgumentParser(
        prog="sambayes",
        description="bSAM and SAM optimizers for PyTorch: the demo, a benchmark of the backends, and a report",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo",
        help=f"{', '.join(demo.METHODS[:-1])} and {demo.METHODS[-1]} on the digits: accuracy, calibration, "
        "uncertainty, shifts, verdicts over seeds, plots",
        description=plain(demo.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    info_parser = commands.add_parser(
        "info",
        help="versions, the specification, which backends run here and why not (compiles nothing)",
        description=plain(info.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_arguments(info_parser)
    bench_parser = commands.add_parser(
        "bench",
        help="time one bSAM and SAM step with every backend here: the fastest for this machine",
        description=plain(bench.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info.report(compile_extension=args.compile))
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
