"""Compile time of the whole model's value+grad against its depth (issue 10: scanned layers).

    python bench/compile_time.py                     # 4 and 28 layers, Qwen3-0.6B shapes; ~1-2 min on 2 cores
    python bench/compile_time.py --layers 4 8 28 --remat block --length 1024

For each depth: a Qwen3-0.6B-shaped model (hidden 1024, 16 heads, 8 kv heads, head_dim 128, MLP 3072, tied
vocabulary 151,936, float32) with `num_layers` replaced; the jitted value+grad (w.r.t. every parameter) of
the next-token cross-entropy on B x L tokens, lowered and compiled from abstract arguments (nothing is
allocated or run). Prints, per depth, trace+lower and compile time as wall seconds and as this process's
CPU seconds (each the minimum of --repeats fresh compilations) and the compiled program's size in HLO
lines; the ratio deepest / shallowest is taken on CPU seconds, which other jobs on a shared machine do not
inflate as they do wall time. Target (issue 10): 28 layers <= 1.5x 4 layers.
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from kldistill_jax import models
from kldistill_jax.models.config import QWEN3_0P6B


def value_and_grad(config, batch, length):
  """(jitted value+grad of the cross-entropy w.r.t. the model state, its abstract arguments)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.Transformer(config, rngs=nnx.Rngs(0))))

  def loss(state, tokens):
    logits, _ = nnx.merge(graphdef, state)(tokens[:, :-1], jnp.arange(tokens.shape[1] - 1)[None])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)
  return jax.jit(jax.value_and_grad(loss)), (state, tokens)


def compile_seconds(config, batch, length):
  """(wall seconds, CPU seconds) of trace + lower + XLA compile, and the compiled HLO's line count, of one
  fresh compilation."""
  fn, args = value_and_grad(config, batch, length)
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = fn.lower(*args).compile()
  return time.perf_counter() - wall, time.process_time() - cpu, len(compiled.as_text().splitlines())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, nargs="+", default=[4, 28])
  parser.add_argument("--length", type=int, default=1024, help="tokens per row")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--remat", default=None, help="ModelConfig.remat (default: the config's own)")
  parser.add_argument("--repeats", type=int, default=2, help="fresh compilations per depth (minimum kept)")
  args = parser.parse_args()
  config = QWEN3_0P6B if args.remat is None else QWEN3_0P6B.replace(remat=args.remat)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; Qwen3-0.6B shapes, B={args.batch}, "
        f"L={args.length}, remat={config.remat!r}, attention={config.attention!r}")
  print(f"{'layers':>6} {'wall s':>7} {'CPU s':>7} {'HLO lines':>9}")
  cpu = {}
  for layers in args.layers:
    runs = [compile_seconds(config.replace(num_layers=layers), args.batch, args.length)
            for _ in range(args.repeats)]
    wall, cpu[layers] = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"{layers:>6} {wall:>7.2f} {cpu[layers]:>7.2f} {runs[0][2]:>9}", flush=True)
  shallow, deep = min(cpu), max(cpu)
  ratio = cpu[deep] / cpu[shallow]
  verdict = "PASS" if ratio <= 1.5 else "FAIL"
  print(f"[{verdict}] compile CPU time, {deep} layers / {shallow} layers = {cpu[deep]:.2f} / {cpu[shallow]:.2f} s "
        f"= {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
  main()
