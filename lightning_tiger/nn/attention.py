"""Multi-head attention with RoPE / ALiBi / NoPE and the length-extrapolation toolkit (Su, "Transformer升级之路" 7, 8,
12: kexue.fm/archives/9708; FlexAttention for the kernels).

Conventions (used by every layer of ``lightning_tiger.nn``):

* token *indices*: query ``i`` and key ``j`` count tokens of the sequence, including those held in a
  :class:`KVCache` (``i = cache_length + local index``). Causality, windows, sinks and log-n's ``n`` are defined
  on indices.
* *positions*: what RoPE rotates by and what ALiBi measures distances with. Default: positions = indices.
  Explicit ``positions`` (e.g. :func:`~lightning_tiger.nn.random_positions`, Su's "Transformer升级之路：8") change only
  these.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_int
from .alibi import ALiBi
from .kerple import KERPLE
from .rerope import rerope_attention
from .rotary import RotaryEmbedding
from .sandwich import Sandwich
from .xpos import QUERY_BLOCK, XPOS

__all__ = ["Attention", "KVCache"]

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


class KVCache:
    """Key/value cache for incremental decoding, one slot per attention layer.

    Holds the *rotated* keys (RoPE is applied once, at the token's absolute position; a ReRoPE layer at
    inference stores its keys unrotated instead, flagged in ``raw_keys``; XPOS layers store them unscaled) and
    the values in SDPA layout ``[batch, kv_heads, seq, head_dim]``, plus, for ALiBi / KERPLE / Sandwich / XPOS
    layers, the key positions ``[batch or 1, seq]`` (fp32). By default every token is kept (a window only
    masks), memory O(seq) per layer.

    With ``trim_to_window=True`` a causal layer whose window is active drops, after each call, the keys no
    future query can see: it keeps the ``sink_tokens`` first keys and the last ``window − 1`` ones, so
    streaming decoding with a window (the "super strong baseline" of Su's "Transformer升级之路：7") runs in O(window)
    memory. Only valid while the window stays active; changing it afterwards cannot bring dropped keys back.

    Args:
        num_layers: number of attention layers that share this cache (``TransformerLM.new_cache()`` sizes it).
        trim_to_window: drop keys outside every future query's window (see above; default False).

    Example:
        >>> cache = KVCache(num_layers=len(model.blocks))
        >>> logits = model(prompt, cache=cache)            # fills the cache
        >>> logits = model(next_token[:, None], cache=cache)  # one new token at position cache.length()
    """

    def __init__(self, num_layers: int = 1, trim_to_window: bool = False) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.trim_to_window = bool(trim_to_window)
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.positions: list[Tensor | None] = [None] * num_layers
        self.custom_positions: list[bool] = [False] * num_layers
        # Whether a layer's keys are stored unrotated (ReRoPE layers at inference) or RoPE-rotated; fixed by
        # the first update, because the two cannot be mixed in one slot.
        self.raw_keys: list[bool | None] = [None] * num_layers
        # The stored keys of a layer have token indices [0, front) ∪ [start, total): `front` leading (sink) keys
        # kept apart once the cache was trimmed, then a contiguous run. Untrimmed: front = start = 0.
        self.front: list[int] = [0] * num_layers
        self.start: list[int] = [0] * num_layers
        self.total: list[int] = [0] * num_layers

    def _check(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    def length(self, layer: int = 0) -> int:
        """Number of tokens seen by ``layer`` (= index of the next token), trimmed ones included."""
        self._check(layer)
        return self.total[layer]

    def stored_indices(self, layer: int, device: torch.device | None = None) -> Tensor:
        """Token indices of the stored keys of ``layer`` (``[stored]``, int64)."""
        self._check(layer)
        return torch.cat((
            torch.arange(self.front[layer], device=device),
            torch.arange(self.start[layer], self.total[layer], device=device),
        ))

    def trim(self, layer: int, keep_first: int, keep_last: int) -> None:
        """Keep only the keys with index ``< keep_first`` or ``>= total − keep_last`` for ``layer``."""
        self._check(layer)
        total, start = self.total[layer], self.start[layer]
        new_start = max(start, total - keep_last)
        if new_start <= max(start, keep_first) or self.keys[layer] is None:
            return  # nothing outside the kept ranges
        idx = self.stored_indices(layer, device=self.keys[layer].device)  # type: ignore[union-attr]
        keep = (idx < keep_first) | (idx >= new_start)
        sel = keep.nonzero().squeeze(1)
        self.keys[layer] = self.keys[layer].index_select(2, sel)  # type: ignore[union-attr]
        self.values[layer] = self.values[layer].index_select(2, sel)  # type: ignore[union-attr]
        if self.positions[layer] is not None:
            self.positions[layer] = self.positions[layer].index_select(1, sel)  # type: ignore[union-attr]
        self.front[layer] = int(((idx < keep_first) & (idx < new_start)).sum())
        self.start[layer] = new_start

    def update(
        self, layer: int, k: Tensor, v: Tensor, positions: Tensor | None = None, custom: bool = False,
        raw_keys: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append ``k, v [B, H_kv, L, D]`` (and ``positions [B|1, L]``) and return everything cached so far.

        ``raw_keys``: the keys are unrotated (a ReRoPE layer, :mod:`~lightning_tiger.nn.rerope`); a slot never
        mixes unrotated and rotated keys (ValueError: switch ReRoPE on or off only with a fresh cache).
        """
        self._check(layer)
        if self.raw_keys[layer] is not None and self.raw_keys[layer] != raw_keys:
            held = "unrotated (ReRoPE)" if self.raw_keys[layer] else "RoPE-rotated"
            raise ValueError(f"KV cache layer {layer} holds {held} keys; ReRoPE was switched: use a fresh KVCache")
        self.raw_keys[layer] = raw_keys
        old_k = self.keys[layer]
        if old_k is not None and (old_k.shape[0] != k.shape[0] or old_k.shape[1:2] != k.shape[1:2]):
            raise ValueError(
                f"cached keys have batch/heads {tuple(old_k.shape[:2])}, new ones {tuple(k.shape[:2])}"
            )
        self.keys[layer] = k if old_k is None else torch.cat((old_k, k), dim=2)
        self.total[layer] += k.shape[2]
        old_v = self.values[layer]
        self.values[layer] = v if old_v is None else torch.cat((old_v, v), dim=2)
        if positions is not None:
            old_p = self.positions[layer]
            if old_p is None:
                self.positions[layer] = positions
            else:
                rows = max(old_p.shape[0], positions.shape[0])
                self.positions[layer] = torch.cat(
                    (old_p.expand(rows, -1), positions.expand(rows, -1)), dim=-1
                )
            self.custom_positions[layer] = self.custom_positions[layer] or custom
        return self.keys[layer], self.values[layer], self.positions[layer]  # type: ignore[return-value]

    def reset(self) -> None:
        """Drop every cached tensor."""
        self.__init__(self.num_layers, self.trim_to_window)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- masks
# Masks are cached by geometry (and inference-mode state: an inference-mode tensor may not be saved for a later
# backward). Only masks up to this many entries are cached, so long ALiBi biases are not pinned in memory.
_CACHE_MAX_ENTRIES = 2048 * 2048


def _cacheable(q_lo: int, q_hi: int, n_sink: int, k_lo: int, k_hi: int) -> bool:
    return (q_hi - q_lo) * (n_sink + k_hi - k_lo) <= _CACHE_MAX_ENTRIES


def _visibility(
    q_lo: int, q_hi: int, n_sink: int, k_lo: int, k_hi: int,
    causal: bool, window: int | None, sinks: int, device: str,
) -> tuple[Tensor | None, Tensor]:
    args = (q_lo, q_hi, n_sink, k_lo, k_hi, causal, window, sinks, device)
    if _cacheable(q_lo, q_hi, n_sink, k_lo, k_hi):
        return _visibility_cached(*args, torch.is_inference_mode_enabled())
    return _visibility_impl(*args)


def _alibi_mask(
    q_lo: int, q_hi: int, n_sink: int, k_lo: int, k_hi: int,
    causal: bool, window: int | None, sinks: int, num_heads: int, device: str,
) -> Tensor:
    args = (q_lo, q_hi, n_sink, k_lo, k_hi, causal, window, sinks, num_heads, device)
    if _cacheable(q_lo, q_hi, n_sink, k_lo, k_hi):
        return _alibi_mask_cached(*args, torch.is_inference_mode_enabled())
    return _alibi_mask_impl(*args)


@functools.lru_cache(maxsize=256)
def _visibility_cached(*args: Any) -> tuple[Tensor | None, Tensor]:
    return _visibility_impl(*args[:-1])


@functools.lru_cache(maxsize=32)
def _alibi_mask_cached(*args: Any) -> Tensor:
    return _alibi_mask_impl(*args[:-1])


def _visibility_impl(
    q_lo: int, q_hi: int, n_sink: int, k_lo: int, k_hi: int,
    causal: bool, window: int | None, sinks: int, device: str,
) -> tuple[Tensor | None, Tensor]:
    """Visibility of queries ``q_lo…q_hi−1`` over keys ``{0…n_sink−1} ∪ {k_lo…k_hi−1}`` (token indices).

    Returns ``(mask, counts)``: a bool ``[L, S]`` mask (None when every key is visible) and the fp32 number
    of keys each query sees ``[L]`` (log-n's ``n``; the key set always contains all visible keys).
    Cached by geometry, so repeated calls (layers, steps) never rebuild it.
    """
    qi = torch.arange(q_lo, q_hi, device=device).unsqueeze(1)
    kj = torch.cat(
        (torch.arange(n_sink, device=device), torch.arange(k_lo, k_hi, device=device))
    ).unsqueeze(0)
    vis = torch.ones(qi.shape[0], kj.shape[1], dtype=torch.bool, device=device)
    if causal:
        vis &= kj <= qi
    if window is not None:
        vis &= ((qi - kj) <= window - 1) if causal else ((qi - kj).abs() <= window - 1)
        if sinks:
            sink = kj < sinks
            if causal:
                sink = sink & (kj <= qi)
            vis |= sink
    counts = vis.sum(-1).float()
    return (None if bool(vis.all()) else vis), counts


def _alibi_mask_impl(
    q_lo: int, q_hi: int, n_sink: int, k_lo: int, k_hi: int,
    causal: bool, window: int | None, sinks: int, num_heads: int, device: str,
) -> Tensor:
    """fp32 ``[1, H, L, S]`` ALiBi bias by token index with ``−inf`` where a key is invisible."""
    alibi = ALiBi(num_heads, causal=causal).to(device)
    qi = torch.arange(q_lo, q_hi, device=device)
    kj = torch.cat((torch.arange(n_sink, device=device), torch.arange(k_lo, k_hi, device=device)))
    bias = alibi.from_positions(qi, kj)
    vis, _ = _visibility(q_lo, q_hi, n_sink, k_lo, k_hi, causal, window, sinks, device)
    if vis is not None:
        bias = bias.masked_fill(~vis, float("-inf"))
    return bias.unsqueeze(0).contiguous()


_compiled_flex: Any = None


def _flex_attention() -> Any:
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


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

    Kernels (``backend``; PyTorch's SDPA and FlexAttention documentation):

    * ``"sdpa"`` — :func:`torch.nn.functional.scaled_dot_product_attention` with shapes that keep the fused
      kernel: no mask (bidirectional), ``is_causal=True`` (square causal, no window/ALiBi), a bool ``[L, S]``
      mask (windows, sinks, KV-cache decoding: an explicit lower-right mask, because ``is_causal`` aligns
      top-left when ``L != S``) or a float ``[1, H, L, S]`` ALiBi bias with ``−inf`` for hidden keys (never
      the 3-D ``[H, L, S]`` form, which falls back to the math kernel). Masks are cached by geometry. The
      ALiBi bias is built in fp32 and handed to SDPA in the query dtype (SDPA requires it), so under bf16 it
      is rounded like the scores; full-length ALiBi needs an ``H·L·S`` bias (windowed ALiBi is banded).
      A window with ``S > 2w + s`` runs *chunked*: query blocks of ``max(32, min(w, 512))`` attend only to
      the sinks plus their key band, so time and memory are linear in the sequence length (set the
      attribute ``chunk_windows = False`` to run one full-size masked call instead).
    * ``"flex"`` — compiled FlexAttention (ALiBi as ``score_mod``, windows as a block-sparse ``mask_mod``).
      On CPU (torch 2.13) FlexAttention has no backward and compilation takes tens of seconds, so it is an
      opt-in for inference and for GPUs, where block sparsity wins for windowed/ALiBi attention at long
      lengths (not measured here: no GPU was available). Dropout is not supported on this path.
    * ``"math"`` — explicit fp32 score matrices (reference path; O(L·S) memory).
    * ``"auto"`` (default) — ``"sdpa"``.

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
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
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
        if rr_window is not None and (isinstance(rr_window, bool) or not isinstance(rr_window, int) or rr_window < 1):
            raise ValueError(f"rerope_window must be an integer >= 1 or None, got {rr_window!r}")
        bad_leak = isinstance(rr_leak, bool) or not isinstance(rr_leak, (int, float)) or not rr_leak > 1
        if rr_leak is not None and bad_leak:
            raise ValueError(f"rerope_leak must be a number > 1 or None, got {rr_leak!r}")
        if rr_leak is not None and rr_window is None:
            raise ValueError("rerope_leak needs rerope_window (Leaky ReRoPE's w)")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
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
        self.rerope_window, self.rerope_leak = rr_window, None if rr_leak is None else float(rr_leak)
        if "rope_scaling" in opts and self.rotary is not None:
            self.rotary.set_scaling(opts["rope_scaling"])

    def rerope_active(self) -> bool:
        """Whether ReRoPE replaces plain RoPE in this call: a RoPE layer at inference with ``rerope_window``."""
        return self.position == "rope" and self.rerope_window is not None and not self.training

    def _logn_factor(self, counts: Tensor) -> Tensor:
        """Log-n query factor from the number of visible keys per query (see the class docstring)."""
        factor = counts.log() / math.log(self.logn_base)  # type: ignore[arg-type]
        return factor.clamp_min(1.0) if self.logn == "posthoc" else factor

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

    def _rerope(self, q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
        """ReRoPE / Leaky ReRoPE over unrotated ``q [B, H, L, D]`` and all ``offset + L`` unrotated keys."""
        window = self.window if self.window_active() else None
        sinks = min(self.sink_tokens, offset + q.shape[2]) if window is not None else 0
        dev = str(q.device)

        def visibility(q_lo: int, q_hi: int, k_hi: int) -> tuple[Tensor | None, Tensor]:
            return _visibility(q_lo, q_hi, 0, 0, k_hi, self.causal, window, sinks, dev)

        return rerope_attention(
            q, k, v, self.rotary, offset, self.rerope_window, self.rerope_leak, self.causal,  # type: ignore[arg-type]
            visibility=visibility if window is not None else None,  # plain causality is handled in the band
            logn=self._logn_factor if self.logn != "none" else None,
            block_size=self.rerope_block,
        )

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, offset: int, q_pos: Tensor | None, k_pos: Tensor | None,
        front: int = 0, start: int = 0,
    ) -> Tensor:
        """``k, v`` hold the keys with token indices ``[0, front) ∪ [start, S)`` (a trimmed cache) — all
        ``S = offset + L`` keys when ``front = start = 0``."""
        L = q.shape[2]
        S = offset + L
        window = self.window if self.window_active() else None
        sinks = min(self.sink_tokens, S) if window is not None else 0
        backend = "sdpa" if self.backend == "auto" else self.backend
        if backend == "flex":
            if front or start:
                raise ValueError("backend='flex' does not support a KVCache with trim_to_window=True")
            return self._flex(q, k, v, offset, window, sinks, q_pos, k_pos)
        if self.chunk_windows and window is not None and 2 * window + sinks < S and L > 1:
            block = max(32, min(window, 512))
            if block < L:
                outs = []
                for a in range(0, L, block):
                    b = min(L, a + block)
                    qa, qb = offset + a, offset + b  # absolute query indices
                    k_lo = max(sinks, qa - window + 1)
                    k_hi = min(S, qb) if self.causal else min(S, qb - 1 + window)
                    outs.append(self._block(
                        q[:, :, a:b], k, v, qa, qb, sinks, k_lo, k_hi, window, sinks, backend,
                        None if q_pos is None else q_pos[:, a:b], k_pos, front, start,
                    ))
                return torch.cat(outs, dim=2)
        return self._block(
            q, k, v, offset, offset + L, front, start, S, window, sinks, backend, q_pos, k_pos, front, start
        )

    def _block(
        self, q: Tensor, k: Tensor, v: Tensor, q_lo: int, q_hi: int, n_sink: int, k_lo: int, k_hi: int,
        window: int | None, sinks: int, backend: str, q_pos: Tensor | None, k_pos: Tensor | None,
        front: int = 0, start: int = 0,
    ) -> Tensor:
        """Queries ``q_lo…q_hi−1`` over keys ``{0…n_sink−1} ∪ {k_lo…k_hi−1}`` (absolute token indices);
        ``k, v`` store the indices ``[0, front) ∪ [start, …)`` (see :meth:`_attend`)."""
        dev = str(q.device)
        if (front or start) and (n_sink > front or k_lo < start):
            raise RuntimeError("the KV cache was trimmed to a different window; use a fresh KVCache")
        if (n_sink, k_lo, k_hi) != (front, start, start - front + k.shape[2]):
            idx = torch.cat((
                torch.arange(n_sink, device=q.device),
                torch.arange(k_lo - start + front, k_hi - start + front, device=q.device),
            ))
            k, v = k.index_select(2, idx), v.index_select(2, idx)
            if k_pos is not None:
                k_pos = k_pos.index_select(1, idx)
        vis, counts = _visibility(q_lo, q_hi, n_sink, k_lo, k_hi, self.causal, window, sinks, dev)
        if self.logn != "none":
            q = (q.float() * self._logn_factor(counts).view(-1, 1)).to(q.dtype)
        plain_causal = self.causal and window is None and n_sink == 0 and q_lo == k_lo == 0 and q_hi == k_hi
        mask: Tensor | None = None
        if self.alibi is not None or self.score_bias is not None:
            if q_pos is None:
                mask = _alibi_mask(q_lo, q_hi, n_sink, k_lo, k_hi, self.causal, window, sinks, self.num_heads, dev)
            else:
                bias_mod = self.alibi if self.alibi is not None else self.score_bias
                bias = bias_mod.from_positions(q_pos, k_pos)  # type: ignore[union-attr]  # [B|1, H, L, S]
                mask = bias.masked_fill(~vis, float("-inf")) if vis is not None else bias
            plain_causal = False
        elif vis is not None and not plain_causal:
            mask = vis
        p = self.dropout if self.training else 0.0
        if backend == "math":
            return self._math(q, k, v, mask, plain_causal and vis is not None, vis, p)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        gqa = self.num_kv_heads != self.num_heads
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=plain_causal and vis is not None, enable_gqa=gqa
        )

    def _math(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, vis: Tensor | None, p: float
    ) -> Tensor:
        """Explicit fp32 score matrices (reference path)."""
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        if is_causal and vis is not None:
            scores = scores.masked_fill(~vis, float("-inf"))
        elif mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        probs = F.dropout(scores.softmax(-1), p=p, training=p > 0)
        return (probs @ v.float()).to(q.dtype)

    def _flex(
        self, q: Tensor, k: Tensor, v: Tensor, offset: int, window: int | None, sinks: int,
        q_pos: Tensor | None, k_pos: Tensor | None,
    ) -> Tensor:
        """Compiled FlexAttention: ALiBi as ``score_mod``, visibility as a block-sparse ``mask_mod``."""
        from torch.nn.attention.flex_attention import create_block_mask

        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise RuntimeError(
                "backend='flex' has no backward on CPU in this torch version; use backend='sdpa' for training "
                "or run under torch.no_grad()"
            )
        L, S = q.shape[2], k.shape[2]
        _, counts = _visibility(offset, offset + L, 0, 0, S, self.causal, window, sinks, str(q.device))
        if self.logn != "none":
            q = (q.float() * self._logn_factor(counts).view(-1, 1)).to(q.dtype)
        causal, w, s = self.causal, window, sinks

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
            i = qi + offset
            vis = (kj <= i) if causal else (kj >= 0)
            if w is not None:
                near = ((i - kj) <= w - 1) if causal else ((i - kj).abs() <= w - 1)
                vis = vis & (near | (kj < s))
            return vis

        score_mod = None
        if self.alibi is not None:
            slopes = self.alibi.slopes.to(q.device)
            B = q.shape[0]
            if q_pos is None:
                qp = torch.arange(offset, offset + L, device=q.device, dtype=torch.float32).expand(B, L)
                kp = torch.arange(S, device=q.device, dtype=torch.float32).expand(B, S)
            else:
                qp, kp = q_pos.float().expand(B, L), k_pos.float().expand(B, S)  # type: ignore[union-attr]

            def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
                dist = qp[b, qi] - kp[b, kj]
                return score - slopes[h] * (dist if causal else dist.abs())

        needs_mask = causal or w is not None
        block_mask = create_block_mask(mask_mod, None, None, L, S, device=str(q.device)) if needs_mask else None
        return _flex_attention()(
            q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=self.num_kv_heads != self.num_heads
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, position={self.position!r}, "
            f"causal={self.causal}, window={self.window}, window_at={self.window_at!r}, "
            f"sink_tokens={self.sink_tokens}, logn={self.logn!r}, logn_base={self.logn_base}, "
            f"rerope_window={self.rerope_window}, rerope_leak={self.rerope_leak}, backend={self.backend!r}"
        )
