"""Rectified flow (Liu, Gong, Liu, ICLR 2023, "Flow Straight and Fast") as a LightningModule: 1-RF, reflow
(k-RF), distillation.

Convention: the paper's. Source (Gaussian noise by default) at t = 0, data at t = 1,
``X_t = t·X_1 + (1−t)·X_0``, regression target ``X_1 − X_0``, sampling integrates ``dZ = v(Z, t)dt`` forward
from Z_0. The notes (seed post "生成扩散模型漫谈(十七)") put data at t = 0 and sample from t = 1 down; convert
with t ↦ 1 − t, v ↦ −v (:func:`~lightning_tiger.generative.flow.flip_time_convention`, also available as
:meth:`RectifiedFlowModule.notes_velocity`).

Three modes share one module so that every stage of the workflow is one config:

- ``mode="flow"`` (1-RF): batches are data ``x1 [batch, *data_shape]``; X_0 comes from ``source``
  (independent coupling).
- ``mode="reflow"`` (k-RF): batches are pairs ``(z0, z1)`` produced by a trained flow
  (:class:`~lightning_tiger.data.reflow.ReflowPairsDataModule`); same loss on the coupled pairs.
- ``mode="distill"``: batches are pairs; the one-step generator ``T(z0) = z0 + v(z0, 0)`` is fitted to z1
  with an endpoint MSE (the paper uses LPIPS for images; MSE is the natural choice for toy data and 8×8
  digits). Sampling with ``steps=1`` is exactly T.

Stages chain through checkpoints: ``init_from`` warm-starts the network from the previous stage (the paper
initialises 2-RF and the distilled model from the previous flow).

Defaults that work with a bare ``Trainer(max_steps=N)``: Tiger with a warm-up + decay schedule derived from the
run's length, and EMA weights (``EMAWeightAveraging`` added through ``configure_callbacks``, decay from the run's
length) for validation and for the weights left in the module after ``fit``
(:mod:`lightning_tiger.modules.defaults`).

Validation (:class:`~lightning_tiger.modules.sample_validation.SampleValidationMixin`: samples drawn with the EMA
weights) logs ``val/loss``, ``val/w2@N`` for each N in ``val_steps`` (exact W2 on ``num_val_samples`` samples
from fixed noise against the data module's ``val_reference()``), ``val/straightness`` and
``val/transport_cost`` at the largest N (Euler, from the same noise; with the Euler ``val_solver`` the W2
integration is reused, so a validation costs ``sum(val_steps)`` network calls), ``hp_metric`` (W2 at the
largest N; at 1 step in distill mode), and a picture (2-D: scatter with trajectories; images: a grid) to
TensorBoard.

Length: a little over 400 lines on purpose: one LightningModule with three training modes (1-RF, reflow,
distillation) whose arguments and formulas are documented here, plus :func:`load_rectified_flow`, which
benchmarks and examples import from this path.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_tiger.data.reflow import generate_reflow_pairs
from lightning_tiger.generative.flow import SOLVERS, FlowSolution, Velocity, flip_time_convention, integrate
from lightning_tiger.generative.nets import default_net, instantiate
from lightning_tiger.metrics.functional import wasserstein2
from lightning_tiger.modules.defaults import (
    Optimization,
    init_kwargs_from_hparams,
    save_config_hyperparameters,
)
from lightning_tiger.modules.sample_validation import SampleValidationMixin, sobol_normal
from lightning_tiger.validation import check_int, check_int_sequence, check_real

__all__ = ["RectifiedFlowModule", "load_rectified_flow"]

_MODES = ("flow", "reflow", "distill")
_TIME_SAMPLING = ("uniform", "logit_normal")
_VAL_NOISE = ("iid", "sobol")
#: Optimizer arguments of checkpoints written before ``optimizer`` / ``lr_scheduler`` replaced them; ignored when
#: such a checkpoint is loaded for sampling.
LEGACY_OPTIMIZER_HPARAMS = ("lr", "weight_decay", "lr_schedule")


class RectifiedFlowModule(SampleValidationMixin, pl.LightningModule):
    """Velocity matching for any ``net(x [batch, *data_shape], t [batch]) -> [batch, *data_shape]``; reflow and
    distillation modes.

    Loss (Liu et al. 2023, eq. 1): ``E_t E||(X_1 − X_0) − v(X_t, t)||²`` (mean over elements), t ~ U[t_eps, 1] as in the
    official code (``time_sampling="uniform"``) or logit-normal (Esser et al. 2024, SD3; mean 0, std 1, mapped
    to [t_eps, 1]).

    Args:
        net: the velocity network; ``None`` builds the default for ``data_shape`` (``TimeMLP`` for vectors,
            ``SmallUNet`` for ``[c, 8, 8]`` images).
        data_shape: shape of one sample, default ``(2,)``; checked against the data module's ``data_shape``.
        source: ``"gaussian"`` (N(0, I), default) or a LightningDataModule whose training samples form the
            source (data-to-data transport, e.g. moons → 8 gaussians); its samples are drawn uniformly
            at random and stored with the checkpoint (so a teacher can regenerate pairs).
        mode: ``"flow"`` | ``"reflow"`` | ``"distill"`` (see the module docstring).
        t_eps: smallest training time (default 1e-3, official code), in [0, 1).
        time_sampling: ``"uniform"`` (default) | ``"logit_normal"``.
        optimizer: ``params -> Optimizer`` (LightningCLI's ``OptimizerCallable``; in Python e.g.
            ``functools.partial(torch.optim.AdamW, lr=1e-3)``), given the parameter groups of
            :func:`~lightning_tiger.modules.defaults.default_param_groups`. Default ``None``: Tiger, relative
            lr 5e-3, weight decay 0.01.
        lr_scheduler: ``optimizer -> LRScheduler`` (``LRSchedulerCallable``), stepped every optimizer step.
            Default ``None``: linear warm-up over 5 % of the run, then linear decay to 10 % at its end
            (:func:`~lightning_tiger.modules.defaults.warmup_decay_knots` of ``trainer.estimated_stepping_batches``;
            warm-up then constant when the length is unknown).
        warmup_steps: warm-up of the default schedule (``None``: 5 % of the run + 1 step).
        ema_decay: ``"auto"`` (default): add ``EMAWeightAveraging`` with a decay from the run's length
            (:func:`~lightning_tiger.modules.defaults.auto_ema_decay`: 0.9933 at 1500 steps, 0.99875 at 8000) unless
            the Trainer already has a weight-averaging callback; a float in (0, 1): that decay; ``None``: no EMA.
        num_val_samples: samples drawn for validation metrics (default 1000; 0 disables them).
        val_steps: Euler step counts at which W2 is logged (default (1, 2, 4, 8, 100)).
        val_solver: ``"euler"`` (default) | ``"heun"`` | ``"adaptive"`` for validation sampling.
        val_seed: seed of the fixed validation noise (default 0), so curves are comparable across runs.
        val_noise: the fixed validation noise of the Gaussian source: ``"iid"`` (default, ``torch.randn``) or
            ``"sobol"`` (:func:`~lightning_tiger.modules.sample_validation.sobol_normal`; on moons one trained
            flow scored W2 0.075–0.136 over four i.i.d. seeds, 0.055–0.062 with Sobol noise). A data-to-data
            source always uses its pool.
        init_from: checkpoint to warm-start the network from (its ``state_dict``: EMA weights when the
            checkpoint was written with ``EMAWeightAveraging``). Typical: the previous stage's checkpoint.
        num_plot_trajectories: paths drawn in the validation picture (default 64; 0 disables the picture).
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        data_shape: Sequence[int] = (2,),
        source: str | pl.LightningDataModule = "gaussian",
        mode: str = "flow",
        t_eps: float = 1e-3,
        time_sampling: str = "uniform",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int | None = None,
        ema_decay: float | str | None = "auto",
        num_val_samples: int = 1000,
        val_steps: Sequence[int] = (1, 2, 4, 8, 100),
        val_solver: str = "euler",
        val_seed: int = 0,
        val_noise: str = "iid",
        init_from: str | None = None,
        num_plot_trajectories: int = 64,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if time_sampling not in _TIME_SAMPLING:
            raise ValueError(f"time_sampling must be one of {_TIME_SAMPLING}, got {time_sampling!r}")
        check_real("t_eps", t_eps, low=0.0, high=1.0, high_open=True)
        optimization = Optimization(optimizer, lr_scheduler, warmup_steps, ema_decay)
        check_int("num_val_samples", num_val_samples, low=0)
        if num_val_samples == 1:
            raise ValueError("num_val_samples must be 0 (no sample metrics) or >= 2, got 1")
        val_steps = check_int_sequence("val_steps", val_steps, low=1)
        if val_noise not in _VAL_NOISE:
            raise ValueError(f"val_noise must be one of {_VAL_NOISE}, got {val_noise!r}")
        if val_solver not in SOLVERS:
            raise ValueError(f"val_solver must be one of {SOLVERS}, got {val_solver!r}")
        data_shape = tuple(int(d) for d in data_shape)
        if not data_shape or any(d < 1 for d in data_shape):
            raise ValueError(f"data_shape must be a non-empty list of positive integers, got {data_shape!r}")
        if not (isinstance(source, str) and source == "gaussian") and not isinstance(source, pl.LightningDataModule):
            raise ValueError(f"source must be 'gaussian' or a LightningDataModule, got {source!r}")
        # Source is replaced by its sample pool saved in the checkpoint; net and the optimizer callables are kept
        # when they are config (LightningCLI), left out when they are Python objects (load_rectified_flow(net=...)).
        save_config_hyperparameters(self, objects=("net", "optimizer", "lr_scheduler"), ignore=("source",))
        self.net = net if net is not None else default_net(data_shape)
        self.data_shape = data_shape
        self.mode = mode
        self.t_eps = float(t_eps)
        self.time_sampling = time_sampling
        self.optimization = optimization
        self.num_val_samples = num_val_samples
        self.val_steps = tuple(sorted(set(val_steps)))
        self.val_solver = val_solver
        self.val_seed = int(val_seed)
        self.val_noise = val_noise
        self.num_plot_trajectories = int(num_plot_trajectories)
        self._source_dm = source if isinstance(source, pl.LightningDataModule) else None
        self.source_pool: Tensor | None = None  # [k, *data_shape] for data-to-data transport
        if init_from is not None:
            self.load_net_weights(init_from)

    # ------------------------------------------------------------------ public API
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity ``v(x [batch, *data_shape], t [batch]) -> [batch, *data_shape]`` (t in fp32 under autocast)."""
        return self.net(x, t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)

    def notes_velocity(self) -> Velocity:
        """This flow's velocity in the notes' convention (data at t = 0): ``v'(x, t) = −v(x, 1 − t)``."""
        return flip_time_convention(self.forward)

    def validation_noise(self, n: int) -> Tensor:
        """The fixed source draws ``[n, *data_shape]`` (CPU) validation samples from (``val_noise``, ``val_seed``)."""
        if self.val_noise == "sobol" and self.source_pool is None:
            return sobol_normal(n, self.data_shape, self.val_seed)
        return self.sample_source(n, torch.Generator().manual_seed(self.val_seed))

    def sample_source(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` source points ``[n, *data_shape]`` (Gaussian, or the data-to-data pool), on CPU."""
        if self.source_pool is not None:
            idx = torch.randint(len(self.source_pool), (n,), generator=generator)
            return self.source_pool[idx].clone()
        return torch.randn(n, *self.data_shape, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int = 100,
        solver: str = "euler",
        z0: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        **solver_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Generate ``n`` samples by integrating the flow from t = 0 to 1.

        Args:
            n: number of samples (ignored when ``z0`` is given).
            steps: Euler / Heun steps N (initial step 1/N for the adaptive solver). Default 100.
            solver: ``"euler"`` | ``"heun"`` | ``"adaptive"`` (Dormand–Prince RK45, ``rtol``/``atol`` kwargs).
            z0: fixed start ``[n, *data_shape]``; otherwise drawn from the source with ``generator`` (pass a
                seeded CPU generator for reproducible samples).
            generator: CPU generator for z0.
            return_trajectory: also return the states ``[k + 1, n, *data_shape]``.

        Returns:
            ``z1 [n, *data_shape]`` (on the module's device), or ``(z1, trajectory)``.
        """
        if z0 is None:
            check_int("n", n, low=1)
            z0 = self.sample_source(n, generator)
        sol = self._solve(z0, steps, solver, return_trajectory=return_trajectory, **solver_kwargs)
        if return_trajectory:
            assert sol.trajectory is not None
            return sol.z1, sol.trajectory
        return sol.z1

    @torch.no_grad()
    def flow_metrics(self, z0: Tensor, steps: int = 100) -> dict[str, Tensor]:
        """Straightness S and transport cost ``E||Z_1 − Z_0||²`` of this flow from ``z0`` (Euler; Liu et al.
        2023's straightness S(Z))."""
        z0 = z0.to(self.device, self._param_dtype())
        return _flow_metrics_of(integrate(self.forward, z0, steps, "euler"), z0)

    @torch.no_grad()
    def _solve(self, z0: Tensor, steps: int, solver: str, **kwargs: Any) -> FlowSolution:
        """:func:`integrate` from ``z0 [n, *data_shape]`` with the network in eval mode (mode restored after)."""
        if tuple(z0.shape[1:]) != self.data_shape:
            raise ValueError(f"z0 must have shape [n, *{self.data_shape}], got {tuple(z0.shape)}")
        z0 = z0.to(self.device, self._param_dtype())
        was_training = self.net.training
        self.net.eval()
        try:
            return integrate(self.forward, z0, steps, solver, **kwargs)
        finally:
            self.net.train(was_training)

    #: ``generate_pairs(n, steps=100, batch_size=1000, path=None, *, solver="euler", generator=None, progress=True,
    #: **solver_kwargs) -> (z0, z1)``: ``n`` coupled pairs ``[n, *data_shape]`` (CPU) sampled from this flow, for
    #: reflow or distillation; :func:`~lightning_tiger.data.reflow.generate_reflow_pairs` with this module as the
    #: teacher (``path`` writes ``.pt`` shards that :class:`~lightning_tiger.data.reflow.ReflowPairsDataModule`
    #: reads back).
    generate_pairs = generate_reflow_pairs

    def load_net_weights(self, checkpoint_path: str | os.PathLike[str]) -> None:
        """Copy the network weights (and source pool) of a RectifiedFlowModule checkpoint into this module."""
        ckpt = torch.load(os.fspath(checkpoint_path), map_location="cpu", weights_only=False)
        state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        if not state:
            raise ValueError(f"{checkpoint_path} holds no 'net.*' weights: not a RectifiedFlowModule checkpoint")
        self.net.load_state_dict(state)
        if ckpt.get("rf_source_pool") is not None and self.source_pool is None:
            self.source_pool = ckpt["rf_source_pool"]

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        shape = getattr(dm, "data_shape", None)
        if shape is not None and tuple(shape) != self.data_shape:
            raise ValueError(
                f"data_shape {self.data_shape} of the model does not match the data module's {tuple(shape)}: "
                f"set model data_shape: {list(shape)}"
            )
        if self._source_dm is not None and self.source_pool is None:
            self._source_dm.setup("fit")
            pool = torch.cat([b[0] if isinstance(b, (list, tuple)) else b for b in self._source_dm.train_dataloader()])
            self.source_pool = pool.float()
        if self.mode != "flow" and self.source_pool is None and getattr(dm, "source_pool", None) is not None:
            self.source_pool = dm.source_pool  # reflow of a data-to-data flow: the teacher's source

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rf_source_pool"] = self.source_pool
        checkpoint["rf_data_shape"] = list(self.data_shape)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("rf_source_pool") is not None:
            self.source_pool = checkpoint["rf_source_pool"]

    def configure_optimizers(self) -> Any:
        """``optimizer`` / ``lr_scheduler`` from init, or the defaults (Tiger, warm-up + decay over the run)."""
        return self.optimization.configure_optimizers(self)

    def configure_callbacks(self) -> list[Callback]:
        """``EMAWeightAveraging`` per ``ema_decay``, unless the Trainer already averages weights."""
        return self.optimization.configure_callbacks(self.trainer)

    def _param_dtype(self) -> torch.dtype:
        p = next(self.net.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def _sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.time_sampling == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            u = torch.sigmoid(torch.randn(n, generator=generator))
        return (u * (1.0 - self.t_eps) + self.t_eps).to(self.device)

    def _split_batch(self, batch: Any, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        if self.mode == "flow":
            x1 = batch[0] if isinstance(batch, (list, tuple)) else batch
            x0 = self.sample_source(len(x1), generator).to(x1.device, x1.dtype)
            return x0, x1
        if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
            raise ValueError(f"mode={self.mode!r} expects batches of pairs (z0, z1), e.g. from ReflowPairsDataModule")
        return batch[0], batch[1]

    def compute_loss(self, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        """Velocity-matching loss (flow / reflow) or endpoint loss (distill) on one batch (mean over elements)."""
        x0, x1 = self._split_batch(batch, generator)
        if self.mode == "distill":
            t0 = torch.zeros(len(x0), device=x0.device)
            return (x0 + self(x0, t0) - x1).pow(2).mean()
        t = self._sample_t(len(x0), generator)
        tb = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        xt = tb * x1 + (1 - tb) * x0
        return ((x1 - x0) - self(xt, t)).pow(2).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ------------------------------------------------------------------ validation (SampleValidationMixin)
    def validation_loss(self, batch: Any, batch_idx: int) -> Tensor:
        """:meth:`compute_loss` with time and source draws seeded by ``(val_seed, batch_idx)``."""
        return self.compute_loss(batch, torch.Generator().manual_seed(self.val_seed + 1000 + batch_idx))

    def validate_samples(self, reference: Tensor | None) -> None:
        """W2 at each of ``val_steps`` (1 step in distill mode), straightness, transport cost and a picture."""

        n = self.num_val_samples if reference is None else min(self.num_val_samples, len(reference))
        z0 = self.validation_noise(n)
        steps_list = (1,) if self.mode == "distill" else self.val_steps
        largest = max(steps_list)
        metrics, sol, w2 = None, None, None
        for k in steps_list:
            want_traj = k == largest and self.num_plot_trajectories > 0
            sol = self._solve(z0, k, self.val_solver, return_trajectory=want_traj)
            if k == largest and self.val_solver == "euler":
                # Straightness and transport cost are measured on Euler paths: reuse this integration rather
                # than integrating the same noise again (that doubled the cost of a validation).
                metrics = _flow_metrics_of(sol, z0.to(sol.z1))
            if reference is not None:
                w2 = wasserstein2(sol.z1.float().cpu(), reference[:n])
                self.log(f"val/w2@{k}", w2)
        if metrics is None:
            metrics = self.flow_metrics(z0, steps=largest)
        self.log("val/straightness", metrics["straightness"].float())
        self.log("val/transport_cost", metrics["transport_cost"].float())
        if w2 is not None:
            self.log("hp_metric", w2)
        if sol is not None and self.num_plot_trajectories > 0:
            title = f"{self.mode}: {largest} {self.val_solver} step(s), step {self.global_step}"
            self.log_sample_picture(sol.z1, reference, title, sol.trajectory, max_paths=self.num_plot_trajectories)


def _flow_metrics_of(sol: FlowSolution, z0: Tensor) -> dict[str, Tensor]:
    """``{"straightness", "transport_cost"}`` of an Euler solution from ``z0 [n, *data_shape]`` (float64 scalars)."""
    cost = (sol.z1 - z0).reshape(len(z0), -1).pow(2).sum(1).mean()
    return {"straightness": sol.straightness, "transport_cost": cost.double()}


def load_rectified_flow(
    checkpoint_path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    frozen: bool = True,
    net: nn.Module | None = None,
) -> RectifiedFlowModule:
    """Load a :class:`RectifiedFlowModule` checkpoint written by Lightning (plain Python or LightningCLI).

    The network is rebuilt from the saved hyperparameters (``class_path`` config from the CLI, the pickled
    module from plain Python, or the default net), then its weights come from the checkpoint's
    ``state_dict`` — the EMA weights when the run used ``EMAWeightAveraging`` (Lightning stores the average
    there and the raw weights under ``current_model_state``). Training settings are dropped (the ``optimizer`` /
    ``lr_scheduler`` configs, and ``lr`` / ``weight_decay`` / ``lr_schedule`` of checkpoints written before
    those replaced them), so older checkpoints load too. Uses ``torch.load(weights_only=False)``:
    load only checkpoints you trust.

    Args:
        checkpoint_path: ``.ckpt`` file.
        map_location: device for the weights (default CPU).
        frozen: ``eval()`` and ``requires_grad_(False)`` (default True, the teacher use case).
        net: the network architecture, for checkpoints of modules built in Python with their own ``net``
            (those keep no architecture in their hyperparameters); default: the one the hyperparameters name,
            else the default net for the data shape.
    """
    ckpt = torch.load(os.fspath(checkpoint_path), map_location=map_location, weights_only=False)
    # Dropped: warm start and source (the weights and pool below replace them), and training settings: the
    # optimizer callables, and the optimizer arguments of checkpoints written before those replaced them.
    drop = ("net", "init_from", "source", "optimizer", "lr_scheduler", *LEGACY_OPTIMIZER_HPARAMS)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hp = init_kwargs_from_hparams(RectifiedFlowModule, hparams, drop, where=os.fspath(checkpoint_path))
    net = net if net is not None else instantiate(hparams.get("net"))
    if net is not None and not isinstance(net, nn.Module):
        raise ValueError(f"cannot rebuild the network from the checkpoint's hyperparameters: {net!r}")
    model = RectifiedFlowModule(net=copy.deepcopy(net) if net is not None else None, **hp)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ValueError(
            f"{checkpoint_path}: its weights do not fit the network {type(model.net).__name__}; a module built in "
            "Python with its own net keeps no architecture in the checkpoint: pass the same one as net=..."
        ) from exc
    model.source_pool = ckpt.get("rf_source_pool")
    model.to(map_location)
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model
