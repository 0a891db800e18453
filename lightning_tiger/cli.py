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

import importlib
import inspect
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeUnion, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf.errors import OmegaConfBaseException
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = ["ConfigError", "TigerCLI", "TigerSaveConfigCallback", "console_main", "explain_config_error", "main"]


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

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


class ConfigError(Exception):
    """A configuration that cannot be parsed or instantiated, explained for humans.

    Attributes:
        key: the dotted config key at fault (``model.init_args.hidden``), or ``None`` when unknown.
        files: the config files that set it (the last one wins), or the command line.
    """

    def __init__(self, message: str, key: str | None = None, files: list[str] | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.files = files or []


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _files_setting(leaf: str, files: list[str], argv: list[str]) -> list[str]:
    """The config file (or the command line) whose setting of ``leaf`` is in effect (merges are last-wins)."""
    pattern = re.compile(rf"(^|[\s{{,])['\"]?{re.escape(leaf)}['\"]?\s*:", re.M)
    hits = []
    for path in files:
        try:
            if pattern.search(Path(path).read_text()):
                hits.append(path)
        except OSError:
            continue
    if any(re.search(rf"[.-]{re.escape(leaf)}(=|$)", a) for a in argv if a.startswith("--")):
        hits.append("<command line>")
    return hits[-1:]


def _parameters_of(class_path: str | None) -> list[inspect.Parameter]:
    if not class_path:
        return []
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _signature_of(class_path: str | None) -> str:
    params = _parameters_of(class_path)
    return f"{class_path.rpartition('.')[2]}({', '.join(str(p) for p in params)})" if params and class_path else ""


# jsonargparse's union bookkeeping lines, which are not the problem itself.
_BOOKKEEPING = r"Parser key|Does not validate|Subtypes:|Errors:|Given value|NoneType|class_path '"


def explain_config_error(
    exc: BaseException, argv: list[str], candidates: dict[str, str] | None = None
) -> ConfigError:
    """Turn a jsonargparse / constructor error into a short message naming file, key and accepted values.

    Args:
        exc: what parsing or instantiation raised.
        argv: the command-line arguments (to find the ``--config`` files).
        candidates: config key -> class_path of the classes that were being instantiated (for errors raised
            by a constructor, whose message names a parameter but not the config key).

    Returns:
        A :class:`ConfigError` whose message reads ``file: key: problem`` followed by what is accepted.
    """
    text = str(exc)
    missing = re.search(r"Missing mandatory value: ([\w.]+)", text)
    if missing:  # a `???` in a config file that nobody filled in
        key = re.sub(r"^(fit|validate|test|predict)\.", "", missing.group(1))
        files = _files_setting(key.rpartition(".")[2], _config_files(argv), argv) or _config_files(argv)
        message = f"{', '.join(files) or '<config>'}: {key}: required value missing (`???`); set it with --{key}=..."
        return ConfigError(message, key=key, files=files)
    keys = re.findall(r'Parser key "([^"]+)"', text)
    class_paths = re.findall(r"class_path '([^']+)'", text)
    unknown = re.search(r"(?:Option|Key) '([^']+)' is not accepted", text) or re.search(
        r"No action for key \"?([\w.]+)\"?", text
    )
    problem_lines = [
        line.strip(" -")
        for line in text.splitlines()
        if line.strip()
        and not re.search(_BOOKKEEPING, line)
    ]
    problem = problem_lines[0] if problem_lines else text.splitlines()[0] if text else type(exc).__name__
    leaf = unknown.group(1) if unknown else (keys[-1] if len(keys) > 1 else None)
    if leaf is None:  # a constructor's own ValueError/TypeError: find the class and the parameter it names
        for section, class_path in (candidates or {}).items():
            params = [p.name for p in _parameters_of(class_path) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            leaf = next((p for p in params if re.search(rf"\b{re.escape(p)}\b", problem)), None)
            if leaf is not None:
                keys, class_paths = [section], [class_path]
                break
    key = ".".join(k for k in [keys[0] if keys else None, "init_args" if class_paths else None, leaf] if k)
    files = _files_setting(leaf, _config_files(argv), argv) if leaf else _config_files(argv)
    where = ", ".join(files) if files else "<defaults>"
    lines = [f"{where}: {key or '<config>'}: {problem}"]
    accepted = _signature_of(class_paths[-1] if class_paths else None)
    if accepted:
        lines.append(f"  accepted: {accepted}")
    lines.append("  (run with --help, or `--print_config` to see the merged configuration)")
    return ConfigError("\n".join(lines), key=key or None, files=files)


class TigerSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config to the log dir (Lightning's behaviour) and logs it as TensorBoard text."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, TensorBoardLogger):
            text = self.parser.dump(self.config, skip_none=False)
            # Markdown code block keeps the YAML indentation readable in TensorBoard's text tab.
            trainer.logger.experiment.add_text("config", "```yaml\n" + text + "\n```", global_step=0)


class TigerCLI(LightningCLI):
    """LightningCLI configured for lightning_tiger (see the module docstring)."""

    _argv: list[str] = []  # noqa: RUF012 - set by main() so errors can name the --config files

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _register_resolvers()
        # `--optimizer` replacing a module's own configure_optimizers is this CLI's documented behaviour.
        warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by `TigerCLI")
        from jsonargparse import set_parsing_settings

        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        parser_kwargs.setdefault("exit_on_error", False)  # main() explains the error instead
        kwargs.setdefault("save_config_callback", TigerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, turning jsonargparse's errors into a :class:`ConfigError` naming file and key."""
        try:
            super().parse_arguments(parser, args)
        except (ArgumentError, OmegaConfBaseException) as exc:
            raise explain_config_error(exc, list(args or [])) from exc

    def instantiate_classes(self) -> None:
        """Instantiate, turning constructors' ValueError/TypeError into a :class:`ConfigError`."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ArgumentError) as exc:
            config = self.config.get(str(self.subcommand), self.config)
            candidates = {
                key: str(config[key].get("class_path"))
                for key in ("model", "data", "optimizer", "lr_scheduler")
                if hasattr(config.get(key), "get") and config[key].get("class_path")
            }
            raise explain_config_error(exc, list(self._argv), candidates) from exc

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
            pictures = sorted(Path(log_dir).glob("samples/*.png"), key=os.path.getmtime)
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
    argv = list(sys.argv[1:] if args is None else args)
    TigerCLI._argv = argv
    try:
        return TigerCLI(args=args)
    except ConfigError as exc:
        print(f"lightning-tiger: configuration error\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def console_main() -> None:
    """The ``lightning-tiger`` console script: :func:`main` without a return value (exit status 0)."""
    main()


if __name__ == "__main__":  # pragma: no cover
    console_main()
