"""OptimizerMonitor: logged values against a hand computation from the raw tensors of the same steps."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.callbacks.optimizer_monitor import OptimizerMonitor

N_BATCHES = 6


class LM(L.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.l1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 12)
        self.optimizer_name = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        logits = self.head(self.ln(torch.tanh(self.l1(self.emb(tokens)))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(1, 1).flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "tiger":
            from lightning_tiger.optim import Tiger, tiger_param_groups

            return Tiger(tiger_param_groups(self), lr=3e-3)
        decay = [self.emb.weight, self.l1.weight, self.head.weight]
        rest = [self.l1.bias, self.ln.weight, self.ln.bias, self.head.bias]
        return torch.optim.AdamW([{"params": decay}, {"params": rest, "lr": 5e-3, "weight_decay": 0.0}], lr=1e-2)


class Recorder(Callback):
    """Raw tensors around every optimizer step: θ before/after, g, m before."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        rec: dict[str, Any] = {"groups": []}
        for g in optimizer.param_groups:
            entries = []
            for p in g["params"]:
                st = optimizer.state.get(p, {})
                m = st.get("momentum", st.get("exp_avg"))
                entries.append({
                    "theta": p.detach().double().clone(),
                    "grad": p.grad.detach().double().clone(),
                    "m": None if m is None else m.detach().double().clone(),
                    "p": p,
                })
            rec["groups"].append((g.get("kind"), float(g["lr"]), entries))
        self.steps.append(rec)

    def on_train_batch_end(self, *args: Any) -> None:
        for _, _, entries in self.steps[-1]["groups"]:
            for e in entries:
                e["after"] = e["p"].detach().double().clone()


def expected_metrics(rec: dict[str, Any], tiger: bool) -> dict[str, float]:
    """Straight from the definitions (float64, explicit loops)."""
    all_e = [e for _, _, entries in rec["groups"] for e in entries]
    n = sum(e["theta"].numel() for e in all_e)
    param_rms = math.sqrt(sum(float((e["theta"] ** 2).sum()) for e in all_e) / n)
    grad_rms = math.sqrt(sum(float((e["grad"] ** 2).sum()) for e in all_e) / n)
    update_rms = math.sqrt(sum(float(((e["after"] - e["theta"]) ** 2).sum()) for e in all_e) / n)
    unchanged = sum(int((e["after"] == e["theta"]).sum()) for e in all_e) / n
    means, mins, maxs = [], [], []
    for kind, lr, entries in rec["groups"]:
        for e in entries:
            theta = e["theta"]
            if not tiger:
                eta = torch.tensor([lr], dtype=torch.float64)
            elif kind in ("bias", "norm_scale", "norm_shift"):
                eta = torch.tensor([0.5 * lr], dtype=torch.float64)
            else:
                floor = 0.1 / math.sqrt(theta.numel() / theta.shape[0])
                rows = theta.reshape(theta.shape[0], -1) if kind == "embedding" else theta.reshape(1, -1)
                eta = lr * (rows**2).mean(dim=1).sqrt().clamp_min(floor)
            means.append(float(eta.mean()))
            mins.append(float(eta.min()))
            maxs.append(float(eta.max()))
    out = {
        "param_rms": param_rms, "grad_rms": grad_rms, "update_rms": update_rms, "update_rel": update_rms / param_rms,
        "lr_mean": sum(means) / len(means), "lr_min": min(mins), "lr_max": max(maxs), "unchanged": unchanged,
    }
    if all(e["m"] is not None for e in all_e):
        agree = sum(int((torch.sign(e["m"]) == torch.sign(e["grad"])).sum()) for e in all_e)
        out["sign_agreement"] = agree / n
    return out


@pytest.mark.parametrize("optimizer", ["tiger", "adamw"])
def test_values_match_hand_computation(tmp_path: Path, optimizer: str) -> None:
    if optimizer == "tiger":
        pytest.importorskip("lightning_tiger.optim.tiger")
    torch.manual_seed(0)
    monitor = OptimizerMonitor(log_every_n_steps=2)
    rec = Recorder()
    calls: list[int] = []
    orig = monitor.collect_pre_step

    def counting(opt: Any) -> Any:
        calls.append(1)
        return orig(opt)

    monitor.collect_pre_step = counting  # type: ignore[method-assign]
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, log_every_n_steps=50,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[monitor, rec])
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 12, (N_BATCHES * 4, 7), generator=g)), batch_size=4)
    trainer.fit(LM(optimizer), data)

    assert len(calls) == N_BATCHES // 2  # nothing is collected on non-logging steps
    name = "Tiger" if optimizer == "tiger" else "AdamW"
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(f"optim/{name}/param_rms")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    for row in rows:
        step = int(row["step"])
        exp = expected_metrics(rec.steps[step], tiger=optimizer == "tiger")
        for key, value in exp.items():
            got = float(row[f"optim/{name}/{key}"])
            assert got == pytest.approx(value, rel=2e-5, abs=1e-12), (step, key)
    if optimizer == "tiger":  # sanity of the meaning: Tiger's matrix update is ≈ lr·RMS(θ), so update_rel ~ lr
        assert 1e-4 < float(rows[-1][f"optim/{name}/update_rel"]) < 1e-2


def test_name_dedup_and_validation() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps"):
        OptimizerMonitor(log_every_n_steps=0)

    class Two(L.LightningModule):
        pass

    mon = OptimizerMonitor()
    a, b = (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2))

    class FakeTrainer:
        def __init__(self) -> None:
            self.optimizers = [a, b]

    mon.on_fit_start(FakeTrainer(), Two())  # type: ignore[arg-type]
    assert mon._names == {id(a): "SGD", id(b): "SGD-1"}


@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_stall_warning_when_updates_are_rounded_away(stochastic_rounding: bool) -> None:
    from lightning_tiger.optim import Tiger

    torch.manual_seed(0)
    lin = nn.Linear(64, 64).bfloat16()
    # lr·RMS(θ) is ~1e-3 of a typical |θ|, below half a bf16 ulp (2**-9 relative): rounding to nearest keeps
    # every element but the smallest ones
    opt = Tiger(lin.parameters(), lr=1e-3, stochastic_rounding=stochastic_rounding)
    mon = OptimizerMonitor()
    for step in range(2):
        for p in lin.parameters():
            p.grad = torch.randn_like(p)
        before = [p.detach().clone() for p in lin.parameters()]
        record = mon.collect_pre_step(opt)
        opt.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = mon.finalize([record])
        mon._drop_hooks()
        same = sum(int((p == b).sum()) for p, b in zip(lin.parameters(), before))
        assert metrics["optim/Tiger/unchanged"] == pytest.approx(same / sum(p.numel() for p in before))
        assert metrics["optim/Tiger/unchanged"] > 0.5  # also under SR: most elements move on some steps only
        stalls = [w for w in caught if "rounded away" in str(w.message)]
        # round to nearest: warned once (first step only); stochastic rounding: never
        assert len(stalls) == (1 if not stochastic_rounding and step == 0 else 0)
