"""TransformerBlock / TransformerLM: formulas, decoding, per-layer options, Lightning and YAML integration."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_tiger.nn.kv_cache import KVCache
from lightning_tiger.nn.position_sampling import random_positions
from lightning_tiger.nn.transformer import TransformerBlock, TransformerLM


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_block_is_prenorm_residual(mlp):
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, mlp=mlp, position="none", norm_eps=1e-6)
    x = torch.randn(2, 5, 32)
    h = x + block.attn(rms(x, block.norm1.weight, 1e-6))
    z = rms(h, block.norm2.weight, 1e-6)
    if mlp == "swiglu":
        hid = block.hidden_dim
        assert hid == 88  # ceil(2/3·4·32 / 8)·8
        a = z @ block.w_in.weight[:hid].T
        b = z @ block.w_in.weight[hid:].T
        ff = (a * torch.sigmoid(a) * b) @ block.w_out.weight.T
    else:
        assert block.hidden_dim == 128
        u = z @ block.w_in.weight.T + block.w_in.bias if block.w_in.bias is not None else z @ block.w_in.weight.T
        ff = (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ block.w_out.weight.T
    torch.testing.assert_close(block(x), h + ff, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_init():
    torch.manual_seed(0)
    m = TransformerLM(1000, dim=128, depth=8, num_heads=4)
    assert m.lm_head.weight is m.embed.weight
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in set(m.parameters()))
    assert m.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.out.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 0.02/sqrt(2·8)
    assert m.blocks[0].w_out.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    untied = TransformerLM(50, dim=16, depth=1, num_heads=2, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


@pytest.mark.parametrize(
    "opts",
    [
        {"position": "rope"},
        {"position": "alibi"},
        {"position": "none"},
        {"position": "rope", "window": 6, "sink_tokens": 2, "num_kv_heads": 2, "logn": "posthoc", "logn_base": 8},
        {"position": "alibi", "window": 6, "logn": "trained", "logn_base": 8, "interleaved": False},
    ],
)
def test_incremental_decode_equals_full_forward(opts):
    torch.manual_seed(1)
    m = TransformerLM(97, dim=32, depth=2, num_heads=4, **opts).eval()
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = m(tokens)
        cache = m.new_cache()
        parts = [m(tokens[:, :9], cache=cache)] + [m(tokens[:, t : t + 1], cache=cache) for t in range(9, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    assert full.shape == (2, 30, 97)
    assert cache.length(0) == cache.length(1) == 30


def test_layer_overrides_hwfa():
    m = TransformerLM(
        50, dim=32, depth=3, num_heads=2, window=8, logn_base=16,
        layer_overrides={"-1": {"position": "none", "window": None, "logn": "trained"}},
    )
    a0, a2 = m.blocks[0].attn, m.blocks[2].attn
    assert (a0.position, a0.window, a0.logn) == ("rope", 8, "none")
    assert (a2.position, a2.window, a2.logn, a2.logn_base) == ("none", None, "trained", 16)
    assert a2.rotary is None
    m(torch.randint(0, 50, (1, 40)))
    with pytest.raises(ValueError, match="layer_overrides"):
        TransformerLM(50, dim=32, depth=3, num_heads=2, layer_overrides={3: {"window": 4}})
    with pytest.raises(ValueError, match="unknown options"):
        TransformerLM(50, dim=32, depth=3, num_heads=2, layer_overrides={0: {"heads": 4}})


def test_set_attention_options_at_evaluation_time():
    torch.manual_seed(2)
    m = TransformerLM(50, dim=32, depth=2, num_heads=2).eval()
    tokens = torch.randint(0, 50, (1, 24))
    with torch.no_grad():
        full = m(tokens)
        m.set_attention_options(window=24)  # window covering everything: no change
        torch.testing.assert_close(m(tokens), full)
        m.set_attention_options(window=4, window_at="inference")
        windowed = m(tokens)
        assert not torch.allclose(windowed[:, 10:], full[:, 10:])
        torch.testing.assert_close(windowed[:, :4], full[:, :4])  # the first w queries see the same keys
        m.set_attention_options(layers=[-1], window=None)
        assert m.blocks[0].attn.window == 4 and m.blocks[1].attn.window is None
        m.set_attention_options(window=None, rope_scaling={"type": "linear", "factor": 2.0})
        assert m.blocks[1].attn.rotary.scaling["factor"] == 2.0
        assert not torch.allclose(m(tokens), full)
        m.set_attention_options(logn="posthoc", logn_base=64, rope_scaling=None)
        torch.testing.assert_close(m(tokens), full)  # n <= 24 < 64: max(1, log_64 n) = 1
    with pytest.raises(TypeError, match="unknown"):
        m.set_attention_options(position="alibi")


def test_positions_and_guards():
    m = TransformerLM(50, dim=32, depth=1, num_heads=2, max_seq_len=16)
    pos = random_positions(3, 10, 256)
    assert m(torch.randint(0, 50, (3, 10)), positions=pos).shape == (3, 10, 50)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.randint(0, 50, (1, 17)))
    cache = m.new_cache()
    m(torch.randint(0, 50, (1, 10)), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.randint(0, 50, (1, 7)), cache=cache)
    with pytest.raises(ValueError, match="cache"):
        m(torch.randint(0, 50, (1, 2)), cache=KVCache(3))
    with pytest.raises(ValueError, match="logn"):
        TransformerLM(50, dim=32, depth=1, num_heads=2, logn="trained")  # no base, no max_seq_len


class _LM(L.LightningModule):
    def __init__(self, **kw):
        super().__init__()
        self.model = TransformerLM(**kw)
        self.losses: list[float] = []

    def training_step(self, batch, _):
        logits = self.model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_lightning_fit_learns_and_keeps_fp32_frequencies(tmp_path, precision):
    torch.manual_seed(3)
    data = torch.randint(0, 16, (4, 17)).repeat(8, 1)  # a few sequences to memorise
    module = _LM(vocab_size=16, dim=32, depth=2, num_heads=2)
    trainer = L.Trainer(
        max_steps=30, accelerator="cpu", precision=precision, enable_progress_bar=False,
        enable_model_summary=False, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    rot = module.model.blocks[0].attn.rotary
    assert rot.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rot.inv_freq.double(), 10000.0 ** (-torch.arange(0, 16, 2).double() / 16),
                               rtol=1e-6, atol=0)
    if precision == "bf16-true":
        assert module.model.embed.weight.dtype == torch.bfloat16
    assert all(math.isfinite(x) for x in module.losses)
    assert sum(module.losses[-5:]) / 5 < 0.7 * sum(module.losses[:5]) / 5


def test_yaml_configuration_with_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TransformerLM, "model")
    cfg = parser.parse_string(
        """
model:
  vocab_size: 64
  dim: 32
  depth: 2
  num_heads: 2
  window: 16
  logn_base: 64
  rope_scaling: {type: ntk, factor: 4}
  layer_overrides:
    -1: {position: none, window: null, logn: trained}
"""
    )
    m = parser.instantiate(cfg).model
    assert isinstance(m, TransformerLM)
    assert m.blocks[-1].attn.position == "none" and m.blocks[-1].attn.logn == "trained"
    assert m.blocks[0].attn.rotary.scaling["type"] == "ntk"


@pytest.mark.parametrize("opts", [{"interleaved": False}, {"position": "alibi"}, {"window": 4, "sink_tokens": 1}])
def test_training_after_inference_mode_validation(opts):
    """Lightning validates under torch.inference_mode(); cached tables must not break the next backward."""
    m = TransformerLM(32, dim=16, depth=1, num_heads=2, **opts)
    tokens = torch.randint(0, 32, (2, 12))
    with torch.inference_mode():
        ref = m(tokens)
    out = m(tokens)
    out.float().sum().backward()
    torch.testing.assert_close(out.detach(), ref)
    assert m.embed.weight.grad is not None


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_generate_greedy_equals_uncached_argmax_loop(position):
    torch.manual_seed(4)
    m = TransformerLM(40, dim=32, depth=2, num_heads=2, position=position, window=6).eval()
    prompt = torch.randint(0, 40, (2, 5))
    got = m.generate(prompt, 12, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat((seq, m(seq)[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(got, seq)
    sampled = m.generate(prompt, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :5], prompt)


def test_streaming_decode_with_trimmed_cache():
    torch.manual_seed(5)
    m = TransformerLM(40, dim=32, depth=2, num_heads=2, window=6, sink_tokens=2, window_at="inference").eval()
    tokens = torch.randint(0, 40, (1, 50))
    with torch.no_grad():
        full = m(tokens)
        cache = m.new_cache(trim_to_window=True)
        parts = [m(tokens[:, :10], cache=cache)] + [m(tokens[:, t : t + 1], cache=cache) for t in range(10, 50)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    assert all(k.shape[2] == 2 + 5 for k in cache.keys)  # sinks + (w - 1) keys per layer
