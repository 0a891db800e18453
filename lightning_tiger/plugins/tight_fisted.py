"""Tight-fisted Tiger under multi-process data parallelism: a ``DDPStrategy`` that reduces momenta, not gradients.

``Tiger(fold_in_backward=True)`` folds every gradient into its momentum during backward and frees it (Su 2023,
"Tiger: 一个'抠'到极致的优化器", kexue.fm/archives/9512). Under data parallelism each rank then folds its *local*
gradients, and :meth:`~lightning_tiger.optim.Tiger.sync_momenta` averages the ranks' momenta once at the end of
each accumulation window, which is exact: every rank starts the window from the same β·m, so the average of the
ranks' momenta is the single-process momentum of the global batch (``lightning_tiger.optim.fold_sync`` has the
algebra and the non-finite rule).

:class:`TightFistedDDPStrategy` is Lightning's ``DDPStrategy`` (same launchers, process group, distributed
sampler, ``reduce``/``barrier``/``broadcast``, checkpointing) with one change: the module is **not** wrapped in
``torch.nn.parallel.DistributedDataParallel``. Why (measured with 2 gloo ranks on ``8 × Linear(1024, 1024)``,
8.4M parameters; ``benchmarks/distributed.py`` measures the resulting peak memory per rank):

- ``DistributedDataParallel`` allocates its reducer's gradient buckets when it wraps the module (+73 MB of RSS
  for 33.6 MB of parameters), a full gradient-sized buffer even if it never syncs: the memory the
  tight-fisted mode exists to save.
- A DDP communication hook that does not communicate still runs the reducer: on the window's last micro-batch
  it copies every gradient into its buckets and writes the buckets back into ``p.grad`` after the fold hooks
  freed them (16 of 16 gradients alive after ``step()``): a full set of gradient tensors again, which the next
  backward accumulates into before the hooks fold it.
- ``no_sync()`` on every micro-batch (``require_backward_grad_sync = False``) does stop the gradient all-reduce
  (Lightning's ``DDPStrategy`` only blocks it on the non-final micro-batches of a window), but keeps the buckets.

Without the wrapper nothing communicates during backward; the strategy broadcasts rank 0's parameters and
buffers once at setup (what ``DistributedDataParallel``'s constructor does) and attaches ``sync_momenta`` to
every optimizer. Buffers are not broadcast again before each forward (``DistributedDataParallel``'s
``broadcast_buffers``): deterministic buffers (RoPE tables, causal masks) stay identical, but BatchNorm running
statistics become per-rank (rank 0's are checkpointed).

Refused at setup, each with the setting and the alternative named: an optimizer that is not
``Tiger(fold_in_backward=True)`` (it would never see a synchronised gradient), gradient clipping (folded
gradients are gone before it could run), ``precision="16-mixed"`` (its ``GradScaler`` unscales and checks
``.grad``, which fold mode frees). Sharded strategies (FSDP, ``ModelParallelStrategy``) are not this strategy:
there Tiger's fold mode raises at its first fold or step (it needs whole local gradients; FSDP reduce-scatters
them in its own backward hooks).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_tiger.optim import Tiger

__all__ = ["TightFistedDDPStrategy", "broadcast_module_states"]

@torch.no_grad()
def broadcast_module_states(module: nn.Module, src: int = 0, process_group: dist.ProcessGroup | None = None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what ``DistributedDataParallel``'s constructor does).

    One ``broadcast`` per tensor, in ``state_dict`` order; a no-op without an initialised process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src, group=process_group)


class TightFistedDDPStrategy(DDPStrategy):
    """Data parallelism for ``Tiger(fold_in_backward=True)``: no gradient all-reduce; momenta averaged per window.

    Use with ``Trainer(accumulate_grad_batches=k)`` and ``Tiger(..., fold_in_backward=True)`` (``grad_accum_steps=1``):
    per optimizer step, each rank communicates one int64 flags table and one float32 copy of the momenta (in
    buckets of ``bucket_cap_mb``) instead of the gradients, and holds no gradient buffers (see the module docstring
    for why the module is not wrapped in ``DistributedDataParallel``). Exact: equals single-process tight-fisted
    Tiger on the global batch (equal per-rank batch sizes), to float rounding.

    Args:
        bucket_cap_mb: largest float32 bucket of momenta per all-reduce, MiB (default 25, like DDP's).
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            process_group_backend, timeout, start_method: as ``DDPStrategy`` (the Trainer fills in most). Its
            ``DistributedDataParallel`` options (``find_unused_parameters``, ``static_graph``, communication
            hooks, model averaging, ...) do not apply: passing one is a ``TypeError``.

    Example (``examples/configs/trainer/ddp_tight.yaml`` is the CLI form)::

        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TightFistedDDPStrategy(),
                            accumulate_grad_batches=4)
    """

    def __init__(
        self,
        bucket_cap_mb: float = 25.0,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        # DDPStrategy's own arguments only, listed (no **kwargs): its extra keyword arguments go to the
        # DistributedDataParallel wrapper, which this strategy does not use (and LightningCLI would fill them all in)
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a number > 0, got {bucket_cap_mb!r}")
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method)
        self.bucket_cap_mb = float(bucket_cap_mb)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """No ``DistributedDataParallel`` wrapper (no reducer, no gradient buckets): rank 0's states broadcast once."""
        broadcast_module_states(model)
        return model

    def _register_ddp_hooks(self) -> None:
        """No DDP wrapper, hence no communication hooks to register."""

    def setup(self, trainer: pl.Trainer) -> None:
        """``DDPStrategy.setup``, then check the run and attach the momentum reduction to every optimizer."""
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        check_tight_fisted(trainer, self.optimizers, self.precision_plugin)
        for opt in self.optimizers:
            opt.sync_momenta(bucket_cap_mb=self.bucket_cap_mb)


def check_tight_fisted(trainer: pl.Trainer, optimizers: list[torch.optim.Optimizer], precision_plugin: Any) -> None:
    """Raise ``ValueError`` (setting and alternative named) for what tight-fisted data parallelism cannot run."""
    if not optimizers:
        raise ValueError("TightFistedDDPStrategy needs an optimizer: Tiger(..., fold_in_backward=True)")
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, Tiger) or not opt.fold_in_backward:
            what = f"Tiger(fold_in_backward={opt.fold_in_backward})" if isinstance(opt, Tiger) else type(opt).__name__
            raise ValueError(
                f"TightFistedDDPStrategy synchronises Tiger(fold_in_backward=True)'s momenta instead of gradients; "
                f"optimizer {i} is {what}, whose gradients would never be synchronised across ranks. Use "
                "Tiger(..., fold_in_backward=True), or strategy='ddp' for other optimizers."
            )
    if trainer.gradient_clip_val:
        raise ValueError(
            f"gradient_clip_val must be None or 0 with TightFistedDDPStrategy (got {trainer.gradient_clip_val}): "
            "Tiger(fold_in_backward=True) folds and frees every gradient during backward, so clipping would see "
            "none. Use strategy='ddp' with Tiger(fold_in_backward=False) to clip."
        )
    if getattr(precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"precision={getattr(precision_plugin, 'precision', '16-mixed')!r} uses a GradScaler, which unscales and "
            "checks .grad, but Tiger(fold_in_backward=True) folds and frees every gradient during backward: use "
            "precision='bf16-mixed' (no scaler) or '32-true' with TightFistedDDPStrategy."
        )
