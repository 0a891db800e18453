"""Key/value cache for incremental decoding with :class:`~lightning_tiger.nn.Attention`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import check_int

__all__ = ["KVCache"]


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
        self.num_layers = check_int("num_layers", num_layers, low=1)
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
        check_int("layer", layer, low=0, high=self.num_layers - 1)

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
