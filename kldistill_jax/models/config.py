"""One decoder-only config covering Qwen3, Qwen2/2.5 and Llama 3 (the differences are flags)."""

import dataclasses
from typing import Optional

import jax.numpy as jnp

from kldistill_jax.errors import UserError
from kldistill_jax.models.attention import IMPLEMENTATIONS as ATTENTION

FAMILIES = ("qwen3", "qwen2", "llama")
REMAT = ("none", "block", "save_dots")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1's "llama3" RoPE frequency scaling (the values of HF's `rope_scaling` / `rope_parameters`)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder-only transformer.

  Attributes:
    family: "qwen3" (q/k RMSNorm, no biases), "qwen2" (q/k/v biases) or "llama"; decides the defaults of
      `qk_norm` / `qkv_bias` in the constructors below and the architecture name written by `hf.save`.
    head_dim: explicit (Qwen3's is not hidden_size / num_heads).
    param_dtype: storage dtype of the parameters (float32 for training masters).
    compute_dtype: dtype of activations and matmuls (bfloat16 on accelerators); logits are float32.
    remat: what the backward pass recomputes of each block (the layers run as one `lax.scan`): "none"
      (every activation kept), "block" (only each block's input kept, the rest recomputed: activation
      memory O(layers) -> O(1) blocks, about a forward more compute) or "save_dots" (the projections'
      outputs kept too, attention, norms and activations recomputed). True / False mean "block" / "none".
    attention: the attention implementation (`models.attention`): "auto" (splash on TPU, cudnn on GPU,
      blockwise elsewhere), "xla" (materialised scores, the reference), "blockwise" (pure-JAX flash),
      "cudnn" or "splash". Not part of a checkpoint's config.json; read when the model is built.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  family: str = "qwen3"
  qk_norm: bool = True
  qkv_bias: bool = False
  tie_word_embeddings: bool = False
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  rope_scaling: Optional[Llama3RopeScaling] = None
  max_position_embeddings: int = 40960
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise UserError(f"family must be one of {FAMILIES}, got {self.family!r}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      if getattr(self, name) < 1:
        raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if isinstance(self.remat, bool):  # the boolean of earlier configs
      object.__setattr__(self, "remat", "block" if self.remat else "none")
    if self.remat not in REMAT:
      raise UserError(f"remat must be one of {REMAT}, got {self.remat!r}")
    if self.attention not in ATTENTION:
      raise UserError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
    for name in ("param_dtype", "compute_dtype"):
      jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

  @property
  def param_jnp_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def compute_jnp_dtype(self):
    return jnp.dtype(self.compute_dtype)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    d, h, kv, hd, i = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
    attention = d * (h + 2 * kv) * hd + h * hd * d
    attention += (h + 2 * kv) * hd if self.qkv_bias else 0
    attention += 2 * hd if self.qk_norm else 0
    block = attention + 3 * d * i + 2 * d
    embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * block + embeddings + d


def qwen3(**kwargs):
  return ModelConfig(family="qwen3", qk_norm=True, qkv_bias=False, **kwargs)


def qwen2(**kwargs):
  kwargs.setdefault("rms_norm_eps", 1e-6)
  return ModelConfig(family="qwen2", qk_norm=False, qkv_bias=True, **kwargs)


def llama(**kwargs):
  kwargs.setdefault("rms_norm_eps", 1e-5)
  kwargs.setdefault("rope_theta", 500_000.0)
  return ModelConfig(family="llama", qk_norm=False, qkv_bias=False, **kwargs)


# Real shapes, for memory plans and benchmarks (weights come from `hf.load`).
QWEN3_0P6B = qwen3(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                   num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True)
QWEN3_4B = qwen3(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                 num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=True)
QWEN3_8B = qwen3(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                 num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=False)
