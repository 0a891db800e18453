"""Layers: rotary / ALiBi / KERPLE / Sandwich / XPOS position encodings, ReRoPE, attention with
length-extrapolation options, a decoder LM, and the default networks of the diffusion modules."""

from typing import TYPE_CHECKING

from lightning_tiger._lazy import lazy_exports

_EXPORTS = {
    "RotaryEmbedding": ".rotary",
    "GeneralRotaryEmbedding": ".general_rotary",
    "alibi_slopes": ".alibi",
    "ALiBi": ".alibi",
    "Attention": ".attention",
    "KVCache": ".kv_cache",
    "random_positions": ".position_sampling",
    "KERPLE": ".kerple",
    "Sandwich": ".sandwich",
    "XPOS": ".xpos",
    "rerope_attention": ".rerope",
    "TransformerBlock": ".transformer",
    "TransformerLM": ".transformer",
    "TimeEmbedding": ".time_embedding",
    "TimeMLP": ".time_mlp",
    "SmallUNet": ".small_unet",
}
__all__ = [
    "KERPLE",
    "XPOS",
    "ALiBi",
    "Attention",
    "GeneralRotaryEmbedding",
    "KVCache",
    "RotaryEmbedding",
    "Sandwich",
    "SmallUNet",
    "TimeEmbedding",
    "TimeMLP",
    "TransformerBlock",
    "TransformerLM",
    "alibi_slopes",
    "random_positions",
    "rerope_attention",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .alibi import ALiBi, alibi_slopes
    from .attention import Attention
    from .general_rotary import GeneralRotaryEmbedding
    from .kerple import KERPLE
    from .kv_cache import KVCache
    from .position_sampling import random_positions
    from .rerope import rerope_attention
    from .rotary import RotaryEmbedding
    from .sandwich import Sandwich
    from .small_unet import SmallUNet
    from .time_embedding import TimeEmbedding
    from .time_mlp import TimeMLP
    from .transformer import TransformerBlock, TransformerLM
    from .xpos import XPOS
