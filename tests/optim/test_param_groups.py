"""Parameter classification by module type and Tiger parameter groups (the ParamKind table)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tiger.optim.lion import Lion
from lightning_tiger.optim.param_groups import ParamKind, classify_parameters, guessed_parameters, tiger_param_groups
from lightning_tiger.optim.tiger import Tiger
from tests.optim.reference import MIXED_KINDS, Mixed


class _Custom(nn.Module):
    """An unknown module: kinds come from ndim."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(3, 4, 2))
        self.gain = nn.Parameter(torch.ones(4))
        self.temperature = nn.Parameter(torch.tensor(1.0))


class _Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3, bias=False)
        self.deconv = nn.ConvTranspose2d(4, 2, 2)
        self.bil = nn.Bilinear(3, 4, 5)
        self.bag = nn.EmbeddingBag(7, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm1d(3, affine=True)
        self.mha = nn.MultiheadAttention(8, 2)
        self.custom = _Custom()


def test_classify_mixed_model() -> None:
    assert {n: k.value for n, k in classify_parameters(Mixed()).items()} == MIXED_KINDS


def test_classify_zoo() -> None:
    kinds = {n: str(k) for n, k in classify_parameters(_Zoo()).items()}
    assert kinds == {
        "conv1.weight": "matrix", "conv1.bias": "bias",
        "conv2.weight": "matrix",
        "deconv.weight": "matrix", "deconv.bias": "bias",
        "bil.weight": "matrix", "bil.bias": "bias",
        "bag.weight": "embedding",
        "bn.weight": "norm_scale", "bn.bias": "norm_shift",
        "gn.weight": "norm_scale", "gn.bias": "norm_shift",
        "inorm.weight": "norm_scale", "inorm.bias": "norm_shift",
        # MultiheadAttention holds in_proj_* itself (unknown module -> ndim); out_proj is a Linear.
        "mha.in_proj_weight": "matrix", "mha.in_proj_bias": "bias",
        "mha.out_proj.weight": "matrix", "mha.out_proj.bias": "bias",
        "custom.kernel": "matrix", "custom.gain": "bias", "custom.temperature": "bias",
    }


def test_tied_parameter_classified_once_by_first_owner() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    kinds = classify_parameters(Tied())
    assert kinds == {"emb.weight": ParamKind.EMBEDDING}
    groups = tiger_param_groups(Tied())
    assert [(g["kind"], len(g["params"])) for g in groups] == [("embedding", 1)]


def test_groups_one_per_kind_with_decay_rules() -> None:
    model = Mixed()
    groups = tiger_param_groups(model, weight_decay=0.05)
    assert [g["kind"] for g in groups] == ["matrix", "embedding", "bias", "norm_scale", "norm_shift"]
    decay = {g["kind"]: g["weight_decay"] for g in groups}
    assert decay == {"matrix": 0.05, "embedding": 0.05, "bias": 0.0, "norm_scale": 0.0, "norm_shift": 0.0}
    by_kind = {g["kind"]: {id(p) for p in g["params"]} for g in groups}
    named = dict(model.named_parameters())
    for name, kind in MIXED_KINDS.items():
        assert id(named[name]) in by_kind[kind], name
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_overrides_string_keys_no_decay_and_frozen_params() -> None:
    model = Mixed()
    model.head.weight.requires_grad_(False)
    groups = tiger_param_groups(model, overrides={"embedding": {"lr": 5e-4}, ParamKind.BIAS: {"beta": 0.9}},
                                no_decay=["norm_scale"])
    by_kind = {g["kind"]: g for g in groups}
    assert by_kind["embedding"]["lr"] == 5e-4 and by_kind["bias"]["beta"] == 0.9
    assert by_kind["bias"]["weight_decay"] == 0.01 and by_kind["norm_scale"]["weight_decay"] == 0.0
    assert all(p is not model.head.weight for g in groups for p in g["params"])
    opt = Tiger(groups, lr=1e-3)
    assert opt.param_groups[1]["lr"] == 5e-4 and opt.param_groups[0]["lr"] == 1e-3


def test_groups_work_for_lion_and_adamw() -> None:
    model = Mixed()
    for opt in (Lion(tiger_param_groups(model)), torch.optim.AdamW(tiger_param_groups(model))):
        out = model(torch.tensor([1, 2, 3])).sum()
        opt.zero_grad()
        out.backward()
        opt.step()
        assert {g["kind"] for g in opt.param_groups} == {k.value for k in ParamKind}
        assert opt.param_groups[2]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"overrides": {"weights": {"lr": 1.0}}}, ValueError, "overrides keys must be one of"),
        ({"overrides": {"matrix": 1.0}}, TypeError, "must be a mapping"),
        ({"overrides": {"matrix": {"params": []}}}, ValueError, "may not set"),
        ({"no_decay": ["biases"]}, ValueError, "no_decay"),
    ],
)
def test_invalid_arguments(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        tiger_param_groups(Mixed(), **kwargs)


def test_paramkind_parse_and_fallback() -> None:
    assert ParamKind.parse("NORM_SCALE") is ParamKind.NORM_SCALE
    assert ParamKind.parse(ParamKind.BIAS) is ParamKind.BIAS
    assert ParamKind("matrix") == "matrix"
    assert ParamKind.from_ndim(0) is ParamKind.BIAS and ParamKind.from_ndim(4) is ParamKind.MATRIX
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        classify_parameters(torch.ones(2))  # type: ignore[arg-type]


def test_guessed_parameters_are_those_of_the_ndim_fallback() -> None:
    """Unknown modules (``_Custom``) and extra parameters of known ones (MultiheadAttention's in_proj_weight and
    in_proj_bias, owned by the MHA module itself, not by a Linear) are guessed; everything else is not."""
    guessed = set(guessed_parameters(_Zoo()))
    assert guessed == {"custom.kernel", "custom.gain", "custom.temperature", "mha.in_proj_weight",
                       "mha.in_proj_bias"}
    assert guessed_parameters(Mixed()) == []  # every kind of the mixed model comes from its module type
