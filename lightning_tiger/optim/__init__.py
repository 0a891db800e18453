"""Optimizers (Tiger, Lion), Tiger parameter groups, settings and shrink rule, and the piecewise-linear schedule."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "Tiger": ".tiger",
    "KindGuessWarning": ".tiger",
    "Lion": ".lion",
    "tiger_param_groups": ".param_groups",
    "classify_parameters": ".param_groups",
    "ParamKind": ".param_groups",
    "PiecewiseLinearLR": ".schedulers",
    "TigerParamSettings": ".settings",
    "LR_CONSTANT": ".settings",
    "LR_RMS": ".settings",
    "LR_ROW_RMS": ".settings",
    "auto_rms_floor": ".settings",
    "effective_lr": ".settings",
    "shrink_": ".shrink",
    "shrink_center": ".shrink",
    "shrunk": ".shrink",
}
__all__ = [
    "LR_CONSTANT",
    "LR_RMS",
    "LR_ROW_RMS",
    "KindGuessWarning",
    "Lion",
    "ParamKind",
    "PiecewiseLinearLR",
    "Tiger",
    "TigerParamSettings",
    "auto_rms_floor",
    "classify_parameters",
    "effective_lr",
    "shrink_",
    "shrink_center",
    "shrunk",
    "tiger_param_groups",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .lion import Lion
    from .param_groups import ParamKind, classify_parameters, tiger_param_groups
    from .schedulers import PiecewiseLinearLR
    from .settings import LR_CONSTANT, LR_RMS, LR_ROW_RMS, TigerParamSettings, auto_rms_floor, effective_lr
    from .shrink import shrink_, shrink_center, shrunk
    from .tiger import KindGuessWarning, Tiger
