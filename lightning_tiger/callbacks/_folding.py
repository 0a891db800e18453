"""Optimizers that fold gradients into their state during backward (Tiger's ``fold_in_backward=True``)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

__all__ = ["is_folding", "refuse_clipping_with_folding"]


def is_folding(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` folds gradients during backward: its public ``fold_in_backward`` attribute or default
    (Tiger), False for optimizers without one."""
    flag = getattr(optimizer, "fold_in_backward", None)
    if flag is None:
        flag = optimizer.defaults.get("fold_in_backward", False)
    return bool(flag)


def refuse_clipping_with_folding(trainer: pl.Trainer) -> None:
    """Raise if gradient clipping is configured while an optimizer folds gradients during backward.

    Clipping would see ``p.grad is None`` and silently do nothing (no full gradient ever exists in that mode, so
    global-norm clipping is impossible), so the lightning_tiger callbacks refuse it in ``on_fit_start``.

    Raises:
        ValueError: ``trainer.gradient_clip_val`` is set and an optimizer folds gradients.
    """
    folding = [opt for opt in trainer.optimizers if is_folding(opt)]
    if folding and trainer.gradient_clip_val:
        raise ValueError(
            "gradient_clip_val must be None or 0 with an optimizer that folds gradients during backward "
            f"({type(folding[0]).__name__}(fold_in_backward=True)): clipping cannot see folded gradients. "
            f"Got gradient_clip_val={trainer.gradient_clip_val}."
        )
