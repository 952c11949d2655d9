"""``python -m hesse``: the ``hesse`` command."""

import sys

from hesse.cli import main

if __name__ == "__main__":
    sys.exit(main())
