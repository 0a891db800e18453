"""Lightning's step index for metrics, shared by the lightning_tiger callbacks that log."""

from __future__ import annotations

import lightning.pytorch as pl

__all__ = ["log_step", "should_update_logs"]


def log_step(trainer: pl.Trainer) -> int:
    """The step value Lightning's own loggers use for metrics logged during this batch (optimizer steps taken)."""
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:  # pragma: no cover - Lightning internals moved
        return int(trainer.global_step)


def should_update_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning logs metrics on this batch (its ``log_every_n_steps`` rule)."""
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:  # pragma: no cover - Lightning internals moved
        n = trainer.log_every_n_steps
        return n > 0 and (trainer.global_step + 1) % n == 0
