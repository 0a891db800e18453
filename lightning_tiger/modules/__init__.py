"""LightningModules: causal LM (length extrapolation), score-matching diffusion, rectified flow.

The math they share (SDEs, samplers, ODE solvers) lives in :mod:`lightning_tiger.generative`.
"""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "load_rectified_flow": ".rectified_flow",
    "CausalLMModule": ".causal_lm",
    "ScoreMatchingModule": ".score_matching",
    "RectifiedFlowModule": ".rectified_flow",
}
__all__ = [
    "CausalLMModule",
    "RectifiedFlowModule",
    "ScoreMatchingModule",
    "load_rectified_flow",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .causal_lm import CausalLMModule
    from .rectified_flow import RectifiedFlowModule, load_rectified_flow
    from .score_matching import ScoreMatchingModule
