"""Masks and kernels behind :class:`~lightning_tiger.nn.Attention`: which keys each query sees, the ALiBi bias
matrix, the explicit fp32 reference path and compiled FlexAttention.

Indices here are token indices (see :mod:`lightning_tiger.nn.attention`): a call attends queries
``q_lo … q_hi − 1`` over keys ``{0 … n_sink − 1} ∪ {k_lo … k_hi − 1}`` (:class:`Span`), under a
:class:`VisibilityRule` (causality, window, sinks).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .alibi import ALiBi

__all__ = ["Span", "VisibilityRule", "alibi_mask", "flex_attend", "math_attend", "visibility"]

# Masks are cached by geometry (and inference-mode state: an inference-mode tensor may not be saved for a later
# backward). Only masks up to this many entries are cached, so long ALiBi biases are not pinned in memory.
CACHE_MAX_ENTRIES = 2048 * 2048


@dataclass(frozen=True)
class Span:
    """Queries ``q_lo … q_hi − 1`` over keys ``{0 … n_sink − 1} ∪ {k_lo … k_hi − 1}`` (token indices)."""

    q_lo: int
    q_hi: int
    n_sink: int
    k_lo: int
    k_hi: int

    @classmethod
    def full(cls, q_lo: int, q_hi: int, num_keys: int) -> Span:
        """Queries ``q_lo … q_hi − 1`` over every key ``0 … num_keys − 1``."""
        return cls(q_lo, q_hi, 0, 0, num_keys)

    def query_indices(self, device: str | torch.device) -> Tensor:
        return torch.arange(self.q_lo, self.q_hi, device=device)

    def key_indices(self, device: str | torch.device) -> Tensor:
        return torch.cat((torch.arange(self.n_sink, device=device), torch.arange(self.k_lo, self.k_hi, device=device)))

    def cacheable(self) -> bool:
        return (self.q_hi - self.q_lo) * (self.n_sink + self.k_hi - self.k_lo) <= CACHE_MAX_ENTRIES


@dataclass(frozen=True)
class VisibilityRule:
    """Which key ``j`` query ``i`` sees: ``j <= i`` if causal; with a ``window`` also ``i − j <= window − 1``
    (causal) or ``|i − j| <= window − 1`` (bidirectional), except that the first ``sinks`` keys escape the
    window (causality still applies)."""

    causal: bool
    window: int | None
    sinks: int

    def visible(self, qi: Tensor, kj: Tensor) -> Tensor:
        """Bool visibility of keys ``kj`` to queries ``qi`` (broadcasting; also traced by FlexAttention)."""
        vis = (kj <= qi) if self.causal else (kj >= 0)
        if self.window is not None:
            near = ((qi - kj) <= self.window - 1) if self.causal else ((qi - kj).abs() <= self.window - 1)
            vis = vis & (near | (kj < self.sinks))
        return vis


def visibility(span: Span, rule: VisibilityRule, device: str) -> tuple[Tensor | None, Tensor]:
    """Visibility of ``span`` under ``rule``.

    Returns:
        ``(mask, counts)``: a bool ``[L, S]`` mask (None when every key is visible) and the fp32 number of keys
        each query sees ``[L]`` (log-n's ``n``; the span always contains all visible keys). Small masks are
        cached by geometry, so repeated calls (layers, steps) never rebuild them.
    """
    if span.cacheable():
        return _visibility_cached(span, rule, device, torch.is_inference_mode_enabled())
    return _visibility(span, rule, device)


def alibi_mask(span: Span, rule: VisibilityRule, num_heads: int, device: str) -> Tensor:
    """fp32 ``[1, H, L, S]`` ALiBi bias by token index with ``−inf`` where a key is invisible (cached like
    :func:`visibility`)."""
    if span.cacheable():
        return _alibi_mask_cached(span, rule, num_heads, device, torch.is_inference_mode_enabled())
    return _alibi_mask(span, rule, num_heads, device)


@functools.lru_cache(maxsize=256)
def _visibility_cached(span: Span, rule: VisibilityRule, device: str, inference: bool) -> tuple[Tensor | None, Tensor]:
    return _visibility(span, rule, device)


@functools.lru_cache(maxsize=32)
def _alibi_mask_cached(span: Span, rule: VisibilityRule, num_heads: int, device: str, inference: bool) -> Tensor:
    return _alibi_mask(span, rule, num_heads, device)


def _visibility(span: Span, rule: VisibilityRule, device: str) -> tuple[Tensor | None, Tensor]:
    vis = rule.visible(span.query_indices(device).unsqueeze(1), span.key_indices(device).unsqueeze(0))
    counts = vis.sum(-1).float()
    return (None if bool(vis.all()) else vis), counts


def _alibi_mask(span: Span, rule: VisibilityRule, num_heads: int, device: str) -> Tensor:
    alibi = ALiBi(num_heads, causal=rule.causal).to(device)
    bias = alibi.from_positions(span.query_indices(device), span.key_indices(device))
    vis, _ = visibility(span, rule, device)
    if vis is not None:
        bias = bias.masked_fill(~vis, float("-inf"))
    return bias.unsqueeze(0).contiguous()


def math_attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float) -> Tensor:
    """Explicit fp32 score matrices (the reference path; O(L·S) memory).

    Args:
        q: ``[B, H, L, D]``.
        k: ``[B, H_kv, S, D]`` (``H_kv`` divides ``H``: grouped-query attention).
        v: like ``k``.
        mask: bool ``[L, S]`` visibility or a float bias broadcastable to ``[B, H, L, S]`` (``−inf`` hides a key).
        p: dropout probability of the attention weights (0 outside training).

    Returns:
        ``[B, H, L, D]`` in ``q``'s dtype.
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = F.dropout(scores.softmax(-1), p=p, training=p > 0)
    return (probs @ v.float()).to(q.dtype)


_compiled_flex: Any = None


def _flex_attention() -> Any:
    """FlexAttention compiled once per process (eager FlexAttention is an unfused O(L·S)-memory fallback)."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_attend(
    q: Tensor, k: Tensor, v: Tensor, offset: int, rule: VisibilityRule, slopes: Tensor | None,
    q_pos: Tensor | None, k_pos: Tensor | None,
) -> Tensor:
    """Compiled FlexAttention: ALiBi as ``score_mod``, visibility as a block-sparse ``mask_mod``.

    Args:
        q: ``[B, H, L, D]``, queries ``offset … offset + L − 1`` (log-n scaling already applied).
        k: ``[B, H_kv, S, D]``, every key ``0 … S − 1``.
        v: like ``k``.
        offset: token index of the first query.
        rule: the visibility rule.
        slopes: ALiBi's per-head slopes ``[H]``, or None (no bias).
        q_pos: ``[B|1, L]`` explicit query positions for ALiBi, or None (positions = indices).
        k_pos: ``[B|1, S]`` key positions, given with ``q_pos``.

    Returns:
        ``[B, H, L, D]``.
    """
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError(
            "backend='flex' has no backward on CPU in this torch version; use backend='sdpa' for training "
            "or run under torch.no_grad()"
        )
    L, S = q.shape[2], k.shape[2]

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        return rule.visible(qi + offset, kj)

    score_mod = None
    if slopes is not None:
        slopes = slopes.to(q.device)
        B, causal = q.shape[0], rule.causal
        if q_pos is None:
            qp = torch.arange(offset, offset + L, device=q.device, dtype=torch.float32).expand(B, L)
            kp = torch.arange(S, device=q.device, dtype=torch.float32).expand(B, S)
        else:
            qp, kp = q_pos.float().expand(B, L), k_pos.float().expand(B, S)  # type: ignore[union-attr]

        def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
            dist = qp[b, qi] - kp[b, kj]
            return score - slopes[h] * (dist if causal else dist.abs())

    needs_mask = rule.causal or rule.window is not None
    block_mask = create_block_mask(mask_mod, None, None, L, S, device=str(q.device)) if needs_mask else None
    return _flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
