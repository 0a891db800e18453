"""Bad input, property-based: every public constructor/function works (finite output) on values inside its
documented accepted range and raises a clear ValueError/TypeError naming the offending parameter on values outside
it. Never a crash deep inside torch, never NaN output, never a valid value refused or a bad one accepted.

Each property varies ONE argument at a time (others at their defaults), computes from the documented range
(docstrings; where a docstring gives none, the range the error message states) whether the value is valid, and
checks the outcome with :func:`tests.reliability._check.works_or_refuses`. Values come from
:mod:`tests.reliability._check`: ordinary and non-finite floats, out-of-range and non-integer counts, and values of
the wrong type.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.reliability._check import any_float, any_int, is_int, is_real, junk, works_or_refuses

#: LT_HYPOTHESIS_EXAMPLES=200 for a thorough local run; the default keeps the file within the fast-suite budget.
EXAMPLES = int(os.environ.get("LT_HYPOTHESIS_EXAMPLES", "8"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _need(module: str, name: str) -> Any:
    """The public object ``module.name`` (a missing one fails the test: every name here is public API)."""
    return getattr(importlib.import_module(module), name)


#: Library defects these properties found (each reproduced by the falsifying example hypothesis prints). Marked
#: strict xfail so that the suite stays green until they are fixed and then fails (XPASS) until the entry is removed.
#: Empty now: the defects found so far are fixed (lightning_tiger/validation.py); add an entry with the reproduction
#: when a property finds a new one.
KNOWN_BUGS: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _known_library_bugs(request: pytest.FixtureRequest) -> None:
    reason = KNOWN_BUGS.get(request.node.name)
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def _one_of(*choices: Any) -> Any:
    return lambda v: isinstance(v, str) and v in choices


def _opt_int(low: int) -> Any:
    return lambda v: v is None or is_int(v, low)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _opt_bool(v: Any) -> bool:
    return v is None or isinstance(v, bool)


#: the floating dtypes a ``momentum_dtype`` may name (Tiger/Lion docstrings: "floating dtype (or its name)").
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _float_dtype(v: Any) -> bool:
    return v is None or v in _FLOAT_DTYPES or (isinstance(v, str) and getattr(torch, v, None) in _FLOAT_DTYPES)


# ------------------------------------------------------------------------------------------------ optimizers
def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(6, 4), nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 1))


def _train(opt_factory: Callable[[nn.Module], torch.optim.Optimizer], steps: int = 3) -> list[torch.Tensor]:
    model = _tiny_model()
    opt = opt_factory(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, 6, (5, 2), generator=g)
        model(tokens).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


OPT_ARGS = {
    "Tiger": {
        "lr": any_float, "beta": any_float, "weight_decay": any_float, "grad_accum_steps": any_int,
        "shrink_ratio": any_float, "rms_floor": st.one_of(any_float, st.none()),
        "momentum_dtype": st.sampled_from(["bfloat16", "float16", "float32", "int32", "nonsense", torch.int64, 3]),
        "fold_in_backward": st.sampled_from([True, False, "yes", 1, None]),
        "foreach": st.sampled_from([True, False, None, "no", 0]),
    },
    "Lion": {
        "lr": any_float, "weight_decay": any_float,
        "betas": st.one_of(st.tuples(any_float, any_float), st.sampled_from([(0.9,), (0.9, 0.99, 0.1), 0.9, "ab"])),
        "momentum_dtype": st.sampled_from(["bfloat16", "float64", "int8", "bogus", torch.bool]),
        "foreach": st.sampled_from([True, False, None, "no"]),
    },
}
#: documented ranges (Tiger/Lion docstrings and their ``_validated``): lr >= 0, beta in [0, 1), weight_decay >= 0,
#: grad_accum_steps an int >= 1, shrink_ratio in (0, 1], rms_floor None or >= 0, betas a pair in [0, 1).
_NONNEG = lambda v: is_real(v, 0)  # noqa: E731
OPT_VALID: dict[str, dict[str, Any]] = {
    "Tiger": {
        "lr": _NONNEG, "beta": lambda v: is_real(v, 0, 1, high_open=True), "weight_decay": _NONNEG,
        "grad_accum_steps": lambda v: is_int(v, 1), "shrink_ratio": lambda v: is_real(v, 0, 1, low_open=True),
        "rms_floor": lambda v: v is None or is_real(v, 0), "momentum_dtype": _float_dtype,
        "fold_in_backward": _bool, "foreach": _opt_bool,
    },
    "Lion": {
        "lr": _NONNEG, "weight_decay": _NONNEG, "momentum_dtype": _float_dtype, "foreach": _opt_bool,
        "betas": lambda v: isinstance(v, tuple) and len(v) == 2 and all(is_real(b, 0, 1, high_open=True) for b in v),
    },
}
OPT_CASES = [(opt, arg) for opt, args in OPT_ARGS.items() for arg in args]


@pytest.mark.parametrize(("opt_name", "arg"), OPT_CASES, ids=[f"{o}-{a}" for o, a in OPT_CASES])
@SETTINGS
@given(data=st.data())
def test_optimizer_hyperparameters(opt_name: str, arg: str, data: st.DataObject) -> None:
    cls = _need("lightning_tiger.optim", opt_name)
    value = data.draw(OPT_ARGS[opt_name][arg], label=arg)
    works_or_refuses(lambda: _train(lambda m: cls(m.parameters(), **{arg: value})), [arg],
                     valid=OPT_VALID[opt_name][arg](value))


#: Values at the edges of each documented range, so that a range narrower or wider than documented fails
#: deterministically (random draws rarely land next to a bound).
OPT_EDGES: dict[str, list[Any]] = {
    "lr": [0.0, 1e-8, 10.0, -1e-12], "weight_decay": [0.0, 5.0, -1e-12], "beta": [0.0, 0.5, 0.999, 1.0, -1e-9],
    "grad_accum_steps": [1, 7, 0], "shrink_ratio": [1e-6, 0.5, 1.0, 0.0, 1.0 + 1e-9], "rms_floor": [None, 0.0, 1.0],
    "betas": [(0.0, 0.0), (0.9, 0.99), (0.999, 0.5), (1.0, 0.9), (0.9, 1.0), (-0.1, 0.9)],
}
OPT_EDGE_CASES = [(o, a, v) for o, args in OPT_VALID.items() for a in args if a in OPT_EDGES for v in OPT_EDGES[a]]


@pytest.mark.parametrize(("opt_name", "arg", "value"), OPT_EDGE_CASES,
                         ids=[f"{o}-{a}={v}" for o, a, v in OPT_EDGE_CASES])
def test_optimizer_hyperparameter_edges(opt_name: str, arg: str, value: Any) -> None:
    cls = _need("lightning_tiger.optim", opt_name)
    works_or_refuses(lambda: _train(lambda m: cls(m.parameters(), **{arg: value})), [arg],
                     valid=OPT_VALID[opt_name][arg](value))


@pytest.mark.parametrize(("opt_name", "arg"), [c for c in OPT_CASES if c[1] in {"lr", "beta", "betas",
                                                                               "weight_decay", "grad_accum_steps",
                                                                               "shrink_ratio", "rms_floor"}])
@SETTINGS
@given(data=st.data())
def test_optimizer_per_group_hyperparameters(opt_name: str, arg: str, data: st.DataObject) -> None:
    """A bad value in the second param group is refused as clearly as one in the defaults."""
    cls = _need("lightning_tiger.optim", opt_name)
    value = data.draw(OPT_ARGS[opt_name][arg], label=arg)

    def build(m: nn.Module) -> torch.optim.Optimizer:
        params = list(m.parameters())
        return cls([{"params": params[:2]}, {"params": params[2:], arg: value}])

    works_or_refuses(lambda: _train(build), [arg], valid=OPT_VALID[opt_name][arg](value))


_KINDS = ("matrix", "embedding", "bias", "norm_scale", "norm_shift")


@SETTINGS
@given(kwargs=st.fixed_dictionaries({}, optional={"weight_decay": any_float, "lr": any_float}),
       kind=st.sampled_from(["matrix", "embedding", "bias", "norm_scale", "norm_shift", "MATRIX", "vector", 3]))
@example(kwargs={}, kind="vector").via("unknown kind")
def test_tiger_param_group_kind(kwargs: dict[str, Any], kind: Any) -> None:
    tiger = _need("lightning_tiger.optim", "Tiger")

    def build(m: nn.Module) -> torch.optim.Optimizer:
        return tiger([{"params": list(m.parameters()), "kind": kind, **kwargs}])

    # A kind is a ParamKind or its string value, case-insensitive (ParamKind.parse).
    valid = isinstance(kind, str) and kind.lower() in _KINDS and all(_NONNEG(v) for v in kwargs.values())
    works_or_refuses(lambda: _train(build), ["kind", *kwargs], valid=valid)


_OVERRIDES_FAULT = {None: None, "{}": None, "{'bias': {'lr': -1.0}}": "lr", "{'bogus': {'lr': 1.0}}": "bogus",
                    "{'matrix': {'weight_decay': nan}}": "weight_decay", "'x'": "overrides"}


@SETTINGS
@given(weight_decay=any_float, overrides=st.sampled_from([None, {}, {"bias": {"lr": -1.0}}, {"bogus": {"lr": 1.0}},
                                                          {"matrix": {"weight_decay": float("nan")}}, "x"]))
@example(weight_decay=0.0, overrides="x").via("overrides of the wrong type")
def test_tiger_param_groups_builder(weight_decay: float, overrides: Any) -> None:
    tiger_param_groups = _need("lightning_tiger.optim", "tiger_param_groups")
    tiger = _need("lightning_tiger.optim", "Tiger")
    fault = _OVERRIDES_FAULT[None if overrides is None else repr(overrides)]
    names = ([] if _NONNEG(weight_decay) else ["weight_decay"]) + ([] if fault is None else [fault])
    works_or_refuses(lambda: _train(lambda m: tiger(tiger_param_groups(m, weight_decay=weight_decay,
                                                                       overrides=overrides))),
                     names, valid=not names)


schedules = st.dictionaries(
    keys=st.one_of(st.integers(-5, 60), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                   st.sampled_from(["10", " 20", "1e1", True])),
    values=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 3), st.text(max_size=3),
                     st.sampled_from([None, "0.5", [1.0]])),
    max_size=4,
)


def _schedule_valid(schedule: Any) -> bool:
    """PiecewiseLinearLR: a non-empty ``{step: multiplier}`` mapping (or list of pairs); steps integers >= 0 (YAML
    strings and integral floats of them allowed), each once; multipliers finite floats >= 0 (numeric strings
    allowed)."""
    if not isinstance(schedule, dict) or not schedule:
        return False
    steps = set()
    for key, value in schedule.items():
        try:
            step = float(key.strip()) if isinstance(key, str) else float(key)
            mult = float(value)
        except (TypeError, ValueError):
            return False
        if isinstance(key, bool) or isinstance(value, bool) or not math.isfinite(step) or step != int(step):
            return False
        if step < 0 or int(step) in steps or not (math.isfinite(mult) and mult >= 0):
            return False
        steps.add(int(step))
    return True


@SETTINGS
@given(schedule=st.one_of(schedules, junk), from_zero=st.sampled_from([True, False, "yes", 1]))
def test_piecewise_linear_schedule(schedule: Any, from_zero: Any) -> None:
    sched_cls = _need("lightning_tiger.optim", "PiecewiseLinearLR")

    def run() -> list[float]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
        sched = sched_cls(opt, schedule, from_zero=from_zero)
        lrs = []
        for _ in range(70):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        state = sched.state_dict()
        sched.load_state_dict(state)
        return lrs

    lrs = works_or_refuses(run, ["schedule", "from_zero"], check_finite=False,
                           valid=_schedule_valid(schedule) and isinstance(from_zero, bool))
    if lrs is not None:
        assert all(lr >= 0 and lr == lr and lr != float("inf") for lr in lrs), lrs


# ------------------------------------------------------------------------------------------ attention / LM
ATTN_ARGS: dict[str, st.SearchStrategy] = {
    "dim": any_int, "num_heads": any_int, "num_kv_heads": st.one_of(any_int, st.none()),
    "position": st.sampled_from(["rope", "alibi", "none", "ROPE", "learned", None]),
    "window": st.one_of(any_int, st.none()), "window_at": st.sampled_from(["both", "train", "inference", "never"]),
    "sink_tokens": any_int, "logn": st.sampled_from(["none", "trained", "posthoc", "yes", None]),
    "logn_base": st.one_of(any_int, st.none()), "dropout": any_float, "rope_base": any_float,
    "rope_scaling": st.sampled_from([None, {}, {"type": "ntk", "factor": 2.0}, {"type": "ntk", "factor": -1.0},
                                     {"type": "linear", "factor": 4.0}, {"type": "rerope", "window": 4},
                                     {"type": "bogus"}, {"factor": 2.0}, "ntk"]),
    "backend": st.sampled_from(["auto", "sdpa", "math", "flex", "cuda"]), "head_dim": st.one_of(any_int, st.none()),
    "max_seq_len": st.one_of(any_int, st.none()), "causal": st.sampled_from([True, False]),
}


def _scaling_valid(v: Any) -> bool:
    """RotaryEmbedding's scaling: None, or a dict whose "type" (absent = default RoPE, as in HF configs) is one
    of linear / ntk / dynamic / yarn / llama3 with factor >= 1."""
    if v is None:
        return True
    if not isinstance(v, dict):
        return False
    kind = v.get("type")
    return kind is None or (kind in ("linear", "ntk") and is_real(v.get("factor"), 1))


#: Attention(dim=16, num_heads=4, ...) varying one argument; head_dim = dim / num_heads must be even for RoPE.
ATTN_VALID: dict[str, Any] = {
    "dim": lambda v: is_int(v, 1) and v % 4 == 0 and (v // 4) % 2 == 0,
    "num_heads": lambda v: is_int(v, 1) and 16 % v == 0 and (16 // v) % 2 == 0,
    "num_kv_heads": lambda v: v is None or (is_int(v, 1) and 4 % v == 0),
    "position": _one_of("rope", "alibi", "none"), "window": _opt_int(1),
    "window_at": _one_of("both", "train", "inference"), "sink_tokens": lambda v: is_int(v, 0),
    "logn": _one_of("none"),  # "trained" / "posthoc" need logn_base, not given here
    "logn_base": lambda v: is_int(v, 2),  # with logn="posthoc": the training length, >= 2
    "dropout": lambda v: is_real(v, 0, 1, high_open=True), "rope_base": lambda v: is_real(v, 1, low_open=True),
    "rope_scaling": _scaling_valid, "backend": _one_of("auto", "sdpa", "math", "flex"),
    "head_dim": lambda v: v is None or (is_int(v, 2) and v % 2 == 0), "max_seq_len": _opt_int(1),
    "causal": _bool,
}


@pytest.mark.parametrize("arg", list(ATTN_ARGS))
@SETTINGS
@given(data=st.data())
def test_attention_options(arg: str, data: st.DataObject) -> None:
    attention = _need("lightning_tiger.nn", "Attention")
    value = data.draw(ATTN_ARGS[arg], label=arg)
    kwargs: dict[str, Any] = {"dim": 16, "num_heads": 4, arg: value}
    if arg == "logn_base":
        kwargs["logn"] = "posthoc"
    names = {"dim": ["dim", "head_dim"], "num_heads": ["num_heads", "head_dim"], "logn": ["logn", "logn_base"],
             "rope_scaling": ["scaling"], "rope_base": ["base"]}.get(arg, [arg])

    def run() -> torch.Tensor:
        attn = attention(**kwargs)
        x = torch.randn(2, 9, kwargs["dim"])
        if kwargs.get("backend") == "flex":  # documented: no CPU backward in torch 2.13, so inference only
            with torch.no_grad():
                return attn(x)
        out = attn(x)
        out.float().sum().backward()
        return out

    works_or_refuses(run, names, valid=ATTN_VALID[arg](value))


@SETTINGS
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), dim_last=st.sampled_from([8, 7, 16]),
       dtype=st.sampled_from([torch.float32, torch.int64]),
       positions=st.sampled_from([None, "ok", "short", "float", "2d"]))
def test_attention_input_shapes(shape: list[int], dim_last: int, dtype: torch.dtype, positions: str | None) -> None:
    attention = _need("lightning_tiger.nn", "Attention")
    attn = attention(dim=8, num_heads=2)
    full = [*shape[:-1], dim_last] if len(shape) > 1 else [dim_last]
    x = torch.randn(full).to(dtype) if dtype != torch.int64 else torch.ones(full, dtype=dtype)
    seq = full[1] if len(full) == 3 else 0
    pos = {None: None, "ok": torch.arange(seq), "short": torch.arange(max(seq - 1, 0)),
           "float": torch.arange(seq).float() * 0.5, "2d": torch.arange(seq).repeat(full[0], 1) if len(full) == 3
           else torch.zeros(1, 1, dtype=torch.long)}[positions]
    # Documented: x [B, L, dim] floating; positions [L] | [B, L], integer or float (RoPE).
    x_ok = len(full) == 3 and dim_last == 8 and dtype == torch.float32
    pos_ok = positions != "short" or seq == 0
    works_or_refuses(lambda: attn(x, positions=pos), ["x"] if not x_ok else ["positions"], valid=x_ok and pos_ok)


@SETTINGS
@given(head_dim=any_int, base=any_float, interleaved=st.sampled_from([True, False, "no"]),
       scaling=ATTN_ARGS["rope_scaling"], max_seq_len=st.one_of(any_int, st.none()))
def test_rotary_embedding(head_dim: Any, base: Any, interleaved: Any, scaling: Any, max_seq_len: Any) -> None:
    rotary = _need("lightning_tiger.nn", "RotaryEmbedding")
    kw = {"head_dim": head_dim, "base": base, "interleaved": interleaved, "scaling": scaling,
          "max_seq_len": max_seq_len}
    checks = {"head_dim": is_int(head_dim, 2) and head_dim % 2 == 0, "base": is_real(base, 1, low_open=True),
              "interleaved": _bool(interleaved), "scaling": _scaling_valid(scaling),
              "max_seq_len": _opt_int(1)(max_seq_len)}

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        rope = rotary(**kw)
        q = torch.randn(1, 7, 2, head_dim)
        return rope(q, q.clone())

    works_or_refuses(run, [k for k, ok in checks.items() if not ok], valid=all(checks.values()))


@SETTINGS
@given(num_heads=any_int, causal=st.sampled_from([True, False]), q_len=st.integers(-1, 6), k_len=st.integers(-1, 6),
       offset=st.one_of(st.none(), st.integers(-3, 5)))
def test_alibi(num_heads: Any, causal: bool, q_len: int, k_len: int, offset: int | None) -> None:
    alibi_cls = _need("lightning_tiger.nn", "ALiBi")
    alibi_slopes = _need("lightning_tiger.nn", "alibi_slopes")
    heads_ok = is_int(num_heads, 1)
    slopes = works_or_refuses(lambda: alibi_slopes(num_heads), "num_heads", valid=heads_ok)
    if heads_ok:
        assert slopes.shape == (num_heads,)
    # q_len, k_len >= 0; offset: any absolute position of the first query (default k_len - q_len).
    lens_ok = q_len >= 0 and k_len >= 0
    bias = works_or_refuses(lambda: alibi_cls(num_heads, causal=causal)(q_len, k_len, offset=offset),
                            ["num_heads"] if not heads_ok else ["q_len", "k_len"], valid=heads_ok and lens_ok)
    if bias is not None:
        assert bias.shape == (num_heads, q_len, k_len)


@SETTINGS
@given(head_dim=any_int, gen=st.sampled_from(["none", "ok", "asym", "odd", "nan", "3d"]))
def test_general_rotary(head_dim: Any, gen: str) -> None:
    cls = _need("lightning_tiger.nn", "GeneralRotaryEmbedding")
    d = max(head_dim, 1) if is_int(head_dim) else 4

    def generator() -> torch.Tensor | None:
        if gen == "none":
            return None
        a = torch.randn(d, d)
        return {"ok": a - a.T, "asym": a, "odd": torch.zeros(d + 1, d + 1), "nan": (a - a.T) * float("nan"),
                "3d": torch.zeros(2, d, d)}[gen]

    def run() -> Any:
        rope = cls(head_dim, generator=generator())
        q = torch.randn(1, 5, 2, head_dim)
        return rope(q, q)

    # head_dim even >= 2; generator None or a finite skew-symmetric [head_dim, head_dim] tensor.
    dim_ok = is_int(head_dim, 2) and head_dim % 2 == 0
    works_or_refuses(run, ["head_dim"] if not dim_ok else ["generator"], valid=dim_ok and gen in ("none", "ok"))


@SETTINGS
@given(batch=any_int, seq_len=any_int, max_position=any_int,
       mode=st.sampled_from(["sorted_int", "equal_mean_float", "uniform"]))
def test_random_positions(batch: Any, seq_len: Any, max_position: Any, mode: str) -> None:
    fn = _need("lightning_tiger.nn", "random_positions")
    checks = {"batch": is_int(batch, 1), "seq_len": is_int(seq_len, 1), "max_position": is_int(max_position, 1),
              "mode": mode in ("sorted_int", "equal_mean_float")}
    if all(checks.values()) and mode == "sorted_int":
        checks["max_position"] = max_position >= seq_len  # "sorted_int" needs L >= N
    out = works_or_refuses(lambda: fn(batch, seq_len, max_position, mode=mode),
                           [k for k, ok in checks.items() if not ok], valid=all(checks.values()))
    if out is not None:
        assert out.shape == (batch, seq_len)
        assert (out >= 0).all() and (out <= max_position).all()


LM_ARGS: dict[str, st.SearchStrategy] = {
    "vocab_size": any_int, "dim": any_int, "depth": any_int, "num_heads": any_int, "mlp": st.sampled_from(
        ["swiglu", "gelu", "relu"]), "mlp_ratio": any_float, "hidden_dim": st.one_of(any_int, st.none()),
    "dropout": any_float, "position": ATTN_ARGS["position"], "window": st.one_of(any_int, st.none()),
    "tie_embeddings": st.sampled_from([True, False]),
}


#: TransformerLM(vocab_size=11, dim=16, depth=1, num_heads=2, ...) varying one argument.
LM_VALID: dict[str, Any] = {
    "vocab_size": lambda v: is_int(v, 1), "dim": lambda v: is_int(v, 1) and v % 2 == 0 and (v // 2) % 2 == 0,
    "depth": lambda v: is_int(v, 1), "num_heads": lambda v: is_int(v, 1) and 16 % v == 0 and (16 // v) % 2 == 0,
    "mlp": _one_of("swiglu", "gelu"), "mlp_ratio": lambda v: is_real(v, 0, low_open=True),
    "hidden_dim": _opt_int(1), "dropout": ATTN_VALID["dropout"], "position": ATTN_VALID["position"],
    "window": _opt_int(1), "tie_embeddings": _bool,
}


@pytest.mark.parametrize("arg", list(LM_ARGS))
@SETTINGS
@given(data=st.data())
def test_transformer_lm_args(arg: str, data: st.DataObject) -> None:
    lm_cls = _need("lightning_tiger.nn", "TransformerLM")
    value = data.draw(LM_ARGS[arg], label=arg)
    kwargs: dict[str, Any] = {"vocab_size": 11, "dim": 16, "depth": 1, "num_heads": 2, arg: value}

    def run() -> torch.Tensor:
        lm = lm_cls(**kwargs)
        return lm(torch.randint(0, kwargs["vocab_size"], (2, 6)))

    names = {"num_heads": ["num_heads", "head_dim"], "dim": ["dim", "head_dim"]}.get(arg, [arg])
    works_or_refuses(run, names, valid=LM_VALID[arg](value))


@SETTINGS
@given(tokens=st.sampled_from(["ok", "oov", "neg", "float", "1d", "3d", "empty"]))
def test_transformer_lm_tokens(tokens: str) -> None:
    lm = _need("lightning_tiger.nn", "TransformerLM")(vocab_size=11, dim=16, depth=1, num_heads=2)
    t = {"ok": torch.randint(0, 11, (2, 5)), "oov": torch.full((2, 5), 11), "neg": torch.full((2, 5), -1),
         "float": torch.rand(2, 5), "1d": torch.randint(0, 11, (5,)), "3d": torch.randint(0, 11, (2, 5, 1)),
         "empty": torch.zeros(2, 0, dtype=torch.long)}[tokens]
    # Documented: tokens [B, L] integer ids in [0, vocab_size); an empty sequence gives empty logits.
    out = works_or_refuses(lambda: lm(t), ["tokens"], valid=tokens in ("ok", "empty"))
    if out is not None:
        assert out.shape == (*t.shape, 11)


CLM_ARGS: dict[str, st.SearchStrategy] = {
    "warmup_steps": st.one_of(any_int, st.none()), "train_positions": st.sampled_from(["contiguous", "random_int",
                                                                                       "random_float", "shuffled"]),
    "max_position": st.one_of(any_int, st.none()), "metric_last_n": st.one_of(any_int, st.none()),
    "train_len": st.one_of(any_int, st.none()), "model": st.sampled_from([None, {"vocab_size": 11, "dim": 16},
                                                                          {"vocab_size": 11, "bogus": 1}, "gpt"]),
}
#: CausalLMModule's documented ranges (its docstring and error messages): warmup_steps None or an int >= 0,
#: max_position / metric_last_n / train_len None or an int >= 1, model a TransformerLM kwargs dict, an nn.Module or
#: None. (The optimizer's own hyperparameters are checked by the optimizer: see the OPT_* cases.)
CLM_VALID: dict[str, Any] = {
    "warmup_steps": _opt_int(0), "train_positions": _one_of("contiguous", "random_int", "random_float"),
    "max_position": _opt_int(1), "metric_last_n": _opt_int(1), "train_len": _opt_int(1),
    "model": lambda v: v is None or v == {"vocab_size": 11, "dim": 16},
}


@pytest.mark.parametrize("arg", list(CLM_ARGS))
@SETTINGS
@given(data=st.data())
def test_causal_lm_module_args(arg: str, data: st.DataObject) -> None:
    cls = _need("lightning_tiger.modules", "CausalLMModule")
    value = data.draw(CLM_ARGS[arg], label=arg)
    kwargs: dict[str, Any] = {"model": {"vocab_size": 11, "dim": 16, "depth": 1, "num_heads": 2}, arg: value}

    def run() -> Any:
        module = cls(**kwargs)
        opt = module.configure_optimizers()
        batch = torch.randint(0, 11, (2, 9))
        module.train()
        # training_step may log: run it detached from a Trainer (self.log is a no-op then, with a warning)
        out = module.training_step(batch, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        return loss, opt

    names = ["bogus"] if value == {"vocab_size": 11, "bogus": 1} else [arg]
    with _quiet():
        works_or_refuses(run, names, valid=CLM_VALID[arg](value))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------ diffusion
SDE_ARGS = {"VPSDE": ("beta_min", "beta_max"), "SubVPSDE": ("beta_min", "beta_max"),
            "VESDE": ("sigma_min", "sigma_max")}


@pytest.mark.parametrize("name", list(SDE_ARGS))
@SETTINGS
@given(a=any_float, b=any_float, t=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4))
@example(a=float("nan"), b=1.0, t=[0.5]).via("non-finite lower parameter")
@example(a=0.1, b=float("nan"), t=[0.5]).via("non-finite upper parameter")
@example(a=0.1, b=float("inf"), t=[0.5]).via("infinite upper parameter")
@example(a=5e-324, b=1.0, t=[0.5]).via("subnormal lower parameter: high / low overflows to inf")
def test_sde_parameters(name: str, a: float, b: float, t: list[float]) -> None:
    cls = _need("lightning_tiger.generative", name)
    kw = dict(zip(SDE_ARGS[name], (a, b)))

    def run() -> Any:
        sde = cls(**kw)
        tt = torch.tensor(t).clamp_min(1e-3)
        alpha, sigma = sde.marginal_coefs(tt)
        x0 = torch.randn(len(t), 2)
        xt = sde.marginal(x0, tt, torch.randn_like(x0))
        return alpha, sigma, xt, sde.drift(x0, tt), sde.diffusion(tt), sde.prior_sample((3, 2)), sde.prior_std

    # Documented: lower parameter finite and > 0, upper finite and > lower.
    low_ok = is_real(a, 0, low_open=True)
    names = [SDE_ARGS[name][0]] if not low_ok else [SDE_ARGS[name][1]]
    works_or_refuses(run, names, valid=low_ok and is_real(b) and b > a)


def _gauss_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -x  # the score of N(0, I): the VP prior, exact at every t for data ~ N(0, I)


SAMPLERS = ["euler_maruyama", "predictor_corrector", "ode_euler", "ode_heun", "annealed_langevin"]


@pytest.mark.parametrize("sampler", SAMPLERS)
@SETTINGS
@given(steps=any_int, t_end=st.one_of(any_float, st.just(1e-3)), n=st.sampled_from([0, 1, 3]))
def test_sampler_steps(sampler: str, steps: Any, t_end: float, n: int) -> None:
    fn = _need("lightning_tiger.generative.samplers", sampler)
    sde = _need("lightning_tiger.generative", "VESDE" if sampler == "annealed_langevin" else "VPSDE")()
    kwargs: dict[str, Any] = {} if sampler == "annealed_langevin" else {"t_end": t_end}
    # steps an int >= 1; t_end in [0, T) with T = 1 (annealed Langevin has no t_end); any batch size, 0 included.
    checks = {"steps": is_int(steps, 1), "t_end": "t_end" not in kwargs or is_real(t_end, 0, 1, high_open=True)}
    out = works_or_refuses(lambda: fn(_gauss_score, sde, torch.randn(n, 2), steps, **kwargs),
                           [k for k, ok in checks.items() if not ok], valid=all(checks.values()))
    if out is not None:
        assert out.shape == (n, 2)


@SETTINGS
@given(snr=any_float, corrector_steps=any_int)
@example(snr=float("nan"), corrector_steps=1).via("NaN snr")
def test_predictor_corrector_options(snr: float, corrector_steps: Any) -> None:
    fn = _need("lightning_tiger.generative.samplers", "predictor_corrector")
    sde = _need("lightning_tiger.generative", "VPSDE")()
    checks = {"snr": is_real(snr, 0, low_open=True), "corrector_steps": is_int(corrector_steps, 0)}
    works_or_refuses(lambda: fn(_gauss_score, sde, torch.randn(4, 2), 5, snr=snr, corrector_steps=corrector_steps),
                     [k for k, ok in checks.items() if not ok], valid=all(checks.values()))


@SETTINGS
@given(rtol=any_float, atol=any_float, max_steps=any_int)
def test_adaptive_ode(rtol: float, atol: float, max_steps: Any) -> None:
    fn = _need("lightning_tiger.generative.samplers", "ode_adaptive")
    sde = _need("lightning_tiger.generative", "VPSDE")()
    checks = {"rtol": is_real(rtol, 0, low_open=True), "atol": is_real(atol, 0, low_open=True),
              "max_steps": is_int(max_steps, 1)}

    def run() -> Any:
        try:
            return fn(_gauss_score, sde, torch.randn(4, 2), rtol=rtol, atol=atol, max_steps=max_steps)
        except RuntimeError as exc:
            # Documented: more than max_steps attempted steps raise RuntimeError (tiny tolerances, small caps).
            assert "max_steps" in str(exc), exc
            return None

    works_or_refuses(run, [k for k, ok in checks.items() if not ok], valid=all(checks.values()))


@pytest.mark.slow
@SETTINGS
@given(steps=any_int, solver=st.sampled_from(["euler", "heun", "adaptive", "rk4", None]),
       z0=st.sampled_from(["ok", "empty", "1d", "nan"]))
@example(steps=3, solver="adaptive", z0="nan").via("NaN start, adaptive")
@example(steps=3, solver="heun", z0="nan").via("NaN start, fixed step")
def test_flow_integrate(steps: Any, solver: Any, z0: str) -> None:
    integrate = _need("lightning_tiger.generative.flow", "integrate")
    z = {"ok": torch.randn(4, 2), "empty": torch.randn(0, 2), "1d": torch.randn(4),
         "nan": torch.full((4, 2), float("nan"))}[z0]

    def run() -> Any:
        sol = integrate(lambda x, t: -x, z, steps=steps, solver=solver)
        return getattr(sol, "x", None) if not isinstance(sol, torch.Tensor) else sol

    # steps an int >= 1 (the fixed-step solvers; the adaptive one starts from 1/steps too); solver one of
    # euler / heun / adaptive; z0 any [b, *shape] (a 1-D z0 is b samples of shape ()).
    checks = {"steps": is_int(steps, 1), "solver": solver in ("euler", "heun", "adaptive")}
    if z0 == "nan":
        # Fixed-step solvers: NaN in is NaN out (documented). The adaptive one cannot estimate an error from a
        # non-finite field and says so (FloatingPointError naming t) instead of shrinking h until max_steps.
        # A bad steps/solver is refused first either way.
        if solver == "adaptive" and all(checks.values()):
            with pytest.raises(FloatingPointError, match="t="):
                run()
            return
        out = works_or_refuses(run, [k for k, ok in checks.items() if not ok], valid=all(checks.values()),
                               check_finite=False)
        if out is not None:
            assert torch.isnan(out).all()
        return
    out = works_or_refuses(run, [k for k, ok in checks.items() if not ok], valid=all(checks.values()))
    if out is not None:
        assert out.shape == z.shape


@SETTINGS
@given(data_dim=any_int, hidden_dim=any_int, depth=any_int, time_dim=any_int)
def test_time_mlp(data_dim: Any, hidden_dim: Any, depth: Any, time_dim: Any) -> None:
    cls = _need("lightning_tiger.nn", "TimeMLP")
    kw = {"data_dim": data_dim, "hidden_dim": hidden_dim, "depth": depth, "time_dim": time_dim}
    checks = {"data_dim": is_int(data_dim, 1), "hidden_dim": is_int(hidden_dim, 1), "depth": is_int(depth, 1),
              "time_dim": is_int(time_dim, 2)}  # TimeEmbedding's dim >= 2
    works_or_refuses(lambda: cls(**kw)(torch.randn(3, data_dim), torch.rand(3)),
                     [k for k, ok in checks.items() if not ok], valid=all(checks.values()))


@SETTINGS
@given(dim=any_int, max_period=any_float, scale=any_float)
@example(dim=4, max_period=10.0, scale=float("nan")).via("NaN scale")
@example(dim=4, max_period=float("nan"), scale=1.0).via("NaN max_period")
def test_time_embedding(dim: Any, max_period: float, scale: float) -> None:
    cls = _need("lightning_tiger.nn", "TimeEmbedding")
    kw = {"dim": dim, "max_period": max_period, "scale": scale}
    # dim >= 2 (docstring); max_period P > 1 and scale s > 0, finite (the ranges its errors state).
    checks = {"dim": is_int(dim, 2), "max_period": is_real(max_period, 1, low_open=True),
              "scale": is_real(scale, 0, low_open=True)}
    out = works_or_refuses(lambda: cls(**kw)(torch.rand(5)), [k for k, ok in checks.items() if not ok],
                           valid=all(checks.values()))
    if out is not None:
        assert out.shape == (5, dim)


@SETTINGS
@given(in_channels=any_int, base_channels=any_int, time_dim=any_int)
def test_small_unet(in_channels: Any, base_channels: Any, time_dim: Any) -> None:
    cls = _need("lightning_tiger.nn", "SmallUNet")
    kw = {"in_channels": in_channels, "base_channels": base_channels, "time_dim": time_dim}
    checks = {"in_channels": is_int(in_channels, 1), "base_channels": is_int(base_channels, 1),
              "time_dim": is_int(time_dim, 2)}
    works_or_refuses(lambda: cls(**kw)(torch.randn(2, in_channels, 8, 8), torch.rand(2)),
                     [k for k, ok in checks.items() if not ok], valid=all(checks.values()))


EMA_DECAYS = st.one_of(any_float, st.sampled_from(["auto", None, "x"]))


def _ema_ok(v: Any) -> bool:
    return v is None or v == "auto" or is_real(v, 0, 1, low_open=True, high_open=True)


DIFF_ARGS: dict[str, dict[str, st.SearchStrategy]] = {
    "ScoreMatchingModule": {"sde": st.sampled_from(["vp", "subvp", "ve", "VP", "bogus", None]),
                            "weighting": st.sampled_from(["sigma2", "likelihood", "none", "bogus", None]),
                            "ema_decay": EMA_DECAYS, "t_eps": any_float, "sample_steps": any_int},
    "RectifiedFlowModule": {"ema_decay": EMA_DECAYS, "t_eps": any_float,
                            "val_solver": st.sampled_from(["euler", "heun", "adaptive", "x"]),
                            "val_steps": st.sampled_from([(1, 2), (0,), (-1,), "x", ()])},
}
#: documented ranges (module docstrings and the ranges their errors state): ema_decay "auto", None or in (0, 1);
#: ScoreMatchingModule t_eps in
#: (0, 1), RectifiedFlowModule t_eps in [0, 1); val_steps a non-empty list of ints >= 1.
DIFF_VALID: dict[str, dict[str, Any]] = {
    "ScoreMatchingModule": {"sde": lambda v: isinstance(v, str) and v.lower() in ("vp", "subvp", "ve"),
                            "weighting": _one_of("sigma2", "likelihood", "none"),
                            "ema_decay": _ema_ok, "t_eps": lambda v: is_real(v, 0, 1, low_open=True, high_open=True),
                            "sample_steps": lambda v: is_int(v, 1)},
    "RectifiedFlowModule": {"ema_decay": _ema_ok, "t_eps": lambda v: is_real(v, 0, 1, high_open=True),
                            "val_solver": _one_of("euler", "heun", "adaptive"),
                            "val_steps": lambda v: isinstance(v, tuple) and len(v) > 0
                            and all(is_int(k, 1) for k in v)},
}
DIFF_CASES = [(m, a) for m, args in DIFF_ARGS.items() for a in args]


@pytest.mark.parametrize(("module", "arg"), DIFF_CASES, ids=[f"{m}-{a}" for m, a in DIFF_CASES])
@SETTINGS
@given(data=st.data())
def test_diffusion_module_args(module: str, arg: str, data: st.DataObject) -> None:
    cls = _need("lightning_tiger.modules", module)
    net = _need("lightning_tiger.nn", "TimeMLP")(data_dim=2, hidden_dim=16, depth=1, time_dim=8)
    value = data.draw(DIFF_ARGS[module][arg], label=arg)

    def run() -> Any:
        m = cls(net, **{arg: value})
        loss = m.training_step(torch.randn(8, 2), 0)
        return loss["loss"] if isinstance(loss, dict) else loss

    with _quiet():
        works_or_refuses(run, [arg], valid=DIFF_VALID[module][arg](value))


@pytest.mark.slow
@pytest.mark.parametrize("module", list(DIFF_ARGS))
@SETTINGS
@given(n=any_int, steps=any_int)
def test_diffusion_sample_args(module: str, n: Any, steps: Any) -> None:
    cls = _need("lightning_tiger.modules", module)
    net = _need("lightning_tiger.nn", "TimeMLP")(data_dim=2, hidden_dim=16, depth=1, time_dim=8)
    m = cls(net)
    # both modules' sample(): n >= 1, steps >= 1; ScoreMatchingModule documents steps=None -> its sample_steps
    steps_ok = is_int(steps, 1) or (steps is None and module == "ScoreMatchingModule")
    checks = {"n": is_int(n, 1), "steps": steps_ok}
    out = works_or_refuses(lambda: m.sample(n, steps=steps), [k for k, ok in checks.items() if not ok],
                           valid=all(checks.values()))
    if out is not None:
        assert out.shape == (n, 2)


# ----------------------------------------------------------------------------------------------------- data
TOY_ARGS: dict[str, st.SearchStrategy] = {
    "name": st.sampled_from(["moons", "8gaussians", "checkerboard", "spirals", "swissroll", "mnist", None]),
    "num_train": any_int, "num_val": any_int, "batch_size": any_int, "seed": any_int,
    "noise": st.one_of(st.none(), any_float), "num_workers": st.sampled_from([0, -1, "2", None]),
}


TOY_NAMES = ("moons", "8gaussians", "checkerboard", "spirals", "scurve", "gmm")  # ToyDataModule's docstring
#: ToyDataModule: name in TOY_NAMES, counts ints >= 1, seed an int, noise None or >= 0, num_workers an int >= 0.
TOY_VALID: dict[str, Any] = {
    "name": lambda v: v in TOY_NAMES, "num_train": lambda v: is_int(v, 1), "num_val": lambda v: is_int(v, 1),
    "batch_size": lambda v: is_int(v, 1), "seed": is_int, "noise": lambda v: v is None or is_real(v, 0),
    "num_workers": lambda v: is_int(v, 0),
}


@pytest.mark.parametrize("arg", list(TOY_ARGS))
@SETTINGS
@given(data=st.data())
def test_toy_data_module(arg: str, data: st.DataObject) -> None:
    cls = _need("lightning_tiger.data", "ToyDataModule")
    value = data.draw(TOY_ARGS[arg], label=arg)
    kwargs: dict[str, Any] = {"num_train": 64, "num_val": 32, "batch_size": 16, arg: value}

    def run() -> Any:
        dm = cls(**kwargs)
        dm.setup("fit")
        return next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))

    works_or_refuses(run, [arg], valid=TOY_VALID[arg](value))


@SETTINGS
@given(name=TOY_ARGS["name"], n=any_int, noise=st.one_of(st.none(), any_float))
@example(name="moons", n=4, noise=-1.0).via("negative noise")
def test_sample_toy(name: Any, n: Any, noise: Any) -> None:
    fn = _need("lightning_tiger.data", "sample_toy")
    checks = {"name": TOY_VALID["name"](name), "n": is_int(n, 0), "noise": TOY_VALID["noise"](noise)}
    out = works_or_refuses(lambda: fn(name, n, noise=noise), [k for k, ok in checks.items() if not ok],
                           valid=all(checks.values()))
    if out is not None:
        assert out.shape == (n, 2)


@SETTINGS
@given(means=st.sampled_from([[[0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]], [], [[0.0], [1.0, 2.0]], [[float("nan"), 0]]]),
       stds=st.one_of(any_float, st.sampled_from([[1.0], [1.0, -1.0], [0.5, 0.5], []])),
       weights=st.sampled_from([None, [1.0], [0.5, 0.5], [1.0, -1.0], [0.0, 0.0], [1.0, 1.0, 1.0]]))
def test_gaussian_mixture(means: Any, stds: Any, weights: Any) -> None:
    cls = _need("lightning_tiger.data", "GaussianMixture")

    def run() -> Any:
        gm = cls(means, stds, weights)
        x = gm.sample(5)
        return x, gm.log_prob(x), gm.score(x)

    # Documented: means [K, d] (finite), stds [K] or one float, > 0; weights [K], non-negative with a positive sum
    # (normalised), or None.
    k = len(means) if means in ([[0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]) else None
    checks = {
        "means": k is not None,
        "stds": is_real(stds, 0, low_open=True) or (isinstance(stds, list) and len(stds) == k
                                                     and all(is_real(v, 0, low_open=True) for v in stds)),
        "weights": weights is None or (len(weights) == k and min(weights) >= 0 and sum(weights) > 0),
    }
    works_or_refuses(run, [n for n, ok in checks.items() if not ok], valid=all(checks.values()))


@SETTINGS
@given(batch_size=any_int, val_fraction=any_float, seed=any_int)
@example(batch_size=4, val_fraction=0.5, seed=True).via("bool seed")
def test_digits_data_module(batch_size: Any, val_fraction: float, seed: Any) -> None:
    cls = _need("lightning_tiger.data", "DigitsDataModule")
    kw = {"batch_size": batch_size, "val_fraction": val_fraction, "seed": seed}
    checks = {"batch_size": is_int(batch_size, 1), "val_fraction": is_real(val_fraction, 0, 1, low_open=True,
                                                                           high_open=True), "seed": is_int(seed)}

    def run() -> Any:
        dm = cls(**kw)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    works_or_refuses(run, [k for k, ok in checks.items() if not ok], valid=all(checks.values()))


CHAR_ARGS: dict[str, st.SearchStrategy] = {
    "seq_len": any_int, "batch_size": any_int, "val_fraction": any_float, "max_chars": st.one_of(any_int, st.none()),
    "eval_lengths": st.sampled_from([(), (8,), (8, -1), (0,), "64", (8.5,)]), "num_eval_windows": any_int,
    "vocab": st.sampled_from(["bytes", "chars", "words"]), "batches_per_epoch": any_int,
    "source": st.sampled_from([None, "/nonexistent/path"]),
}
#: CharCorpusDataModule(source=<12 small files>, seq_len=8, eval_lengths=(8, 16), ...) varying one argument:
#: counts positive ints, val_fraction in (0, 1), max_chars None or >= seq_len + 1, eval_lengths distinct
#: positive ints, vocab "bytes" | "chars", source None (the standard library) or an existing path.
CHAR_VALID: dict[str, Any] = {
    "seq_len": lambda v: is_int(v, 1), "batch_size": lambda v: is_int(v, 1),
    "val_fraction": lambda v: is_real(v, 0, 1, low_open=True, high_open=True), "max_chars": _opt_int(9),
    "eval_lengths": lambda v: isinstance(v, tuple) and len(v) > 0 and all(is_int(t, 1) for t in v)
    and len(set(v)) == len(v),
    "num_eval_windows": lambda v: is_int(v, 1), "vocab": _one_of("bytes", "chars"),
    "batches_per_epoch": lambda v: is_int(v, 1), "source": lambda v: v is None,
}


@pytest.mark.parametrize("arg", list(CHAR_ARGS))
@settings(max_examples=max(EXAMPLES // 2, 4), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_char_corpus_data_module(arg: str, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    cls = _need("lightning_tiger.data", "CharCorpusDataModule")
    value = data.draw(CHAR_ARGS[arg], label=arg)
    root = tmp_path_factory.getbasetemp() / "corpus"
    if not root.exists():
        root.mkdir()
        for i in range(12):
            (root / f"f{i}.py").write_text(f"def f(x):\n    return x * {i}  # ünïcode\n" * 40)
    kwargs: dict[str, Any] = {"source": str(root), "seq_len": 8, "eval_lengths": (8, 16), "batch_size": 4,
                              "num_eval_windows": 4, "batches_per_epoch": 3, arg: value}

    def run() -> Any:
        dm = cls(**kwargs)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        return batch

    works_or_refuses(run, [arg], valid=CHAR_VALID[arg](value))


# -------------------------------------------------------------------------------------------------- metrics
_METRIC_INPUTS = {
    "ok": lambda: (torch.randn(6, 2), torch.randn(6, 2)),
    "sizes": lambda: (torch.randn(6, 2), torch.randn(5, 2)),
    "dims": lambda: (torch.randn(6, 2), torch.randn(6, 3)),
    "1d": lambda: (torch.randn(6), torch.randn(6)),
    "3d": lambda: (torch.randn(6, 1, 2), torch.randn(6, 1, 2)),
    "empty": lambda: (torch.randn(0, 2), torch.randn(0, 2)),
    "one": lambda: (torch.randn(1, 2), torch.randn(1, 2)),
    "int": lambda: (torch.randint(0, 3, (6, 2)), torch.randint(0, 3, (6, 2))),
    "mixed_dtype": lambda: (torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2).bfloat16()),
    "nan": lambda: (torch.full((6, 2), float("nan")), torch.randn(6, 2)),
    "list": lambda: ([[0.0, 1.0]] * 6, [[0.0, 1.0]] * 6),
}
METRIC_FNS = ["wasserstein2", "sliced_wasserstein2", "mmd2_unbiased", "frechet_distance", "wasserstein2_1d"]
#: Documented input rules of lightning_tiger.metrics.functional: floating tensors of one dtype, [n] or [n, *features]
#: (flattened), the same number of features, non-empty, finite; wasserstein2 needs equal sizes, mmd2_unbiased and
#: frechet_distance at least 2 samples each, wasserstein2_1d a single feature.
_BAD_FOR_ALL = {"dims", "empty", "int", "mixed_dtype", "nan", "list"}
_FN_INVALID = {"wasserstein2": {"sizes"}, "mmd2_unbiased": {"one"}, "frechet_distance": {"one"}}


@pytest.mark.parametrize("fn_name", METRIC_FNS)
@pytest.mark.parametrize("case", list(_METRIC_INPUTS))
def test_functional_metrics_inputs(fn_name: str, case: str) -> None:
    fn = _need("lightning_tiger.metrics.functional", fn_name)
    x, y = _METRIC_INPUTS[case]()
    if fn_name == "wasserstein2_1d" and case in ("ok", "sizes", "mixed_dtype", "int", "one", "3d"):
        x, y = (x[..., 0], y[..., 0]) if isinstance(x, torch.Tensor) else (x, y)
    names = ["feats_x", "feats_y"] if fn_name == "frechet_distance" else ["x", "y"]
    valid = case not in _BAD_FOR_ALL and case not in _FN_INVALID.get(fn_name, set())
    works_or_refuses(lambda: fn(x, y), names, valid=valid)


#: The metric classes accumulate two updates of each input, then compute: totals of 12 (or 2 for "one") samples;
#: an empty update is allowed, but compute() needs samples; WassersteinDistance needs equal totals; the
#: two-sample metrics need one dtype, FrechetDistance works in float64 whatever the inputs' floating dtype.
_CLASS_INVALID = {"WassersteinDistance": {"sizes"}}


@pytest.mark.parametrize("metric", ["WassersteinDistance", "SlicedWassersteinDistance", "MMD", "FrechetDistance"])
@pytest.mark.parametrize("case", [c for c in _METRIC_INPUTS if c != "nan"])
def test_metric_classes_inputs(metric: str, case: str) -> None:
    cls = _need("lightning_tiger.metrics", metric)
    x, y = _METRIC_INPUTS[case]()
    bad = (_BAD_FOR_ALL - {"mixed_dtype"}) if metric == "FrechetDistance" else _BAD_FOR_ALL
    valid = case not in bad and case not in _CLASS_INVALID.get(metric, set())
    works_or_refuses(lambda: _run_metric(cls, x, y), ["preds", "target"], valid=valid)


def _run_metric(cls: Any, x: Any, y: Any) -> Any:
    m = cls()
    m.update(x, y)
    m.update(x, y)  # states of two calls must concatenate (sizes may differ per call)
    return m.compute()


_POT = importlib.util.find_spec("ot") is not None
METRIC_ARG_VALID: dict[str, Any] = {
    "max_samples": _opt_int(1),
    "backend": lambda v: v in ("auto", "scipy") or (v == "pot" and _POT),  # "pot" needs POT installed
    "num_projections": lambda v: is_int(v, 1),
    # a positive (finite) bandwidth, a non-empty list of them, or None for the median heuristic
    "bandwidths": lambda v: v is None or is_real(v, 0, low_open=True)
    or (isinstance(v, list) and len(v) > 0 and all(is_real(h, 0, low_open=True) for h in v)),
}


@SETTINGS
@given(kw=st.fixed_dictionaries({}, optional={"max_samples": any_int, "backend": st.sampled_from(["auto", "pot",
                                                                                                   "scipy", "x"]),
                                              "num_projections": any_int, "bandwidths": st.one_of(
                                                  any_float, st.sampled_from([[1.0, -1.0], [], "x", None]))}))
def test_metric_constructor_args(kw: dict[str, Any]) -> None:
    classes = {"max_samples": "WassersteinDistance", "backend": "WassersteinDistance",
               "num_projections": "SlicedWassersteinDistance", "bandwidths": "MMD"}
    for arg, value in kw.items():
        cls = _need("lightning_tiger.metrics", classes[arg])
        works_or_refuses(lambda cls=cls, arg=arg, value=value: _run_metric(
            lambda: cls(**{arg: value}), torch.randn(8, 2), torch.randn(8, 2)), [arg],
            valid=METRIC_ARG_VALID[arg](value))


# ------------------------------------------------------------------------------------------------ callbacks
@SETTINGS
@given(action=st.sampled_from(["skip", "shrink", "zero", None]), max_consecutive=st.one_of(any_int, st.none()),
       shrink_ratio=any_float)
def test_nonfinite_guard_args(action: Any, max_consecutive: Any, shrink_ratio: Any) -> None:
    cls = _need("lightning_tiger.callbacks", "NonFiniteGuard")
    checks = {"action": action in ("skip", "shrink"), "max_consecutive": _opt_int(1)(max_consecutive),
              "shrink_ratio": OPT_VALID["Tiger"]["shrink_ratio"](shrink_ratio)}
    works_or_refuses(lambda: cls(action=action, max_consecutive=max_consecutive, shrink_ratio=shrink_ratio),
                     [k for k, ok in checks.items() if not ok], check_finite=False, valid=all(checks.values()))


@SETTINGS
@given(cls_name=st.sampled_from(["lightning_tiger.optim.Tiger", "lightning_tiger.optim.Nope", "torch.optim.AdamW",
                                 "Tiger", 3, None]),
       param_groups=st.sampled_from(["auto", "tiger", "plain", "x"]),
       kwargs=st.sampled_from([{}, {"lr": -1.0}, {"bogus": 1}, {"beta": 2.0}]))
def test_use_optimizer_args(cls_name: Any, param_groups: str, kwargs: dict[str, Any]) -> None:
    cls = _need("lightning_tiger.callbacks", "UseOptimizer")

    def run() -> Any:
        return cls(cls_name, kwargs, param_groups=param_groups)

    # Construction checks what it can know without a module (documented): the class (import path or a bare name
    # from lightning_tiger.optim / torch.optim), param_groups, and that the optimizer accepts each keyword. Value
    # ranges (lr=-1, beta=2) are the optimizer's to refuse when it is built (tested above).
    class_ok = cls_name in ("lightning_tiger.optim.Tiger", "torch.optim.AdamW", "Tiger")
    checks = {"optimizer_class": class_ok, "param_groups": param_groups in ("auto", "tiger", "plain"),
              "kwargs": not class_ok or ("bogus" not in kwargs and not ("beta" in kwargs and "AdamW" in cls_name))}
    names = [k for k, ok in checks.items() if not ok]
    if "kwargs" in names:
        names += [k for k in kwargs if k in ("bogus", "beta")]
    works_or_refuses(run, names, check_finite=False, valid=all(checks.values()))


@SETTINGS
@given(num_samples=any_int, batch_size=any_int, rank=st.one_of(st.none(), st.integers(-2, 4)),
       world_size=st.one_of(st.none(), st.integers(-1, 4)))
@example(num_samples=4, batch_size=1, rank=None, world_size=0).via("zero processes")
def test_resumable_batch_sampler(num_samples: Any, batch_size: Any, rank: Any, world_size: Any) -> None:
    from lightning_tiger.data import ResumableBatchSampler

    def run() -> list[list[int]]:
        return list(ResumableBatchSampler(num_samples, batch_size, rank=rank, world_size=world_size))

    # num_samples, batch_size ints >= 1; without a trainer world_size defaults to 1 and rank to 0, and
    # 0 <= rank < world_size.
    ws = 1 if world_size is None else world_size
    checks = {"num_samples": is_int(num_samples, 1), "batch_size": is_int(batch_size, 1),
              "world_size": is_int(ws, 1)}
    checks["rank"] = not checks["world_size"] or 0 <= (0 if rank is None else rank) < ws
    batches = works_or_refuses(run, [k for k, ok in checks.items() if not ok], check_finite=False,
                               valid=all(checks.values()))
    if batches:
        flat = [i for b in batches for i in b]
        assert all(0 <= i < num_samples for i in flat) and len(set(flat)) == len(flat)
