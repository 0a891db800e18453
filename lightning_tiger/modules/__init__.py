"""LightningModules: causal LM (length extrapolation), score-matching diffusion, rectified flow."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "load_rectified_flow": ".rectified_flow",
    "make_sde": ".sde",
    "SDE": ".sde",
    "CausalLMModule": ".causal_lm",
    "ScoreMatchingModule": ".score_matching",
    "RectifiedFlowModule": ".rectified_flow",
    "VPSDE": ".sde",
    "SubVPSDE": ".sde",
    "VESDE": ".sde",
}
__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "CausalLMModule",
    "RectifiedFlowModule",
    "ScoreMatchingModule",
    "SubVPSDE",
    "load_rectified_flow",
    "make_sde",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .causal_lm import CausalLMModule
    from .rectified_flow import RectifiedFlowModule, load_rectified_flow
    from .score_matching import ScoreMatchingModule
    from .sde import SDE, VESDE, VPSDE, SubVPSDE, make_sde
