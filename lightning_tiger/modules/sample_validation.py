"""Validation by sampling, shared by the diffusion modules (rectified flow, score matching).

A generative model is validated by drawing samples and comparing them with held-out data. Two details are
easy to get wrong, and both modules get them right here once:

- **EMA weights.** Lightning's weight-averaging callbacks (``EMAWeightAveraging``) swap the averaged weights in
  at ``on_validation_epoch_start`` and back in the *callbacks'* ``on_validation_epoch_end``, which runs before
  the module's own ``on_validation_epoch_end``. Samples drawn in that hook would come from the raw weights, so
  :class:`SampleValidationMixin` draws them inside ``validation_step`` (first batch), where the averaged
  weights are in.
- **The sanity check.** Lightning discards what is logged during the sanity check, so sampling is skipped there
  (it would only cost time).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_tiger import plotting

__all__ = ["SampleValidationMixin", "sobol_normal"]


def sobol_normal(n: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """Quasi-Monte Carlo standard normal noise ``[n, *shape]`` (fp32, CPU): the first ``n`` points of a scrambled
    Sobol sequence (Sobol 1967; Owen 1995 scrambling, ``torch.quasirandom.SobolEngine``) through the normal
    inverse CDF. Evenly spread noise gives evenly spread samples, so W2 against a reference measures the model
    more than the draw.
    """
    dim = math.prod(shape)
    u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    # Scrambled points lie in (0, 1) almost surely; the clamp only guards ndtri against an exact 0 or 1.
    u = u.clamp(1e-12, 1.0 - 1e-12)
    return torch.special.ndtri(u).to(torch.float32).reshape(n, *shape)


class SampleValidationMixin:
    """``validation_step`` = loss on the batch, then (first batch only) :meth:`validate_samples`.

    For a ``LightningModule`` subclass (list the mixin first). The subclass provides ``num_val_samples``
    (0 disables sampling), :meth:`validation_loss` and :meth:`validate_samples`; it gets
    :meth:`validation_reference` (the data module's held-out samples) and :meth:`log_sample_picture`.
    """

    num_val_samples: int

    def validation_loss(self, batch: Any, batch_idx: int) -> Tensor:
        """The training loss on a validation batch, with seeded randomness (a function of the weights only)."""
        raise NotImplementedError

    def validate_samples(self, reference: Tensor | None) -> None:
        """Draw samples with the current (EMA, when averaging) weights and log metrics against ``reference``.

        Args:
            reference: held-out data ``[n_ref, *data_shape]`` (CPU), or ``None`` when the data module has none.
        """
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Log ``val/loss``; on the first batch (not during the sanity check) also :meth:`validate_samples`."""
        loss = self.validation_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # type: ignore[attr-defined]
        if batch_idx == 0 and self.num_val_samples > 0 and not self.trainer.sanity_checking:  # type: ignore[attr-defined]
            self.validate_samples(self.validation_reference())
        return loss

    def validation_reference(self) -> Tensor | None:
        """``trainer.datamodule.val_reference()`` as fp32 on CPU ``[n_ref, *data_shape]``, or ``None``."""
        fn = getattr(self.trainer.datamodule, "val_reference", None)  # type: ignore[attr-defined]
        return fn().float().cpu() if callable(fn) else None

    def log_sample_picture(
        self, samples: Tensor, reference: Tensor | None, title: str, trajectories: Tensor | None = None,
        max_paths: int = 64,
    ) -> None:
        """Log a picture of the samples to every TensorBoard logger (rank 0; a PNG beside the logs too).

        2-D data: a scatter over the reference, with up to ``max_paths`` sampling paths when ``trajectories``
        ``[steps + 1, n, 2]`` are given (time axis thinned to <= 101 points). Images ``[n, c, h, w]``: an 8 × 8
        grid. Other shapes: nothing.

        Args:
            samples: ``[n, *data_shape]``.
            reference: ``[n_ref, *data_shape]`` or ``None``.
            title: the scatter's title.
            trajectories: optional paths ``[steps + 1, n, 2]`` (2-D data only).
            max_paths: paths drawn at most.
        """
        trainer = self.trainer  # type: ignore[attr-defined]
        if trainer.global_rank != 0 or not self.loggers:  # type: ignore[attr-defined]
            return
        step = int(self.global_step)  # type: ignore[attr-defined]
        samples = samples.detach().float().cpu()
        if samples.ndim == 2 and samples.shape[1] == 2:
            paths = None
            if trajectories is not None and max_paths > 0:
                stride = max(1, math.ceil((trajectories.shape[0] - 1) / 100))
                paths = trajectories[::stride, :max_paths].detach().float().cpu()
            ref = None if reference is None else reference.float().cpu()
            fig = plotting.scatter_figure(samples, ref, trajectories=paths, title=title)
            plotting.log_figure(self.loggers, "val/samples", fig, step)  # type: ignore[attr-defined]
        elif samples.ndim == 4:
            with torch.no_grad():
                grid = plotting.image_grid(samples[:64], nrow=8)
            plotting.log_image(self.loggers, "val/samples", grid, step)  # type: ignore[attr-defined]
