"""GRPO wired end to end: the policy's token log-probs, rollout rewards, the update, the job, resume."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import config_files
from kldistill_jax import data, models, sampling
from kldistill_jax.models import hf
from kldistill_jax.train import flops, grpo, presets, rl, runner, setup
from kldistill_jax.train.metrics import read_metrics
from kldistill_jax.train.state import Split, init_state, split

CONFIG = models.qwen3(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, tie_word_embeddings=True)


def _rollout(model, temperature=0.7):
  prompts = jnp.asarray(np.random.default_rng(0).integers(3, 40, (4, 5)), jnp.int32)
  mask = jnp.ones_like(prompts).at[0, :2].set(0)  # one left-padded prompt
  out = sampling.sample(model, prompts, mask, rng=jax.random.key(1), max_new_tokens=6,
                        temperature=temperature, eos_ids=(1,), pad_id=0)
  batch = {"tokens": out.tokens, "attention_mask": jnp.concatenate([mask, out.completion_mask[:, 5:]], 1),
           "loss_mask": out.completion_mask}
  return batch, out


def test_token_logprobs_are_the_samplers_and_score_agrees():
  model = models.Transformer(CONFIG, rngs=nnx.Rngs(0))
  batch, out = _rollout(model, temperature=0.7)
  lp = rl.token_logprobs(model, batch, 0.7)
  keep = np.asarray(batch["loss_mask"]) > 0
  # the sampler's behaviour log-probs (KV cache, one token at a time) = a full forward at the same temperature
  np.testing.assert_allclose(np.asarray(lp)[keep], np.asarray(out.sampling_logprobs)[keep], atol=2e-5)
  scored, _ = sampling.score(model, batch["tokens"], batch["attention_mask"], temperature=0.7)
  np.testing.assert_allclose(np.asarray(lp)[keep], np.asarray(scored)[keep], atol=2e-5)
  # in chunks of 2 time steps x 4 rows (11 positions: the last chunk overlaps): the same values
  chunked = rl.token_logprobs(model, batch, 0.7, chunk_size=8)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(lp), atol=1e-6)


def test_first_update_is_the_policy_gradient_with_ratio_one():
  """With old = current log-probs the clipped loss's gradient is -sum_t A_row grad log pi(t) / tokens."""
  model = models.Transformer(CONFIG, rngs=nnx.Rngs(0))
  batch, out = _rollout(model, temperature=1.0)
  batch = dict(batch, old_logprobs=out.sampling_logprobs, advantages=jnp.array([1.5, -0.5, 0.0, -1.0]))
  m = split(model)
  optimizer = optax.sgd(0.1)
  state = init_state(m.params, optimizer, 0)
  step = rl.build_policy_step(policy=Split(m.graphdef, None, m.rest), optimizer=optimizer, micro_batches=2,
                              settings=dict(temperature=1.0, clip_eps=0.2, kl_coef=0.0, chunk_size=8))
  weights = np.asarray(batch["loss_mask"][:, 1:], np.float32)

  def surrogate(params):  # the REINFORCE form, written independently of grpo_loss (and unchunked)
    lp = rl.token_logprobs(m.merge(params), batch, 1.0)[:, 1:]
    return -jnp.sum(batch["advantages"][:, None] * lp * weights) / weights.sum()

  grads = jax.grad(surrogate)(m.params)
  expected = jax.tree.map(lambda p, g: np.asarray(p - 0.1 * g), m.params, grads)
  new_state, metrics = step(state, batch)  # donates the state (and m.params with it)
  assert float(metrics["clip_fraction"]) == 0.0
  np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_rewards_grade_each_completion_against_its_own_record():
  tokenizer = data.CharTokenizer()
  task = data.ArithmeticTask(4, (2,), seed=0, split="test")
  prompt_len = 8
  texts = [task[0]["response"], "1+1=3#3", task[2]["response"], task[2]["response"]]
  rows = []
  for text in texts:
    ids = [5] * prompt_len + tokenizer.encode(text) + [tokenizer.eos_id]
    rows.append(ids + [tokenizer.pad_id] * (30 - len(ids)))
  tokens = np.array(rows, np.int32)
  mask = (np.arange(30)[None] >= prompt_len) & (tokens != tokenizer.pad_id)
  index = np.array([0, 1, 2, 3], np.int32)  # the last row answers problem 2 to problem 3: wrong
  rewards = rl.rewards_of(tokens, mask.astype(np.int32), index, prompt_len=prompt_len, records=task,
                          tokenizer=tokenizer, check=data.is_correct)
  expected = [1.0, 0.0, 1.0, float(task[3]["answer"] == task[2]["answer"])]
  np.testing.assert_array_equal(rewards, expected)
  # the same completions cut off before their EOS (issue 11): reward 0 although the answers are in the text
  cut = mask.astype(np.int32) * (tokens != tokenizer.eos_id)
  args = dict(prompt_len=prompt_len, records=task, tokenizer=tokenizer, check=data.is_correct)
  np.testing.assert_array_equal(rl.rewards_of(tokens, cut, index, **args), [0.0] * 4)
  np.testing.assert_array_equal(rl.rewards_of(tokens, cut, index, truncated_is_wrong=False, **args), expected)


def _grpo_config(**overrides):
  return config_files.load("grpo", "smoke", **overrides)


def test_grpo_job_logs_rl_metrics_and_exports_the_policy(tmp_path):
  summary = runner.run_grpo(_grpo_config(), tmp_path)
  metrics = read_metrics(tmp_path)
  assert [m["step"] for m in metrics] == [1, 2]
  for key in ("reward", "rollout_entropy", "response_length", "clip_fraction", "kl", "truncation_rate",
              "zero_signal_groups"):
    assert all(np.isfinite(m[key]) for m in metrics), key
  assert metrics[0]["num_tokens"] > 0
  assert set(summary) == {"policy before", "policy after", "flops"}
  config = _grpo_config()
  cfg = hf.read_config(tmp_path / "policy")
  rows, length = 8 * 4, config.data.prompt_len + config.sampling.max_new_tokens
  generation = sum(flops.generation_flops(cfg, rows, config.data.prompt_len, config.sampling.max_new_tokens,
                                          decode_steps=int(m["max_length"])) for m in metrics)
  # The evaluations before and after GRPO: sampler calls of eval.batch_size rows, each at least a prefill and
  # one decode step, at most max_new_tokens steps.
  e = config.eval
  calls = -(-e.num_problems * e.samples_per_prompt // e.batch_size)
  bounds = [calls * flops.generation_flops(cfg, e.batch_size, config.data.prompt_len, e.max_new_tokens,
                                           decode_steps=steps) for steps in (1, e.max_new_tokens)]
  evaluations = [summary[name]["flops"] for name in ("policy before", "policy after")]
  assert all(bounds[0] <= f <= bounds[1] for f in evaluations), (evaluations, bounds)
  assert summary["flops"] == flops.counters(  # 2 steps x 2 updates; the reference's scoring is the teacher's
      student_generation=generation, student_train=2 * 2 * flops.train_flops(cfg, rows, length),
      teacher_scoring=2 * flops.forward_flops(cfg, rows, length), eval=sum(evaluations))
  assert metrics[-1]["eval_flops"] == 0  # GRPO runs no probes
  assert metrics[-1]["student_generation_flops"] == generation
  assert (tmp_path / "policy" / "config.json").is_file()
  assert json.loads((tmp_path / "results.json").read_text())["flops"] == summary["flops"]


def test_grpo_resume_matches_an_uninterrupted_run(tmp_path):
  runner.run_grpo(_grpo_config(steps=3), tmp_path / "straight")
  runner.run_grpo(_grpo_config(steps=2), tmp_path / "resumed")
  runner.run_grpo(_grpo_config(steps=3), tmp_path / "resumed")  # resumes at step 2
  assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == [1, 2, 3]
  a = hf.load(tmp_path / "straight" / "policy")
  b = hf.load(tmp_path / "resumed" / "policy")
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("field,value,match", [
    ("grpo.group_size", 1, r"grpo\.group_size must be >= 2"),
    ("grpo.clip_eps", 1.5, r"grpo\.clip_eps must be in \(0, 1\)"),
    ("sampling.top_k", 5, r"GRPO needs untruncated sampling"),
    ("sampling.temperature", 0.0, r"sampling\.temperature must be > 0"),
])
def test_bad_grpo_settings_are_named(tmp_path, field, value, match):
  with pytest.raises(ValueError, match=match):
    runner.run_grpo(_grpo_config(**{field: value}), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_group_advantages_feed_the_rows_in_group_order():
  rewards = np.array([1, 0, 0, 0, 1, 1, 1, 1], np.float32)  # group 0 has signal, group 1 none
  a = np.asarray(grpo.group_advantages(jnp.asarray(rewards), 4))
  np.testing.assert_allclose(a[:4], [(1 - 0.25) / (np.sqrt(0.1875) + 1e-6)] + [-0.25 / (np.sqrt(0.1875) + 1e-6)] * 3,
                             rtol=1e-6)
  np.testing.assert_array_equal(a[4:], 0.0)


def test_a_loaded_student_is_not_refitted_unless_asked(tmp_path, caplog):
  """The README's `configs/grpo.py --config.student.path=...`: the arithmetic preset's warmup_steps must not
  fit the loaded (distilled) student to the data before RL."""
  config = _grpo_config(**{"student.path": str(presets.ARITHMETIC_TEACHER), "student.warmup_steps": 150})
  mesh = setup.make_mesh(config)
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  with jax.set_mesh(mesh), caplog.at_level(logging.WARNING):
    model = runner._cached_or_fitted(  # pylint: disable=protected-access
        config, config.student, "student", tmp_path / "student_init", steps=config.student.warmup_steps,
        learning_rate=1e-2, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer,
        source=setup.make_source(config, "train", tokenizer), mesh=mesh, seed=0)
  assert not (tmp_path / "student_init").exists()
  assert "student.fit_loaded=True" in caplog.text
  loaded = hf.load(presets.ARITHMETIC_TEACHER)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
