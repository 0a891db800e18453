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

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import pickle
import re
import sys
import time
import traceback
import warnings
from argparse import ArgumentError, RawDescriptionHelpFormatter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeUnion, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.trainer.states import TrainerStatus
from omegaconf.errors import OmegaConfBaseException
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_tiger import callbacks, data, modules, optim, plugins
from lightning_tiger.optim import PiecewiseLinearLR
from lightning_tiger.plugins import CorruptCheckpointError, verify_checkpoint

__all__ = [
    "ConfigConflictWarning",
    "ConfigError",
    "TigerCLI",
    "TigerSaveConfigCallback",
    "console_main",
    "explain_config_error",
    "library_classes",
    "main",
]

log = logging.getLogger(__name__)

SUBCOMMANDS = ("fit", "validate", "test", "predict")
COMMAND_LINE = "<command line>"


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
    """The library's public classes by kind, read from each subpackage's ``__all__``.

    Importing them is what lets jsonargparse resolve short names (``--optimizer Tiger``): it looks a short name up
    among the *imported* subclasses of the expected base class.

    Returns:
        ``{"optimizers (--optimizer)": [Tiger, Lion], ...}``.
    """
    found: dict[str, list[type]] = {}
    for kind, base, packages in _KINDS:
        classes = []
        for package in packages:
            for name in package.__all__:
                try:
                    obj = getattr(package, name)
                except ImportError:  # a class whose optional dependency is absent: still usable by full path
                    continue
                if isinstance(obj, type) and issubclass(obj, base):
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


# ---------------------------------------------------------------------------------------------- error reports
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


class ConfigConflictWarning(UserWarning):
    """A configured value that has no effect because another setting replaces the code that would read it."""


def _norm(key: str) -> str:
    """``fit.model.init_args.lr`` -> ``model.lr``: the form in which files and the command line are compared."""
    parts = [p for p in key.split(".") if p and p != "init_args"]
    if parts and parts[0] in SUBCOMMANDS:
        parts = parts[1:]
    return ".".join(parts)


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}{key}.")
    elif prefix:
        key = prefix[:-1]
        # `optimizer: Tiger` chooses the class, as `optimizer: {class_path: Tiger}` does.
        if isinstance(node, str) and "." not in key and key in ("model", "data", "optimizer", "lr_scheduler"):
            key += ".class_path"
        yield key, node


def _sources(argv: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Where settings come from, in merge order: each ``--config`` file and each command-line override.

    Returns:
        ``[(file or "<command line>", {dotted key as written: value})]``.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, value = None, None
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif arg.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg.lstrip("-"), argv[i + 1]
            i += 1
        elif arg.startswith("--"):
            key, value = arg[2:], True
        i += 1
        if key in ("config", "c"):
            try:
                loaded = yaml.safe_load(Path(str(value)).read_text()) or {}
            except (OSError, yaml.YAMLError):
                loaded = {}
            out.append((str(value), dict(_flatten(loaded if isinstance(loaded, dict) else {}))))
        elif key is not None:
            out.append((COMMAND_LINE, dict(_flatten({key: _yaml_value(value)}))))
    return out


def _yaml_value(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _who_set_index(key: str, sources: list[tuple[str, dict[str, Any]]]) -> int | None:
    """Index in ``sources`` of the setting of ``key`` in effect (merges are last-wins), or ``None`` (a default)."""
    wanted = _norm(key)
    hits = [i for i, (_, flat) in enumerate(sources) if any(_norm(k) == wanted for k in flat)]
    return hits[-1] if hits else None


def _who_set(key: str, sources: list[tuple[str, dict[str, Any]]]) -> str | None:
    """The source whose setting of ``key`` is in effect (merges are last-wins), or ``None`` (a default)."""
    index = _who_set_index(key, sources)
    return None if index is None else sources[index][0]


def _import_class(class_path: str | None) -> type | None:
    if not class_path or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def _parameters_of(class_path: str | None) -> list[inspect.Parameter]:
    cls = _import_class(class_path)
    if cls is None:
        return []
    try:
        return [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    except (ValueError, TypeError):
        return []


def _signature_of(class_path: str | None) -> str:
    params = _parameters_of(class_path)
    return f"{class_path.rpartition('.')[2]}({', '.join(str(p) for p in params)})" if params and class_path else ""


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _raising_section(exc: BaseException, candidates: dict[str, str]) -> str | None:
    """The config key of the class whose constructor raised ``exc``, read from the traceback.

    The innermost ``__init__`` frame whose ``self`` is an instance of a configured class identifies it: an
    optimizer's ``lr`` check is blamed on ``optimizer`` even when the model also has an ``lr`` parameter.
    """
    classes = [(key, cls) for key, path in candidates.items() if (cls := _import_class(path)) is not None]
    found = None
    for link in _exception_chain(exc):
        for frame, _ in traceback.walk_tb(link.__traceback__):
            owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
            if owner is None:
                continue
            exact = [key for key, cls in classes if type(owner) is cls]
            matches = exact or [key for key, cls in classes if isinstance(owner, cls)]
            if matches:
                found = matches[0]
        if found is not None:
            return found
    return None


# jsonargparse's union bookkeeping lines, which are not the problem itself.
_BOOKKEEPING = r"Parser key|Does not validate|Subtypes:|Errors:|Given value|NoneType|class_path '"


def explain_config_error(
    exc: BaseException, argv: list[str], candidates: dict[str, str] | None = None
) -> ConfigError:
    """Turn a jsonargparse / constructor error into a short message naming file, key and accepted values.

    Args:
        exc: what parsing or instantiation raised.
        argv: the command-line arguments (to find the ``--config`` files and command-line overrides).
        candidates: config key -> class_path of the classes that were being instantiated (``{"model":
            "pkg.Model", "model.init_args.net": "pkg.Net", "optimizer": "torch.optim.AdamW"}``); the one whose
            constructor raised is found in the traceback, the parameter from the message.

    Returns:
        A :class:`ConfigError` whose message reads ``file: key: problem`` followed by what is accepted.
    """
    sources = _sources(argv)
    text = str(exc)
    missing = re.search(r"Missing mandatory value: ([\w.]+)", text)
    if missing:  # a `???` in a config file that nobody filled in
        key = re.sub(r"^(fit|validate|test|predict)\.", "", missing.group(1))
        where = _who_set(key, sources)
        files = [where] if where else [name for name, _ in sources if name != COMMAND_LINE]
        message = f"{', '.join(files) or '<config>'}: {key}: required value missing (`???`); set it with --{key}=..."
        return ConfigError(message, key=key, files=files)
    unrecognized = re.search(r"unrecognized arguments: (\S+)", text)
    if unrecognized:  # argparse's own report; prefixes are off, so `--trainer.max_step` lands here
        key = unrecognized.group(1).lstrip("-").split("=", 1)[0]
        section, _, leaf = key.rpartition(".")
        known = [p.name for p in _parameters_of(f"{Trainer.__module__}.{Trainer.__qualname__}")] \
            if section == "trainer" else []
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"; did you mean {section}.{close[0]}?" if close else ""
        message = f"{COMMAND_LINE}: {key}: unknown option (prefixes of option names are not accepted){hint}"
        return ConfigError(message, key=key, files=[COMMAND_LINE])
    keys = [re.sub(r"^(fit|validate|test|predict)\.", "", k) for k in re.findall(r'Parser key "([^"]+)"', text)]
    class_paths = re.findall(r"class_path '([^']+)'", text)
    unknown = re.search(r"(?:Option|Key) '([^']+)' is not accepted", text) or re.search(
        r"No action for key \"?([\w.]+)\"?", text
    )
    problem_lines = [
        line.strip(" -") for line in text.splitlines() if line.strip() and not re.search(_BOOKKEEPING, line)
    ]
    problem = problem_lines[0] if problem_lines else text.splitlines()[0] if text else type(exc).__name__
    leaf = unknown.group(1) if unknown else (keys[-1] if len(keys) > 1 else None)
    section = keys[0] if keys else None
    if section is None and candidates:  # a constructor's own ValueError/TypeError
        section = _raising_section(exc, candidates)
        if section is not None:
            class_paths = [candidates[section]]
            params = [p.name for p in _parameters_of(candidates[section]) if p.kind not in (p.VAR_POSITIONAL,
                                                                                            p.VAR_KEYWORD)]
            leaf = next((p for p in params if re.search(rf"\b{re.escape(p)}\b", problem)), None)
    if section is not None and "." in section and leaf is None and not class_paths:
        section, leaf = section.rpartition(".")[0], section.rpartition(".")[2]  # a plain key such as trainer.x
    key = ".".join(k for k in [section, "init_args" if class_paths and leaf else None, leaf] if k)
    where = (_who_set(key, sources) if key else None) or (
        _who_set(f"{section}.class_path", sources) if section else None
    )
    files = [where] if where else []
    lines = [f"{where or '<defaults>'}: {key or '<config>'}: {problem}"]
    accepted = _signature_of(class_paths[-1] if class_paths else None)
    if accepted:
        lines.append(f"  accepted: {accepted}")
    lines.append("  (run with --help, or `--print_config` to see the merged configuration)")
    return ConfigError("\n".join(lines), key=key or None, files=files)


def _class_candidates(node: Any, prefix: str = "") -> dict[str, str]:
    """Every configured class in a config dict: dotted key (list items by index) -> class_path."""
    found: dict[str, str] = {}
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str) and prefix:
            found[prefix[:-1]] = node["class_path"]
        for key, value in node.items():
            found.update(_class_candidates(value, f"{prefix}{key}."))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.update(_class_candidates(value, f"{prefix}{i}."))
    return found


# ------------------------------------------------------------------------------------------------------ the CLI
def _load_mapped(path: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` memory-mapped: only the parts read (a scheduler's few numbers) are
    paged in, not every tensor of the checkpoint. mmap needs torch.save's zip format (torch >= 1.6); an older
    (legacy) file is loaded the plain way."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


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
        with warnings.catch_warnings():
            # `--optimizer` replacing a module's own configure_optimizers is this CLI's documented behaviour;
            # the model arguments it makes dead are reported by `_check_dead_model_arguments` instead.
            warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by `TigerCLI")
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
        sources = _sources(self._argv)
        # Only fit builds the optimizer and its scheduler: validate/test/predict may run with any max_steps.
        fitting = subcommand in (None, "fit")
        if fitting:
            self._check_max_steps_interpolation(plain, sources)
        self._check_dead_model_arguments(plain, sources)
        ckpt_path = plain.get("ckpt_path")
        if ckpt_path and Path(str(ckpt_path)).is_file():
            # LightningCLI reads the checkpoint's hyperparameters with torch.load right after parsing, before any
            # CheckpointIO plugin sees it: verify first so that damage gets a clear report.
            verify_checkpoint(ckpt_path)
            if fitting:
                self._check_resumed_schedule(plain, str(ckpt_path), sources)

    @staticmethod
    def _check_resumed_schedule(config: dict[str, Any], ckpt_path: str, sources: list[tuple[str, dict[str, Any]]]
                                ) -> None:
        """Refuse a resume whose scheduler settings differ from the checkpoint's when they would be overwritten.

        torch's schedulers restore every attribute from the checkpoint (``total_iters``, ``T_max``, ...), so a
        ``total_iters: ${trainer.max_steps}`` resumed with a larger ``max_steps`` would silently keep the old
        value while the saved config shows the new one. PiecewiseLinearLR keeps the new knots (and says so).
        """
        scheduler = config.get("lr_scheduler")
        if not isinstance(scheduler, dict) or not scheduler.get("class_path"):
            return
        cls = _import_class(scheduler["class_path"])
        if cls is None or issubclass(cls, PiecewiseLinearLR):
            return
        try:
            states = _load_mapped(ckpt_path).get("lr_schedulers") or []
        except pickle.UnpicklingError:  # objects beyond weights_only's allow-list: LightningCLI reports it next
            return
        if len(states) != 1:
            return
        saved = states[0]
        for name, value in (scheduler.get("init_args") or {}).items():
            if name in ("last_epoch", "verbose", "optimizer") or name not in saved:
                continue
            old = saved[name]
            if (list(old) if isinstance(old, (list, tuple)) else old) != (
                list(value) if isinstance(value, (list, tuple)) else value
            ):
                where = _who_set(f"lr_scheduler.init_args.{name}", sources) or "<defaults>"
                raise ConfigError(
                    f"{where}: lr_scheduler.init_args.{name}: {value!r} now, {old!r} in the checkpoint {ckpt_path}; "
                    f"{cls.__name__} restores it from the checkpoint, so the resumed run would silently keep "
                    f"{old!r}. Resume with the same value (e.g. the same --trainer.max_steps), or use "
                    f"lightning_tiger.optim.PiecewiseLinearLR, whose knots follow the config on resume.",
                    key=f"lr_scheduler.init_args.{name}",
                    files=[where],
                )

    @staticmethod
    def _check_max_steps_interpolation(config: dict[str, Any], sources: list[tuple[str, dict[str, Any]]]) -> None:
        max_steps = (config.get("trainer") or {}).get("max_steps")
        if max_steps is not None and max_steps >= 0:
            return
        users = [(name, key) for name, flat in sources for key, value in flat.items()
                 if re.search(r"\$\{[^}]*trainer\.max_steps", str(value))]
        if users:
            name, key = users[-1]
            raise ConfigError(
                f"{name}: {key}: interpolates ${{trainer.max_steps}}, but trainer.max_steps is not set ({max_steps}, "
                f"Lightning's 'no step limit'), so the schedule cannot be derived from it; add a trainer profile "
                f"(--config examples/configs/trainer/cpu.yaml) or --trainer.max_steps=N",
                key=key,
                files=[name],
            )

    @staticmethod
    def _check_dead_model_arguments(config: dict[str, Any], sources: list[tuple[str, dict[str, Any]]]) -> None:
        """``--optimizer`` replaces the model's configure_optimizers: its optimizer arguments then do nothing.

        Reported by who set the dead value: the command line is refused (a ConfigError: the user just typed it);
        a file that sets it after (or together with) the optimizer choice gets a :class:`ConfigConflictWarning`;
        a file read *before* the optimizer's source (a task file's ``lr`` for the module's own optimizer, then an
        ``--config optim/...`` file) is the documented way to compose runs, so it is only logged at INFO.
        """
        optimizer, model = config.get("optimizer"), config.get("model")
        if not isinstance(optimizer, dict) or not isinstance(model, dict) or not optimizer.get("class_path"):
            return
        opt_args, model_args = optimizer.get("init_args") or {}, model.get("init_args") or {}
        model_params = {p.name for p in _parameters_of(model.get("class_path"))}
        opt_params = {p.name: p for p in _parameters_of(optimizer["class_path"])}
        opt_index = _who_set_index("optimizer.class_path", sources)
        opt_from = "<defaults>" if opt_index is None else sources[opt_index][0]
        model_name = str(model.get("class_path")).rpartition(".")[2]
        opt_name = str(optimizer["class_path"]).rpartition(".")[2]
        for name in sorted(model_params & set(opt_params) - {"params"}):
            index = _who_set_index(f"model.init_args.{name}", sources)
            if index is None or name not in model_args:
                continue
            where = sources[index][0]
            default = opt_params[name].default
            effective = opt_args.get(name, None if default is inspect.Parameter.empty else default)
            if model_args[name] == effective:
                continue
            message = (
                f"{where}: model.init_args.{name}={model_args[name]!r} has no effect: the optimizer {opt_name} "
                f"(--optimizer, from {opt_from}) replaces {model_name}.configure_optimizers and runs with "
                f"{name}={effective!r}. Set --optimizer.{name}={model_args[name]!r} instead, or leave out the "
                f"optimizer config to use the module's own optimizer."
            )
            if where == COMMAND_LINE:
                raise ConfigError(message, key=f"model.init_args.{name}", files=[where])
            if opt_index is not None and opt_index > index:  # an optimizer config composed after a task file
                log.info("lightning-tiger: %s", message)
                continue
            warnings.warn(message, ConfigConflictWarning, stacklevel=2)

    def instantiate_classes(self) -> None:
        """Instantiate, turning constructors' ValueError/TypeError into a :class:`ConfigError`."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ArgumentError) as exc:
            config = self.config.get(str(self.subcommand), self.config)
            plain = config.as_dict() if hasattr(config, "as_dict") else {}
            candidates = _class_candidates(plain)
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


if __name__ == "__main__":  # pragma: no cover
    console_main()
