"""moejax.model: Flax NNX modules and pure math of the (MoE) transformer."""

from moejax.model.attention import KVCache
from moejax.model.config import ConfigError, ModelConfig
from moejax.model.transformer import Transformer

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Transformer"]
