"""The public optimizer API that callbacks use: kinds (and the warning when they are guessed), per-parameter
settings, the effective rate η, the non-finite flags of the tight-fisted mode, and the shared shrink rule.

References are written from the formulas (Su 2023, kexue.fm/archives/9512; bojone/tiger ``tiger.py``):
η = lr·max(RMS(θ), floor) (per row for embeddings), 0.5·lr for bias/norm kinds; shrink θ ← c + s·(θ − c)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_tiger.optim import (
    KindGuessWarning,
    Tiger,
    TigerParamSettings,
    shrink_,
    shrink_center,
    tiger_param_groups,
)


class HandRMSNorm(nn.Module):
    """A hand-written RMSNorm: Tiger cannot know that ``scale`` is a norm scale (centre 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class Net(nn.Module):
    def __init__(self, custom_norm: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.lin = nn.Linear(6, 6)
        self.norm = HandRMSNorm(6) if custom_norm else nn.LayerNorm(6)


def _grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def test_bare_parameters_warn_once_when_a_custom_norm_scale_is_guessed() -> None:
    torch.manual_seed(0)
    model = Net(custom_norm=True)
    opt = Tiger(model.parameters(), lr=1e-2)
    _grads(model)
    with pytest.warns(KindGuessWarning, match="guessed from ndim") as rec:
        opt.step()
    guesses = [w for w in rec if issubclass(w.category, KindGuessWarning)]
    assert len(guesses) == 1
    assert guesses[0].filename == __file__  # points at the user's opt.step(), not into the optimizer or torch
    with warnings.catch_warnings():
        warnings.simplefilter("error", KindGuessWarning)  # once per optimizer
        _grads(model)
        opt.step()
    # the guessed kind is what the warning is about: the scale is a 'bias', so a NaN shrinks it toward 0
    model.norm.scale.grad = torch.full((6,), math.nan)
    before = model.norm.scale.detach().clone()
    opt.step()
    torch.testing.assert_close(model.norm.scale.detach(), before * 0.99)


def test_from_module_classifies_by_module_type_and_names_unknown_modules() -> None:
    model = Net(custom_norm=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KindGuessWarning)
        opt = Tiger.from_module(model, lr=1e-2, weight_decay=0.1)
        _grads(model)
        opt.step()
    assert {g["kind"] for g in opt.param_groups} == {"embedding", "matrix", "bias", "norm_scale", "norm_shift"}
    assert opt.param_settings(model.norm.weight).center == 1.0
    assert opt.param_settings(model.lin.weight).weight_decay == 0.1
    with pytest.warns(KindGuessWarning, match=r"norm\.scale") as rec:
        Tiger.from_module(Net(custom_norm=True))
    assert {w.filename for w in rec if issubclass(w.category, KindGuessWarning)} == {__file__}
    custom = Net(custom_norm=True)
    with pytest.warns(KindGuessWarning, match=r"norm\.scale"):  # assign_kinds (LightningCLI's route) too
        Tiger(custom.parameters()).assign_kinds(custom)
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        Tiger.from_module([nn.Parameter(torch.ones(2))])


def test_param_settings_is_a_named_record() -> None:
    model = Net(custom_norm=False)
    opt = Tiger(tiger_param_groups(model, weight_decay=0.05), lr=2e-3, rms_floor=0.01)
    s = opt.param_settings(model.emb.weight)
    assert isinstance(s, TigerParamSettings)
    assert s == TigerParamSettings(lr_mode=2, lr=2e-3, weight_decay=0.05, center=0.0, rms_floor=0.01)
    assert opt.param_settings(model.norm.weight) == TigerParamSettings(0, 1e-3, 0.0, 1.0, 0.01)
    assert opt.param_settings(model.lin.bias).lr_mode == 0 and opt.param_settings(model.lin.weight).lr_mode == 1
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        opt.param_settings(nn.Parameter(torch.ones(3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_effective_lr_matches_the_formula(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    model = Net(custom_norm=False).to(dtype)
    with torch.no_grad():
        model.emb.weight[3].zero_()  # a zero row: η of that row is lr·floor
    lr = 3e-3
    opt = Tiger(tiger_param_groups(model), lr=lr)
    for p in model.parameters():
        eta = opt.effective_lr(p)
        assert eta.dtype == torch.float32 and eta.device == p.device
    w = model.lin.weight.detach().double()
    floor = 0.1 / math.sqrt(6)
    expected = lr * max(w.pow(2).mean().sqrt().item(), floor)
    assert opt.effective_lr(model.lin.weight).shape == ()
    assert opt.effective_lr(model.lin.weight).item() == pytest.approx(expected, rel=1e-6)
    rows = model.emb.weight.detach().double().pow(2).mean(1).sqrt().clamp_min(floor) * lr
    torch.testing.assert_close(opt.effective_lr(model.emb.weight).double(), rows, rtol=1e-6, atol=0)
    assert opt.effective_lr(model.emb.weight)[3].item() == pytest.approx(lr * floor, rel=1e-6)
    for p in (model.lin.bias, model.norm.weight, model.norm.bias):
        assert opt.effective_lr(p).item() == pytest.approx(0.5 * lr, rel=1e-7)
    opt.param_groups[0]["lr"] = 2 * lr  # follows the group's current lr (a scheduler's value)
    k = opt.param_groups[0]["kind"]
    p0 = opt.param_groups[0]["params"][0]
    assert k == "matrix" and opt.effective_lr(p0).item() == pytest.approx(2 * expected, rel=1e-6)


def test_nonfinite_flagged_in_the_tight_fisted_window() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    opt = Tiger(tiger_param_groups(lin), lr=1e-2, fold_in_backward=True)
    assert opt.nonfinite_flagged() == []
    x = torch.randn(5, 4)
    lin(x).sum().backward()  # folded: finite
    assert opt.nonfinite_flagged() == []
    lin.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    lin(x).sum().backward()
    flagged = opt.nonfinite_flagged()
    assert len(flagged) == 1 and flagged[0] is lin.weight
    opt.step()
    assert opt.nonfinite_flagged() == []  # a new window
    standard = Tiger(tiger_param_groups(lin), lr=1e-2)
    lin.weight.grad = torch.full_like(lin.weight, math.nan)
    assert standard.nonfinite_flagged() == []  # standard mode: checked inside step(), nothing pending


def test_shrink_rounds_a_bf16_norm_scale_once() -> None:
    torch.manual_seed(3)
    theta = (1 + 0.3 * torch.randn(4096)).to(torch.bfloat16)
    s = 0.99
    expected = ((theta.double() - 1.0) * s + 1.0).float().to(torch.bfloat16)  # exact math, rounded once
    in_bf16 = (theta - 1.0) * s + 1.0  # the bf16 arithmetic: rounds after each operation
    assert not torch.equal(in_bf16, expected)  # the test can tell the two apart
    got = theta.clone()
    shrink_([got], [shrink_center("norm_scale")], s)
    assert torch.equal(got, expected)
    zero_centre = theta.clone()
    shrink_([zero_centre], [shrink_center("bias")], s)
    assert torch.equal(zero_centre, (theta.double() * s).float().to(torch.bfloat16))
    with pytest.raises(ValueError, match="same length"):
        shrink_([got], [], s)
