"""KERPLE, Sandwich and XPOS against explicit fp64 references written from the papers' formulas (loops)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_tiger.nn import KERPLE, XPOS, Attention, KVCache, Sandwich, TransformerLM

# ----------------------------------------------------------------------------------------- references


def ref_kerple(r1: torch.Tensor, r2: torch.Tensor, variant: str, T: int, pos: torch.Tensor) -> torch.Tensor:
    """[H, T, T] bias: −r1·log(1 + r2|i − j|) or −r1·|i − j|^r2 (Chi et al. 2022), element by element."""
    H = r1.shape[0]
    out = torch.zeros(H, T, T, dtype=torch.float64)
    for h in range(H):
        for i in range(T):
            for j in range(T):
                d = abs(float(pos[i]) - float(pos[j]))
                if variant == "log":
                    out[h, i, j] = -r1[h] * torch.log(1 + r2[h] * d)
                else:
                    out[h, i, j] = -r1[h] * d ** r2[h] if d > 0 else 0.0 * r1[h]
    return out


def ref_sandwich(H: int, T: int, dprime: int, pos: torch.Tensor) -> torch.Tensor:
    """[H, T, T] bias: (Σ_{t<d'/2} cos((i − j)/10000^{2t/d'}) − d'/2)·H/(8h), h = 1…H (Chi et al. 2023)."""
    out = torch.zeros(H, T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(T):
            r = float(pos[i]) - float(pos[j])
            s = sum(math.cos(r / 10000 ** (2 * t / dprime)) for t in range(dprime // 2)) - dprime / 2
            for h in range(H):
                out[h, i, j] = s * H / (8 * (h + 1))
    return out


def ref_rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE of x [B, T, H, D] at positions [T] (fp64), pair by pair."""
    out = x.clone()
    D = x.shape[-1]
    for t in range(D // 2):
        ang = (pos.double() * 10000 ** (-2 * t / D))[None, :, None]
        a, b = x[..., 2 * t], x[..., 2 * t + 1]
        out[..., 2 * t] = a * torch.cos(ang) - b * torch.sin(ang)
        out[..., 2 * t + 1] = a * torch.sin(ang) + b * torch.cos(ang)
    return out


def ref_xpos_scale(
    x: torch.Tensor, pos: torch.Tensor, sign: float, gamma: float = 0.4, B: float = 512.0
) -> torch.Tensor:
    """Multiply pair t of x [B, T, H, D] by ζ_t^{sign·p/B}, ζ_t = (2t/D + γ)/(1 + γ) (Sun et al. 2022)."""
    out = x.clone()
    D = x.shape[-1]
    for t in range(D // 2):
        zeta = (2 * t / D + gamma) / (1 + gamma)
        f = (zeta ** (sign * pos.double() / B))[None, :, None]
        out[..., 2 * t] = x[..., 2 * t] * f
        out[..., 2 * t + 1] = x[..., 2 * t + 1] * f
    return out


def ref_attention(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
    """fp64 output with explicit scores q·k/√d + bias, causal or bidirectional."""
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = (x @ attn.qkv.weight.double().T).view(B, T, H + 2 * Hkv, D)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + Hkv], qkv[:, :, H + Hkv :]
    if attn.position == "xpos":
        q = ref_xpos_scale(ref_rotate(q, pos), pos, +1.0)
        k = ref_xpos_scale(ref_rotate(k, pos), pos, -1.0)
    rep = H // Hkv
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    if bias is not None:
        scores = scores + bias[None]
    if attn.causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(B, T, H * D)
    return out @ attn.out.weight.double().T


def _bias_of(attn: Attention, T: int, pos: torch.Tensor, raw: tuple | None = None) -> torch.Tensor | None:
    if attn.position.startswith("kerple"):
        variant = attn.position.split("_")[1]
        raw1, raw2 = raw if raw is not None else (attn.score_bias.raw_r1.double(), attn.score_bias.raw_r2.double())
        r1 = F.softplus(raw1)
        r2 = F.softplus(raw2) if variant == "log" else 2 * torch.sigmoid(raw2)
        return ref_kerple(r1, r2, variant, T, pos)
    if attn.position == "sandwich":
        return ref_sandwich(attn.num_heads, T, 128, pos)
    return None


CASES = [(p, c) for p in ("kerple_log", "kerple_power", "sandwich") for c in (True, False)] + [("xpos", True)]

# ----------------------------------------------------------------------------------------- tests


def test_module_biases_match_the_formulas_with_offsets() -> None:
    torch.manual_seed(0)
    q_pos, k_pos = torch.arange(5, 9), torch.arange(9)  # queries after a 5-token cache
    for variant in ("log", "power"):
        mod = KERPLE(3, variant)
        with torch.no_grad():
            mod.raw_r1.normal_()
            mod.raw_r2.normal_()
        got = mod.from_positions(q_pos, k_pos)
        full = ref_kerple(mod.r1.double(), mod.r2.double(), variant, 9, torch.arange(9))
        torch.testing.assert_close(got.double(), full[:, 5:], atol=1e-5, rtol=1e-5)
    sw = Sandwich(4)
    want = ref_sandwich(4, 9, 128, torch.arange(9))[:, 5:]
    torch.testing.assert_close(sw.from_positions(q_pos, k_pos).double(), want, atol=1e-5, rtol=1e-5)
    assert (sw.from_positions(q_pos, k_pos) <= 1e-6).all()  # ≤ 0, 0 at distance 0


def test_kerple_parameters_stay_positive_and_start_as_documented() -> None:
    from lightning_tiger.nn import alibi_slopes

    log, power = KERPLE(4, "log"), KERPLE(4, "power")
    torch.testing.assert_close(log.r1, torch.ones(4))
    torch.testing.assert_close(log.r2, alibi_slopes(4))
    torch.testing.assert_close(power.r1, alibi_slopes(4))
    torch.testing.assert_close(power.r2, torch.ones(4))
    with torch.no_grad():
        for mod in (log, power):
            mod.raw_r1.fill_(-50.0)
            mod.raw_r2.fill_(50.0)
    assert (log.r1 > 0).all() and (power.r1 > 0).all()
    assert (power.r2 <= 2).all() and (power.r2 > 0).all()
    with pytest.raises(ValueError, match="variant"):
        KERPLE(4, "exp")


def test_xpos_factors_match_the_paper() -> None:
    xp = XPOS(8)
    zeta = torch.tensor([(2 * t / 8 + 0.4) / 1.4 for t in range(4)], dtype=torch.float64)
    torch.testing.assert_close(xp.zeta(), zeta)
    f = xp.factors(torch.tensor([[3.0, 700.0]]), torch.zeros(1, 1), 1.0)  # ζ^{p/512}, pairs interleaved
    want = torch.stack([zeta.repeat_interleave(2) ** (p / 512) for p in (3.0, 700.0)])[None].float()
    torch.testing.assert_close(f, want)


@pytest.mark.parametrize("position,causal", CASES)
def test_attention_matches_reference_with_gradients(position: str, causal: bool) -> None:
    torch.manual_seed(1)
    T = 11
    attn = Attention(16, 4, num_kv_heads=2, position=position, causal=causal)
    if attn.score_bias is not None and hasattr(attn.score_bias, "raw_r1"):
        with torch.no_grad():  # away from the initial values, so a wrong formula cannot hide
            attn.score_bias.raw_r1.normal_()
            attn.score_bias.raw_r2.normal_()
    x = torch.randn(2, T, 16)
    pos = torch.arange(T)
    raw = None
    if position.startswith("kerple"):
        raw = (attn.score_bias.raw_r1.detach().double().requires_grad_(),
               attn.score_bias.raw_r2.detach().double().requires_grad_())
    ref = ref_attention(attn, x.double(), _bias_of(attn, T, pos, raw), pos)
    out = attn(x)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    if raw is not None:  # gradients reach the per-head kernel parameters
        wts = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        (out.double() * wts).sum().backward()
        (ref * wts).sum().backward()
        torch.testing.assert_close(attn.score_bias.raw_r1.grad.double(), raw[0].grad, atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(attn.score_bias.raw_r2.grad.double(), raw[1].grad, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("position,causal", CASES)
def test_cache_offsets_match_the_full_reference(position: str, causal: bool) -> None:
    torch.manual_seed(2)
    T, P = 12, 5
    attn = Attention(16, 2, position=position, causal=causal).eval()
    x = torch.randn(2, T, 16)
    ref = ref_attention(attn, x.double(), _bias_of(attn, T, torch.arange(T)), torch.arange(T))
    cache = KVCache()
    with torch.no_grad():
        attn(x[:, :P], cache=cache)
        tail = attn(x[:, P:], cache=cache)
    # the second call holds all T keys: its queries (absolute positions P…T−1) see what they see in the full
    # sequence (causal: the past; bidirectional: every key), with biases / decay at absolute positions
    torch.testing.assert_close(tail.double(), ref[:, P:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["kerple_log", "kerple_power", "sandwich", "xpos"])
def test_incremental_decode_equals_full_forward(position: str) -> None:
    torch.manual_seed(3)
    model = TransformerLM(vocab_size=40, dim=32, depth=2, num_heads=4, num_kv_heads=2, position=position).eval()
    tokens = torch.randint(0, 40, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [model(tokens[:, :6], cache=cache)] + [model(tokens[:, t : t + 1], cache=cache) for t in range(6, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_xpos_long_half_precision_run_is_finite_and_matches_fp32() -> None:
    # One fp16 call over 12000 positions: the decay factors must stay in range (centring on the mean query
    # position let key factors reach ζ_0^{−6000/512} ≈ 2e6 > 65504 and the output became NaN). A window keeps
    # the scores cheap; the factors are computed for every key anyway.
    torch.manual_seed(4)
    attn = Attention(16, 2, position="xpos", window=64).eval()
    x = torch.randn(1, 12000, 16)
    with torch.no_grad():
        want = attn(x)
        got = copy.deepcopy(attn).half()(x.half())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=3e-3, rtol=3e-3)


def test_xpos_query_blocks_and_cache_match_the_reference() -> None:
    # Longer than one XPOS query block (512): blocks with their own reference position give the paper's
    # scores; a cached prefix that ends inside a block too.
    torch.manual_seed(5)
    T, P = 1100, 700
    attn = Attention(16, 2, position="xpos").eval()
    x = torch.randn(1, T, 16)
    ref = ref_attention(attn, x.double(), None, torch.arange(T))
    cache = KVCache()
    with torch.no_grad():
        full = attn(x)
        attn(x[:, :P], cache=cache)
        tail = attn(x[:, P:], cache=cache)
    torch.testing.assert_close(full.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tail.double(), ref[:, P:], atol=2e-5, rtol=1e-4)


def test_xpos_trimmed_cache_decode_equals_full_forward() -> None:
    torch.manual_seed(6)
    attn = Attention(16, 2, position="xpos", window=8, sink_tokens=2).eval()
    x = torch.randn(2, 40, 16)
    cache = KVCache(trim_to_window=True)
    with torch.no_grad():
        full = attn(x)
        parts = [attn(x[:, :12], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(12, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="causal"):
        Attention(16, 2, position="xpos", causal=False)
    for position in ("sandwich", "kerple_log", "kerple_power"):  # at construction, not at the first forward
        with pytest.raises(ValueError, match=f"backend='flex' does not support position='{position}'"):
            Attention(16, 2, position=position, backend="flex")
        attn = Attention(16, 2, position=position)
        with pytest.raises(ValueError, match="backend='flex'"):
            attn.backend = "flex"
        assert attn.backend == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        Attention(16, 2).backend = "cuda"
    with pytest.raises(ValueError, match="dim"):
        Sandwich(2, dim=7)
