"""Benchmark: what each way of caching the teacher costs, in bytes per token and in teacher FLOPs.

    python bench/teacher_cache.py                      # Qwen3-4B teacher shapes, counted (instant)
    python bench/teacher_cache.py --run /tmp/tc        # + two real runs on the built-in task (minutes)

Counted (train/flops.py, the counters the training loop keeps) for one Qwen3-4B trajectory of
--prompt-len + --new-tokens tokens (attention counted as the GPU's cudnn kernel: every pair), trained for
--epochs passes over a cache built once, at teacher prefixes with the exact estimator:

  online       the teacher samples and scores every step: epochs x (generation + forward)
  cache        teacher_cache.enabled: sampled once, re-scored by a teacher forward every epoch
  top-k        + teacher_cache.top_k: one scoring forward at build time, then no teacher (approximate KL)
  hidden       + teacher_cache.hidden_states: one forward to the final states at build time (no head),
               then only the head (D x V) per token per epoch, the exact KL

--run trains the arithmetic sft smoke model pair (teacher hidden 128, vocab 40) for --run-epochs passes
over 16 cached trajectories, once re-scoring the cache and once from hidden states, and prints the
teacher FLOP counters from their metrics.jsonl: measured by the loop, not computed here.
"""

import argparse
import json
import pathlib
import sys

from kldistill_jax.models.config import QWEN3_4B
from kldistill_jax.train import flops, teacher_states


def bytes_table(config, top_k):
  sizes = teacher_states.bytes_per_token(hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                                       top_k=top_k)
  logits = sizes["logits"]
  rows = [("hidden states (bfloat16, D)", sizes["hidden_states"]),
          (f"top-{top_k} ids + log-probs (int32 + float32)", sizes["top_k"]),
          ("full logits (bfloat16, V)", logits), ("full logits (float32, V)", 2 * logits)]
  lines = [f"teacher outputs per cached token, D={config.hidden_size}, V={config.vocab_size} "
           f"(+{sizes['rows']} bytes/token of tokens, masks and log-probs in every cache):"]
  lines += [f"  {name:<44}{size:>10,} B  {100 * size / logits:7.2f}% of bf16 logits" for name, size in rows]
  head = config.hidden_size * config.vocab_size * 2
  lines.append(f"  the hidden-state cache stores the head once besides: {head / 2**20:,.0f} MiB in bfloat16")
  return "\n".join(lines)


def flops_table(config, prompt_len, new_tokens, epochs):
  length = prompt_len + new_tokens
  generation = flops.generation_flops(config, 1, prompt_len, new_tokens, bucket=False)
  forward = flops.forward_flops(config, 1, length)
  states = flops.forward_flops(config, 1, length, lm_head=False)
  head = flops.head_flops(length, config.hidden_size, config.vocab_size)
  kinds = {"online": lambda e: e * (generation + forward), "cache": lambda e: generation + e * forward,
           "top-k": lambda e: generation + forward, "hidden": lambda e: generation + states + e * head}
  lines = [f"teacher FLOPs per trajectory ({prompt_len} + {new_tokens} tokens): generation {generation:.3e}, "
           f"forward {forward:.3e}, forward to the hidden states {states:.3e}, head {head:.3e} "
           f"({100 * head / forward:.1f}% of a forward)",
           f"  {'epochs':>6}" + "".join(f"{k:>12}" for k in kinds) + f"{'hidden saves vs cache':>24}"]
  for e in epochs:
    values = {k: f(e) for k, f in kinds.items()}
    saved = 1 - values["hidden"] / values["cache"]
    lines.append(f"  {e:>6}" + "".join(f"{v:>12.3e}" for v in values.values()) + f"{100 * saved:>23.1f}%")
  return "\n".join(lines)


def measured_runs(workdir, epochs):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
  import config_files  # pylint: disable=g-import-not-at-top
  from kldistill_jax.train import runner  # pylint: disable=g-import-not-at-top
  base = config_files.load("sft", "smoke")
  common = {"student.warmup_steps": 0, "eval.temperature": base.sampling.temperature, "checkpoint_every": 100,
            "teacher_cache.enabled": True, "teacher_cache.num_trajectories": 16, "steps": 2 * epochs}
  lines = [f"measured (metrics.jsonl), {epochs} epochs over 16 cached trajectories, batch 8:",
           f"  {'cache':<8}{'build':>12}{'scoring/step':>14}{'teacher total':>15}"]
  for name, extra in (("cache", {}), ("hidden", {"teacher_cache.hidden_states": True})):
    path = pathlib.Path(workdir) / name
    runner.run_distill(config_files.load("sft", "smoke", **{**common, **extra}), path)
    last = json.loads((path / "metrics.jsonl").read_text().splitlines()[-1])
    lines.append(f"  {name:<8}{last['teacher_generation_flops']:>12.3e}"
                 f"{last['teacher_scoring_flops'] / last['step']:>14.3e}{last['teacher_flops']:>15.3e}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--prompt-len", type=int, default=256)
  parser.add_argument("--new-tokens", type=int, default=4096)
  parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--top-k", type=int, default=20)
  parser.add_argument("--run", default="", help="workdir for the two measured runs (off when empty)")
  parser.add_argument("--run-epochs", type=int, default=4)
  args = parser.parse_args()
  config = QWEN3_4B.replace(attention="cudnn", compute_dtype="bfloat16")
  print(bytes_table(config, args.top_k))
  print()
  print(flops_table(config, args.prompt_len, args.new_tokens, args.epochs))
  if args.run:
    print()
    print(measured_runs(args.run, args.run_epochs))


if __name__ == "__main__":
  main()
