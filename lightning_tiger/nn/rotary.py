"""Rotary position embedding (RoPE) with the context-extension variants of HF transformers.

Layout: queries/keys are ``[batch, seq, heads, head_dim]`` everywhere in ``lightning_tiger.nn`` (the layout a
fused ``qkv`` projection produces; :class:`~lightning_tiger.nn.Attention` transposes to SDPA's
``[batch, heads, seq, head_dim]`` afterwards). Formulas: RoFormer (Su et al. 2021, §3.2); scaling
variants follow ``transformers.modeling_rope_utils`` (names and formulas), see :class:`RotaryEmbedding`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..validation import check_int, check_real

__all__ = ["RotaryEmbedding"]

_SCALING_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3")


def _float_dtype_for(x: Tensor) -> torch.dtype:
    """fp32 for half types (one rounding at the end), the input dtype for fp32/fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # HF `get_mscale`: 0.1 * mscale * ln(scale) + 1 for scale > 1.
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(nn.Module):
    r"""Rotary position embedding (RoPE), applied to queries and keys.

    For a pair ``(x_{2k}, x_{2k+1})`` (interleaved layout) or ``(x_k, x_{k+d/2})`` (half-split / GPT-NeoX /
    HF ``rotate_half`` layout) at position ``p`` the rotation is

    .. math:: (x_a, x_b) \mapsto (x_a\cos p\theta_k - x_b\sin p\theta_k,\; x_a\sin p\theta_k + x_b\cos p\theta_k),
              \qquad \theta_k = \text{base}^{-2k/d}

    so that ``<R_m q, R_n k>`` depends on ``n - m`` only (Su et al. 2021, §3.2). The two layouts differ by a fixed
    permutation of the head dimension; pick the one your checkpoint was trained with.

    Precision: angles are computed with autocast disabled, as ``p·θ_k`` in fp64 (fp64 ``θ_k``)
    reduced modulo 2π and then rounded to fp32, so positions ~1e5 keep ~1e-7 angle accuracy, where fp32
    ``p`` and ``θ_k`` (HF's way) are off by up to ~6e-3 rad there; MPS, which lacks fp64, uses fp32. The
    tables are ``[L, d/2]`` so the fp64 step costs nothing next to attention. ``inv_freq`` is a
    non-persistent fp32 mirror buffer; both are recomputed after every ``module.to(...)`` / ``.half()`` /
    Lightning ``precision="bf16-true"``, so they never become bf16. The rotation of a half-precision input
    is computed in fp32 and rounded once to the input dtype.

    Scaling variants (``scaling`` dict; key ``"type"`` or HF's ``"rope_type"``; ``k = factor``,
    ``d = head_dim``, ``L0 = original_max_position_embeddings``, default ``max_seq_len``):

    * ``{"type": "linear", "factor": k}`` — position interpolation (Chen et al. 2023): ``θ_k / k``.
    * ``{"type": "ntk", "factor": k}`` — static NTK-aware scaling (bloc97): base' = ``base·k^(d/(d−2))``.
    * ``{"type": "dynamic", "factor": k, "original_max_position_embeddings": L0}`` — HF dynamic NTK: for
      a call whose largest position + 1 is ``L > L0``, base' = ``base·(k·L/L0 − (k − 1))^(d/(d−2))``; for
      ``L <= L0`` the unscaled frequencies.
    * ``{"type": "yarn", "factor": k, "original_max_position_embeddings": L0, "beta_fast": 32,
      "beta_slow": 1, "attention_factor": None, "mscale": None, "mscale_all_dim": None, "truncate": True}``
      — YaRN (Peng et al. 2023), HF ``_compute_yarn_parameters``: with the correction dimension
      ``c(r) = d·ln(L0/(2πr)) / (2 ln base)``, ``low = floor(c(beta_fast))``, ``high = ceil(c(beta_slow))``
      (clamped to ``[0, d−1]``), ramp ``γ_k = clamp((k − low)/(high − low), 0, 1)`` and
      ``θ_k = θ_k/k · γ_k + θ_k · (1 − γ_k)``; cos and sin are multiplied by the attention factor
      ``0.1·ln k + 1`` (so scores scale by its square, as in HF).
    * ``{"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
      "original_max_position_embeddings": 8192}`` — Llama 3.1: with wavelength ``λ_k = 2π/θ_k``,
      ``θ_k/k`` for ``λ_k > L0/low``, ``θ_k`` for ``λ_k < L0/high``, otherwise the blend
      ``(1 − s)·θ_k/k + s·θ_k`` with ``s = (L0/λ_k − low)/(high − low)``.

    Args:
        head_dim: size ``d`` of the rotated dimension; even, >= 2.
        base: frequency base (default 10000).
        interleaved: ``True`` rotates pairs ``(2k, 2k+1)`` (RoFormer, GPT-J, the notes; default);
            ``False`` rotates ``(k, k + d/2)`` (GPT-NeoX, Llama/HF ``rotate_half``).
        scaling: one of the dicts above, or ``None``.
        max_seq_len: default ``original_max_position_embeddings`` of the scaling variants; not a limit.

    Shapes:
        ``forward(q [B, L, H, d], k [B, L, H_kv, d], positions [L] | [B, L] | None, offset)`` returns the
        rotated ``(q, k)`` in their input dtypes. ``positions`` may be integers or floats (random / fractional
        positions, Su's "Transformer升级之路：8"); default ``offset, ..., offset + L − 1``.
    """

    inv_freq: Tensor

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        interleaved: bool = True,
        scaling: dict[str, Any] | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        head_dim = check_int("head_dim", head_dim, low=2)
        if head_dim % 2:
            raise ValueError(f"head_dim must be an even int in [2, inf), got {head_dim}")
        base = check_real("base", base, low=1.0, low_open=True)
        max_seq_len = check_int("max_seq_len", max_seq_len, low=1, allow_none=True)
        self.head_dim = head_dim
        self.base = float(base)
        self.interleaved = bool(interleaved)
        self.max_seq_len = max_seq_len
        self.scaling: dict[str, Any] | None = None
        self.attention_factor = 1.0
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
        self._cache: tuple[tuple, Tensor, Tensor] | None = None
        self.set_scaling(scaling)

    # ------------------------------------------------------------------ frequencies
    def set_scaling(self, scaling: dict[str, Any] | None) -> None:
        """Change the context-extension variant at any time (no retraining; e.g. NTK at evaluation).

        Args:
            scaling: a dict as documented on the class, or ``None`` for plain RoPE.
        """
        self.scaling = self._validate_scaling(scaling)
        self.attention_factor = self._attention_factor()
        self._cache = None
        self._refresh(self.inv_freq.device)

    def _refresh(self, device: torch.device) -> None:
        # fp64 frequencies drive the angles (exact to ~1e-16 relative, so positions ~1e5 stay accurate);
        # the fp32 buffer mirrors them for inspection and for code that reads `inv_freq` like HF's.
        with torch.no_grad():
            inv64 = self._compute_inv_freq(device).to(device)  # meta stays meta (computed on the CPU)
            self._inv_freq64 = inv64 if inv64.device.type != "mps" else inv64.float()
            self.inv_freq = inv64.float()

    def _validate_scaling(self, scaling: dict[str, Any] | None) -> dict[str, Any] | None:
        if scaling is None:
            return None
        if not isinstance(scaling, dict):
            raise TypeError(f"scaling must be a dict or None, got {type(scaling).__name__}")
        s = dict(scaling)
        kind = s.pop("type", None) or s.pop("rope_type", None)
        s.pop("rope_type", None)
        if kind in (None, "default"):
            return None
        if kind not in _SCALING_TYPES:
            raise ValueError(f"scaling['type'] must be one of {_SCALING_TYPES}, got {kind!r}")
        factor = float(s.get("factor", 8.0 if kind == "llama3" else 0.0))
        if not factor >= 1.0:
            raise ValueError(f"scaling['factor'] must be >= 1 for {kind!r}, got {s.get('factor')!r}")
        s["factor"] = factor
        if kind in ("dynamic", "yarn", "llama3"):
            l0 = s.get("original_max_position_embeddings", self.max_seq_len)
            if l0 is None and kind == "llama3":
                l0 = 8192
            if l0 is None or int(l0) < 1:
                raise ValueError(
                    f"scaling type {kind!r} needs scaling['original_max_position_embeddings'] >= 1 "
                    f"(or max_seq_len), got {l0!r}"
                )
            s["original_max_position_embeddings"] = int(l0)
        if kind == "llama3":
            s.setdefault("low_freq_factor", 1.0)
            s.setdefault("high_freq_factor", 4.0)
            if not s["high_freq_factor"] > s["low_freq_factor"] > 0:
                raise ValueError(
                    "scaling needs high_freq_factor > low_freq_factor > 0, got "
                    f"{s['high_freq_factor']!r}, {s['low_freq_factor']!r}"
                )
        s["type"] = kind
        return s

    def _attention_factor(self) -> float:
        s = self.scaling
        if s is None or s["type"] != "yarn":
            return 1.0
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        k = s["factor"]
        if s.get("mscale") and s.get("mscale_all_dim"):
            return _yarn_mscale(k, s["mscale"]) / _yarn_mscale(k, s["mscale_all_dim"])
        return _yarn_mscale(k)

    def _base_inv_freq(self, base: float, device: torch.device | None) -> Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
        return 1.0 / base**exponent

    def _compute_inv_freq(self, device: torch.device | None, seq_len: int | None = None) -> Tensor:
        """fp64 ``θ_k`` of the configured variant (``seq_len`` only matters for ``"dynamic"``)."""
        d, s = self.head_dim, self.scaling
        if device is not None and torch.device(device).type == "meta":
            device = None
        if s is None:
            return self._base_inv_freq(self.base, device)
        kind, k = s["type"], s["factor"]
        if kind == "linear":
            return self._base_inv_freq(self.base, device) / k
        if kind == "ntk":
            return self._base_inv_freq(self.base * k ** (d / (d - 2)), device)
        if kind == "dynamic":
            l0 = s["original_max_position_embeddings"]
            length = max(int(seq_len or 0), l0)
            base = self.base * ((k * length / l0) - (k - 1)) ** (d / (d - 2))
            return self._base_inv_freq(base, device)
        inv = self._base_inv_freq(self.base, device)
        l0 = s["original_max_position_embeddings"]
        if kind == "yarn":
            beta_fast = s.get("beta_fast") or 32.0
            beta_slow = s.get("beta_slow") or 1.0

            def corr_dim(rot: float) -> float:
                return (d * math.log(l0 / (rot * 2 * math.pi))) / (2 * math.log(self.base))

            low, high = corr_dim(beta_fast), corr_dim(beta_slow)
            if s.get("truncate", True):
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, d - 1)
            if low == high:
                high += 0.001
            ramp = (torch.arange(d // 2, dtype=torch.float64, device=device) - low) / (high - low)
            ramp = ramp.clamp(0, 1)
            extrapolation = 1.0 - ramp
            return (inv / k) * (1 - extrapolation) + inv * extrapolation
        # llama3
        low_f, high_f = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > l0 / low_f, inv / k, inv)
        smooth = (l0 / wavelen - low_f) / (high_f - low_f)
        smoothed = (1 - smooth) * out / k + smooth * out
        medium = (wavelen >= l0 / high_f) & (wavelen <= l0 / low_f)
        return torch.where(medium, smoothed, out)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryEmbedding:
        # `module.to(torch.bfloat16)` / Lightning "bf16-true" cast every floating buffer: recompute ours
        # (fp64 source, fp32 buffer) on the (possibly new) device instead of keeping a rounded copy.
        super()._apply(fn, recurse)
        self._cache = None
        self._refresh(self.inv_freq.device)
        return self

    # ------------------------------------------------------------------ angles
    def cos_sin(
        self, positions: Tensor | None = None, seq_len: int | None = None, offset: int = 0,
        device: torch.device | None = None,
    ) -> tuple[Tensor, Tensor]:
        """fp32 cos/sin tables of the angles ``p·θ_k`` (times the YaRN attention factor).

        Args:
            positions: ``[L]`` or ``[B, L]`` int/float positions, or ``None`` for ``offset + arange(seq_len)``.
            seq_len: number of positions when ``positions`` is None.
            offset: first position when ``positions`` is None.
            device: device of the tables when ``positions`` is None (default: the buffer's).

        Returns:
            ``(cos, sin)``, each ``[L, d/2]`` or ``[B, L, d/2]``, fp32.
        """
        device = positions.device if positions is not None else (device or self.inv_freq.device)
        key = None
        if positions is None:
            if seq_len is None:
                raise ValueError("seq_len is required when positions is None")
            # inference-mode tables may not be saved for a later backward: keep them apart
            key = (int(offset), int(seq_len), str(device), torch.is_inference_mode_enabled())
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1], self._cache[2]
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            use64 = torch.device(device).type != "mps"
            wide = torch.float64 if use64 else torch.float32
            if positions is None:
                pos = torch.arange(offset, offset + seq_len, device=device, dtype=wide)
                max_len = offset + seq_len
            else:
                if positions.dtype == torch.bool or positions.is_complex():
                    raise TypeError(f"positions must be an int or float tensor, got {positions.dtype}")
                if positions.dim() not in (1, 2):
                    raise ValueError(f"positions must be [seq] or [batch, seq], got shape {tuple(positions.shape)}")
                pos = positions.detach().to(wide)
                max_len = int(pos.max().item()) + 1 if (self._is_dynamic() and pos.numel()) else 0
            inv = self._inv_freq64
            if self._is_dynamic():
                inv = self._compute_inv_freq(device, seq_len=max_len)
            angles = pos.unsqueeze(-1) * inv.to(device=device, dtype=wide)
            if use64:
                angles = torch.remainder(angles, 2 * math.pi)
            angles = angles.float()
            cos, sin = angles.cos(), angles.sin()
            if self.attention_factor != 1.0:
                cos, sin = cos * self.attention_factor, sin * self.attention_factor
        if key is not None:
            self._cache = (key, cos, sin)
        return cos, sin

    def _is_dynamic(self) -> bool:
        return self.scaling is not None and self.scaling["type"] == "dynamic"

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate ``x [B, L, H, d]`` by tables ``cos, sin [L, d/2]`` or ``[B, L, d/2]``; returns x's dtype."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"last dim of the input must be head_dim={self.head_dim}, got {x.shape[-1]}")
        dtype = _float_dtype_for(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            c = cos.to(dtype).unsqueeze(-2)  # [.., L, 1, d/2]: broadcasts over heads
            s = sin.to(dtype).unsqueeze(-2)
            xf = x.to(dtype)
            if self.interleaved:
                # (x_2k + i·x_2k+1)·e^{iφ}: one complex multiply forward and backward, several times faster
                # on CPU than the real-arithmetic form (strided pairs and a stack).
                if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
                    xf = xf.contiguous()
                xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
                out = torch.view_as_real(xc * torch.complex(c, s)).flatten(-2)
            else:
                x1, x2 = xf.chunk(2, dim=-1)
                out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
        return out.to(x.dtype)

    def forward(
        self, q: Tensor, k: Tensor | None = None, positions: Tensor | None = None, offset: int = 0
    ) -> tuple[Tensor, Tensor | None]:
        """Rotate queries and keys at ``positions`` (or ``offset + arange(seq)``).

        Args:
            q: ``[batch, seq, heads, head_dim]``.
            k: ``[batch, seq, kv_heads, head_dim]`` or ``None``.
            positions: ``[seq]`` or ``[batch, seq]`` int/float positions; ``None`` -> ``offset + arange(seq)``.
            offset: first position when ``positions`` is None (KV-cache decoding).

        Returns:
            ``(q_rot, k_rot)`` with the input shapes and dtypes (``k_rot`` is None if ``k`` is None).
        """
        if q.dim() != 4:
            raise ValueError(f"q must be [batch, seq, heads, head_dim], got shape {tuple(q.shape)}")
        seq = q.shape[1]
        if positions is not None and positions.shape[-1] != seq:
            raise ValueError(f"positions must have seq={seq} entries in its last dim, got {tuple(positions.shape)}")
        cos, sin = self.cos_sin(positions, seq_len=seq, offset=offset, device=q.device)
        return self.rotate(q, cos, sin), (None if k is None else self.rotate(k, cos, sin))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, base={self.base}, interleaved={self.interleaved}, "
            f"scaling={self.scaling}"
        )

