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
    methods = f"{', '.join(demo.METHODS[:-1])} and {demo.METHODS[-1]}"
    subcommands = (
        (
            "demo",
            demo,
            f"{methods} on the digits: accuracy, calibration, uncertainty, shifts, verdicts over seeds, plots",
        ),
        ("info", info, "versions, the specification, which backends run here and why not (compiles nothing)"),
        ("bench", bench, "time one bSAM and SAM step with every backend here: the fastest for this machine"),
    )
    parsers = {}
    for name, module, summary in subcommands:
        parsers[name] = commands.add_parser(
            name, help=summary, description=plain(module.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(parsers[name])
    demo_parser, bench_parser = parsers["demo"], parsers["bench"]
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
