"""LoRA adapters on a Transformer's projections: flax's `nnx.LoRA` inside each targeted `Dense`.

    model = lora.add(model, lora.LoraConfig(rank=8, alpha=16.0), rngs=nnx.Rngs(0))  # same logits as before
    train.state.split(model)   # trainable: the nnx.LoRAParam variables only; the base is frozen
    merged = lora.merge(model)  # a plain Transformer, kernels W + alpha / rank · A @ B (what hf.save writes)

A targeted `Dense` computes x @ W + (alpha / rank) · (x @ A) @ B with A [in, r] (He-uniform) and B [r, out]
(zeros, so a fresh adapter changes nothing), PEFT's convention (its lora_A / lora_B weights are A^T / B^T).
The adapters are float32 `nnx.LoRAParam`s whatever the base's dtype (a bfloat16 base stays frozen), placed
on the model's mesh with the kernel's input / output axes. A kernel with leading axes (layers stacked for a
scan: [..., in, out]) gets adapters with the same leading axes, so a stacked model carries them as it
carries its kernels.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kldistill_jax.errors import UserError
from kldistill_jax.models import sharding
from kldistill_jax.models.transformer import Dense

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank r >= 1 of every adapter, alpha (the update is scaled by alpha / r, as in PEFT), and the
  projections that get one (names from TARGETS, Hugging Face's module names)."""
  rank: int
  alpha: float = 16.0
  targets: tuple = TARGETS

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise UserError(f"lora.rank must be an integer >= 1 (0 in a config: LoRA off), got {self.rank!r}")
    if not self.alpha > 0:
      raise UserError(f"lora.alpha must be > 0, got {self.alpha!r}")
    unknown = [t for t in self.targets if t not in TARGETS]
    if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
      raise UserError(f"lora.targets must be distinct names from {', '.join(TARGETS)}; got "
                      f"{tuple(self.targets)!r}" + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else ""))


class Adapter(nnx.LoRA):
  """nnx.LoRA (x @ A @ B in `dtype`, the model's compute dtype) scaled by alpha / rank."""

  def __init__(self, kernel: nnx.Param, *, rank, alpha, dtype, rngs):
    *lead, d_in, d_out = kernel.shape
    axes = kernel.get_metadata().get("logical_axes") or (None,) * kernel.ndim
    lead_axes = tuple(axes[:-2]) if len(axes) == kernel.ndim else (None,) * len(lead)
    he_uniform = jax.nn.initializers.he_uniform(batch_axis=tuple(range(len(lead))))
    super().__init__(
        d_in, rank, d_out, dtype=dtype, param_dtype=jnp.float32,
        a_initializer=lambda key, shape, dtype: he_uniform(key, (*lead, *shape), dtype),
        b_initializer=lambda key, shape, dtype: jnp.zeros((*lead, *shape), dtype),
        a_metadata={"logical_axes": (*lead_axes, axes[-2], None)},
        b_metadata={"logical_axes": (*lead_axes, None, axes[-1])}, rngs=rngs)
    self.rank, self.alpha = rank, float(alpha)

  def __call__(self, x):
    return (self.alpha / self.rank) * super().__call__(x)


def targeted(model, targets=TARGETS):
  """(path, Dense) of every projection of `model` whose attribute name is in `targets`."""
  return [(path, module) for path, module in nnx.iter_modules(model)
          if isinstance(module, Dense) and path and path[-1] in targets]


def has_adapters(model) -> bool:
  return any(getattr(module, "lora", None) is not None for _, module in targeted(model))


def add(model, config: LoraConfig, *, rngs: nnx.Rngs):
  """Gives every targeted projection of `model` a fresh adapter (in place; returns `model`). The model's
  outputs do not change (B = 0); `train.state.split` then trains only the adapters."""
  if has_adapters(model):
    raise UserError("the model already has LoRA adapters")
  found = targeted(model, config.targets)
  missing = sorted(set(config.targets) - {path[-1] for path, _ in found})
  if missing:
    raise UserError(f"lora.targets {missing} name no projection of this model")
  mesh = sharding.model_mesh(model)
  for _, dense in found:
    dense.lora = Adapter(dense.kernel, rank=config.rank, alpha=config.alpha,
                         dtype=model.config.compute_jnp_dtype, rngs=rngs)
    if mesh is not None:
      sharding.shard_model(dense.lora, mesh)
  return model


def config_of(model) -> LoraConfig | None:
  """The LoraConfig the adapters of `model` were added with (None without adapters)."""
  adapted = [(path, module.lora) for path, module in targeted(model) if getattr(module, "lora", None) is not None]
  if not adapted:
    return None
  ranks = {(a.rank, a.alpha) for _, a in adapted}
  if len(ranks) != 1:
    raise ValueError(f"adapters of different (rank, alpha) {sorted(ranks)}: no single LoRA config")
  (rank, alpha), = ranks
  return LoraConfig(rank=rank, alpha=alpha, targets=tuple(t for t in TARGETS
                                                          if any(p[-1] == t for p, _ in adapted)))


def _copy(model):
  """New module objects over the same arrays: changing their attributes leaves `model` as it is."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, state)


def merge(model):
  """`model` with each adapter folded into its kernel (W + alpha / rank · A @ B, in float32, stored in the
  kernel's dtype) and removed: a plain Transformer. `model` itself keeps its adapters. Without adapters,
  `model` is returned as it is."""
  if not has_adapters(model):
    return model
  merged = _copy(model)
  for _, dense in targeted(merged):
    adapter = dense.lora
    if adapter is None:
      continue
    kernel = dense.kernel
    delta = (adapter.alpha / adapter.rank) * jnp.matmul(adapter.lora_a[...], adapter.lora_b[...])
    dense.kernel = kernel.replace((kernel[...].astype(jnp.float32) + delta).astype(kernel.dtype))
    dense.lora = None
  return merged


def base(model):
  """`model` without its adapters (the frozen base they were trained on), sharing its arrays."""
  stripped = _copy(model)
  for _, dense in targeted(stripped):
    dense.lora = None
  return stripped
