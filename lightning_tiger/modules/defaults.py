"""What the library's LightningModules share: the default optimizer and schedule, the default EMA, and how
their hyperparameters are recorded.

One convention for :class:`~lightning_tiger.modules.CausalLMModule`,
:class:`~lightning_tiger.modules.RectifiedFlowModule` and :class:`~lightning_tiger.modules.ScoreMatchingModule`:

- ``optimizer``: LightningCLI's ``OptimizerCallable`` (``params -> Optimizer``: a class path with init args in a
  config, ``functools.partial(torch.optim.AdamW, lr=1e-3)`` or a lambda in Python). It receives
  :func:`default_param_groups` of the module. ``None`` (default): Tiger (Su 2023, kexue.fm/archives/9512) with
  ``lr = DEFAULT_LR`` (relative learning rate) and ``weight_decay = DEFAULT_WEIGHT_DECAY``.
- ``lr_scheduler``: LightningCLI's ``LRSchedulerCallable`` (``optimizer -> LRScheduler``), stepped every
  optimizer step. ``None`` (default): :func:`warmup_decay_knots` of the run's length, as a
  :class:`~lightning_tiger.optim.PiecewiseLinearLR` (the schedule format of bojone/tiger's ``piecewise_linear``):
  linear warm-up from 0 over the first 5 % of the run (+1 step), then linear decay to 10 % of the peak at its
  last step, the same shape as ``examples/configs/optim/tiger.yaml``.
- The diffusion modules also add Lightning's ``EMAWeightAveraging`` unless the Trainer already has a weight
  averaging callback (:func:`default_ema_callbacks`), with a decay suited to the run's length
  (:func:`auto_ema_decay`).

The top-level ``--optimizer`` / ``--lr_scheduler`` of the ``lightning-tiger`` CLI replace the module's
``configure_optimizers`` altogether (LightningCLI's rule), so they win over these arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_tiger.optim import ParamKind, PiecewiseLinearLR, Tiger, tiger_param_groups
from lightning_tiger.validation import check_int, check_real

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_WEIGHT_DECAY",
    "Optimization",
    "auto_ema_decay",
    "check_ema_decay",
    "configure_default_optimization",
    "default_ema_callbacks",
    "default_param_groups",
    "init_kwargs_from_hparams",
    "run_length",
    "save_config_hyperparameters",
    "warmup_decay_knots",
]

#: Peak relative learning rate of the default Tiger: the flow Quickstart's (moons, W2@100 0.05 after 1500 steps).
#: With the schedule and EMA below, a bare ``Trainer(max_steps=3000)`` on a 2-D pinwheel none of the defaults were
#: tuned on samples at 1.2x the W2 floor on average for both diffusion modules (``tests/modules/test_defaults.py``;
#: the score model was at 2.2x with the previous constant 2e-3 and no EMA). Not tuned further.
DEFAULT_LR = 5e-3
#: Decoupled weight decay of the default Tiger (the Tiger post's and bojone/tiger's 0.01).
DEFAULT_WEIGHT_DECAY = 0.01
#: Warm-up length of the default schedule as a fraction of the run (+1 step, so that short runs keep distinct knots).
WARMUP_FRACTION = 0.05
#: The default schedule ends at this fraction of the peak learning rate.
FINAL_LR_RATIO = 0.1
#: Warm-up of the default schedule when the run's length is unknown (the learning rate then stays at its peak).
FALLBACK_WARMUP_STEPS = 100
#: The EMA's horizon ``1 / (1 − decay)`` as a fraction of the run (see :func:`auto_ema_decay`).
EMA_HORIZON_FRACTION = 0.1
#: EMA decay when the run's length is unknown (``trainer.max_steps == -1``): Lightning's default.
FALLBACK_EMA_DECAY = 0.999

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def default_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups by kind (:func:`~lightning_tiger.optim.tiger_param_groups`) for any optimizer.

    Each group carries Tiger's ``"kind"`` key; biases and normalisation parameters get ``weight_decay=0``,
    while matrix and embedding groups carry no ``weight_decay`` of their own, so that the optimizer's own
    setting applies to them (``partial(AdamW, weight_decay=0.1)`` decays the matrices by 0.1).

    Args:
        model: the module whose trainable parameters are grouped.

    Returns:
        ``[{"params": [...], "kind": "matrix"}, {"params": [...], "kind": "bias", "weight_decay": 0.0}, ...]``.
    """
    decayed = {ParamKind.MATRIX.value, ParamKind.EMBEDDING.value}
    groups = tiger_param_groups(model, weight_decay=0.0)
    for group in groups:
        if group["kind"] in decayed:
            del group["weight_decay"]
    return groups


def run_length(trainer: pl.Trainer | None) -> int | None:
    """The run's number of optimizer steps (``trainer.estimated_stepping_batches``), or ``None`` when unbounded.

    ``estimated_stepping_batches`` is ``max_steps`` when set, else ``max_epochs`` × batches per epoch /
    ``accumulate_grad_batches`` (it reads the training dataloader; call it from ``configure_optimizers``).
    """
    if trainer is None:
        return None
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) and total >= 1 else None


def warmup_decay_knots(total_steps: int | None, warmup_steps: int | None = None) -> list[tuple[int, float]]:
    """Knots of the default :class:`~lightning_tiger.optim.PiecewiseLinearLR` schedule.

    Args:
        total_steps: the run's optimizer steps, or ``None`` when unknown.
        warmup_steps: warm-up length; ``None`` (default): ``int(0.05 · total_steps) + 1``, or 100 steps when
            ``total_steps`` is unknown.

    Returns:
        ``[(0, 0.0), (warm-up, 1.0), (total_steps, 0.1)]``: linear warm-up from 0, then linear decay to 10 % at
        the last step; without ``total_steps`` ``[(0, 0.0), (warm-up, 1.0)]`` (constant after the warm-up).
    """
    check_int("total_steps", total_steps, low=1, allow_none=True)
    check_int("warmup_steps", warmup_steps, low=0, allow_none=True)
    if warmup_steps is None:
        warmup_steps = FALLBACK_WARMUP_STEPS if total_steps is None else int(WARMUP_FRACTION * total_steps) + 1
    if total_steps is not None:
        warmup_steps = min(warmup_steps, total_steps)
    knots = [(0, 0.0), (warmup_steps, 1.0)] if warmup_steps > 0 else [(0, 1.0)]
    if total_steps is not None and total_steps > warmup_steps:
        knots.append((total_steps, FINAL_LR_RATIO))
    return knots


def configure_default_optimization(
    module: pl.LightningModule,
    optimizer: OptimizerFactory | None,
    lr_scheduler: SchedulerFactory | None,
    warmup_steps: int | None = None,
) -> dict[str, Any]:
    """The body of the modules' ``configure_optimizers``: the optimizer and a per-step schedule.

    Args:
        module: the LightningModule (attached to its Trainer).
        optimizer: ``params -> Optimizer``, or ``None`` for the default Tiger (module docstring).
        lr_scheduler: ``optimizer -> LRScheduler``, or ``None`` for :func:`warmup_decay_knots` of
            :func:`run_length`; when the run's length is unknown the learning rate stays at its peak after the
            warm-up, and an INFO line says so.
        warmup_steps: warm-up of the default schedule (``None``: 5 % of the run + 1).

    Returns:
        ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "interval": "step"}}``.
    """
    groups = default_param_groups(module)
    if optimizer is None:
        opt = Tiger(groups, lr=DEFAULT_LR, weight_decay=DEFAULT_WEIGHT_DECAY)
    else:
        opt = optimizer(groups)
    if lr_scheduler is not None:
        scheduler = lr_scheduler(opt)
    else:
        try:
            trainer = module.trainer
        except RuntimeError:  # not attached to a Trainer (configure_optimizers called by hand): length unknown
            trainer = None
        total = run_length(trainer)
        if total is None:
            rank_zero_info(
                f"{type(module).__name__}: the run's length is unknown (trainer.max_steps and max_epochs unset), "
                "so the default schedule warms up and then keeps the peak learning rate; set max_steps for the "
                "warm-up + decay schedule, or pass lr_scheduler=..."
            )
        scheduler = PiecewiseLinearLR(opt, warmup_decay_knots(total, warmup_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_ema_decay(ema_decay: Any) -> None:
    """``ema_decay`` is ``"auto"``, ``None`` or a float in (0, 1); ``ValueError`` naming it otherwise."""
    if ema_decay is None or (isinstance(ema_decay, str) and ema_decay == "auto"):
        return
    if isinstance(ema_decay, str):
        raise ValueError(f"ema_decay must be 'auto', None or a float in (0, 1), got {ema_decay!r}")
    check_real("ema_decay", ema_decay, low=0.0, high=1.0, low_open=True, high_open=True)


def auto_ema_decay(max_steps: int | None) -> float:
    """EMA decay for a run of ``max_steps`` optimizer steps: horizon ``1 / (1 − decay)`` = 10 % of the run.

    A fixed decay suits one run length only: 0.998 lagged a 1500-step flow (W2 0.13 vs 0.05 with 0.99), and a
    0.999 average of a 1000-step score model still held its untrained start (weight ``0.999^1000 ≈ 0.37``),
    whose probability-flow ODE blew up. With a horizon of a tenth of the run the start weighs ``e^-10``, and the
    average spans the low-learning-rate end of the default schedule. Clamped to [0.9, 0.9999]; ``None``
    (unknown length) gives Lightning's default 0.999.
    """
    if max_steps is None or max_steps < 1:
        return FALLBACK_EMA_DECAY
    return min(max(1.0 - 1.0 / (EMA_HORIZON_FRACTION * max_steps), 0.9), 0.9999)


def default_ema_callbacks(trainer: pl.Trainer, ema_decay: float | str | None) -> list[Callback]:
    """``[EMAWeightAveraging(decay)]`` for a ``fit`` whose Trainer has no weight-averaging callback, else ``[]``.

    For a module's ``configure_callbacks``: Lightning lets a callback returned there *replace* the Trainer's
    callbacks of the same type, so one that a config lists (with its own decay) is left alone by returning
    nothing. ``ema_decay="auto"`` uses :func:`auto_ema_decay` of ``trainer.max_steps``; ``None`` adds nothing.
    """
    if ema_decay is None or trainer.state.fn != "fit":
        return []
    if any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks):
        return []
    decay = auto_ema_decay(trainer.max_steps) if ema_decay == "auto" else float(ema_decay)
    return [EMAWeightAveraging(decay=decay)]


def _holds_object(value: Any) -> bool:
    """A hyperparameter that is a Python object (a module, a callable), not a config value."""
    if isinstance(value, nn.Module):
        return True
    return callable(value) and not isinstance(value, (type, dict, str))


def save_config_hyperparameters(
    module: pl.LightningModule,
    objects: Sequence[str],
    ignore: Sequence[str] = (),
    frame: types.FrameType | None = None,
) -> None:
    """``module.save_hyperparameters``, leaving out the ``objects`` arguments that hold Python objects.

    Under LightningCLI, ``save_hyperparameters`` records the configuration as given: a network or an optimizer
    is a ``{"class_path": ..., "init_args": ...}`` dict that ``load_from_checkpoint`` (and
    :func:`~lightning_tiger.modules.load_rectified_flow`) rebuild. From plain Python they are objects: a pickled
    module makes the checkpoint unloadable with ``weights_only=True`` (Lightning's default on resume) and a lambda
    cannot be pickled at all, so those are left out. Call it from the module's ``__init__``.

    Args:
        module: the LightningModule being constructed.
        objects: argument names that may hold objects (``"net"``, ``"optimizer"``, ``"lr_scheduler"``).
        ignore: arguments never recorded.
        frame: the ``__init__`` frame (default: the caller's).
    """
    frame = frame if frame is not None else inspect.currentframe().f_back  # type: ignore[union-attr]
    with warnings.catch_warnings():
        # The first pass only looks at what would be recorded; the nn.Module warning belongs to the second.
        warnings.filterwarnings("ignore", message=r".*is an instance of `nn.Module`")
        module.save_hyperparameters(ignore=list(ignore), frame=frame)
    dropped = [name for name in objects if _holds_object(module.hparams.get(name))]
    if dropped:
        module.save_hyperparameters(ignore=[*ignore, *dropped], frame=frame)


def init_kwargs_from_hparams(cls: type, hparams: dict[str, Any], drop: Sequence[str] = (),
                             where: str = "checkpoint") -> dict[str, Any]:
    """Constructor arguments of ``cls`` from saved hyperparameters, for rebuilding a module.

    LightningCLI's bookkeeping keys (``_instantiator``, ``_class_path``) and ``drop`` are removed; any other key
    that ``cls.__init__`` does not take raises a ``ValueError`` naming it (a checkpoint of another class, or of
    an incompatible version), rather than a bare ``TypeError`` from the constructor.

    Args:
        cls: the class to rebuild.
        hparams: ``checkpoint["hyper_parameters"]``.
        drop: keys to leave out (e.g. training-only settings).
        where: what the hyperparameters come from, for the message.
    """
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_") and k not in drop}
    unknown = set(kwargs) - set(inspect.signature(cls.__init__).parameters)
    if unknown:
        raise ValueError(f"{where}: hyperparameters {sorted(unknown)} are not arguments of {cls.__name__}: not a "
                         f"{cls.__name__} checkpoint, or one from an incompatible version")
    return kwargs


@dataclasses.dataclass
class Optimization:
    """A module's ``optimizer`` / ``lr_scheduler`` / ``warmup_steps`` / ``ema_decay`` arguments, checked once.

    The three LightningModules keep one of these and delegate their ``configure_optimizers`` and
    ``configure_callbacks`` to it (module docstring).

    Raises:
        TypeError, ValueError: ``warmup_steps`` is not ``None`` or an int >= 0, or ``ema_decay`` is not
            ``"auto"``, ``None`` or a float in (0, 1).
    """

    optimizer: OptimizerFactory | None = None
    lr_scheduler: SchedulerFactory | None = None
    warmup_steps: int | None = None
    ema_decay: float | str | None = None

    def __post_init__(self) -> None:
        check_int("warmup_steps", self.warmup_steps, low=0, allow_none=True)
        check_ema_decay(self.ema_decay)

    def configure_optimizers(self, module: pl.LightningModule) -> dict[str, Any]:
        """:func:`configure_default_optimization` with these settings."""
        return configure_default_optimization(module, self.optimizer, self.lr_scheduler, self.warmup_steps)

    def configure_callbacks(self, trainer: pl.Trainer) -> list[Callback]:
        """:func:`default_ema_callbacks` with this ``ema_decay``."""
        return default_ema_callbacks(trainer, self.ema_decay)
