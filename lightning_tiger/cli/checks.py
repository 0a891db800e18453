"""What parses but cannot work: checks that ``lightning-tiger`` runs on the parsed configuration before anything is
built (a schedule interpolating an unset ``max_steps``, model arguments that ``--optimizer`` makes dead, scheduler
settings a resumed checkpoint would silently overwrite)."""

from __future__ import annotations

import inspect
import logging
import pickle
import re
import warnings
from typing import Any

import torch

from lightning_tiger.optim import PiecewiseLinearLR

from .errors import ConfigConflictWarning, ConfigError
from .sources import COMMAND_LINE, Sources, import_class, parameters_of, who_set, who_set_index

__all__ = ["check_dead_model_arguments", "check_max_steps_interpolation", "check_resumed_schedule"]

log = logging.getLogger(__name__)


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


def check_resumed_schedule(config: dict[str, Any], ckpt_path: str, sources: Sources
                            ) -> None:
    """Refuse a resume whose scheduler settings differ from the checkpoint's when they would be overwritten.

    torch's schedulers restore every attribute from the checkpoint (``total_iters``, ``T_max``, ...), so a
    ``total_iters: ${trainer.max_steps}`` resumed with a larger ``max_steps`` would silently keep the old
    value while the saved config shows the new one. PiecewiseLinearLR keeps the new knots (and says so).
    """
    scheduler = config.get("lr_scheduler")
    if not isinstance(scheduler, dict) or not scheduler.get("class_path"):
        return
    cls = import_class(scheduler["class_path"])
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
            where = who_set(f"lr_scheduler.init_args.{name}", sources) or "<defaults>"
            raise ConfigError(
                f"{where}: lr_scheduler.init_args.{name}: {value!r} now, {old!r} in the checkpoint {ckpt_path}; "
                f"{cls.__name__} restores it from the checkpoint, so the resumed run would silently keep "
                f"{old!r}. Resume with the same value (e.g. the same --trainer.max_steps), or use "
                f"lightning_tiger.optim.PiecewiseLinearLR, whose knots follow the config on resume.",
                key=f"lr_scheduler.init_args.{name}",
                files=[where],
            )

def check_max_steps_interpolation(config: dict[str, Any], sources: Sources) -> None:
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

def check_dead_model_arguments(config: dict[str, Any], sources: Sources) -> None:
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
    model_params = {p.name for p in parameters_of(model.get("class_path"))}
    opt_params = {p.name: p for p in parameters_of(optimizer["class_path"])}
    opt_index = who_set_index("optimizer.class_path", sources)
    opt_from = "<defaults>" if opt_index is None else sources[opt_index][0]
    model_name = str(model.get("class_path")).rpartition(".")[2]
    opt_name = str(optimizer["class_path"]).rpartition(".")[2]
    for name in sorted(model_params & set(opt_params) - {"params"}):
        index = who_set_index(f"model.init_args.{name}", sources)
        if index is None or name not in model_args:
            continue
        where = sources[index][0]
        default = opt_params[name].default
        effective = opt_args.get(name, None if default is inspect.Parameter.empty else default)
        if model_args[name] == effective:
            continue
        _report_dead(
            f"{where}: model.init_args.{name}={model_args[name]!r} has no effect: the optimizer {opt_name} "
            f"(--optimizer, from {opt_from}) replaces {model_name}.configure_optimizers and runs with "
            f"{name}={effective!r}. Set --optimizer.{name}={model_args[name]!r} instead, or leave out the "
            f"optimizer config to use the module's own optimizer.",
            name, where, index, opt_index,
        )
    # The library's modules read their own optimizer / lr_scheduler callables and the default schedule's
    # warmup_steps in configure_optimizers, which --optimizer replaces.
    for name in sorted(model_params & {"optimizer", "lr_scheduler", "warmup_steps"}):
        index = who_set_index(f"model.init_args.{name}", sources)
        if index is None or model_args.get(name) is None:
            continue
        where = sources[index][0]
        _report_dead(
            f"{where}: model.init_args.{name} has no effect: the optimizer {opt_name} (--optimizer, from "
            f"{opt_from}) replaces {model_name}.configure_optimizers, which is what reads it; leave out the "
            f"optimizer config to use the module's own.",
            name, where, index, opt_index,
        )


def _report_dead(message: str, name: str, where: str, index: int, opt_index: int | None) -> None:
    """Refuse a dead setting typed on the command line, log one composed before the optimizer config, else warn."""
    if where == COMMAND_LINE:
        raise ConfigError(message, key=f"model.init_args.{name}", files=[where])
    if opt_index is not None and opt_index > index:  # an optimizer config composed after a task file
        log.info("lightning-tiger: %s", message)
        return
    warnings.warn(message, ConfigConflictWarning, stacklevel=3)
