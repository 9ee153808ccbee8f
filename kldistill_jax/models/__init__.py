"""Decoder-only transformers (Qwen3 / Qwen2 / Llama 3) in Flax NNX, an explicit KV cache, HF interop."""

from kldistill_jax.models.cache import KVCache, init_cache
from kldistill_jax.models.config import Llama3RopeScaling, ModelConfig, llama, qwen2, qwen3
from kldistill_jax.models.transformer import Transformer

__all__ = ["KVCache", "Llama3RopeScaling", "ModelConfig", "Transformer", "init_cache", "llama", "qwen2",
           "qwen3"]
