"""Benchmark: how long a checkpoint save stalls training, asynchronous (ours) vs blocking (the baseline).

Command:

    python bench/checkpoint_save.py              # ~46M-param student, 528 MiB state; under 2 min on 2 cores
    python bench/checkpoint_save.py --quick      # small model, ~20 s

One run, one real training state (float32 master params + AdamW mu and nu, from `train.state.init_state` /
`make_optimizer`) updated by the real step (`train.step.build_train_step`, dataset prefixes, no teacher: the
objective `train.runner` fits a teacher with). Three savers, `--saves` times each: `Checkpointer(async_save=
False)` (the baseline), `Checkpointer()` (async, uncompressed: our default) and, for comparison, an async
orbax manager with its defaults (zstd compression on, what `Checkpointer` did before). Each save:
`--clean` steps with no save in flight (the baseline step time is their median over the whole run), one
`save(...)` after a step as `loop.run_loop` makes it, steps until orbax has committed the step directory
(a watcher thread notes when), then `wait()`.

"Training time lost" per save is the save call, plus every overlapped step's excess over the baseline
step, plus the final wait: on a CPU the background writer competes with XLA for the same cores, so the
overlapped steps are slower and that slowdown is counted, not hidden. A step, here and in the loop, ends
when its metrics reach the host. The last async save is restored and compared with a copy of the state
taken just before `save` (the next step donates the state while the write runs).
"""

import argparse
import pathlib
import statistics
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kldistill_jax import objectives
from kldistill_jax.models import Transformer, qwen3
from kldistill_jax.train.checkpointing import Checkpointer
from kldistill_jax.train.state import Split, init_state, make_optimizer, split
from kldistill_jax.train.step import build_train_step

MAX_OVERLAPPED_STEPS = 50  # a write slower than this many steps is reported as not finished overlapping


def build(args):
  """(jitted step, fresh TrainState, batch) for a Qwen3-shaped student of the flags' size."""
  config = qwen3(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                 num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=max(args.hidden // 128, 1),
                 head_dim=64)
  model = split(Transformer(config, rngs=nnx.Rngs(0)))
  opt = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=10, schedule="cosine", b1=0.9,
                                       b2=0.98, eps=1e-8, weight_decay=0.0, grad_clip=1.0, total_steps=1000))
  optimizer = make_optimizer(opt)
  state = jax.jit(lambda p: init_state(p, optimizer, 0))(model.params)
  step = build_train_step(student=Split(model.graphdef, None, model.rest),
                          objective=objectives.Objective(prefix="dataset", kl="forward", estimator="exact"),
                          optimizer=optimizer, micro_batches=1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, args.vocab, (args.batch, args.length)).astype(np.int32)
  loss_mask = np.zeros_like(tokens)
  loss_mask[:, args.length // 4:] = 1
  batch = jax.tree.map(jnp.asarray, {"tokens": tokens, "attention_mask": np.ones_like(tokens),
                                     "loss_mask": loss_mask})
  return config, step, state, batch


class Trainer:
  """Runs steps as the loop does: the state is donated, the step ends when its metrics are on the host."""

  def __init__(self, step, state, batch):
    self.step_fn, self.state, self.batch, self.count = step, state, batch, 0
    self.clean = []  # times of steps with no save in flight, spread over the run: the baseline

  def step(self):
    start = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batch, None)
    jax.device_get(metrics)  # loop.one_step does the same (the NaN check needs the values)
    self.count += 1
    return time.perf_counter() - start


def one_save(trainer, checkpointer, directory, clean, snapshot=False):
  """`clean` steps with no save in flight (timed into trainer.clean), then a save, then steps until it is
  committed on disk, then wait(). Returns a dict of timings (s)."""
  for _ in range(clean):
    trainer.clean.append(trainer.step())
  step = trainer.count
  copy = jax.tree.map(np.array, trainer.state) if snapshot else None
  start = time.perf_counter()
  checkpointer.save(step, trainer.state, meta={"step": step})
  call = time.perf_counter() - start
  committed, on_disk = directory / str(step), []

  def watch():  # orbax renames the step's tmp directory to `<step>` when the write is done
    while not committed.exists():
      time.sleep(0.01)
    on_disk.append(time.perf_counter() - start)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  overlapped = []
  while not committed.exists() and len(overlapped) < MAX_OVERLAPPED_STEPS:
    overlapped.append(trainer.step())
  wait_start = time.perf_counter()
  checkpointer.wait()
  wait = time.perf_counter() - wait_start
  watcher.join()
  next_step = overlapped[0] if overlapped else trainer.step()
  return {"call": call, "next_step": next_step, "overlapped": overlapped, "wait": wait,
          "on_disk": on_disk[0], "copy": copy, "step": step}


def lost(result, baseline):
  """Training-thread time one save cost: the save call, the overlapped steps' excess, the final wait."""
  return result["call"] + sum(t - baseline for t in result["overlapped"]) + result["wait"]


class Compressed:
  """An async orbax manager with its defaults (`StandardSave`: zstd on), what `Checkpointer` did before it
  turned compression off: state + meta."""

  def __init__(self, directory):
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(directory, options=options)

  def save(self, step, state, *, meta):
    return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)))

  def wait(self):
    self._manager.wait_until_finished()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self._manager.close()


def run_kind(trainer, root, kind, *, saves, clean, check):
  directory = pathlib.Path(root) / kind
  results = []
  make = {"blocking": lambda: Checkpointer(directory, max_to_keep=1, async_save=False),
          "async": lambda: Checkpointer(directory, max_to_keep=1, async_save=True),
          "compressed": lambda: Compressed(directory)}[kind]
  with make() as checkpointer:
    for i in range(saves):
      results.append(one_save(trainer, checkpointer, directory, clean, snapshot=check and i == saves - 1))
    if check:
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              trainer.state)
      step, restored, _ = checkpointer.restore_latest(abstract)
      copy = results[-1]["copy"]
      same = step == results[-1]["step"] and all(
          np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(copy), jax.tree.leaves(restored)))
      results[-1]["restored_equal"] = same
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--clean", type=int, default=2, help="steps with no save in flight before each save")
  parser.add_argument("--saves", type=int, default=2, help="saves timed per kind")
  parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory)")
  parser.add_argument("--quick", action="store_true", help="hidden 128 x 2 layers, vocab 4096, 1 save each")
  args = parser.parse_args()
  if args.quick:
    args.hidden, args.layers, args.vocab, args.saves = 128, 2, 4096, 1
  config, step, state, batch = build(args)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}, {len(jax.devices())} device(s)); student "
        f"{config.num_params() / 1e6:.1f}M params (hidden {args.hidden} x {args.layers} layers, vocab "
        f"{args.vocab}); state {state_bytes / 2**20:.0f} MiB (float32 params + AdamW mu, nu); batch "
        f"{args.batch} x {args.length}; {args.saves} save(s) per kind")
  trainer = Trainer(step, state, batch)
  for _ in range(2):
    trainer.step()  # compile
  kinds = {"blocking": "blocking save (baseline)", "async": "async save (ours, no zstd)",
           "compressed": "async, orbax's default zstd"}
  results = {}
  with tempfile.TemporaryDirectory(dir=args.dir) as root:
    for kind in kinds:
      results[kind] = run_kind(trainer, root, kind, saves=args.saves, clean=args.clean, check=kind == "async")
  baseline = statistics.median(trainer.clean)

  def med(kind, key):
    return statistics.median(r[key] for r in results[kind])

  def lost_ms(kind):
    return 1e3 * statistics.median(lost(r, baseline) for r in results[kind])

  print(f"\nbaseline: median step {baseline * 1e3:.0f} ms over {len(trainer.clean)} steps with no save in "
        f"flight (spread over the run); medians over the saves")
  print("| save | save() call ms | next step ms | steps during write | mean step during write ms "
        "| save() -> on disk ms | training time lost ms |")
  print("|---|---|---|---|---|---|---|")
  for kind, name in kinds.items():
    during = [t for r in results[kind] for t in r["overlapped"]]
    mean = f"{statistics.mean(during) * 1e3:.0f}" if during else "-"
    print(f"| {name} | {med(kind, 'call') * 1e3:.0f} | {med(kind, 'next_step') * 1e3:.0f} "
          f"| {len(during) / args.saves:.1f} | {mean} | {med(kind, 'on_disk') * 1e3:.0f} | {lost_ms(kind):.0f} |")
  print()
  for kind in ("async", "compressed"):
    during = [t for r in results[kind] for t in r["overlapped"]]
    slowdown = statistics.mean(during) / baseline if during else float("nan")
    print(f"{kinds[kind]}: save() call {med('blocking', 'call') / med(kind, 'call'):.1f}x shorter than "
          f"blocking; training time lost {lost_ms('blocking'):.0f} -> {lost_ms(kind):.0f} ms "
          f"({lost_ms(kind) / lost_ms('blocking'):.0%} of blocking); steps while the write runs "
          f"{slowdown:.2f}x the baseline step (the writer shares the cores with XLA)")
  print(f"async save restored equal to the state at save() (the next step donated it): "
        f"{results['async'][-1]['restored_equal']}")


if __name__ == "__main__":
  main()
