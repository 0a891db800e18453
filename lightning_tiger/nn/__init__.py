"""Layers: rotary / ALiBi / KERPLE / Sandwich / XPOS position encodings, ReRoPE, attention with
length-extrapolation options, a decoder LM, and the default networks of the diffusion modules."""

from .alibi import ALiBi as ALiBi
from .alibi import alibi_slopes as alibi_slopes
from .attention import Attention as Attention
from .general_rotary import GeneralRotaryEmbedding as GeneralRotaryEmbedding
from .kerple import KERPLE as KERPLE
from .kv_cache import KVCache as KVCache
from .position_sampling import random_positions as random_positions
from .rerope import rerope_attention as rerope_attention
from .rotary import RotaryEmbedding as RotaryEmbedding
from .sandwich import Sandwich as Sandwich
from .small_unet import SmallUNet as SmallUNet
from .time_embedding import TimeEmbedding as TimeEmbedding
from .time_mlp import TimeMLP as TimeMLP
from .transformer import TransformerBlock as TransformerBlock
from .transformer import TransformerLM as TransformerLM
from .xpos import XPOS as XPOS
