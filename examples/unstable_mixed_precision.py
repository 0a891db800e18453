"""Mixed-precision training with corrupted records, with and without NonFiniteGuard.

A small classifier is trained on synthetic data in which one batch in 37 carries a corrupted record (features of 1e38,
e.g. an unparsed sentinel). Under ``bf16-mixed`` nothing protects the run (Lightning's bf16 precision has no
GradScaler): the record overflows to inf in the first matmul, the loss and every gradient become NaN, AdamW writes NaN
into every weight and the run is dead from then on, although Lightning keeps "training". With ``NonFiniteGuard`` the bad
steps are vetoed (no parameter, moment or step-counter change, the LR schedule stays on the real steps) and the run
trains on. Under ``16-mixed`` a GradScaler already skips such steps (it also halves its scale every time); the guard
then counts them and, with ``action="shrink"``, applies Tiger's shrink rule, which the scaler would otherwise make
unreachable.

Everything is logged to TensorBoard (``tensorboard --logdir <logdir>``): ``train/loss``, ``nonfinite/skipped``,
``nonfinite/consecutive`` and the ``optim/...`` telemetry of OptimizerMonitor, one run per sub-directory.

Usage::

    python examples/unstable_mixed_precision.py --logdir runs/unstable [--steps 400] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.callbacks.nonfinite_guard import NonFiniteGuard
from lightning_tiger.callbacks.optimizer_monitor import OptimizerMonitor

CORRUPT_EVERY, CORRUPT_OFFSET, BATCH = 37, 17, 32


def make_data(steps: int, seed: int = 0) -> DataLoader:
    """Gaussian clusters (8 classes, 32 features); batch i with i % 37 == 17 holds one corrupted record."""
    centres = torch.randn(8, 32, generator=torch.Generator().manual_seed(1234)) * 2.0  # the task: same for all
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 8, (steps * BATCH,), generator=g)
    x = centres[y] + 3.0 * torch.randn(steps * BATCH, 32, generator=g)  # overlapping classes: not too easy
    for b in range(CORRUPT_OFFSET, steps, CORRUPT_EVERY):
        x[b * BATCH] = 1e38
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class Classifier(L.LightningModule):
    def __init__(self, optimizer: str = "adamw", lr: float = 3e-3, total_steps: int = 400) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                                 nn.Linear(128, 8))
        self.optimizer_name, self.lr, self.total_steps = optimizer, lr, total_steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x).float(), y)
        self.log("train/loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "tiger":
            from lightning_tiger.optim import Tiger, tiger_param_groups

            opt: torch.optim.Optimizer = Tiger(tiger_param_groups(self), lr=self.lr)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: min(1.0, (t + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(t, self.total_steps) /
                                                                          self.total_steps))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FirstNonFiniteParams(L.Callback):
    """Records the first optimizer step after which some parameter is non-finite (the run is dead from there)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.step is None and not all(bool(torch.isfinite(p).all()) for p in pl_module.parameters()):
            self.step = trainer.global_step


def run(name: str, precision: str, optimizer: str, guard: NonFiniteGuard | None, steps: int, logdir: str,
        lr: float) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Classifier(optimizer, lr=lr, total_steps=steps)
    plugins, prec = None, precision
    if precision == "16-mixed":
        # On CPU precision="16-mixed" silently becomes bf16: pass a real GradScaler.
        plugins, prec = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))], None
    dead = FirstNonFiniteParams()
    callbacks: list[L.Callback] = [OptimizerMonitor(log_every_n_steps=10), dead]
    if guard is not None:
        callbacks.insert(0, guard)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=prec, plugins=plugins, max_epochs=1, callbacks=callbacks,
        logger=TensorBoardLogger(logdir, name=name, default_hp_metric=False), log_every_n_steps=10,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    t0 = time.perf_counter()
    trainer.fit(model, make_data(steps))
    seconds = time.perf_counter() - t0
    # Evaluate on fresh clean data in fp32.
    x, y = (t for t in make_data(20, seed=1).dataset.tensors)
    clean = torch.ones(len(x), dtype=torch.bool)
    clean[CORRUPT_OFFSET * BATCH] = False
    with torch.no_grad():
        logits = model.net(x[clean])
        loss = nn.functional.cross_entropy(logits, y[clean]).item()
        acc = (logits.argmax(-1) == y[clean]).float().mean().item()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return {
        "run": name, "precision": precision, "optimizer": optimizer,
        "guard": "-" if guard is None else guard.action, "params finite": finite,
        "NaN from step": "-" if dead.step is None else dead.step,
        "eval loss": loss, "eval acc": acc, "skipped": "-" if guard is None else guard.skipped,
        "final scale": "-" if scaler is None else f"{scaler.get_scale():.0f}", "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", default="runs/unstable_mixed_precision")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="120 steps per run (smoke test)")
    args = parser.parse_args()
    steps = 120 if args.quick else args.steps
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (and leaves a core free)
    configs = [
        ("bf16_adamw_unguarded", "bf16-mixed", "adamw", None),
        ("bf16_adamw_guard_skip", "bf16-mixed", "adamw", NonFiniteGuard(action="skip", verbose=False)),
        ("fp16_scaler_adamw_unguarded", "16-mixed", "adamw", None),
        ("fp16_scaler_tiger_guard_shrink", "16-mixed", "tiger", NonFiniteGuard(action="shrink", verbose=False)),
    ]
    rows = []
    for name, precision, optimizer, guard in configs:
        lr = 3e-3 if optimizer == "adamw" else 2e-3
        rows.append(run(name, precision, optimizer, guard, steps, args.logdir, lr))
    cols = ["run", "precision", "optimizer", "guard", "params finite", "NaN from step", "eval loss", "eval acc",
            "skipped", "final scale", "seconds"]
    fmt = {"eval loss": "{:.4f}", "eval acc": "{:.3f}", "seconds": "{:.1f}"}
    table = [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    n_bad = len(range(CORRUPT_OFFSET, steps, CORRUPT_EVERY))
    print(f"\n{steps} steps, {n_bad} batches with a corrupted record. TensorBoard: tensorboard --logdir {args.logdir}")
    unguarded, guarded = rows[0], rows[1]
    if not unguarded["params finite"] and guarded["params finite"]:
        print("bf16: the unguarded run diverged to NaN; the guarded run survived "
              f"({guarded['skipped']} steps vetoed, eval acc {guarded['eval acc']:.3f}).")


if __name__ == "__main__":
    main()
