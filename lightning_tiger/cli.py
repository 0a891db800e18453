"""The ``lightning-tiger`` command: LightningCLI with OmegaConf interpolation and composable configs.

Runs compose from small YAML files, merged last-wins::

    lightning-tiger fit --config examples/configs/flow/moons.yaml \\
        --config examples/configs/optim/tiger.yaml --config examples/configs/trainer/cpu-quick.yaml

What this adds to :class:`lightning.pytorch.cli.LightningCLI`:

- ``parser_mode="omegaconf+"``: ``${...}`` interpolations resolve *after* every ``--config`` file and every
  command-line override are merged (absolute paths such as ``${trainer.max_steps}`` allowed), so overriding
  ``--trainer.max_steps`` also moves a schedule that interpolates it. Resolvers ``mul``, ``int`` and ``add``
  allow arithmetic (``${int:${mul:${trainer.max_steps},0.05}}``).
- Any LightningModule / LightningDataModule selectable by ``class_path``; any optimizer and scheduler
  by ``--optimizer`` / ``--lr_scheduler`` (or the top-level ``optimizer:`` / ``lr_scheduler:`` keys).
  LightningCLI builds the optimizer from ``model.parameters()``; optimizers with an ``assign_kinds(module)``
  method (:class:`~lightning_tiger.optim.Tiger`) then re-classify those parameters by module type, so
  Tiger's per-kind rules (embedding rows, norm scales) hold from the CLI too. Schedulers step every
  optimizer step (``interval="step"``), not every epoch: our schedules are written in steps.
- TensorBoard is the default logger (Lightning's default when tensorboard is installed, which it is: a
  dependency); our modules log ``hp_metric`` with their main validation metric; the resolved config is
  saved to ``<log_dir>/config.yaml`` (overwritten on resume) and logged as text to TensorBoard.
- After ``fit`` it prints where the logs, checkpoints and sample pictures are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeUnion, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = ["TigerCLI", "TigerSaveConfigCallback", "main"]


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    resolvers = {
        "mul": lambda a, b: float(a) * float(b),
        "add": lambda a, b: float(a) + float(b),
        "int": lambda a: round(float(a)),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


class TigerSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config to the log dir (Lightning's behaviour) and logs it as TensorBoard text."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, TensorBoardLogger):
            text = self.parser.dump(self.config, skip_none=False)
            # Markdown code block keeps the YAML indentation readable in TensorBoard's text tab.
            trainer.logger.experiment.add_text("config", "```yaml\n" + text + "\n```", global_step=0)


class TigerCLI(LightningCLI):
    """LightningCLI configured for lightning_tiger (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _register_resolvers()
        from jsonargparse import set_parsing_settings

        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        kwargs.setdefault("save_config_callback", TigerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    @staticmethod
    def configure_optimizers(
        lightning_module: LightningModule,
        optimizer: Optimizer,
        lr_scheduler: LRSchedulerTypeUnion | None = None,
    ) -> Any:
        """Attach per-kind parameter rules and step schedulers per optimizer step.

        Args:
            lightning_module: the model whose ``parameters()`` built ``optimizer``.
            optimizer: the optimizer from ``--optimizer``.
            lr_scheduler: the scheduler from ``--lr_scheduler`` (optional).

        Returns:
            What :meth:`LightningModule.configure_optimizers` returns.
        """
        assign_kinds = getattr(optimizer, "assign_kinds", None)
        if callable(assign_kinds):
            assign_kinds(lightning_module)
        if lr_scheduler is None:
            return optimizer
        if isinstance(lr_scheduler, ReduceLROnPlateau):
            scheduler = {"scheduler": lr_scheduler, "monitor": lr_scheduler.monitor}
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def after_fit(self) -> None:
        """Tell the user where to look."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        log_dir = trainer.log_dir
        lines = ["", "Run finished." if not trainer.interrupted else "Run interrupted."]
        if log_dir:
            lines.append(f"  logs and config: {log_dir}")
            lines.append(f"  view them:       tensorboard --logdir {Path(log_dir).parent}")
            pictures = sorted(Path(log_dir).rglob("*.png"), key=os.path.getmtime)
            if pictures:
                lines.append(f"  latest samples:  {pictures[-1]}")
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        if ckpt:
            lines.append(f"  checkpoint:      {ckpt}  (resume: lightning-tiger fit ... --ckpt_path {ckpt})")
        print("\n".join(lines), file=sys.stderr)


def main(args: list[str] | None = None) -> TigerCLI:
    """Entry point of ``lightning-tiger`` and ``python -m lightning_tiger``.

    Args:
        args: command-line arguments (``sys.argv[1:]`` when None), e.g.
            ``["fit", "--config", "examples/configs/flow/moons.yaml"]``.

    Returns:
        The CLI object (its ``trainer``, ``model`` and ``datamodule`` are useful in tests and notebooks).
    """
    return TigerCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
