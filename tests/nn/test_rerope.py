"""ReRoPE / Leaky ReRoPE against an explicit fp64 reference: every score built from its clipped relative position."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tiger.nn import Attention, KVCache, TransformerLM


def ref_rotate(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Interleaved RoPE of ``x [N, H, D]`` (fp64) at per-row positions ``pos [N]``, pair by pair."""
    out = x.clone()
    for t in range(x.shape[-1] // 2):
        ang = (pos.double() * base ** (-2 * t / x.shape[-1]))[:, None]
        a, b = x[..., 2 * t], x[..., 2 * t + 1]
        out[..., 2 * t] = a * torch.cos(ang) - b * torch.sin(ang)
        out[..., 2 * t + 1] = a * torch.sin(ang) + b * torch.cos(ang)
    return out


def ref_relative(r: int, w: int, leak: float | None) -> float:
    """The clipped relative position, written from Su's definition (kexue.fm/archives/9708)."""
    if abs(r) < w:
        return float(r)
    mag = w if leak is None else w + (abs(r) - w) / leak
    return math.copysign(mag, r)


def ref_rerope(attn: Attention, x: torch.Tensor, window_on: bool = False) -> torch.Tensor:
    """fp64 output of ``attn`` (eval mode) with ReRoPE scores: score_ij = ⟨R_{r'_ij} q_i, k_j⟩/√d, r' clipped."""
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    w, leak = attn.rerope_window, attn.rerope_leak
    qkv = (x.double() @ attn.qkv.weight.double().T).view(B, T, H + 2 * Hkv, D)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + Hkv], qkv[:, :, H + Hkv :]
    rep = H // Hkv
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    win = attn.window if window_on else None
    scores = torch.full((B, H, T, T), float("-inf"), dtype=torch.float64)
    for i in range(T):
        visible = []
        for j in range(T):
            if attn.causal and j > i:
                continue
            near = win is None or (i - j <= win - 1 if attn.causal else abs(i - j) <= win - 1)
            if near or j < attn.sink_tokens:
                visible.append(j)
        n = len(visible)
        c = 1.0
        if attn.logn != "none":
            c = math.log(n) / math.log(attn.logn_base)
            c = max(c, 1.0) if attn.logn == "posthoc" else c
        for j in visible:
            rel = torch.full((B,), ref_relative(i - j, w, leak))  # type: ignore[arg-type]
            # ⟨R_i q, R_j k⟩ = ⟨R_{i−j} q, k⟩: rotate the query by the (clipped) relative position
            qr = ref_rotate(q[:, i], rel)
            scores[:, :, i, j] = c * (qr * k[:, j]).sum(-1) / math.sqrt(D)
    probs = scores.softmax(-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(B, T, H * D)
    return out @ attn.out.weight.double().T


@pytest.mark.parametrize("leak", [None, 4.0])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("logn", ["none", "posthoc"])
@pytest.mark.parametrize("block", [4, 64])
def test_matches_explicit_reference(leak: float | None, causal: bool, logn: str, block: int) -> None:
    torch.manual_seed(0)
    attn = Attention(16, 4, num_kv_heads=2, causal=causal, logn=logn, logn_base=6, rerope_window=5, rerope_leak=leak)
    attn.rerope_block = block  # 4: many query blocks, each with far, band and (bidirectional) right-far keys
    attn.eval()
    x = torch.randn(2, 23, 16)
    with torch.no_grad():
        out = attn(x)
    torch.testing.assert_close(out.double(), ref_rerope(attn, x), atol=2e-5, rtol=1e-4)


def test_batch_chunked_tiles_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_tiger.nn.rerope as rerope

    monkeypatch.setattr(rerope, "TILE_SCORES", 1)  # one batch row per tile
    torch.manual_seed(5)
    attn = Attention(16, 4, num_kv_heads=2, rerope_window=4, rerope_leak=3.0).eval()
    attn.rerope_block = 6
    x = torch.randn(3, 17, 16)
    with torch.no_grad():
        out = attn(x)
    torch.testing.assert_close(out.double(), ref_rerope(attn, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("sinks", [0, 2])
def test_composes_with_window_and_sinks(sinks: int) -> None:
    torch.manual_seed(1)
    attn = Attention(16, 2, window=9, sink_tokens=sinks, rerope_window=3, rerope_leak=2.0).eval()
    attn.rerope_block = 5
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        out = attn(x)
    torch.testing.assert_close(out.double(), ref_rerope(attn, x, window_on=True), atol=2e-5, rtol=1e-4)


def test_training_uses_plain_rope_and_a_wide_window_changes_nothing() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 30, 16)
    plain = Attention(16, 2)
    rr = Attention(16, 2, rerope_window=4)
    rr.load_state_dict(plain.state_dict())
    torch.testing.assert_close(rr.train()(x), plain.train()(x))  # training: ReRoPE is off
    with torch.no_grad():
        assert not torch.allclose(rr.eval()(x), plain.eval()(x), atol=1e-4)  # inference: clipped
        rr.set_options(rerope_window=30)  # every |i − j| < w: exactly RoPE
        torch.testing.assert_close(rr(x), plain(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("leak", [None, 3.0])
@pytest.mark.parametrize("logn", ["none", "posthoc"])
def test_incremental_decode_equals_full_forward(leak: float | None, logn: str) -> None:
    torch.manual_seed(3)
    attn = Attention(32, 4, num_kv_heads=2, logn=logn, logn_base=4, rerope_window=6, rerope_leak=leak).eval()
    attn.rerope_block = 8
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        full = attn(x)
        cache = KVCache()
        steps = [attn(x[:, :9], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(9, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.raw_keys == [True]  # the slot holds unrotated keys
    # a cached key equals the unrotated projection (not a rotated one)
    k_raw = attn.qkv(x).view(2, 40, 8, 8)[:, :, 4:6].transpose(1, 2)
    torch.testing.assert_close(cache.keys[0], k_raw.detach())


def test_model_decode_with_rerope_and_cache_mode_guard() -> None:
    torch.manual_seed(4)
    model = TransformerLM(vocab_size=50, dim=32, depth=2, num_heads=2, logn="posthoc", logn_base=8).eval()
    model.set_attention_options(rerope_window=4)
    tokens = torch.randint(0, 50, (2, 25))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, t : t + 1], cache=cache) for t in range(5, 25)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
        model.set_attention_options(rerope_window=None)  # switching mode mid-cache is refused
        with pytest.raises(ValueError, match="fresh KVCache"):
            model(tokens[:, :1], cache=cache)


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"rerope_window": 0}, "rerope_window"),
        ({"rerope_window": 4, "rerope_leak": 1.0}, "rerope_leak"),
        ({"rerope_leak": 2.0}, "needs rerope_window"),
    ],
)
def test_bad_options_raise(opts: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Attention(16, 2, **opts)


def test_unsupported_combinations_raise() -> None:
    x = torch.randn(1, 6, 16)
    attn = Attention(16, 2, rerope_window=2).eval()
    with pytest.raises(ValueError, match="default positions"):
        attn(x, positions=torch.arange(6) * 2)
    with pytest.raises(ValueError, match="untrimmed"):
        attn(x, cache=KVCache(trim_to_window=True))
    attn.set_options(rope_scaling={"type": "ntk", "factor": 2})
    with pytest.raises(ValueError, match="rope_scaling"):
        attn(x)


@pytest.mark.parametrize("shape", [(0, 6), (2, 0)])
def test_empty_inputs_return_empty_like_plain_attention(shape: tuple[int, int]) -> None:
    attn = Attention(16, 4, num_kv_heads=2).eval()
    x = torch.randn(*shape, 16)
    with torch.no_grad():
        plain = attn(x)
        attn.set_options(rerope_window=4)
        got = attn(x)
        attn.set_options(rerope_leak=3.0)
        leaky = attn(x)
    assert got.shape == leaky.shape == plain.shape == (*shape, 16)
