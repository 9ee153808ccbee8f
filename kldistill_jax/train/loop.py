"""The training loop of one stage: data -> prefixes -> step -> metrics -> checkpoints, resumable.

    student = train_stage(config, workdir, student=model, teacher=teacher_model_or_None, ...)

Rerunning with the same `workdir` resumes from its newest checkpoint that restores (state, data iterator
position, FLOP counters); step i draws its randomness from fold_in(seed key, i), so a killed-and-resumed
run ends with the same parameters as an uninterrupted one.
"""

import math
import pathlib
import signal
import time

import grain
import jax
import numpy as np
from absl import logging
from flax import nnx

from kldistill_jax import data as data_lib, objectives, progress
from kldistill_jax.errors import Preempted, UserError
from kldistill_jax.train import (buckets, cross_tokenizer, curriculum, distributed, flops, prefixes, preemption,
                                 setup, tracking, trajectories)
from kldistill_jax.train.checkpointing import Checkpointer
from kldistill_jax.train.metrics import MetricsWriter
from kldistill_jax.train.state import Split, init_state, make_optimizer, split, state_shardings
from kldistill_jax.train.step import build_train_step
from kldistill_jax.models import lora, sharding


class NonFiniteLossError(RuntimeError):
  """Training stopped on a NaN/inf metric; the last good checkpoint is kept."""


def _step_flops(*, student_cfg, teacher_cfg, generator, teacher_source, batch_size, prompt_len, length,
                max_new_tokens, decode_steps, teacher_head_shape=None, teacher_length=None, student_lora=None):
  """Matmul FLOPs of one step per phase (see `flops.PHASES`); the sampler (if any) ran `decode_steps` of
  its `max_new_tokens`. teacher_source: `objectives.teacher_source` of the step (what the step ran: a
  "live" teacher forward, or on cached "hidden" states only the head of teacher_head_shape (D, V)).
  student_lora: the student's `models.lora.LoraConfig` when only its adapters train."""
  phases = {"student_train": flops.train_flops(student_cfg, batch_size, length, lora=student_lora)}
  if teacher_source == "live":
    phases["teacher_scoring"] = flops.forward_flops(teacher_cfg, batch_size, teacher_length or length)
  elif teacher_source == "hidden":
    phases["teacher_scoring"] = flops.head_flops(batch_size * length, *teacher_head_shape)
  if generator is not None:
    cfg, adapters = (student_cfg, student_lora) if generator == "student" else (teacher_cfg, None)
    phases[f"{generator}_generation"] = flops.generation_flops(cfg, batch_size, prompt_len, max_new_tokens,
                                                               decode_steps=decode_steps, lora=adapters)
  return phases


def _training_batch(data_batch, *, cached, objective, teacher, student, rng, config, tokenizer, length):
  """(step batch, rollout statistics) from the cache, the dataset, or the teacher's / student's sampler.

  student: () -> the student at its current parameters (built only when it samples).
  """
  if cached:
    return data_batch, prefixes.cached_stats(data_batch, tokenizer.eos_ids,
                                             data_lib.stop_sequences(tokenizer, config.sampling.stop))
  if objective.prefix == "dataset":
    return prefixes.from_dataset(data_batch), prefixes.dataset_stats(data_batch)
  sampler = teacher if objective.prefix == "teacher" else student()
  return prefixes.from_sampler(sampler, data_batch, rng=rng, settings=config.sampling, tokenizer=tokenizer,
                               max_new_tokens=length)


def _curriculum_step(state, step, curriculum_config, measure_entropy, model, desc):
  """At a stage end: measure the held-out entropy, decide, say so. Returns (state, metrics, the
  measurement's FLOPs)."""
  if not curriculum.is_stage_end(step, curriculum_config):
    return state, {}, 0
  length = curriculum.length_at(state, curriculum_config)
  measured = measure_entropy(model, length)
  entropy = measured["entropy"]
  state, decision = curriculum.decide(state, entropy, curriculum_config)
  message = (f"{desc}: step {step}: curriculum stage {decision.stage} at length {decision.length}: held-out "
             f"entropy {entropy:.4f} vs h_min {curriculum_config.h_min}: {decision.decision} -> length "
             f"{decision.next_length}")
  logging.warning(message)  # the run's one decision per stage is worth seeing at the default verbosity
  return (state, {"curriculum_entropy": entropy, "curriculum_next_length": float(decision.next_length)},
          measured.get("flops", 0))


def check_batch_size(config, mesh):
  """The batch splits into micro-batches, over the data-parallel devices and over the processes."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  per_micro = config.batch_size // max(config.micro_batches, 1)
  if config.batch_size % config.micro_batches:
    raise UserError(f"batch_size={config.batch_size} is not divisible by micro_batches={config.micro_batches}")
  if per_micro % shards:
    raise UserError(f"batch_size={config.batch_size} / micro_batches={config.micro_batches} = {per_micro} "
                     f"rows per micro-batch is not divisible by the data-parallel size mesh.data x mesh.fsdp "
                     f"= {shards}")
  if config.batch_size % jax.process_count():
    raise UserError(f"batch_size={config.batch_size} is not divisible by the {jax.process_count()} processes")


def initial_state(config, model, mesh, *, total_steps):
  """(optimizer, TrainState on `mesh`, its shardings) for the Split `model`'s params; the optimizer's decay
  horizon is `total_steps` updates."""
  optimizer_config = config.optimizer.copy_and_resolve_references()
  with optimizer_config.unlocked():
    optimizer_config.total_steps = total_steps
  optimizer = make_optimizer(optimizer_config)
  abstract = jax.eval_shape(lambda p: init_state(p, optimizer, config.seed), model.params)
  shardings = state_shardings(abstract, mesh)
  state = jax.jit(lambda p: init_state(p, optimizer, config.seed), out_shardings=shardings)(model.params)
  return optimizer, state, shardings


def data_iterator(config, source, tokenizer, *, trajectory_cache=None):
  """This process's checkpointable iterator over training batches (or cached teacher trajectories)."""
  local_batch = config.batch_size // jax.process_count()
  processes = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if trajectory_cache is not None:
    dataset = trajectories.make_dataset(trajectory_cache, batch_size=local_batch, **processes)
  else:
    dataset = data_lib.make_dataset(
        source, tokenizer, template=setup.make_template(config), prompt_len=config.data.prompt_len,
        response_len=config.data.response_len, batch_size=local_batch, seed=config.data.seed, **processes)
  # Few prefetch threads: the batches are cheap and the cores belong to XLA.
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def run_loop(config, workdir, *, mesh, state, iterator, meta, one_step, desc, postfix=("loss",)):
  """The resumable loop every stage shares: restore, step, stop on NaN, log, checkpoint.

  one_step(state, step, data_batch, key, meta) -> (state, metrics, events) runs step `step` (0-based) on
  the global data batch (its "index": int32 record indices) with key fold_in(seed key, step); it may update
  the `meta` dict (per-phase FLOP counters in meta["flops"], logged on every line; the curriculum state),
  which is checkpointed with the state. `events` may ask for an off-interval metrics line
  ("log": e.g. a held-out probe) and checkpoint ("checkpoint": e.g. a curriculum decision, which logs too).
  Metrics "loss" and "grad_norm" must be finite.
  Returns (state, meta) after config.steps steps.
  """
  workdir = pathlib.Path(workdir)
  checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
  abstract_sharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                  state)
  start = 0
  try:
    restored = checkpointer.restore_latest(abstract_sharded, data_iterator=iterator)
  except BaseException:
    checkpointer.close()
    raise
  if restored is not None:
    start, state, meta = restored
    # At WARNING: a rerun that resumed (and from where) is the first thing a user wants confirmed.
    logging.warning("%s: resumed from checkpoint step %d of %d (workdir %s)", desc, start, config.steps,
                    workdir)
  writer = MetricsWriter(workdir, process_index=jax.process_index(), resume_step=start,
                         tracker=tracking.start(config, workdir))
  base_key = jax.random.wrap_key_data(np.asarray(jax.device_get(state.rng)))  # state.rng is donated
  bar = progress.bar(config.steps, desc, initial=start)  # "compiling..." until the first step is done
  try:
    for step in range(start, config.steps):
      began = time.perf_counter()
      batch_np = dict(next(iterator))
      if "index" in batch_np:
        batch_np["index"] = batch_np["index"].astype(np.int32)  # record indices; JAX runs without x64
      data_batch = distributed.global_batch(batch_np, mesh)
      state, metrics, events = one_step(state, step, data_batch, jax.random.fold_in(base_key, step), meta)
      bad = [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])]
      if bad:
        writer.write(step + 1, metrics)
        raise NonFiniteLossError(
            f"{desc}: step {step + 1}: metric {bad[0]!r} is {metrics[bad[0]]}; stopped without saving. "
            f"The last good checkpoint (step {checkpointer.latest_step()}) is kept in "
            f"{workdir / 'checkpoints'}")
      elapsed = time.perf_counter() - began
      metrics.update(step_time_s=elapsed, tokens_per_s=metrics["num_tokens"] / elapsed,
                     **{k: float(v) for k, v in meta.get("flops", {}).items()})
      last = step + 1 == config.steps
      stop = preemption.agreed()
      if (step + 1) % config.log_every == 0 or last or step == 0 or stop or events & {"log", "checkpoint"}:
        writer.write(step + 1, metrics)
      if (step + 1) % config.checkpoint_every == 0 or last or stop or "checkpoint" in events:
        checkpointer.save(step + 1, state, data_iterator=iterator, meta=meta, force=bool(stop))
      if bar is not None:
        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in postfix if k in metrics}, refresh=False)
        bar.update(1)
        if step == start:
          progress.compiled(bar)  # rate and ETA from here on exclude the compilation
      if stop and not last:
        checkpointer.wait()
        raise Preempted(f"{desc}: stopped on {signal.Signals(stop).name} after step {step + 1} of "
                        f"{config.steps}; checkpoint step {step + 1} is on disk in "
                        f"{workdir / 'checkpoints'}: rerun the same command to resume", stop)
  finally:
    if bar is not None:
      bar.close()
    checkpointer.close()
    writer.close()
  return state, meta


def train_stage(config, workdir, *, student, teacher, objective, tokenizer, source, mesh, desc="train",
                trajectory_cache=None, cache_flops=0, curriculum_config=None, measure_entropy=None,
                probe=None, teacher_head=None, cross=None):
  """Trains `student` (an nnx Transformer on `mesh`) for config.steps; returns (student, FLOP counters).

  cross: a `cross_tokenizer.CrossTokenizer` when the teacher has its own tokenizer (objective.cross_tokenizer):
  each step batch is re-tokenized for it and aligned by text (`cross_tokenizer.extend_batch`).
  config: the stage's ConfigDict (steps, batch_size, micro_batches, seed, optimizer, sampling, data,
  checkpoint_every, keep_checkpoints, log_every). teacher: a Transformer or None (dataset prefixes only).
  trajectory_cache: a built `trajectories` cache directory: teacher prefixes are read from it instead of
  sampled (its one-off generation cost, `cache_flops`, starts the teacher-generation FLOP counter).
  teacher_head: the teacher's output head [D, V] on the mesh (`trajectories.teacher_head`) when that cache
  holds the teacher's final hidden states: the step's only teacher input (teacher may then be None).
  curriculum_config: a `curriculum.CurriculumConfig`: the sampled training length follows the
  entropy-gated curriculum, `measure_entropy(model, length) -> evaluation dict` measuring H (its
  "entropy") at each stage end; its state is checkpointed with the run.
  probe: `probe(model) -> evaluation dict` run every config.eval.probe_every steps (0 = never); its
  accuracy, entropy and mean_length are logged as probe_accuracy / probe_entropy / probe_length, so the
  student's own behaviour on held-out prompts can be plotted over training whatever the prefix source.
  The "flops" of those evaluation dicts (0 when absent) go to the `eval` FLOP counter.
  """
  check_batch_size(config, mesh)
  model = split(student)
  adapters = lora.config_of(student)  # for the FLOP count: only a LoRA student's adapters get gradients
  if teacher_head is not None and trajectory_cache is None:
    raise ValueError("teacher_head needs a trajectory_cache built with teacher_cache.hidden_states=True")
  teacher_input = teacher_head if teacher_head is not None else None if teacher is None else split(teacher)
  optimizer, state, shardings = initial_state(config, model, mesh, total_steps=config.steps)
  frozen = Split(model.graphdef, None, model.rest)
  step_fn = build_train_step(student=frozen, objective=objective, optimizer=optimizer,
                             micro_batches=config.micro_batches, state_shardings=shardings,
                             batch_sharding=sharding.batch_sharding(mesh), fused=config.objective.fused,
                             shared_vocab=None if cross is None else cross.shared)
  iterator = data_iterator(config, source, tokenizer, trajectory_cache=trajectory_cache)
  generator = None if trajectory_cache is not None or objective.prefix == "dataset" else objective.prefix
  bucket = config.sampling.length_bucket
  buckets.check_bucket(bucket)
  new_shape = buckets.ShapeLog(f"{desc}: train step")

  def one_step(state, step, data_batch, key, meta):
    indices = data_batch.pop("index", None)
    stage_state = curriculum.CurriculumState.from_dict(meta["curriculum"]) if "curriculum" in meta \
        else curriculum.CurriculumState()
    length = None if curriculum_config is None else curriculum.length_at(stage_state, curriculum_config)
    if trajectory_cache is None:  # the sampler too runs on prompts cut to the batch's longest bucket
      data_batch = buckets.trim_prompts(data_batch, bucket)
    prompt_width = (config.data.prompt_len if trajectory_cache is not None
                    else data_batch["prompt_tokens"].shape[1])
    batch, rollout = _training_batch(data_batch, cached=trajectory_cache is not None, objective=objective,
                                     teacher=teacher, student=lambda: model.merge(state.params), rng=key,
                                     config=config, tokenizer=tokenizer, length=length)
    batch = new_shape(buckets.trim_batch(batch, prompt_width, bucket))  # before teacher scoring and update
    if cross is not None:
      batch = cross_tokenizer.extend_batch(cross, batch, indices, source, setup.make_template(config), mesh)
    state, metrics = step_fn(state, batch, teacher_input)
    metrics = {k: float(v) for k, v in jax.device_get({**metrics, **rollout}).items()}
    decided, eval_flops = {}, 0
    if curriculum_config is not None and all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm")):
      stage_state, decided, eval_flops = _curriculum_step(stage_state, step + 1, curriculum_config,
                                                          measure_entropy, model.merge(state.params), desc)
      meta["curriculum"] = stage_state.to_dict()
      metrics.update(decided, training_length=float(length))
    events = {"checkpoint"} if decided else set()
    every = config.eval.probe_every
    if probe is not None and every and (step + 1) % every == 0:
      result = probe(model.merge(state.params))
      metrics.update(probe_accuracy=result["accuracy"], probe_entropy=result["entropy"],
                     probe_length=result["mean_length"])
      events.add("log")
      eval_flops += result.get("flops", 0)
    max_new_tokens = length or config.sampling.max_new_tokens  # what _training_batch's sampler was given
    decode_steps = int(round(metrics.get("max_length", 0))) or max_new_tokens
    phases = _step_flops(
        student_cfg=student.config, teacher_cfg=None if teacher is None else teacher.config,
        generator=generator, batch_size=config.batch_size,
        teacher_source=objectives.teacher_source(objective, batch, live_teacher=teacher_input is not None),
        prompt_len=prompt_width, length=batch["tokens"].shape[1], max_new_tokens=max_new_tokens,
        decode_steps=decode_steps, teacher_head_shape=None if teacher_head is None else teacher_head.shape,
        teacher_length=batch["teacher_tokens"].shape[1] if cross is not None else None,
        student_lora=adapters)
    flops.accumulate(meta["flops"], eval=eval_flops, **phases)
    return state, metrics, events

  state, meta = run_loop(config, workdir, mesh=mesh, state=state, iterator=iterator,
                         meta={"flops": flops.counters(teacher_generation=cache_flops)}, one_step=one_step,
                         desc=desc, postfix=("loss", "response_length"))
  nnx.update(student, state.params)
  return student, meta
