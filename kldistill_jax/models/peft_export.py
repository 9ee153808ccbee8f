"""A model's LoRA adapters as a PEFT adapter directory, loadable onto the Hugging Face base model:

    peft_export.save(model, "/out/adapter", base_model_name_or_path="/ckpt/Qwen3-0.6B")
    # torch side: peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "/out/adapter")

Writes adapter_config.json (peft_type LORA, r, lora_alpha, target_modules) and adapter_model.safetensors
with PEFT's tensor names, `base_model.model.<HF module>.lora_A.weight` = A^T [r, in] and `lora_B.weight` =
B^T [out, r] (torch Linear layout), in float32. Layers stacked on a leading axis are written one per layer.
No torch: the file is written with safetensors' numpy API.
"""

import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from kldistill_jax.errors import UserError
from kldistill_jax.models import lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_LEAVES = {"lora_a": "lora_A", "lora_b": "lora_B"}


def _to_host(array):
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def _hf_module(path) -> str:
  """Our module path ('layers', 3, 'self_attn', 'q_proj') -> Hugging Face's 'model.layers.3.self_attn.q_proj'."""
  return ".".join(["model", *map(str, path)])


def adapter_tensors(model) -> dict:
  """{PEFT tensor name: float32 numpy array in torch layout} of every adapter of `model`."""
  tensors = {}
  for keypath, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    *module, _, leaf = keypath  # (..., 'q_proj', 'lora', 'lora_a')
    array = _to_host(var[...]).astype(np.float32)
    if array.ndim == 3:  # every layer's adapter stacked on a leading axis: one tensor per layer
      if module[0] != "layers":
        raise ValueError(f"stacked adapter outside `layers`: {'/'.join(map(str, keypath))}")
      layers = [(["layers", i, *module[1:]], array[i]) for i in range(array.shape[0])]
    else:
      layers = [(module, array)]
    for path, matrix in layers:
      tensors[f"base_model.model.{_hf_module(path)}.{_LEAVES[leaf]}.weight"] = np.ascontiguousarray(matrix.T)
  return tensors


def adapter_config(config: lora.LoraConfig, base_model_name_or_path=None) -> dict:
  """PEFT's LoraConfig as JSON for adapters made with `config` (plain LoRA: no dropout, bias, rsLoRA, DoRA)."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
          "target_modules": sorted(config.targets), "lora_dropout": 0.0, "bias": "none",
          "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
          "inference_mode": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
          "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path)}


def save(model, path, *, base_model_name_or_path=None):
  """Writes `path`/adapter_config.json and `path`/adapter_model.safetensors for the adapters of `model`.
  Every process must call it (sharded adapters are gathered); process 0 writes."""
  config = lora.config_of(model)
  if config is None:
    raise UserError(f"cannot write a PEFT adapter to {path}: the model has no LoRA adapters")
  tensors = adapter_tensors(model)
  if jax.process_index() != 0:
    return
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  temporary = path / (WEIGHTS_FILE + ".tmp")
  save_file(tensors, str(temporary), metadata={"format": "pt"})
  os.replace(temporary, path / WEIGHTS_FILE)
  (path / CONFIG_FILE).write_text(json.dumps(adapter_config(config, base_model_name_or_path), indent=2) + "\n")
