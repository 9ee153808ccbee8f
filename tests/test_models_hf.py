"""Hugging Face interop: configs, logit parity with transformers, save/load round trips, sharded loading."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers
from flax import nnx

import hf_models
from kldistill_jax.models import Llama3RopeScaling, Transformer, hf, llama, qwen2, qwen3, sharding

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # with head_dim 16, theta 1e4: all three bands occur
CASES = {
    # explicit head_dim != hidden/heads, GQA 8:2, a theta that is neither Qwen3's 1e6 nor transformers' 1e4
    "qwen3": ("qwen3", dict(head_dim=16, rope_theta=5000.0)),
    "qwen3_tied": ("qwen3", dict(head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "qwen2_tied": ("qwen2", dict(num_attention_heads=4, rope_theta=1e6, tie_word_embeddings=True)),
    "llama3_scaled": ("llama", dict(head_dim=16, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE)),
}
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """name -> (directory, torch model), built once per module."""
  built = {}

  def get(name):
    if name not in built:
      family, overrides = CASES[name]
      model = hf_models.make_model(family, **overrides)
      built[name] = (hf_models.save_model(model, tmp_path_factory.mktemp(name)), model)
    return built[name]
  return get


@nnx.jit
def _forward(model, tokens, positions, mask):
  return model(tokens, positions, attention_mask=mask)[0]


def ours_logits(model, tokens, mask, positions):
  # One compile per config is much cheaper on CPU than compiling every eager op.
  return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))


def max_diff(a, b, mask):
  return float(np.abs(a - b)[mask.astype(bool)].max())


def flat_params(model):
  return {keypath: np.asarray(var[...]) for keypath, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def copy_checkpoint(src, dst, **config_changes):
  shutil.copytree(src, dst)
  config = json.loads((dst / "config.json").read_text())
  config.update(config_changes)
  (dst / "config.json").write_text(json.dumps(config))
  return dst


# ---------------------------------------------------------------------------------------------- configs

def test_config_from_hf_reads_both_transformers_layouts():
  v5 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "dtype": "bfloat16",
        "rope_parameters": {"rope_theta": 500000.0, **LLAMA3_ROPE}}
  config = hf.config_from_hf(v5)
  assert (config.family, config.qk_norm, config.qkv_bias) == ("llama", False, False)
  assert config.head_dim == 8 and config.num_kv_heads == 2 and config.tie_word_embeddings
  assert config.rope_theta == 500000.0 and config.rms_norm_eps == 1e-5 and config.param_dtype == "bfloat16"
  assert config.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64)
  # transformers 4.x: top-level rope_theta, `rope_scaling` with the old "type" key, torch_dtype.
  v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
  v4.update(rope_theta=500000.0, rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items()
                                                                     if k != "rope_type"}},
            torch_dtype="bfloat16")
  assert hf.config_from_hf(v4) == config
  qwen2_config = hf.config_from_hf({**v4, "architectures": ["Qwen2ForCausalLM"], "rope_scaling": None,
                                    "head_dim": 32})
  assert (qwen2_config.family, qwen2_config.qkv_bias, qwen2_config.head_dim) == ("qwen2", True, 32)
  assert qwen2_config.rope_scaling is None
  # No `architectures`: model_type decides.
  assert hf.config_from_hf({**v5, "architectures": None, "model_type": "qwen3"}).qk_norm


@pytest.mark.parametrize("config", [
    qwen3(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
          head_dim=16, tie_word_embeddings=True),
    qwen2(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=4,
          head_dim=16, param_dtype="bfloat16"),
    llama(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
          head_dim=8, rope_scaling=Llama3RopeScaling(factor=32.0, original_max_position_embeddings=128)),
], ids=["qwen3", "qwen2", "llama3"])
def test_config_to_hf_is_autoconfig_loadable_and_inverts(tmp_path, config):
  (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(config)))
  loaded = transformers.AutoConfig.from_pretrained(str(tmp_path))
  assert type(loaded).__name__ == {"qwen3": "Qwen3Config", "qwen2": "Qwen2Config", "llama": "LlamaConfig"}[
      config.family]
  assert loaded.rope_parameters["rope_theta"] == config.rope_theta
  assert loaded.num_key_value_heads == config.num_kv_heads and loaded.head_dim == config.head_dim
  assert hf.config_from_hf(loaded.to_dict()) == config  # through transformers and back
  assert hf.read_config(tmp_path) == config


def test_config_errors_name_the_problem_and_the_file():
  base = hf.config_to_hf(qwen3(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=8, num_kv_heads=2, head_dim=16))
  with pytest.raises(ValueError, match=r"cfg/config.json: unsupported architecture 'MistralForCausalLM'"):
    hf.config_from_hf({**base, "architectures": ["MistralForCausalLM"]}, source="cfg/config.json")
  with pytest.raises(ValueError, match=r"cfg/config.json: unsupported rope type 'yarn'"):
    hf.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
                      source="cfg/config.json")
  with pytest.raises(ValueError, match="sliding-window"):
    hf.config_from_hf({**base, "use_sliding_window": True})
  with pytest.raises(ValueError, match="missing key 'vocab_size'"):
    hf.config_from_hf({k: v for k, v in base.items() if k != "vocab_size"})
  with pytest.raises(ValueError, match="qk_norm"):
    hf.config_to_hf(qwen3(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                          num_kv_heads=2, head_dim=16).replace(qk_norm=False))


# ------------------------------------------------------------------------------------------ logit parity

@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("attention", ["auto", "xla"])  # auto = blockwise on CPU
def test_logits_match_transformers_with_left_and_right_padding(checkpoint, name, attention):
  directory, torch_model = checkpoint(name)
  model = hf.load(directory, attention=attention)
  assert model.layers.self_attn.implementation == attention
  assert model.config.tie_word_embeddings == (model.lm_head is None) == torch_model.config.tie_word_embeddings
  tokens, mask, positions = hf_models.batch(model.config.vocab_size)
  reference = hf_models.torch_logits(torch_model, tokens, mask, positions)
  assert max_diff(ours_logits(model, tokens, mask, positions), reference, mask) <= TOL


def test_llama3_scaling_is_what_makes_llama_match(checkpoint, tmp_path):
  """Negative control: the same weights with plain RoPE miss transformers' logits by far more than TOL."""
  directory, torch_model = checkpoint("llama3_scaled")
  plain = copy_checkpoint(directory, tmp_path / "plain",
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
  tokens, mask, positions = hf_models.batch(96)
  reference = hf_models.torch_logits(torch_model, tokens, mask, positions)
  assert max_diff(ours_logits(hf.load(plain), tokens, mask, positions), reference, mask) > 100 * TOL


# ------------------------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("name", ["qwen3", "qwen2_tied", "llama3_scaled"])
def test_save_loads_in_transformers_and_round_trips(checkpoint, tmp_path, name):
  directory, torch_model = checkpoint(name)
  model = hf.load(directory)
  hf.save(model, tmp_path / "saved")
  with safetensors.safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="numpy") as f:
    assert ("lm_head.weight" in f.keys()) == (not model.config.tie_word_embeddings)
    assert set(f.keys()) == set(torch_model.state_dict()) - (
        {"lm_head.weight"} if model.config.tie_word_embeddings else set())
  reloaded_torch = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "saved"), attn_implementation="eager").eval()
  assert type(reloaded_torch) is type(torch_model)
  tokens, mask, positions = hf_models.batch(96, seed=1)
  np.testing.assert_array_equal(hf_models.torch_logits(reloaded_torch, tokens, mask, positions),
                                hf_models.torch_logits(torch_model, tokens, mask, positions))
  reloaded = hf.load(tmp_path / "saved")
  assert reloaded.config == model.config
  original, again = flat_params(model), flat_params(reloaded)
  assert original.keys() == again.keys()
  for keypath in original:
    np.testing.assert_array_equal(again[keypath], original[keypath], err_msg=str(keypath))


def test_sharded_checkpoint_loads(tmp_path):
  torch_model = hf_models.make_model("qwen3", seed=3, head_dim=16)
  hf_models.save_model(torch_model, tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert not (tmp_path / "model.safetensors").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
  tokens, mask, positions = hf_models.batch(96)
  reference = hf_models.torch_logits(torch_model, tokens, mask, positions)
  assert max_diff(ours_logits(hf.load(tmp_path), tokens, mask, positions), reference, mask) <= TOL


def test_load_on_a_mesh_places_each_tensor_on_its_shards(checkpoint, tmp_path):
  directory, torch_model = checkpoint("qwen3")
  mesh = sharding.make_mesh(2, 2, 2)
  model = hf.load(directory, mesh=mesh)
  config = model.config
  abstract_state = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  expected = dict(nnx.to_flat_state(sharding.param_shardings(abstract_state, mesh)))
  got = dict(nnx.to_flat_state(nnx.state(model)))
  assert expected.keys() == got.keys()
  for keypath, var in got.items():
    assert var[...].sharding == expected[keypath], keypath
  # The rules really split something: embeddings [vocab -> tensor, embed -> fsdp], q_proj [embed, heads].
  assert got[("embed_tokens",)][...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  q_kernel = got[("layers", "self_attn", "q_proj", "kernel")][...]  # stacked: the layer axis replicated
  assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q_kernel.addressable_shards[0].data.shape == (config.num_layers, 32, 64)

  tokens, mask, positions = hf_models.batch(96)
  reference = hf_models.torch_logits(torch_model, tokens, mask, positions)
  sharded_logits = ours_logits(model, tokens, mask, positions)
  assert max_diff(sharded_logits, reference, mask) <= TOL
  np.testing.assert_allclose(sharded_logits, ours_logits(hf.load(directory), tokens, mask, positions),
                             atol=1e-5)
  hf.save(model, tmp_path / "from_mesh")  # gathers each sharded tensor
  unsharded = flat_params(hf.load(tmp_path / "from_mesh"))
  for keypath, value in flat_params(model).items():
    np.testing.assert_array_equal(unsharded[keypath], value)


def test_dtype_overrides(checkpoint, tmp_path):
  directory, torch_model = checkpoint("qwen3_tied")
  model = hf.load(directory, dtype="bfloat16", compute_dtype="bfloat16")
  assert model.config.param_dtype == "bfloat16" and model.config.compute_dtype == "bfloat16"
  assert {v.dtype for v in flat_params(model).values()} == {jnp.dtype("bfloat16")}
  tokens, mask, positions = hf_models.batch(96)
  reference = hf_models.torch_logits(torch_model, tokens, mask, positions)
  bf16_error = max_diff(ours_logits(model, tokens, mask, positions), reference, mask)
  assert bf16_error < 0.1 * np.abs(reference).max()

  hf.save(hf.load(directory), tmp_path / "bf16", dtype="bfloat16")  # export a float32 model in bfloat16
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  with safetensors.safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="numpy") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
  assert hf.load(tmp_path / "bf16").config.param_dtype == "bfloat16"  # default: the checkpoint's dtype
  assert hf.load(tmp_path / "bf16", dtype="float32").embed_tokens[...].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------- errors

def test_load_errors_name_the_tensor_file_or_path(checkpoint, tmp_path):
  directory, _ = checkpoint("qwen3")
  name = "model.layers.1.self_attn.k_norm.weight"

  missing = copy_checkpoint(directory, tmp_path / "missing")
  tensors = safetensors.numpy.load_file(str(missing / "model.safetensors"))
  del tensors[name]
  safetensors.numpy.save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=rf"{missing}/model.safetensors lacks .*{name}"):
    hf.load(missing)

  extra = copy_checkpoint(directory, tmp_path / "extra")
  tensors = safetensors.numpy.load_file(str(extra / "model.safetensors"))
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignorable
  safetensors.numpy.save_file(tensors, str(extra / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"unexpected tensor.*o_proj\.bias") as error:
    hf.load(extra)
  assert "inv_freq" not in str(error.value) and str(extra / "model.safetensors") in str(error.value)

  wider = copy_checkpoint(directory, tmp_path / "wider", intermediate_size=256)
  with pytest.raises(ValueError, match=rf"'model.layers.0.mlp.down_proj.weight' in {wider}/model.safetensors "
                                       rf"has shape \(64, 128\), but {wider}/config.json implies "
                                       rf"\(64, 256\)"):
    hf.load(wider)

  unknown = copy_checkpoint(directory, tmp_path / "unknown", architectures=["GPT2LMHeadModel"])
  with pytest.raises(ValueError, match=rf"{unknown}/config.json: unsupported architecture 'GPT2LMHeadModel'"):
    hf.load(unknown)

  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    hf.load(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/empty/config.json not found"):
    hf.load(tmp_path / "empty")
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=rf"cannot read {tmp_path}/broken/config.json"):
    hf.load(tmp_path / "broken")
  no_weights = copy_checkpoint(directory, tmp_path / "no_weights")
  os.remove(no_weights / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=rf"{no_weights} has neither model.safetensors"):
    hf.load(no_weights)


def test_library_never_imports_torch(checkpoint, tmp_path):
  directory, _ = checkpoint("qwen2_tied")
  script = (f"import sys; from kldistill_jax.models import hf; hf.save(hf.load({str(directory)!r}), "
            f"{str(tmp_path)!r}); assert 'torch' not in sys.modules, 'torch was imported'")
  subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


# -------------------------------------------------------------------------------------------- tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")


def test_load_tokenizer_round_trips_and_applies_the_chat_template(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  backend = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.train_from_iterator(["user assistant what is two plus two", "the answer is four"],
                              trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<|im_start|>",
                                                                        "<|im_end|>"]))
  original = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                                  pad_token="<pad>", eos_token="<|im_end|>",
                                                  chat_template=CHAT_TEMPLATE)
  original.save_pretrained(str(tmp_path / "tok"))
  tokenizer = hf.load_tokenizer(tmp_path / "tok")
  text = "what is two plus two"
  ids = tokenizer(text).input_ids
  assert ids == original(text).input_ids and tokenizer.unk_token_id not in ids
  assert tokenizer.decode(ids) == text
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 0
  messages = [{"role": "user", "content": text}]
  prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert prompt == f"<|im_start|>user {text}<|im_end|><|im_start|>assistant"
  assert tokenizer(prompt).input_ids == [2, tokenizer.convert_tokens_to_ids("user"), *ids, 3, 2,
                                         tokenizer.convert_tokens_to_ids("assistant")]

  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    hf.load_tokenizer(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
    hf.load_tokenizer(tmp_path)
