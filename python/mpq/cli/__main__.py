"""``python -m mpq.cli``: the same as ``python -m mpq``."""

import sys

from mpq.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
