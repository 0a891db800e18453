"""ReRoPE and Leaky ReRoPE: RoPE with the relative position clipped (or slowed down) beyond a window at inference.

Su, "Transformer升级之路：12、无限外推的ReRoPE？" (kexue.fm/archives/9708; reference patches in bojone/rerope).
A model trained with plain RoPE sees relative positions ``r = i − j`` in ``[0, L_train)`` only. At inference
ReRoPE replaces ``r`` by ``min(r, w)`` and Leaky ReRoPE by ``r`` for ``r < w`` and ``w + (r − w)/k`` beyond
(``k > 1``; ReRoPE is ``k → ∞``), so no relative position ever leaves the trained range when ``w < L_train``.
RoPE scores depend on ``r`` through rotations, so the clipped scores need a second score matrix:

* ``|r| < w`` (the band): ``s1_ij = ⟨R_i q_i, R_j k_j⟩`` — plain RoPE;
* ``r ≥ w``, ReRoPE: ``s2_ij = ⟨R_w q_i, k_j⟩`` (queries rotated at the fixed position ``w``, keys unrotated:
  relative position ``w`` for every pair); Leaky: ``s2_ij = ⟨R_{(i + w(k−1))/k} q_i, R_{j/k} k_j⟩``
  (relative position ``(i − j + w(k − 1))/k = w + (r − w)/k``);
* bidirectional attention also has ``r ≤ −w``: ReRoPE ``⟨R_{−w} q_i, k_j⟩``, Leaky
  ``⟨R_{(i − w(k−1))/k} q_i, R_{j/k} k_j⟩`` (relative position ``−w + (r + w)/k``).

The softmax runs over the merged scores. This is not one fused SDPA call. :func:`rerope_attention` computes
it in query blocks of ``block_size`` rows, so nothing of size ``[L, S]`` is ever built, let alone two: for
the block of queries ``[a, b)`` the far scores are one matmul of the block's far-rotated queries with the
keys ``[0, b − w)`` (and ``[a + w, S)`` when bidirectional), the near scores one matmul with the key band
``[a − w + 1, b + w − 1)`` only (``block + 2w`` keys), and the band entries with ``|r| < w`` replace the far
ones. Memory is ``O(block · S)``; work is one matmul pair per block, about plain (unfused) attention plus the
band. Log-n (SPEC §3.3, kexue.fm/archives/8823) composes: it scales each query row before both branches.

KV cache: a ReRoPE layer caches its keys *unrotated* (:class:`~lightning_tiger.nn.KVCache` keeps them in the
layer's slot and refuses to mix them with rotated ones). Each call rotates only the key band of its queries
at their positions (``≤ L + w`` keys) for the near scores; the far scores use the raw keys (ReRoPE) or all
keys rotated at ``j/k`` (Leaky: ``O(S·d)`` per call, the same order as the scores themselves).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .rotary import RotaryEmbedding

__all__ = ["rerope_attention", "rerope_relative_position"]


def rerope_relative_position(r: Tensor, window: int, leak: float | None = None) -> Tensor:
    """The relative position ReRoPE / Leaky ReRoPE use instead of ``r = i − j`` (elementwise, float).

    ``r`` for ``|r| < w``; beyond, ``sign(r)·w`` (ReRoPE, ``leak=None``) or ``sign(r)·(w + (|r| − w)/k)``
    (Leaky ReRoPE, ``leak = k > 1``).

    Args:
        r: relative positions (any shape).
        window: ``w >= 1``.
        leak: ``k > 1`` or ``None``.

    Returns:
        float64 tensor of ``r``'s shape.
    """
    r = r.double()
    beyond = r.sign() * (window if leak is None else window + (r.abs() - window) / leak)
    return torch.where(r.abs() < window, r, beyond)


def _rotate(rotary: RotaryEmbedding, x: Tensor, positions: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, d]`` (SDPA layout) at ``positions [T]`` or ``[1]`` (broadcast); fp32 result."""
    cos, sin = rotary.cos_sin(positions)
    return rotary.rotate(x.transpose(1, 2), cos, sin).transpose(1, 2)


def rerope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rotary: RotaryEmbedding,
    offset: int,
    window: int,
    leak: float | None = None,
    causal: bool = True,
    visibility: Callable[[int, int, int], tuple[Tensor | None, Tensor]] | None = None,
    logn: Callable[[Tensor], Tensor] | None = None,
    block_size: int = 64,
) -> Tensor:
    """Attention with ReRoPE / Leaky ReRoPE scores (see the module docstring), in query blocks.

    Args:
        q: *unrotated* queries ``[B, H, L, d]`` with token indices ``offset … offset + L − 1``.
        k: *unrotated* keys ``[B, H_kv, S, d]``, token indices ``0 … S − 1`` (``S = offset + L``).
        v: values ``[B, H_kv, S, d_v]``.
        rotary: the layer's :class:`RotaryEmbedding` (frequencies and pair layout).
        offset: index of the first query (number of cached tokens).
        window: ``w >= 1``: relative positions ``|r| < w`` keep plain RoPE.
        leak: ``k > 1`` for Leaky ReRoPE, ``None`` for ReRoPE.
        causal: causal (``j <= i``) or bidirectional.
        visibility: ``(q_lo, q_hi, k_hi) -> (mask, counts)``: a bool ``[q_hi − q_lo, k_hi]`` mask of the visible
            keys ``0 … k_hi − 1`` (``None``: all visible; causality must be included) and the fp32 number of
            visible keys per query. Default: causal or full visibility.
        logn: ``counts -> factor`` per query row (log-n scaling), or ``None``.
        block_size: query rows per block (memory ``O(block_size · S)``).

    Returns:
        ``[B, H, L, d_v]`` in ``q``'s dtype.
    """
    B, H, L, D = q.shape
    S = k.shape[2]
    if offset + L != S:
        raise ValueError(f"k must hold offset + L = {offset + L} keys, got {S}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if leak is not None and not leak > 1:
        raise ValueError(f"leak must be > 1 or None, got {leak}")
    rep = H // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    dev = q.device
    w = window
    kf = k.float()
    vf = v.float()
    if leak is not None:  # far keys at j/k (all of them: each call, O(S·d))
        k_far = _rotate(rotary, kf, torch.arange(S, device=dev, dtype=torch.float64) / leak)
    else:  # far keys unrotated
        k_far = kf
    scale = 1.0 / math.sqrt(D)
    outs = []
    for a in range(0, L, block_size):
        b = min(L, a + block_size)
        qa, qb = offset + a, offset + b  # absolute query indices
        k_hi = qb if causal else S
        if visibility is not None:
            vis, counts = visibility(qa, qb, k_hi)
        else:
            vis = None
            idx = torch.arange(qa, qb, device=dev)
            counts = (idx + 1).float() if causal else torch.full((b - a,), float(S), device=dev)
            if causal and b - a > 1:
                vis = torch.arange(k_hi, device=dev)[None] <= idx[:, None]
        qblk = q[:, :, a:b].float() * scale
        if logn is not None:
            qblk = qblk * logn(counts).view(-1, 1)
        i = torch.arange(qa, qb, device=dev, dtype=torch.float64)
        scores = torch.empty(B, H, b - a, k_hi, device=dev, dtype=torch.float32)
        # far keys behind (r >= w): [0, qb − w)
        n_left = max(0, qb - w)
        if n_left:
            pos = (i + w * (leak - 1)) / leak if leak is not None else torch.full((1,), float(w), device=dev)
            scores[..., :n_left] = _rotate(rotary, qblk, pos) @ k_far[:, :, :n_left].transpose(-1, -2)
        # far keys ahead (r <= −w, bidirectional): [qa + w, S)
        n_right = min(k_hi, qa + w)
        if not causal and n_right < k_hi:
            pos = (i - w * (leak - 1)) / leak if leak is not None else torch.full((1,), float(-w), device=dev)
            right = _rotate(rotary, qblk, pos) @ k_far[:, :, n_right:k_hi].transpose(-1, -2)
            overlap = n_left - n_right  # blocks longer than 2w: keys behind some queries, ahead of others
            if overlap > 0:
                r = torch.arange(qa, qb, device=dev)[:, None] - torch.arange(n_right, n_left, device=dev)[None]
                scores[..., n_right:n_left] = torch.where(r > 0, scores[..., n_right:n_left], right[..., :overlap])
                scores[..., n_left:] = right[..., overlap:]
            else:
                scores[..., n_right:] = right
        # the band |r| < w with plain RoPE (only keys [lo, hi) can be that close to a query of the block)
        lo, hi = max(0, qa - w + 1), min(k_hi, qb + w - 1)
        q_near = _rotate(rotary, qblk, i)
        k_near = _rotate(rotary, kf[:, :, lo:hi], torch.arange(lo, hi, device=dev, dtype=torch.float64))
        near_scores = q_near @ k_near.transpose(-1, -2)
        r = torch.arange(qa, qb, device=dev)[:, None] - torch.arange(lo, hi, device=dev)[None]
        # band entries not covered by a far range are all |r| < w, so `where` never reads uninitialised ones
        scores[..., lo:hi] = torch.where(r.abs() < w, near_scores, scores[..., lo:hi])
        if vis is not None:
            scores.masked_fill_(~vis, float("-inf"))
        outs.append(scores.softmax(-1) @ vf[:, :, :k_hi])
    return torch.cat(outs, dim=2).to(q.dtype)
