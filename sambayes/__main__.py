"""The ``sambayes`` command (also ``python -m sambayes``).

sambayes demo [--quick] [--seeds 0 1 2] [--device cpu] [--backend auto] [--out DIR]
sambayes info
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the subcommand; returns the exit code."""
    from . import demo

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
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import backends

        print(backends.info())
    else:
        try:
            demo.check_arguments(args)  # every flag, before any training
        except ValueError as exc:
            demo_parser.error(str(exc))  # exits with code 2
        demo.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
