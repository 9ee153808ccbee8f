"""kldistill_jax: LLM distillation in JAX, with prefix source and KL direction as independent choices."""

from kldistill_jax import losses

__version__ = "0.1.0"
__all__ = ["losses"]
