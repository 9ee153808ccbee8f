"""Config -> the parts of a run (mesh, tokenizer, data sources, teacher, student, objective), each
validated with an error that names the config field before any compute starts."""

import os
import pathlib

import jax
from flax import nnx

from kldistill_jax import data, objectives
from kldistill_jax.errors import MissingFileError, UnreadableFileError, UserError
from kldistill_jax.models import ModelConfig, hf, lora, sharding
from kldistill_jax.models.config import REMAT
from kldistill_jax.train import curriculum

MODEL_FIELDS = ("family", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings", "rope_theta", "rms_norm_eps", "qk_norm", "qkv_bias")


def make_mesh(config):
  """('data', 'fsdp', 'tensor') mesh over every device; mesh.data = -1 takes what the others leave."""
  m, count = config.mesh, jax.device_count()
  data_size = m.data
  if data_size == -1:
    if count % (m.fsdp * m.tensor):
      raise UserError(f"mesh.fsdp={m.fsdp} x mesh.tensor={m.tensor} does not divide the {count} devices")
    data_size = count // (m.fsdp * m.tensor)
  if data_size < 1 or m.fsdp < 1 or m.tensor < 1 or data_size * m.fsdp * m.tensor != count:
    raise UserError(f"mesh.data={m.data} x mesh.fsdp={m.fsdp} x mesh.tensor={m.tensor} must multiply to "
                    f"the {count} devices (use mesh.data=-1 to fill)")
  return sharding.make_mesh(data_size, m.fsdp, m.tensor)


def make_objective(config):
  """The Objective of config.objective, checked against config.sampling (`check_sampled_estimator`)."""
  o = config.objective
  objective = objectives.Objective(prefix=o.prefix, kl=o.kl, lam=o.lam, estimator=o.estimator,
                                   temperature=o.temperature, discount=o.discount, clip=o.clip,
                                   chunk_size=o.chunk_size, cross_tokenizer=o.cross_tokenizer)
  check_sampled_estimator(config, objective)
  return objective


def check_sampled_estimator(config, objective):
  """The sampled estimator stays unbiased for its distribution under config.sampling, or this raises.

  Its tokens are drawn by the sampler (temperature, top-k, top-p) at either prefix source. The reverse
  KL's importance weights q_θ / sampler (`objectives.compute`) correct a different temperature, not a
  sampler that never draws some tokens q_θ can emit (greedy, top-k, top-p): refused. The forward KL's
  cross-entropy on teacher draws has no weights, so its draws must be the teacher at
  objective.temperature; nor do per-token weights correct the reward-to-go (objective.discount > 0) at
  student prefixes.
  """
  if objective.estimator != "sampled":
    return
  s = config.sampling
  if s.temperature == 0:
    raise UserError("sampling.temperature=0 (greedy) with objective.estimator='sampled': a greedy sampler "
                    "never draws the tokens other than the argmax, so no importance weight makes the "
                    "estimate unbiased; use sampling.temperature > 0 or objective.estimator='exact'")
  truncation = [f"sampling.{name}={value}" for name, value, off in
                (("top_k", s.top_k, s.top_k == 0), ("top_p", s.top_p, s.top_p >= 1.0)) if not off]
  if truncation:
    raise UserError(f"{', '.join(truncation)} with objective.estimator='sampled': the truncated sampler "
                    "never draws tokens the trained distribution can emit, so no importance weight makes "
                    "the estimate unbiased; use sampling.top_k=0 and sampling.top_p=1.0, or "
                    "objective.estimator='exact'")
  if s.temperature == objective.temperature:
    return
  mismatch = f"sampling.temperature={s.temperature} vs objective.temperature={objective.temperature}"
  if objective.reverse_weight < 1:
    raise UserError(f"{mismatch} with objective.kl={objective.kl!r}, estimator='sampled': the sampled "
                    "forward KL is a cross-entropy on teacher draws at objective.temperature (no importance "
                    "weights); set the two temperatures equal or use objective.estimator='exact'")
  if objective.prefix == "student" and objective.discount > 0:
    raise UserError(f"{mismatch} with objective.discount={objective.discount}: the per-token importance "
                    "weights do not correct the future rewards of the reward-to-go; set the two "
                    "temperatures equal or objective.discount=0")


def check_teacher_cache(config, objective):
  if not config.teacher_cache.enabled:
    if config.teacher_cache.top_k:
      raise UserError(f"teacher_cache.top_k={config.teacher_cache.top_k} needs teacher_cache.enabled=True")
    if config.teacher_cache.hidden_states:
      raise UserError("teacher_cache.hidden_states=True needs teacher_cache.enabled=True")
    return
  if objective.prefix != "teacher":
    raise UserError(f"teacher_cache.enabled needs objective.prefix='teacher', got {objective.prefix!r}")
  if objective.estimator == "sampled" and objective.temperature != 1.0:
    raise UserError("teacher_cache stores the teacher's log-probs at temperature 1; the sampled estimator "
                    f"with objective.temperature={objective.temperature} would need them tempered")
  top_k = config.teacher_cache.top_k
  if top_k < 0:
    raise UserError(f"teacher_cache.top_k must be >= 0 (0 = off), got {top_k}")
  if top_k and (objective.kl, objective.estimator) != ("forward", "exact"):
    raise UserError(f"teacher_cache.top_k={top_k} serves only the exact forward KL (objective.kl='forward', "
                    f"objective.estimator='exact': the sft cell), got kl={objective.kl!r}, "
                    f"estimator={objective.estimator!r}")
  if top_k and objective.temperature != 1.0:
    raise UserError(f"teacher_cache.top_k={top_k} stores the teacher's log-probs at temperature 1; "
                    f"objective.temperature={objective.temperature} would need them tempered")
  if config.teacher_cache.hidden_states:
    if objective.estimator != "exact":
      raise UserError("teacher_cache.hidden_states=True serves objective.estimator='exact' (the full-"
                      "vocabulary KL from the cached states); the sampled estimator already runs no teacher "
                      "on the cache's per-token log-probs")
    if top_k:
      raise UserError(f"teacher_cache.hidden_states=True gives the exact KL; teacher_cache.top_k={top_k} "
                      "would store an approximation of it besides: set teacher_cache.top_k=0")


def make_curriculum(config, objective):
  """The CurriculumConfig of config.curriculum, or None when it is off."""
  c = config.curriculum
  if not c.enabled:
    return None
  if objective.prefix == "dataset" or config.teacher_cache.enabled:
    raise UserError("curriculum.enabled changes the sampled training length: it needs sampled prefixes "
                    "(objective.prefix 'student' or 'teacher' without teacher_cache)")
  if c.eval_problems < 1:
    raise UserError(f"curriculum.eval_problems must be >= 1, got {c.eval_problems}")
  if not 0 <= c.h_min_relative < float("inf"):
    raise UserError(f"curriculum.h_min_relative must be a finite number >= 0 (0 = off), got {c.h_min_relative}")
  return curriculum.CurriculumConfig(lengths=tuple(c.lengths), stage_steps=c.stage_steps, h_min=c.h_min)


def make_template(config):
  """The `data.Template` of data.template / data.system_prompt / data.enable_thinking."""
  d = config.data
  return data.Template(kind=d.template, system_prompt=d.system_prompt, enable_thinking=d.enable_thinking)


def _check_lengths(config, source, tokenizer, *, held_out):
  """`source` checked against data.prompt_len (and, for training records, data.response_len) before any
  compute; records that do not fit raise or are dropped per data.too_long (see `data.validate`)."""
  d = config.data
  return data.check_lengths(source, tokenizer, template=make_template(config), prompt_len=d.prompt_len,
                            response_len=None if held_out else d.response_len, too_long=d.too_long,
                            what="held-out records" if held_out else "training records")


def make_source(config, split, tokenizer=None):
  """Records of `split` ("train" or the held-out config.eval.split) from config.data.source; with
  `tokenizer`, length-checked (`data.check_lengths`: training lengths for "train", prompts otherwise)."""
  source = _read_source(config, split)
  if tokenizer is None:
    return source
  return _check_lengths(config, source, tokenizer, held_out=split != "train")


def _read_source(config, split):
  d = config.data
  if d.source == "arithmetic":
    train = split == "train"
    return data.ArithmeticTask(d.num_train if train else config.eval.num_problems,
                               tuple(d.difficulties if train else config.eval.difficulties), seed=d.seed,
                               split=split)
  if d.source in ("gsm8k", "math", "chat"):
    path = d.train_path if split == "train" else d.eval_path
    if not path:
      raise UserError(f"data.source={d.source!r} needs data.train_path and data.eval_path (JSONL files)")
    return data.read_jsonl(path, d.source)
  if d.source == "tfds":
    return data.tfds_source(d.tfds_name, split if split == "train" else d.tfds_eval_split, d.tfds_data_dir,
                            d.prompt_key, d.response_key, d.answer_key or None)
  raise UserError(f"data.source must be 'arithmetic', 'gsm8k', 'math', 'chat' or 'tfds', got {d.source!r}")


def eval_records(config, tokenizer=None):
  """The held-out records: the config.eval.benchmarks files (each record tagged with its benchmark name),
  else the config.eval.split of config.data.source; with `tokenizer`, their prompts are length-checked."""
  records = _read_eval_records(config)
  if isinstance(records, data.Records):  # chat records may lack one
    data.require_answers(records, "the held-out evaluation")
  return records if tokenizer is None else _check_lengths(config, records, tokenizer, held_out=True)


def _read_eval_records(config):
  if not config.eval.benchmarks:
    return _read_source(config, config.eval.split)
  records, origins, names = [], [], set()
  for spec in config.eval.benchmarks:
    try:
      benchmark = data.read_benchmark(spec)
    except ValueError as e:
      raise UserError(f"eval.benchmarks: {e}") from e
    name = benchmark[0]["benchmark"]
    if name in names:
      raise UserError(f"eval.benchmarks names {name!r} twice: each benchmark is its own group in results")
    names.add(name)
    records += benchmark
    origins += benchmark.origins
  return data.Records(records, origins)


def answer_check(config):
  """(completion text, reference answer) -> bool for the held-out records (eval_records)."""
  if config.data.source == "arithmetic" and not config.eval.benchmarks:
    return data.is_correct
  from kldistill_jax import rewards  # pylint: disable=g-import-not-at-top
  return rewards.is_correct


def check_checkpoint_dir(field, path):
  path = pathlib.Path(path)
  if not path.is_dir():
    raise MissingFileError(f"{field}={str(path)!r}: checkpoint directory does not exist")
  if not os.access(path, os.R_OK | os.X_OK):
    raise UnreadableFileError(f"{field}={str(path)!r}: checkpoint directory is not readable")
  if not (path / hf.CONFIG_FILE).is_file():
    raise MissingFileError(f"{field}={str(path)!r}: no {hf.CONFIG_FILE} in the checkpoint directory")


def inline_model_config(section, vocab_size, field):
  """A ModelConfig from an inline `teacher.model` / `student.model` ConfigDict."""
  values = section.model.to_dict()
  unknown = sorted(set(values) - set(MODEL_FIELDS))
  if unknown:
    raise UserError(f"{field}.model has unknown fields {unknown} (known: {', '.join(MODEL_FIELDS)})")
  return ModelConfig(vocab_size=vocab_size, param_dtype=section.param_dtype,
                     compute_dtype=section.compute_dtype, remat=section.remat,
                     attention=section.attention, **values)


def load_model(section, field, vocab_size, mesh, seed, path=None):
  """`path` (default section.path) as a sharded Transformer, or a fresh one from the inline config."""
  if section.remat not in REMAT:
    raise UserError(f"{field}.remat must be one of {', '.join(REMAT)}, got {section.remat!r}")
  path = path or section.path
  if path:
    check_checkpoint_dir(f"{field}.path", path)
    model = hf.load(path, dtype=section.param_dtype, compute_dtype=section.compute_dtype, mesh=mesh,
                    attention=section.attention)
    model.config = model.config.replace(remat=section.remat)
    return model
  config = inline_model_config(section, vocab_size, field)
  from kldistill_jax.models import Transformer  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed)))
  shardings = sharding.param_shardings(nnx.state(abstract), mesh)

  def init():
    return nnx.state(Transformer(config, rngs=nnx.Rngs(seed)))

  graphdef = nnx.graphdef(abstract)
  state = jax.jit(init, out_shardings=shardings)()  # each parameter created on its shard
  return nnx.merge(graphdef, state)


def make_lora(section, field):
  """The `lora.LoraConfig` of `<field>.lora` (None when its rank is 0), checked before any model loads."""
  c = section.lora
  if c.rank == 0:
    return None
  try:
    return lora.LoraConfig(rank=c.rank, alpha=float(c.alpha), targets=tuple(c.targets))
  except UserError as e:  # its messages start with the field ("lora.rank must ..."): say whose
    raise UserError(f"{field}.{e}") from e


def add_adapters(model, lora_config, seed):
  """`model` with fresh LoRA adapters (the same outputs; only the adapters train), or as it is when
  `lora_config` is None (full fine-tuning)."""
  if lora_config is None:
    return model
  return lora.add(model, lora_config, rngs=nnx.Rngs(seed))


def check_vocabularies(teacher, student, tokenizer):
  if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
    raise UserError(f"teacher vocabulary ({teacher.config.vocab_size} entries) and student vocabulary "
                    f"({student.config.vocab_size} entries) differ: token-level KL needs one vocabulary")
  for name, model in (("teacher", teacher), ("student", student)):
    if model is not None and tokenizer.vocab_size > model.config.vocab_size:
      raise UserError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the {name} "
                      f"vocabulary has {model.config.vocab_size}")
