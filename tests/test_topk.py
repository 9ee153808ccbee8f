"""Forward KL against the teacher's top-k log-probs: the loss against a float64 NumPy reference (value,
analytic gradient, k = V equals the exact forward KL, k < V bounds it from below, padding gives no NaN),
`sampling.score_topk` against full logits, the objective and step paths, and a cached sft run with no
teacher forward equal to the re-scoring run when k = V."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import config_files
import numpy_reference as ref
from kldistill_jax import losses, models, objectives, sampling
from kldistill_jax.train import runner, setup, step, trajectories
from kldistill_jax.train import state as state_lib

B, T, V = 2, 5, 9
MASK = np.array([[1, 1, 0.5, 0, 1], [0, 1, 1, 1, 0]], np.float32)


def _case(k, temperature=1.0, seed=0):
  """Student logits and the teacher's top-k (ids, log-probs at `temperature`) from random teacher logits."""
  rng = np.random.default_rng(seed)
  student = (2.0 * rng.normal(size=(B, T, V))).astype(np.float32)
  teacher = (2.0 * rng.normal(size=(B, T, V))).astype(np.float32)
  logprobs, ids = jax.lax.top_k(jax.nn.log_softmax(teacher / temperature), k)
  return student, teacher, np.array(ids), np.array(logprobs)


# ----------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("k", [1, 3, V - 1])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_value_matches_reference(k, temperature):
  student, _, ids, lp = _case(k, temperature)
  per_position = ref.topk_forward_kl(student, ids, lp, temperature)
  for reduction, num_tokens in (("none", None), ("sum", None), ("mean", None), ("mean", 11.0)):
    got = losses.topk_forward_kl(student, ids, lp, MASK, temperature=temperature, reduction=reduction,
                                 num_tokens=num_tokens)
    np.testing.assert_allclose(got, ref.reduce(per_position, MASK, reduction, num_tokens), rtol=2e-5,
                               atol=2e-6, err_msg=reduction)


@pytest.mark.parametrize("k", [2, V - 1, V])
def test_gradient_matches_analytic(k):
  student, _, ids, lp = _case(k, 1.5, seed=1)
  grad = jax.grad(lambda s: losses.topk_forward_kl(s, ids, lp, MASK, temperature=1.5))(student)
  expect = ref.topk_forward_kl_grad(student, ids, lp, 1.5) * MASK[..., None] / MASK.sum()
  np.testing.assert_allclose(grad, expect, atol=1e-6, rtol=1e-4)


def test_full_vocabulary_equals_forward_kl():
  student, teacher, ids, lp = _case(V)
  exact = lambda s: losses.forward_kl(s, teacher, MASK)
  topk = lambda s: losses.topk_forward_kl(s, ids, lp, MASK)
  np.testing.assert_allclose(topk(student), exact(student), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(topk)(student), jax.grad(exact)(student), atol=1e-7)


@pytest.mark.parametrize("k", [1, 4, V - 1])
def test_coarsened_kl_is_at_most_forward_kl(k):
  student, teacher, ids, lp = _case(k, seed=2)
  coarse = np.asarray(losses.topk_forward_kl(student, ids, lp, reduction="none"))
  full = np.asarray(losses.forward_kl(student, teacher, reduction="none"))
  assert np.all(coarse >= -1e-6) and np.all(coarse <= full + 1e-6)
  if k == V - 1:  # one unlisted token: the rest bucket merges nothing, so nothing is lost
    np.testing.assert_allclose(coarse, full, rtol=1e-5)
  else:  # strict here: the student does not spread the rest as the teacher does
    assert np.all(coarse < full - 1e-4)


def test_padding_rows_and_empty_rest_give_no_nan():
  student, teacher, ids, lp = _case(3, seed=3)
  mask = np.ones((B, T), np.float32)
  mask[0, 1] = mask[1, 3] = 0
  student[0, 1] = student[1, 3] = -np.inf  # padding rows as some models emit them
  lp = lp.copy()
  lp[0, 1] = lp[1, 3] = -np.inf
  # A teacher with all its mass on the 3 listed tokens (p_rest = 0 up to rounding) at another position.
  teacher[1, 0, 3:] = -np.inf
  t_lp, t_ids = jax.lax.top_k(jax.nn.log_softmax(teacher[1, 0]), 3)
  ids[1, 0], lp[1, 0] = t_ids, t_lp
  fn = jax.jit(jax.value_and_grad(lambda s: losses.topk_forward_kl(s, ids, lp, mask)))
  for dtype in (jnp.float32, jnp.bfloat16):
    value, grad = fn(jnp.asarray(student, dtype))
    assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad, np.float32)))
    assert not np.any(np.asarray(grad[0, 1], np.float32)) and not np.any(np.asarray(grad[1, 3], np.float32))
  at_full = losses.topk_forward_kl(student[1, 0], ids[1, 0], lp[1, 0], reduction="none")
  np.testing.assert_allclose(at_full, losses.forward_kl(student[1, 0], teacher[1, 0], reduction="none"),
                             rtol=1e-5)


def test_argument_errors():
  student, _, ids, lp = _case(3)
  with pytest.raises(ValueError, match="teacher_topk_logprobs has shape"):
    losses.topk_forward_kl(student, ids, lp[..., :2])
  with pytest.raises(ValueError, match="must be integers"):
    losses.topk_forward_kl(student, ids.astype(np.float32), lp)
  with pytest.raises(ValueError, match=r"1 <= k <= V=4"):
    losses.topk_forward_kl(student[..., :4], *_case(5)[2:])
  with pytest.raises(ValueError, match="mask has shape"):
    losses.topk_forward_kl(student, ids, lp, MASK[:, :2])


# ----------------------------------------------------------------------------- score_topk

@pytest.fixture(scope="module")
def model():
  config = models.qwen3(vocab_size=V * 3, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
  return models.Transformer(config, rngs=nnx.Rngs(0))


@nnx.jit
def _logits(model, tokens, mask):
  return model(tokens, jnp.maximum(jnp.cumsum(mask, 1) - 1, 0), None, mask)[0]


@pytest.mark.parametrize("chunk_size", [None, 6])
def test_score_topk_equals_full_logits(model, chunk_size):
  rng = np.random.default_rng(5)
  tokens = rng.integers(1, V * 3, (3, 8)).astype(np.int32)
  mask = np.array([[1] * 8, [0, 0, 0] + [1] * 5, [0] * 7 + [1]], np.int32)  # left padding
  ids, lp = sampling.score_topk(model, tokens, mask, k=4, chunk_size=chunk_size)
  assert ids.dtype == jnp.int32 and lp.dtype == jnp.float32 and ids.shape == lp.shape == (3, 8, 4)
  logits = _logits(model, jnp.asarray(tokens), jnp.asarray(mask))
  full_lp, full_ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32)), 4)
  expect_ids, expect_lp = np.zeros((3, 8, 4), np.int32), np.zeros((3, 8, 4), np.float32)
  for b in range(3):
    columns = np.flatnonzero(mask[b])
    for prev, t in zip(columns[:-1], columns[1:]):  # token t is predicted at the previous real token
      expect_ids[b, t], expect_lp[b, t] = full_ids[b, prev], full_lp[b, prev]
  np.testing.assert_array_equal(ids, expect_ids)
  np.testing.assert_allclose(lp, expect_lp, atol=1e-5)
  with pytest.raises(ValueError, match=r"k must be in \[1, vocab_size=27\]"):
    sampling.score_topk(model, tokens, mask, k=28)


# ----------------------------------------------------------------------------- objective and step

def _topk_batch(teacher_logits, tokens, k):
  """The batch a top-k cache gives: entry t = the teacher's top-k for token t (logits at t - 1)."""
  lp, ids = jax.lax.top_k(jax.nn.log_softmax(teacher_logits), k)
  shift = lambda x: jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))
  loss_mask = jnp.asarray(np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], np.int32))
  return dict(tokens=jnp.asarray(tokens), loss_mask=loss_mask, teacher_topk_ids=shift(ids),
              teacher_topk_logprobs=shift(lp))


@jax.jit
def _sft_loss(student, teacher, batch):
  return objectives.compute(objectives.sft, student, teacher, batch)


def test_objective_with_topk_equals_teacher_logits():
  student, teacher, _, _ = _case(V)
  tokens = np.random.default_rng(4).integers(0, V, (B, T))
  batch = _topk_batch(teacher, tokens, V)
  loss, metrics = _sft_loss(student, None, batch)
  exact_loss, exact = _sft_loss(student, teacher, batch)
  np.testing.assert_allclose(loss, exact_loss, rtol=1e-5)
  assert set(metrics) == {"loss", "num_tokens", "student_entropy", "topk_forward_kl"}
  for ours, theirs in (("topk_forward_kl", "forward_kl"), ("student_entropy", "student_entropy"),
                       ("num_tokens", "num_tokens")):
    np.testing.assert_allclose(metrics[ours], exact[theirs], rtol=1e-5)
  grad_fn = jax.jit(jax.grad(lambda s, t, b: _sft_loss(s, t, b)[0]))
  np.testing.assert_allclose(grad_fn(student, None, batch), grad_fn(student, teacher, batch), atol=1e-7)
  small, _ = _sft_loss(student, None, _topk_batch(teacher, tokens, 3))
  assert small < exact_loss


@pytest.mark.parametrize("objective,match", [
    (objectives.dagger, "prefix='teacher'"), (objectives.mixed(0.5, prefix="teacher"), "kl='mixed'"),
    (objectives.offline_rl, "top-k teacher log-probs serve only")])
def test_other_objectives_refuse_topk_only(objective, match):
  student, teacher, _, _ = _case(V)
  batch = _topk_batch(teacher, np.zeros((B, T), np.int32), 3)
  with pytest.raises(ValueError, match=match):
    objectives.compute(objective, student, None, batch)
  with pytest.raises(ValueError, match=r"expected \[B, L, k\]"):
    objectives.compute(objectives.sft, student, None, dict(batch, teacher_topk_ids=batch["tokens"]))


class _NoTeacher:
  def merge(self):
    raise AssertionError("the teacher was run")


def test_step_skips_the_teacher_forward(model):
  student = state_lib.split(model)
  teacher = np.random.default_rng(6).normal(size=(B, T, model.config.vocab_size)).astype(np.float32)
  batch = _topk_batch(teacher, np.ones((B, T), np.int32), 4)
  batch["attention_mask"] = jnp.ones((B, T), jnp.int32)
  run = lambda objective: jax.jit(lambda params, batch: step.loss_and_metrics(
      params, batch, _NoTeacher(), student=state_lib.Split(student.graphdef, None, student.rest),
      objective=objective))(student.params, batch)
  loss, metrics = run(objectives.sft)
  assert np.isfinite(loss) and "topk_forward_kl" in metrics
  with pytest.raises(AssertionError, match="the teacher was run"):  # other objectives still need it
    run(objectives.mixed(0.5, prefix="teacher"))


# ----------------------------------------------------------------------------- config and cache checks

def _sft(**overrides):
  # No student fitting stage, evaluation sampling like training: fewer compiles; the run is what is tested.
  base = config_files.load("sft", "smoke")
  defaults = {"student.warmup_steps": 0, "eval.temperature": base.sampling.temperature,
              "teacher_cache.enabled": True}
  return config_files.load("sft", "smoke", **{**defaults, **overrides})


@pytest.mark.parametrize("overrides,match", [
    ({"objective.estimator": "sampled", "objective.kl": "reverse"}, r"teacher_cache\.top_k=4 serves only"),
    ({"objective.temperature": 2.0}, r"teacher_cache\.top_k=4 stores .* temperature 1"),
    ({"teacher_cache.top_k": -1}, r"teacher_cache\.top_k must be >= 0"),
    ({"teacher_cache.enabled": False}, r"teacher_cache\.top_k=4 needs teacher_cache\.enabled=True")])
def test_check_teacher_cache(overrides, match):
  config = _sft(**{"teacher_cache.top_k": 4, **overrides})
  with pytest.raises(ValueError, match=match):
    setup.check_teacher_cache(config, setup.make_objective(config))


def test_cache_built_with_another_top_k_is_refused(tmp_path):
  (tmp_path / trajectories.INFO).write_text(json.dumps({"num_trajectories": 16, "teacher_flops": 1}))
  with pytest.raises(ValueError, match=rf"teacher_cache\.top_k=4 .* cache at {tmp_path} .* top_k=0"):
    trajectories.build(None, None, None, _sft(**{"teacher_cache.top_k": 4}), tmp_path, mesh=None)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """sft smoke runs on the cache: re-scored by the teacher (top_k 0), top_k = V, top_k = 4."""
  out = {}
  for top_k in (0, 40, 4):
    workdir = tmp_path_factory.mktemp(f"top_k_{top_k}")
    runner.run_distill(_sft(**{"teacher_cache.top_k": top_k, "steps": 3, "checkpoint_every": 3}), workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((workdir / "trajectories" / trajectories.INFO).read_text())
    out[top_k] = rows, info, workdir
  return out


def test_full_vocabulary_cache_reproduces_the_rescoring_run(runs):
  exact, full = runs[0][0], runs[40][0]
  assert [r["step"] for r in full] == [1, 2, 3]
  for a, b in zip(exact, full):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
    np.testing.assert_allclose(b["topk_forward_kl"], a["forward_kl"], rtol=1e-4)
  cache = trajectories.TrajectorySource(runs[40][2] / "trajectories")
  row = cache[0]
  assert row["teacher_topk_ids"].shape == row["teacher_topk_logprobs"].shape == (row["tokens"].shape[0], 40)
  assert "teacher_topk_ids" not in trajectories.TrajectorySource(runs[0][2] / "trajectories")[0]


def test_topk_cache_runs_no_teacher_after_the_build(runs):
  (exact, exact_info, _), (small, info, _) = runs[0], runs[4]
  assert exact[0]["teacher_flops"] < exact[1]["teacher_flops"] < exact[2]["teacher_flops"]  # re-scoring
  assert [r["teacher_flops"] for r in small] == [info["teacher_flops"]] * 3  # flat after the build
  assert info["top_k"] == 4 and exact_info["top_k"] == 0
  # The build adds one teacher forward per cached batch: one pass costs what re-scoring it once does.
  assert info["teacher_flops"] == exact[-1]["teacher_flops"] > exact_info["teacher_flops"]
  assert small[0]["loss"] <= exact[0]["loss"] and all(np.isfinite(r["loss"]) for r in small)
