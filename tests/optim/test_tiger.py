"""Tiger against the per-tensor reference of Su 2023, kexue.fm/archives/9512 (tests/optim/reference.py) and
hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_tiger.optim.param_groups import tiger_param_groups
from lightning_tiger.optim.tiger import Tiger
from tests.optim.reference import MIXED_KINDS, PATHS, Mixed, fused_ok, random_grads, reference_tiger_step

LR, BETA, WD, S = 2e-2, 0.9, 0.05, 0.99


def _run_against_reference(
    path: dict, k: int, steps: int, inject: dict[tuple[int, str], float] | None = None,
    none_at: set[tuple[int, str]] | None = None, rms_floor: float | None = None, device: str = "cpu",
) -> None:
    model = Mixed().to(device)
    names = list(MIXED_KINDS)
    params = dict(model.named_parameters())
    ref_p = [params[n].detach().cpu().double().clone() for n in names]
    ref_m = [torch.zeros_like(r) for r in ref_p]
    opt = Tiger(tiger_param_groups(model, weight_decay=WD), lr=LR, beta=BETA, grad_accum_steps=k,
                shrink_ratio=S, rms_floor=rms_floor, **path)
    grads = random_grads(model, steps)
    for t in range(steps):
        g_t = {}
        for n in names:
            if none_at and (t, n) in none_at:
                g_t[n] = None
                continue
            g = grads[t][n].clone()
            if inject and (t, n) in inject:
                g.view(-1)[1] = inject[(t, n)]
            g_t[n] = g
        for n in names:
            params[n].grad = None if g_t[n] is None else g_t[n].float().to(device)
        opt.step()
        reference_tiger_step(ref_p, [g_t[n] for n in names], ref_m, kinds=[MIXED_KINDS[n] for n in names],
                             lr=LR, beta=BETA, weight_decay=[WD] * len(names), grad_accum_steps=k,
                             micro_step=t, shrink_ratio=S, rms_floor=rms_floor)
        for n, r, rm in zip(names, ref_p, ref_m):
            torch.testing.assert_close(params[n].detach().cpu().double(), r, rtol=1e-5, atol=1e-6,
                                       msg=f"{n} at t={t}")
            m = opt.state[params[n]].get("momentum", torch.zeros_like(params[n]))  # never had a grad: zeros
            torch.testing.assert_close(m.cpu().double(), rm, rtol=1e-5, atol=1e-7, msg=f"momentum of {n} at t={t}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 3])
def test_trajectory_matches_reference(path: dict, k: int) -> None:
    _run_against_reference(path, k, steps=3 * k + 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("micro", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_on_chosen_micro_step(path: dict, micro: int, value: float) -> None:
    # Window 2 of k=3 (micro-steps 3, 4, 5); one norm scale (centre 1) and one matrix (centre 0), not together.
    inject = {(3 + micro, "ln.weight"): value, (6 + micro, "lin.weight"): value}
    _run_against_reference(path, 3, steps=9, inject=inject)


@pytest.mark.parametrize("path", PATHS)
def test_nonfinite_k1_and_grad_none(path: dict) -> None:
    inject = {(1, "emb.weight"): math.nan, (2, "rms.weight"): math.inf, (2, "lin.bias"): math.nan}
    none_at = {(1, "head.weight"), (3, "ln.bias"), (0, "zero.weight")}
    _run_against_reference(path, 1, steps=5, inject=inject, none_at=none_at)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", [{}, {"foreach": False}, {"foreach": True}], ids=["default", "single", "foreach"])
def test_cuda_paths_match_reference(path: dict) -> None:
    inject = {(3, "ln.weight"): math.nan, (4, "lin.weight"): math.inf}
    _run_against_reference(path, 3, steps=9, inject=inject, none_at={(2, "head.weight")}, device="cuda")


@pytest.mark.parametrize("path", PATHS)
def test_explicit_floor_and_zero_floor(path: dict) -> None:
    _run_against_reference(path, 2, steps=4, rms_floor=0.0)
    _run_against_reference(path, 2, steps=4, rms_floor=0.3)


# ------------------------------------------------------------------------------------ hand-computed values
def test_zero_init_matrix_moves_by_the_documented_floor() -> None:
    lin = nn.Linear(16, 4, bias=False)
    nn.init.zeros_(lin.weight)
    opt = Tiger([{"params": [lin.weight], "kind": "matrix"}], lr=0.1, weight_decay=0.5)
    lin.weight.grad = torch.ones(4, 16)
    opt.step()
    # η = lr · max(RMS=0, 0.1/sqrt(fan_in=16)) = 0.1 · 0.025; decay term λ·θ = 0 on θ = 0.
    torch.testing.assert_close(lin.weight.detach(), torch.full((4, 16), -0.1 * 0.025))
    nn.init.zeros_(lin.weight)
    opt = Tiger([lin.weight], lr=0.1, rms_floor=0.0)  # the official code: a zero matrix never moves
    lin.weight.grad = torch.ones(4, 16)
    opt.step()
    assert torch.count_nonzero(lin.weight) == 0


def test_embedding_uses_per_row_rms_and_matrix_whole_rms() -> None:
    w = torch.tensor([[2.0, -2.0, 2.0, 2.0], [0.5, 0.5, -0.5, 0.5]])
    emb = nn.Parameter(w.clone())
    mat = nn.Parameter(w.clone())
    opt = Tiger([{"params": [emb], "kind": "embedding"}, {"params": [mat], "kind": "matrix"}],
                lr=0.01, weight_decay=0.0)
    emb.grad = torch.ones(2, 4)
    mat.grad = torch.ones(2, 4)
    opt.step()
    # per row: RMS 2 and 0.5; whole tensor: sqrt((4·4 + 0.25·4)/8) = sqrt(17/8)
    torch.testing.assert_close(emb.detach(), w - 0.01 * torch.tensor([[2.0], [0.5]]))
    torch.testing.assert_close(mat.detach(), w - 0.01 * math.sqrt(17 / 8))


def test_bias_and_norm_half_lr_no_decay_and_decay_scaled_by_eta() -> None:
    ln = nn.LayerNorm(3)
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        ln.weight.fill_(2.0)
        lin.weight.fill_(3.0)
        lin.bias.fill_(1.0)
    groups = [{"params": [ln.weight], "kind": "norm_scale"}, {"params": [lin.bias], "kind": "bias"},
              {"params": [lin.weight], "kind": "matrix"}]
    opt = Tiger(groups, lr=0.1, weight_decay=0.2)
    for p in (ln.weight, lin.weight, lin.bias):
        p.grad = -torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(ln.weight.detach(), torch.full((3,), 2.0 + 0.05))  # 0.5·lr, no decay
    torch.testing.assert_close(lin.bias.detach(), torch.full((2,), 1.0 + 0.05))
    # η = lr·RMS = 0.3; θ ← θ − η·(sign(m) + λθ) = 3 − 0.3·(−1 + 0.6)
    torch.testing.assert_close(lin.weight.detach(), torch.full((2, 3), 3.0 - 0.3 * (-1 + 0.2 * 3.0)))


def test_kind_fallback_by_ndim_and_assign_kinds() -> None:
    model = Mixed()
    with torch.no_grad():
        model.ln.weight.fill_(3.0)
    opt = Tiger(model.parameters(), lr=0.01)
    model.ln.weight.grad = torch.full((8,), math.nan)
    opt.step()
    torch.testing.assert_close(model.ln.weight.detach(), torch.full((8,), 2.97))  # ndim 1 -> bias: centre 0
    assigned = opt.assign_kinds(model)
    assert {n: str(k) for n, k in assigned.items()} == MIXED_KINDS
    model.ln.weight.grad = torch.full((8,), math.nan)
    opt.step()
    torch.testing.assert_close(model.ln.weight.detach(), torch.full((8,), (2.97 - 1) * 0.99 + 1))
    # kinds live in the param group (not in the per-parameter state) and survive a state_dict round trip
    assert all("kind" not in st for st in opt.state.values())
    opt2 = Tiger(model.parameters(), lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_settings(model.emb.weight).lr_mode == 2  # embedding: per-row RMS
    # explicit group kinds win over assign_kinds
    opt3 = Tiger([{"params": [model.ln.weight], "kind": "bias"}], lr=0.01)
    assert opt3.assign_kinds(model) == {}


# ----------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_each_step_within_one_rounding(path: dict, dtype: torch.dtype) -> None:
    model = Mixed().to(dtype)
    names = list(MIXED_KINDS)
    params = dict(model.named_parameters())
    # round to nearest: the reference rounds so (stochastic rounding: test_low_precision.py)
    opt = Tiger(tiger_param_groups(model, weight_decay=WD), lr=LR, beta=BETA, grad_accum_steps=2,
                stochastic_rounding=False, **path)
    grads = random_grads(model, 6)
    eps = torch.finfo(dtype).eps
    for t in range(6):
        ref_p = [params[n].detach().double().clone() for n in names]
        ref_m = [opt.state[params[n]]["momentum"].double().clone() if t else torch.zeros_like(ref_p[i])
                 for i, n in enumerate(names)]
        for n in names:
            params[n].grad = grads[t][n].to(dtype)
        opt.step()
        ref_g = [grads[t][n].to(dtype).double() for n in names]
        reference_tiger_step(ref_p, ref_g, ref_m, kinds=[MIXED_KINDS[n] for n in names], lr=LR, beta=BETA,
                             weight_decay=WD, grad_accum_steps=2, micro_step=t, shrink_ratio=S, rms_floor=None)
        for n, r, rm in zip(names, ref_p, ref_m):
            assert params[n].dtype == dtype and opt.state[params[n]]["momentum"].dtype == dtype
            # one rounding to the storage dtype in both: at most one ulp apart
            torch.testing.assert_close(params[n].double(), r.to(dtype).double(), rtol=eps, atol=1e-6)
            torch.testing.assert_close(opt.state[params[n]]["momentum"].double(), rm.to(dtype).double(),
                                       rtol=eps, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_momentum_with_fp32_params(path: dict) -> None:
    model = Mixed()
    names = list(MIXED_KINDS)
    params = dict(model.named_parameters())
    ref_p = [params[n].detach().double().clone() for n in names]
    ref_m = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in ref_p]  # reference rounds m like we do
    # round to nearest (stochastic rounding of the momentum: test_low_precision.py)
    opt = Tiger(tiger_param_groups(model, weight_decay=WD), lr=LR, beta=BETA, grad_accum_steps=2,
                momentum_dtype="bfloat16", stochastic_rounding=False, **path)
    grads = random_grads(model, 6)
    if path.get("fused"):
        from lightning_tiger.optim import _fused

        if not _fused.fused_supports(torch.float32, torch.bfloat16):  # fused=True refuses what it cannot do
            for n in names:
                params[n].grad = grads[0][n].float()
            with pytest.raises(RuntimeError, match="do not qualify"):
                opt.step()
            return
    for t in range(6):
        for n in names:
            params[n].grad = grads[t][n].float()
        opt.step()
        reference_tiger_step(ref_p, [grads[t][n] for n in names], ref_m, kinds=[MIXED_KINDS[n] for n in names],
                             lr=LR, beta=BETA, weight_decay=WD, grad_accum_steps=2, micro_step=t,
                             shrink_ratio=S, rms_floor=None)
    for n, r, rm in zip(names, ref_p, ref_m):
        assert opt.state[params[n]]["momentum"].dtype == torch.bfloat16
        torch.testing.assert_close(params[n].detach().double(), r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[params[n]]["momentum"].float(), rm.float(), rtol=1e-2, atol=1e-5)


# -------------------------------------------------- groups (resume, deepcopy, bad input: test_optimizer_table.py)
def test_added_param_group_joins_the_micro_step_count() -> None:
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    opt = Tiger([a], grad_accum_steps=2)
    a.grad = torch.ones(2, 2)
    opt.step()
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert opt.param_groups[1]["micro_step"] == 1
    assert opt.param_groups[1]["beta"] == 0.965


# ----------------------------------------------------------------------------------------------- sparse
@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16])
def test_sparse_embedding_lazy_rows(momentum_dtype: torch.dtype | None) -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Tiger([{"params": emb.parameters(), "kind": "embedding"}], lr=0.05, beta=0.9, weight_decay=0.1,
                momentum_dtype=momentum_dtype)
    w0 = emb.weight.detach().clone()
    ref_p = emb.weight.detach().double().clone()
    ref_m = torch.zeros(10, 4, dtype=momentum_dtype or torch.float32)
    for idx in ([1, 3, 3, 7], [3, 5]):
        x = torch.tensor(idx)
        coeff = torch.arange(1.0, len(idx) * 4 + 1).view(len(idx), 4)
        (emb(x) * coeff).sum().backward()
        dense_g = torch.zeros(10, 4, dtype=torch.float64).index_add_(0, x, coeff.double())
        rows = sorted(set(idx))
        sub_p, sub_m = ref_p[rows].clone(), ref_m[rows].clone()
        reference_tiger_step([sub_p], [dense_g[rows]], [sub_m], kinds=["embedding"], lr=0.05, beta=0.9,
                             weight_decay=0.1, grad_accum_steps=1, micro_step=0, shrink_ratio=S, rms_floor=None)
        ref_p[rows], ref_m[rows] = sub_p, sub_m
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(emb.weight.detach().double(), ref_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[emb.weight]["momentum"].float(), ref_m.float(), rtol=1e-5, atol=1e-7)
    untouched = [0, 2, 4, 6, 8, 9]
    assert torch.equal(emb.weight.detach()[untouched], w0[untouched])
    assert torch.count_nonzero(opt.state[emb.weight]["momentum"][untouched]) == 0
    # row 1 was touched in step 1 only: its momentum was not decayed by step 2 (lazy)
    torch.testing.assert_close(opt.state[emb.weight]["momentum"][1].float(),
                               (0.1 * torch.arange(1.0, 5.0)).to(momentum_dtype or torch.float32).float())


def test_sparse_nonfinite_shrinks_whole_table_and_accumulation_refused() -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    opt = Tiger([{"params": emb.parameters(), "kind": "embedding"}])
    w0 = emb.weight.detach().clone()
    (emb(torch.tensor([2])) * math.nan).sum().backward()
    opt.step()
    torch.testing.assert_close(emb.weight.detach(), w0 * 0.99)
    emb2 = nn.Embedding(5, 3, sparse=True)
    opt2 = Tiger(emb2.parameters(), grad_accum_steps=2)
    emb2(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="grad_accum_steps=1"):
        opt2.step()


# ------------------------------------------------------------------------------------------- validation
@settings(max_examples=60, deadline=None)
@given(beta=st.floats(allow_nan=True, allow_infinity=True), s=st.floats(allow_nan=True, allow_infinity=True))
def test_beta_and_shrink_ratio_ranges(beta: float, s: float) -> None:
    valid = math.isfinite(beta) and 0 <= beta < 1 and math.isfinite(s) and 0 < s <= 1
    if valid:
        Tiger([nn.Parameter(torch.ones(2))], beta=beta, shrink_ratio=s)
    else:
        with pytest.raises(ValueError, match=r"beta|shrink_ratio"):
            Tiger([nn.Parameter(torch.ones(2))], beta=beta, shrink_ratio=s)


def test_step_returns_closure_loss_and_skips_params_without_grad() -> None:
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.full((2, 2), 2.0))
    opt = Tiger([a, b], lr=0.1)

    def closure() -> torch.Tensor:
        loss = (a * 3).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 12.0
    assert torch.equal(b.detach(), torch.full((2, 2), 2.0)) and b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(2, 2))


# -------------------------------------------------------------------------------------------- dispatch
@pytest.mark.skipif(not fused_ok(), reason="fused kernels unavailable")
def test_default_dispatch_uses_fused_with_the_contract_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_tiger.optim import _fused

    calls: list[dict] = []
    real = _fused.tiger_step_

    def spy(params: list, grads: list, moms: list, **kw: object) -> list[bool]:
        calls.append({"n": len(params), **kw})
        return real(params, grads, moms, **kw)

    monkeypatch.setattr(_fused, "tiger_step_", spy)
    model = Mixed()
    opt = Tiger(tiger_param_groups(model, weight_decay=0.1), lr=0.01, beta=0.9, grad_accum_steps=2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    # every group shares this micro-step's coefficients: one kernel call, tensors in param-group order
    assert len(calls) == 1
    call = calls[0]
    assert call["exact"] is False and call["rms_cache"] is opt._rms_cache
    by_kind: dict[str, dict[str, list]] = {}
    pos = 0
    for g in opt.param_groups:
        sl = slice(pos, pos + len(g["params"]))
        pos = sl.stop
        by_kind[g["kind"]] = {key: call[key][sl] for key in ("lr_modes", "lrs", "weight_decays", "centers",
                                                             "rms_floor")}
    assert pos == call["n"]
    assert by_kind["matrix"]["lr_modes"] == [1, 1, 1] and by_kind["matrix"]["weight_decays"] == [0.1] * 3
    assert by_kind["embedding"]["lr_modes"] == [2]
    assert by_kind["bias"]["lr_modes"] == [0, 0] and by_kind["bias"]["lrs"] == [0.005, 0.005]
    assert by_kind["bias"]["weight_decays"] == [0.0, 0.0]
    assert by_kind["norm_scale"]["centers"] == [1.0, 1.0] and by_kind["norm_shift"]["centers"] == [0.0]
    assert by_kind["matrix"]["rms_floor"] == [0.1 / math.sqrt(6), 0.1 / math.sqrt(8), 0.1 / math.sqrt(4)]
    assert call["b1"] == 0.9 and call["b2"] == pytest.approx(0.05) and call["update"] is False
    calls.clear()
    opt.step()
    assert len(calls) == 1 and calls[0]["b1"] == 1.0 and calls[0]["update"] is True
    # groups with different coefficients (here another beta) get one call each
    calls.clear()
    opt.param_groups[0]["beta"] = 0.5
    opt.step()
    assert sorted(c["b1"] for c in calls) == [0.5, 0.9]
    # exact_nonfinite / rms_cache reach the kernel
    calls.clear()
    exact = Tiger(model.parameters(), exact_nonfinite=True, rms_cache=False)
    exact.step()
    assert len(calls) == 1 and calls[0]["exact"] is True and calls[0]["rms_cache"] is None
    # A dtype pair the kernels do not take falls back to PyTorch silently when fused=None.
    calls.clear()
    opt64 = Tiger([nn.Parameter(torch.ones(3, 3, dtype=torch.float64))])
    opt64.param_groups[0]["params"][0].grad = torch.ones(3, 3, dtype=torch.float64)
    opt64.step()
    assert calls == []


