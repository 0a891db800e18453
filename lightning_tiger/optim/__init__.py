"""Optimizers (Tiger, Lion), Tiger parameter groups and the piecewise-linear schedule."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "Tiger": ".tiger",
    "Lion": ".lion",
    "tiger_param_groups": ".param_groups",
    "classify_parameters": ".param_groups",
    "ParamKind": ".param_groups",
    "PiecewiseLinearLR": ".schedulers",
}
__all__ = [
    "Lion",
    "ParamKind",
    "PiecewiseLinearLR",
    "Tiger",
    "classify_parameters",
    "tiger_param_groups",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .lion import Lion
    from .param_groups import ParamKind, classify_parameters, tiger_param_groups
    from .schedulers import PiecewiseLinearLR
    from .tiger import Tiger
