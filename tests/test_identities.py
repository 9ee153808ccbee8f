"""Every identity holds on random instances, and the checks themselves can tell right from wrong."""

import itertools

import jax
import numpy as np
import pytest

from kldistill_jax import identities

TOL = 1e-4


@pytest.fixture(scope="module", params=[0, 1])
def logits(request):
  k_s, k_t = jax.random.split(jax.random.key(request.param))
  return identities.random_logits(k_s, (3, 17)), identities.random_logits(k_t, (3, 17))


def test_token_level_identities(logits):
  student, teacher = logits
  for check in (identities.forward_kl_gradient(student, teacher),
                identities.reverse_kl_gradient(student, teacher),
                identities.mixing_linearity(student, teacher, 0.3),
                identities.mixing_linearity(student, teacher, 1.0)):
    assert check.relative_error < TOL, check.name
    assert np.max(np.abs(check.rhs)) > 1e-3, "a vacuous identity between zeros"


def test_checks_detect_wrong_math(logits):
  """The two directions' gradients differ, so the checks are not tautologies."""
  student, teacher = logits
  forward = identities.forward_kl_gradient(student, teacher)
  reverse = identities.reverse_kl_gradient(student, teacher)
  swapped = identities.IdentityCheck("swapped", "", "", forward.lhs, reverse.rhs)
  assert swapped.relative_error > 0.1


def test_exact_policy_gradient_against_a_finite_difference():
  """An independent check of the right side of identity 2 (no autodiff of the KL at all)."""
  k_s, k_t = jax.random.split(jax.random.key(5))
  s = np.asarray(identities.random_logits(k_s, (9,)), np.float64)
  t = np.asarray(identities.random_logits(k_t, (9,)), np.float64)

  def rkl(x):
    log_q = x - np.log(np.sum(np.exp(x)))
    log_p = t - np.log(np.sum(np.exp(t)))
    return np.sum(np.exp(log_q) * (log_q - log_p))

  eps = 1e-6
  numeric = np.array([(rkl(s + eps * e) - rkl(s - eps * e)) / (2 * eps) for e in np.eye(9)])
  analytic = identities.exact_policy_gradient(s[None].astype(np.float32), t[None].astype(np.float32))[0]
  np.testing.assert_allclose(analytic, numeric, atol=1e-5)


def test_monte_carlo_error_falls_like_inverse_sqrt_n(logits):
  student, teacher = logits
  errors, slope = identities.monte_carlo_convergence(jax.random.key(7), student[0], teacher[0],
                                                     [10, 100, 1000, 10000], repeats=100)
  assert abs(slope + 0.5) < 0.1, (slope, errors)
  assert errors[-1] < 0.1 * errors[0]


def test_tabular_model_enumerates_a_distribution():
  model = identities.TabularModel.build(3, 3)
  assert model.sequences.shape == (27, 3)
  # Distinct prefixes get distinct rows, and the rows cover the table exactly.
  prefixes = {(t, tuple(seq[:t])): pid for seq, ids in zip(model.sequences, model.prefix_ids)
              for t, pid in enumerate(ids)}
  assert len(prefixes) == len(set(prefixes.values())) == model.num_prefixes == 13
  table = model.init(jax.random.key(0))
  np.testing.assert_allclose(np.sum(np.exp(model.sequence_logprobs(table))), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="too many to enumerate"):
    identities.TabularModel.build(10, 4)


def test_sequence_kl_against_brute_force():
  """sequence_kl against a loop over sequences with per-step softmaxes looked up by prefix."""
  model = identities.TabularModel.build(2, 3)
  k_p, k_q = jax.random.split(jax.random.key(2))
  table_p, table_q = np.asarray(model.init(k_p), np.float64), np.asarray(model.init(k_q), np.float64)
  index = {(): 0}
  for t in range(1, 3):
    for prefix in itertools.product(range(2), repeat=t):
      index[prefix] = len(index)

  def log_prob(table, seq):
    total = 0.0
    for t, y in enumerate(seq):
      row = table[index[tuple(seq[:t])]]
      total += row[y] - np.log(np.sum(np.exp(row)))
    return total

  expect = sum(np.exp(log_prob(table_p, s)) * (log_prob(table_p, s) - log_prob(table_q, s))
               for s in itertools.product(range(2), repeat=3))
  np.testing.assert_allclose(identities.sequence_kl(model, table_p, table_q), expect, rtol=1e-5)


@pytest.mark.parametrize("vocab_size,length", [(3, 4), (4, 3)])
def test_sequence_level_identities(vocab_size, length):
  model = identities.TabularModel.build(vocab_size, length)
  k_t, k_s = jax.random.split(jax.random.key(vocab_size))
  table_teacher, table_student = model.init(k_t), model.init(k_s)
  for check in identities.sequence_decomposition(model, table_teacher, table_student):
    assert check.relative_error < TOL, check.name
  *exact, gap = identities.sequence_gradients(model, table_teacher, table_student)
  for check in exact:
    assert check.relative_error < TOL, check.name
  # The per-token surrogate is NOT the sequence gradient beyond one token: the future terms are real.
  assert gap.relative_error > 0.01


def test_future_term_gap_vanishes_for_one_token_only():
  gaps = identities.future_term_gap(jax.random.key(0), 3, [1, 2, 3], draws=8)
  assert gaps[0] < 1e-5
  assert np.all(gaps[1:] > 0.05)
