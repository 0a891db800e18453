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
  by ``--optimizer`` / ``--lr_scheduler`` (or the top-level ``optimizer:`` / ``lr_scheduler:`` keys). The
  library's own classes are imported up front, so their short names work (``--optimizer Tiger``,
  ``--model RectifiedFlowModule``) and ``lightning-tiger --help`` lists them.
  LightningCLI builds the optimizer from ``model.parameters()``; optimizers with an ``assign_kinds(module)``
  method (:class:`~lightning_tiger.optim.Tiger`) then re-classify those parameters by module type, so
  Tiger's per-kind rules (embedding rows, norm scales) hold from the CLI too. Schedulers step every
  optimizer step (``interval="step"``), not every epoch: our schedules are written in steps.
- Mistakes are named where they were made: ``file: key: problem`` plus the signature of the class at fault
  (found from the constructor that raised, not guessed from the message), for files and the command line
  alike; option prefixes are not accepted (``--trainer.max_step`` is an error, not ``max_steps``); a model
  argument that ``--optimizer`` makes dead (``--model.init_args.lr`` beside an optimizer config) is an error on
  the command line, a :class:`ConfigConflictWarning` from a file read with or after the optimizer's, and an INFO
  log line from a file read before it (a task file's ``lr`` for its own optimizer, then an optim config); a
  schedule interpolating an unset ``trainer.max_steps`` is refused by ``fit`` before anything is built; a damaged
  ``--ckpt_path`` is refused with the checkpoints beside it that verify
  (:func:`~lightning_tiger.plugins.verify_checkpoint`).
- TensorBoard is the default logger (Lightning's default when tensorboard is installed, which it is: a
  dependency); our modules log ``hp_metric`` with their main validation metric; the resolved config is
  saved to ``<log_dir>/config.yaml`` (overwritten on resume) and logged as text to TensorBoard.
- After ``fit`` (finished, interrupted with Ctrl-C, or failed) it prints where the logs and sample pictures are
  and the checkpoint that this run wrote (or that it wrote none).
"""

from .errors import ConfigConflictWarning, ConfigError, explain_config_error
from .tiger_cli import (
    TigerCLI,
    TigerSaveConfigCallback,
    console_main,
    library_classes,
    main,
    register_resolvers,
)

__all__ = [
    "ConfigConflictWarning",
    "ConfigError",
    "TigerCLI",
    "TigerSaveConfigCallback",
    "console_main",
    "explain_config_error",
    "library_classes",
    "main",
    "register_resolvers",
]
