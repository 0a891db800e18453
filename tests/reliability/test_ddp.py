"""Multi-process: DDP with 2 processes on CPU (gloo, ``strategy="ddp_spawn"``) against one process with the same
global batch (ResumableBatchSampler gives each rank a strided half of every global batch).

Tolerances, per case:
- AdamW: parameters within 1e-5 (fp32 reduction order: the two ranks' means are averaged instead of one mean).
- Tiger / Lion: updates are ±η per element, so a sign flip of a near-zero momentum moves one element by 2η. We
  require >= 99% of the elements within 1e-6 and every element within 2·η_max·steps (η_max: the largest per
  step move), which a real desynchronisation or a wrong all-reduce would violate by far.
- CausalLMModule (Tiger inside): as Tiger.
- Diffusion modules draw per-sample noise from each process's global generator, so one process with the
  global batch draws different noise by construction: there we require the replicas to stay identical
  (``torch.equal`` across ranks), finite, and trained.
Tiger(fold_in_backward=True) under Lightning's DDPStrategy is refused with a clear error naming the strategy that
runs it exactly (``TightFistedDDPStrategy``, tested in ``tests/distributed/test_tight_fisted_*.py``), and a
non-finite gradient on one rank only is vetoed on every rank (ranks stay bit-identical).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.data import ResumableBatchSampler, sample_toy
from lightning_tiger.modules import CausalLMModule, RectifiedFlowModule, ScoreMatchingModule
from lightning_tiger.nn import TimeMLP
from lightning_tiger.optim import Tiger
from tests.cli.tiny import TinyRegression

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, GLOBAL_BATCH = 6, 16


class SaveParams(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        guard = next((c for c in trainer.callbacks if type(c).__name__ == "NonFiniteGuard"), None)
        torch.save({"params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
                    "skipped": None if guard is None else guard.skipped},
                   self.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt")


def _regression_data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(STEPS * GLOBAL_BATCH, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, 1, generator=g))


class DDPRegression(TinyRegression):
    def __init__(self, optimizer: str = "Tiger", fold: bool = False, nan_rank: int | None = None,
                 nan_step: int = 2) -> None:
        super().__init__(hidden=16)
        self.optimizer_name, self.fold, self.nan_rank, self.nan_step = optimizer, fold, nan_rank, nan_step

    def train_dataloader(self) -> DataLoader:
        ds = _regression_data()
        per_rank = GLOBAL_BATCH // self.trainer.world_size
        return DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), per_rank, seed=1).attach(self.trainer))

    def on_after_backward(self) -> None:
        # after DDP's all-reduce: only this rank sees the NaN
        if self.trainer.global_rank == self.nan_rank and self.trainer.global_step == self.nan_step:
            next(self.parameters()).grad.view(-1)[0] = float("nan")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        from lightning_tiger.optim import Lion, Tiger

        if self.optimizer_name == "Tiger":
            return Tiger(self.parameters(), lr=0.01, fold_in_backward=self.fold)
        if self.optimizer_name == "Lion":
            return Lion(self.parameters(), lr=0.003)
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def _lm_data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randint(0, 17, (STEPS * GLOBAL_BATCH, 13), generator=g))


def _stack_tokens(items: list[tuple[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([t[0] for t in items])


def _per_rank_loader(ds: TensorDataset, trainer: L.Trainer, **kw: Any) -> DataLoader:
    per_rank = GLOBAL_BATCH // trainer.world_size
    return DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), per_rank, seed=1).attach(trainer), **kw)


class DDPLM(CausalLMModule):
    def train_dataloader(self) -> DataLoader:
        return _per_rank_loader(_lm_data(), self.trainer, collate_fn=_stack_tokens)


def _moons() -> TensorDataset:
    return TensorDataset(sample_toy("moons", STEPS * GLOBAL_BATCH, generator=torch.Generator().manual_seed(7)))


class DDPRectifiedFlow(RectifiedFlowModule):
    def train_dataloader(self) -> DataLoader:
        return _per_rank_loader(_moons(), self.trainer)


class DDPScoreMatching(ScoreMatchingModule):
    def train_dataloader(self) -> DataLoader:
        return _per_rank_loader(_moons(), self.trainer)


def _make_lm() -> L.LightningModule:
    return DDPLM(model={"vocab_size": 17, "dim": 16, "depth": 1, "num_heads": 2}, warmup_steps=0,
                 optimizer=partial(Tiger, lr=0.01))


def _make_flow(name: str) -> L.LightningModule:
    cls = DDPRectifiedFlow if name == "RectifiedFlowModule" else DDPScoreMatching
    return cls(net=TimeMLP(data_dim=2, hidden_dim=32, depth=2, time_dim=16), optimizer=partial(Tiger, lr=0.01),
               ema_decay=None)


def _fit(module: L.LightningModule, out: Path, devices: int, callbacks: list | None = None) -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=STEPS,
        use_distributed_sampler=False, callbacks=[SaveParams(out), *(callbacks or [])], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=out,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module)


def _load(out: Path, rank: int, world: int) -> dict[str, Any]:
    return torch.load(out / f"rank{rank}_of{world}.pt", weights_only=False)


def _assert_ranks_identical(out: Path) -> dict[str, torch.Tensor]:
    r0, r1 = _load(out, 0, 2), _load(out, 1, 2)
    for k, v in r0["params"].items():
        assert torch.isfinite(v).all(), f"{k} not finite"
        assert torch.equal(v, r1["params"][k]), f"replicas diverged on {k}"
    assert r0["skipped"] == r1["skipped"]
    return r0["params"]


def _compare_sign_optimizer(ddp: dict[str, torch.Tensor], single: dict[str, torch.Tensor], max_move: float) -> None:
    diffs = torch.cat([(ddp[k] - single[k]).abs().flatten() for k in single])
    frac_close = (diffs <= 1e-6).float().mean().item()
    assert frac_close >= 0.99, f"only {frac_close:.3%} of elements match within 1e-6"
    assert diffs.max().item() <= 2 * max_move * STEPS, f"max |Δ| {diffs.max().item()} beyond sign-flip bound"


def _max_move(init: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> float:
    return max((final[k] - init[k]).abs().max().item() for k in init) / 1.0


@pytest.mark.parametrize("optimizer", ["AdamW", "Lion", "Tiger"])
def test_ddp_equals_single_process_global_batch(optimizer: str, tmp_path: Path) -> None:
    _fit(DDPRegression(optimizer), tmp_path, devices=2)
    ddp = _assert_ranks_identical(tmp_path)
    _fit(DDPRegression(optimizer), tmp_path, devices=1)
    single = _load(tmp_path, 0, 1)["params"]
    torch.manual_seed(0)
    init = dict(DDPRegression(optimizer).named_parameters())
    assert any(not torch.equal(single[k], init[k]) for k in init), "nothing trained"
    if optimizer == "AdamW":
        for k in single:
            torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=1e-5)
    else:
        _compare_sign_optimizer(ddp, single, _max_move(init, single))


def test_ddp_causal_lm_equals_single_process(tmp_path: Path) -> None:
    _fit(_make_lm(), tmp_path, devices=2)
    ddp = _assert_ranks_identical(tmp_path)
    _fit(_make_lm(), tmp_path, devices=1)
    single = _load(tmp_path, 0, 1)["params"]
    torch.manual_seed(0)
    init = dict(_make_lm().named_parameters())
    _compare_sign_optimizer(ddp, single, _max_move(init, single))


@pytest.mark.parametrize("name", ["RectifiedFlowModule", "ScoreMatchingModule"])
def test_ddp_diffusion_replicas_stay_identical(name: str, tmp_path: Path) -> None:
    _fit(_make_flow(name), tmp_path, devices=2)
    params = _assert_ranks_identical(tmp_path)
    torch.manual_seed(0)
    init = dict(_make_flow(name).named_parameters())
    assert any(not torch.equal(params[k], init[k]) for k in init if k in params), "nothing trained"


def test_ddp_tiger_fold_in_backward_is_refused(tmp_path: Path, fault_tally: Any) -> None:
    with pytest.raises(Exception, match="fold_in_backward") as info:
        _fit(DDPRegression("Tiger", fold=True), tmp_path, devices=2)
    assert "distributed" in str(info.value).lower() and "TightFistedDDPStrategy" in str(info.value)
    fault_tally.record("distributed", "Tiger(fold_in_backward=True) under 2-process DDP", "stopped")


def test_ddp_nan_on_one_rank_keeps_ranks_in_sync(tmp_path: Path, fault_tally: Any) -> None:
    from lightning_tiger.callbacks import NonFiniteGuard

    _fit(DDPRegression("Tiger", nan_rank=1, nan_step=2), tmp_path, devices=2,
         callbacks=[NonFiniteGuard(verbose=False)])
    _assert_ranks_identical(tmp_path)
    assert _load(tmp_path, 0, 2)["skipped"] == 1, "rank 0 must veto the step rank 1 found non-finite"
    fault_tally.record("distributed", "NaN gradient on rank 1 only @ step 2 (after all-reduce)", "survived")
