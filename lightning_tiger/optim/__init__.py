"""Optimizers (Tiger, Lion), Tiger parameter groups, settings and shrink rule, and the piecewise-linear schedule."""

from .lion import Lion as Lion
from .param_groups import ParamKind as ParamKind
from .param_groups import classify_parameters as classify_parameters
from .param_groups import guessed_parameters as guessed_parameters
from .param_groups import tiger_param_groups as tiger_param_groups
from .schedulers import PiecewiseLinearLR as PiecewiseLinearLR
from .settings import LR_CONSTANT as LR_CONSTANT
from .settings import LR_RMS as LR_RMS
from .settings import LR_ROW_RMS as LR_ROW_RMS
from .settings import TigerParamSettings as TigerParamSettings
from .settings import auto_rms_floor as auto_rms_floor
from .settings import effective_lr as effective_lr
from .shrink import shrink_ as shrink_
from .shrink import shrink_center as shrink_center
from .shrink import shrunk as shrunk
from .tiger import KindGuessWarning as KindGuessWarning
from .tiger import Tiger as Tiger
