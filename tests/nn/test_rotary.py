"""RotaryEmbedding against explicit formulas (RoFormer, Su et al. 2021; HF transformers' scaling formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tiger.nn.rotary import RotaryEmbedding


def ref_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: list[float], interleaved: bool, mult: float = 1.0):
    """x [B, T, H, D] fp64; explicit pairs, angle = p·θ_k in fp64; cos/sin multiplied by mult (YaRN)."""
    B, T, _, D = x.shape
    pos = pos.double().expand(B, T) if pos.dim() == 1 else pos.double()
    out = x.double().clone()
    xd = x.double()
    for k, theta in enumerate(inv_freq):
        a, b = (2 * k, 2 * k + 1) if interleaved else (k, k + D // 2)
        ang = (pos * theta)[:, :, None]
        c, s = torch.cos(ang) * mult, torch.sin(ang) * mult
        out[..., a] = xd[..., a] * c - xd[..., b] * s
        out[..., b] = xd[..., a] * s + xd[..., b] * c
    return out


def plain_freqs(d: int, base: float = 10000.0) -> list[float]:
    return [base ** (-2 * k / d) for k in range(d // 2)]


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("pos_kind", ["default", "offset", "float", "batched"])
def test_matches_explicit_rotation(interleaved, pos_kind):
    torch.manual_seed(0)
    d = 16
    rope = RotaryEmbedding(d, interleaved=interleaved)
    q, k = torch.randn(2, 7, 3, d, dtype=torch.float64), torch.randn(2, 7, 1, d, dtype=torch.float64)
    positions, offset = None, 0
    if pos_kind == "offset":
        offset = 11
    elif pos_kind == "float":
        positions = torch.rand(7) * 30
    elif pos_kind == "batched":
        positions = torch.randint(0, 1000, (2, 7))
    ref_pos = torch.arange(offset, offset + 7) if positions is None else positions
    qr, kr = rope(q, k, positions=positions, offset=offset)
    # the fp32 frequency buffer is the only rounding: tolerance at fp32 level
    torch.testing.assert_close(qr, ref_rope(q, ref_pos, plain_freqs(d), interleaved), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kr, ref_rope(k, ref_pos, plain_freqs(d), interleaved), atol=1e-5, rtol=1e-5)
    assert qr.dtype == q.dtype and kr.shape == k.shape


def test_layouts_differ_by_a_fixed_permutation():
    torch.manual_seed(1)
    d = 8
    x = torch.randn(1, 5, 2, d)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # half-split index of interleaved slot
    inter = RotaryEmbedding(d, interleaved=True)(x[..., perm])[0]
    half = RotaryEmbedding(d, interleaved=False)(x)[0]
    torch.testing.assert_close(inter, half[..., perm])


def test_relative_position_property_at_large_offsets():
    """<R_m q, R_n k> depends on n - m only, also around position 1e5 (fp32 inputs)."""
    torch.manual_seed(2)
    d = 64
    rope = RotaryEmbedding(d)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    for m, n in [(0, 0), (3, 17), (40, 5), (1000, 1500)]:
        base = (rope(q, positions=torch.tensor([m]))[0] * rope(k, positions=torch.tensor([n]))[0]).sum()
        for shift in (100_000, 123_457):
            far = (
                rope(q, positions=torch.tensor([m + shift]))[0] * rope(k, positions=torch.tensor([n + shift]))[0]
            ).sum()
            torch.testing.assert_close(far, base, atol=2e-5 * d, rtol=1e-5)
    # and the rotation itself is accurate at 1e5 against an fp64 reference
    pos = torch.arange(100_000, 100_008)
    x = torch.randn(1, 8, 1, d)
    torch.testing.assert_close(rope(x, positions=pos)[0].double(), ref_rope(x, pos, plain_freqs(d), True),
                               atol=1e-5, rtol=1e-5)


def test_bf16_inputs_keep_fp32_angle_accuracy():
    """bf16 represents integers only up to 256; positions 257..262 must still rotate by their own angles."""
    torch.manual_seed(3)
    d = 64
    rope = RotaryEmbedding(d).to(torch.bfloat16)
    x = torch.randn(1, 263, 2, d).bfloat16()
    out = rope(x)[0]
    assert out.dtype == torch.bfloat16
    ref = ref_rope(x.double(), torch.arange(263), plain_freqs(d), True)
    err = (out.double() - ref).abs()[:, 257:].max().item()
    assert err < 0.05  # bf16 rounding of the output only (|x| ~ 3, ulp 2^-6); 0.9.1's peer error is ~5.9
    # exactly what the fp32 path gives, rounded once
    torch.testing.assert_close(out, rope(x.float())[0].bfloat16(), atol=0, rtol=0)
    # under autocast the angles are still fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, _ = rope.cos_sin(torch.tensor([261]))
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), torch.cos(261 * torch.tensor(plain_freqs(d), dtype=torch.float64))[None],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("cast", ["bf16", "half", "double", "to_dtype"])
def test_inv_freq_stays_fp32_under_module_casts(cast):
    rope = RotaryEmbedding(32, scaling={"type": "ntk", "factor": 4})
    fresh = rope.inv_freq.clone()
    if cast == "bf16":
        rope = rope.bfloat16()
    elif cast == "half":
        rope = rope.half()
    elif cast == "double":
        rope = rope.double()
    else:
        rope = rope.to(dtype=torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rope.inv_freq, fresh, atol=0, rtol=0)
    assert "inv_freq" not in rope.state_dict()  # recomputed, never loaded stale


# ------------------------------------------------------------------------------------------------ scaling
def ref_yarn(d, base, factor, l0, beta_fast=32.0, beta_slow=1.0):
    """HF `_compute_yarn_parameters`, written out per dimension."""
    def corr(rot):
        return d * math.log(l0 / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), d - 1)
    out = []
    for k in range(d // 2):
        theta = base ** (-2 * k / d)
        ramp = min(max((k - low) / (high - low), 0.0), 1.0)
        extrap = 1.0 - ramp
        out.append(theta / factor * (1 - extrap) + theta * extrap)
    return out, 0.1 * math.log(factor) + 1.0


def ref_llama3(d, base, factor, low_f, high_f, l0):
    out = []
    for k in range(d // 2):
        theta = base ** (-2 * k / d)
        wavelen = 2 * math.pi / theta
        if wavelen < l0 / high_f:
            out.append(theta)
        elif wavelen > l0 / low_f:
            out.append(theta / factor)
        else:
            s = (l0 / wavelen - low_f) / (high_f - low_f)
            out.append((1 - s) * theta / factor + s * theta)
    return out


@pytest.mark.parametrize(
    "scaling,expected",
    [
        ({"type": "linear", "factor": 4.0}, [t / 4 for t in plain_freqs(64)]),
        ({"type": "ntk", "factor": 8.0}, plain_freqs(64, 10000.0 * 8.0 ** (64 / 62))),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
         ref_yarn(64, 10000.0, 4.0, 256)[0]),
        ({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 512}, ref_llama3(64, 10000.0, 8.0, 1.0, 4.0, 512)),
    ],
)
def test_scaling_variants_match_formulas(scaling, expected):
    rope = RotaryEmbedding(64, scaling=scaling)
    torch.testing.assert_close(rope.inv_freq.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    x = torch.randn(1, 5, 1, 64, dtype=torch.float64)
    pos = torch.tensor([0, 1, 100, 1000, 5000])
    mult = ref_yarn(64, 10000.0, 4.0, 256)[1] if "yarn" in scaling.values() else 1.0
    torch.testing.assert_close(rope(x, positions=pos)[0], ref_rope(x, pos, expected, True, mult),
                               atol=5e-4, rtol=1e-4)


def test_llama3_variant_is_nontrivial():
    freqs = ref_llama3(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    plain = plain_freqs(128, 500000.0)
    kinds = {("same" if f == p else "scaled" if abs(f - p / 8) < 1e-15 else "blend") for f, p in zip(freqs, plain)}
    assert kinds == {"same", "scaled", "blend"}
    rope = RotaryEmbedding(128, base=500000.0, scaling={"type": "llama3"})  # HF defaults (8, 1, 4, 8192)
    torch.testing.assert_close(rope.inv_freq.double(), torch.tensor(freqs, dtype=torch.float64), rtol=1e-6, atol=0)


def test_dynamic_ntk_depends_on_current_length():
    d, l0, k = 32, 64, 4.0
    rope = RotaryEmbedding(d, scaling={"type": "dynamic", "factor": k, "original_max_position_embeddings": l0})
    # within the original length: plain RoPE
    cos, _ = rope.cos_sin(seq_len=l0)
    expect = torch.cos(torch.arange(l0, dtype=torch.float64)[:, None] * torch.tensor(plain_freqs(d)))
    torch.testing.assert_close(cos.double(), expect, atol=1e-6, rtol=0)
    # beyond: base' = base·(k·L/L0 − (k − 1))^(d/(d−2)) with L = current length
    L = 200
    base = 10000.0 * (k * L / l0 - (k - 1)) ** (d / (d - 2))
    cos, _ = rope.cos_sin(seq_len=L)
    expect = torch.cos(torch.arange(L, dtype=torch.float64)[:, None] * torch.tensor(plain_freqs(d, base)))
    torch.testing.assert_close(cos.double(), expect, atol=2e-5, rtol=0)


def test_set_scaling_at_evaluation_time():
    rope = RotaryEmbedding(16)
    rope.set_scaling({"type": "linear", "factor": 2.0})
    torch.testing.assert_close(rope.inv_freq.double(), torch.tensor([t / 2 for t in plain_freqs(16)],
                                                                    dtype=torch.float64), rtol=1e-6, atol=0)
    rope.set_scaling(None)
    torch.testing.assert_close(rope.inv_freq.double(), torch.tensor(plain_freqs(16), dtype=torch.float64),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"head_dim": 7}, ValueError, "head_dim"),
        ({"head_dim": 8, "base": 1.0}, ValueError, "base"),
        ({"head_dim": 8, "scaling": {"type": "magic", "factor": 2}}, ValueError, "type"),
        ({"head_dim": 8, "scaling": {"type": "linear", "factor": 0.5}}, ValueError, "factor"),
        ({"head_dim": 8, "scaling": {"type": "yarn", "factor": 2}}, ValueError, "original_max_position"),
        ({"head_dim": 8, "scaling": "linear"}, TypeError, "scaling"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        RotaryEmbedding(**kwargs)
