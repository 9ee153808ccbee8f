"""Teacher trajectories sampled once and reused: the compute advantage of teacher prefixes.

    path = trajectories.build(teacher, source, tokenizer, config, workdir / "trajectories")
    dataset = trajectories.make_dataset(path, batch_size=..., seed=..., process_index=..., ...)

`build` samples the teacher on the first `teacher_cache.num_trajectories` training prompts (in the
shuffled training order) and stores step-ready rows (tokens, attention_mask, loss_mask, the sampler's
log-probs as behavior_logprobs and the untempered teacher log-probs as teacher_logprobs) in one .npz.
The sampled estimator then needs no teacher at all during training (teacher_logprobs come from the
file); the exact estimator re-scores the cached tokens with one teacher forward (no generation), unless
`teacher_cache.top_k` > 0 stored the teacher's top-k log-probs per token too (teacher_topk_ids /
teacher_topk_logprobs, [N, L, k]): the exact forward KL then needs no teacher either.
"""

import json
import pathlib

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from kldistill_jax import data, objectives, sampling
from kldistill_jax.train import distributed, flops, prefixes

FILE = "trajectories.npz"
INFO = "trajectories.json"
KEYS = ("tokens", "attention_mask", "loss_mask", "behavior_logprobs", "teacher_logprobs")
TOPK_KEYS = objectives.TOPK_KEYS  # stored only when teacher_cache.top_k > 0


class TrajectorySource:
  """Random access to the rows of a built cache (grain source)."""

  def __init__(self, path):
    file = pathlib.Path(path) / FILE
    if not file.is_file():
      raise FileNotFoundError(f"no teacher trajectory cache at {file}")
    with np.load(file) as arrays:
      self._arrays = {k: arrays[k] for k in KEYS + TOPK_KEYS if k in arrays.files}

  def __len__(self):
    return len(self._arrays["tokens"])

  def __getitem__(self, index):
    return {k: v[index] for k, v in self._arrays.items()}


def build(teacher, source, tokenizer, config, path, *, mesh):
  """Samples and stores the cache at `path` unless a finished one is there; returns its FLOPs."""
  path = pathlib.Path(path)
  info_file = path / INFO
  top_k = config.teacher_cache.top_k
  if info_file.is_file():
    info = json.loads(info_file.read_text())
    if info.get("top_k", 0) != top_k:
      raise ValueError(f"teacher_cache.top_k={top_k} but the cache at {path} was built with top_k="
                       f"{info.get('top_k', 0)}; set teacher_cache.top_k={info.get('top_k', 0)} or delete "
                       f"{path} to rebuild it")
    return info["teacher_flops"]
  if top_k > teacher.config.vocab_size:
    raise ValueError(f"teacher_cache.top_k={top_k} exceeds the teacher vocabulary "
                     f"({teacher.config.vocab_size} entries)")
  count = config.teacher_cache.num_trajectories or config.steps * config.batch_size
  if count % config.batch_size:
    raise ValueError(f"teacher_cache.num_trajectories={count} must be a multiple of "
                     f"batch_size={config.batch_size}")
  # The same prompts, in the same order, as the online run would see them.
  local = config.batch_size // jax.process_count()
  dataset = data.make_dataset(source, tokenizer, template=config.data.template,
                              prompt_len=config.data.prompt_len, response_len=config.data.response_len,
                              batch_size=local, seed=config.data.seed, process_index=jax.process_index(),
                              process_count=jax.process_count())
  keys = KEYS + (TOPK_KEYS if top_k else ())
  rows = {k: [] for k in keys}
  base_key = jax.random.key(config.seed)
  total_flops = 0
  for i in range(count // config.batch_size):
    local_batch = dict(dataset[i])
    local_batch.pop("index")
    batch, stats = prefixes.from_sampler(teacher, distributed.global_batch(local_batch, mesh),
                                         rng=jax.random.fold_in(base_key, i), settings=config.sampling,
                                         tokenizer=tokenizer, with_model_logprobs=True)
    total_flops += flops.generation_flops(teacher.config, config.batch_size, config.data.prompt_len,
                                          int(distributed.to_host(stats["max_length"])))
    if top_k:
      batch.update(zip(TOPK_KEYS, sampling.score_topk(teacher, batch["tokens"], batch["attention_mask"],
                                                      k=top_k, chunk_size=config.objective.chunk_size)))
      total_flops += flops.forward_flops(teacher.config, config.batch_size, batch["tokens"].shape[1])
    for k in keys:
      rows[k].append(distributed.to_host(batch[k]))
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
    temporary = path / (FILE + ".tmp.npz")
    np.savez(temporary, **{k: np.concatenate(v) for k, v in rows.items()})
    temporary.replace(path / FILE)
    info_file.write_text(json.dumps({"num_trajectories": count, "top_k": top_k,
                                     "teacher_flops": total_flops}) + "\n")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("teacher trajectory cache written")
  return total_flops


def make_dataset(path, *, batch_size, process_index=0, process_count=1):
  """Repeated per-process batches of the cache (same row split as `data.make_dataset`).

  Rows are stored in the shuffled training order, so they are read in order: the first pass sees
  exactly the prompts and teacher samples an online run with the same seed would (a test checks it).
  """
  dataset = grain.MapDataset.source(TrajectorySource(path)).repeat(None)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  return dataset[process_index::process_count]
