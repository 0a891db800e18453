"""torchmetrics Metrics and their functional twins for offline sample quality (built on ``generative/``)."""

from .excess_score_loss import ExcessScoreLoss as ExcessScoreLoss
from .frechet import FrechetDistance as FrechetDistance
from .mmd import MMD as MMD
from .score_matching import KFLBound as KFLBound
from .score_matching import dsm_constant as dsm_constant
from .score_matching import excess_score_loss as excess_score_loss
from .score_matching import kfl_w2_bound as kfl_w2_bound
from .score_matching import score_loss_terms as score_loss_terms
from .two_sample import TwoSampleMetric as TwoSampleMetric
from .wasserstein import SlicedWassersteinDistance as SlicedWassersteinDistance
from .wasserstein import WassersteinDistance as WassersteinDistance
