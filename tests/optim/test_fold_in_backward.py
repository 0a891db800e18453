"""Tight-fisted Tiger (gradients folded into the momentum during backward) against the standard mode."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tiger.optim.param_groups import tiger_param_groups
from lightning_tiger.optim.tiger import Tiger
from tests.optim.reference import MIXED_KINDS, Mixed, reference_tiger_step

LR, BETA = 2e-2, 0.9


def _batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 11, (5,), generator=gen) for _ in range(n)]


def _loss(model: Mixed, x: torch.Tensor, poison: float | None = None, scale: float = 1.0) -> torch.Tensor:
    loss = model(x).pow(2).mean() * scale
    if poison is not None:  # adds `poison` to every gradient entry of lin.weight only
        loss = loss + (model.lin.weight * poison).sum()
    return loss


def _pair(k: int, **kw: object) -> tuple[Mixed, Tiger, Mixed, Tiger]:
    std = Mixed()
    fold = copy.deepcopy(std)
    kw.setdefault("seed", 0)  # the same stochastic-rounding streams for both
    opt_std = Tiger(tiger_param_groups(std), lr=LR, beta=BETA, grad_accum_steps=k, foreach=False, **kw)
    opt_fold = Tiger(tiger_param_groups(fold), lr=LR, beta=BETA, grad_accum_steps=k, foreach=False,
                     fold_in_backward=True, **kw)
    return std, opt_std, fold, opt_fold


def _assert_same(std: Mixed, opt_std: Tiger, fold: Mixed, opt_fold: Tiger, msg: str) -> None:
    for (n, a), b in zip(std.named_parameters(), fold.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=f"{n} {msg}")
        ma = opt_std.state[a].get("momentum", torch.zeros_like(a))
        mb = opt_fold.state[b].get("momentum", torch.zeros_like(b))
        torch.testing.assert_close(mb, ma, rtol=1e-6, atol=1e-8, msg=f"momentum of {n} {msg}")


@pytest.mark.parametrize("poison", [{}, {1: math.nan, 3: math.inf, 8: -math.inf}], ids=["finite", "nonfinite"])
def test_official_style_step_every_micro_batch(poison: dict[int, float]) -> None:
    """Pattern (a): grad_accum_steps=3 and step() after every backward, NaN/inf on middle/first/last."""
    std, opt_std, fold, opt_fold = _pair(3)
    for t, x in enumerate(_batches(9)):
        opt_std.zero_grad()
        _loss(std, x, poison.get(t)).backward()
        opt_std.step()
        opt_fold.zero_grad()
        versions = [p._version for p in fold.parameters()]
        _loss(fold, x, poison.get(t)).backward()
        assert all(p.grad is None for p in fold.parameters()), "gradients must be freed in backward"
        assert [p._version for p in fold.parameters()] == versions, "hooks must never write parameters"
        opt_fold.step()
        _assert_same(std, opt_std, fold, opt_fold, f"after micro-step {t}")
    assert opt_fold.param_groups[0]["micro_step"] == 9


def test_pytorch_style_k_backwards_then_one_step_finite() -> None:
    """Pattern (b): grad_accum_steps=1, three backward passes (loss / 3) then one step(), via a closure."""
    std, opt_std, fold, opt_fold = _pair(1)
    batches = _batches(9)
    for w in range(3):
        window = batches[3 * w: 3 * w + 3]
        opt_std.zero_grad()
        for x in window:
            _loss(std, x, scale=1 / 3).backward()
        opt_std.step()

        def closure() -> torch.Tensor:
            loss = torch.zeros(())
            for x in window:  # noqa: B023 (used at once)
                part = _loss(fold, x, scale=1 / 3)
                part.backward()
                loss = loss + part.detach()
            return loss

        assert torch.isfinite(opt_fold.step(closure))
        _assert_same(std, opt_std, fold, opt_fold, f"after window {w}")


@pytest.mark.parametrize("bad_micro", [0, 1, 2])
def test_pytorch_style_with_nonfinite_micro_batch(bad_micro: int) -> None:
    """Pattern (b) with one NaN micro-batch for lin.weight: the documented semantics, from the reference.

    Finite micro-batches are folded (b1 = β once), the NaN one is dropped; the flagged tensor shrinks (centre 0)
    instead of moving; every other tensor behaves as in the standard mode.
    """
    _, _, fold, opt = _pair(1)
    names = list(MIXED_KINDS)
    params = dict(fold.named_parameters())
    for w, window in enumerate([_batches(6)[:3], _batches(6)[3:]]):
        # Per-micro-batch gradients at the current parameters (a separate copy: no hooks).
        probe = copy.deepcopy(fold)
        sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        for j, x in enumerate(window):
            probe.zero_grad()
            poison = math.nan if (w == 1 and j == bad_micro) else None
            _loss(probe, x, poison, scale=1 / 3).backward()
            for n, p in probe.named_parameters():
                if torch.isfinite(p.grad).all():
                    sums[n] += p.grad.double()
        ref_p = [params[n].detach().double().clone() for n in names]
        ref_m = [opt.state[params[n]]["momentum"].double().clone() if w else torch.zeros_like(ref_p[i])
                 for i, n in enumerate(names)]
        before = params["lin.weight"].detach().double().clone()
        reference_tiger_step(ref_p, [sums[n] for n in names], ref_m, kinds=[MIXED_KINDS[n] for n in names],
                             lr=LR, beta=BETA, weight_decay=[0.01] * len(names), grad_accum_steps=1,
                             micro_step=w, shrink_ratio=0.99, rms_floor=None)
        if w == 1:
            ref_p[names.index("lin.weight")] = before * 0.99  # flagged: shrunk instead of updated
        for j, x in enumerate(window):
            poison = math.nan if (w == 1 and j == bad_micro) else None
            _loss(fold, x, poison, scale=1 / 3).backward()
        opt.step()
        for n, r, rm in zip(names, ref_p, ref_m):
            torch.testing.assert_close(params[n].detach().double(), r, rtol=1e-5, atol=1e-6, msg=n)
            torch.testing.assert_close(opt.state[params[n]]["momentum"].double(), rm, rtol=1e-5, atol=1e-7,
                                       msg=f"momentum of {n}")


def test_bf16_momentum_fold_equals_standard() -> None:
    std, opt_std, fold, opt_fold = _pair(2, momentum_dtype=torch.bfloat16)
    for x in _batches(6):
        for model, opt in ((std, opt_std), (fold, opt_fold)):
            opt.zero_grad()
            _loss(model, x).backward()
            opt.step()
    _assert_same(std, opt_std, fold, opt_fold, "bf16 momentum")
    assert opt_fold.state[fold.lin.weight]["momentum"].dtype == torch.bfloat16


def test_hooks_do_not_keep_optimizer_alive_and_remove_hooks() -> None:
    model = Mixed()
    opt = Tiger(model.parameters(), fold_in_backward=True)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    _loss(model, _batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())  # nobody folds any more

    model.zero_grad(set_to_none=True)
    opt = Tiger(model.parameters(), lr=0.1, fold_in_backward=True)
    opt.remove_hooks()
    _loss(model, _batches(1)[0]).backward()
    assert model.lin.weight.grad is not None
    before = model.lin.weight.detach().clone()
    opt.step()  # standard mode reads .grad now
    assert not torch.equal(before, model.lin.weight)


def test_state_dict_and_step_counter_in_fold_mode() -> None:
    std, opt_std, fold, opt_fold = _pair(2)
    batches = _batches(4)
    for x in batches[:2]:
        _loss(fold, x).backward()
        opt_fold.step()
    opt2 = Tiger(tiger_param_groups(fold), lr=LR, beta=BETA, grad_accum_steps=2, foreach=False,
                 fold_in_backward=True)
    opt2.load_state_dict(opt_fold.state_dict())
    opt_fold.remove_hooks()
    for x in batches:
        opt_std.zero_grad()
        _loss(std, x).backward()
        opt_std.step()
    for x in batches[2:]:
        _loss(fold, x).backward()
        opt2.step()
    _assert_same(std, opt_std, fold, opt2, "after resume")


def test_refuses_distributed_and_sparse(monkeypatch: pytest.MonkeyPatch) -> None:
    emb = nn.Embedding(4, 2, sparse=True)
    opt = Tiger(emb.parameters(), fold_in_backward=True)  # kept alive: its hooks act
    with pytest.raises(RuntimeError, match="sparse"):
        emb(torch.tensor([1])).sum().backward()
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    # under 2 processes without sync_momenta(): the first fold and step() refuse (local gradients would make the
    # replicas diverge), naming the two ways out; construction is allowed (a strategy attaches the sync after it)
    lin = nn.Linear(2, 2)
    opt2 = Tiger(lin.parameters(), fold_in_backward=True)
    with pytest.raises(RuntimeError, match=r"opt.sync_momenta\(\).*TightFistedDDPStrategy|TightFistedDDPStrategy.*"
                                           r"sync_momenta"):
        lin(torch.ones(1, 2)).sum().backward()
    Tiger(nn.Linear(2, 2).parameters())  # the standard mode is fine under DDP
    with pytest.raises(RuntimeError, match="momenta averaged across ranks"):
        opt.step()
    with pytest.raises(RuntimeError, match="fold_in_backward=True"):
        Tiger(nn.Linear(2, 2).parameters()).sync_momenta()
    del opt2


# ------------------------------------------------------------------------------------------- Lightning
class _Module(L.LightningModule):
    def __init__(self, fold: bool, k_opt: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Mixed()
        self.fold, self.k_opt = fold, k_opt

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return _loss(self.model, batch[0])

    def configure_optimizers(self) -> Tiger:
        return Tiger(tiger_param_groups(self.model), lr=LR, beta=BETA, grad_accum_steps=self.k_opt,
                     fold_in_backward=self.fold)


def _fit(tmp_path: object, fold: bool, k_opt: int, accumulate: int, max_steps: int) -> Mixed:
    module = _Module(fold, k_opt)
    data = DataLoader(TensorDataset(torch.stack(_batches(8))), batch_size=None, shuffle=False)
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, logger=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    return module.model


@pytest.mark.parametrize(("k_opt", "accumulate", "max_steps"), [(1, 2, 3), (2, 1, 6)],
                         ids=["lightning-accumulates", "tiger-accumulates"])
def test_lightning_trainer_fold_equals_standard(tmp_path: object, k_opt: int, accumulate: int,
                                                max_steps: int) -> None:
    std = _fit(tmp_path, False, k_opt, accumulate, max_steps)
    fold = _fit(tmp_path, True, k_opt, accumulate, max_steps)
    for (n, a), b in zip(std.named_parameters(), fold.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=n)
    torch.manual_seed(0)
    moved = not torch.equal(Mixed().lin.weight, std.lin.weight)
    assert moved
