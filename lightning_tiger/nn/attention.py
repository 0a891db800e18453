"""Multi-head attention with RoPE / ALiBi / NoPE and the length-extrapolation toolkit (Su, "Transformer升级之路" 7, 8,
12: kexue.fm/archives/9708; FlexAttention for the kernels).

Conventions (used by every layer of ``lightning_tiger.nn``):

* token *indices*: query ``i`` and key ``j`` count tokens of the sequence, including those held in a
  :class:`~lightning_tiger.nn.KVCache` (``i = cache_length + local index``). Causality, windows, sinks and log-n's
  ``n`` are defined on indices.
* *positions*: what RoPE rotates by and what ALiBi measures distances with. Default: positions = indices.
  Explicit ``positions`` (e.g. :func:`~lightning_tiger.nn.random_positions`, Su's "Transformer升级之路：8") change only
  these.

The KV cache lives in :mod:`.kv_cache`, masks and kernels in :mod:`.attention_utils`. This file stays at ~450
lines on purpose: about 110 are the layer's documented formulas and arguments, the rest is one layer whose four
paths (SDPA/math query blocks, XPOS blocks, ReRoPE, FlexAttention) all read its options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_int, check_real
from .alibi import ALiBi
from .attention_utils import Span, VisibilityRule, alibi_mask, flex_attend, math_attend, visibility
from .kerple import KERPLE
from .kv_cache import KVCache
from .rerope import rerope_attention
from .rotary import RotaryEmbedding
from .sandwich import Sandwich
from .xpos import QUERY_BLOCK, XPOS

__all__ = ["RUNTIME_OPTIONS", "Attention"]

_POSITIONS = ("rope", "alibi", "none", "kerple_log", "kerple_power", "sandwich", "xpos")
# Positions whose encoding is a score bias computed from (cached) positions: one module each.
_BIASES = {"kerple_log": lambda h: KERPLE(h, "log"), "kerple_power": lambda h: KERPLE(h, "power"),
           "sandwich": lambda h: Sandwich(h)}
_WINDOW_AT = ("both", "train", "inference")
_LOGN = ("none", "trained", "posthoc")
_BACKENDS = ("auto", "sdpa", "flex", "math")
# Options that `Attention.set_options` may change after construction (evaluation-time tools).
RUNTIME_OPTIONS = (
    "window", "window_at", "sink_tokens", "logn", "logn_base", "rope_scaling", "rerope_window", "rerope_leak"
)


@dataclass(frozen=True)
class _Call:
    """What one forward call fixes for all of its query blocks.

    Attributes:
        rule: visibility (causality, the window if active in this mode, sinks).
        backend: ``"sdpa"``, ``"math"`` or ``"flex"`` (``"auto"`` resolved).
        front: the stored keys have token indices ``[0, front) ∪ [start, …)`` (a trimmed
            :class:`~lightning_tiger.nn.KVCache`); ``front = start = 0``: every key is stored.
        start: see ``front``.
    """

    rule: VisibilityRule
    backend: str
    front: int = 0
    start: int = 0


class Attention(nn.Module):
    r"""Multi-head self-attention with RoPE / ALiBi / NoPE, windows, sinks, log-n scaling, GQA and KV cache.

    For query ``i`` (token index, see the module docstring) over keys ``j``:

    * visibility: causal ``j <= i``; with ``window = w`` also ``i − j <= w − 1`` (causal; ``w`` keys including
      self) or ``|i − j| <= w − 1`` (bidirectional: ``w − 1`` neighbours on each side); with
      ``sink_tokens = s`` the first ``s`` keys stay visible (Λ-shaped mask, kexue.fm/archives/9948; causal
      still applies). ``window_at`` selects when the window (and its sinks) is active: ``"train"``
      (``self.training``), ``"inference"`` (the "super strong baseline" of Su's "Transformer升级之路：7": train full,
      test with ``w = L_train``) or ``"both"``.
    * scores ``s_ij = c_i·(q_i·k_j)/√d + b_ij`` with ``b`` the ALiBi bias (``position="alibi"``) and
      ``c_i = 1`` (``logn="none"``), ``log_{base} n_i`` (``"trained"``: Su, kexue.fm/archives/8823) or
      ``max(1, log_{base} n_i)`` (``"posthoc"``), ``n_i`` = number of keys query ``i`` can see (causal ``i+1``,
      ``min(i+1, w)`` plus visible sinks with a window; bidirectional ``S`` or the band size), ``base =
      logn_base`` (the training length). ``c_i`` is folded into ``q_i`` so SDPA's fused kernel stays usable.
    * RoPE rotates ``q_i`` and ``k_j`` at their positions before caching (:class:`RotaryEmbedding`).
    * other encodings (``position``): ``"kerple_log"`` / ``"kerple_power"`` (:class:`~lightning_tiger.nn.KERPLE`,
      learnable per-head bias) and ``"sandwich"`` (:class:`~lightning_tiger.nn.Sandwich`) add ``b_ij`` like
      ALiBi, from the token positions (cached with the keys); ``"xpos"`` is RoPE plus the decay of
      :class:`~lightning_tiger.nn.XPOS` (causal only; the cache keeps rotated, unscaled keys).
    * ReRoPE / Leaky ReRoPE (``rerope_window = w``, ``rerope_leak = k``; RoPE layers, inference only — training
      stays plain RoPE): relative positions ``|i − j| >= w`` are clipped to ``w`` or continue with slope
      ``1/k`` (:func:`~lightning_tiger.nn.rerope_attention`, banded two-score computation in query blocks). The
      cache then keeps the layer's keys unrotated. Composes with log n, windows and sinks; not with
      ``rope_scaling``, explicit ``positions`` or a trimmed cache (ValueError).

    Kernels (``backend``): ``"sdpa"`` (:func:`torch.nn.functional.scaled_dot_product_attention`, with masks shaped
    to keep its fused kernel; long windows run chunked, in linear memory, unless ``chunk_windows = False``),
    ``"flex"`` (compiled FlexAttention; no backward on CPU, no dropout), ``"math"`` (explicit fp32 scores, the
    reference) and ``"auto"`` (default: ``"sdpa"``). How each is used: ``docs`` page "Attention kernels".

    Args:
        dim: model width.
        num_heads: query heads ``H``; ``dim`` must be divisible by it unless ``head_dim`` is given.
        num_kv_heads: key/value heads for grouped-query attention (divides ``num_heads``; default ``H``).
        position: ``"rope"`` (default), ``"alibi"``, ``"none"`` (NoPE), ``"kerple_log"``, ``"kerple_power"``,
            ``"sandwich"`` or ``"xpos"``.
        causal: causal (decoder, default) or bidirectional attention.
        window: number of visible keys including self, or ``None`` (full attention).
        window_at: ``"both"`` (default), ``"train"`` or ``"inference"``.
        sink_tokens: number of leading keys that stay visible with a window (default 0).
        logn: ``"none"`` (default), ``"trained"`` or ``"posthoc"``.
        logn_base: the training length used as the log base (required when ``logn != "none"``).
        dropout: attention-probability dropout (training only). Dropout > 0 runs SDPA's unfused path.
        bias: biases in the q/k/v and output projections (default False).
        rope_base: RoPE frequency base (10000).
        rope_scaling: RoPE context-extension dict (see :class:`RotaryEmbedding`) or ``None``.
        interleaved: RoPE pair layout (``True``: (2k, 2k+1); ``False``: half-split/NeoX).
        backend: ``"auto"``, ``"sdpa"``, ``"flex"`` or ``"math"`` (ReRoPE runs its own blocked path on any).
        rerope_window: ReRoPE's ``w`` (``None``: off).
        rerope_leak: Leaky ReRoPE's ``k > 1`` (``None``: hard clipping); needs ``rerope_window``.
        head_dim: per-head size (default ``dim // num_heads``).
        max_seq_len: passed to RoPE as the default original length of the scaling variants; not a limit.
        layer_idx: this layer's slot in a shared :class:`KVCache` (set by :class:`TransformerLM`).

    Shapes:
        ``forward(x [B, L, dim], positions [L] | [B, L] | None, cache)`` -> ``[B, L, dim]``.
    """

    #: run long windowed attention as query blocks over their key band (linear memory); see above.
    chunk_windows: bool = True
    #: query rows per block of the ReRoPE path (its memory is O(rerope_block · S)).
    rerope_block: int = 32

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        position: Literal["rope", "alibi", "none", "kerple_log", "kerple_power", "sandwich", "xpos"] = "rope",
        causal: bool = True,
        window: int | None = None,
        window_at: Literal["both", "train", "inference"] = "both",
        sink_tokens: int = 0,
        logn: Literal["none", "trained", "posthoc"] = "none",
        logn_base: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        rope_base: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        interleaved: bool = True,
        backend: Literal["auto", "sdpa", "flex", "math"] = "auto",
        head_dim: int | None = None,
        max_seq_len: int | None = None,
        layer_idx: int = 0,
        rerope_window: int | None = None,
        rerope_leak: float | None = None,
    ) -> None:
        super().__init__()
        dim = check_int("dim", dim, low=1)
        num_heads = check_int("num_heads", num_heads, low=1)
        num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, low=1)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads={num_heads}, got {num_kv_heads}")
        head_dim = check_int("head_dim", head_dim, low=1, allow_none=True)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads} (or pass head_dim)")
            head_dim = dim // num_heads
        if position not in _POSITIONS:
            raise ValueError(f"position must be one of {_POSITIONS}, got {position!r}")
        if position in ("rope", "xpos") and head_dim % 2:
            raise ValueError(f"position={position!r} needs an even head_dim, got {head_dim}")
        if position == "xpos" and not causal:
            raise ValueError("position='xpos' is for causal attention only (its decay grows for j > i; Sun et al.)")
        dropout = check_real("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.position, self.causal, self.dropout, self.backend = position, bool(causal), dropout, backend
        self.layer_idx = layer_idx
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.out = nn.Linear(num_heads * head_dim, dim, bias=bias)
        self.rotary = (
            RotaryEmbedding(head_dim, rope_base, interleaved, rope_scaling, max_seq_len)
            if position in ("rope", "xpos") else None
        )
        self.alibi = ALiBi(num_heads, causal=causal) if position == "alibi" else None
        self.score_bias = _BIASES[position](num_heads) if position in _BIASES else None
        self.xpos = XPOS(head_dim, interleaved=interleaved) if position == "xpos" else None
        self.rerope_window: int | None = None
        self.rerope_leak: float | None = None
        self.window: int | None = None
        self.window_at = "both"
        self.sink_tokens = 0
        self.logn = "none"
        self.logn_base: int | None = None
        self.set_options(window=window, window_at=window_at, sink_tokens=sink_tokens, logn=logn, logn_base=logn_base,
                         rerope_window=rerope_window, rerope_leak=rerope_leak)

    @property
    def backend(self) -> str:
        """The kernel: ``"auto"``, ``"sdpa"``, ``"flex"`` or ``"math"``; checked against ``position`` on every
        assignment (the constructor's too), so an unsupported pair fails here rather than at the first forward."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {value!r}")
        if value == "flex" and self.position in _BIASES:
            raise ValueError(
                f"backend='flex' does not support position={self.position!r} (a learned/positional score bias); "
                f"use backend 'auto', 'sdpa' or 'math' with it, or backend='flex' with position 'rope', 'alibi', "
                f"'none' or 'xpos'"
            )
        self._backend = value

    # ------------------------------------------------------------------ options
    def set_options(self, **opts: Any) -> None:
        """Change evaluation-time options without retraining.

        Accepts ``window``, ``window_at``, ``sink_tokens``, ``logn``, ``logn_base``, and ``rope_scaling``,
        ``rerope_window``, ``rerope_leak`` (these three act on ``position="rope"`` layers only; the others keep
        them unused). Unknown names raise ``TypeError``.
        """
        unknown = set(opts) - set(RUNTIME_OPTIONS)
        if unknown:
            raise TypeError(f"unknown attention option(s) {sorted(unknown)}; accepted: {RUNTIME_OPTIONS}")
        window = opts.get("window", self.window)
        window_at = opts.get("window_at", self.window_at)
        sinks = opts.get("sink_tokens", self.sink_tokens)
        logn = opts.get("logn", self.logn)
        logn_base = opts.get("logn_base", self.logn_base)
        rr_window = opts.get("rerope_window", self.rerope_window)
        rr_leak = opts.get("rerope_leak", self.rerope_leak)
        rr_window = check_int("rerope_window", rr_window, low=1, allow_none=True)
        rr_leak = check_real("rerope_leak", rr_leak, low=1, low_open=True, allow_none=True)
        if rr_leak is not None and rr_window is None:
            raise ValueError("rerope_leak needs rerope_window (Leaky ReRoPE's w)")
        window = check_int("window", window, low=1, allow_none=True)
        if window_at not in _WINDOW_AT:
            raise ValueError(f"window_at must be one of {_WINDOW_AT}, got {window_at!r}")
        sinks = check_int("sink_tokens", sinks, low=0)
        if logn not in _LOGN:
            raise ValueError(f"logn must be one of {_LOGN}, got {logn!r}")
        if logn != "none":
            if logn_base is None:
                raise ValueError(f"logn={logn!r} needs logn_base (the training length) >= 2, got None")
            logn_base = check_int("logn_base", logn_base, low=2)
        self.window, self.window_at, self.sink_tokens = window, window_at, sinks
        self.logn, self.logn_base = logn, logn_base
        self.rerope_window, self.rerope_leak = rr_window, rr_leak
        if "rope_scaling" in opts and self.rotary is not None:
            self.rotary.set_scaling(opts["rope_scaling"])

    def rerope_active(self) -> bool:
        """Whether ReRoPE replaces plain RoPE in this call: a RoPE layer at inference with ``rerope_window``."""
        return self.position == "rope" and self.rerope_window is not None and not self.training

    def window_active(self) -> bool:
        """Whether the window applies in the current mode (``self.training``)."""
        if self.window is None:
            return False
        return self.window_at == "both" or (self.window_at == "train") == self.training

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Attend over ``x`` (and the cached tokens).

        Args:
            x: ``[batch, seq, dim]``.
            positions: ``[seq]`` or ``[batch, seq]`` positions of the new tokens (int or float) for RoPE /
                ALiBi; default ``cache_length + arange(seq)``.
            cache: a :class:`KVCache`; this layer uses slot ``self.layer_idx`` and appends to it.

        Returns:
            ``[batch, seq, dim]``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch, seq, {self.dim}], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        B, L, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        offset = cache.length(self.layer_idx) if cache is not None else 0
        if positions is not None and positions.shape[-1] != L:
            raise ValueError(f"positions must have {L} entries in its last dim, got {tuple(positions.shape)}")
        rerope = self.rerope_active()
        if rerope and (positions is not None or self.rotary.scaling is not None  # type: ignore[union-attr]
                       or (cache is not None and cache.trim_to_window)):
            raise ValueError("ReRoPE (rerope_window) needs default positions, rope_scaling=None and an untrimmed cache")
        q, k, v = self.qkv(x).view(B, L, H + 2 * Hkv, D).split((H, Hkv, Hkv), dim=2)
        if self.rotary is not None and not rerope:  # ReRoPE rotates inside its own path
            q, k = self.rotary(q, k, positions=positions, offset=offset)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, D]
        q_pos = k_pos = None
        custom = positions is not None
        if self.alibi is not None or self.score_bias is not None or self.xpos is not None:
            q_pos = (positions if positions is not None else torch.arange(offset, offset + L, device=x.device))
            q_pos = q_pos.float().reshape(-1, L)
        front, start = 0, 0
        if cache is not None:
            k, v, k_pos = cache.update(self.layer_idx, k, v, q_pos, custom, raw_keys=rerope)
            custom = cache.custom_positions[self.layer_idx]
            front, start = cache.front[self.layer_idx], cache.start[self.layer_idx]
        else:
            k_pos = q_pos
        if rerope:
            out = self._rerope(q, k, v, offset)
        elif self.xpos is not None:  # the cache holds unscaled keys: each query block scales what it attends to
            out = self._xpos_attend(q, k, v, offset, q_pos, k_pos, front, start)  # type: ignore[arg-type]
        else:
            use_pos = (self.alibi is not None and custom) or self.score_bias is not None
            out = self._attend(q, k, v, offset, q_pos if use_pos else None, k_pos if use_pos else None, front, start)
        if cache is not None and cache.trim_to_window and self.causal and self.window_active():
            # the next query (index total) sees keys >= total - w + 1, plus the sinks
            cache.trim(self.layer_idx, keep_first=self.sink_tokens, keep_last=self.window - 1)  # type: ignore[operator]
        return self.out(out.transpose(1, 2).reshape(B, L, H * D))

    def _xpos_attend(
        self, q: Tensor, k: Tensor, v: Tensor, offset: int, q_pos: Tensor, k_pos: Tensor, front: int, start: int,
    ) -> Tensor:
        """XPOS attention in blocks of :data:`~lightning_tiger.nn.xpos.QUERY_BLOCK` queries.

        Each block is scaled with its own reference position (its last query) against the keys up to that
        query, so query factors stay bounded and key factors ``<= 1`` in any dtype (see :mod:`.xpos`); one
        block for decoding. ``q [B, H, L, D]``; ``k, v`` as in :meth:`_attend`; ``q_pos [B|1, L]``, ``k_pos``
        the positions of the stored keys.
        """
        L = q.shape[2]
        k_pos = k_pos.reshape(-1, k_pos.shape[-1])
        outs = []
        for a in range(0, max(L, 1), QUERY_BLOCK):
            b = min(L, a + QUERY_BLOCK)
            n_keys = front + (offset + b - start)  # stored keys with token index < offset + b (start <= offset)
            qs, ks = self.xpos(q[:, :, a:b], k[:, :, :n_keys], q_pos[:, a:b], k_pos[:, :n_keys])
            outs.append(self._attend(qs, ks, v[:, :, :n_keys], offset + a, None, None, front, start))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _rule(self, num_keys: int) -> VisibilityRule:
        """The visibility rule of a call over ``num_keys`` keys (the window and its sinks only when active)."""
        window = self.window if self.window_active() else None
        return VisibilityRule(self.causal, window, min(self.sink_tokens, num_keys) if window is not None else 0)

    def _scale_queries(self, q: Tensor, counts: Tensor) -> Tensor:
        """Fold log-n's factor (from the number of visible keys per query, ``counts [L]``) into ``q [B, H, L, D]``."""
        if self.logn == "none":
            return q
        return (q.float() * self._logn_factor(counts).view(-1, 1)).to(q.dtype)

    def _logn_factor(self, counts: Tensor) -> Tensor:
        """Log-n query factor from the number of visible keys per query (see the class docstring)."""
        factor = counts.log() / math.log(self.logn_base)  # type: ignore[arg-type]
        return factor.clamp_min(1.0) if self.logn == "posthoc" else factor

    def _rerope(self, q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
        """ReRoPE / Leaky ReRoPE over unrotated ``q [B, H, L, D]`` and all ``offset + L`` unrotated keys."""
        rule = self._rule(offset + q.shape[2])
        dev = str(q.device)

        def keys_visible(q_lo: int, q_hi: int, k_hi: int) -> tuple[Tensor | None, Tensor]:
            return visibility(Span.full(q_lo, q_hi, k_hi), rule, dev)

        return rerope_attention(
            q, k, v, self.rotary, offset, self.rerope_window, self.rerope_leak, self.causal,  # type: ignore[arg-type]
            visibility=keys_visible if rule.window is not None else None,  # plain causality is handled in the band
            logn=self._logn_factor if self.logn != "none" else None,
            block_size=self.rerope_block,
        )

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, offset: int, q_pos: Tensor | None, k_pos: Tensor | None,
        front: int = 0, start: int = 0,
    ) -> Tensor:
        """Queries ``offset … offset + L − 1`` (``q [B, H, L, D]``) over keys ``k, v [B, H_kv, stored, D]`` that
        hold the token indices ``[0, front) ∪ [start, S)`` (a trimmed cache): all ``S = offset + L`` keys when
        ``front = start = 0``. ``q_pos, k_pos``: explicit positions for a score bias, or None (positions =
        indices)."""
        L = q.shape[2]
        S = offset + L
        call = _Call(self._rule(S), "sdpa" if self.backend == "auto" else self.backend, front, start)
        window, sinks = call.rule.window, call.rule.sinks
        if call.backend == "flex":
            if front or start:
                raise ValueError("backend='flex' does not support a KVCache with trim_to_window=True")
            if self.logn != "none":
                q = self._scale_queries(q, visibility(Span.full(offset, S, S), call.rule, str(q.device))[1])
            slopes = self.alibi.slopes if self.alibi is not None else None
            return flex_attend(q, k, v, offset, call.rule, slopes, q_pos, k_pos)
        if self.chunk_windows and window is not None and 2 * window + sinks < S and L > 1:
            block = max(32, min(window, 512))
            if block < L:
                outs = []
                for a in range(0, L, block):
                    b = min(L, a + block)
                    qa, qb = offset + a, offset + b  # absolute query indices
                    k_hi = min(S, qb) if self.causal else min(S, qb - 1 + window)
                    span = Span(qa, qb, sinks, max(sinks, qa - window + 1), k_hi)
                    outs.append(self._block(q[:, :, a:b], k, v, span, call, None if q_pos is None else q_pos[:, a:b],
                                            k_pos))
                return torch.cat(outs, dim=2)
        return self._block(q, k, v, Span(offset, S, front, start, S), call, q_pos, k_pos)

    def _block(
        self, q: Tensor, k: Tensor, v: Tensor, span: Span, call: _Call, q_pos: Tensor | None, k_pos: Tensor | None,
    ) -> Tensor:
        """Queries and keys of ``span`` (``q`` holds its queries; ``k, v`` the stored keys, see :meth:`_attend`)
        with the SDPA or math kernel."""
        dev = str(q.device)
        front, start = call.front, call.start
        if (front or start) and (span.n_sink > front or span.k_lo < start):
            raise RuntimeError("the KV cache was trimmed to a different window; use a fresh KVCache")
        if (span.n_sink, span.k_lo, span.k_hi) != (front, start, start - front + k.shape[2]):
            # gather the span's keys from the stored ones (stored index = token index - start + front)
            idx = torch.cat((
                torch.arange(span.n_sink, device=q.device),
                torch.arange(span.k_lo - start + front, span.k_hi - start + front, device=q.device),
            ))
            k, v = k.index_select(2, idx), v.index_select(2, idx)
            if k_pos is not None:
                k_pos = k_pos.index_select(1, idx)
        vis, counts = visibility(span, call.rule, dev)
        q = self._scale_queries(q, counts)
        plain_causal = (self.causal and call.rule.window is None and span.n_sink == 0
                        and span.q_lo == span.k_lo == 0 and span.q_hi == span.k_hi)
        mask: Tensor | None = None
        if self.alibi is not None or self.score_bias is not None:
            if q_pos is None:
                mask = alibi_mask(span, call.rule, self.num_heads, dev)
            else:
                bias_mod = self.alibi if self.alibi is not None else self.score_bias
                bias = bias_mod.from_positions(q_pos, k_pos)  # type: ignore[union-attr]  # [B|1, H, L, S]
                mask = bias.masked_fill(~vis, float("-inf")) if vis is not None else bias
            plain_causal = False
        elif vis is not None and not plain_causal:
            mask = vis
        p = self.dropout if self.training else 0.0
        is_causal = plain_causal and vis is not None
        if call.backend == "math":
            return math_attend(q, k, v, vis if is_causal else mask, p)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        gqa = self.num_kv_heads != self.num_heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal, enable_gqa=gqa)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, position={self.position!r}, "
            f"causal={self.causal}, window={self.window}, window_at={self.window_at!r}, "
            f"sink_tokens={self.sink_tokens}, logn={self.logn!r}, logn_base={self.logn_base}, "
            f"rerope_window={self.rerope_window}, rerope_leak={self.rerope_leak}, backend={self.backend!r}"
        )
