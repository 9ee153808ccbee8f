"""Benchmark: a LoRA student against full fine-tuning on the quickstart (configs/quickstart.py).

Command:

    python bench/lora.py                       # rank 8, alpha 16; about a minute on 2 quiet cores
    python bench/lora.py --rank 16 --repeats 20
    python bench/lora.py --width 512 --layers 4   # a wider, deeper student (head_dim 64) on the same task

One process, the quickstart's teacher (assets/arithmetic_teacher), student (its inline model at the
quickstart's seed, unfitted: the weights do not change sizes or times), objective (student prefixes, exact
reverse KL, fused), batch (64 prompts, 36 new tokens) and optimizer, on this machine's devices. For full
fine-tuning and for LoRA (`student.lora`: every projection, `--rank`, `--alpha`):
- trainable parameters and optimizer state bytes (AdamW's mu and nu, `TrainState.opt_state`);
- checkpoint bytes: the TrainState written by `train.checkpointing.Checkpointer` as the loop writes it
  (the files of one step directory, uncompressed as the loop stores it);
- update time: median over `--repeats` of the jitted distillation step (`train.step.build_train_step`,
  metrics fetched as the loop does) on one fixed batch of student samples, after compiling;
- rollout time: median of `train.prefixes.from_sampler` drawing that batch with the student at its state
  (a LoRA student samples through base + adapters, unmerged).
Prints both side by side with LoRA / full ratios. Results: README ("LoRA students").
"""

import argparse
import pathlib
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import timing  # noqa: E402  (bench/timing.py)

from kldistill_jax import cli, data  # noqa: E402
from kldistill_jax.models import lora, sharding  # noqa: E402
from kldistill_jax.train import distributed, loop, prefixes, setup  # noqa: E402
from kldistill_jax.train.checkpointing import Checkpointer  # noqa: E402
from kldistill_jax.train.state import Split, split  # noqa: E402
from kldistill_jax.train.step import build_train_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def measure(config, student, teacher, data_batch, tokenizer, mesh, repeats, workdir):
  """{name: value} of one way to train `student`."""
  model = split(student)
  optimizer, state, shardings = loop.initial_state(config, model, mesh, total_steps=config.steps)
  step = build_train_step(student=Split(model.graphdef, None, model.rest), objective=setup.make_objective(config),
                          optimizer=optimizer, micro_batches=1, state_shardings=shardings,
                          batch_sharding=sharding.batch_sharding(mesh), fused=True)
  key = jax.random.key(0)

  def rollout():
    batch, _ = prefixes.from_sampler(model.merge(state.params), data_batch, rng=key, settings=config.sampling,
                                     tokenizer=tokenizer)
    jax.block_until_ready(batch["tokens"])
    return batch

  batch = rollout()
  rollout_s = timing.median_seconds(rollout, repeats, warmups=1)
  teacher_split = split(teacher)
  holder = {"state": state}

  def update():
    holder["state"], metrics = step(holder["state"], batch, teacher_split)
    jax.device_get(metrics)

  update_s = timing.median_seconds(update, repeats, warmups=1)
  checkpointer = Checkpointer(workdir, max_to_keep=1, async_save=False)
  checkpointer.save(1, holder["state"])
  checkpointer.wait()
  checkpointer.close()
  checkpoint_bytes = sum(f.stat().st_size for f in (pathlib.Path(workdir) / "1").rglob("*") if f.is_file())
  return {"trainable parameters": sum(x.size for x in jax.tree.leaves(model.params)),
          "frozen student parameters": sum(x.size for x in jax.tree.leaves(nnx.state(student, nnx.Param)))
                                       - sum(x.size for x in jax.tree.leaves(model.params)),
          "optimizer state bytes": sum(x.nbytes for x in jax.tree.leaves(holder["state"].opt_state)),
          "checkpoint bytes": checkpoint_bytes, "update s": update_s, "rollout s": rollout_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--alpha", type=float, default=16.0)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--width", type=int, default=0, help="student hidden size (0: the quickstart's 64)")
  parser.add_argument("--layers", type=int, default=0, help="student layers (0: the quickstart's 2)")
  args = parser.parse_args()
  config = cli.load_config(str(ROOT / "configs" / "quickstart.py"))
  if args.width:  # Qwen3-like proportions: MLP 3x, heads of 64, 2 query heads per kv head
    config.student.model.update(hidden_size=args.width, intermediate_size=3 * args.width, head_dim=64,
                                num_heads=max(args.width // 64, 1), num_kv_heads=max(args.width // 128, 1))
  if args.layers:
    config.student.model.num_layers = args.layers
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  mesh = setup.make_mesh(config)
  vocab = config.vocab_size or tokenizer.vocab_size
  results = {}
  with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as tmp:
    teacher = setup.load_model(config.teacher, "teacher", vocab, mesh, config.seed + 1)
    source = setup.make_source(config, "train", tokenizer)
    data_batch = dict(next(loop.data_iterator(config, source, tokenizer)))
    data_batch.pop("index")
    data_batch = distributed.global_batch(data_batch, mesh)
    lora_config = lora.LoraConfig(rank=args.rank, alpha=args.alpha)
    for name in ("full", "lora"):
      student = setup.load_model(config.student, "student", vocab, mesh, config.seed + 2)
      if name == "lora":
        student = setup.add_adapters(student, lora_config, config.seed + 3)
      results[name] = measure(config, student, teacher, data_batch, tokenizer, mesh, args.repeats,
                              pathlib.Path(tmp) / name)
  print(f"quickstart student {results['full']['trainable parameters']:,} parameters, LoRA rank {args.rank} "
        f"(alpha {args.alpha:g}) on {', '.join(lora.TARGETS)}; batch {config.batch_size} x "
        f"{config.sampling.max_new_tokens} new tokens; {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s); medians of {args.repeats}")
  print(f"{'':<28}{'full':>14}{'LoRA':>14}{'LoRA / full':>14}")
  for key in results["full"]:
    full, ours = results["full"][key], results["lora"][key]
    fmt = (lambda v: f"{v:>14.4f}") if key.endswith(" s") else (lambda v: f"{v:>14,}")
    ratio = f"{ours / full:>14.3f}" if full else f"{'-':>14}"
    print(f"{key:<28}{fmt(full)}{fmt(ours)}{ratio}")


if __name__ == "__main__":
  main()
