"""Attention implementations side by side: blockwise (flash, pure JAX) against xla (materialised scores).

    python bench/attention.py            # ~5 min on a shared 2-core CPU

1. One Qwen3-0.6B-shaped block (hidden 1024, 16 heads, 8 kv heads, head_dim 128, MLP 3072), float32,
   B = 1, value + gradient (parameters and input): compiled scratch
   (`memory_analysis().temp_size_in_bytes`, deterministic) at L = 1152 and 4608, and time at L = 1024.
2. One decode call `model(tokens, positions, cache)` (batch 8, the cache donated as in the sampler's loop)
   at cache index 256 in a 512- and a 4608-slot cache, for the model of bench/sampler.py's small size
   (hidden 256 x 4 layers, 4 heads / 2 kv heads of 64, vocabulary 32768).
Targets (issue 10) are printed PASS/FAIL. Times are medians of --repeats calls after a warm-up.
"""

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import timing
from kldistill_jax import models
from kldistill_jax.models.transformer import Block

MIB = 2 ** 20
BLOCK = models.qwen3(vocab_size=8, hidden_size=1024, intermediate_size=3072, num_layers=1, num_heads=16,
                     num_kv_heads=8, head_dim=128)
DECODE = models.qwen3(vocab_size=32768, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=64)


def block_value_and_grad(implementation, length):
  """(jitted value+grad of sum(block(x)^2) w.r.t. (block state, x), its abstract arguments)."""
  block = nnx.eval_shape(lambda: Block(BLOCK.replace(attention=implementation), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(block)
  positions = jnp.arange(length)[None]
  valid = jnp.ones((1, length), bool)

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, positions, valid, None)
    return jnp.sum(jnp.square(y))

  x = jax.ShapeDtypeStruct((1, length, BLOCK.hidden_size), jnp.float32)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (state, x)


def block_scratch_mib(implementation, length):
  fn, args = block_value_and_grad(implementation, length)
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / MIB


def block_seconds(implementation, length, repeats):
  fn, (state, x) = block_value_and_grad(implementation, length)
  rng = np.random.default_rng(0)
  real = lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype)
  state, x = jax.tree.map(real, state), real(x)
  compiled = fn.lower(state, x).compile()
  return timing.median_seconds(lambda: jax.block_until_ready(compiled(state, x)), repeats, warmups=1)


def decode_seconds(implementation, slots, repeats, batch=8, index=256):
  model = models.Transformer(DECODE.replace(attention=implementation), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(3,))
  def step(state, tokens, positions, cache):
    return nnx.merge(graphdef, state)(tokens, positions, cache)

  cache = model.init_cache(batch, slots)
  rng = np.random.default_rng(1)
  fill = lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype)
  cache = dataclasses.replace(cache, k=fill(cache.k), v=fill(cache.v),
                              valid=cache.valid.at[:, :index].set(True), index=jnp.int32(index))
  tokens = jnp.ones((batch, 1), jnp.int32)
  positions = jnp.full((batch, 1), index, jnp.int32)
  holder = [cache]

  def call():  # the returned cache (index + 1) is donated back in at the same index
    logits, new = step(state, tokens, positions, holder[0])
    jax.block_until_ready(logits)
    holder[0] = dataclasses.replace(new, index=jnp.int32(index))

  return timing.median_seconds(call, repeats, warmups=2)


def verdict(ok):
  return "PASS" if ok else "FAIL"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")

  print("\n1. Qwen3-0.6B-shaped block, value+grad, B=1, float32: compiled scratch (MiB)")
  scratch = {(impl, length): block_scratch_mib(impl, length)
             for impl in ("xla", "blockwise") for length in (1152, 4608)}
  print(f"   {'L':>6} {'xla':>10} {'blockwise':>10} {'blockwise/xla':>14}")
  for length in (1152, 4608):
    xla, ours = scratch["xla", length], scratch["blockwise", length]
    print(f"   {length:>6} {xla:>10.0f} {ours:>10.0f} {ours / xla:>14.3f}")
  growth = {impl: scratch[impl, 4608] / scratch[impl, 1152] for impl in ("xla", "blockwise")}
  print(f"   growth 1152 -> 4608: xla x{growth['xla']:.1f}, blockwise x{growth['blockwise']:.1f}")
  at_4608 = scratch["blockwise", 4608]
  print(f"   target blockwise at 4608 <= 1,423 MiB and <= 1/4 of xla: {at_4608:.0f} MiB "
        f"({at_4608 / scratch['xla', 4608]:.3f} of xla) {verdict(at_4608 <= 1423 and at_4608 <= scratch['xla', 4608] / 4)}")
  print(f"   target growth <= 6x: x{growth['blockwise']:.1f} {verdict(growth['blockwise'] <= 6)}")

  print(f"\n   time at L=1024 (median of {args.repeats})")
  seconds = {impl: block_seconds(impl, 1024, args.repeats) for impl in ("xla", "blockwise")}
  ratio = seconds["blockwise"] / seconds["xla"]
  print(f"   xla {seconds['xla'] * 1e3:.0f} ms, blockwise {seconds['blockwise'] * 1e3:.0f} ms: "
        f"blockwise/xla {ratio:.2f} (target <= 1.5) {verdict(ratio <= 1.5)}")

  print(f"\n2. decode call at cache index 256, batch 8, cache donated (hidden 256 x 4 layers, median of "
        f"{args.repeats * 4})")
  print(f"   {'':>10} {'512 slots':>10} {'4608 slots':>11} {'4608/512':>9}")
  for impl in ("xla", "blockwise"):
    small, large = (decode_seconds(impl, slots, args.repeats * 4) for slots in (512, 4608))
    line = f"   {impl:>10} {small * 1e3:>8.2f}ms {large * 1e3:>9.2f}ms {large / small:>9.2f}"
    print(line + (f"  (target <= 1.5) {verdict(large / small <= 1.5)}" if impl == "blockwise" else ""))


if __name__ == "__main__":
  main()
