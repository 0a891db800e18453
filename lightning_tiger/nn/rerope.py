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

The softmax runs over the merged scores; :func:`rerope_attention` computes it in query blocks, so no ``[L, S]``
score matrix is built (how: ``docs`` page "ReRoPE in blocks"). A ReRoPE layer's KV cache holds unrotated keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..validation import check_int, check_real
from .rotary import RotaryEmbedding

__all__ = ["rerope_attention"]

#: scores per tile (batch chunk × query block × keys) of :func:`rerope_attention`: 2^19 fp32 = 2 MiB.
TILE_SCORES = 1 << 19


def _rotate(rotary: RotaryEmbedding, x: Tensor, positions: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, d]`` (SDPA layout) at ``positions [T]`` or ``[1]`` (broadcast); contiguous fp32."""
    cos, sin = rotary.cos_sin(positions)
    # contiguous once here, or every per-block matmul of a slice copies it again
    return rotary.rotate(x.transpose(1, 2), cos, sin).transpose(1, 2).contiguous()


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
    block_size: int = 32,
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
        block_size: query rows per block; batch rows are processed in chunks so that a tile of scores holds
            about ``TILE_SCORES`` entries (memory ``O(max(TILE_SCORES, H · block_size · S))``).

    Returns:
        ``[B, H, L, d_v]`` in ``q``'s dtype.
    """
    _, H, L, D = q.shape
    S = k.shape[2]
    if offset + L != S:
        raise ValueError(f"k must hold offset + L = {offset + L} keys, got {S}")
    window = check_int("window", window, low=1)
    leak = check_real("leak", leak, low=1.0, low_open=True, allow_none=True)
    if q.shape[0] == 0 or L == 0:  # nothing to attend (and no tile size to divide by): as plain attention does
        return q.new_zeros(q.shape[0], H, L, v.shape[-1])
    G = k.shape[1]  # key/value heads; query head h uses key head h // rep (grouped-query attention)
    rep = H // G
    dev, w = q.device, window

    def grouped(x: Tensor) -> Tensor:
        """Rotated queries ``[B, H, L, D]`` -> ``[B, G, rep, L, D]`` (a view)."""
        return x.view(x.shape[0], G, rep, L, D)

    def scores_of(qs: Tensor, ks: Tensor) -> Tensor:
        """``qs [Bc, G, rep, Lb, D]`` against ``ks [Bc, G, T, D]`` -> ``[Bc, G, rep, Lb, T]``: one matmul per key
        head for all its query heads, so keys are never repeated per query head."""
        Bc, _, _, Lb, _ = qs.shape
        return (qs.reshape(Bc, G, rep * Lb, D) @ ks.transpose(-1, -2)).view(Bc, G, rep, Lb, -1)

    f64 = dict(device=dev, dtype=torch.float64)
    vf = v.float().contiguous()
    qf = q.float() * (1.0 / math.sqrt(D))
    # Everything rotated once per call: near queries at i; near keys only where some query's band reaches
    # (indices >= offset − w + 1: the whole sequence for a full forward, the last w − 1 + L when decoding).
    i_all = torch.arange(offset, S, **f64)
    q_near = grouped(_rotate(rotary, qf, i_all))
    band_lo = max(0, offset - w + 1)
    k_near = _rotate(rotary, k[:, :, band_lo:].float(), torch.arange(band_lo, S, **f64))
    if leak is None:  # far: queries at ±w, keys unrotated
        k_far = k.float().contiguous()
        q_left = grouped(_rotate(rotary, qf, torch.full((1,), float(w), **f64)))
        q_right = grouped(_rotate(rotary, qf, torch.full((1,), float(-w), **f64))) if not causal else None
    else:  # far: queries at (i ± w(k − 1))/k, keys at j/k
        k_far = _rotate(rotary, k.float(), torch.arange(S, **f64) / leak)
        q_left = grouped(_rotate(rotary, qf, (i_all + w * (leak - 1)) / leak))
        q_right = grouped(_rotate(rotary, qf, (i_all - w * (leak - 1)) / leak)) if not causal else None
    # Tiles of about 2^19 scores (2 MiB): a batch chunk × a query block whose scores, softmax and value product
    # stay in cache. Streaming all batch rows per block through memory made this path 1.3–1.5× slower on a
    # loaded machine (benchmarks/rerope.py); the loop costs a few dozen iterations at 8L.
    n_batch = q.shape[0]
    chunk = max(1, min(n_batch, TILE_SCORES // (H * block_size * S)))
    chunks = []
    for c0 in range(0, n_batch, chunk):
        c1 = min(n_batch, c0 + chunk)
        outs = []
        for a in range(0, L, block_size):
            b = min(L, a + block_size)
            qa, qb = offset + a, offset + b  # absolute query indices
            k_hi = qb if causal else S
            vis, counts = visibility(qa, qb, k_hi) if visibility is not None else (None, None)
            ql, qn = q_left[c0:c1, :, :, a:b], q_near[c0:c1, :, :, a:b]
            qr = q_right[c0:c1, :, :, a:b] if q_right is not None else None
            if logn is not None:  # log-n scales each query row, in both branches (rotations are linear)
                if counts is None:
                    idx = torch.arange(qa, qb, device=dev)
                    counts = (idx + 1).float() if causal else torch.full((b - a,), float(S), device=dev)
                c = logn(counts).view(-1, 1)
                ql, qn, qr = ql * c, qn * c, (qr * c if qr is not None else None)
            # far scores (r >= w) for every key up to k_hi — one matmul, the bulk of the work; the band and the
            # keys ahead are patched in place below
            scores = scores_of(ql, k_far[c0:c1, :, :k_hi])  # [Bc, G, rep, Lb, k_hi]
            n_right = min(k_hi, qa + w)  # bidirectional: keys >= qa + w can be w or more ahead
            if qr is not None and n_right < k_hi:
                right = scores_of(qr, k_far[c0:c1, :, n_right:k_hi])
                r = torch.arange(qa, qb, device=dev)[:, None] - torch.arange(n_right, k_hi, device=dev)[None]
                scores[..., n_right:] = torch.where(r < 0, right, scores[..., n_right:])
            # the band: only keys [lo, hi) can be within w of a query of the block; |r| < w there gets plain RoPE
            lo, hi = max(0, qa - w + 1), min(k_hi, qb + w - 1)
            near = scores_of(qn, k_near[c0:c1, :, lo - band_lo : hi - band_lo])
            r = torch.arange(qa, qb, device=dev)[:, None] - torch.arange(lo, hi, device=dev)[None]
            if causal and visibility is None:  # the only hidden keys of plain causal attention lie in the band
                near.masked_fill_(r < 0, float("-inf"))
            scores[..., lo:hi] = torch.where(r < w if causal else r.abs() < w, near, scores[..., lo:hi])
            if vis is not None:
                scores = scores.masked_fill(~vis, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            Bc, Lb = probs.shape[0], b - a
            out = probs.view(Bc, G, rep * Lb, k_hi) @ vf[c0:c1, :, :k_hi]  # [Bc, G, rep·Lb, d_v]
            outs.append(out.view(Bc, G, rep, Lb, -1))
        chunks.append(torch.cat(outs, dim=3))
    return torch.cat(chunks, dim=0).reshape(q.shape[0], H, L, -1).to(q.dtype)
