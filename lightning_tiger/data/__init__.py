"""LightningDataModules that need no download: 2-D toys, scikit-learn digits, a character corpus."""

from lightning_tiger.generative.gaussian_mixture import GaussianMixture as GaussianMixture

from .char_corpus import CharCorpusDataModule as CharCorpusDataModule
from .digits import DigitsDataModule as DigitsDataModule
from .in_memory import InMemoryDataModule as InMemoryDataModule
from .reflow import ReflowPairsDataModule as ReflowPairsDataModule
from .resumable import ResumableBatchSampler as ResumableBatchSampler
from .resumable import ResumableLoader as ResumableLoader
from .toy2d import ToyDataModule as ToyDataModule
from .toy2d import analytic_toy as analytic_toy
from .toy2d import eight_gaussians as eight_gaussians
from .toy2d import sample_toy as sample_toy
