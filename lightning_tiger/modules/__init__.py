"""LightningModules: causal LM (length extrapolation), score-matching diffusion, rectified flow.

The math they share (SDEs, samplers, ODE solvers) lives in :mod:`lightning_tiger.generative`.
"""

from .causal_lm import CausalLMModule as CausalLMModule
from .rectified_flow import RectifiedFlowModule as RectifiedFlowModule
from .rectified_flow import load_rectified_flow as load_rectified_flow
from .score_matching import ScoreMatchingModule as ScoreMatchingModule
