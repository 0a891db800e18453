"""Fused C++ Tiger/Lion kernels against the straightforward references of tests/optim/reference.py.

Formulas: Tiger (Su, 2023, "Tiger: 一个“抠”到极致的优化器", kexue.fm/archives/9512, and bojone/tiger ``tiger.py``
for the gradient accumulation folded into the momentum) and Lion (Chen et al., 2023, "Symbolic Discovery of
Optimization Algorithms", arXiv:2302.06675, Algorithm 2).

The reference works in float64 per tensor; the kernels compute in float32 and round once to the storage dtype, so
comparisons allow fp32 rounding (and one ulp of bf16/fp16 for low-precision storage). Where a NaN/inf is
injected, momenta must be bit-identical to their previous value with ``exact=True``, and within the documented
rollback rounding (and reproducible) on the default one-pass path.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lightning_tiger.optim import _fused
from tests.optim.reference import reference_lion_step, reference_tiger_step

pytestmark = pytest.mark.skipif(not _fused.fused_available(), reason="fused kernels could not be built here")

KIND_OF_MODE = {0: "bias", 1: "matrix", 2: "embedding"}
BLOCK = 16384  # the kernels' work-item size: NaN placement tests target its first/middle/last block


def _tiger_args(modes: list[int], shapes: list[tuple[int, ...]], *, lr: float = 1e-2, wd: float = 0.1,
                floor: float = 1e-3, centers: list[float] | None = None) -> dict:
    """Per-tensor arguments of the fused call matching reference kinds: bias kinds get 0.5·lr and no decay."""
    n = len(modes)
    return dict(
        lr_modes=modes,
        lrs=[0.5 * lr if m == 0 else lr for m in modes],
        weight_decays=[0.0 if m == 0 else wd for m in modes],
        centers=centers if centers is not None else [0.0] * n,
        rms_floor=[floor] * n,
    )


def _run_both(shapes, modes, *, pdtype=torch.float32, mdtype=torch.float32, beta=0.9, k=1, t=0, lr=1e-2,
              wd=0.1, floor=1e-3, nan_at: dict[int, list[int]] | None = None, s=0.99, seed=0, exact=False):
    """One micro-step by the kernel and by the reference on identical copies. Returns both states + flags."""
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(sh, generator=gen) * 0.05).to(pdtype) for sh in shapes]
    grads = [torch.randn(sh, generator=gen).to(pdtype) for sh in shapes]
    moms = [(torch.randn(sh, generator=gen) * 0.01).to(mdtype) for sh in shapes]
    for i, positions in (nan_at or {}).items():
        flat = grads[i].view(-1)
        for j, pos in enumerate(positions):
            flat[pos] = (math.nan, math.inf, -math.inf)[j % 3]
    rp, rm = [p.clone() for p in params], [m.clone() for m in moms]
    m_before = [m.clone() for m in moms]
    kinds = [KIND_OF_MODE[m] for m in modes]
    ref_flags = reference_tiger_step(rp, grads, rm, kinds=kinds, lr=lr, beta=beta, weight_decay=wd,
                                     grad_accum_steps=k, micro_step=t, shrink_ratio=s, rms_floor=floor)
    b1 = beta if t % k == 0 else 1.0
    flags = _fused.tiger_step_(params, grads, moms, **_tiger_args(modes, shapes, lr=lr, wd=wd, floor=floor),
                               b1=b1, b2=(1 - beta) / k, update=(t + 1) % k == 0, shrink_ratio=s, exact=exact)
    return params, moms, rp, rm, m_before, flags, ref_flags


def _tol(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-4),
            torch.float16: dict(rtol=2e-3, atol=1e-5)}[dtype]


SHAPES = [(0,), (1,), (1, 1), (3, 0), (7,), (33, 17), (BLOCK + 5,), (5, 3, 4), (257, 100), (64, 2 * BLOCK + 3)]


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("update", [True, False])
def test_tiger_matches_reference_fp32(mode: int, update: bool) -> None:
    k, t = (1, 0) if update else (4, 1)  # non-final micro-step: b1 = 1 (accumulation, bojone/tiger)
    params, moms, rp, rm, _, flags, ref_flags = _run_both(SHAPES, [mode] * len(SHAPES), k=k, t=t)
    assert flags == ref_flags == [False] * len(SHAPES)
    for p, r in zip(params, rp):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)
    for m, r in zip(moms, rm):
        torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("pdtype", "mdtype"), [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float16, torch.float32), (torch.float16, torch.float16)])
def test_tiger_low_precision(pdtype: torch.dtype, mdtype: torch.dtype) -> None:
    shapes = [(1,), (9, 31), (40, 700), (2 * BLOCK + 1,)]
    modes = [0, 1, 2, 1]
    params, moms, rp, rm, _, flags, _ = _run_both(shapes, modes, pdtype=pdtype, mdtype=mdtype)
    assert flags == [False] * 4
    for p, r, m, mr in zip(params, rp, moms, rm):
        assert p.dtype == pdtype
        # Near-cancelling b1·m + b2·g may round to opposite signs in fp32 (kernel) and fp64 (reference); such
        # elements move by ±η in opposite directions. They must be rare and have a tiny momentum.
        flip = torch.sign(m.float()) != torch.sign(mr.float())
        assert flip.sum() <= max(2, flip.numel() // 1000)
        assert (mr.float()[flip].abs() <= 1e-3 * mr.float().abs().max()).all()
        torch.testing.assert_close(p.float()[~flip], r.float()[~flip], **_tol(pdtype))
    for m, r in zip(moms, rm):
        assert m.dtype == mdtype
        torch.testing.assert_close(m.float(), r.float(), **_tol(mdtype))


def test_tiger_rounds_once_to_bf16() -> None:
    """θ_new = round_bf16(fp32 math on the upcast values): one rounding, round-to-nearest-even like torch."""
    gen = torch.Generator().manual_seed(3)
    p = (torch.randn(1000, generator=gen) * 0.05).bfloat16()
    g = torch.randn(1000, generator=gen).bfloat16()
    m = torch.randn(1000, generator=gen) * 0.01
    eta, wd, b1, b2 = 3e-3, 0.1, 0.9, 0.1
    mf = (torch.tensor(b1, dtype=torch.float32) * m + torch.tensor(b2, dtype=torch.float32) * g.float())
    expected = (p.float() * (1 - torch.tensor(eta, dtype=torch.float32) * wd) - eta * torch.sign(mf)).bfloat16()
    _fused.tiger_step_([p], [g], [m], lr_modes=[0], lrs=[eta], weight_decays=[wd], centers=[0.0],
                       rms_floor=[0.0], b1=b1, b2=b2, update=True, shrink_ratio=0.99)
    assert (p.float() - expected.float()).abs().max().item() <= 1e-6  # identical up to a 1-ulp fp32 tie


_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _assert_kept(m: torch.Tensor, m0: torch.Tensor, g: torch.Tensor, b2: float) -> None:
    """The one-pass rollback: m equals m0 to within a few roundings of |m0| + |b2·g| (m's dtype); bitwise where g
    is not finite (never written)."""
    finite = torch.isfinite(g.float())
    assert torch.equal(m[~finite], m0[~finite])
    mf, m0f, gf = m.float()[finite], m0.float()[finite], g.float()[finite]
    bound = 4 * _EPS[m.dtype] * (m0f.abs() + b2 * gf.abs())
    assert ((mf - m0f).abs() <= bound).all(), (mf - m0f).abs().max()


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("exact", [True, False])
def test_nonfinite_big_tensor_keeps_momentum(where: str, update: bool, exact: bool) -> None:
    n = 5 * BLOCK + 123
    pos = {"first": [0], "middle": [2 * BLOCK + 77], "last": [n - 1]}[where]
    shapes = [(n,), (300, 50), (n,)]
    k, t = (1, 0) if update else (3, 0)
    params, moms, rp, rm, m_before, flags, ref_flags = _run_both(
        shapes, [0, 2, 1], nan_at={0: pos}, k=k, t=t, s=0.9, exact=exact)
    assert flags == ref_flags == [True, False, False]
    if exact:
        assert torch.equal(moms[0], m_before[0])  # EXACTLY unchanged
    else:
        gen = torch.Generator().manual_seed(0)  # _run_both's draws: the grads come after the params
        [torch.randn(sh, generator=gen) for sh in shapes]
        g0 = torch.randn(shapes[0], generator=gen)
        g0[pos[0]] = math.nan
        _assert_kept(moms[0], m_before[0], g0, b2=(1 - 0.9) / k)
    for p, r in zip(params, rp):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-8)
    for m, r in zip(moms[1:], rm[1:]):
        torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-8)


def _rollback_case(pdtype: torch.dtype, mdtype: torch.dtype, update: bool, exact: bool, threads: int):
    """Three tensors that all take the one-pass path (bias-like with decay, per-row, whole-RMS with a warm
    cache), each with a NaN/inf late in it so that earlier blocks were written before it was found."""
    gen = torch.Generator().manual_seed(21)
    n = 6 * BLOCK + 100
    shapes = [(n,), (700, 100), (n,)]
    params = [(torch.randn(sh, generator=gen) * 0.05).to(pdtype) for sh in shapes]
    moms = [(torch.randn(sh, generator=gen) * 0.01).to(mdtype) for sh in shapes]
    grads = [torch.randn(sh, generator=gen).to(pdtype) for sh in shapes]
    args = dict(lr_modes=[0, 2, 1], lrs=[1e-2] * 3, weight_decays=[0.5] * 3, centers=[0.0, 0.0, 0.0],
                rms_floor=[1e-3] * 3, b2=0.1, shrink_ratio=0.9)
    cache = _fused.new_rms_cache()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _fused.tiger_step_(params, grads, moms, b1=0.9, update=True, exact=exact, rms_cache=cache, **args)
        bad = [g.clone() for g in grads]
        bad[0][4 * BLOCK + 500] = math.nan
        bad[1][500, 3] = math.inf
        bad[2][5 * BLOCK + 7] = -math.inf
        before = [p.clone() for p in params], [m.clone() for m in moms]
        flags = _fused.tiger_step_(params, bad, moms, b1=0.9 if update else 1.0, update=update, exact=exact,
                                   rms_cache=cache, **args)
    finally:
        torch.set_num_threads(old)
    return params, moms, before, bad, flags


@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize(("pdtype", "mdtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_one_pass_rollback_close_to_exact_and_reproducible(update: bool, pdtype: torch.dtype,
                                                           mdtype: torch.dtype) -> None:
    ex_p, ex_m, (p0, m0), bad, ex_flags = _rollback_case(pdtype, mdtype, update, exact=True, threads=2)
    runs = [_rollback_case(pdtype, mdtype, update, exact=False, threads=t) for t in (1, 2, 2)]
    for p, m, _, _, flags in runs:
        assert flags == ex_flags == [True, True, True]
        for a, b in zip(p + m, runs[0][0] + runs[0][1]):  # whatever was written before the NaN was seen
            assert torch.equal(a, b)
    p, m = runs[0][0], runs[0][1]
    b2 = 0.1
    for i in range(3):
        assert torch.equal(ex_m[i], m0[i])
        assert torch.equal(ex_p[i], (p0[i].float() * 0.9).to(pdtype))  # exact rule: θ ← (θ − 0)·s + 0
        _assert_kept(m[i], m0[i], bad[i], b2)
        # θ: the exact rule's shrink of θ0, up to the rounding of the inverted update (η ≤ lr·max|θ|)
        bound = 8 * _EPS[pdtype] * (ex_p[i].float().abs() + 1e-2)
        assert ((p[i].float() - ex_p[i].float()).abs() <= bound).all()


@pytest.mark.parametrize("b1", [0.0, 0.3])
def test_small_b1_always_takes_the_exact_path(b1: float) -> None:
    """Inverting m' = b1·m + b2·g would divide rounding by b1 (or be impossible at 0): bit-exact rule instead."""
    gen = torch.Generator().manual_seed(12)
    n = 4 * BLOCK + 9
    p, g, m = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    g[n - 3] = math.nan
    p0, m0 = p.clone(), m.clone()
    flags = _fused.tiger_step_([p], [g], [m], lr_modes=[0], lrs=[0.1], weight_decays=[0.1], centers=[0.0],
                               rms_floor=[0.0], b1=b1, b2=0.5, update=True, shrink_ratio=0.5)
    assert flags == [True]
    assert torch.equal(m, m0)
    assert torch.equal(p, p0 * 0.5)


def test_one_pass_and_exact_identical_on_finite_steps() -> None:
    """Without non-finite values the two paths are the same arithmetic: bit-identical trajectories."""
    gen = torch.Generator().manual_seed(8)
    shapes, modes = [(3 * BLOCK + 7,), (300, 70), (2 * BLOCK,), (9,)], [1, 2, 0, 0]
    init = [torch.randn(sh, generator=gen) * 0.05 for sh in shapes]
    states = {}
    for exact in (True, False):
        params, moms, cache = [x.clone() for x in init], [torch.zeros(sh) for sh in shapes], _fused.new_rms_cache()
        g2 = torch.Generator().manual_seed(9)
        for t in range(6):
            grads = [torch.randn(sh, generator=g2) for sh in shapes]
            _fused.tiger_step_(params, grads, moms, **_tiger_args(modes, shapes), b1=0.9 if t % 2 == 0 else 1.0,
                               b2=0.05, update=t % 2 == 1, shrink_ratio=0.99, exact=exact, rms_cache=cache)
        states[exact] = params + moms
    for a, b in zip(states[True], states[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_shrinks_toward_centre(bad: float, pdtype: torch.dtype) -> None:
    p = (1.0 + 0.1 * torch.randn(40, 3)).to(pdtype)
    g = torch.randn(40, 3).to(pdtype)
    g[17, 2] = bad
    m = torch.randn(40, 3)
    p0, m0 = p.clone(), m.clone()
    flags = _fused.tiger_step_([p], [g], [m], lr_modes=[0], lrs=[0.1], weight_decays=[0.0], centers=[1.0],
                               rms_floor=[0.0], b1=0.9, b2=0.1, update=True, shrink_ratio=0.5)
    assert flags == [True]
    assert torch.equal(m, m0)
    expected = ((p0.float() - 1.0) * 0.5 + 1.0).to(pdtype)
    torch.testing.assert_close(p.float(), expected.float(), rtol=0, atol=0)


def test_many_tensors_mixed_dtypes_and_nans() -> None:
    """300 small tensors of all modes and dtypes in one call; NaN in a few; compared tensor by tensor."""
    gen = torch.Generator().manual_seed(11)
    shapes, modes = [], []
    for _ in range(300):
        nd = int(torch.randint(0, 4, (1,), generator=gen))
        shapes.append(tuple(int(x) for x in torch.randint(0, 9, (nd,), generator=gen)))
        mode = int(torch.randint(0, 3, (1,), generator=gen))
        # the reference cannot view a [0, ...] table as rows; such a tensor has nothing to update anyway
        modes.append(1 if mode == 2 and nd >= 2 and shapes[-1][0] == 0 else mode)
    bad = {i: [0] for i in (5, 77, 299) if math.prod(shapes[i]) > 0}
    params, moms, rp, rm, m_before, flags, ref_flags = _run_both(shapes, modes, nan_at=bad)
    assert flags == ref_flags
    assert [i for i, f in enumerate(flags) if f] == sorted(bad)
    for i in bad:
        assert torch.equal(moms[i], m_before[i])
    for p, r in zip(params, rp):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)
    for m, r in zip(moms, rm):
        torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-8)


def test_many_small_groups_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 KiB cache budget splits the call into dozens of pipelined groups; results must not change."""
    shapes = [(3, 5), (BLOCK + 1,), (70, 64), (2,), (0,), (33, 33), (4 * BLOCK,), (1,)] * 3
    modes = [1, 0, 2, 0, 1, 1, 1, 2] * 3
    nan_at = {6: [BLOCK + 3], 13: [100]}
    ref = _run_both(shapes, modes, nan_at=nan_at, seed=7)
    monkeypatch.setenv("LIGHTNING_TIGER_FUSED_GROUP_BYTES", "4096")
    small = _run_both(shapes, modes, nan_at=nan_at, seed=7)
    assert small[5] == small[6] == ref[5]
    assert [i for i, f in enumerate(small[5]) if f] == [6, 13]
    for a, b in zip(small[0] + small[1], ref[0] + ref[1]):
        assert torch.equal(a, b)  # grouping never changes a result
    for p, r in zip(small[0], small[2]):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)
    for m, r in zip(small[1], small[3]):
        torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-8)


def test_accumulation_trajectory_matches_reference() -> None:
    """k = 3 over 7 micro-steps (b1 = 1 on non-final steps), NaN injected on micro-step 4 in one tensor."""
    gen = torch.Generator().manual_seed(5)
    shapes, modes = [(50, 40), (40,), (200, 16), (3 * BLOCK + 1,)], [1, 0, 2, 1]
    params = [torch.randn(sh, generator=gen) * 0.05 for sh in shapes]
    moms = [torch.zeros(sh) for sh in shapes]
    rp, rm = [p.double() for p in params], [m.double() for m in moms]
    kinds = [KIND_OF_MODE[m] for m in modes]
    beta, k, lr, wd = 0.9, 3, 1e-2, 0.1
    for t in range(7):
        grads = [torch.randn(sh, generator=gen) for sh in shapes]
        if t == 4:
            grads[2][10, 3] = math.nan
        ref = reference_tiger_step(rp, [g.double() for g in grads], rm, kinds=kinds, lr=lr, beta=beta,
                                   weight_decay=wd, grad_accum_steps=k, micro_step=t, shrink_ratio=0.99,
                                   rms_floor=1e-3)
        got = _fused.tiger_step_(params, grads, moms, **_tiger_args(modes, shapes, lr=lr, wd=wd),
                                 b1=beta if t % k == 0 else 1.0, b2=(1 - beta) / k, update=(t + 1) % k == 0,
                                 shrink_ratio=0.99)
        assert got == ref == [False, False, t == 4, False]
    for p, r in zip(params, rp):
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)
    for m, r in zip(moms, rm):
        torch.testing.assert_close(m.double(), r, rtol=1e-4, atol=1e-7)


def test_sign_of_zero_momentum_is_zero() -> None:
    """m = 0 after the fold (zero grad, zero momentum): θ only decays, it does not move by ±η."""
    p = torch.full((4, 5), 0.5)
    m = torch.zeros(4, 5)
    g = torch.zeros(4, 5)
    _fused.tiger_step_([p], [g], [m], lr_modes=[0], lrs=[0.1], weight_decays=[0.2], centers=[0.0],
                       rms_floor=[0.0], b1=0.9, b2=0.1, update=True, shrink_ratio=0.99)
    torch.testing.assert_close(p, torch.full((4, 5), 0.5 * (1 - 0.1 * 0.2)))
    p2, m2 = torch.full((6,), 0.5), torch.zeros(6)
    _fused.lion_step_([p2], [torch.zeros(6)], [m2], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    assert torch.equal(p2, torch.full((6,), 0.5))


def test_rms_floor_and_per_row_rms() -> None:
    """Zero-initialised matrix moves by lr·floor; per-row η uses each row's own RMS."""
    p = torch.zeros(8, 4)
    m = torch.zeros(8, 4)
    g = torch.ones(8, 4)
    _fused.tiger_step_([p], [g], [m], lr_modes=[1], lrs=[0.1], weight_decays=[0.0], centers=[0.0],
                       rms_floor=[0.05], b1=0.9, b2=0.1, update=True, shrink_ratio=0.99)
    torch.testing.assert_close(p, torch.full((8, 4), -0.1 * 0.05))
    rows = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, -1.0]])  # RMS 3.5355, 0 (floored), 1
    g = torch.ones(3, 2)
    _fused.tiger_step_([rows], [g], [torch.zeros(3, 2)], lr_modes=[2], lrs=[0.1], weight_decays=[0.0],
                       centers=[0.0], rms_floor=[0.2], b1=0.0, b2=1.0, update=True, shrink_ratio=0.99)
    rms = torch.tensor([math.sqrt(12.5), 0.2, 1.0]).unsqueeze(1)
    expected = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, -1.0]]) - 0.1 * rms
    torch.testing.assert_close(rows, expected)


@pytest.mark.parametrize(("pdtype", "mdtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float16)])
def test_lion_matches_reference(pdtype: torch.dtype, mdtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    shapes = [(0,), (1,), (31, 7), (BLOCK * 2 + 9,), (10, 3, 3)]
    params = [(torch.randn(sh, generator=gen) * 0.05).to(pdtype) for sh in shapes]
    moms = [(torch.randn(sh, generator=gen) * 0.01).to(mdtype) for sh in shapes]
    rp, rm = [p.clone() for p in params], [m.clone() for m in moms]
    for _ in range(3):
        grads = [torch.randn(sh, generator=gen).to(pdtype) for sh in shapes]
        reference_lion_step(rp, grads, rm, lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.5)
        _fused.lion_step_(params, grads, moms, lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.5)
        # re-sync so that a one-ulp rounding difference cannot compound over steps
        for p, r in zip(params, rp):
            torch.testing.assert_close(p.float(), r.float(), **_tol(pdtype))
            r.copy_(p)
        for m, r in zip(moms, rm):
            torch.testing.assert_close(m.float(), r.float(), **_tol(mdtype))
            r.copy_(m)


def test_results_independent_of_thread_count() -> None:
    shapes, modes = [(3 * BLOCK + 7,), (100, 300), (12,)], [1, 2, 0]
    outs = []
    old = torch.get_num_threads()
    try:
        for nthreads in (1, 2):
            torch.set_num_threads(nthreads)
            params, moms, *_ = _run_both(shapes, modes, seed=9)
            outs.append((params, moms))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(outs[0][0] + outs[0][1], outs[1][0] + outs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("exact", [True, False])
def test_rms_cache_is_bit_identical_and_catches_writes(exact: bool) -> None:
    """With a cache, θ and m stay bit-identical to recomputing every RMS, across versioned writes, writes through
    ``.data`` (no version bump: the fingerprint catches them), non-finite steps (exact path) and non-final
    micro-steps."""
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(3 * BLOCK + 5, generator=gen) * 0.05
    q = p.clone()
    mp, mq = torch.zeros_like(p), torch.zeros_like(q)
    cache = _fused.new_rms_cache()
    args = dict(lr_modes=[1], lrs=[1e-2], weight_decays=[0.1], centers=[0.0], rms_floor=[1e-3], b2=0.1,
                shrink_ratio=0.99, exact=exact)
    for step in range(8):
        g = torch.randn(p.shape, generator=gen)
        if step == 2 and exact:
            g[5] = math.nan  # the shrink also refreshes the cached sum
        if step == 3:
            p.mul_(3.0)  # a versioned write
            q.mul_(3.0)
        if step == 5:
            p.data.mul_(0.5)  # no version bump
            q.data.mul_(0.5)
        update = step != 6
        _fused.tiger_step_([p], [g], [mp], b1=0.9 if update else 1.0, update=update, rms_cache=cache, **args)
        _fused.tiger_step_([q], [g], [mq], b1=0.9 if update else 1.0, update=update, **args)
        assert torch.equal(p, q) and torch.equal(mp, mq), step
        assert p in cache


def test_rms_cache_is_used_and_validated() -> None:
    """A planted wrong sum in a valid entry changes the step (the cache is read); the same entry after a
    ``.data`` write of θ is rejected by the fingerprint (the step equals one without cache)."""
    gen = torch.Generator().manual_seed(6)
    init = torch.randn(2 * BLOCK + 3, generator=gen) * 0.05
    g = torch.randn(init.shape, generator=gen)
    args = dict(lr_modes=[1], lrs=[1e-2], weight_decays=[0.0], centers=[0.0], rms_floor=[0.0], b1=0.9, b2=0.1,
                update=True, shrink_ratio=0.99)
    results = {}
    for case in ("none", "planted", "planted+data-write"):
        p, m, cache = init.clone(), torch.zeros_like(init), _fused.new_rms_cache()
        _fused.tiger_step_([p], [g], [m], rms_cache=cache, **args)
        if case == "planted+data-write":
            p.data.add_(1e-3)
        if case != "none":
            v, ptr, numel, dtype, ss, fp = cache[p]
            cache[p] = [v, ptr, numel, dtype, ss * 4.0, fp]  # claims RMS twice as large
        ref = p.clone()
        _fused.tiger_step_([p], [g], [m], rms_cache=cache if case != "none" else None, **args)
        results[case] = (p - ref).abs().max().item()
    assert results["planted"] == pytest.approx(2 * results["none"], rel=1e-3)
    assert results["planted+data-write"] == pytest.approx(results["none"], rel=1e-3)


def test_bad_input_raises() -> None:
    p, g, m = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    args = dict(lr_modes=[0], lrs=[0.1], weight_decays=[0.0], centers=[0.0], rms_floor=[0.0], b1=0.9, b2=0.1,
                update=True, shrink_ratio=0.99)
    with pytest.raises(ValueError, match="moms"):
        _fused.tiger_step_([p], [g], [], **args)
    with pytest.raises(ValueError, match="lr_modes"):
        _fused.tiger_step_([p], [g], [m], **{**args, "lr_modes": [3]})
    with pytest.raises(TypeError, match="dtype"):
        _fused.tiger_step_([p.double()], [g.double()], [m.double()], **args)
    with pytest.raises(ValueError, match="contiguous"):
        _fused.lion_step_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], [torch.zeros(4, 4)], lr=0.1, beta1=0.9,
                          beta2=0.99, weight_decay=0.0)
    assert _fused.tiger_step_([], [], [], **{**args, "lr_modes": [], "lrs": [], "weight_decays": [],
                                             "centers": [], "rms_floor": []}) == []
    assert not _fused.fused_available("meta")
    assert _fused.fused_supports(torch.bfloat16, torch.float32)
    assert not _fused.fused_supports(torch.float64, torch.float64)


def test_versions_bumped_and_params_with_grad() -> None:
    """Parameters that require grad are updated in place (like torch optimizers) and their version moves."""
    p = torch.nn.Parameter(torch.ones(5))
    m = torch.zeros(5)
    v0 = p._version
    _fused.lion_step_([p], [torch.ones(5)], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    assert p._version > v0
    torch.testing.assert_close(p.detach(), torch.full((5,), 0.9))


def test_disabled_by_env_var() -> None:
    code = ("import os; os.environ['LIGHTNING_TIGER_DISABLE_FUSED'] = '1'\n"
            "from lightning_tiger.optim import _fused\n"
            "assert _fused.fused_available() is False\n"
            "import torch\n"
            "try:\n"
            "    _fused.lion_step_([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], lr=0.1, beta1=0.9,"
            " beta2=0.9, weight_decay=0.0)\n"
            "except RuntimeError as e:\n"
            "    assert 'fused_available' in str(e)\n"
            "else:\n"
            "    raise SystemExit('no error')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
