"""The jobs behind `python run.py`: `distill` (teacher -> student, evaluated before and after) and
`pretrain` (fit a model to the data's own responses; how the built-in teacher is made).

Workdir layout of `distill` (rerunning the command resumes every stage):
  teacher/         when teacher.path is empty: the teacher fitted to the data (checkpoints, metrics, model/)
  student_init/    when student.warmup_steps > 0: the student fitted briefly to the data (a weak base model)
  checkpoints/ metrics.jsonl tensorboard/   the distillation run itself
  student/         the distilled student as a Hugging Face checkpoint (a LoRA student merged)
  student_adapter/ with student.lora.rank > 0: the adapters alone, a PEFT directory (+ student_base/ when
                   the base is neither student_init/model nor student.path)
  results.json     evaluation before/after, FLOPs
"""

import dataclasses
import json
import pathlib

import jax
from absl import logging
from flax import nnx

from kldistill_jax import data, evaluation, objectives
from kldistill_jax.models import hf, lora, peft_export
from kldistill_jax.train import (cross_tokenizer, flops, preemption, preflight, rl, setup, trajectories,
                                 workdir as workdir_lib)
from kldistill_jax.train.loop import check_batch_size, train_stage

DATA_OBJECTIVE = objectives.Objective(prefix="dataset", kl="forward", estimator="exact")


def _fit_to_data(config, workdir, model, *, steps, learning_rate, tokenizer, source, mesh, desc):
  """Trains `model` on the data's responses (cross-entropy) in `workdir`, exports `workdir/model`."""
  stage = config.copy_and_resolve_references()
  with stage.unlocked():
    stage.steps, stage.optimizer.learning_rate = steps, learning_rate
    stage.objective.fused = False
  model, _ = train_stage(stage, workdir, student=model, teacher=None, objective=DATA_OBJECTIVE,
                         tokenizer=tokenizer, source=source, mesh=mesh, desc=desc)
  hf.save(model, pathlib.Path(workdir) / "model", tokenizer=tokenizer,  # lossless: reloaded as a stage's start
          generation=_generation_defaults(config))
  return model


def _cached_or_fitted(config, section, field, workdir, *, steps, learning_rate, vocab_size, tokenizer,
                      source, mesh, seed):
  """The model of `section` (a path, or inline), fitted to the data first when `steps` > 0 (cached)."""
  if steps > 0 and section.path and not section.fit_loaded:
    logging.warning("%s.path is set: the loaded %s is used as it is, not fitted to the data first (%d steps "
                    "asked for); set %s.fit_loaded=True to fit it", field, field, steps, field)
    steps = 0
  exported = pathlib.Path(workdir) / "model"
  if steps > 0 and (exported / hf.CONFIG_FILE).is_file():
    return setup.load_model(section, field, vocab_size, mesh, seed, path=exported)
  model = setup.load_model(section, field, vocab_size, mesh, seed)
  if steps > 0:
    model = _fit_to_data(config, workdir, model, steps=steps, learning_rate=learning_rate,
                         tokenizer=tokenizer, source=source, mesh=mesh, desc=f"{field}: fit to data")
  return model


def _evaluate(config, model, tokenizer, records, mesh, check, desc="eval", **overrides):
  """evaluation.evaluate with the config's eval settings (`overrides` replace them); its "flops": what its
  sampler calls computed (each over the whole global batch, padding rows included). desc: its progress
  bar's label."""
  e = config.eval
  settings = dict(max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                  samples_per_prompt=e.samples_per_prompt, pass_k=tuple(e.pass_k),
                  truncated_is_wrong=e.truncated_is_wrong, stop=tuple(e.stop), stop_field="eval.stop")
  settings.update(overrides)
  local_batch = e.batch_size // jax.process_count()
  result = evaluation.evaluate(model, records, tokenizer, check=check, template=setup.make_template(config),
                               prompt_len=config.data.prompt_len, batch_size=local_batch,
                               rng=jax.random.key(e.seed), mesh=mesh, desc=desc, **settings)
  result["flops"] = sum(flops.generation_flops(model.config, local_batch * jax.process_count(),
                                               config.data.prompt_len, settings["max_new_tokens"],
                                               decode_steps=steps, lora=lora.config_of(model))
                        for steps in result.pop("decode_steps"))
  return result


def _evaluate_stored(config, workdir, name, model, tokenizer, records, mesh, check):
  """_evaluate, stored in workdir/evaluations/<name>.json and reused by a rerun (a restart after a
  preemption) whose evaluation settings are the same: the teacher's and the starting student's numbers
  cost a full sampling pass each, and nothing that produced them has changed (`workdir.check_config`)."""
  path = pathlib.Path(workdir) / "evaluations" / f"{name.replace(' ', '_')}.json"
  trained = name.endswith("after")  # the trained model depends on `steps`, which a rerun may raise
  settings = {k: v for k, v in workdir_lib.resolved(config).items()
              if k.startswith(("eval.", "data.")) or (trained and k == "steps")}
  if path.is_file():
    stored = json.loads(path.read_text())
    if stored["settings"] == settings:
      logging.warning("%s: evaluation reused from %s", name, path)
      return stored["result"]
  preemption.raise_if_requested(f"before evaluating the {name}")
  result = _evaluate(config, model, tokenizer, records, mesh, check, desc=f"eval: {name}")
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"settings": settings, "result": result}, indent=1) + "\n")
    temporary.replace(path)
  return result


def _export_and_evaluate(config, workdir, directory, name, model, tokenizer, records, mesh, check):
  """The trained model exported as workdir/<directory> (export.dtype, tokenizer files, the eval settings as
  generation defaults), then evaluated as `name` (stored, see _evaluate_stored)."""
  hf.save(model, pathlib.Path(workdir) / directory, dtype=config.export.dtype, tokenizer=tokenizer,
          generation=_generation_defaults(config))  # a LoRA model merged
  if lora.has_adapters(model):
    _export_adapter(config, workdir, directory, model, tokenizer)
  return _evaluate_stored(config, workdir, name, model, tokenizer, records, mesh, check)


def _export_adapter(config, workdir, directory, model, tokenizer):
  """A LoRA model's adapters as workdir/<directory>_adapter (PEFT), pointing at the base they were trained
  on: the fitted student_init/model, else student.path, else (an unfitted inline student) that base exported
  as workdir/<directory>_base."""
  workdir = pathlib.Path(workdir)
  fitted = workdir / "student_init" / "model"
  if (fitted / hf.CONFIG_FILE).is_file():
    base = fitted
  elif config.student.path:
    base = pathlib.Path(config.student.path)
  else:
    base = workdir / f"{directory}_base"
    hf.save(lora.base(model), base, tokenizer=tokenizer, generation=_generation_defaults(config))
  peft_export.save(model, workdir / f"{directory}_adapter", base_model_name_or_path=base.resolve())


def _generation_defaults(config):
  stops = {"stop_strings": tuple(config.eval.stop)} if config.eval.stop else {}  # transformers' stop_strings
  return dict(temperature=config.eval.temperature, max_new_tokens=config.eval.max_new_tokens, **stops)


def _probe(config, tokenizer, records, mesh, check, problems, label):
  """(model, length) -> evaluation of the model's own samples (training temperature and truncation) on the
  first `problems` held-out prompts: the curriculum's H and the probe curves over training."""
  subset = [records[i] for i in range(min(problems, len(records)))]
  s = config.sampling

  def measure(model, length):
    return _evaluate(config, model, tokenizer, subset, mesh, check, desc=f"{label} (length {length})",
                     max_new_tokens=length, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                     samples_per_prompt=1, pass_k=(1,), stop=tuple(s.stop), stop_field="sampling.stop")
  return measure


def format_table(rows):
  """Final table: one line per evaluated model (accuracy = Avg@n over n samples per problem)."""
  pass_keys = sorted({k for r in rows.values() for k in r if k.startswith("pass_at_")},
                     key=lambda k: int(k.rsplit("_", 1)[1]))
  pass_keys = [k for k in pass_keys if k != "pass_at_1"]  # Pass@1 is the accuracy column
  header = (f"{'model':<18}{'accuracy':>10}" + "".join(f"{'pass@' + k.rsplit('_', 1)[1]:>9}" for k in pass_keys)
            + f"{'length':>9}{'entropy':>9}{'truncated':>11}")
  lines = [header, "-" * len(header)]
  for name, r in rows.items():
    lines.append(f"{name:<18}{r['accuracy']:>10.3f}" + "".join(f"{r[k]:>9.3f}" for k in pass_keys)
                 + f"{r['mean_length']:>9.1f}{r['entropy']:>9.3f}{r['truncation_rate']:>11.3f}")
  return "\n".join(lines)


def _data(config, models):
  """(tokenizer, training source, held-out records, answer check) of the config, after the preflight
  table of `models` (the sections the job loads) vs the tokenizer: files only, no weights."""
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  preflight.run(config, tokenizer, models)
  for field in ("sampling.stop", "eval.stop"):  # each stop string must encode, before any compute
    data.stop_sequences(tokenizer, tuple(config[field]), field)
  # Every record is length-checked here, before any model is built (data.too_long).
  return (tokenizer, setup.make_source(config, "train", tokenizer), setup.eval_records(config, tokenizer),
          setup.answer_check(config))


def written(workdir, export) -> str:
  """What a run left in `workdir` for its user, one line each (the paths that exist): the `export`
  directory (a Hugging Face checkpoint), results.json, metrics.jsonl, the TensorBoard directory."""
  workdir = pathlib.Path(workdir)
  entries = ((f"{export} export", workdir / export, "Hugging Face checkpoint: hf.load or transformers"),
             ("LoRA adapter", workdir / f"{export}_adapter", "PEFT: PeftModel.from_pretrained on its base"),
             ("results", workdir / "results.json", ""), ("metrics", workdir / "metrics.jsonl", "one JSON line per log"),
             ("TensorBoard", workdir / "tensorboard", f"tensorboard --logdir {workdir / 'tensorboard'}"))
  entries = [(name, path, note) for name, path, note in entries if path.exists()]
  width = max((len(name) for name, _, _ in entries), default=0)
  return "\n".join([f"wrote (workdir {workdir}):"] + [f"  {name:<{width}}  {path}" + (f"  ({note})" if note else "")
                                                     for name, path, note in entries])


def _write_results(workdir, results, meta, examples_of, export):
  """results.json (metrics without examples, FLOPs, curriculum), the table and examples on stdout, then
  what the run wrote (`written`)."""
  summary = {name: {k: v for k, v in r.items() if k != "examples"} for name, r in results.items()}
  # Per phase, and the student / teacher totals; the evaluations before and after training (stored ones
  # from an older version may lack "flops") join the probes' in the eval phase.
  summary["flops"] = flops.accumulate(dict(meta["flops"]),
                                      eval=sum(r.get("flops", 0) for r in results.values()))
  if "curriculum" in meta:
    summary["curriculum"] = meta["curriculum"]
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + format_table(results))
    print(f"\nstudent FLOPs {summary['flops']['student_flops']:.3e}, "
          f"teacher FLOPs {summary['flops']['teacher_flops']:.3e}, "
          f"evaluation FLOPs {summary['flops']['eval_flops']:.3e}")
    for prompt, text, answer, ok in results[examples_of]["examples"]:
      print(f"  {prompt} -> {text!r} (answer {answer}, {'correct' if ok else 'wrong'})")
    print("\n" + written(workdir, export))
  return summary


@workdir_lib.owned
def run_distill(config, workdir):
  """Teacher and student per the config, distillation with config.objective, evaluation before/after."""
  objective = setup.make_objective(config)
  lora_config = setup.make_lora(config.student, "student")
  setup.check_teacher_cache(config, objective)
  curriculum_config = setup.make_curriculum(config, objective)
  mesh = setup.make_mesh(config)
  check_batch_size(config, mesh)  # before any model is loaded or evaluated
  tokenizer, train_source, eval_records, check = _data(config, ("teacher", "student"))
  crossing = objective.cross_tokenizer != "off"  # the teacher reads text with its own tokenizer
  teacher_tokenizer = cross_tokenizer.teacher_tokenizer(config) if crossing else tokenizer
  vocab = config.vocab_size or tokenizer.vocab_size
  common = dict(vocab_size=vocab, tokenizer=tokenizer, source=train_source, mesh=mesh)
  teacher_common = dict(common, tokenizer=teacher_tokenizer, vocab_size=teacher_tokenizer.vocab_size) \
      if crossing else common
  with jax.set_mesh(mesh):
    teacher = _cached_or_fitted(config, config.teacher, "teacher", workdir / "teacher",
                                steps=config.teacher.train_steps,
                                learning_rate=config.teacher.learning_rate, seed=config.seed + 1,
                                **teacher_common)
    student = _cached_or_fitted(config, config.student, "student", workdir / "student_init",
                                steps=config.student.warmup_steps,
                                learning_rate=config.student.warmup_learning_rate, seed=config.seed + 2,
                                **common)
    setup.check_vocabularies(None if crossing else teacher, student, tokenizer)
    cross = cross_tokenizer.make(tokenizer, teacher_tokenizer, student_rows=student.config.vocab_size,
                                 teacher_rows=teacher.config.vocab_size) if crossing else None
    results = {name: _evaluate_stored(config, workdir, name, model, tok, eval_records, mesh, check)
               for name, model, tok in (("teacher", teacher, teacher_tokenizer),
                                        ("student before", student, tokenizer))}
    student = setup.add_adapters(student, lora_config, config.seed + 3)  # student.lora: only adapters train
    cache, cache_flops, teacher_head = None, 0, None
    if config.teacher_cache.enabled:
      preemption.raise_if_requested("before building the teacher trajectory cache")
      cache = workdir / "trajectories"
      cache_flops = trajectories.build(teacher, train_source, tokenizer, config, cache, mesh=mesh)
    curriculum_probe = _probe(config, tokenizer, eval_records, mesh, check, config.curriculum.eval_problems,
                              "curriculum: entropy")
    curriculum_config, h_min_record, h_min_flops = _relative_h_min(config, curriculum_config, curriculum_probe,
                                                                   teacher)
    probe = _probe(config, tokenizer, eval_records, mesh, check, config.eval.probe_problems, "probe")
    if config.teacher_cache.hidden_states:  # the step needs only the stored head: the teacher is freed
      teacher_head, teacher = trajectories.teacher_head(cache, mesh), None
    student, meta = train_stage(config, workdir, student=student, teacher=teacher, objective=objective,
                                tokenizer=tokenizer, source=train_source, mesh=mesh,
                                desc=f"distill ({objective.prefix} prefixes, {objective.kl} KL)",
                                trajectory_cache=cache, cache_flops=cache_flops, teacher_head=teacher_head,
                                cross=cross,
                                curriculum_config=curriculum_config,
                                measure_entropy=curriculum_probe,
                                probe=lambda model: probe(model, config.eval.max_new_tokens))
    results["student after"] = _export_and_evaluate(config, workdir, "student", "student after", student,
                                                    tokenizer, eval_records, mesh, check)
  if curriculum_config is not None:  # the floor the gate used (relative: with the teacher's entropy behind it)
    meta["curriculum"] = dict(meta.get("curriculum", {}), h_min=curriculum_config.h_min, **h_min_record)
    flops.accumulate(meta["flops"], eval=h_min_flops)
  return _write_results(workdir, results, meta, "student after", "student")


def _relative_h_min(config, curriculum_config, measure, teacher):
  """(curriculum config, record, FLOPs): with curriculum.h_min_relative > 0 the gate's floor becomes that
  fraction of the teacher's own entropy, measured by the curriculum's probe (same prompts, sampling settings
  and seed as the student's checks) at the last length, so the floor follows the task instead of a number
  in nats chosen for one teacher."""
  fraction = config.curriculum.h_min_relative
  if curriculum_config is None or not fraction:
    return curriculum_config, {}, 0
  measured = measure(teacher, curriculum_config.lengths[-1])
  h_min = fraction * measured["entropy"]
  logging.warning("curriculum: h_min = %g x the teacher's held-out entropy %.4f = %.4f", fraction,
                  measured["entropy"], h_min)
  return (dataclasses.replace(curriculum_config, h_min=h_min),
          {"h_min_relative": fraction, "teacher_entropy": measured["entropy"]}, measured.get("flops", 0))


@workdir_lib.owned
def run_grpo(config, workdir):
  """GRPO from the student (student.path: e.g. a distilled student's export), evaluated before/after.

  Workdir: student_init/ (only when the inline student is fitted first), checkpoints/ metrics.jsonl
  tensorboard/ of the RL run, policy/ (the trained policy as a Hugging Face checkpoint), results.json.
  """
  rl.check_settings(config)
  lora_config = setup.make_lora(config.student, "student")
  mesh = setup.make_mesh(config)
  check_batch_size(config, mesh)  # before any model is loaded or evaluated
  tokenizer, train_source, eval_records, check = _data(config, ("student",))
  if isinstance(train_source, data.Records):  # chat records may lack one
    data.require_answers(train_source, "GRPO's rewards")
  vocab = config.vocab_size or tokenizer.vocab_size
  with jax.set_mesh(mesh):
    policy = _cached_or_fitted(config, config.student, "student", workdir / "student_init",
                               steps=config.student.warmup_steps,
                               learning_rate=config.student.warmup_learning_rate, seed=config.seed + 2,
                               vocab_size=vocab, tokenizer=tokenizer, source=train_source, mesh=mesh)
    setup.check_vocabularies(None, policy, tokenizer)
    reference = None
    if config.grpo.kl_coef > 0:  # a second, frozen copy of the starting weights
      reference = nnx.clone(policy)
    results = {"policy before": _evaluate_stored(config, workdir, "policy before", policy, tokenizer,
                                                 eval_records, mesh, check)}
    policy = setup.add_adapters(policy, lora_config, config.seed + 3)  # student.lora: only adapters train
    policy, meta = rl.grpo_stage(config, workdir, policy=policy, reference=reference, tokenizer=tokenizer,
                                 source=train_source, mesh=mesh, check=check,
                                 desc=f"grpo (G={config.grpo.group_size})")
    results["policy after"] = _export_and_evaluate(config, workdir, "policy", "policy after", policy,
                                                   tokenizer, eval_records, mesh, check)
  return _write_results(workdir, results, meta, "policy after", "policy")


@workdir_lib.owned
def run_pretrain(config, workdir):
  """Fits the inline `student` model to the data's responses; exports `workdir/model`, evaluates it."""
  mesh = setup.make_mesh(config)
  check_batch_size(config, mesh)  # before any model is loaded or evaluated
  tokenizer, source, eval_records, check = _data(config, ("student",))
  with jax.set_mesh(mesh):
    model = setup.load_model(config.student, "student", config.vocab_size or tokenizer.vocab_size, mesh,
                             config.seed)
    model = _fit_to_data(config, workdir, model, steps=config.steps,
                         learning_rate=config.optimizer.learning_rate, tokenizer=tokenizer, source=source,
                         mesh=mesh, desc="fit to data")
    result = _evaluate(config, model, tokenizer, eval_records, mesh, check, desc="eval: model")
  if jax.process_index() == 0:
    print("\n" + format_table({"model": result}))
    print("\n" + written(workdir, "model"))
  return result
