"""LoRA students: the adapter math, gradients only in the adapters, PEFT and merged exports that
transformers / peft load with our logits, exact resume with adapter-only checkpoints, the runner's exports."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

import config_files
import hf_models
from kldistill_jax import data, objectives
from kldistill_jax.errors import UserError
from kldistill_jax.models import Transformer, hf, lora, peft_export, qwen3
from kldistill_jax.models.transformer import Dense
from kldistill_jax.train import flops, runner, setup, state as state_lib
from kldistill_jax.train.metrics import read_metrics
from kldistill_jax.train.loop import train_stage
from kldistill_jax.train.checkpointing import Checkpointer, _flat_paths
from kldistill_jax.train.step import build_train_step, loss_and_metrics

# attention="xla": the reference kernel compiles in a fraction of the CPU default's (blockwise) time.
CONFIG = qwen3(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=8, attention="xla")
DATA_OBJECTIVE = objectives.Objective(prefix="dataset", kl="forward", estimator="exact")


def _batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(2, vocab, size=(2, 7)), jnp.int32)
  mask = jnp.ones((2, 7), jnp.int32).at[1, :2].set(0)  # one left-padded row
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  return tokens, mask, positions


def _randomize_adapters(model, seed):
  """Both A and B random (a fresh B is 0), so merging and both gradients are non-trivial."""
  key = jax.random.key(seed)
  for i, (_, dense) in enumerate(lora.targeted(model)):
    if dense.lora is not None:
      for j, var in enumerate((dense.lora.lora_a, dense.lora.lora_b)):
        var[...] = 0.3 * jax.random.normal(jax.random.fold_in(key, 2 * i + j), var.shape, var.dtype)
  return model


@nnx.jit
def _forward(model, tokens, mask, positions):
  return model(tokens, positions, attention_mask=mask)[0]


def _logits(model, tokens, mask, positions):  # compiled: far cheaper on CPU than every op eagerly
  return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions)))


def _flat(state):
  return {keypath: var[...] for keypath, var in nnx.to_flat_state(state)}


def test_adapter_is_scaled_low_rank_update_fresh_ones_change_nothing_and_merge_is_the_same_model():
  dense = Dense(6, 5, ("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(0))
  dense.lora = nnx.data(lora.Adapter(dense.kernel, rank=3, alpha=4.5, dtype=jnp.float32, rngs=nnx.Rngs(1)))
  dense.lora.lora_b[...] = jax.random.normal(jax.random.key(2), (3, 5))
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  w, a, b = (np.asarray(v[...], np.float64) for v in (dense.kernel, dense.lora.lora_a, dense.lora.lora_b))
  np.testing.assert_allclose(np.asarray(dense(jnp.asarray(x))), x @ w + 4.5 / 3 * (x @ a) @ b, rtol=1e-5, atol=1e-5)

  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  batch = _batch(CONFIG.vocab_size)
  base_logits = _logits(model, *batch)
  lora.add(model, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
  np.testing.assert_allclose(_logits(model, *batch), base_logits, atol=1e-5)  # B = 0: the base (+ 0)
  assert lora.config_of(model) == lora.LoraConfig(rank=4, alpha=8.0)
  _randomize_adapters(model, 1)
  adapted = _logits(model, *batch)
  assert np.abs(adapted - base_logits).max() > 0.1
  merged = lora.merge(model)
  assert not lora.has_adapters(merged) and lora.has_adapters(model)  # merging leaves the model as it was
  np.testing.assert_allclose(_logits(merged, *batch), adapted, atol=2e-5)
  np.testing.assert_allclose(_logits(lora.base(model), *batch), base_logits, atol=1e-6)


def test_gradients_reach_only_the_adapters_and_are_the_chain_rule_of_the_merged_kernels():
  model = _randomize_adapters(lora.add(Transformer(CONFIG, rngs=nnx.Rngs(0)), lora.LoraConfig(rank=3, alpha=6.0),
                                       rngs=nnx.Rngs(1)), 2)
  split = state_lib.split(model)
  trainable = nnx.to_flat_state(split.params)
  assert len(trainable) == 2 * len(lora.TARGETS)  # A and B of every target, layers stacked
  assert all(isinstance(var, nnx.LoRAParam) for _, var in trainable)
  assert all(keypath[-1] not in ("lora_a", "lora_b") for keypath, _ in nnx.to_flat_state(split.rest))
  adapter_sizes = sum(x.size for x in jax.tree.leaves(split.params))
  adam = state_lib.init_state(split.params, optax.adam(1e-3), seed=0).opt_state
  assert sum(x.size for x in jax.tree.leaves(adam)) == 2 * adapter_sizes + 1  # mu, nu of the adapters, count

  # The step's gradient, read off one SGD update with learning rate 1: params - grad.
  tokens, mask, _ = _batch(CONFIG.vocab_size)
  batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": mask}
  step = build_train_step(student=state_lib.Split(split.graphdef, None, split.rest), objective=DATA_OBJECTIVE,
                          optimizer=optax.sgd(1.0), micro_batches=1, fused=False)
  adapters = {k: np.asarray(v) for k, v in _flat(split.params).items()}
  state, _ = step(state_lib.init_state(split.params, optax.sgd(1.0), seed=0), batch, None)
  grads = {k: adapters[k] - np.asarray(v) for k, v in _flat(state.params).items()}

  # Independently: the gradient w.r.t. the merged kernels W = W0 + s A B of the same loss.
  graphdef, kernels, rest = nnx.split(lora.merge(model), nnx.Param, ...)
  num_tokens = jnp.sum(mask[:, 1:].astype(jnp.float32))
  loss = lambda p: loss_and_metrics(p, dict(batch, num_tokens=num_tokens), None, objective=DATA_OBJECTIVE,
                                    student=state_lib.Split(graphdef, None, rest), fused=False)[0]
  kernel_grads = _flat(jax.jit(jax.grad(loss))(kernels))
  scale = 6.0 / 3
  for keypath, g_kernel in kernel_grads.items():  # dL/dA = s dL/dW B^T, dL/dB = s A^T dL/dW, per layer
    if keypath[-1] != "kernel" or keypath[-2] not in lora.TARGETS:
      continue
    a, b = (adapters[(*keypath[:-1], "lora", leaf)] for leaf in ("lora_a", "lora_b"))
    g_kernel = np.asarray(g_kernel)
    np.testing.assert_allclose(grads[(*keypath[:-1], "lora", "lora_a")], scale * g_kernel @ b.swapaxes(-1, -2),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(grads[(*keypath[:-1], "lora", "lora_b")], scale * a.swapaxes(-1, -2) @ g_kernel,
                               rtol=1e-3, atol=1e-5)


def test_peft_adapter_and_merged_export_reproduce_our_logits_in_transformers(tmp_path):
  # Qwen2 (q/k/v biases, tied embeddings) with some targets; the runner's test below covers Qwen3 with all.
  targets = ("q_proj", "v_proj", "down_proj")
  base_dir = hf_models.save_model(hf_models.make_model("qwen2", num_attention_heads=4, tie_word_embeddings=True),
                                  tmp_path / "base")
  model = lora.add(hf.load(base_dir), lora.LoraConfig(rank=4, alpha=12.0, targets=targets), rngs=nnx.Rngs(0))
  _randomize_adapters(model, 1)
  tokens, mask, positions = hf_models.batch(model.config.vocab_size)
  ours = _logits(model, tokens, mask, positions)

  peft_export.save(model, tmp_path / "adapter", base_model_name_or_path=base_dir)
  config = json.loads((tmp_path / "adapter" / peft_export.CONFIG_FILE).read_text())
  assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 12.0, sorted(targets))
  import peft  # pylint: disable=g-import-not-at-top  (test extra)
  base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager")
  with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  loaded = sum(p.numel() for n, p in with_adapter.named_parameters() if "lora_" in n)
  assert loaded == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  reference = hf_models.torch_logits(with_adapter, tokens, mask, positions)
  assert np.abs(ours - reference)[mask.astype(bool)].max() <= 1e-4

  hf.save(model, tmp_path / "merged")  # float32: the merge is the only difference
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager")
  assert not any("lora" in name for name, _ in merged.named_parameters())
  assert np.abs(hf_models.torch_logits(merged.eval(), tokens, mask, positions) - ours)[mask.astype(bool)].max() <= 1e-4


def _stage_config(steps):
  return config_files.load("quickstart", **{
      "steps": steps, "batch_size": 8, "checkpoint_every": 100, "log_every": 1, "data.num_train": 64,
      "data.difficulties": (2,), "student.param_dtype": "bfloat16", "student.attention": "xla",
      "optimizer.schedule": "constant", "optimizer.warmup_steps": 0})


def _lora_student(config, mesh, vocab):
  model = setup.load_model(config.student, "student", vocab, mesh, seed=5)
  return setup.add_adapters(model, lora.LoraConfig(rank=2, alpha=4.0), seed=6)


def test_resume_is_exact_and_checkpoints_hold_only_the_adapters(tmp_path):
  tokenizer = data.load_tokenizer("char")
  config = _stage_config(3)
  mesh = setup.make_mesh(config)
  source = setup.make_source(config, "train", tokenizer)
  run = dict(teacher=None, objective=DATA_OBJECTIVE, tokenizer=tokenizer, source=source, mesh=mesh)
  with jax.set_mesh(mesh):
    student = _lora_student(config, mesh, tokenizer.vocab_size)  # each run trains its own copy (in place)
    base_before = _flat(nnx.state(student, nnx.Not(nnx.LoRAParam)))
    straight, _ = train_stage(config, tmp_path / "a", student=nnx.clone(student), **run)
    train_stage(_stage_config(1), tmp_path / "b", student=nnx.clone(student), **run)
    # A mismatching tree (a full-parameter state) would be refused: restoring proves the stored tree is the
    # adapters' and their Adam moments only.
    resumed, _ = train_stage(config, tmp_path / "b", student=nnx.clone(student), **run)
  for keypath, value in _flat(nnx.state(straight, nnx.LoRAParam)).items():
    np.testing.assert_array_equal(np.asarray(_flat(nnx.state(resumed, nnx.LoRAParam))[keypath]), np.asarray(value))
  for keypath, value in _flat(nnx.state(resumed, nnx.Not(nnx.LoRAParam))).items():  # the frozen bf16 base
    assert value.dtype == base_before[keypath].dtype
    np.testing.assert_array_equal(np.asarray(value), np.asarray(base_before[keypath]))
  checkpointer = Checkpointer(tmp_path / "a" / "checkpoints")
  stored = getattr(checkpointer._manager.item_metadata(3)["state"], "tree", None)  # pylint: disable=protected-access
  checkpointer.close()
  stored = {path: int(np.prod(leaf.shape)) for path, leaf in _flat_paths(stored).items() if leaf is not None}
  params = [path for path in stored if path.startswith("params.")]
  assert len(params) == 2 * len(lora.TARGETS) and all(p.endswith((".lora_a.value", ".lora_b.value")) for p in params)
  adapter_size = sum(x.size for x in jax.tree.leaves(nnx.state(straight, nnx.LoRAParam)))
  assert sum(stored.values()) <= 3 * adapter_size + 8  # adapters, AdamW mu and nu, counters, step, key


def test_lora_fields_are_checked_and_named(tmp_path):
  for i, (overrides, match) in enumerate( (({"student.lora.rank": -1}, r"student\.lora\.rank must be an integer >= 1"),
                           ({"student.lora.rank": 4, "student.lora.targets": ("q_proj", "qkv")},
                            r"student\.lora\.targets must be distinct names .*'qkv' unknown"),
                           ({"student.lora.rank": 4, "student.lora.alpha": 0.0}, r"student\.lora\.alpha must be > 0"))):
    with pytest.raises(UserError, match=match):
      runner.run_distill(config_files.load("quickstart", "smoke", **overrides), tmp_path / str(i))


def test_runner_exports_a_merged_student_and_a_peft_adapter_that_agree(tmp_path):
  config = config_files.load("quickstart", "smoke", **{
      "student.lora.rank": 4, "student.lora.alpha": 8.0, "student.warmup_steps": 0, "export.dtype": "float32",
      "optimizer.learning_rate": 0.05, "student.attention": "xla", "teacher.attention": "xla"})
  runner.run_distill(config, tmp_path)
  adapter_config = json.loads((tmp_path / "student_adapter" / peft_export.CONFIG_FILE).read_text())
  assert adapter_config["base_model_name_or_path"] == str((tmp_path / "student_base").resolve())
  assert adapter_config["r"] == 4 and adapter_config["target_modules"] == sorted(lora.TARGETS)
  import peft  # pylint: disable=g-import-not-at-top  (test extra)
  base = transformers.AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
  with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "student_adapter")).eval()
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "student")).eval()
  tokens, mask, positions = hf_models.batch(merged.config.vocab_size)
  trained = hf_models.torch_logits(with_adapter, tokens, mask, positions)
  with with_adapter.disable_adapter():
    untrained = hf_models.torch_logits(with_adapter, tokens, mask, positions)
  assert np.abs(trained - untrained).max() > 1e-3  # the adapters did train
  # The FLOP counters know only the adapters trained: each step's student_train increment is the LoRA
  # count at some training length, never the full fine-tuning count (which would be ~1.4x larger).
  metrics = read_metrics(tmp_path)
  increments = np.diff([0] + [m["student_train_flops"] for m in metrics])
  model_config = dataclasses.replace(hf.read_config(tmp_path / "student"), attention=config.student.attention,
                                     remat=config.student.remat)
  adapters = lora.LoraConfig(rank=4, alpha=8.0)
  lora_counts = {flops.train_flops(model_config, config.batch_size, n, lora=adapters) for n in range(1, 512)}
  full_counts = {flops.train_flops(model_config, config.batch_size, n) for n in range(1, 512)}
  assert len(increments) == config.steps and all(int(x) in lora_counts for x in increments)
  assert not any(int(x) in full_counts for x in increments)
  assert np.abs(trained - hf_models.torch_logits(merged, tokens, mask, positions))[mask.astype(bool)].max() <= 1e-4
