"""Denoising score matching with score SDEs (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations") as a LightningModule.

Training minimises the weighted denoising (conditional) score-matching loss

    L(θ) = E_{t ~ U[t_eps, 1]} E_{x_0, ε} λ(t) ||s_θ(α_t x_0 + σ_t ε, t) + ε/σ_t||²

(Vincent 2011: equal to the marginal score-matching loss up to a θ-independent constant C_t), per sample summed
over data dimensions and averaged over the batch (score_sde_pytorch ``reduce_mean=False``).

Parameterisation (``parameterization``):

- ``"noise"`` (default): the net predicts ε, s_θ = −net(x, t)/σ_t. With λ = σ² the loss is ||net − ε||²,
  bounded and well scaled at every t (DDPM's ε-prediction); the division by σ_t happens in fp32 only when the
  score is needed by a sampler.
- ``"score"``: the net output *is* the score, s_θ = net(x, t) (NCSN/score_sde style without the 1/σ scaling);
  the loss is computed as λ/σ²·||σ·net + ε||² to avoid dividing ε by a tiny σ.

Precision: t, α_t, σ_t, the noisy input, the loss arithmetic and every sampler state are fp32 with autocast
disabled; only the network runs in the trainer's precision (its output is cast back to fp32).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_tiger.generative import samplers
from lightning_tiger.generative.nets import default_net
from lightning_tiger.generative.sde import SDE, VESDE, make_sde
from lightning_tiger.generative.tensors import batch_broadcast, randn
from lightning_tiger.metrics.functional import frechet_distance, mmd2_unbiased, wasserstein2
from lightning_tiger.metrics.score_matching import excess_score_loss, kfl_w2_bound
from lightning_tiger.modules.defaults import (
    Optimization,
    save_config_hyperparameters,
)
from lightning_tiger.modules.sample_validation import SampleValidationMixin
from lightning_tiger.validation import check_int, check_real

WEIGHTINGS: tuple[str, ...] = ("sigma2", "likelihood", "none")
PARAMETERIZATIONS: tuple[str, ...] = ("noise", "score")


class ScoreMatchingModule(SampleValidationMixin, pl.LightningModule):
    """Score-based diffusion (VP / sub-VP / VE SDE) trained by denoising score matching.

    Subclassing: override :meth:`loss_weight` (λ(t)), pass any :class:`~lightning_tiger.generative.sde.SDE`
    instance as ``sde`` (or override :meth:`configure_sde`), or pass/override the network; no copy of the
    training or sampling code is needed.

    Defaults that work with a bare ``Trainer(max_steps=N)``: Tiger with a warm-up + decay schedule derived from the
    run's length, and EMA weights (``EMAWeightAveraging`` added through ``configure_callbacks`` with a decay from
    the run's length, :mod:`lightning_tiger.modules.defaults`) for validation and for the weights left in the
    module after ``fit``. Score models need the average: trained without it at a constant learning rate on a 2-D
    law, samples *worsened* with more steps.

    Validation (each epoch, not during the sanity check): the DSM loss with seeded t/ε (``val/loss``), then
    ``num_val_samples`` samples from seeded noise (the same every time, so curves are comparable) compared with
    ``trainer.datamodule.val_reference()``: exact W2 (``val/w2``), unbiased RBF MMD² (``val/mmd2``), for images
    the Fréchet distance on raw pixels (``val/fd``) with its uniform-noise baseline (``val/fd_noise``), and for
    analytic toys (``datamodule.analytic_distribution()``) the σ²-weighted excess loss (``val/excess_dsm``)
    and the KFL W2 bound estimate (``val/kfl_w2_bound``, assumption text logged once). A scatter plot (2-D)
    or image grid goes to TensorBoard.

    Args:
        net: ``net(x [batch, *data_shape], t [batch]) -> [batch, *data_shape]``; default
            :func:`~lightning_tiger.generative.nets.default_net`.
        sde: ``"vp"`` (default), ``"subvp"``, ``"ve"`` or an SDE instance (score_sde_pytorch's defaults).
        weighting: λ(t): ``"sigma2"`` (σ_t², default), ``"likelihood"`` (g(t)², Song et al. 2021b) or
            ``"none"`` (1).
        parameterization: ``"noise"`` (default) or ``"score"`` (module docstring).
        t_eps: training times t ~ U[t_eps, 1], default 1e-5 (score_sde_pytorch).
        sde_kwargs: keyword arguments of the SDE class (e.g. ``{"sigma_max": 4.0}``).
        optimizer: ``params -> Optimizer`` (LightningCLI's ``OptimizerCallable``; in Python e.g.
            ``functools.partial(torch.optim.AdamW, lr=1e-3)``), given the parameter groups of
            :func:`~lightning_tiger.modules.defaults.default_param_groups`. Default ``None``: Tiger, relative
            lr 5e-3, weight decay 0.01.
        lr_scheduler: ``optimizer -> LRScheduler`` (``LRSchedulerCallable``), stepped every optimizer step.
            Default ``None``: linear warm-up over 5 % of the run, then linear decay to 10 % at its end
            (:func:`~lightning_tiger.modules.defaults.warmup_decay_knots`).
        warmup_steps: warm-up of the default schedule (``None``: 5 % of the run + 1 step).
        ema_decay: ``"auto"`` (default): add ``EMAWeightAveraging`` with a decay from the run's length
            (:func:`~lightning_tiger.modules.defaults.auto_ema_decay`) unless the Trainer already has a
            weight-averaging callback; a float in (0, 1): that decay; ``None``: no EMA.
        sampler: default sampler of :meth:`sample` and validation (one of
            :data:`~lightning_tiger.generative.samplers.SAMPLERS`), default ``"pc"``.
        sample_steps: default steps (per noise level for annealed Langevin), default 200.
        sample_t_end: where the reverse process stops, default 1e-3.
        snr: PC corrector signal-to-noise ratio, default 0.16.
        num_val_samples: samples drawn per validation (0 disables sample metrics), default 1000.
        val_seed: seed of validation noise, default 1234.
        data_shape: shape of one sample; default: the datamodule's ``data_shape`` (or ``(2,)``).
        progress: tqdm bar in :meth:`sample` by default (default False).
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        sde: str | SDE = "vp",
        weighting: str = "sigma2",
        parameterization: str = "noise",
        t_eps: float = 1e-5,
        sde_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int | None = None,
        ema_decay: float | str | None = "auto",
        sampler: str = "pc",
        sample_steps: int = 200,
        sample_t_end: float = 1e-3,
        snr: float = 0.16,
        num_val_samples: int = 1000,
        val_seed: int = 1234,
        data_shape: Sequence[int] | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        check_real("t_eps", t_eps, low=0.0, high=1.0, low_open=True, high_open=True)
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"sampler must be one of {samplers.SAMPLERS}, got {sampler!r}")
        # Checked without rebinding: save_hyperparameters() records the arguments as given.
        check_int("sample_steps", sample_steps, low=1)
        check_real("sample_t_end", sample_t_end, low=0.0, high=1.0, high_open=True)
        check_int("num_val_samples", num_val_samples, low=0)
        optimization = Optimization(optimizer, lr_scheduler, warmup_steps, ema_decay)
        save_config_hyperparameters(self, objects=("net", "optimizer", "lr_scheduler"),
                                    ignore=("sde",) if isinstance(sde, SDE) else ())
        self.sde = self.configure_sde(sde, sde_kwargs)
        self.weighting = weighting
        self.parameterization = parameterization
        self.t_eps = float(t_eps)
        self.optimization = optimization
        self.sampler = sampler
        self.sample_steps = sample_steps
        self.sample_t_end = float(sample_t_end)
        self.snr = snr
        self.num_val_samples = num_val_samples
        self.val_seed = val_seed
        self.progress = progress
        self.data_shape: tuple[int, ...] | None = tuple(int(s) for s in data_shape) if data_shape else None
        self.net = net if net is not None else default_net(self.data_shape or (2,))
        self._net_given = net is not None
        self.last_nfe: int | None = None
        self._assumption_logged = False
        self._fd_noise: float | None = None

    # ------------------------------------------------------------------ overridable pieces
    def configure_sde(self, sde: str | SDE, sde_kwargs: dict[str, Any] | None) -> SDE:
        """Build the SDE (override to plug in a custom process)."""
        return make_sde(sde, sde_kwargs)

    def loss_weight(self, t: Tensor) -> Tensor:
        """λ(t) ``[batch]`` (fp32): σ_t² (``"sigma2"``), g(t)² (``"likelihood"``) or 1 (``"none"``)."""
        if self.weighting == "sigma2":
            return self.sde.marginal_coefs(t)[1] ** 2
        if self.weighting == "likelihood":
            return self.sde.diffusion(t) ** 2
        return torch.ones_like(t)

    def _net(self, x: Tensor, t: Tensor) -> Tensor:
        # Feed the net in its own dtype (``*-true`` precision) and bring the output back to fp32.
        param = next(self.net.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return self.net(x.to(dtype), t).float()

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """s_θ(x, t) ``[batch, *data_shape]`` fp32 for x ``[batch, *data_shape]``, t ``[batch]``."""
        t = t.float()
        out = self._net(x, t)
        if self.parameterization == "score":
            return out
        with torch.autocast(device_type=x.device.type, enabled=False):
            sigma = self.sde.marginal_coefs(t)[1]
            return -out / batch_broadcast(sigma, out)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The score s_θ(x, t) (same as :meth:`score`)."""
        return self.score(x, t)

    # ------------------------------------------------------------------ training
    def dsm_loss(self, x0: Tensor, t: Tensor | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Per-sample weighted DSM loss ``[batch]`` λ(t)·||s_θ(x_t, t) + ε/σ_t||² (sum over data dims).

        Args:
            x0: clean data ``[batch, *data_shape]``.
            t: times ``[batch]``; default U[t_eps, 1] (fp32).
            noise: ε ``[batch, *data_shape]``; default standard normal.
            generator: for the default t and ε (validation uses a seeded one).
        """
        x0 = x0.float()
        b = x0.shape[0]
        if t is None:
            t = self.t_eps + (1.0 - self.t_eps) * torch.rand(b, generator=generator, device=x0.device
                                                              if generator is None else generator.device)
        t = t.to(x0.device).float()
        if noise is None:
            noise = randn(tuple(x0.shape), generator=generator, device=x0.device)
        noise = noise.float()
        with torch.autocast(device_type=x0.device.type, enabled=False):
            alpha, sigma = self.sde.marginal_coefs(t)
            xt = batch_broadcast(alpha, x0) * x0 + batch_broadcast(sigma, x0) * noise
        out = self._net(xt, t)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            # resid = σ_t·(s_θ − ∇log p(x_t|x_0)), computed without dividing ε by σ_t.
            resid = noise - out if self.parameterization == "noise" else batch_broadcast(sigma, out) * out + noise
            per_sample = resid.pow(2).reshape(b, -1).sum(-1)
            return self.loss_weight(t).float() / sigma.pow(2) * per_sample

    @staticmethod
    def _batch_data(batch: Any) -> Tensor:
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.dsm_loss(self._batch_data(batch)).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        """``optimizer`` / ``lr_scheduler`` from init, or the defaults (Tiger, warm-up + decay over the run)."""
        return self.optimization.configure_optimizers(self)

    def configure_callbacks(self) -> list[Callback]:
        """``EMAWeightAveraging`` per ``ema_decay``, unless the Trainer already averages weights."""
        return self.optimization.configure_callbacks(self.trainer)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_shape = getattr(dm, "data_shape", None)
        if dm_shape is None:
            return
        dm_shape = tuple(int(s) for s in dm_shape)
        if self.data_shape is None:
            if not self._net_given and dm_shape != (2,):
                raise ValueError(f"the datamodule's data_shape is {dm_shape} but the default net was built for "
                                 f"(2,): pass data_shape={list(dm_shape)} (or net=...) to ScoreMatchingModule")
            self.data_shape = dm_shape
        elif self.data_shape != dm_shape:
            raise ValueError(f"data_shape={self.data_shape} differs from the datamodule's {dm_shape}")

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, sampler: str | None = None, steps: int | None = None, *, snr: float | None = None,
               generator: torch.Generator | None = None, return_trajectory: bool = False,
               progress: bool | None = None, t_end: float | None = None, rtol: float = 1e-5,
               atol: float = 1e-5, sigmas: Tensor | None = None, batch_size: int | None = None
               ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``n`` samples ``[n, *data_shape]`` (fp32) with the current weights (EMA weights when called
        during validation under ``EMAWeightAveraging``).

        Args:
            n: number of samples (>= 1).
            sampler: ``"em"``, ``"pc"``, ``"ode_euler"``, ``"ode_heun"``, ``"ode_adaptive"`` or
                ``"annealed_langevin"`` (VE only); default the module's ``sampler``.
            steps: steps (per level for annealed Langevin; ignored by ``ode_adaptive``); default
                ``sample_steps``.
            snr: PC corrector snr (default the module's, 0.16).
            generator: seeds the prior draw and the sampler noise (may be a CPU generator on any device).
            return_trajectory: also return the path ``[k, n, *data_shape]``.
            progress: tqdm bar (default the module's ``progress``).
            t_end: stop time (default ``sample_t_end``).
            rtol, atol: tolerances of ``ode_adaptive`` (default 1e-5).
            sigmas: annealed-Langevin noise levels (default 10 geometric, 1 → 0.01).
            batch_size: sample in chunks of this many (trajectories not supported then); default all at once.

        The number of score evaluations of the last ``ode_adaptive`` call is kept in ``self.last_nfe``.
        """
        sampler = sampler or self.sampler
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"sampler must be one of {samplers.SAMPLERS}, got {sampler!r}")
        check_int("n", n, low=1)
        check_int("batch_size", batch_size, low=1, allow_none=True)
        if batch_size is not None and batch_size < n:
            if return_trajectory:
                raise ValueError("return_trajectory is not supported with batch_size < n")
            chunks = [self.sample(min(batch_size, n - i), sampler, steps, snr=snr, generator=generator,
                                  progress=progress, t_end=t_end, rtol=rtol, atol=atol, sigmas=sigmas)
                      for i in range(0, n, batch_size)]
            return torch.cat(chunks)  # type: ignore[arg-type]
        steps = steps if steps is not None else self.sample_steps
        progress = self.progress if progress is None else progress
        t_end = self.sample_t_end if t_end is None else t_end
        shape = (n, *(self.data_shape or (2,)))
        was_training = self.net.training
        self.net.eval()
        try:
            out = samplers.sample(sampler, self.score, self.sde, shape, samplers.SamplerOptions(
                steps=steps, generator=generator, device=self.device, t_end=t_end,
                snr=self.snr if snr is None else snr, rtol=rtol, atol=atol, sigmas=sigmas,
                return_trajectory=return_trajectory, progress=progress))
        finally:
            self.net.train(was_training)
        if out.nfe is not None:
            self.last_nfe = out.nfe
        return (out.x, out.trajectory) if return_trajectory else out.x

    # ------------------------------------------------------------------ validation (SampleValidationMixin)
    def validation_loss(self, batch: Any, batch_idx: int) -> Tensor:
        """Mean DSM loss with t and ε seeded by ``(val_seed, batch_idx)``."""
        gen = torch.Generator(device="cpu").manual_seed(self.val_seed + batch_idx)
        return self.dsm_loss(self._batch_data(batch), generator=gen).mean()

    def validate_samples(self, reference: Tensor | None) -> None:
        """W2, MMD², Fréchet distance (images), analytic-toy metrics and a picture of seeded samples."""
        n = self.num_val_samples if reference is None else min(self.num_val_samples, reference.shape[0])
        gen = torch.Generator(device="cpu").manual_seed(self.val_seed)
        samples = self.sample(n, generator=gen, progress=False)
        assert isinstance(samples, Tensor)
        samples = samples.float().cpu()
        log_kw = {"on_step": False, "on_epoch": True, "batch_size": n}
        finite = bool(torch.isfinite(samples).all())
        self.log("val/samples_finite", float(finite), **log_kw)
        if reference is not None and finite:
            flat_s, flat_r = samples.reshape(n, -1), reference[:n].reshape(n, -1)
            self.log("val/w2", wasserstein2(flat_s, flat_r).float(), prog_bar=True, **log_kw)
            self.log("val/mmd2", mmd2_unbiased(flat_s, flat_r).float(), **log_kw)
            if samples.ndim == 4:
                self.log("val/fd", frechet_distance(flat_s, flat_r).float(), prog_bar=True, **log_kw)
                if self._fd_noise is None:
                    noise = torch.rand(flat_r.shape, generator=torch.Generator().manual_seed(self.val_seed)) * 2 - 1
                    self._fd_noise = float(frechet_distance(noise, flat_r))
                self.log("val/fd_noise", self._fd_noise, **log_kw)
        self.log_sample_picture(samples, reference, f"{self.sampler}, step {self.global_step}")
        mixture = getattr(self.trainer.datamodule, "analytic_distribution", lambda: None)()
        if mixture is not None:
            self._log_analytic(mixture, log_kw)

    def _log_analytic(self, mixture: Any, log_kw: dict[str, Any]) -> None:

        gen = torch.Generator().manual_seed(self.val_seed)
        device = self.device

        def score_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.score(x.to(device), t.to(device)).cpu()

        ts = torch.linspace(max(self.t_eps, 1e-3), 1.0, 9, dtype=torch.float64)
        excess = excess_score_loss(score_fn, mixture, self.sde, ts, num_samples=2048, generator=gen)
        lam = self.loss_weight(ts.float()).double()
        self.log("val/excess_dsm", float(torch.trapezoid(lam * excess, ts) / (ts[-1] - ts[0])), **log_kw)
        kfl = kfl_w2_bound(score_fn, mixture, self.sde, t_min=self.sample_t_end or 1e-3, num_times=17,
                           num_samples=2048, generator=gen)
        self.log("val/kfl_w2_bound", kfl.bound, **log_kw)
        self.log("val/kfl_j_sm", kfl.j_sm, **log_kw)
        if not self._assumption_logged:
            self._assumption_logged = True
            from lightning.pytorch.loggers import TensorBoardLogger

            for lg in self.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_text("val/kfl_w2_bound_assumption", kfl.assumption, self.global_step)

    def on_fit_start(self) -> None:
        if self.sampler == "annealed_langevin" and not isinstance(self.sde, VESDE):
            raise ValueError("sampler='annealed_langevin' needs sde='ve'")
        if isinstance(self.sde, VESDE) and self.sde.sigma_max == 50.0 and self.data_shape == (2,):
            warnings.warn("VESDE sigma_max=50 is the CIFAR-10 default; for 2-D toys use ~ the largest pairwise "
                          "distance (e.g. sde_kwargs={'sigma_max': 4.0})", stacklevel=2)

