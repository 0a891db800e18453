"""The counter-based stochastic rounding of ``stochastic_rounding.py``: a bf16 θ and its bf16 momentum share one
hash per element (θ adds its high 16 bits, m its low 16 bits), so their rounding decisions must be unbiased and
uncorrelated. References are written from the formula (Gupta et al., 2015, eq. 2: round up with probability
``(x - lo) / (hi - lo)``), the joint test from the product rule of independent events."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tiger.optim import _fused
from lightning_tiger.optim._functional import lion_step_
from lightning_tiger.optim.stochastic_rounding import (
    MOMENTUM_SALT,
    bits32,
    momentum_round,
    random_bits,
    step_key,
    stochastic_round,
    stream_of,
)

BF16 = torch.bfloat16
N = (1 << 16) + 13  # many elements, and a length that leaves a scalar tail after the kernel's vector loops
HALF = 1.0 + 2.0**-8  # exactly halfway between the bf16 neighbours 1 and 1 + 2**-7
KEYS = [0, 1, 0xFFFFFFFF, 123456789, 0x5BD1E995]


def _joint(up_p: torch.Tensor, up_m: torch.Tensor) -> list[float]:
    """Frequencies of (θ up, m up) in the order (up, up), (up, down), (down, up), (down, down)."""
    return [(a & b).double().mean().item() for a in (up_p, ~up_p) for b in (up_m, ~up_m)]


def _assert_independent_halves(up_p: torch.Tensor, up_m: torch.Tensor) -> None:
    """Each joint frequency ≈ 1/4 (independent fair coins) within 5 standard errors of a binomial proportion."""
    se = math.sqrt(0.25 * 0.75 / up_p.numel())
    for f in _joint(up_p, up_m):
        assert abs(f - 0.25) < 5 * se, _joint(up_p, up_m)


@pytest.mark.parametrize("key", KEYS)
def test_high_and_low_halves_round_halfway_values_independently(key: int) -> None:
    """x exactly halfway for θ and m: each rounds up with probability 1/2, and (θ up, m up) with 1/4."""
    x = torch.full((N,), HALF)
    up_p = stochastic_round(x, BF16, key).float() > HALF
    up_m = stochastic_round(x, BF16, key, bits="low").float() > HALF
    _assert_independent_halves(up_p, up_m)


def test_joint_test_detects_shared_bits() -> None:
    """The joint test has power: θ and m rounded with the same half (the same decision) fail it."""
    x = torch.full((N,), HALF)
    up = stochastic_round(x, BF16, 7).float() > HALF
    with pytest.raises(AssertionError):
        _assert_independent_halves(up, up)


@pytest.mark.parametrize("frac", [k / 2**16 for k in (0, 1, 6554, 19661, 32768, 50463, 65535)])
@pytest.mark.parametrize("bits", ["high", "low"])
def test_each_half_is_unbiased(frac: float, bits: str) -> None:
    """P(up) = (x - lo) / ulp for x = lo + frac·ulp, with either half of the bits (binomial, 5 standard errors).
    ``frac`` is a multiple of 2**-16, so x is exact in float32 and the 16 random bits realise P(up) exactly."""
    lo, ulp = 1.5, 2.0**-7  # bf16 neighbours 1.5 and 1.5 + 2**-7
    x = torch.full((N,), lo + frac * ulp)
    assert x[0].item() == lo + frac * ulp  # exactly representable in float32
    out = stochastic_round(x, BF16, 99, bits=bits).double()
    assert set(out.unique().tolist()) <= {lo, lo + ulp}
    p_up = (out > lo).double().mean().item()
    se = math.sqrt(max(frac * (1 - frac), 1.0 / N) / N)
    assert abs(p_up - frac) < 5 * se + 1.0 / N


def test_low_half_definition() -> None:
    """bits="low" adds ``bits_i & 0xFFFF`` to the float32 bits and clears the low 16 (finite values)."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    add = (random_bits(11, 1000, offset=5) & 0xFFFF).to(torch.int32)
    want = ((x.view(torch.int32) + add) & -65536).view(torch.float32).to(BF16)
    assert torch.equal(stochastic_round(x, BF16, 11, offset=5, bits="low"), want)
    assert torch.equal(momentum_round(x, BF16, 11, offset=5), want)


def _bits_reference(key: int, i: int) -> int:
    """The module docstring's definition in Python ints: one multiply-xorshift round of key + i·0x9E3779B1."""
    x = (key + i * 0x9E3779B1) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize("key", KEYS)
def test_random_bits_follow_the_definition(key: int) -> None:
    idx = [0, 1, 2, 1000, (1 << 32) - 1, 1 << 32, (1 << 40) + 5]
    got = [int(random_bits(key, 1, offset=i)[0]) for i in idx]
    assert got == [_bits_reference(key, i) for i in idx]


@pytest.mark.parametrize("key", KEYS)
def test_neighbouring_elements_round_independently(key: int) -> None:
    """Halfway values: the decisions of elements i and i + 1 (and i + 16, one vector apart) are independent."""
    x = torch.full((N,), HALF)
    for bits in ("high", "low"):
        up = stochastic_round(x, BF16, key, bits=bits).float() > HALF
        for lag in (1, 16):
            _assert_independent_halves(up[:-lag], up[lag:])


@pytest.mark.parametrize("index", [0, 7])
def test_consecutive_steps_round_independently(index: int) -> None:
    """Element 3 of a tensor over many steps (the keys of one stream): consecutive halfway decisions are independent
    fair coins, and so are those of two tensors (two streams) at the same step."""
    steps = torch.arange(N, dtype=torch.int64)
    words_a = bits32(step_key(stream_of(0, index), steps) + 3 * 0x9E3779B1)
    words_b = bits32(step_key(stream_of(0, index + 1), steps) + 3 * 0x9E3779B1)
    for shift in (16, 0):  # θ's half, m's half: round up iff the 16 bits carry a halfway value up
        up_a = ((words_a >> shift) & 0xFFFF) >= 0x8000
        up_b = ((words_b >> shift) & 0xFFFF) >= 0x8000
        _assert_independent_halves(up_a[:-1], up_a[1:])
        _assert_independent_halves(up_a, up_b)


def test_fp16_momentum_keeps_its_salted_key() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    want = stochastic_round(x, torch.float16, 11 ^ MOMENTUM_SALT)
    assert torch.equal(momentum_round(x, torch.float16, 11), want)


def test_bad_bits_raise() -> None:
    x = torch.ones(4)
    with pytest.raises(ValueError, match="bits must be 'high' or 'low'"):
        stochastic_round(x, BF16, 0, bits="middle")
    with pytest.raises(ValueError, match=r"bits=.low. is defined for torch\.bfloat16 only"):
        stochastic_round(x, torch.float16, 0, bits="low")


def _halfway_lion(fused: bool, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lion step whose new θ and new m are both exactly halfway (1 + 2**-8) in every element:
    θ = 1 + 2**-7, lr = 2**-8, sign(c) = +1 gives θ − lr; β2 = 1/2, m = 1, g = 1 + 2**-7 gives (m + g)/2."""
    p = torch.full((N,), 1.0 + 2.0**-7, dtype=BF16)
    g = p.clone()
    m = torch.ones(N, dtype=BF16)
    kw = dict(lr=2.0**-8, beta1=0.9, beta2=0.5, weight_decay=0.0)
    if fused:
        _fused.lion_step_([p], [g], [m], **kw, sr_keys=[key])
    else:
        lion_step_([p], [g], [m], **kw, keys=[torch.tensor(key)])
    return p, m


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _fused.fused_available(), reason="fused kernels could not be built here"))], ids=["pytorch", "fused"])
@pytest.mark.parametrize("key", [0, 123456789])
def test_optimizer_rounds_bf16_theta_and_momentum_independently(fused: bool, key: int) -> None:
    """A bf16 θ with a bf16 momentum through a Lion step (one shared hash per element): the two rounding decisions
    of every element are independent fair coins, in the vector loops and in the scalar tail alike."""
    p, m = _halfway_lion(fused, key)
    assert set(p.float().unique().tolist()) <= {1.0, 1.0 + 2.0**-7}
    assert set(m.float().unique().tolist()) <= {1.0, 1.0 + 2.0**-7}
    _assert_independent_halves(p.float() > HALF, m.float() > HALF)
    tail = slice(N - 13, N)  # what the kernel's scalar tail wrote: the same bits as the definition
    want_p = stochastic_round(torch.full((N,), HALF), BF16, key)
    want_m = stochastic_round(torch.full((N,), HALF), BF16, key, bits="low")
    assert torch.equal(p, want_p) and torch.equal(m, want_m)
    assert torch.equal(p[tail], want_p[tail]) and torch.equal(m[tail], want_m[tail])
