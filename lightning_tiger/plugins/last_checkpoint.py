"""``last.ckpt`` that always holds the final step: Lightning's ``ModelCheckpoint`` plus one save at train end.

Lightning 2.6's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` with ``save_last=True`` writes
``last.ckpt`` whenever it saves a checkpoint (after validation by default) and, in ``on_train_end``, only when it
has saved *nothing* during the run. A run of 1500 steps that validates every 1000 therefore ends with a
``last.ckpt`` of step 1000 and loses the last 500 steps; so does a resume that validated once before its end.
:class:`LastCheckpoint` keeps every behaviour of ``ModelCheckpoint`` (periodic and top-k saves, and with
``save_on_exception=True`` a save when the run raises or is interrupted with Ctrl-C) and in ``on_train_end``
saves ``last.ckpt`` whenever the final step is not saved yet.

Example::

    trainer = L.Trainer(callbacks=[LastCheckpoint(save_on_exception=True)])
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` is written at train end too.

    Args:
        save_last: as in ``ModelCheckpoint``, but defaults to ``True`` (``"link"`` for a symbolic link).
        save_on_exception: as in ``ModelCheckpoint`` (save when fit raises, Ctrl-C included); default ``True``.
        **kwargs: every other ``ModelCheckpoint`` argument (``dirpath``, ``filename``, ``monitor``,
            ``every_n_train_steps``, ...).
    """

    def __init__(
        self, save_last: bool | Literal["link"] = True, save_on_exception: bool = True, **kwargs: Any
    ) -> None:
        if save_last not in (True, "link"):
            raise ValueError(f"save_last must be True or 'link' (LastCheckpoint exists to keep it), got {save_last!r}")
        super().__init__(save_last=save_last, save_on_exception=save_on_exception, **kwargs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save ``last.ckpt`` unless this step is already saved (ModelCheckpoint's own skip rules apply)."""
        super().on_train_end(trainer, pl_module)
        # `_should_skip_saving_checkpoint` is ModelCheckpoint's own test: fast_dev_run, not fitting, sanity
        # check, or this global step already written. These three are private methods of ModelCheckpoint, written
        # against Lightning 2.6 (2.6.6): ModelCheckpoint has no public way to save `last.ckpt` on demand (its
        # public hooks save only on their own schedule, and `trainer.save_checkpoint` would bypass its naming,
        # `save_last="link"`, top-k bookkeeping and `last_model_path`), so a subclass reuses them. Revisit if a
        # Lightning upgrade renames them (tests/cli/test_checkpoints.py covers this path).
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
