"""UseOptimizer: the user's optimizer is replaced by ours, their schedules follow, checkpoints record it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.callbacks.use_optimizer import UseOptimizer
from lightning_tiger.optim.tiger import Tiger

N_BATCHES = 6


class UserModule(L.LightningModule):
    """An existing project's module: AdamW (two groups: decay / no decay) and a schedule of its own."""

    def __init__(self, schedule: str = "warmup") -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.l1 = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.schedule = schedule

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        logits = self.head(self.ln(torch.relu(self.l1(self.emb(tokens)))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(1, 1).flatten())

    def configure_optimizers(self) -> Any:
        decay = [self.emb.weight, self.l1.weight, self.head.weight]
        no_decay = [self.l1.bias, self.ln.weight, self.ln.bias]
        opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-4,
                                weight_decay=0.1)
        if self.schedule == "none":
            return opt
        if self.schedule == "warmup":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.schedule == "cosine":  # chainable form: computes from the group's current lr
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=N_BATCHES)
            return [opt], [{"scheduler": sched, "interval": "step"}]
        if self.schedule == "sequential":
            warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=2)
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
            sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[2])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        raise ValueError(self.schedule)


class RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 10, (N_BATCHES * 4, 5), generator=g)), batch_size=4)


def run(root: Path, callbacks: list[Callback], schedule: str = "warmup", **kw: Any) -> tuple[L.Trainer, UserModule]:
    torch.manual_seed(0)
    model = UserModule(schedule)
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=callbacks, **kw)
    trainer.fit(model, loader())
    return trainer, model


def test_replaces_with_tiger_groups_and_schedule_follows(tmp_path: Path) -> None:
    rec = RecordLR()
    trainer, model = run(tmp_path, [UseOptimizer(Tiger, lr=2e-3, weight_decay=0.05), rec])
    opt = trainer.optimizers[0]
    assert isinstance(opt, Tiger)
    # Groups by kind (hand-written from Tiger's table, Su 2023, kexue.fm/archives/9512), split along the user's
    # decay/no-decay groups.
    kinds = {id(p): (g["kind"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    expected = {
        model.emb.weight: ("embedding", 0.05), model.l1.weight: ("matrix", 0.05),
        model.head.weight: ("matrix", 0.05), model.l1.bias: ("bias", 0.0),
        model.ln.weight: ("norm_scale", 0.0), model.ln.bias: ("norm_shift", 0.0),
    }
    assert kinds == {id(p): v for p, v in expected.items()}
    assert all(g["lr"] > 0 for g in opt.param_groups)
    # The user's warm-up lambda now drives Tiger's lr: 2e-3 * min(1, (t + 1) / 4) at step t.
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.optimizer is opt
    for t, lrs in enumerate(rec.lrs):
        assert lrs == pytest.approx([2e-3 * min(1.0, (t + 1) / 4)] * len(opt.param_groups))
    assert sched.base_lrs == [2e-3] * len(opt.param_groups)
    assert "configure_optimizers" not in vars(model)


@pytest.mark.parametrize("schedule", ["cosine", "sequential"])
def test_chainable_and_sequential_schedules(tmp_path: Path, schedule: str) -> None:
    rec = RecordLR()
    run(tmp_path, [UseOptimizer("lightning_tiger.optim.Tiger", {"lr": 1e-3}), rec], schedule=schedule)

    def cosine(t: int, total: int) -> float:
        return 1e-3 * (1 + math.cos(math.pi * t / total)) / 2

    if schedule == "cosine":
        expected = [cosine(t, N_BATCHES) for t in range(N_BATCHES)]
    else:  # LinearLR 0.25 -> 1 over 2 steps, then cosine over 4 from the peak
        expected = [1e-3 * 0.25, 1e-3 * 0.625] + [cosine(t, 4) for t in range(4)]
    got = [lrs[0] for lrs in rec.lrs]
    assert got == pytest.approx(expected, rel=1e-6)
    assert all(len(set(lrs)) == 1 for lrs in rec.lrs)


def test_plain_groups_for_other_optimizers(tmp_path: Path) -> None:
    from lightning_tiger.optim import Lion

    trainer, _ = run(tmp_path, [UseOptimizer(Lion, lr=1e-4, weight_decay=1.0)], schedule="none")
    opt = trainer.optimizers[0]
    assert isinstance(opt, Lion)
    assert [len(g["params"]) for g in opt.param_groups] == [3, 3]
    assert [g["weight_decay"] for g in opt.param_groups] == [1.0, 0.0]  # the user's no-decay group is kept
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-4]  # AdamW's 3e-4 is not a Lion lr


def test_recorded_in_checkpoint_hparams_and_resume(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="logs")
    cb = UseOptimizer(Tiger, lr=2e-3, beta=0.945)
    trainer, _ = run(tmp_path, [cb], logger=logger)
    ckpt_path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    record = ckpt["callbacks"]["UseOptimizer"]
    assert record["optimizer_class"] == "lightning_tiger.optim.tiger.Tiger"
    assert record["optimizer_kwargs"] == {"lr": 2e-3, "beta": 0.945}
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["use_optimizer/class"] == "lightning_tiger.optim.tiger.Tiger"
    assert hparams["use_optimizer/beta"] == 0.945
    # Resuming restores Tiger's state into the replaced optimizer (groups and momenta line up).
    torch.manual_seed(0)
    model = UserModule()
    trainer2 = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[UseOptimizer(Tiger, lr=2e-3, beta=0.945)])
    trainer2.fit(model, loader(), ckpt_path=ckpt_path)
    assert isinstance(trainer2.optimizers[0], Tiger) and trainer2.global_step == 2 * N_BATCHES
    with pytest.warns(UserWarning, match="trained with lightning_tiger.optim.tiger.Tiger"):
        UseOptimizer("AdamW").load_state_dict(record)


def test_matches_configuring_tiger_directly(tmp_path: Path) -> None:
    """The swap is invisible: same parameters as a module whose configure_optimizers builds the same Tiger."""
    from lightning_tiger.optim import tiger_param_groups

    class Direct(UserModule):
        def configure_optimizers(self) -> Any:
            groups = tiger_param_groups(self, weight_decay=0.01)
            # same order as UseOptimizer's split along the user's two groups
            decay_ids = {id(self.emb.weight), id(self.l1.weight), id(self.head.weight)}
            split = []
            for g in groups:
                for part in ([p for p in g["params"] if id(p) in decay_ids],
                             [p for p in g["params"] if id(p) not in decay_ids]):
                    if part:
                        split.append({**g, "params": part})
            opt = Tiger(split, lr=1e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    _, swapped = run(tmp_path / "a", [UseOptimizer(Tiger, lr=1e-3)])
    torch.manual_seed(0)
    direct = Direct()
    L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path / "b").fit(direct, loader())
    for (name, a), b in zip(swapped.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), name


def test_yaml_config_and_validation() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--cb", type=UseOptimizer)
    cfg = parser.parse_string(
        "cb:\n  class_path: lightning_tiger.callbacks.use_optimizer.UseOptimizer\n  init_args:\n"
        "    optimizer_class: lightning_tiger.optim.Tiger\n    optimizer_kwargs: {lr: 0.002, beta: 0.945}\n"
    )
    cb = getattr(parser, "instantiate", parser.instantiate_classes)(cfg).cb
    assert cb.optimizer_class is Tiger and cb.optimizer_kwargs == {"lr": 0.002, "beta": 0.945}
    with pytest.raises(TypeError, match="does not accept"):
        UseOptimizer(Tiger, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="optimizer_class"):
        UseOptimizer(nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be imported"):
        UseOptimizer("no.such.Optimizer")
    with pytest.raises(ValueError, match="param_groups"):
        UseOptimizer(Tiger, param_groups="all")  # type: ignore[arg-type]


def test_rebinding_plateau_and_one_cycle_without_trainer() -> None:
    """``replace`` on a raw configure_optimizers result: per-group lists and scheduler-owned keys follow."""
    model = UserModule()
    opt = torch.optim.AdamW([{"params": [model.emb.weight, model.l1.weight, model.head.weight]},
                             {"params": [model.l1.bias, model.ln.weight, model.ln.bias], "weight_decay": 0.0}],
                            lr=3e-4)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=[1e-5, 2e-5])
    conf = {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "loss"}}
    out = UseOptimizer(Tiger, lr=3e-3).replace(conf, model)
    new = out["optimizer"]
    assert isinstance(new, Tiger) and out["lr_scheduler"]["monitor"] == "loss" and plateau.optimizer is new
    old_group = [0 if p.ndim > 1 else 1 for g in new.param_groups for p in g["params"][:1]]
    assert plateau.min_lrs == pytest.approx([[1e-4, 2e-4][i] for i in old_group])  # scaled by 3e-3 / 3e-4
    plateau.step(1.0)
    plateau.step(2.0)  # no improvement: halve
    assert [g["lr"] for g in new.param_groups] == pytest.approx([1.5e-3] * len(new.param_groups))

    # OneCycleLR: the passed lr replaces the schedule's base (initial_lr = max_lr / div_factor).
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    one = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=0.1, total_steps=10, cycle_momentum=False,
                                              div_factor=10.0)
    out2 = UseOptimizer("lightning_tiger.optim.Tiger", lr=1e-3).replace(([opt2], [one]), model)
    new2 = out2[0][0]
    assert all(g["lr"] == pytest.approx(1e-3) and g["max_lr"] == pytest.approx(1e-2) for g in new2.param_groups)
    for _ in range(3):
        new2.step()
        one.step()
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=1e-2, total_steps=10, cycle_momentum=False,
                                              div_factor=10.0)
    for _ in range(3):
        ref_opt.step()
        ref.step()
    assert [g["lr"] for g in new2.param_groups] == pytest.approx([ref_opt.param_groups[0]["lr"]] * len(
        new2.param_groups))
