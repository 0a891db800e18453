"""Attention against a naive fp64 reference written from the formulas (explicit score matrices)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_tiger.nn.attention import Attention
from lightning_tiger.nn.kv_cache import KVCache

# ----------------------------------------------------------------------------------------- reference


def ref_slopes(n: int) -> list[float]:
    """The official ALiBi slope code (ofirpress/attention_with_linear_biases), verbatim logic."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return pow2(n)
    p = 2 ** math.floor(math.log2(n))
    return pow2(p) + ref_slopes(2 * p)[0::2][: n - p]


def ref_rope(x: torch.Tensor, pos: torch.Tensor, base: float, interleaved: bool) -> torch.Tensor:
    """x [B, T, H, D] fp64, pos [T] or [B, T]; explicit pairs and angles p·base^(-2k/D)."""
    B, T, _, D = x.shape
    pos = pos.double().expand(B, T) if pos.dim() == 1 else pos.double()
    out = x.clone()
    for kk in range(D // 2):
        theta = base ** (-2 * kk / D)
        a, b = (2 * kk, 2 * kk + 1) if interleaved else (kk, kk + D // 2)
        ang = (pos * theta)[:, :, None]
        c, s = torch.cos(ang), torch.sin(ang)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


def ref_visible(i: int, j: int, causal: bool, window: int | None, sinks: int) -> bool:
    if causal and j > i:
        return False
    if window is None:
        return True
    near = (i - j <= window - 1) if causal else abs(i - j) <= window - 1
    return near or j < sinks


def ref_attention(
    attn: Attention, x: torch.Tensor, positions: torch.Tensor | None = None, window_on: bool = True,
    params: dict | None = None,
) -> torch.Tensor:
    """Full-sequence output [B, T, dim] in fp64 from attn's weights (params: fp64 leaf copies)."""
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    w_qkv = params["qkv"] if params else attn.qkv.weight.double()
    w_out = params["out"] if params else attn.out.weight.double()
    qkv = (x @ w_qkv.T).view(B, T, H + 2 * Hkv, D)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + Hkv], qkv[:, :, H + Hkv :]
    pos = torch.arange(T, dtype=torch.float64) if positions is None else positions.double()
    if attn.position == "rope":
        base = attn.rotary.base
        q, k = ref_rope(q, pos, base, attn.rotary.interleaved), ref_rope(k, pos, base, attn.rotary.interleaved)
    window = attn.window if window_on else None
    sinks = attn.sink_tokens if window is not None else 0
    slopes = torch.tensor(ref_slopes(H), dtype=torch.float64)
    posb = pos.expand(B, T) if pos.dim() == 1 else pos
    vis = torch.tensor(
        [[ref_visible(i, j, attn.causal, window, sinks) for j in range(T)] for i in range(T)]
    )  # [T, T] from the explicit rule
    n = vis.sum(-1).double()  # keys each query sees
    c = torch.ones(T, dtype=torch.float64)
    if attn.logn == "trained":
        c = n.log() / math.log(attn.logn_base)
    elif attn.logn == "posthoc":
        c = (n.log() / math.log(attn.logn_base)).clamp_min(1.0)
    rep = H // Hkv
    kh, vh = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # head h uses kv head h // rep
    scores = torch.einsum("bihd,bjhd->bhij", q, kh) / math.sqrt(D) * c[:, None]  # [B, H, T, T]
    if attn.position == "alibi":
        dist = posb[:, None, :, None] - posb[:, None, None, :]
        scores = scores - slopes[None, :, None, None] * (dist if attn.causal else dist.abs())
    probs = torch.softmax(scores.masked_fill(~vis, float("-inf")), dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, vh)
    return out.reshape(B, T, H * D) @ w_out.T


def _loss_weights(shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(shape, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------- option grid
POSITIONS = ["rope", "alibi", "none"]
WINDOWS = [(None, 0), (3, 0), (3, 2)]
LOGN = ["none", "trained", "posthoc"]


GRID = [
    (pos, causal, w, s, logn, kv, "sdpa")
    for pos in POSITIONS for causal in (True, False) for (w, s) in WINDOWS for logn in LOGN for kv in (4, 2)
] + [  # the explicit-matrix backend on a smaller grid
    (pos, causal, w, s, "trained", 2, "math") for pos in POSITIONS for causal in (True, False) for (w, s) in WINDOWS
]


@pytest.mark.parametrize("position,causal,window,sinks,logn,kv_heads,backend", GRID)
def test_outputs_and_gradients_match_reference(position, causal, window, sinks, logn, kv_heads, backend):
    torch.manual_seed(0)
    T, P = 9, 4  # full length; prefix length for the offset (KV-cache) run
    attn = Attention(
        16, 4, num_kv_heads=kv_heads, position=position, causal=causal, window=window, sink_tokens=sinks,
        logn=logn, logn_base=4, backend=backend, interleaved=(kv_heads == 4),
    )
    x = torch.randn(2, T, 16)
    params = {"qkv": attn.qkv.weight.detach().double().requires_grad_(),
              "out": attn.out.weight.detach().double().requires_grad_()}
    x64 = x.double().requires_grad_()
    ref = ref_attention(attn, x64, params=params)
    wts = _loss_weights(ref.shape)

    # full forward: outputs and gradients (input and both weight matrices)
    xin = x.clone().requires_grad_()
    out = attn(xin)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    (out.double() * wts).sum().backward()
    (ref * wts).sum().backward()
    torch.testing.assert_close(xin.grad.double(), x64.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(attn.qkv.weight.grad.double(), params["qkv"].grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(attn.out.weight.grad.double(), params["out"].grad, atol=5e-5, rtol=1e-4)

    # offset: a cached prefix, then the rest (queries at indices P..T-1 against all keys)
    if causal:
        cache = KVCache()
        with torch.no_grad():
            attn(x[:, :P], cache=cache)
            tail = attn(x[:, P:], cache=cache)
        torch.testing.assert_close(tail.double(), ref[:, P:].detach(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("logn", ["none", "trained"])
@pytest.mark.parametrize("sinks", [0, 3])
def test_chunked_window_path_matches_reference(position, causal, logn, sinks):
    # T > 2w + s and T > block (32): the banded, linear-memory path runs.
    torch.manual_seed(1)
    T = 70
    attn = Attention(8, 2, position=position, causal=causal, window=5, sink_tokens=sinks, logn=logn, logn_base=8)
    x = torch.randn(1, T, 8)
    params = {"qkv": attn.qkv.weight.detach().double().requires_grad_(),
              "out": attn.out.weight.detach().double().requires_grad_()}
    x64 = x.double().requires_grad_()
    ref = ref_attention(attn, x64, params=params)
    xin = x.clone().requires_grad_()
    out = attn(xin)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    wts = _loss_weights(ref.shape)
    (out.double() * wts).sum().backward()
    (ref * wts).sum().backward()
    torch.testing.assert_close(xin.grad.double(), x64.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(attn.qkv.weight.grad.double(), params["qkv"].grad, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("batched", [False, True])
def test_explicit_float_positions_match_reference(position, batched):
    torch.manual_seed(2)
    T = 7
    attn = Attention(16, 2, position=position, window=4, sink_tokens=1)
    x = torch.randn(2, T, 16)
    pos = torch.sort(torch.rand(2, T) * 50).values if batched else torch.sort(torch.rand(T) * 50).values
    ref = ref_attention(attn, x.double(), positions=pos)
    torch.testing.assert_close(attn(x, positions=pos).double(), ref, atol=2e-5, rtol=1e-4)
    # and with a cache: the keys keep their positions
    cache = KVCache()
    with torch.no_grad():
        attn(x[:, :3], positions=pos[..., :3], cache=cache)
        tail = attn(x[:, 3:], positions=pos[..., 3:], cache=cache)
    torch.testing.assert_close(tail.double(), ref[:, 3:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("window,sinks", [(None, 0), (4, 0), (4, 2)])
def test_incremental_decode_equals_full_forward(position, window, sinks):
    torch.manual_seed(3)
    attn = Attention(32, 4, num_kv_heads=2, position=position, window=window, sink_tokens=sinks,
                     logn="posthoc", logn_base=4).eval()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        full = attn(x)
        cache = KVCache()
        steps = [attn(x[:, :7], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(7, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.length() == 40


def test_window_at_train_or_inference():
    torch.manual_seed(4)
    x = torch.randn(1, 12, 16)
    attn = Attention(16, 2, window=3, window_at="inference")
    ref_full = ref_attention(attn, x.double(), window_on=False)
    ref_win = ref_attention(attn, x.double(), window_on=True)
    with torch.no_grad():
        torch.testing.assert_close(attn.train()(x).double(), ref_full, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(attn.eval()(x).double(), ref_win, atol=2e-5, rtol=1e-4)
        attn.set_options(window_at="train")
        torch.testing.assert_close(attn.train()(x).double(), ref_win, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(attn.eval()(x).double(), ref_full, atol=2e-5, rtol=1e-4)


def test_dropout_only_in_training():
    torch.manual_seed(5)
    attn = Attention(16, 2, dropout=0.5)
    x = torch.randn(2, 10, 16)
    a, b = attn.train()(x), attn(x)
    assert not torch.allclose(a, b)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    ref = ref_attention(attn, x.double())
    torch.testing.assert_close(attn(x).double(), ref.detach(), atol=2e-5, rtol=1e-4)


def test_bf16_inputs_close_to_fp32():
    torch.manual_seed(6)
    for position in POSITIONS:
        attn = Attention(32, 4, position=position, window=8)
        x = torch.randn(2, 300, 32)
        ref = attn(x)
        out = attn.to(torch.bfloat16)(x.bfloat16())
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_sdpa_masks_keep_fused_shapes(monkeypatch):
    """Masks handed to SDPA are None / bool [L, S] / float [1, H, L, S], never 3-D (PyTorch's SDPA
    documentation: a 3-D float mask falls back to the unfused math kernel)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        mask_info = None if attn_mask is None else (attn_mask.dtype, attn_mask.dim())
        seen.append((mask_info, kw.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randn(1, 6, 16)
    Attention(16, 2, position="rope")(x)
    Attention(16, 2, position="rope", causal=False)(x)
    Attention(16, 2, position="rope", window=3)(x)
    Attention(16, 2, position="alibi")(x)
    cache = KVCache()
    a = Attention(16, 2)
    a(x, cache=cache)
    a(x[:, :2], cache=cache)
    assert seen[0] == (None, True)  # plain causal -> is_causal, no mask
    assert seen[1] == (None, False)
    assert seen[2] == ((torch.bool, 2), False)
    assert seen[3] == ((torch.float32, 4), False)
    assert seen[5] == ((torch.bool, 2), False)  # decoding with a cache: explicit lower-right mask


@pytest.mark.slow  # compiles FlexAttention (~10 s)
def test_flex_backend_forward_matches_reference():
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(7)
    attn = Attention(16, 2, position="alibi", window=4, sink_tokens=1, logn="trained", logn_base=4,
                     backend="flex")
    x = torch.randn(1, 16, 16)
    ref = ref_attention(attn, x.double())
    with torch.no_grad():
        try:
            out = attn(x)
        except Exception as err:  # compile toolchain missing in this environment
            pytest.skip(f"flex attention unavailable: {err}")
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        attn(x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"position": "sin"}, "position"),
        ({"window": 0}, "window"),
        ({"window_at": "always"}, "window_at"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"logn": "trained"}, "logn_base"),
        ({"logn": "log"}, "logn"),
        ({"dropout": 1.0}, "dropout"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(16, 4, **kwargs)


def test_set_options_validates():
    attn = Attention(16, 4)
    with pytest.raises(TypeError, match="unknown"):
        attn.set_options(position="alibi")
    with pytest.raises(ValueError, match="window"):
        attn.set_options(window=-2)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("custom_positions", [False, True])
def test_trimmed_cache_decode_equals_full_forward(position, sinks, custom_positions):
    """trim_to_window keeps sinks + the last w-1 keys: same outputs as the full forward, bounded memory."""
    torch.manual_seed(8)
    w, T = 5, 60
    attn = Attention(16, 2, position=position, window=w, sink_tokens=sinks, logn="posthoc", logn_base=2).eval()
    x = torch.randn(2, T, 16)
    pos = torch.sort(torch.rand(T) * 200).values if custom_positions else None
    with torch.no_grad():
        full = attn(x, positions=pos)
        cache = KVCache(trim_to_window=True)
        chunks = [(0, 9), *[(t, t + 1) for t in range(9, 20)], (20, 55), *[(t, t + 1) for t in range(55, T)]]
        outs = []
        for a, b in chunks:
            outs.append(attn(x[:, a:b], positions=None if pos is None else pos[a:b], cache=cache))
            assert cache.keys[0].shape[2] <= max(sinks + w - 1, 0) or b <= sinks + w - 1
            assert cache.length() == b
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.stored_indices(0).tolist() == list(range(sinks)) + list(range(T - w + 1, T))
