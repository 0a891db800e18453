"""lightning_tiger: Tiger/Lion optimizers, non-finite step guards, RoPE/ALiBi attention with length
extrapolation, and diffusion / rectified-flow LightningModules for PyTorch Lightning.

Subpackages: :mod:`lightning_tiger.optim`, :mod:`lightning_tiger.callbacks`, :mod:`lightning_tiger.nn`,
:mod:`lightning_tiger.modules`, :mod:`lightning_tiger.data`, :mod:`lightning_tiger.metrics`.
"""

__version__ = "0.1.0"
