"""The 2x2 objectives against position-by-position NumPy loops (the alignment is checked, not assumed)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from kldistill_jax import objectives

B, L, V, D = 2, 6, 7, 5
LOSS_MASK = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], np.float32)


@pytest.fixture(scope="module")
def case():
  k = jax.random.split(jax.random.key(3), 6)
  tokens = np.asarray(jax.random.randint(k[0], (B, L), 0, V))
  s_hidden = jax.random.normal(k[1], (B, L, D))
  s_head = jax.random.normal(k[2], (D, V))
  t_hidden = jax.random.normal(k[3], (B, L, D))
  t_head = jax.random.normal(k[4], (D, V))
  return dict(tokens=tokens, s_hidden=s_hidden, s_head=s_head, t_hidden=t_hidden, t_head=t_head,
              student=s_hidden @ s_head, teacher=t_hidden @ t_head)


def _batch(case, **extra):
  return dict(tokens=jnp.asarray(case["tokens"]), loss_mask=jnp.asarray(LOSS_MASK), **extra)


def _trained_positions():
  """(b, t): token t is trained, so logits at t - 1 predict it."""
  return [(b, t) for b in range(B) for t in range(1, L) if LOSS_MASK[b, t]]


def _expected_exact(student, teacher, lam, temperature=1.0):
  s, t = np.asarray(student), np.asarray(teacher)
  vals = [ref.mixed_kl(s[b, i - 1], t[b, i - 1], lam, temperature) for b, i in _trained_positions()]
  return float(np.mean(vals))


def _sampled_terms(case, temperature=1.0):
  """Per trained token: log q(y), log p(y), and ∇_z log q(y) = onehot(y) - q at the predicting position."""
  s, t = np.asarray(case["student"]), np.asarray(case["teacher"])
  rows = []
  for b, i in _trained_positions():
    y = case["tokens"][b, i]
    log_q = ref.log_softmax(s[b, i - 1], temperature)
    log_p = ref.log_softmax(t[b, i - 1], temperature)
    score = -np.exp(log_q)
    score[y] += 1.0
    rows.append((b, i, log_q[y], log_p[y], score / temperature))
  return rows


@pytest.mark.parametrize("objective,lam", [(objectives.sft, 0.0), (objectives.dagger, 0.0),
                                           (objectives.mixed(0.3), 0.3), (objectives.mixed(1.0), 1.0),
                                           (dataclasses.replace(objectives.opd, estimator="exact"), 1.0)])
def test_exact_loss_matches_position_loop(case, objective, lam):
  loss, metrics = objectives.compute(objective, case["student"], case["teacher"], _batch(case))
  np.testing.assert_allclose(loss, _expected_exact(case["student"], case["teacher"], lam), rtol=2e-5)
  np.testing.assert_allclose(metrics["loss"], loss)


def test_exact_loss_with_temperature(case):
  objective = objectives.Objective(prefix="teacher", kl="mixed", lam=0.6, temperature=2.5)
  loss, _ = objectives.compute(objective, case["student"], case["teacher"], _batch(case))
  np.testing.assert_allclose(loss, _expected_exact(case["student"], case["teacher"], 0.6, 2.5), rtol=2e-5)


@pytest.mark.parametrize("objective", list(objectives.PRESETS.values()) + [objectives.mixed(0.4)])
def test_metrics_are_exact_whatever_is_optimised(case, objective):
  _, metrics = objectives.compute(objective, case["student"], case["teacher"], _batch(case))
  s, t = np.asarray(case["student"]), np.asarray(case["teacher"])
  pos = _trained_positions()
  expect = {
      "forward_kl": np.mean([ref.forward_kl(s[b, i - 1], t[b, i - 1]) for b, i in pos]),
      "reverse_kl": np.mean([ref.reverse_kl(s[b, i - 1], t[b, i - 1]) for b, i in pos]),
      "student_entropy": np.mean([ref.entropy(ref.softmax(s[b, i - 1])) for b, i in pos]),
      "teacher_entropy": np.mean([ref.entropy(ref.softmax(t[b, i - 1])) for b, i in pos]),
      "num_tokens": len(pos),
  }
  for name, value in expect.items():
    np.testing.assert_allclose(metrics[name], value, rtol=2e-5, err_msg=name)
  k3 = [np.expm1(lp - lq) - (lp - lq) for _, _, lq, lp, _ in _sampled_terms(case)]
  np.testing.assert_allclose(metrics["sampled_reverse_kl_k3"], np.mean(k3), rtol=2e-5)


def _grad(objective, case, batch):
  fn = lambda s: objectives.compute(objective, s, case["teacher"], batch)[0]
  return jax.grad(fn)(case["student"])


def test_opd_gradient_is_per_token_reinforce(case):
  grad = _grad(objectives.opd, case, _batch(case))
  rows = _sampled_terms(case)
  expect = np.zeros((B, L, V))
  for b, i, log_q, log_p, score in rows:
    expect[b, i - 1] = -(log_p - log_q) * score / len(rows)
  np.testing.assert_allclose(grad, expect, atol=1e-6, rtol=1e-4)
  value, _ = objectives.compute(objectives.opd, case["student"], case["teacher"], _batch(case))
  np.testing.assert_allclose(value, np.mean([lq - lp for _, _, lq, lp, _ in rows]), rtol=1e-5)


@pytest.mark.parametrize("preset,clip,behavior", [
    ("offline_rl", None, False), ("offline_rl", 2.0, False), ("offline_rl", None, True),
    ("opd", None, True), ("opd", 0.5, True)])  # at student prefixes: a sampler at another temperature
def test_importance_weights(case, preset, clip, behavior):
  objective = dataclasses.replace(objectives.PRESETS[preset], clip=clip)
  rows = _sampled_terms(case)
  behavior_lp = np.full((B, L), -1.5, np.float32)  # a made-up sampler's log-probs
  batch = _batch(case, behavior_logprobs=jnp.asarray(behavior_lp)) if behavior else _batch(case)
  grad = _grad(objective, case, batch)
  expect, values = np.zeros((B, L, V)), []
  for b, i, log_q, log_p, score in rows:
    w = np.exp(log_q - (behavior_lp[b, i] if behavior else log_p))
    w = min(w, clip) if clip else w
    expect[b, i - 1] = -w * (log_p - log_q) * score / len(rows)
    values.append(w * (log_q - log_p))
  np.testing.assert_allclose(grad, expect, atol=1e-6, rtol=1e-4)
  value, _ = objectives.compute(objective, case["student"], case["teacher"], batch)
  np.testing.assert_allclose(value, np.mean(values), rtol=1e-5)


def test_sampled_mixed_at_teacher_prefixes(case):
  objective = objectives.Objective(prefix="teacher", kl="mixed", lam=0.25, estimator="sampled")
  rows = _sampled_terms(case)
  grad = _grad(objective, case, _batch(case))
  expect = np.zeros((B, L, V))
  for b, i, log_q, log_p, score in rows:
    reverse = -np.exp(log_q - log_p) * (log_p - log_q) * score
    forward = -score  # cross-entropy on the teacher's sample
    expect[b, i - 1] = (0.25 * reverse + 0.75 * forward) / len(rows)
  np.testing.assert_allclose(grad, expect, atol=1e-6, rtol=1e-4)


def test_discounted_opd_uses_reward_to_go(case):
  objective = dataclasses.replace(objectives.opd, discount=1.0)
  rows = _sampled_terms(case)
  rewards = np.zeros((B, L))
  for b, i, log_q, log_p, _ in rows:
    rewards[b, i] = log_p - log_q
  returns = ref.reward_to_go(rewards, LOSS_MASK, 1.0)
  grad = _grad(objective, case, _batch(case))
  expect = np.zeros((B, L, V))
  for b, i, _, _, score in rows:
    expect[b, i - 1] = -returns[b, i] * score / len(rows)
  np.testing.assert_allclose(grad, expect, atol=1e-6, rtol=1e-4)


def test_teacher_logprobs_instead_of_logits(case):
  teacher_lp = np.zeros((B, L), np.float32)
  for b, i, _, log_p, _ in _sampled_terms(case):
    teacher_lp[b, i] = log_p
  batch = _batch(case, teacher_logprobs=jnp.asarray(teacher_lp))
  loss_lp, metrics = objectives.compute(objectives.opd, case["student"], None, batch)
  loss_logits, _ = objectives.compute(objectives.opd, case["student"], case["teacher"], _batch(case))
  np.testing.assert_allclose(loss_lp, loss_logits, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda s: objectives.compute(objectives.opd, s, None, batch)[0])(
      case["student"]), _grad(objectives.opd, case, _batch(case)), atol=1e-6)
  assert "forward_kl" not in metrics and "student_entropy" in metrics


def test_teacher_gets_no_gradient(case):
  for objective in (objectives.sft, objectives.opd, objectives.mixed(0.5)):
    grad = jax.grad(lambda t: objectives.compute(objective, case["student"], t, _batch(case))[0])(
        case["teacher"])
    assert float(jnp.max(jnp.abs(grad))) == 0.0


def test_micro_batches_sum_to_the_global_mean(case):
  objective = objectives.mixed(0.3)
  total = jnp.asarray(LOSS_MASK[:, 1:].sum())
  full_loss, full_metrics = objectives.compute(objective, case["student"], case["teacher"], _batch(case))
  full_grad = _grad(objective, case, _batch(case))
  parts, grads = [], []
  for b in range(B):
    batch = dict(tokens=jnp.asarray(case["tokens"][b:b + 1]), loss_mask=jnp.asarray(LOSS_MASK[b:b + 1]),
                 num_tokens=total)
    fn = lambda s: objectives.compute(objective, s, case["teacher"][b:b + 1], batch)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(case["student"][b:b + 1])
    parts.append(metrics)
    grads.append(grad)
  np.testing.assert_allclose(sum(p["loss"] for p in parts), full_loss, rtol=1e-5)
  np.testing.assert_allclose(sum(p["reverse_kl"] for p in parts), full_metrics["reverse_kl"], rtol=1e-5)
  np.testing.assert_allclose(jnp.concatenate(grads), full_grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("objective", [objectives.sft, objectives.mixed(0.7),
                                       dataclasses.replace(objectives.mixed(0.2), chunk_size=3),
                                       objectives.offline_rl, dataclasses.replace(objectives.opd, chunk_size=3)])
def test_compute_from_hidden_matches_logits(case, objective):
  """Exact: the fused KL; sampled: the tokens' log-probs in position chunks (chunk_size=3: one time step
  of the 3 rows per chunk). Same loss, metrics and gradients as `compute` on the full logits."""
  behavior = -jax.random.uniform(jax.random.key(5), (B, L), minval=0.5, maxval=3.0)
  batch = _batch(case, behavior_logprobs=behavior) if objective.estimator == "sampled" else _batch(case)
  from_logits = lambda h, w: objectives.compute(objective, h @ w, case["teacher"], batch)
  from_hidden = lambda h, w: objectives.compute_from_hidden(objective, h, w, case["t_hidden"],
                                                            case["t_head"], batch)
  (loss_a, metrics_a), grads_a = jax.value_and_grad(from_logits, (0, 1), has_aux=True)(
      case["s_hidden"], case["s_head"])
  (loss_b, metrics_b), grads_b = jax.value_and_grad(from_hidden, (0, 1), has_aux=True)(
      case["s_hidden"], case["s_head"])
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  names = ["forward_kl", "reverse_kl", "student_entropy", "teacher_entropy", "num_tokens"]
  if objective.estimator == "sampled":
    names.append("sampled_reverse_kl_k3")
  for name in names:
    np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=1e-5, err_msg=name)
  for a, b in zip(grads_a, grads_b):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_sampled_from_hidden_with_cached_teacher_logprobs(case):
  """No teacher states: batch['teacher_logprobs'] (a cache's) serve the sampled estimator, as in `compute`."""
  objective = dataclasses.replace(objectives.offline_rl, chunk_size=4)
  teacher_lp = jax.nn.log_softmax(case["teacher"], axis=-1)
  picked = jnp.take_along_axis(teacher_lp[:, :-1], jnp.asarray(case["tokens"])[:, 1:, None], -1)[..., 0]
  batch = _batch(case, teacher_logprobs=jnp.pad(picked, ((0, 0), (1, 0))))
  from_logits = lambda h, w: objectives.compute(objective, h @ w, None, batch)
  from_hidden = lambda h, w: objectives.compute_from_hidden(objective, h, w, None, None, batch)
  (loss_a, metrics_a), grads_a = jax.value_and_grad(from_logits, (0, 1), has_aux=True)(
      case["s_hidden"], case["s_head"])
  (loss_b, metrics_b), grads_b = jax.value_and_grad(from_hidden, (0, 1), has_aux=True)(
      case["s_hidden"], case["s_head"])
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  for name in ("student_entropy", "sampled_reverse_kl_k3", "num_tokens"):
    np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=1e-5, err_msg=name)
  for a, b in zip(grads_a, grads_b):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fields,match", [
    (dict(prefix="teachr"), "objective.prefix"),
    (dict(kl="js"), "objective.kl"),
    (dict(estimator="mc"), "objective.estimator"),
    (dict(kl="mixed"), "objective.lam is required"),
    (dict(kl="mixed", lam=1.5), "objective.lam"),
    (dict(kl="reverse", lam=0.5), "objective.lam=0.5 is set but objective.kl='reverse'"),
    (dict(temperature=0.0), "temperature"),
    (dict(discount=0.5), "only apply to estimator='sampled'"),
    (dict(estimator="sampled", discount=1.5), "objective.discount"),
    (dict(prefix="dataset", estimator="sampled"), "prefix='dataset'"),
    (dict(prefix="student", kl="forward", estimator="sampled"), "needs teacher samples"),
    (dict(prefix="student", estimator="sampled", clip=-1.0), "objective.clip"),
    (dict(prefix="teacher", estimator="sampled", clip=0.0), "objective.clip"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_invalid_objectives(fields, match):
  with pytest.raises(ValueError, match=match):
    objectives.Objective(**fields)


def test_batch_errors(case):
  with pytest.raises(ValueError, match="loss_mask"):
    objectives.compute(objectives.sft, case["student"], case["teacher"],
                       dict(tokens=jnp.asarray(case["tokens"]), loss_mask=jnp.ones((B, L - 1))))
  with pytest.raises(ValueError, match="student outputs have shape"):
    objectives.compute(objectives.sft, case["student"][:, 1:], case["teacher"], _batch(case))
  with pytest.raises(ValueError, match="behavior_logprobs"):
    objectives.compute(objectives.offline_rl, case["student"], case["teacher"],
                       _batch(case, behavior_logprobs=jnp.zeros((B, L + 1))))
  with pytest.raises(ValueError, match="teacher_logprobs"):
    objectives.compute(objectives.opd, case["student"], None, _batch(case))
  with pytest.raises(ValueError, match="teacher_logprobs"):
    objectives.compute_from_hidden(objectives.opd, case["s_hidden"], case["s_head"], None, None, _batch(case))


def test_presets_are_the_2x2():
  cells = {(o.prefix, o.kl) for o in objectives.PRESETS.values()}
  assert cells == {("teacher", "forward"), ("student", "forward"), ("teacher", "reverse"),
                   ("student", "reverse")}
  assert objectives.opd.estimator == "sampled" and objectives.opd.discount == 0.0
  assert objectives.mixed(0.25).reverse_weight == 0.25


_TOPK = {"teacher_topk_ids": np.zeros((B, L, 2), np.int32), "teacher_topk_logprobs": np.zeros((B, L, 2))}
_LOGPROBS = {"teacher_logprobs": np.zeros((B, L), np.float32)}
_HIDDEN = {objectives.TEACHER_HIDDEN: np.zeros((B, L, D), np.float32)}


@pytest.mark.parametrize("objective,extra,live,expected", [
    (objectives.opd, _LOGPROBS, True, "logprobs"),  # a cache wins over the live teacher
    (objectives.opd, {}, True, "live"),
    (objectives.offline_rl, {**_LOGPROBS, **_HIDDEN}, False, "logprobs"),
    (objectives.sft, _TOPK, True, "topk"),
    (objectives.sft, {**_TOPK, **_HIDDEN}, True, "hidden"),
    (objectives.mixed(0.5), _TOPK, True, "live"),  # top-k serve only the forward KL
    (objectives.mixed(0.5), _TOPK, False, "topk"),  # ... and `compute` then refuses them by name
    (objectives.mixed(0.5), _HIDDEN, False, "hidden"),
    (objectives.dagger, {}, True, "live"),
    (dataclasses.replace(objectives.sft, prefix="dataset"), {}, False, "data"),
    (dataclasses.replace(objectives.opd, cross_tokenizer="span"), _LOGPROBS, True, "live"),
])
def test_teacher_source_table(objective, extra, live, expected):
  assert objectives.teacher_source(objective, dict(tokens=0, **extra), live_teacher=live) == expected


@pytest.mark.parametrize("extra,match", [({}, r"needs batch\['teacher_logprobs'\]$"),
                                         (_TOPK, "top-k teacher log-probs serve only"),
                                         (_HIDDEN, "serves objective.estimator='exact'")])
def test_teacher_source_refuses_what_the_sampled_estimator_cannot_read(extra, match):
  with pytest.raises(ValueError, match=match):
    objectives.teacher_source(objectives.opd, dict(tokens=0, **extra), live_teacher=False)
  # `compute` asks the same function, so it refuses the same batches with the same words.
  with pytest.raises(ValueError, match=match):
    objectives.compute(objectives.opd, jnp.zeros((B, L, V)), None,
                       dict(tokens=jnp.zeros((B, L), jnp.int32), loss_mask=jnp.asarray(LOSS_MASK), **extra))
