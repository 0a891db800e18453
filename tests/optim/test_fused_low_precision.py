"""Fused kernels with stochastic rounding and low-precision momenta, against an fp32 reference + stochastic_round.

The reference below is written from the update formulas (Tiger: the official TF code, bojone/tiger ``tiger.py``;
Lion: Chen et al., 2023, Algorithm 2) in float32 with one operation per rounding, the way the kernels compute
(no fused multiply-add), then rounds to the storage dtype with
:func:`lightning_tiger.optim.stochastic_rounding.stochastic_round` (the shared definition of the random bits).
So every comparison here is bit for bit. The learning rate of the RMS modes is made to come from the floor
(``floor`` > RMS), so that η is a plain fp32 product and the test is about the rounding, not about the order of
a reduction (the RMS itself is checked against the float64 reference in ``test_fused.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tiger.optim import _fused
from lightning_tiger.optim.stochastic_rounding import MOMENTUM_SALT, momentum_round, stochastic_round

pytestmark = pytest.mark.skipif(not _fused.fused_available(), reason="fused kernels could not be built here")

BLOCK = 16384  # the kernels' work-item size
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
PAIRS = [(F32, F32), (F32, BF16), (F32, F16), (BF16, BF16), (BF16, F32), (F16, F16), (F16, F32)]
# 0-size, odd lengths, a tensor of two blocks, a per-row tensor of two items (5 rows of 3000 per item)
SHAPES = [(0,), (1,), (7,), (33, 17), (3, 0), (BLOCK + 5,), (6, 3000), (5, 3, 4)]
FLOOR = 10.0  # far above any RMS of the test tensors: η = lr·floor exactly (see the module docstring)


def _f(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F32)


def _round(x: torch.Tensor, dtype: torch.dtype, key: int | None, momentum: bool = False) -> torch.Tensor:
    """fp32 -> dtype: stochastic with ``key`` (None: round to nearest even, torch's cast); ``momentum``: the
    momentum's rule (bf16: low half of θ's bits under θ's key; fp16: ``key ^ MOMENTUM_SALT``)."""
    if dtype == F32:
        return x
    if key is None:
        return x.to(dtype)
    if not momentum:
        return stochastic_round(x, dtype, key)
    if dtype == BF16:
        return stochastic_round(x, dtype, key, bits="low")
    return stochastic_round(x, dtype, key ^ MOMENTUM_SALT)


def ref_tiger(params, grads, moms, *, modes, lrs, wds, centers, b1, b2, update, shrink, keys, momentum_sr):
    """One Tiger micro-step in fp32 math (official order: m first, then θ with the sign of the stored m)."""
    out_p, out_m, flags = [], [], []
    for i, (p, g, m) in enumerate(zip(params, grads, moms)):
        kp = None if keys is None else keys[i]
        km = None if keys is None or not momentum_sr else keys[i]
        th, gf, mf = p.float(), g.float(), m.float()
        bad = not bool(torch.isfinite(gf).all())
        flags.append(bad)
        if bad:  # non-finite rule: m kept, θ ← (θ − c)·s + c
            c = _f(centers[i])
            out_p.append(_round((th - c) * _f(shrink) + c, p.dtype, kp))
            out_m.append(m.clone())
            continue
        mn = _round(_f(b1) * mf + _f(b2) * gf, m.dtype, km, momentum=True)
        out_m.append(mn)
        if not update:
            out_p.append(p.clone())
            continue
        eta = _f(lrs[i]) * _f(FLOOR) if modes[i] in (1, 2) else _f(lrs[i])
        decay = _f(1.0) - eta * _f(wds[i])
        out_p.append(_round(th * decay - eta * torch.sign(mn.float()), p.dtype, kp))
    return out_p, out_m, flags


def ref_lion(params, grads, moms, *, lr, beta1, beta2, wd, keys, momentum_sr):
    """One Lion step in fp32 math (paper order: c from the old m, then θ, then m)."""
    out_p, out_m = [], []
    b1, c1, b2, c2 = _f(beta1), _f(1.0 - beta1), _f(beta2), _f(1.0 - beta2)
    for i, (p, g, m) in enumerate(zip(params, grads, moms)):
        kp = None if keys is None else keys[i]
        km = None if keys is None or not momentum_sr else keys[i]
        th, gf, mf = p.float(), g.float(), m.float()
        c = b1 * mf + c1 * gf
        out_p.append(_round(th * _f(1.0 - lr * wd) - _f(lr) * torch.sign(c), p.dtype, kp))
        out_m.append(_round(b2 * mf + c2 * gf, m.dtype, km, momentum=True))
    return out_p, out_m


def _state(shapes, pdtype, mdtype, seed, nan_at=None):
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(sh, generator=gen) * 0.05).to(pdtype) for sh in shapes]
    grads = [torch.randn(sh, generator=gen).to(pdtype) for sh in shapes]
    moms = [(torch.randn(sh, generator=gen) * 0.01).to(mdtype) for sh in shapes]
    for i, pos in (nan_at or {}).items():
        grads[i].view(-1)[pos] = math.nan
    return params, grads, moms


def _keys(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(k) for k in torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)]


def _tiger_kw(modes, lr=1e-2, wd=0.1):
    n = len(modes)
    return dict(lr_modes=modes, lrs=[lr] * n, weight_decays=[wd] * n, centers=[1.0 if i % 3 == 0 else 0.0
                                                                               for i in range(n)],
                rms_floor=[FLOOR] * n)


def _assert_bitwise(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a.view(-1).view(torch.uint8 if a.numel() == 0 else _int_of(a)),
                           b.view(-1).view(torch.uint8 if b.numel() == 0 else _int_of(b))), (
            i, (a.float() - b.float()).abs().max())


def _int_of(t: torch.Tensor) -> torch.dtype:
    return torch.int32 if t.dtype == F32 else torch.int16


def _run_tiger(pdtype, mdtype, *, mode, update, sr, momentum_sr=True, exact=False, nan_at=None, seed=0,
               shapes=SHAPES, lr=1e-2, ref=True):
    params, grads, moms = _state(shapes, pdtype, mdtype, seed, nan_at)
    n = len(shapes)
    keys = _keys(n, seed + 100) if sr else None
    kw = _tiger_kw([mode] * n, lr=lr)
    b1, b2 = (0.9, 0.1) if update else (1.0, 0.05)
    want_p, want_m, want_flags = ref_tiger(params, grads, moms, modes=kw["lr_modes"], lrs=kw["lrs"],
                                           wds=kw["weight_decays"], centers=kw["centers"], b1=b1, b2=b2,
                                           update=update, shrink=0.9, keys=keys,
                                           momentum_sr=momentum_sr) if ref else (None, None, None)
    flags = _fused.tiger_step_(params, grads, moms, **kw, b1=b1, b2=b2, update=update, shrink_ratio=0.9,
                               exact=exact, sr_keys=keys, momentum_sr=momentum_sr)
    return params, moms, flags, want_p, want_m, want_flags


@pytest.mark.parametrize(("pdtype", "mdtype"), PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(("mode", "update"), [(0, True), (1, True), (2, True), (0, False)],
                         ids=["mode0", "mode1", "mode2", "micro"])  # a non-final micro-step does not read the mode
def test_tiger_bitwise_equals_fp32_reference(pdtype, mdtype, mode, update) -> None:
    params, moms, flags, want_p, want_m, want_flags = _run_tiger(pdtype, mdtype, mode=mode, update=update, sr=True)
    assert flags == want_flags == [False] * len(SHAPES)
    _assert_bitwise(params, want_p)
    _assert_bitwise(moms, want_m)


@pytest.mark.parametrize(("pdtype", "mdtype"), PAIRS, ids=lambda d: str(d).split(".")[-1])
def test_tiger_round_to_nearest_without_keys(pdtype, mdtype) -> None:
    for mode, update in ((1, True), (2, True), (0, False)):
        params, moms, _, want_p, want_m, _ = _run_tiger(pdtype, mdtype, mode=mode, update=update, sr=False)
        _assert_bitwise(params, want_p)
        _assert_bitwise(moms, want_m)


@pytest.mark.parametrize(("pdtype", "mdtype"), [(BF16, BF16), (F32, BF16), (F16, F16)],
                         ids=lambda d: str(d).split(".")[-1])
def test_tiger_momentum_sr_off_rounds_momentum_to_nearest(pdtype, mdtype) -> None:
    params, moms, _, want_p, want_m, _ = _run_tiger(pdtype, mdtype, mode=0, update=True, sr=True,
                                                    momentum_sr=False)
    _assert_bitwise(params, want_p)
    _assert_bitwise(moms, want_m)
    # and it differs from the stochastic momentum somewhere (the flag is not ignored)
    _, moms_sr, *_ = _run_tiger(pdtype, mdtype, mode=0, update=True, sr=True, momentum_sr=True)
    assert any(not torch.equal(a, b) for a, b in zip(moms, moms_sr))


@pytest.mark.parametrize(("pdtype", "mdtype"), PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("update", [True, False], ids=["final", "micro"])
def test_tiger_nonfinite_shrink_exact_path_bitwise(pdtype, mdtype, update) -> None:
    """exact=True: flagged tensors keep m bit for bit and θ ← SR((θ − c)·s + c) with the call's key."""
    nan_at = {1: 0, 5: BLOCK + 2, 6: 2 * 3000 + 1}
    for mode in (0, 2) if update else (0,):
        params, moms, flags, want_p, want_m, want_flags = _run_tiger(pdtype, mdtype, mode=mode, update=update,
                                                                     sr=True, exact=True, nan_at=nan_at)
        assert flags == want_flags
        assert [i for i, f in enumerate(flags) if f] == [1, 5, 6]
        _assert_bitwise(params, want_p)
        _assert_bitwise(moms, want_m)


_EPS = {F32: 2.0**-23, BF16: 2.0**-8, F16: 2.0**-11}  # unit roundoff
_TINY = {F32: 2.0**-149, BF16: 2.0**-133, F16: 2.0**-24}  # spacing of the subnormals


@pytest.mark.parametrize(("pdtype", "mdtype", "mode"), [(BF16, BF16, 0), (F32, BF16, 0), (F16, F16, 0),
                                                   (BF16, F32, 0), (BF16, BF16, 2)],
                         ids=["bf16-bf16", "fp32-bf16", "fp16-fp16", "bf16-fp32", "bf16-bf16-rows"])
@pytest.mark.parametrize("update", [True, False], ids=["final", "micro"])
def test_tiger_one_pass_rollback_with_sr(pdtype, mdtype, mode, update) -> None:
    """Default one-pass path, a NaN late in multi-block tensors: the rollback inverts a stochastically rounded
    update (documented: restored m and θ within ~1 ulp of the exact rule's, m: 1/b1 ulp), the other tensors are
    bit-identical to the reference, and the result does not depend on the thread count."""
    shapes = [(3 * BLOCK + 100,), (400, 100), (BLOCK + 3,), (33, 17)]
    nan_at = {0: 2 * BLOCK + 7, 1: 300 * 100 + 3}
    exact = _run_tiger(pdtype, mdtype, mode=mode, update=update, sr=True, exact=True, nan_at=nan_at, shapes=shapes,
                       seed=3)
    runs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            runs.append(_run_tiger(pdtype, mdtype, mode=mode, update=update, sr=True, nan_at=nan_at, shapes=shapes,
                                   seed=3, ref=threads == 1))
    finally:
        torch.set_num_threads(old)
    for run in runs:
        assert run[2] == exact[2] == exact[5] == [True, True, False, False]
        _assert_bitwise(run[0] + run[1], runs[0][0] + runs[0][1])
    params, moms, _, want_p, want_m, _ = runs[0]
    _assert_bitwise(params[2:], want_p[2:])
    _assert_bitwise(moms[2:], want_m[2:])
    _assert_bitwise(exact[0] + exact[1], exact[3] + exact[4])  # the exact path is the rule, bit for bit
    _, g0, m0 = _state(shapes, pdtype, mdtype, 3, nan_at)
    for i in (0, 1):
        finite = torch.isfinite(g0[i].float())
        assert torch.equal(moms[i][~finite], m0[i][~finite])  # never written
        mf, m0f = moms[i].float()[finite], m0[i].float()[finite]
        b2 = 0.1 if update else 0.05
        bound = 6 * _EPS[mdtype] * (m0f.abs() + b2 * g0[i].float()[finite].abs()) + 4 * _TINY[mdtype]
        assert ((mf - m0f).abs() <= bound).all(), (mf - m0f).abs().max()
        # θ: within a few ulp of the values involved (|θ|, η = 0.1, and the centre c of the shrink (θ − c)·s + c)
        ex, c = exact[0][i].float(), _tiger_kw([0] * len(shapes))["centers"][i]
        assert ((params[i].float() - ex).abs() <= 4 * _EPS[pdtype] * (ex.abs() + abs(c) + 0.2)).all()


@pytest.mark.parametrize(("pdtype", "mdtype"), PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("sr", [True, False], ids=["sr", "nearest"])
def test_lion_bitwise_equals_fp32_reference(pdtype, mdtype, sr) -> None:
    params, grads, moms = _state(SHAPES, pdtype, mdtype, 1)
    for step in range(2):
        grads = [(torch.randn(g.shape, generator=torch.Generator().manual_seed(step)) * 0.3).to(pdtype)
                 for g in grads]
        keys = _keys(len(SHAPES), step) if sr else None
        want_p, want_m = ref_lion(params, grads, moms, lr=3e-3, beta1=0.9, beta2=0.99, wd=0.5, keys=keys,
                                  momentum_sr=True)
        _fused.lion_step_(params, grads, moms, lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.5, sr_keys=keys)
        _assert_bitwise(params, want_p)
        _assert_bitwise(moms, want_m)


@pytest.mark.parametrize("mdtype", [BF16, F16])
def test_rounding_of_arbitrary_values_matches_stochastic_round(mdtype) -> None:
    """Lion with β2 = 0 stores m = g exactly rounded: the kernel's rounding of arbitrary fp32 values (subnormal,
    tiny, ties, beyond the largest finite value of the format, ±inf, NaN) equals ``stochastic_round``."""
    gen = torch.Generator().manual_seed(5)
    vals = [torch.randn(3000, generator=gen) * 10.0 ** float(e) for e in range(-12, 6, 3)]
    big = 65504.0 if mdtype == F16 else 3.3895e38
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 6e-8, -6e-8, 3e-5, -3e-5, big, -big, 65510.0,
                            -65510.0, 65519.0, -65519.0, 65520.0, -65520.0, 3.39e38, -3.39e38, math.inf, -math.inf,
                            math.nan, 2.0**-133, -(2.0**-140)])
    g = torch.cat([*vals, special, torch.linspace(-4, 4, 4097)])
    for key in (0, 1, 0xFFFFFFFF, 123456789):
        p, m = torch.zeros_like(g), torch.zeros(g.shape, dtype=mdtype)
        _fused.lion_step_([p], [g], [m], lr=0.0, beta1=0.9, beta2=0.0, weight_decay=0.0, sr_keys=[key])
        want = momentum_round(_f(0.0) * torch.zeros_like(g) + _f(1.0) * g, mdtype, key)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(m), nan)
        assert torch.equal(m[~nan].view(torch.int16), want[~nan].view(torch.int16))


def _from_bits(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Values with the given bit patterns (NaN payloads and signs included)."""
    ity = torch.int32 if dtype == F32 else torch.int16
    width = 32 if dtype == F32 else 16
    return torch.tensor([b - (1 << width) if b >= 1 << (width - 1) else b for b in bits], dtype=ity).view(dtype)


@pytest.mark.parametrize("sr", [False, True])
def test_bf16_rounding_of_special_values_at_every_position(sr) -> None:
    """NaNs (either sign, several payloads), ±inf, ±0, subnormals, ties and the largest finite values at every
    position of runs of 61 elements (a pair of 16-lane vectors, a single vector and a 13-element scalar tail in
    the kernel) and 100 (no single vector): the bf16 bits of a rounded momentum (from fp32 g) and of a rounded
    bf16 θ equal the reference's bit for bit (torch's cast, or stochastic_round), and every NaN is stored as
    0x7FC0 (c10::BFloat16's rule; torch's own vectorized cast writes 0xFFFF instead, so the reference's NaN
    bits depend on where an element falls, and only NaN-ness is compared there)."""

    def check(got: torch.Tensor, want: torch.Tensor) -> None:
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
        assert bool((got[nan].view(torch.int16) == 0x7FC0).all())

    g_special = torch.cat([
        _from_bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FA12345], F32),
        torch.tensor([math.inf, -math.inf, 0.0, -0.0, 2.0**-149, -(2.0**-140), 3.3895e38, -3.3895e38, 3.3e38,
                      1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 0.1, -7.5e-39]),
    ])
    p_special = _from_bits([0x7FC1, 0xFFC0, 0x7F81, 0xFF81, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x8003,
                            0x7F7F, 0xFF7F, 0x3F80, 0x3DCD], BF16)
    for n in (61, 100):
        for shift in range(max(len(g_special), len(p_special))):
            keys = [(shift * 2654435761 + n) % 2**32] if sr else None
            g = g_special.roll(shift).repeat(n // len(g_special) + 1)[:n].clone()
            p, m = torch.zeros(n), torch.zeros(n, dtype=BF16)
            want_p, want_m = ref_lion([p], [g], [m], lr=0.0, beta1=0.9, beta2=0.0, wd=0.0, keys=keys,
                                      momentum_sr=True)
            _fused.lion_step_([p], [g], [m], lr=0.0, beta1=0.9, beta2=0.0, weight_decay=0.0, sr_keys=keys)
            check(m, want_m[0])  # (θ: sign(NaN) is 0 in the kernel, NaN in the reference; not compared)
            gen = torch.Generator().manual_seed(shift)
            p = p_special.roll(shift).repeat(n // len(p_special) + 1)[:n].clone()
            g, m = torch.randn(n, generator=gen).to(BF16), torch.randn(n, generator=gen).to(BF16)
            want_p, want_m = ref_lion([p], [g], [m], lr=2.0**-4, beta1=0.9, beta2=0.99, wd=0.5, keys=keys,
                                      momentum_sr=True)
            _fused.lion_step_([p], [g], [m], lr=2.0**-4, beta1=0.9, beta2=0.99, weight_decay=0.5, sr_keys=keys)
            check(p, want_p[0])
            check(m, want_m[0])


@pytest.mark.parametrize("pdtype", [BF16, F16])
def test_kernel_rounding_is_unbiased(pdtype) -> None:
    """Mean of θ_new over many keys = the fp32 update (within 5 standard errors of the Bernoulli draw), while
    round to nearest stays put: the update (0.3 ulp of θ) is below half an ulp."""
    gen = torch.Generator().manual_seed(9)
    p0 = (1.25 + 0.5 * torch.rand(256, generator=gen)).to(pdtype)  # one binade: ulp = eps of the format
    ulp = {BF16: 2.0**-7, F16: 2.0**-10}[pdtype]
    g = torch.randn(256, generator=gen).to(pdtype)
    eta = 0.3 * ulp
    exact = p0.float() - _f(eta) * torch.sign(_f(0.1) * g.float())  # fp32 result (m0 = 0, b2 = 0.1)
    draws = 400
    total = torch.zeros(256, dtype=torch.float64)
    for key in range(draws):
        p, m = p0.clone(), torch.zeros(256)
        _fused.tiger_step_([p], [g], [m], lr_modes=[0], lrs=[eta], weight_decays=[0.0], centers=[0.0],
                           rms_floor=[0.0], b1=0.9, b2=0.1, update=True, shrink_ratio=0.9,
                           sr_keys=[(key * 2654435761 + 12345) % 2**32])
        moved = p.double() - p0.double()
        assert ((moved == 0) | ((moved.abs() - ulp).abs() < 1e-12)).all()  # one of the two neighbours
        total += p.double()
    mean = total / draws
    prob = (exact.double() - p0.double()).abs() / ulp
    se = ulp * torch.sqrt(prob * (1 - prob) / draws)
    assert ((prob - 0.3).abs() < 0.01).all()
    assert ((mean - exact.double()).abs() <= 5 * se).all(), ((mean - exact.double()).abs() / se).max()
    p, m = p0.clone(), torch.zeros(256)
    _fused.tiger_step_([p], [g], [m], lr_modes=[0], lrs=[eta], weight_decays=[0.0], centers=[0.0],
                       rms_floor=[0.0], b1=0.9, b2=0.1, update=True, shrink_ratio=0.9)
    assert torch.equal(p, p0)  # round to nearest loses every update


@pytest.mark.parametrize(("pdtype", "mdtype"), [(BF16, BF16), (F32, BF16), (F16, F32)],
                         ids=lambda d: str(d).split(".")[-1])
def test_sr_results_independent_of_thread_count(pdtype, mdtype) -> None:
    shapes = [(3 * BLOCK + 7,), (100, 300), (12,), (5 * BLOCK,)]
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params, grads, moms = _state(shapes, pdtype, mdtype, 4)
            cache = _fused.new_rms_cache()
            for step in range(3):
                _fused.tiger_step_(params, grads, moms, lr_modes=[1, 2, 0, 1], lrs=[1e-2] * 4,
                                   weight_decays=[0.1] * 4, centers=[0.0] * 4, rms_floor=[1e-3] * 4, b1=0.9,
                                   b2=0.1, update=True, shrink_ratio=0.9, rms_cache=cache,
                                   sr_keys=_keys(4, step))
                _fused.lion_step_(params, grads, moms, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1,
                                  sr_keys=_keys(4, 50 + step))
            outs.append(params + moms)
    finally:
        torch.set_num_threads(old)
    _assert_bitwise(outs[0], outs[1])


def test_fp32_params_with_low_precision_momentum_are_fused() -> None:
    assert _fused.fused_supports(F32, BF16) and _fused.fused_supports(F32, F16)
    for pair in [(BF16, BF16), (BF16, F32), (F16, F16), (F16, F32), (F32, F32)]:
        assert _fused.fused_supports(*pair)
    assert not _fused.fused_supports(BF16, F16)


def test_bad_sr_keys_raise() -> None:
    p, g, m = torch.zeros(3, dtype=BF16), torch.zeros(3, dtype=BF16), torch.zeros(3, dtype=BF16)
    args = dict(lr_modes=[0], lrs=[0.1], weight_decays=[0.0], centers=[0.0], rms_floor=[0.0], b1=0.9, b2=0.1,
                update=True, shrink_ratio=0.9)
    with pytest.raises(ValueError, match="sr_keys"):
        _fused.tiger_step_([p], [g], [m], **args, sr_keys=[1, 2])
    with pytest.raises(ValueError, match=r"sr_keys\[0\]"):
        _fused.tiger_step_([p], [g], [m], **args, sr_keys=[2**32])
    with pytest.raises(ValueError, match=r"sr_keys\[0\]"):
        _fused.lion_step_([p], [g], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, sr_keys=[-1])
    _fused.tiger_step_([p], [g], [m], **args, sr_keys=[torch.tensor(2**32 - 1)])  # 0-d int64 tensor accepted


def test_fp16_beyond_largest_finite_rounds_to_nearest_on_both_sides() -> None:
    """stochastic_round's documented rule for |x| > 65504 (round to nearest), which the kernel follows: the
    negative side used to give -inf ((x - lo)/(hi - lo) = inf/inf picked the -inf neighbour)."""
    x = torch.tensor([65510.0, -65510.0, 65519.0, -65519.0, 70000.0, -70000.0])
    want = torch.tensor([65504.0, -65504.0, 65504.0, -65504.0, math.inf, -math.inf])
    for key in range(8):
        assert torch.equal(stochastic_round(x, F16, key).float(), want)
        p, m = torch.zeros(6), torch.zeros(6, dtype=F16)
        _fused.lion_step_([p], [x], [m], lr=0.0, beta1=0.9, beta2=0.0, weight_decay=0.0, sr_keys=[key])
        assert torch.equal(m.float(), want)
