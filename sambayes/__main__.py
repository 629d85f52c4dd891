"""``python -m sambayes demo|bench|info``: the command line, :mod:`sambayes.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
