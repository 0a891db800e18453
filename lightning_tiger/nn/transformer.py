"""A pre-norm decoder-only Transformer LM built from :class:`~lightning_tiger.nn.Attention` (RoPE: Su et al. 2021;
ALiBi: Press et al. 2022)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_int, check_real
from .attention import RUNTIME_OPTIONS, Attention
from .kv_cache import KVCache

__all__ = ["TransformerBlock", "TransformerLM"]

_MLPS = ("swiglu", "gelu")
# Attention options a per-layer override may set (construction-time ones included).
_OVERRIDABLE = (
    "position", "window", "window_at", "sink_tokens", "logn", "logn_base", "rope_base", "rope_scaling",
    "interleaved", "num_kv_heads", "backend", "rerope_window", "rerope_leak",
)


class _RMSNormFunction(torch.autograd.Function):
    """``y = x·r·w`` with ``r = 1/sqrt(mean(x²) + eps)``, with a hand-written backward.

    The composite autograd of ``torch.nn.RMSNorm`` on CPU (torch 2.13) runs ~20 elementwise passes in
    backward (pow/mean/rsqrt chain plus a broadcast reduction); this one needs about 8:
    ``ĝ = g·w``, ``x̂ = x·r``, ``∂x = r·(ĝ − x̂·mean(ĝ·x̂))``, ``∂w = Σ g·x̂``. Only ``x`` (alive anyway as the
    residual stream) and ``r [.., 1]`` are saved. Half inputs are computed in fp32.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return (xf * r).mul_(weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        x, weight, r = ctx.saved_tensors
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        gf = g.to(xf.dtype)
        xhat = xf * r
        gw = (gf.reshape(-1, gf.shape[-1]) * xhat.reshape(-1, xhat.shape[-1])).sum(0).to(weight.dtype)
        gh = gf * weight.to(xf.dtype)
        dot = (gh * xhat).mean(-1, keepdim=True)
        gx = gh.sub_(xhat.mul_(dot)).mul_(r)
        return gx.to(x.dtype), gw, None


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same parameters and state dict) with a faster CPU backward
    (see :class:`_RMSNormFunction`); falls back to the parent for shapes it does not cover."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormFunction.apply(x, self.weight, eps)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: ``2/3 · mlp_ratio · dim`` rounded up to a multiple of 8 (LLaMA convention),
    so that the three matrices hold about as many parameters as a ``mlp_ratio`` GELU MLP."""
    return int(math.ceil(2 * mlp_ratio * dim / 3 / 8) * 8)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``.

    MLP: ``"swiglu"`` ``W_2(silu(W_1 x) ⊙ W_3 x)`` (Shazeer 2020) with hidden width
    :func:`swiglu_hidden` (or ``hidden_dim``), or ``"gelu"`` ``W_2 gelu(W_1 x)`` with hidden width
    ``mlp_ratio · dim``. Residual dropout ``dropout`` after each branch; attention dropout likewise.

    Args:
        dim: model width.
        num_heads: attention heads.
        mlp: ``"swiglu"`` (default) or ``"gelu"``.
        mlp_ratio: MLP width relative to ``dim`` (default 4).
        hidden_dim: explicit MLP hidden width (overrides ``mlp_ratio``).
        dropout: residual and attention dropout (default 0).
        mlp_bias: biases in the MLP (default False).
        norm_eps: RMSNorm epsilon.
        **attn_kwargs: forwarded to :class:`Attention` (``num_kv_heads``, ``position``, ``window``, ...).

    Shapes:
        ``forward(x [B, L, dim], positions, cache)`` -> ``[B, L, dim]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp: Literal["swiglu", "gelu"] = "swiglu",
        mlp_ratio: float = 4.0,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        mlp_bias: bool = False,
        norm_eps: float = 1e-6,
        **attn_kwargs: Any,
    ) -> None:
        super().__init__()
        if mlp not in _MLPS:
            raise ValueError(f"mlp must be one of {_MLPS}, got {mlp!r}")
        hidden_dim = check_int("hidden_dim", hidden_dim, low=1, allow_none=True)
        if hidden_dim is None:
            mlp_ratio = check_real("mlp_ratio", mlp_ratio, low=0.0, low_open=True)
        self.mlp_kind = mlp
        self.norm1 = RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, dropout=dropout, **attn_kwargs)
        self.norm2 = RMSNorm(dim, eps=norm_eps)
        if mlp == "swiglu":
            hidden = hidden_dim or swiglu_hidden(dim, mlp_ratio)
            self.w_in = nn.Linear(dim, 2 * hidden, bias=mlp_bias)  # fused gate + value projection
        else:
            hidden = hidden_dim or round(mlp_ratio * dim)
            self.w_in = nn.Linear(dim, hidden, bias=mlp_bias)
        self.w_out = nn.Linear(hidden, dim, bias=mlp_bias)
        self.hidden_dim = hidden
        self.drop = nn.Dropout(dropout)

    def mlp(self, x: Tensor) -> Tensor:
        """The feed-forward branch (without norm and residual)."""
        h = self.w_in(x)
        if self.mlp_kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.w_out(h)

    def forward(self, x: Tensor, positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), positions=positions, cache=cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerLM(nn.Module):
    """Decoder-only language model: embedding, ``depth`` pre-norm blocks, RMSNorm, LM head.

    Initialisation (GPT-2 / nanoGPT): every Linear and the embedding ``N(0, 0.02²)``, biases zero, the
    residual-output projections (``attn.out``, ``w_out``) ``N(0, (0.02/√(2·depth))²)`` so the residual
    stream's variance does not grow with depth; RMSNorm weights one. With ``tie_embeddings`` the LM head
    reuses the embedding matrix.

    Per-layer overrides (``layer_overrides``): ``{layer_index: {option: value}}``, negative indices allowed,
    keys may be strings (YAML). Options: ``position``, ``window``, ``window_at``, ``sink_tokens``, ``logn``,
    ``logn_base``, ``rope_base``, ``rope_scaling``, ``interleaved``, ``num_kv_heads``, ``backend``,
    ``rerope_window``, ``rerope_leak``. Example,
    HWFA (Su, kexue.fm/archives/9603): ``window=L, layer_overrides={-1: {"position": "none", "window": None, "logn":
    "trained"}}`` with ``logn_base=L``.

    Args:
        vocab_size: number of tokens.
        dim: model width (256).
        depth: number of blocks (4).
        num_heads: attention heads (4).
        num_kv_heads: key/value heads (GQA; default ``num_heads``).
        mlp: ``"swiglu"`` (default) or ``"gelu"``.
        mlp_ratio: MLP width factor (4.0; SwiGLU uses 2/3 of it, see :func:`swiglu_hidden`).
        hidden_dim: explicit MLP hidden width (overrides ``mlp_ratio``).
        dropout: residual + attention dropout (0).
        tie_embeddings: share the embedding and LM-head matrices (True).
        position: ``"rope"`` (default), ``"alibi"``, ``"none"``, ``"kerple_log"``, ``"kerple_power"``,
            ``"sandwich"`` or ``"xpos"`` (see :class:`~lightning_tiger.nn.Attention`).
        rope_base: RoPE base (10000).
        rope_scaling: RoPE context-extension dict (see :class:`~lightning_tiger.nn.RotaryEmbedding`).
        interleaved: RoPE pair layout (True: (2k, 2k+1); False: half-split).
        window: attention window (visible keys incl. self) or None.
        window_at: ``"both"``, ``"train"`` or ``"inference"``.
        sink_tokens: kept leading tokens with a window.
        logn: ``"none"``, ``"trained"`` or ``"posthoc"``.
        logn_base: the training length, log-n's base (default ``max_seq_len`` when log-n is used).
        layer_overrides: per-layer attention options (see above).
        max_seq_len: if set, inputs longer than this (cache included) raise; also RoPE-scaling's
            default original length. Not needed for anything else.
        backend: attention kernel (``"auto"``, ``"sdpa"``, ``"flex"``, ``"math"``).
        norm_eps: RMSNorm epsilon.

    Shapes:
        ``forward(tokens [B, L], positions [L] | [B, L] | None, cache)`` -> logits ``[B, L, vocab_size]``.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        mlp: Literal["swiglu", "gelu"] = "swiglu",
        mlp_ratio: float = 4.0,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        position: Literal["rope", "alibi", "none", "kerple_log", "kerple_power", "sandwich", "xpos"] = "rope",
        rope_base: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        interleaved: bool = True,
        window: int | None = None,
        window_at: Literal["both", "train", "inference"] = "both",
        sink_tokens: int = 0,
        logn: Literal["none", "trained", "posthoc"] = "none",
        logn_base: int | None = None,
        layer_overrides: dict[int, dict[str, Any]] | None = None,
        max_seq_len: int | None = None,
        backend: Literal["auto", "sdpa", "flex", "math"] = "auto",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        vocab_size = check_int("vocab_size", vocab_size, low=1)
        dim = check_int("dim", dim, low=1)
        depth = check_int("depth", depth, low=1)
        num_heads = check_int("num_heads", num_heads, low=1)
        hidden_dim = check_int("hidden_dim", hidden_dim, low=1, allow_none=True)
        mlp_ratio = check_real("mlp_ratio", mlp_ratio, low=0.0, low_open=True)
        max_seq_len = check_int("max_seq_len", max_seq_len, low=1, allow_none=True)
        self.vocab_size, self.dim, self.depth, self.max_seq_len = vocab_size, dim, depth, max_seq_len
        base_opts: dict[str, Any] = dict(
            position=position, window=window, window_at=window_at, sink_tokens=sink_tokens, logn=logn,
            logn_base=logn_base, rope_base=rope_base, rope_scaling=rope_scaling, interleaved=interleaved,
            num_kv_heads=num_kv_heads, backend=backend,
        )
        per_layer: list[dict[str, Any]] = [dict(base_opts) for _ in range(depth)]
        for key, opts in (layer_overrides or {}).items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"layer_overrides keys must be layer indices, got {key!r}") from None
            if not -depth <= idx < depth:
                raise ValueError(f"layer_overrides index must be in [{-depth}, {depth}), got {idx}")
            if not isinstance(opts, dict):
                raise TypeError(f"layer_overrides[{key!r}] must be a dict, got {type(opts).__name__}")
            bad = set(opts) - set(_OVERRIDABLE)
            if bad:
                raise ValueError(
                    f"layer_overrides[{key!r}] has unknown options {sorted(bad)}; accepted: {_OVERRIDABLE}"
                )
            per_layer[idx % depth].update(opts)
        for opts in per_layer:
            if opts["logn"] != "none" and opts["logn_base"] is None:
                opts["logn_base"] = max_seq_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, num_heads, mlp=mlp, mlp_ratio=mlp_ratio, hidden_dim=hidden_dim, dropout=dropout,
                norm_eps=norm_eps, max_seq_len=max_seq_len, layer_idx=i, **per_layer[i],
            )
            for i in range(depth)
        )
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """GPT-2 initialisation (see the class docstring)."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.depth)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith("attn.out") or name.endswith("w_out")
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)

    def new_cache(self, trim_to_window: bool = False) -> KVCache:
        """An empty :class:`KVCache` with one slot per block (``trim_to_window``: see :class:`KVCache`)."""
        return KVCache(num_layers=self.depth, trim_to_window=trim_to_window)

    def set_attention_options(self, layers: list[int] | None = None, **opts: Any) -> None:
        """Change evaluation-time attention options of all (or the given) layers, without retraining.

        Args:
            layers: layer indices (negative allowed) or ``None`` for all.
            **opts: ``window``, ``window_at``, ``sink_tokens``, ``logn``, ``logn_base``, ``rope_scaling``,
                ``rerope_window``, ``rerope_leak`` (ReRoPE at inference, see :class:`Attention`).

        Example:
            >>> model.set_attention_options(window=64, window_at="inference")  # "super strong baseline"
            >>> model.set_attention_options(logn="posthoc", logn_base=64)
            >>> model.set_attention_options(rope_scaling={"type": "ntk", "factor": 8})
            >>> model.set_attention_options(rerope_window=256)  # ReRoPE-w256 (model.eval() first)
        """
        unknown = set(opts) - set(RUNTIME_OPTIONS)
        if unknown:
            raise TypeError(f"unknown attention option(s) {sorted(unknown)}; accepted: {RUNTIME_OPTIONS}")
        idxs = range(self.depth) if layers is None else layers
        for i in idxs:
            if not -self.depth <= i < self.depth:
                raise ValueError(f"layers entries must be in [{-self.depth}, {self.depth}), got {i}")
            self.blocks[i].attn.set_options(**opts)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Next-token logits.

        Args:
            tokens: ``[batch, seq]`` token ids.
            positions: ``[seq]`` or ``[batch, seq]`` int/float positions (RoPE / ALiBi); default
                ``cache_length + arange(seq)``.
            cache: a :class:`KVCache` from :meth:`new_cache` for incremental decoding.

        Returns:
            ``[batch, seq, vocab_size]`` logits (in the parameters' dtype).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        # Range check on CPU only (free there); on accelerators it would cost a host sync per forward.
        if tokens.device.type == "cpu" and tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"tokens must be in [0, vocab_size={self.vocab_size}), got ids in "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        if cache is not None and cache.num_layers != self.depth:
            raise ValueError(f"cache has {cache.num_layers} layers, the model {self.depth}; use model.new_cache()")
        if self.max_seq_len is not None:
            total = tokens.shape[1] + (cache.length(0) if cache is not None else 0)
            if total > self.max_seq_len:
                raise ValueError(f"sequence length {total} exceeds max_seq_len={self.max_seq_len}")
        x = self.drop(self.embed(tokens))
        for block in self.blocks:
            x = block(x, positions=positions, cache=cache)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample continuations with a KV cache (call ``model.eval()`` first to disable dropout).

        Args:
            tokens: prompt ``[batch, seq]`` (``seq >= 1``).
            max_new_tokens: number of tokens to append (>= 0).
            temperature: softmax temperature; ``0`` picks the arg-max (greedy).
            top_k: sample only among the ``top_k`` most likely tokens (None: all).
            generator: optional ``torch.Generator`` for reproducible sampling.

        Returns:
            ``[batch, seq + max_new_tokens]`` token ids (prompt included).
        """
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be [batch, seq] with seq >= 1, got shape {tuple(tokens.shape)}")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=0)
        temperature = check_real("temperature", temperature, low=0.0)
        top_k = check_int("top_k", top_k, low=1, allow_none=True)
        cache = self.new_cache()
        out = tokens
        logits = self(tokens, cache=cache)[:, -1].float()
        for step in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out = torch.cat((out, nxt), dim=1)
            if step + 1 < max_new_tokens:
                logits = self(nxt, cache=cache)[:, -1].float()
        return out

