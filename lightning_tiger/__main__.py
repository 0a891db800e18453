"""``python -m lightning_tiger`` = the ``lightning-tiger`` command."""

from lightning_tiger.cli import main

if __name__ == "__main__":
    main()
