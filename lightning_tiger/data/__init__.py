"""LightningDataModules that need no download: 2-D toys, scikit-learn digits, a character corpus."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "ReflowPairsDataModule": ".reflow",
    "analytic_toy": ".toy2d",
    "eight_gaussians": ".toy2d",
    "ResumableBatchSampler": ".resumable",
    "ResumableLoader": ".resumable",
    "ToyDataModule": ".toy2d",
    "sample_toy": ".toy2d",
    "GaussianMixture": ".toy2d",
    "DigitsDataModule": ".digits",
    "CharCorpusDataModule": ".char_corpus",
    "InMemoryDataModule": ".in_memory",
}
__all__ = [
    "CharCorpusDataModule",
    "DigitsDataModule",
    "GaussianMixture",
    "InMemoryDataModule",
    "ReflowPairsDataModule",
    "ResumableBatchSampler",
    "ResumableLoader",
    "ToyDataModule",
    "analytic_toy",
    "eight_gaussians",
    "sample_toy",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .char_corpus import CharCorpusDataModule
    from .digits import DigitsDataModule
    from .in_memory import InMemoryDataModule
    from .reflow import ReflowPairsDataModule
    from .resumable import ResumableBatchSampler, ResumableLoader
    from .toy2d import GaussianMixture, ToyDataModule, analytic_toy, eight_gaussians, sample_toy
