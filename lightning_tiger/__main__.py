"""``python -m lightning_tiger`` = the ``lightning-tiger`` command."""

from lightning_tiger.cli import console_main

if __name__ == "__main__":
    console_main()
