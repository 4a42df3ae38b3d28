"""``python -m fxprune ...``: the same command line as the ``fxprune`` console script."""

import sys

from fxprune.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
