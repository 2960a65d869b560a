"""``python main.py fit --config configs/egrsd.yaml`` — see README.md and ``python main.py fit --help``."""

from egrsd_pl.cli import main

if __name__ == "__main__":
    main()
