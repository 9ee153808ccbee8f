"""The sampled reverse-KL estimator is unbiased for its distribution, checked by EXACT ENUMERATION.

A tabular student and teacher over two positions (V tokens, every prefix its own table row): every
sequence (y1, y2) is enumerated with its probability under the sampler μ = the student at the sampling
temperature, and the estimator's expected gradient Σ μ(y1) μ(y2|y1) ∇ loss(y1, y2) is compared with
jax.grad of what it estimates: the token-level reverse KL at the objective temperature, averaged over
the prefixes the sampler visits (prefix distribution μ, not differentiated),

    J(θ) = 1/2 [ KL(q_θ(·) || p_T(·)) + Σ_y1 μ(y1) KL(q_θ(·|y1) || p_T(·|y1)) ].

The config checks that refuse samplers no weight can correct (greedy, top-k, top-p) are at the end.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_files
from kldistill_jax import objectives
from kldistill_jax.train import setup

V = 5


def _tables(seed=0):
  rng = np.random.default_rng(seed)
  student = dict(z0=jnp.asarray(rng.normal(0, 1.5, V), jnp.float32),
                 z1=jnp.asarray(rng.normal(0, 1.5, (V, V)), jnp.float32))
  teacher = (jnp.asarray(rng.normal(0, 1.5, V), jnp.float32), jnp.asarray(rng.normal(0, 1.5, (V, V)), jnp.float32))
  return student, teacher


def _logits(z0, z1, y1):
  """[1, 3, V] logits of the sequence (BOS, y1, y2): position 0 predicts y1, position 1 predicts y2."""
  return jnp.stack([z0, z1[y1], jnp.zeros(V)])[None]


def _kl(logits_a, logits_b, temperature):
  a, b = jax.nn.log_softmax(logits_a / temperature), jax.nn.log_softmax(logits_b / temperature)
  return jnp.sum(jnp.exp(a) * (a - b), axis=-1)


def _enumerated(objective, sampling_temperature, *, with_behavior):
  """(E_μ[∇ estimator], ∇ J) over the student tables, both float64 NumPy [V + V*V]."""
  student, (t0, t1) = _tables()
  mu0 = jax.nn.log_softmax(student["z0"] / sampling_temperature)          # log μ(y1)
  mu1 = jax.nn.log_softmax(student["z1"] / sampling_temperature, axis=-1)  # log μ(y2 | y1)
  y1, y2 = (jnp.asarray(c) for c in zip(*itertools.product(range(V), repeat=2)))

  def estimate(params, a, b):
    batch = dict(tokens=jnp.stack([jnp.zeros((), jnp.int32), a, b])[None],
                 loss_mask=jnp.asarray([[0, 1, 1]], jnp.float32))
    if with_behavior:  # the sampler's log-probs of the tokens it drew, as prefixes.from_sampler stores them
      batch["behavior_logprobs"] = jnp.stack([jnp.zeros(()), mu0[a], mu1[a, b]])[None]
    return objectives.compute(objective, _logits(params["z0"], params["z1"], a), _logits(t0, t1, a),
                              batch)[0]

  grads = jax.vmap(jax.grad(estimate), in_axes=(None, 0, 0))(student, y1, y2)
  prob = np.exp(np.asarray(mu0[y1] + mu1[y1, y2], np.float64))
  assert abs(prob.sum() - 1.0) < 1e-5
  expected = {k: np.tensordot(prob, np.asarray(g, np.float64), axes=1) for k, g in grads.items()}

  def target(params):
    prefix = jnp.exp(mu0)  # the sampler's prefix distribution: a constant, as in the estimator
    first = _kl(params["z0"], t0, objective.temperature)
    second = jnp.sum(prefix * _kl(params["z1"], t1, objective.temperature))
    return 0.5 * (first + second)

  exact = jax.grad(target)(student)
  flat = lambda d: np.concatenate([np.ravel(np.asarray(d[k], np.float64)) for k in ("z0", "z1")])
  return flat(expected), flat(exact)


@pytest.mark.parametrize("sampling_temperature,objective_temperature", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.7)])
def test_expected_gradient_is_the_reverse_kl_gradient(sampling_temperature, objective_temperature):
  objective = objectives.Objective(prefix="student", kl="reverse", estimator="sampled",
                                   temperature=objective_temperature)
  expected, exact = _enumerated(objective, sampling_temperature, with_behavior=True)
  assert np.abs(exact).max() > 0.05  # a gradient worth matching
  np.testing.assert_allclose(expected, exact, atol=1e-5, rtol=0)
  # Without the sampler's log-probs the tokens are taken as draws of q_θ (the behaviour before the
  # weights were applied at student prefixes): exact when the sampler IS q_θ, biased otherwise.
  unweighted, _ = _enumerated(objective, sampling_temperature, with_behavior=False)
  error = np.abs(unweighted - exact).max()
  if sampling_temperature == objective_temperature:
    assert error < 1e-5
  else:
    assert error > 0.02, error


def test_clip_truncates_the_weights_at_student_prefixes():
  objective = objectives.Objective(prefix="student", kl="reverse", estimator="sampled", clip=1.0)
  clipped, exact = _enumerated(objective, 0.6, with_behavior=True)
  assert np.abs(clipped - exact).max() > 1e-3  # a truncated weight is a (documented) bias
  huge = objectives.Objective(prefix="student", kl="reverse", estimator="sampled", clip=1e6)
  np.testing.assert_allclose(_enumerated(huge, 0.6, with_behavior=True)[0], exact, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- config checks

def _config(name, **overrides):
  return config_files.load(name, "smoke", **overrides)


@pytest.mark.parametrize("name,overrides,match", [
    ("opd", {"sampling.temperature": 0.0}, r"sampling\.temperature=0 \(greedy\)"),
    ("opd", {"sampling.top_k": 5}, r"sampling\.top_k=5 with objective\.estimator='sampled'"),
    ("opd", {"sampling.top_p": 0.9}, r"sampling\.top_p=0\.9 with objective\.estimator='sampled'"),
    ("offline_rl", {"sampling.top_k": 5, "sampling.top_p": 0.9}, r"sampling\.top_k=5, sampling\.top_p=0\.9"),
    ("offline_rl", {"sampling.temperature": 0.0}, r"\(greedy\)"),
    ("sft", {"objective.estimator": "sampled", "sampling.temperature": 0.6},
     r"sampling\.temperature=0\.6 vs objective\.temperature=1\.0 with objective\.kl='forward'"),
    ("opd", {"objective.discount": 1.0, "sampling.temperature": 0.6},
     r"sampling\.temperature=0\.6 vs objective\.temperature=1\.0 with objective\.discount=1\.0"),
])
def test_samplers_no_weight_corrects_are_refused(name, overrides, match):
  with pytest.raises(ValueError, match=match):
    setup.make_objective(_config(name, **overrides))


@pytest.mark.parametrize("name,overrides", [
    ("opd", {"sampling.temperature": 0.6}),  # corrected by the importance weights
    ("offline_rl", {"sampling.temperature": 0.6}),
    ("opd", {"objective.discount": 1.0}),  # on-policy: the reward-to-go needs no weights
    ("dagger", {"sampling.temperature": 0.0, "sampling.top_k": 5}),  # exact: greedy / truncated prefixes are a choice
])
def test_correctable_or_exact_settings_are_accepted(name, overrides):
  setup.make_objective(_config(name, **overrides))


@pytest.mark.parametrize("name", ["sft", "dagger", "offline_rl", "opd", "kl_mix", "quickstart",
                                  "qwen3_8b_to_0p6b", "teacher"])
def test_shipped_configs_pass_the_sampler_check(name):
  setup.make_objective(config_files.load(name))
