"""RectifiedFlowModule and the flow solvers against the closed form of the 1-RF between two Gaussians and explicit
formulas."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_tiger.generative.flow import flip_time_convention, gaussian_1rf_velocity, integrate
from lightning_tiger.modules.rectified_flow import RectifiedFlowModule, load_rectified_flow
from lightning_tiger.nn.time_mlp import TimeMLP
from lightning_tiger.optim import PiecewiseLinearLR, Tiger

from ._flow_helpers import (
    ExactVelocity,
    Gaussian1DDataModule,
    M,
    S,
    exact_v,
    normal_quantiles,
    w2_1d_reference,
)

N = 20000
Z0 = normal_quantiles(N)
TARGET = normal_quantiles(N, M, S)


def _exact_module() -> RectifiedFlowModule:
    return RectifiedFlowModule(net=ExactVelocity(), data_shape=(1,)).double()


def test_library_closed_form_matches_the_written_formula() -> None:
    x, t = torch.randn(50, 1).double(), torch.rand(50).double()
    assert torch.allclose(gaussian_1rf_velocity(x, t), exact_v(x, t))


def test_one_euler_step_outputs_the_mean() -> None:
    z1 = _exact_module().sample(N, steps=1, z0=Z0)
    assert torch.allclose(z1, torch.full_like(z1, M), atol=1e-12)
    assert w2_1d_reference(z1, TARGET) == pytest.approx(S, abs=1e-4)  # quantile-grid std ≈ 1


@pytest.mark.parametrize(("steps", "expected"), [(2, 0.30), (4, 0.159), (8, 0.085), (16, 0.044), (100, 0.0074)])
def test_euler_w2_decays_like_spec5(steps: int, expected: float) -> None:
    z1 = _exact_module().sample(N, steps=steps, z0=Z0)
    assert w2_1d_reference(z1, TARGET) == pytest.approx(expected, rel=0.04)


def test_w2_is_first_order_in_steps() -> None:
    model = _exact_module()
    errs = [w2_1d_reference(model.sample(N, steps=k, z0=Z0), TARGET) for k in (8, 16, 32)]
    # O(1/N): doubling N halves the error (ratio within [1.8, 2.2]).
    assert 1.8 < errs[0] / errs[1] < 2.2 and 1.8 < errs[1] / errs[2] < 2.2


def test_straightness_and_transport_cost_of_the_1rf() -> None:
    metrics = _exact_module().flow_metrics(Z0, steps=2000)
    assert float(metrics["straightness"]) == pytest.approx(0.2146, abs=0.002)
    # 1-RF coupling Z_1 = 0.5 Z_0 + 3, so E(Z_1 − Z_0)² = E(3 − 0.5 Z_0)² = 9 + 0.25.
    assert float(metrics["transport_cost"]) == pytest.approx(9.25, rel=2e-3)


def test_adaptive_and_heun_recover_the_1rf_coupling() -> None:
    model = _exact_module()
    z0 = Z0[::20]
    exact = 0.5 * z0 + 3
    sol = integrate(model.forward, z0, steps=10, solver="adaptive", rtol=1e-7, atol=1e-7)
    assert float((sol.z1 - exact).abs().max()) < 1e-5
    assert sol.nfe < 300
    euler = (model.sample(0, steps=10, z0=z0) - exact).abs().max()
    heun = (model.sample(0, steps=10, z0=z0, solver="heun") - exact).abs().max()
    assert float(heun) < 0.2 * float(euler)


def test_reflow_of_the_exact_coupling_is_straight_and_one_step_exact() -> None:
    model = _exact_module()
    z0, z1 = model.generate_pairs(
        2000, steps=10, batch_size=700, solver="adaptive", progress=False, rtol=1e-8, atol=1e-8,
        generator=torch.Generator().manual_seed(0),
    )
    z0, z1 = z0.double(), z1.double()
    assert torch.allclose(z1, 0.5 * z0 + 3, atol=1e-4)  # the 1-RF coupling

    # Velocity of the 2-RF on the deterministic linear coupling: X_t = (1 − t/2) X_0 + 3t, v = 3 − X_0/2.
    def v2(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1).double()
        return 3 - 0.5 * (x - 3 * t) / (1 - 0.5 * t)

    two_rf = RectifiedFlowModule(net=None, data_shape=(1,))
    two_rf.net = _Wrap(v2)
    s = two_rf.flow_metrics(Z0, steps=100)["straightness"]
    assert float(s) < 1e-20
    one_step = two_rf.sample(0, steps=1, z0=Z0)
    assert w2_1d_reference(one_step, TARGET) < 1e-10


class _Wrap(torch.nn.Module):
    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t)


def test_flow_loss_matches_explicit_formula() -> None:
    net = TimeMLP(data_dim=2, hidden_dim=16, depth=1)
    torch.nn.init.normal_(net.output.weight, std=0.3)
    model = RectifiedFlowModule(net=net, t_eps=1e-3)
    x1 = torch.randn(64, 2)
    loss = model.compute_loss(x1, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(64, 2, generator=gen)  # source first, then t (documented draw order)
    t = torch.rand(64, generator=gen) * (1 - 1e-3) + 1e-3
    ref = 0.0
    with torch.no_grad():
        for i in range(64):
            xt = t[i] * x1[i] + (1 - t[i]) * x0[i]
            v = net(xt[None], t[i : i + 1])[0]
            ref += float((((x1[i] - x0[i]) - v) ** 2).mean())
    assert float(loss) == pytest.approx(ref / 64, rel=1e-5)


def test_distill_loss_is_endpoint_mse() -> None:
    net = TimeMLP(data_dim=2, hidden_dim=16, depth=1)
    torch.nn.init.normal_(net.output.weight, std=0.3)
    model = RectifiedFlowModule(net=net, mode="distill")
    z0, z1 = torch.randn(32, 2), torch.randn(32, 2) + 2
    with torch.no_grad():
        ref = ((z0 + net(z0, torch.zeros(32)) - z1) ** 2).mean()
    assert float(model.compute_loss((z0, z1))) == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        model.compute_loss(z1)


def test_exact_velocity_minimises_the_flow_loss() -> None:
    model = RectifiedFlowModule(net=ExactVelocity(), data_shape=(1,)).double()
    x1 = M + S * torch.randn(200000, 1, generator=torch.Generator().manual_seed(1)).double()
    base = float(model.compute_loss(x1, torch.Generator().manual_seed(2)))
    model.net = _Wrap(lambda x, t: exact_v(x, t) + 0.1)
    shifted = float(model.compute_loss(x1, torch.Generator().manual_seed(2)))
    # E||target − (v* + δ)||² = E||target − v*||² + δ² for the conditional mean v*.
    assert shifted - base == pytest.approx(0.01, abs=0.002)


def test_flip_time_convention_reproduces_the_forward_euler_path() -> None:
    notes_v = flip_time_convention(exact_v)
    z0 = Z0[::100]
    forward = integrate(exact_v, z0, steps=8).z1
    y, h = z0.clone(), 1 / 8
    for k in range(8):  # notes convention: start at s = 1, integrate down to s = 0
        s = 1 - k * h
        y = y - h * notes_v(y, torch.full((len(y),), s, dtype=torch.float64))
    assert torch.allclose(y, forward, atol=1e-12)
    assert torch.allclose(flip_time_convention(notes_v)(z0, torch.full((len(z0),), 0.3).double()),
                          exact_v(z0, torch.full((len(z0),), 0.3).double()))


def test_sample_reproducible_and_trajectory_shape() -> None:
    model = RectifiedFlowModule(net=TimeMLP(2, 16, 1))
    a = model.sample(10, steps=4, generator=torch.Generator().manual_seed(3))
    b, traj = model.sample(10, steps=4, generator=torch.Generator().manual_seed(3), return_trajectory=True)
    assert torch.equal(a, b) and traj.shape == (5, 10, 2) and torch.equal(traj[-1], b)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        RectifiedFlowModule(mode="sde")
    with pytest.raises(ValueError, match="t_eps"):
        RectifiedFlowModule(t_eps=1.0)
    with pytest.raises(ValueError, match="val_steps"):
        RectifiedFlowModule(val_steps=[0])
    with pytest.raises(ValueError, match="time_sampling"):
        RectifiedFlowModule(time_sampling="cosine")
    with pytest.raises(ValueError, match="source"):
        RectifiedFlowModule(source="uniform")
    model = RectifiedFlowModule(net=TimeMLP(2, 16, 1))
    with pytest.raises(ValueError, match="solver"):
        model.sample(4, solver="rk4")
    with pytest.raises(ValueError, match="steps"):
        model.sample(4, steps=0)
    with pytest.raises(ValueError, match="z0"):
        model.sample(4, z0=torch.randn(4, 3))


def test_fit_logs_w2_with_ema_weights_and_checkpoint_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # An average that never updates stays at the initial weights: TimeMLP's zero output layer gives v = 0, so
    # samples equal the noise whatever the raw weights learn. The logged W2 must be that of the noise itself.
    torch.manual_seed(0)
    model = RectifiedFlowModule(net=TimeMLP(1, 32, 1), data_shape=(1,), num_val_samples=256, val_steps=(1, 4),
                                optimizer=partial(Tiger, lr=1e-2))
    dm = Gaussian1DDataModule(n=2048, num_val=256)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = Trainer(max_steps=6, accelerator="cpu", default_root_dir=tmp_path, logger=logger,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[EMAWeightAveraging(update_starting_at_step=10**9)], limit_val_batches=1,
                      val_check_interval=6)
    trainer.fit(model, dm)
    z0 = torch.randn(256, 1, generator=torch.Generator().manual_seed(0))
    ref = dm.val_reference()
    noise_w2 = float(np.sqrt(np.mean((np.sort(z0.numpy().ravel()) - np.sort(ref.numpy().ravel())) ** 2)))
    logged = trainer.callback_metrics
    assert float(logged["val/w2@1"]) == pytest.approx(noise_w2, rel=1e-4)
    assert float(logged["val/w2@4"]) == pytest.approx(noise_w2, rel=1e-4)
    for key in ("val/loss", "val/straightness", "val/transport_cost", "hp_metric"):
        assert key in logged
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    ckpt = tmp_path / "rf.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=False)
    assert "current_model_state" in raw  # Lightning keeps raw weights beside the EMA state_dict
    loaded = load_rectified_flow(ckpt, net=TimeMLP(1, 32, 1))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.allclose(loaded.sample(0, steps=4, z0=z0), z0)  # EMA (= initial) weights came back
    warm = RectifiedFlowModule(net=TimeMLP(1, 32, 1), data_shape=(1,), init_from=str(ckpt))
    assert torch.allclose(warm.sample(0, steps=4, z0=z0), z0)


def test_image_data_with_the_default_unet() -> None:
    model = RectifiedFlowModule(data_shape=(1, 8, 8))
    x1 = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = model.compute_loss(x1)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    z1, traj = model.sample(3, steps=2, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert z1.shape == (3, 1, 8, 8) and traj.shape == (3, 3, 1, 8, 8)


def test_data_shape_mismatch_is_explained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = RectifiedFlowModule(net=TimeMLP(2, 16, 1))
    trainer = Trainer(max_steps=1, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="data_shape"):
        trainer.fit(model, Gaussian1DDataModule())


@pytest.mark.slow
def test_trained_small_model_approaches_the_closed_form(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = RectifiedFlowModule(net=TimeMLP(1, 64, 2), data_shape=(1,), optimizer=partial(Tiger, lr=5e-3),
                                lr_scheduler=partial(PiecewiseLinearLR, schedule={60: 1.0, 1200: 0.05}),
                                val_steps=(1, 100), num_val_samples=512)
    dm = Gaussian1DDataModule(n=8192, num_val=512)
    trainer = Trainer(max_steps=1200, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      callbacks=[EMAWeightAveraging(decay=0.99)], num_sanity_val_steps=0, limit_val_batches=1,
                      val_check_interval=1200, check_val_every_n_epoch=None)
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    assert float(m["val/w2@1"]) == pytest.approx(0.5, abs=0.1)  # one step ≈ the mean
    assert float(m["val/w2@100"]) < 0.1  # vs 0.0074 exact at 100 steps; 512 quantile points
    assert float(m["val/straightness"]) == pytest.approx(0.2146, abs=0.06)


class _CountingNet(torch.nn.Module):
    """Wraps a velocity net and counts its calls outside training mode (validation sampling and loss)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.eval_calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.eval_calls += not self.training
        return self.net(x, t)


def test_validation_integrates_each_step_count_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The largest N's Euler integration also yields straightness and transport cost: a validation batch costs
    # sum(val_steps) sampling calls + 1 loss call, and the logged values equal flow_metrics on the same noise.
    torch.manual_seed(0)
    net = _CountingNet(TimeMLP(1, 16, 1))
    model = RectifiedFlowModule(net=net, data_shape=(1,), num_val_samples=64, val_steps=(1, 3, 20),
                                num_plot_trajectories=0)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=1, default_root_dir=tmp_path)
    trainer.validate(model, Gaussian1DDataModule(num_val=64))
    assert net.eval_calls == 1 + 3 + 20 + 1
    z0 = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    expected = model.flow_metrics(z0, steps=20)
    logged = trainer.callback_metrics
    assert float(logged["val/straightness"]) == pytest.approx(float(expected["straightness"]), rel=1e-5)
    assert float(logged["val/transport_cost"]) == pytest.approx(float(expected["transport_cost"]), rel=1e-5)


def test_sobol_validation_noise_is_the_normal_quantile_of_scrambled_sobol(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # An untrained TimeMLP has a zero output layer, so v = 0 and the validation samples are the noise itself:
    # the logged W2 is that of the noise against the reference.
    model = RectifiedFlowModule(net=TimeMLP(1, 16, 1), data_shape=(1,), num_val_samples=256, val_steps=(1, 4),
                                val_noise="sobol", val_seed=3, num_plot_trajectories=0)
    dm = Gaussian1DDataModule(num_val=256)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=1, default_root_dir=tmp_path)
    trainer.validate(model, dm)
    from scipy.stats import norm  # the inverse normal CDF from an independent implementation

    u = torch.quasirandom.SobolEngine(1, scramble=True, seed=3).draw(256, dtype=torch.float64).numpy().ravel()
    z0 = norm.ppf(u)
    assert np.allclose(model.validation_noise(256).numpy().ravel(), z0, atol=1e-6)
    ref = dm.val_reference().numpy().ravel()
    expected = float(np.sqrt(np.mean((np.sort(z0) - np.sort(ref)) ** 2)))
    assert float(trainer.callback_metrics["val/w2@4"]) == pytest.approx(expected, rel=1e-4)


def test_sobol_noise_spreads_evenly() -> None:
    # Quasi-Monte Carlo: 512 Sobol-normal points sit closer (W2) to N(0, 1) than any of five i.i.d. draws.
    model = RectifiedFlowModule(net=TimeMLP(1, 8, 1), data_shape=(1,), val_noise="sobol")
    quantiles = normal_quantiles(512).double()
    sobol = w2_1d_reference(model.validation_noise(512).double(), quantiles)
    iid = [w2_1d_reference(torch.randn(512, 1, generator=torch.Generator().manual_seed(s)).double(), quantiles)
           for s in range(5)]
    assert sobol < 0.6 * min(iid), (sobol, iid)  # measured 0.035 vs 0.067–0.108
    with pytest.raises(ValueError, match="val_noise"):
        RectifiedFlowModule(net=TimeMLP(1, 8, 1), data_shape=(1,), val_noise="halton")
