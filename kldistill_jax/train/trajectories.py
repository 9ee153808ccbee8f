"""Teacher trajectories sampled once and reused: the compute advantage of teacher prefixes.

    flops = trajectories.build(teacher, source, tokenizer, config, workdir / "trajectories", mesh=mesh)
    dataset = trajectories.make_dataset(path, batch_size=..., process_index=..., process_count=...)

`build` samples the teacher on the first `teacher_cache.num_trajectories` training prompts (in the
shuffled training order) and stores step-ready rows (tokens, attention_mask, loss_mask, the sampler's
log-probs as behavior_logprobs and the untempered teacher log-probs as teacher_logprobs). The sampled
estimator then needs no teacher at all during training (teacher_logprobs come from the cache); the exact
estimator re-scores the cached tokens with one teacher forward (no generation), unless
`teacher_cache.top_k` > 0 stored the teacher's top-k log-probs per token too (teacher_topk_ids /
teacher_topk_logprobs, [N, L, k]): the exact forward KL then needs no teacher either. With
`teacher_cache.hidden_states` the rows also hold the teacher's final (post-norm) hidden states
(teacher_hidden, bfloat16 [N, L, D]) and the cache its output head [D, V] once (teacher_head.npy): every
exact KL (forward, reverse, mixed, any loss temperature) is then computed from them through the fused loss,
with no teacher forward and without the teacher's other parameters (`teacher_states`, `teacher_head`).

Layout (it scales with the cache: no host ever holds more than one batch of it in memory):

    trajectories.json                the settings the rows depend on; "complete" and the total
                                     teacher_flops once every shard is written
    teacher_head.npy                 hidden_states only: the teacher's output head [D, V] (its dtype in
                                     trajectories.json; bfloat16 arrays are stored as their uint16 bits)
    process-PPPPP/batch-BBBBBBB/     one shard: process P's rows of global batch B, one .npy per key
        tokens.npy ... shard.json    (shard.json: that batch's teacher FLOPs)

Each process writes only its own rows (no gather of the batch to every host), one shard per build batch,
as soon as the batch is sampled: into a temporary directory, renamed into place (a shard exists whole or
not at all). A killed build resumes at the first batch that some process lacks: batch i is sampled with
key fold_in(seed key, i) from the same prompts, so the result is bitwise the uninterrupted build, and the
teacher FLOPs of finished shards are read back from their shard.json. Storage may be shared or local to
each host: a process reads and writes only its own `process-P` directory (and its own copy of the json).

Plain .npy files, not array_record: a row is a slice of a memory-mapped array (`np.load(mmap_mode="r")`),
with no serialisation format to decode and no extra dependency; a shard is small (one local batch) and
opened when one of its rows is first read.

Reuse and resume check the recorded settings (`SETTINGS`); a difference is an error naming the field and
the cache, which is never deleted or overwritten silently. Not recorded: which teacher sampled the rows
(a workdir holds one teacher).
"""

import functools
import json
import os
import pathlib
import shutil

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from kldistill_jax import data, objectives, sampling
from kldistill_jax.models import sharding
from kldistill_jax.train import distributed, flops, prefixes, setup, teacher_states
from kldistill_jax.train.step import TEACHER_HIDDEN

INFO = "trajectories.json"
SHARD_INFO = "shard.json"
KEYS = ("tokens", "attention_mask", "loss_mask", "behavior_logprobs", "teacher_logprobs")
TOPK_KEYS = objectives.TOPK_KEYS  # stored only when teacher_cache.top_k > 0
HIDDEN_KEYS = (TEACHER_HIDDEN,)  # stored (bfloat16) only when teacher_cache.hidden_states
HEAD_FILE = "teacher_head.npy"
# What the rows depend on: key in trajectories.json -> (the setting's name in errors, its value).
SETTINGS = {
    "top_k": ("teacher_cache.top_k", lambda c: c.teacher_cache.top_k),
    "hidden_states": ("teacher_cache.hidden_states", lambda c: c.teacher_cache.hidden_states),
    "num_trajectories": ("teacher_cache.num_trajectories", lambda c: c.teacher_cache.num_trajectories
                         or c.steps * c.batch_size),
    "batch_size": ("batch_size", lambda c: c.batch_size),
    "process_count": ("jax.process_count()", lambda c: jax.process_count()),
    "seed": ("seed", lambda c: c.seed),  # the sampling keys
    "data_seed": ("data.seed", lambda c: c.data.seed),  # the prompts' order
    "data_source": ("data.source", lambda c: c.data.source),
    "train_path": ("data.train_path", lambda c: c.data.train_path),
    "template": ("data.template", lambda c: c.data.template),
    "system_prompt": ("data.system_prompt", lambda c: c.data.system_prompt),
    "enable_thinking": ("data.enable_thinking", lambda c: c.data.enable_thinking),
    "prompt_len": ("data.prompt_len", lambda c: c.data.prompt_len),
    "max_new_tokens": ("sampling.max_new_tokens", lambda c: c.sampling.max_new_tokens),
    "temperature": ("sampling.temperature", lambda c: c.sampling.temperature),
    "sampling_top_k": ("sampling.top_k", lambda c: c.sampling.top_k),
    "top_p": ("sampling.top_p", lambda c: c.sampling.top_p),
    "stop": ("sampling.stop", lambda c: list(c.sampling.stop)),
}
# What a cache from before a setting was recorded was built with.
_BEFORE_SETTINGS = {"top_k": 0, "hidden_states": False, "system_prompt": "", "enable_thinking": None,
                    "stop": []}


def shard_dir(path, process, batch):
  """The directory of process `process`'s rows of global batch `batch`."""
  return pathlib.Path(path) / f"process-{process:05d}" / f"batch-{batch:07d}"


class TrajectorySource:
  """Random access to one process's rows of a built cache, read lazily (a grain source).

  Row n of process q (of Q) is row n % b of its local batch n // b (b = batch_size / Q), as in
  `data.make_dataset`. When Q is the process count of the build, every row is in the process's own
  shards; otherwise rows come from other processes' shards too (storage shared by the hosts): the
  defaults (process 0 of 1) read every row, in the training order.
  """

  def __init__(self, path, *, process_index=0, process_count=1):
    self._path = pathlib.Path(path)
    info = _read_info(self._path)
    if info is None:
      raise FileNotFoundError(f"no teacher trajectory cache at {self._path} (no {INFO})")
    missing = [key for key in SETTINGS if key not in info and key not in _BEFORE_SETTINGS]
    if missing or not info.get("complete"):
      raise ValueError(f"the teacher trajectory cache at {self._path} is "
                       + (f"in an older format (no {missing[0]})" if missing else "not finished")
                       + "; run trajectories.build (the distill job) to finish or rebuild it")
    if info["batch_size"] % process_count or not 0 <= process_index < process_count:
      raise ValueError(f"process {process_index} of {process_count} cannot read the cache at {self._path}: "
                       f"its global batch_size={info['batch_size']} is not split evenly")
    self._rows_per_shard = info["batch_size"] // info["process_count"]
    self.rows_per_batch = info["batch_size"] // process_count  # this process's rows of a global batch
    self._first_row = process_index * self.rows_per_batch  # within a global batch
    self._batches = info["num_trajectories"] // info["batch_size"]
    self._keys = KEYS + (TOPK_KEYS if info["top_k"] else ()) + (HIDDEN_KEYS if _hidden(info) else ())
    # A few open shards: rows are read in order, by a few prefetch threads at once.
    self._shard = functools.lru_cache(maxsize=8)(self._open)

  def _open(self, process, batch):
    directory = shard_dir(self._path, process, batch)
    return {k: teacher_states.from_disk(np.load(directory / f"{k}.npy", mmap_mode="r"),
                                        teacher_states.DTYPE if k in HIDDEN_KEYS else None)
            for k in self._keys}

  def __len__(self):
    return self._batches * self.rows_per_batch

  def __getitem__(self, index):
    batch, row = divmod(int(index), self.rows_per_batch)
    if not 0 <= batch < self._batches:
      raise IndexError(f"row {index} of a cache with {len(self)} rows for this process")
    process, row = divmod(self._first_row + row, self._rows_per_shard)
    return {k: np.array(v[row]) for k, v in self._shard(process, batch).items()}


def make_dataset(path, *, batch_size, process_index=0, process_count=1):
  """Repeated per-process batches of the cache (same row split as `data.make_dataset`).

  Rows are stored in the shuffled training order, so they are read in order: the first pass sees
  exactly the prompts and teacher samples an online run with the same seed would (a test checks it).
  """
  source = TrajectorySource(path, process_index=process_index, process_count=process_count)
  if batch_size != source.rows_per_batch:
    raise ValueError(f"batch_size={batch_size} rows per process x {process_count} processes differs from "
                     f"the global batch the cache at {path} was built with ({source.rows_per_batch} per "
                     "process); the batch size is part of the cached row order")
  return grain.MapDataset.source(source).repeat(None).batch(batch_size, drop_remainder=True)


def build(teacher, source, tokenizer, config, path, *, mesh):
  """Samples and stores the cache at `path`, or finishes a stopped build; returns the teacher FLOPs."""
  path = pathlib.Path(path)
  settings = {key: value(config) for key, (_, value) in SETTINGS.items()}
  settings = json.loads(json.dumps(settings))  # as read back (tuples become lists)
  info = _read_info(path)
  if info is not None:
    _check_settings(info, settings, path)
    if info.get("complete"):
      return info["teacher_flops"]
  top_k, count = config.teacher_cache.top_k, settings["num_trajectories"]
  hidden = config.teacher_cache.hidden_states
  if hidden and top_k:
    raise ValueError(f"teacher_cache.hidden_states gives the exact KL; teacher_cache.top_k={top_k} would "
                     "store an approximation of it besides: set teacher_cache.top_k=0")
  if top_k > teacher.config.vocab_size:
    raise ValueError(f"teacher_cache.top_k={top_k} exceeds the teacher vocabulary "
                     f"({teacher.config.vocab_size} entries)")
  if count % config.batch_size:
    raise ValueError(f"teacher_cache.num_trajectories={count} must be a multiple of "
                     f"batch_size={config.batch_size}")
  process = jax.process_index()
  # The head before any shard (a resumed build rewrites it: the same teacher), its dtype in the json.
  head = {"teacher_head_dtype": teacher_states.write_head(path / HEAD_FILE, teacher)} if hidden else {}
  _write_json(path / INFO, {**settings, **head})  # before any shard: a resumed build checks them
  batches = count // config.batch_size
  start = _first_missing(path, process, batches)
  if jax.process_count() > 1:  # sampling is collective: every process redoes what any one lacks
    start = int(np.min(multihost_utils.process_allgather(np.int32(start))))
  total_flops = sum(_shard_flops(path, process, i) for i in range(start))
  # The same prompts, in the same order, as the online run would see them.
  dataset = data.make_dataset(source, tokenizer, template=setup.make_template(config),
                              prompt_len=config.data.prompt_len, response_len=config.data.response_len,
                              batch_size=config.batch_size // jax.process_count(), seed=config.data.seed,
                              process_index=process, process_count=jax.process_count())
  keys = KEYS + (TOPK_KEYS if top_k else ()) + (HIDDEN_KEYS if hidden else ())
  base_key = jax.random.key(config.seed)
  for i in range(start, batches):
    local_batch = dict(dataset[i])
    local_batch.pop("index")
    batch, stats = prefixes.from_sampler(teacher, distributed.global_batch(local_batch, mesh),
                                         rng=jax.random.fold_in(base_key, i), settings=config.sampling,
                                         tokenizer=tokenizer, with_model_logprobs=True)
    batch_flops = flops.generation_flops(teacher.config, config.batch_size, config.data.prompt_len,
                                         config.sampling.max_new_tokens,
                                         decode_steps=int(distributed.to_host(stats["max_length"])))
    if top_k:
      batch.update(zip(TOPK_KEYS, sampling.score_topk(teacher, batch["tokens"], batch["attention_mask"],
                                                      k=top_k, chunk_size=config.objective.chunk_size)))
      batch_flops += flops.forward_flops(teacher.config, config.batch_size, batch["tokens"].shape[1])
    if hidden:
      batch[TEACHER_HIDDEN] = teacher_states.hidden_states(teacher, batch["tokens"], batch["attention_mask"])
      batch_flops += flops.forward_flops(teacher.config, config.batch_size, batch["tokens"].shape[1],
                                         lm_head=False)
    directory = shard_dir(path, process, i)
    if not directory.is_dir():  # else written before this process's peers stopped: the same rows
      _write_shard(directory, {k: _own_rows(batch[k], mesh) for k in keys}, batch_flops)
    total_flops += batch_flops
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("teacher trajectory cache written")
  _write_json(path / INFO, {**settings, **head, "complete": True, "teacher_flops": total_flops})
  logging.info("teacher trajectory cache %s: %s", path, teacher_states.describe_bytes(
      stored_bytes_per_token(path), teacher.config.hidden_size, teacher.config.vocab_size))
  return total_flops


def teacher_head(path, mesh):
  """The output head [D, V] a hidden-state cache at `path` stored, on `mesh` (`teacher_states.load_head`)."""
  path = pathlib.Path(path)
  info = _read_info(path)
  if info is None or not _hidden(info) or not (path / HEAD_FILE).is_file():
    raise FileNotFoundError(f"no teacher head at {path / HEAD_FILE}: the cache at {path} was not built "
                            "with teacher_cache.hidden_states=True")
  return teacher_states.load_head(path / HEAD_FILE, info["teacher_head_dtype"], mesh)


def stored_bytes_per_token(path):
  """Bytes per token of the rows a built cache holds (process 0's first shard, read from the .npy
  headers; every shard has the same layout)."""
  total = tokens = 0
  for file in sorted(shard_dir(path, 0, 0).glob("*.npy")):
    array = np.load(file, mmap_mode="r")
    total, tokens = total + array.nbytes, array.shape[0] * array.shape[1]
  return total // tokens


def _hidden(info):
  return info.get("hidden_states", _BEFORE_SETTINGS["hidden_states"])


def _read_info(path):
  file = pathlib.Path(path) / INFO
  return json.loads(file.read_text()) if file.is_file() else None


def _check_settings(info, settings, path):
  for key, value in settings.items():
    name = SETTINGS[key][0]
    if key not in info and key not in _BEFORE_SETTINGS:
      raise ValueError(f"the teacher trajectory cache at {path} records no {key} (an older format); "
                       f"delete {path} to rebuild it with {name}={value!r}")
    recorded = info.get(key, _BEFORE_SETTINGS.get(key))
    if recorded != value:
      raise ValueError(f"{name}={value!r} but the cache at {path} was built with {key}={recorded!r}; "
                       f"set {name}={recorded!r}, use another workdir, or delete {path} to rebuild it")


def _write_json(file, value):
  """Atomically; every process writes its own copy (the same text), so storage may be host-local."""
  file.parent.mkdir(parents=True, exist_ok=True)
  temporary = file.with_name(f".{file.name}.{jax.process_index()}.tmp")
  temporary.write_text(json.dumps(value) + "\n")
  os.replace(temporary, file)


def _first_missing(path, process, batches):
  """Shards are written in order, so the first missing one is where a stopped build resumes."""
  return next((i for i in range(batches) if not shard_dir(path, process, i).is_dir()), batches)


def _shard_flops(path, process, batch):
  return json.loads((shard_dir(path, process, batch) / SHARD_INFO).read_text())["teacher_flops"]


def _own_rows(x, mesh):
  """This process's rows of a global batch array, in the order `distributed.global_batch` took them."""
  x = jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
  blocks = {}
  for shard in x.addressable_shards:  # replicas (the 'tensor' axis) share a start row
    blocks.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def _write_shard(directory, arrays, teacher_flops):
  """Into a temporary directory first, renamed when complete: a killed build leaves no partial shard."""
  temporary = directory.with_name(f".{directory.name}.tmp")
  shutil.rmtree(temporary, ignore_errors=True)  # a write the last build was killed in
  temporary.mkdir(parents=True)
  for key, value in arrays.items():
    with open(temporary / f"{key}.npy", "wb") as f:
      np.save(f, teacher_states.to_disk(value))
      os.fsync(f.fileno())  # a lost machine must not leave a renamed shard with empty files
  (temporary / SHARD_INFO).write_text(json.dumps({"teacher_flops": teacher_flops}) + "\n")
  os.rename(temporary, directory)
