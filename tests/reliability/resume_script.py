"""Training process for the kill-and-resume tests (run as ``python -m tests.reliability.resume_script``).

Rectified flow on moons with Tiger + PiecewiseLinearLR + NonFiniteGuard (NaN gradients injected at fixed global
steps) + EMAWeightAveraging + RNGStateCheckpoint + ResumableBatchSampler, checkpoints every ``--every`` steps
through VerifiedCheckpointIO. ToyDataModule shuffles with a plain ``DataLoader(shuffle=True)`` (its order does
not survive a mid-epoch resume), so the dataset is wrapped here with :class:`ResumableBatchSampler`.

Prints ``STEP <n>`` at the start of every batch and ``WRITING <path>`` when a slowed checkpoint write is half
done, so that the test can SIGKILL at a chosen point. With ``--resume`` it resumes from the newest checkpoint
that loads (a corrupt one is reported and skipped). At the end it writes every piece of training state to
``--out``.
"""

from __future__ import annotations

import argparse
import builtins
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import lightning_tiger.plugins.checkpoint_io as checkpoint_io
from lightning_tiger.callbacks import NonFiniteGuard, RNGStateCheckpoint
from lightning_tiger.data import ResumableBatchSampler, sample_toy
from lightning_tiger.modules import RectifiedFlowModule
from lightning_tiger.plugins import CorruptCheckpointError, VerifiedCheckpointIO

FAULT_STEPS = (7, 23)
NUM_SAMPLES, BATCH = 384, 32  # 12 batches per epoch: resume points fall inside epochs


class Flow(RectifiedFlowModule):
    """Records the data order and injects NaN gradients at FAULT_STEPS; Tiger + PiecewiseLinearLR."""

    def __init__(self, step_sleep: float = 0.0) -> None:
        # net=None: the default network, built from data_shape. A Python-built ``net`` is pickled into hparams,
        # and Lightning's default ``weights_only`` resume then refuses the checkpoint (see
        # test_checkpoint_compat.py::test_rectified_flow_with_custom_net_resumes).
        super().__init__(ema_decay=None)
        self.step_sleep = step_sleep
        self.seen: list[torch.Tensor] = []
        self._hook: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, idx = batch
        self.seen.append(idx.clone())
        print(f"STEP {self.trainer.global_step}", flush=True)
        if self.step_sleep:
            time.sleep(self.step_sleep)  # the kill lands in here, inside the step
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.trainer.global_step in FAULT_STEPS:
            p = next(self.net.parameters())
            self._hook = p.register_hook(lambda g: torch.full_like(g, float("nan")))
        return super().training_step(x, batch_idx)

    def configure_optimizers(self) -> Any:
        from lightning_tiger.optim import PiecewiseLinearLR, Tiger, tiger_param_groups

        opt = Tiger(tiger_param_groups(self.net, weight_decay=0.01), lr=0.01)
        sched = PiecewiseLinearLR(opt, {10: 1.0, 40: 0.1})
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["seen"] = [t.clone() for t in self.seen]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.seen = list(checkpoint["seen"])


class Moons(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        x = sample_toy("moons", NUM_SAMPLES, generator=torch.Generator().manual_seed(11))
        self.dataset = TensorDataset(x, torch.arange(NUM_SAMPLES))

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableBatchSampler(NUM_SAMPLES, BATCH, seed=5).attach(self.trainer)
        return DataLoader(self.dataset, batch_sampler=sampler)


class Dump(L.Callback):
    """Writes all training state at the end (before EMAWeightAveraging copies the average into the model)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
        guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
        state = {
            "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in ema._average_model.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "guard": guard.state_dict(),
            "seen": torch.stack(pl_module.seen),
            "global_step": trainer.global_step,
            "rng": torch.get_rng_state(),
        }
        torch.save(state, self.out)


_real_open = builtins.open


class _SlowFile:
    """Writes the first half, announces it, sleeps (the kill lands here), then writes the rest."""

    def __init__(self, f: Any, path: str, sleep: float) -> None:
        self._f, self._path, self._sleep = f, path, sleep

    def write(self, data: Any) -> int:
        view = memoryview(data)
        half = len(view) // 2
        n = self._f.write(view[:half])
        self._f.flush()
        print(f"WRITING {self._path}", flush=True)
        time.sleep(self._sleep)
        return n + self._f.write(view[half:])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _SlowFile:
        self._f.__enter__()
        return self

    def __exit__(self, *a: Any) -> Any:
        return self._f.__exit__(*a)


def slow_down_save(index: int, sleep: float) -> None:
    """Make the ``index``-th checkpoint write (1-based, .ckpt files only) slow, via VerifiedCheckpointIO's own
    code path (its module-level ``open`` is shadowed; the atomic-write logic itself is untouched)."""
    count = {"n": 0}

    def slow_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = _real_open(file, mode, *args, **kwargs)
        name = str(file)
        if "w" in mode and ".ckpt.tmp-" in name:
            count["n"] += 1
            if count["n"] == index:
                return _SlowFile(f, name, sleep)
        return f

    checkpoint_io.open = slow_open  # type: ignore[attr-defined]


def newest_loadable(ckpt_dir: Path) -> str | None:
    """The newest ``step=N.ckpt`` that VerifiedCheckpointIO loads; corrupt ones are reported and skipped."""
    files = sorted(ckpt_dir.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]), reverse=True)
    io = VerifiedCheckpointIO()
    for f in files:
        try:
            io.load_checkpoint(f, weights_only=False)
        except CorruptCheckpointError as exc:
            print(f"CORRUPT {f}: {exc}", flush=True)
            continue
        return str(f)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--slow-save", type=int, default=0, help="make the N-th checkpoint write slow")
    parser.add_argument("--save-sleep", type=float, default=30.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.slow_save:
        slow_down_save(args.slow_save, args.save_sleep)
    L.seed_everything(0, verbose=False)
    module, dm = Flow(step_sleep=args.step_sleep), Moons()
    callbacks = [
        Dump(args.out) if args.out else L.Callback(),
        NonFiniteGuard(max_consecutive=3, verbose=False),
        EMAWeightAveraging(decay=0.9),
        RNGStateCheckpoint(),
        ModelCheckpoint(dirpath=args.dir, filename="{step}", every_n_train_steps=args.every, save_top_k=-1),
    ]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.max_steps, callbacks=callbacks, plugins=[VerifiedCheckpointIO()],
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.dir,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    ckpt_path = newest_loadable(args.dir) if args.resume else None
    print(f"RESUME {ckpt_path}", flush=True)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    print("DONE", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
