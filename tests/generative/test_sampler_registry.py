"""The sampler registry: ``sample(name, ...)`` runs the named sampler from the prior; new samplers register."""

from __future__ import annotations

import pytest
import torch

from lightning_tiger.generative import samplers as S
from lightning_tiger.generative.sde import VESDE, VPSDE


def _score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -x  # N(0, I), the VP prior


def test_sample_draws_the_prior_and_runs_the_named_sampler() -> None:
    sde = VPSDE()
    options = S.SamplerOptions(steps=4, generator=torch.Generator().manual_seed(3))
    out = S.sample("ode_heun", _score, sde, (5, 2), options)
    x = sde.prior_sample((5, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.x, S.ode_heun(_score, sde, x, 4))
    assert out.trajectory is None and out.nfe is None
    # pc: the same generator stream drives the prior and the sampler noise.
    gen = torch.Generator().manual_seed(1)
    pc = S.sample("pc", _score, sde, (5, 2), S.SamplerOptions(steps=3, generator=gen, snr=0.1, return_trajectory=True))
    gen = torch.Generator().manual_seed(1)
    x, traj = S.predictor_corrector(_score, sde, sde.prior_sample((5, 2), generator=gen), 3, snr=0.1, generator=gen,
                                    return_trajectory=True)
    assert torch.equal(pc.x, x) and pc.trajectory is not None and torch.equal(pc.trajectory, traj)


def test_adaptive_reports_its_evaluations_and_langevin_needs_ve() -> None:
    out = S.sample("ode_adaptive", _score, VPSDE(), (3, 2), S.SamplerOptions(steps=1, rtol=1e-3, atol=1e-3))
    assert out.nfe is not None and out.nfe >= 7 and (out.nfe - 1) % 6 == 0
    with pytest.raises(ValueError, match="annealed_langevin needs sde='ve'"):
        S.sample("annealed_langevin", _score, VPSDE(), (3, 2), S.SamplerOptions(steps=2))
    ve = S.sample("annealed_langevin", _score, VESDE(0.01, 1.0), (3, 2), S.SamplerOptions(steps=2))
    assert ve.x.shape == (3, 2) and bool(torch.isfinite(ve.x).all())


def test_register_sampler_and_unknown_names() -> None:
    @S.register_sampler("prior_only")
    def prior_only(score_fn, sde, shape, options):  # type: ignore[no-untyped-def]
        return S.SampleResult(sde.prior_sample(shape, generator=options.generator))

    try:
        assert "prior_only" in S.SAMPLERS
        assert S.sample("prior_only", _score, VPSDE(), (2, 1), S.SamplerOptions(steps=1)).x.shape == (2, 1)
        with pytest.raises(ValueError, match="already registered"):
            S.register_sampler("prior_only")(prior_only)
    finally:
        del S.SAMPLERS["prior_only"]
    with pytest.raises(ValueError, match=r"sampler must be one of \('em', 'pc', 'ode_euler'"):
        S.sample("rk4", _score, VPSDE(), (2, 1), S.SamplerOptions(steps=1))
