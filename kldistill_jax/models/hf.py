"""Hugging Face checkpoints (config.json + safetensors) <-> `Transformer`, without torch.

    model = hf.load("/ckpt/Qwen3-0.6B", dtype="bfloat16", mesh=mesh)  # each tensor read onto its shards
    hf.save(model, "/out")  # transformers.AutoModelForCausalLM.from_pretrained("/out") gives the same logits
    tokenizer = hf.load_tokenizer("/ckpt/Qwen3-0.6B")
    hf.save(model, "/out", dtype="bfloat16", tokenizer=tokenizer, generation=dict(temperature=0.0))  # + chat

Tensor names follow from the model's own variable paths: layer 3 of the stacked
`layers/self_attn/q_proj/kernel` [layers, in, out] <-> `model.layers.3.self_attn.q_proj.weight`, transposed
(our kernels are [in, out], torch's Linear weights [out, in]); `scale` <-> `weight`; `embed_tokens` <->
`model.embed_tokens.weight`; `lm_head/kernel` <-> `lm_head.weight` (absent from the files when the
embeddings are tied). Local directories only: nothing is downloaded (fetch hub checkpoints first, e.g.
with `huggingface-cli download`).
"""

import contextlib
import json
import os
import pathlib
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from kldistill_jax.errors import MissingFileError, UserError
from kldistill_jax.models import lora, rope, sharding
from kldistill_jax.models.config import Llama3RopeScaling, ModelConfig
from kldistill_jax.models.transformer import Transformer

CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
_FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}  # model_type == family
_MAX_POSITIONS = {"qwen3": 32768, "qwen2": 32768, "llama": 2048}  # transformers' defaults when absent
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers that old checkpoints stored


# ---------------------------------------------------------------------------------------------- config

def config_from_hf(hf_config: dict, *, source: str = CONFIG_FILE) -> ModelConfig:
  """A `ModelConfig` from a transformers config dict (4.x or 5.x layout); `source` names it in errors."""
  def fail(message):
    raise UserError(f"{source}: {message}")

  architectures = hf_config.get("architectures") or []
  if architectures:
    if architectures[0] not in ARCHITECTURES:
      fail(f"unsupported architecture {architectures[0]!r} (supported: {', '.join(ARCHITECTURES)})")
    family = ARCHITECTURES[architectures[0]]
  elif hf_config.get("model_type") in _FAMILY_ARCHITECTURE:
    family = hf_config["model_type"]
  else:
    fail(f"unsupported model_type {hf_config.get('model_type')!r} and no supported `architectures` "
         f"(supported: {', '.join(ARCHITECTURES)})")

  if hf_config.get("hidden_act", "silu") != "silu":
    fail(f"unsupported hidden_act {hf_config['hidden_act']!r} (only 'silu')")
  if family != "qwen2" and hf_config.get("attention_bias"):
    fail(f"attention_bias=True is not supported for {family} (it adds an o_proj bias)")
  if hf_config.get("mlp_bias"):
    fail("mlp_bias=True is not supported")
  layer_types = hf_config.get("layer_types") or []
  if hf_config.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
    fail("sliding-window attention is not supported")

  # transformers 5: {"rope_parameters": {"rope_theta", "rope_type", ...}}; 4.x: top-level rope_theta and
  # an optional `rope_scaling` dict keyed by "rope_type" (or the older "type").
  rope_config = dict(hf_config.get("rope_scaling") or {})
  rope_config.update(hf_config.get("rope_parameters") or {})
  rope_type = rope_config.get("rope_type", rope_config.get("type", "default"))
  if rope_type == "default":
    rope_scaling = None
  elif rope_type == "llama3":
    missing = [k for k in _LLAMA3_KEYS if k not in rope_config]
    if missing:
      fail(f"llama3 rope scaling lacks {missing}")
    rope_scaling = Llama3RopeScaling(
        factor=float(rope_config["factor"]), low_freq_factor=float(rope_config["low_freq_factor"]),
        high_freq_factor=float(rope_config["high_freq_factor"]),
        original_max_position_embeddings=int(rope_config["original_max_position_embeddings"]))
  else:
    fail(f"unsupported rope type {rope_type!r} (supported: 'default', 'llama3')")
  if rope_config.get("partial_rotary_factor", 1.0) != 1.0:
    fail("partial_rotary_factor != 1 is not supported")

  try:
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    sizes = dict(vocab_size=hf_config["vocab_size"], hidden_size=hidden,
                 intermediate_size=hf_config["intermediate_size"], num_layers=hf_config["num_hidden_layers"],
                 num_heads=heads)
  except KeyError as e:
    fail(f"missing key {e.args[0]!r}")
  dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
  return ModelConfig(
      **sizes,
      num_kv_heads=hf_config.get("num_key_value_heads") or heads,
      head_dim=hf_config.get("head_dim") or hidden // heads,
      family=family, qk_norm=family == "qwen3", qkv_bias=family == "qwen2",
      tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      rope_theta=float(rope_config.get("rope_theta", hf_config.get("rope_theta", 10_000.0))),
      rope_scaling=rope_scaling,
      max_position_embeddings=int(hf_config.get("max_position_embeddings", _MAX_POSITIONS[family])),
      param_dtype=dtype if dtype in _DTYPES else "float32")


def config_to_hf(config: ModelConfig) -> dict:
  """The transformers 5 config dict (`AutoConfig`-loadable) of `config`."""
  expected = (config.family == "qwen3", config.family == "qwen2")
  if (config.qk_norm, config.qkv_bias) != expected:
    raise UserError(f"family {config.family!r} has qk_norm={expected[0]}, qkv_bias={expected[1]} in "
                    f"transformers, got qk_norm={config.qk_norm}, qkv_bias={config.qkv_bias}")
  rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling is not None:
    rope_parameters.update(rope_type="llama3", **{k: getattr(config.rope_scaling, k) for k in _LLAMA3_KEYS})
  hf_config = {
      "architectures": [_FAMILY_ARCHITECTURE[config.family]],
      "model_type": config.family,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "rope_parameters": rope_parameters,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings,
      "dtype": config.param_dtype,
      "use_cache": True,
  }
  if config.family != "qwen2":
    hf_config["attention_bias"] = False
  if config.family == "llama":
    hf_config["mlp_bias"] = False
  return hf_config


def read_config(path) -> ModelConfig:
  """The `ModelConfig` of the checkpoint directory `path`."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise MissingFileError(f"checkpoint directory {path} does not exist (hf.load reads local directories "
                           f"only; download hub checkpoints first)")
  config_file = path / CONFIG_FILE
  if not config_file.is_file():
    raise MissingFileError(f"{config_file} not found: {path} is not a Hugging Face checkpoint directory")
  try:
    hf_config = json.loads(config_file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read {config_file}: {e}") from e
  if not isinstance(hf_config, dict):
    raise UserError(f"{config_file} does not hold a JSON object")
  return config_from_hf(hf_config, source=str(config_file))


# ----------------------------------------------------------------------------------------------- names

def _hf_tensors(keypath, shape):
  """[(safetensors name, stored transposed, layer or None, shape in our layout)] of an nnx variable: a
  variable of the stacked `layers` ([num_layers, ...]) holds one tensor per layer."""
  keys = [str(k) for k in keypath]
  if keys == ["embed_tokens"]:
    return [("model.embed_tokens.weight", False, None, tuple(shape))]
  leaf = {"kernel": "weight", "scale": "weight"}.get(keys[-1], keys[-1])
  transpose = keys[-1] == "kernel"
  if keys[0] == "layers":
    rest = ".".join(keys[1:-1] + [leaf])
    return [(f"model.layers.{i}.{rest}", transpose, i, tuple(shape[1:])) for i in range(shape[0])]
  prefix = "" if keys[0] == "lm_head" else "model."
  return [(prefix + ".".join(keys[:-1] + [leaf]), transpose, None, tuple(shape))]


def _file_shape(transpose, shape):
  return shape[::-1] if transpose else shape


def _buffer_value(config, keypath, var):
  """Non-parameter variables are not stored in checkpoints: recompute them from the config (the same
  for every layer of the stack)."""
  if keypath[-1] == "inv_freq":
    value = rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    return np.broadcast_to(np.asarray(value, var.dtype), var.shape)
  raise ValueError(f"hf.load cannot fill the non-parameter variable {'/'.join(map(str, keypath))}")


class _Checkpoint:
  """Tensor name -> (file, lazily read memory-mapped slice) over one file or an index of shards."""

  def __init__(self, path, stack):
    single, index = path / WEIGHTS_FILE, path / INDEX_FILE
    if single.is_file():  # transformers' order of preference
      files = [single]
    elif index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the weight_map of {index}: {e!r}") from e
      files = [path / name for name in sorted(set(weight_map.values()))]
      for file in files:
        if not file.is_file():
          raise MissingFileError(f"{file}, listed in {index}, does not exist")
    else:
      raise MissingFileError(f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    self.description = str(single if single.is_file() else index)
    self.file_of, self._handles = {}, {}
    for file in files:
      handle = stack.enter_context(safe_open(str(file), framework="numpy"))
      self._handles[file] = handle
      self.file_of.update({name: file for name in handle.keys()})

  def shape(self, name):
    return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

  def slice(self, name):
    return self._handles[self.file_of[name]].get_slice(name)


def _reader(tensor_slice, transpose, dtype):
  """index (tuple of slices into OUR layout) -> numpy array of that block, read from the file."""
  def read(index):
    index = tuple(index)
    block = tensor_slice[index[::-1]].T if transpose else tensor_slice[index]
    return np.asarray(block).astype(dtype, copy=False)
  return read


def _stacked_reader(readers):
  """The same for a stacked variable [layers, ...]: the layers the index selects, each from its tensor."""
  def read(index):
    index = tuple(index)
    return np.stack([readers[i](index[1:]) for i in range(len(readers))[index[0]]])
  return read


# ------------------------------------------------------------------------------------------- load/save

def load(path, *, dtype=None, compute_dtype=None, mesh=None, attention="auto") -> Transformer:
  """The `Transformer` of the checkpoint directory `path`, each tensor placed on its shard as it is read.

  dtype: parameter dtype (default: the checkpoint's `dtype`, float32 when it names none); compute_dtype:
  activation dtype (default float32); mesh: a ('data', 'fsdp', 'tensor') mesh (`sharding.make_mesh`), the
  parameters then carry `sharding.param_shardings` and every device reads only its own block; attention:
  `ModelConfig.attention` (not stored in config.json).
  """
  path = pathlib.Path(path)
  config = read_config(path).replace(attention=attention)
  if dtype is not None:
    config = config.replace(param_dtype=jnp.dtype(dtype).name)
  if compute_dtype is not None:
    config = config.replace(compute_dtype=jnp.dtype(compute_dtype).name)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))  # no random init
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  shardings = dict(nnx.to_flat_state(sharding.param_shardings(state, mesh))) if mesh is not None else {}
  with contextlib.ExitStack() as stack:
    checkpoint = _Checkpoint(path, stack)
    _check_names_and_shapes(checkpoint, config, flat, path / CONFIG_FILE)
    values = []
    for keypath, var in flat:
      if isinstance(var, nnx.Param):
        readers = [_reader(checkpoint.slice(name), transpose, var.dtype)
                   for name, transpose, _, _ in _hf_tensors(keypath, var.shape)]
        read = _stacked_reader(readers) if keypath[0] == "layers" else readers[0]
      else:
        buffer = _buffer_value(config, keypath, var)
        read = lambda index, buffer=buffer: buffer[tuple(index)]
      if mesh is None:
        value = jax.device_put(read((slice(None),) * len(var.shape)))
      else:
        value = jax.make_array_from_callback(var.shape, shardings[keypath], read)
      values.append((keypath, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(values))


def _check_names_and_shapes(checkpoint, config, flat, config_file):
  expected = {}
  for keypath, var in flat:
    if isinstance(var, nnx.Param):
      for name, transpose, _, shape in _hf_tensors(keypath, var.shape):
        expected[name] = _file_shape(transpose, shape)
  missing = [name for name in expected if name not in checkpoint.file_of]
  if missing:
    raise UserError(f"checkpoint {checkpoint.description} lacks {len(missing)} tensor(s) that {config_file} "
                    f"implies: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
  def ignorable(name):  # tied checkpoints may still carry the (unused) head, as transformers ignores it
    return _IGNORED.search(name) or (name == "lm_head.weight" and config.tie_word_embeddings)
  extra = sorted(name for name in checkpoint.file_of if name not in expected and not ignorable(name))
  if extra:
    listed = ", ".join(f"{name} (in {checkpoint.file_of[name]})" for name in extra[:8])
    raise UserError(f"{len(extra)} unexpected tensor(s) that {config_file} does not imply: {listed}"
                    f"{' ...' if len(extra) > 8 else ''}")
  for name, shape in expected.items():
    if checkpoint.shape(name) != shape:
      raise UserError(f"tensor {name!r} in {checkpoint.file_of[name]} has shape {checkpoint.shape(name)}, "
                      f"but {config_file} implies {shape}")


def _to_host(array):
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def _safetensors_header(tensors, dtype):
  """The header bytes of a safetensors file holding `tensors` [(name, transpose, shape, ...)] back to back."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, transpose, shape, *_ in tensors:
    shape = list(_file_shape(transpose, shape))
    size = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape,
                    "data_offsets": [offset, offset + size]}
    offset += size
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes
  return struct.pack("<Q", len(header_bytes)) + header_bytes


def save(model: Transformer, path, *, dtype=None, tokenizer=None, generation=None):
  """Writes `path`/config.json and `path`/model.safetensors (torch layout), one tensor on the host at a time,
  and with `tokenizer` or `generation` what transformers and serving engines need to chat with the directory.

  dtype: store the parameters in this dtype, written as config.json's `dtype` too (default: the model's own,
  a lossless round trip; "bfloat16" halves an export of float32 masters). tokenizer: a `kldistill_jax.data`
  tokenizer (the built-in char one is written as an equivalent `tokenizers` file) or a transformers one; its
  files (chat template included) are written next to the weights. generation: default sampling settings
  (`generation_config` keywords: temperature, top_k, top_p, max_new_tokens). generation_config.json gets the
  tokenizer's EOS / pad / BOS ids and those settings. Every process must call it (sharded arrays are
  gathered); process 0 writes. A model with LoRA adapters is saved merged (`lora.merge`; `peft_export`
  writes the adapters alone).
  """
  path = pathlib.Path(path)
  model = lora.merge(model)  # LoRA adapters folded into their kernels: transformers sees plain weights
  ids = _special_ids(tokenizer) if tokenizer is not None else {}
  generation_json = generation_config(**ids, **(generation or {})) if tokenizer is not None or generation else None
  config = model.config if dtype is None else model.config.replace(param_dtype=jnp.dtype(dtype).name)
  if config.param_dtype not in _SAFETENSORS_DTYPES:
    raise UserError(f"cannot save parameters as {config.param_dtype} (supported: {', '.join(_DTYPES)})")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  # (name, transpose, shape, variable, layer): one entry per stored tensor, written in name order.
  tensors = sorted(((name, transpose, shape, var, layer) for keypath, var in flat
                    for name, transpose, layer, shape in _hf_tensors(keypath, var.shape)), key=lambda e: e[0])
  writer = jax.process_index() == 0
  temporary = path / (WEIGHTS_FILE + ".tmp")
  with contextlib.ExitStack() as stack:
    if writer:
      path.mkdir(parents=True, exist_ok=True)
      f = stack.enter_context(open(temporary, "wb"))
      f.write(_safetensors_header(tensors, config.param_dtype))
    for _, transpose, _, var, layer in tensors:  # one layer of a stacked variable at a time on the host
      array = _to_host(var[...] if layer is None else var[...][layer]).astype(config.param_jnp_dtype, copy=False)
      if writer:
        f.write(np.ascontiguousarray(array.T if transpose else array).tobytes())
  if writer:  # config.json last: its presence marks a complete export (the runner's stage cache)
    os.replace(temporary, path / WEIGHTS_FILE)
    if tokenizer is not None:
      tokenizer.save_pretrained(str(path))
    if generation_json is not None:
      (path / GENERATION_FILE).write_text(json.dumps(generation_json, indent=2) + "\n")
    (path / CONFIG_FILE).write_text(json.dumps(config_to_hf(config), indent=2) + "\n")


def generation_config(*, eos_token_id=None, pad_token_id=None, bos_token_id=None, temperature=None, top_k=0,
                      top_p=1.0, max_new_tokens=None, stop_strings=()) -> dict:
  """The generation_config.json dict of our sampler's settings: temperature 0 is greedy (`do_sample`
  false); top_k 0 and top_p 1 are off (written as such: transformers' own default is top_k 50); None leaves
  a setting to the loader's default. eos_token_id: an id or a list (every id that ends a turn).
  stop_strings: written as `stop_strings` (transformers' `generate` needs `tokenizer=` to apply them)."""
  if temperature is not None and temperature < 0:
    raise UserError(f"temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0 or top_k < 0:
    raise UserError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
  out = {}
  for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                     ("pad_token_id", pad_token_id), ("max_new_tokens", max_new_tokens)):
    if value is not None:
      out[key] = [int(i) for i in value] if isinstance(value, (list, tuple)) else int(value)
  if temperature is not None:
    out["do_sample"] = temperature > 0
    if temperature > 0:
      out.update(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  if stop_strings:
    out["stop_strings"] = [str(s) for s in stop_strings]
  return out


def _special_ids(tokenizer) -> dict:
  """EOS / pad / BOS ids of a `kldistill_jax.data` tokenizer (eos_ids, pad_id) or a transformers one."""
  if hasattr(tokenizer, "eos_ids"):
    eos, pad, bos = list(tokenizer.eos_ids), tokenizer.pad_id, getattr(tokenizer, "bos_id", None)
  else:
    eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    pad = eos if pad is None else pad
  if eos is None or eos == []:
    raise UserError(f"tokenizer {type(tokenizer).__name__} defines no EOS token: exports need one")
  return dict(eos_token_id=eos, pad_token_id=pad, bos_token_id=bos)


def load_tokenizer(path):
  """`transformers.AutoTokenizer` of a local checkpoint directory (chat template included)."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise MissingFileError(f"tokenizer directory {path} does not exist (local directories only)")
  if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
    raise MissingFileError(f"{path} has neither tokenizer.json nor tokenizer_config.json")
  import transformers  # pylint: disable=g-import-not-at-top  (only tokenizers need it)
  try:
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot load a tokenizer from {path}: {e}") from e
