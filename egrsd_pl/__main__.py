"""``python -m egrsd_pl fit --config …``: the ``egrsd`` command without the console script."""

from egrsd_pl.cli import main

if __name__ == "__main__":
    main()
