"""``python -m egrsd_pl.compare …`` is ``egrsd compare …``: it hands the process over to the CLI (the
composition root, which gives the comparison its parser), so the package never imports the CLI."""

import os
import sys

if __name__ == "__main__":
    os.execv(sys.executable, [sys.executable, "-m", "egrsd_pl.cli", "compare", *sys.argv[1:]])
