"""Counter-based stochastic rounding of fp32 values to bf16 / fp16.

Stochastic rounding (Gupta et al., 2015, "Deep Learning with Limited Numerical Precision", eq. 2) rounds a value
``x`` to one of its two neighbours ``lo <= x <= hi`` in the target format, choosing ``hi`` with probability
``(x - lo) / (hi - lo)``, so that ``E[round(x)] = x``. An optimizer update far below half an ulp of the parameter
(Tiger's relative step ``lr`` of ~1e-3 against bf16's 2**-9) then moves the parameter on average instead of
rounding back to the old value every time (Zamirai et al., 2020, "Revisiting BFloat16 Training").

The random bits come from a *counter-based* hash rather than a stateful generator: the bits of element ``i`` of a
tensor at step ``t`` depend only on ``(stream, t, i)``. Hence every path (the fused C++ kernel, the foreach and
the single-tensor PyTorch paths, any chunking, any thread count) draws the same bits and produces bit-identical
results, and the whole generator state of a tensor is two integers kept in the optimizer state, so a resumed run
continues bit for bit.

Definitions (all arithmetic modulo 2**32):

- ``hash32`` is the "lowbias32" integer hash (C. Wellons, "Prospecting for Hash Functions", 2018):
  ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``. It is a bijection. It makes
  the keys (a few per tensor and step).
- ``bits32`` is its first round with its final shift, ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 16``, also a
  bijection. It makes the per-element bits (one per element and step: the cost that matters).
- ``stream_of(seed, index) = hash32(fold(seed) + index * 0x9E3779B1)`` names the stream of the ``index``-th
  parameter of an optimizer, ``fold(seed) = hash32(seed mod 2**32) ^ (seed >> 32 mod 2**32)``.
- ``step_key(stream, t) = hash32(stream + t * 0x632BE5AB)`` is the key of step ``t`` of a tensor.
- ``bits_i = bits32(key + i * 0x9E3779B1)`` for the flat (row-major) index ``i``; distinct for ``i < 2**32``.
- bf16 parameter (``bits="high"``): ``bits(x) + (bits_i >> 16)`` with the low 16 bits then cleared (finite ``x``;
  NaN/inf pass through).
- bf16 momentum (``bits="low"``): the same with ``bits_i & 0xFFFF``, under the *same* key as the parameter, so a
  bf16 θ and its bf16 momentum share one hash per element (θ takes the high half, m the low half); an fp32 θ's
  bf16 momentum uses the same key and the low half too.
- fp16: ``u = (bits_i >> 8) * 2**-24``; round up iff ``u < (x - lo) / (hi - lo)``; magnitudes beyond fp16's
  largest finite value round to nearest (that is, to inf). An fp16 momentum uses the key
  ``step_key(...) ^ MOMENTUM_SALT`` (a second hash): its 24 bits would overlap θ's.

Why the two halves of one hash may serve two roundings: stochastic rounding needs each 16-bit draw to be uniform
on ``[0, 2**16)`` and the draws of one element's θ and m to be independent. ``bits32`` is a bijection of the
32-bit words and ``key + i * 0x9E3779B1`` visits ``2**32`` distinct words as ``i`` runs, so ``bits_i`` behaves as
a uniform 32-bit word; the high and low halves of a uniform word are independent uniform 16-bit values (each of
the ``2**32`` pairs occurs once).

Why one round per element is enough: what remains is that the words of neighbouring elements, and of one element
at consecutive steps, look independent. The per-step randomness is already in the key, a full lowbias32 hash (its
author measured a bias of about 0.17 on his avalanche scale, among the lowest two-multiply hashes); neighbours
differ by the golden-ratio increment, which the multiply spreads over the high half and the final shift folds into
the low half. A rounding decision only asks whether 16 bits (24 for fp16) fall below a threshold, a much weaker
demand than avalanche. ``tests/optim/test_stochastic_rounding.py`` checks the joint frequencies of θ's and m's
decisions, of neighbouring elements' and of consecutive steps'. Per element, the second multiply of lowbias32 made
stochastic rounding cost about 1.17× round-to-nearest on a bf16 Tiger step, one round about 1.08×
(``benchmarks/optimizer_step.py``, 2 threads): the loop otherwise runs near memory bandwidth.

Roundings of a momentum alone (the folds of Tiger's fold-in-backward mode after the first of a step, the average
of the tight-fisted synchronisation) use keys of their own derived from the step key (``_rounding.sr_fold_key``,
``fold_sync.momentum_sync_key``) with the same momentum rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "MOMENTUM_SALT",
    "bits32",
    "hash32",
    "momentum_round",
    "random_bits",
    "step_key",
    "stochastic_round",
    "stream_of",
]

MASK32 = 0xFFFFFFFF
MOMENTUM_SALT = 0x5BD1E995
_GOLDEN = 0x9E3779B1
_STEP_MUL = 0x632BE5AB
_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def _mulmod32(x: Tensor, c: int) -> Tensor:
    # x in [0, 2**32): split the constant in 16-bit halves so no int64 product overflows (2**48 at most).
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def hash32(x: Tensor | int) -> Tensor | int:
    """The lowbias32 hash of ``x mod 2**32``, elementwise for an int64 tensor (values in ``[0, 2**32)``)."""
    if isinstance(x, int):
        x &= MASK32
        x ^= x >> 16
        x = (x * _M1) & MASK32
        x ^= x >> 15
        x = (x * _M2) & MASK32
        x ^= x >> 16
        return x
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mulmod32(x, _M1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, _M2)
    return x ^ (x >> 16)


def bits32(x: Tensor) -> Tensor:
    """The per-element mixer of ``x mod 2**32`` (one multiply-xorshift round), elementwise for an int64 tensor."""
    x = x & MASK32
    x = _mulmod32(x ^ (x >> 16), _M1)
    return x ^ (x >> 16)


def stream_of(seed: int, index: int) -> int:
    """The fixed stream id of the ``index``-th tensor of an optimizer seeded with ``seed`` (a Python int)."""
    folded = hash32(seed & MASK32) ^ ((seed >> 32) & MASK32)
    return hash32((folded + index * _GOLDEN) & MASK32)


def step_key(stream: Tensor | int, step: Tensor | int) -> Tensor | int:
    """The 32-bit key of step ``step`` of a stream; works on Python ints and on int64 tensors (no host sync)."""
    if isinstance(stream, int) and isinstance(step, int):
        return hash32((stream + (step & MASK32) * _STEP_MUL) & MASK32)
    s = torch.as_tensor(step, dtype=torch.int64) & MASK32
    return hash32((torch.as_tensor(stream, dtype=torch.int64) + _mulmod32(s, _STEP_MUL)) & MASK32)


def random_bits(key: Tensor | int, numel: int, offset: int = 0, device: torch.device | str | None = None) -> Tensor:
    """32 random bits (int64 in ``[0, 2**32)``) for flat indices ``offset .. offset + numel - 1`` under ``key``.

    Args:
        key: the step key (a Python int or an int64 0-d tensor, e.g. on the parameter's device).
        numel: how many elements.
        offset: flat index of the first element (for chunked processing).
        device: where to create the bits (default: the key's device, else CPU).

    Returns:
        int64 tensor ``[numel]``.
    """
    if device is None:
        device = key.device if isinstance(key, Tensor) else "cpu"
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device) & MASK32
    return bits32((_mulmod32(idx, _GOLDEN) + key) & MASK32)


def stochastic_round(x: Tensor, dtype: torch.dtype, key: Tensor | int, offset: int = 0, *,
                     bits: str = "high") -> Tensor:
    """Round ``x`` (float32, any shape) to ``dtype`` with the counter-based rounding defined in the module doc.

    Args:
        x: float32 values; the flat index of ``x.view(-1)[j]`` is ``offset + j``.
        dtype: ``torch.bfloat16`` or ``torch.float16`` (``torch.float32`` returns ``x`` unchanged).
        key: the step key, a Python int or an int64 0-d tensor.
        offset: flat index of ``x``'s first element within the whole tensor.
        bits: which random bits bf16 rounding adds: ``"high"`` (``bits_i >> 16``, a parameter; default) or
            ``"low"`` (``bits_i & 0xFFFF``, a bf16 momentum sharing its parameter's hash). fp16 accepts only
            ``"high"`` (it reads 24 bits, ``bits_i >> 8``).

    Returns:
        A tensor of ``dtype`` and ``x``'s shape whose expectation over keys is ``x`` (for finite ``x`` in range).

    Raises:
        ValueError: if ``x`` is not float32, ``dtype`` is not one of the three floating types above, or ``bits``
            is not ``"high"``/``"low"`` (``"low"`` with fp16).
    """
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if bits not in ("high", "low"):
        raise ValueError(f"bits must be 'high' or 'low', got {bits!r}")
    if dtype == torch.float32:
        return x
    if bits == "low" and dtype != torch.bfloat16:
        raise ValueError(f"bits='low' is defined for torch.bfloat16 only, got dtype {dtype}")
    rand = random_bits(key, x.numel(), offset, x.device).view(x.shape)
    if dtype == torch.bfloat16:
        add = rand & 0xFFFF if bits == "low" else rand >> 16
        raw = x.view(torch.int32)
        rounded = ((raw + add.to(torch.int32)) & -65536).view(torch.float32)
        return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)
    if dtype == torch.float16:
        near = x.to(torch.float16)
        near32 = near.float()
        up = near32 > x
        other = torch.nextafter(near, torch.where(up, -torch.inf, torch.inf).to(torch.float16))
        lo = torch.where(up, other, near)
        hi = torch.where(up, near, other)
        lo32, hi32 = lo.float(), hi.float()
        p = (x - lo32) / (hi32 - lo32)
        u = (rand >> 8).to(torch.float32) * (2.0**-24)
        out = torch.where(u < p, hi, lo)
        # beyond fp16's largest finite value: round to nearest (the neighbour past it is ±inf, and on the
        # negative side (x - lo) / (hi - lo) = inf/inf would be NaN and pick -inf)
        keep = (near32 == x) | ~torch.isfinite(near32) | ~torch.isfinite(x) | (x.abs() > 65504.0)
        return torch.where(keep, near, out)
    raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")


def momentum_round(x: Tensor, dtype: torch.dtype, key: Tensor | int, offset: int = 0) -> Tensor:
    """Round a momentum ``x`` (float32) to ``dtype`` stochastically, under its parameter's step key ``key``.

    bf16: the low half of the parameter's bits (``stochastic_round(..., bits="low")`` with ``key``); fp16:
    ``key ^ MOMENTUM_SALT`` (its own hash); float32: ``x`` unchanged. See the module docstring.

    Args:
        x, dtype, offset: as for :func:`stochastic_round`.
        key: the parameter's step key (unsalted), a Python int or an int64 0-d tensor.

    Returns:
        A tensor of ``dtype`` and ``x``'s shape.
    """
    if dtype == torch.float16:
        return stochastic_round(x, dtype, key ^ MOMENTUM_SALT, offset)
    return stochastic_round(x, dtype, key, offset, bits="low")
