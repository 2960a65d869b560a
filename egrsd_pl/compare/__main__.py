"""``python -m egrsd_pl.compare …`` is ``egrsd compare …``."""

import sys

from egrsd_pl.compare import main

if __name__ == "__main__":
    sys.exit(main())
