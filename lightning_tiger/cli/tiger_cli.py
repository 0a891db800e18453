"""The ``lightning-tiger`` command: :class:`TigerCLI` (LightningCLI configured for lightning_tiger) and its entry
points."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
import warnings
from argparse import ArgumentError, RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any

from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeUnion, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.trainer.states import TrainerStatus
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_tiger import callbacks, data, modules, optim, plugins
from lightning_tiger.plugins import CorruptCheckpointError, verify_checkpoint

from .checks import check_dead_model_arguments, check_max_steps_interpolation, check_resumed_schedule
from .errors import ConfigError, explain_config_error
from .sources import class_candidates, config_sources

__all__ = ["TigerCLI", "TigerSaveConfigCallback", "console_main", "library_classes", "main", "register_resolvers"]

log = logging.getLogger(__name__)

def register_resolvers() -> None:
    """Register the OmegaConf resolvers our configs use (``mul``, ``add``, ``int``); idempotent.

    ``TigerCLI`` calls it; a script that loads our YAML files with OmegaConf itself calls it before resolving.
    """
    resolvers = {
        "mul": lambda a, b: float(a) * float(b),
        "add": lambda a, b: float(a) + float(b),
        "int": lambda a: round(float(a)),
    }
    # omegaconf >= 2.4 renamed register_new_resolver (now deprecated) to register_resolver.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            register(name, fn)


# --------------------------------------------------------------------------------------------- library listing
_KINDS: tuple[tuple[str, type, tuple[Any, ...]], ...] = (
    ("optimizers (--optimizer)", Optimizer, (optim,)),
    ("lr schedulers (--lr_scheduler)", LRScheduler, (optim,)),
    ("modules (--model)", LightningModule, (modules,)),
    ("data modules (--data)", LightningDataModule, (data,)),
    ("callbacks (trainer.callbacks)", Callback, (callbacks, plugins)),
    ("checkpoint I/O (trainer.plugins)", CheckpointIO, (plugins,)),
)


def library_classes() -> dict[str, list[type]]:
    """The library's public classes by kind: the classes each subpackage's ``__init__`` re-exports.

    Importing them is what lets jsonargparse resolve short names (``--optimizer Tiger``): it looks a short name up
    among the *imported* subclasses of the expected base class.

    Returns:
        ``{"optimizers (--optimizer)": [Tiger, Lion], ...}``.
    """
    found: dict[str, list[type]] = {}
    for kind, base, packages in _KINDS:
        classes = []
        for package in packages:
            for name, obj in vars(package).items():
                if not name.startswith("_") and isinstance(obj, type) and issubclass(obj, base):
                    classes.append(obj)
        found[kind] = classes
    return found


def _library_help() -> str:
    width = max(len(kind) for kind, _, _ in _KINDS) + 2
    lines = [
        "LightningCLI for lightning_tiger. Compose a run from YAML files (--config, later files and then the",
        "command line win); see examples/configs/{flow,diffusion,lm,optim,trainer}/.",
        "",
        "The library's classes (short names work: --optimizer Tiger, --model RectifiedFlowModule):",
    ]
    for kind, classes in library_classes().items():
        lines.append(f"  {kind + ':':<{width}}{', '.join(c.__name__ for c in classes)}")
    lines.append("A class's arguments: lightning-tiger fit --model.help RectifiedFlowModule (--optimizer.help Tiger)")
    return "\n".join(lines)


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the description's line breaks (argparse's public mixin)."""


# ------------------------------------------------------------------------------------------------------ the CLI
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
        register_resolvers()
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        parser_kwargs.setdefault("exit_on_error", False)  # main() explains the error instead
        # `--trainer.max_step` must be an error, not a silent `max_steps` (jsonargparse copies this setting to
        # the subcommand parsers).
        parser_kwargs.setdefault("allow_abbrev", False)
        parser_kwargs.setdefault("description", _library_help())
        parser_kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("save_config_callback", TigerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        # The arguments as given (sys.argv when none): error reports name the --config file or the command line
        # that set a key, from a terminal as from Python.
        given = inspect.signature(LightningCLI.__init__).bind_partial(self, *args, **kwargs).arguments.get("args")
        self._argv = [str(a) for a in (sys.argv[1:] if given is None else given)] if isinstance(given, (list, tuple,
                                                                                                   type(None))) else []
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, turning jsonargparse's errors into a :class:`ConfigError` naming file and key, then check
        what parses but cannot work (dead model arguments, an unset ``max_steps`` under a schedule, a damaged
        ``--ckpt_path``)."""
        try:
            super().parse_arguments(parser, args)
        except (ArgumentError, OmegaConfBaseException) as exc:
            raise explain_config_error(exc, self._argv) from exc
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand, self.config) if subcommand else self.config
        plain = config.as_dict() if hasattr(config, "as_dict") else dict(config)
        sources = config_sources(self._argv)
        # Only fit builds the optimizer and its scheduler: validate/test/predict may run with any max_steps.
        fitting = subcommand in (None, "fit")
        if fitting:
            check_max_steps_interpolation(plain, sources)
        check_dead_model_arguments(plain, sources)
        ckpt_path = plain.get("ckpt_path")
        if ckpt_path and Path(str(ckpt_path)).is_file():
            # LightningCLI reads the checkpoint's hyperparameters with torch.load right after parsing, before any
            # CheckpointIO plugin sees it: verify first so that damage gets a clear report.
            verify_checkpoint(ckpt_path)
            if fitting:
                check_resumed_schedule(plain, str(ckpt_path), sources)

    def instantiate_classes(self) -> None:
        """Instantiate, turning constructors' ValueError/TypeError into a :class:`ConfigError`."""
        try:
            with warnings.catch_warnings():  # restores the process's filters on exit
                # `--optimizer` replacing a module's own configure_optimizers is this CLI's documented behaviour
                # (LightningCLI warns while instantiating); the model arguments it makes dead are reported by
                # `check_dead_model_arguments` instead.
                warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by `TigerCLI")
                super().instantiate_classes()
        except (ValueError, TypeError, ArgumentError) as exc:
            config = self.config.get(str(self.subcommand), self.config)
            plain = config.as_dict() if hasattr(config, "as_dict") else {}
            candidates = class_candidates(plain)
            candidates.setdefault("trainer", f"{Trainer.__module__}.{Trainer.__qualname__}")
            raise explain_config_error(exc, self._argv, candidates) from exc

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

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        """``trainer.fit``, then (also after Ctrl-C or an error) tell the user where to look.

        Args:
            model: the model to fit.
            **kwargs: ``datamodule``, ``ckpt_path``, ... as for :meth:`lightning.pytorch.Trainer.fit`.
        """
        started = time.time()
        outcome = "failed"
        try:
            self.trainer.fit(model, **kwargs)
            outcome = "interrupted" if self.trainer.state.status == TrainerStatus.INTERRUPTED else "finished"
        except SystemExit:  # Lightning's answer to Ctrl-C: on_exception hooks ran, then sys.exit(1)
            outcome = "interrupted"
            raise
        finally:
            if self.trainer.is_global_zero:
                # a failure of the summary itself (a vanished log dir, ...) must not replace the run's own outcome
                try:
                    print(self._summary(outcome, started), file=sys.stderr)
                except Exception as err:
                    log.warning("lightning-tiger: could not print the run summary (%s: %s)", type(err).__name__, err)

    def _summary(self, outcome: str, started: float) -> str:
        trainer = self.trainer
        lines = ["", f"Run {outcome}."]
        log_dir = trainer.log_dir
        if log_dir:
            lines.append(f"  logs and config: {log_dir}")
            lines.append(f"  view them:       tensorboard --logdir {Path(log_dir).parent}")
            pictures = sorted(Path(log_dir).glob("samples/*.png"), key=os.path.getmtime)
            if pictures:
                lines.append(f"  latest samples:  {pictures[-1]}")
        written = self.checkpoints_written(since=started)
        if written:
            ckpt = written[0]
            lines.append(f"  checkpoint:      {ckpt}  (resume: lightning-tiger fit ... --ckpt_path {ckpt})")
        else:
            lines.append("  checkpoint:      none written by this run (add lightning_tiger.plugins.LastCheckpoint "
                         "to trainer.callbacks to keep last.ckpt)")
        return "\n".join(lines)

    def checkpoints_written(self, since: float) -> list[str]:
        """Checkpoints of the trainer's ModelCheckpoint callbacks written at or after ``since`` (a
        ``time.time()``), ``last.ckpt`` first. A resumed run restores the callbacks' paths from the checkpoint, so
        a path alone does not say that this run wrote it; the file's modification time does."""
        found: list[str] = []
        for callback in self.trainer.checkpoint_callbacks:
            for attr in ("last_model_path", "best_model_path"):
                path = getattr(callback, attr, "")
                # 1 s slack: file systems with coarse modification times.
                if path and os.path.isfile(path) and os.path.getmtime(path) >= since - 1 and path not in found:
                    found.append(path)
        return found


def main(args: list[str] | None = None) -> TigerCLI:
    """Entry point of ``lightning-tiger`` and ``python -m lightning_tiger``.

    Args:
        args: command-line arguments (``sys.argv[1:]`` when None), e.g.
            ``["fit", "--config", "examples/configs/flow/moons.yaml"]``.

    Returns:
        The CLI object (its ``trainer``, ``model`` and ``datamodule`` are useful in tests and notebooks).

    Raises:
        SystemExit: status 2 after printing a configuration error or a damaged checkpoint's report.
    """
    try:
        return TigerCLI(args=args)
    except ConfigError as exc:
        print(f"lightning-tiger: configuration error\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except CorruptCheckpointError as exc:
        print(f"lightning-tiger: damaged checkpoint\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def console_main() -> None:
    """The ``lightning-tiger`` console script: :func:`main` without a return value (exit status 0)."""
    main()
