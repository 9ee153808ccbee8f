"""kldistill_jax: LLM distillation in JAX, with prefix source and KL direction as independent choices.

Public modules: `losses` (pure functions of arrays), `objectives` (the 2x2 as data), `identities`,
`models` (Qwen3 / Qwen2 / Llama in Flax NNX, HF interop), `sampling` (the in-JAX sampler), `data`
(tasks, sources, tokenizers, grain pipelines), `train` (the step, the loop, checkpoints, the jobs of
run.py), `evaluation` and `rewards`.
"""

from kldistill_jax import losses, objectives

__version__ = "0.1.0"
__all__ = ["losses", "objectives"]
