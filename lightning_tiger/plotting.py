"""Sample pictures for the diffusion / flow modules: scatter plots, image grids, TensorBoard logging.

Figures are built with :class:`matplotlib.figure.Figure` and an Agg canvas, never through ``pyplot``: no global
figure registry, no backend switch, nothing leaks between calls (headless CI, DDP workers). Helpers that log
or save a figure close it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_tiger.validation import check_int


def new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _np(x: Tensor) -> Any:
    return x.detach().float().cpu().numpy()


def scatter_figure(samples: Tensor, reference: Tensor | None = None, trajectories: Tensor | None = None,
                   title: str = "", *, max_trajectories: int = 64, figsize: tuple[float, float] = (4.5, 4.5)
                   ) -> Any:
    """Scatter of 2-D samples, optionally over a reference sample and with sampling paths.

    Args:
        samples: ``[n, 2]`` generated points (blue).
        reference: ``[m, 2]`` data points (grey, drawn underneath) or ``None``.
        trajectories: ``[steps, n', 2]`` sampler paths (first ``max_trajectories`` drawn as thin lines, start
            points marked) or ``None``.
        title: axes title.
        max_trajectories: cap on drawn paths (default 64) so the picture stays readable.
        figsize: inches.

    Returns:
        A ``matplotlib.figure.Figure`` (caller closes it, or passes it to :func:`log_figure` /
        :func:`save_figure`, which do).
    """
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must have shape [n, 2], got {tuple(samples.shape)}")
    if reference is not None and (reference.ndim != 2 or reference.shape[1] != 2):
        raise ValueError(f"reference must have shape [m, 2], got {tuple(reference.shape)}")
    if trajectories is not None and (trajectories.ndim != 3 or trajectories.shape[2] != 2):
        raise ValueError(f"trajectories must have shape [steps, n, 2], got {tuple(trajectories.shape)}")
    fig = new_figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    if reference is not None:
        ref = _np(reference)
        ax.scatter(ref[:, 0], ref[:, 1], s=3, c="0.65", alpha=0.6, label="data", linewidths=0)
    if trajectories is not None:
        traj = _np(trajectories[:, :max_trajectories])
        for i in range(traj.shape[1]):
            ax.plot(traj[:, i, 0], traj[:, i, 1], lw=0.5, c="tab:orange", alpha=0.5)
        ax.scatter(traj[0, :, 0], traj[0, :, 1], s=6, c="tab:orange", marker="x", linewidths=0.7,
                   label="start")
    pts = _np(samples)
    ax.scatter(pts[:, 0], pts[:, 1], s=3, c="tab:blue", alpha=0.8, label="samples", linewidths=0)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def image_grid(images: Tensor, nrow: int = 8, *, padding: int = 1,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Tile images into one RGB picture.

    Args:
        images: ``[n, c, h, w]`` with c ∈ {1, 3} (grey is repeated to RGB).
        nrow: images per row (default 8).
        padding: pixels between tiles (filled with 1 = white), default 1.
        value_range: (low, high) mapped to [0, 1] then clamped; default (-1, 1), the range of the data modules.

    Returns:
        ``[3, H, W]`` float32 in [0, 1], H = rows·(h + padding) + padding, W = nrow·(w + padding) + padding.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [n, c, h, w] with c in (1, 3), got {tuple(images.shape)}")
    nrow = check_int("nrow", nrow, low=1)
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must satisfy high > low, got {value_range}")
    x = ((images.detach().float().cpu() - low) / (high - low)).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    ncol = min(nrow, max(n, 1))
    rows = max(math.ceil(n / ncol), 1)
    grid = torch.ones(3, rows * (h + padding) + padding, ncol * (w + padding) + padding)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def _tensorboard_loggers(logger: Any) -> list[Any]:
    if logger is None:
        return []
    loggers = logger if isinstance(logger, Iterable) else [logger]
    return [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]


def _tensorboard_writers(logger: Any) -> list[Any]:
    return [lg.experiment for lg in _tensorboard_loggers(logger)]


def _sample_path(logger: Any, tag: str, step: int) -> str:
    """``<log_dir>/samples/<tag>_step<step>.png``: the picture beside TensorBoard's copy, for a quick look."""
    return os.path.join(logger.log_dir, "samples", f"{tag.replace('/', '_')}_step{step:06d}.png")


def log_figure(logger: Any, tag: str, figure: Any, step: int) -> None:
    """``add_figure`` on every TensorBoardLogger in ``logger`` (one logger, a list, or ``None``), also saved as
    ``<log_dir>/samples/<tag>_step<step>.png``; closes the figure.

    Other loggers (CSV, W&B, …) and ``None`` are skipped silently.
    """
    for lg in _tensorboard_loggers(logger):
        lg.experiment.add_figure(tag, figure, global_step=step, close=False)
        path = _sample_path(lg, tag, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        figure.savefig(path, dpi=120, bbox_inches="tight")
    close_figure(figure)


def log_image(logger: Any, tag: str, image: Tensor, step: int) -> None:
    """``add_image`` of a ``[3, H, W]`` picture in [0, 1] on every TensorBoardLogger in ``logger`` (and PNG)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape [3, H, W], got {tuple(image.shape)}")
    for lg in _tensorboard_loggers(logger):
        lg.experiment.add_image(tag, image, global_step=step, dataformats="CHW")
        save_image(image, _sample_path(lg, tag, step))


def save_figure(figure: Any, path: str | os.PathLike[str], dpi: int = 150) -> None:
    """Write ``figure`` to ``path`` (parent folders created; format from the suffix) and close it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    close_figure(figure)


def save_image(image: Tensor, path: str | os.PathLike[str], scale: int = 4) -> None:
    """Write a ``[3, H, W]`` picture in [0, 1] as PNG, upscaled ``scale``× by pixel repetition."""
    import matplotlib.image

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape [3, H, W], got {tuple(image.shape)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    big = image.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    matplotlib.image.imsave(os.fspath(path), big.permute(1, 2, 0).clamp(0, 1).numpy())


def close_figure(figure: Any) -> None:
    """Release a figure's memory (no pyplot registry is involved, so clearing is enough)."""
    figure.clear()
