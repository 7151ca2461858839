"""``python -m semmim`` = the ``semmim`` command (works under ``torchrun -m semmim``)."""

import sys

from semmim.cli import main

if __name__ == "__main__":
    sys.exit(main())
