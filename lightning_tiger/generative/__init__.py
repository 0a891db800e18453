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

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "SDE": ".sde",
    "SDE_NAMES": ".sde",
    "VESDE": ".sde",
    "VPSDE": ".sde",
    "SubVPSDE": ".sde",
    "make_sde": ".sde",
    "ODESolution": ".ode",
    "integrate_adaptive": ".ode",
    "integrate_fixed": ".ode",
    "SAMPLERS": ".samplers",
    "SampleResult": ".samplers",
    "SamplerOptions": ".samplers",
    "annealed_langevin": ".samplers",
    "euler_maruyama": ".samplers",
    "geometric_sigmas": ".samplers",
    "langevin_corrector": ".samplers",
    "ode_adaptive": ".samplers",
    "ode_euler": ".samplers",
    "ode_heun": ".samplers",
    "predictor_corrector": ".samplers",
    "register_sampler": ".samplers",
    "sample": ".samplers",
    "SOLVERS": ".flow",
    "FlowSolution": ".flow",
    "Velocity": ".flow",
    "flip_time_convention": ".flow",
    "gaussian_1rf_velocity": ".flow",
    "integrate": ".flow",
    "straightness": ".flow",
    "GaussianMixture": ".gaussian_mixture",
    "default_net": ".nets",
    "instantiate": ".nets",
    "batch_broadcast": ".tensors",
    "randn": ".tensors",
}
__all__ = [
    "SAMPLERS",
    "SDE",
    "SDE_NAMES",
    "SOLVERS",
    "VESDE",
    "VPSDE",
    "FlowSolution",
    "GaussianMixture",
    "ODESolution",
    "SampleResult",
    "SamplerOptions",
    "SubVPSDE",
    "Velocity",
    "annealed_langevin",
    "batch_broadcast",
    "default_net",
    "euler_maruyama",
    "flip_time_convention",
    "gaussian_1rf_velocity",
    "geometric_sigmas",
    "instantiate",
    "integrate",
    "integrate_adaptive",
    "integrate_fixed",
    "langevin_corrector",
    "make_sde",
    "ode_adaptive",
    "ode_euler",
    "ode_heun",
    "predictor_corrector",
    "randn",
    "register_sampler",
    "sample",
    "straightness",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .flow import (
        SOLVERS,
        FlowSolution,
        Velocity,
        flip_time_convention,
        gaussian_1rf_velocity,
        integrate,
        straightness,
    )
    from .gaussian_mixture import GaussianMixture
    from .nets import default_net, instantiate
    from .ode import ODESolution, integrate_adaptive, integrate_fixed
    from .samplers import (
        SAMPLERS,
        SampleResult,
        SamplerOptions,
        annealed_langevin,
        euler_maruyama,
        geometric_sigmas,
        langevin_corrector,
        ode_adaptive,
        ode_euler,
        ode_heun,
        predictor_corrector,
        register_sampler,
        sample,
    )
    from .sde import SDE, SDE_NAMES, VESDE, VPSDE, SubVPSDE, make_sde
    from .tensors import batch_broadcast, randn
