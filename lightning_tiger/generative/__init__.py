"""The math that the generative LightningModules, data modules and metrics share (no LightningModules here).

- :mod:`~lightning_tiger.generative.sde`: VP / sub-VP / VE score SDEs (Song et al. 2021).
- :mod:`~lightning_tiger.generative.ode`: the one ODE integrator core (Euler, Heun, adaptive Dormand–Prince).
- :mod:`~lightning_tiger.generative.samplers`: score-SDE samplers and their registry by name.
- :mod:`~lightning_tiger.generative.flow`: rectified-flow sampling and straightness (Liu, Gong & Liu 2023).
- :mod:`~lightning_tiger.generative.gaussian_mixture`: the Gaussian mixture with its analytic scores.
- :mod:`~lightning_tiger.generative.nets`: the default networks and rebuilding a network from its config.
- :mod:`~lightning_tiger.generative.tensors`: noise and broadcasting helpers.

Layer: imports torch, :mod:`lightning_tiger.validation` and :mod:`lightning_tiger.nn` only; ``data``,
``metrics`` and ``modules`` build on it.
"""

from .flow import SOLVERS as SOLVERS
from .flow import FlowSolution as FlowSolution
from .flow import Velocity as Velocity
from .flow import flip_time_convention as flip_time_convention
from .flow import gaussian_1rf_velocity as gaussian_1rf_velocity
from .flow import integrate as integrate
from .flow import straightness as straightness
from .gaussian_mixture import GaussianMixture as GaussianMixture
from .nets import default_net as default_net
from .nets import instantiate as instantiate
from .ode import ODESolution as ODESolution
from .ode import integrate_adaptive as integrate_adaptive
from .ode import integrate_fixed as integrate_fixed
from .samplers import SAMPLERS as SAMPLERS
from .samplers import SampleResult as SampleResult
from .samplers import SamplerOptions as SamplerOptions
from .samplers import annealed_langevin as annealed_langevin
from .samplers import euler_maruyama as euler_maruyama
from .samplers import geometric_sigmas as geometric_sigmas
from .samplers import langevin_corrector as langevin_corrector
from .samplers import ode_adaptive as ode_adaptive
from .samplers import ode_euler as ode_euler
from .samplers import ode_heun as ode_heun
from .samplers import predictor_corrector as predictor_corrector
from .samplers import register_sampler as register_sampler
from .samplers import sample as sample
from .sde import SDE as SDE
from .sde import SDE_NAMES as SDE_NAMES
from .sde import VESDE as VESDE
from .sde import VPSDE as VPSDE
from .sde import SubVPSDE as SubVPSDE
from .sde import make_sde as make_sde
from .tensors import batch_broadcast as batch_broadcast
from .tensors import randn as randn
