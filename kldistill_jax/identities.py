"""Both sides of every gradient identity the library rests on, computed by independent code paths.

Token level (a fixed prefix, teacher constant):
  1. ∇ KL(p_T||q_θ) = ∇ CE(p_T, q_θ) = -Σ_y p_T(y) ∇ log q_θ(y)
  2. ∇ KL(q_θ||p_T) = Σ_y q_θ(y) (log q_θ(y) - log p_T(y)) ∇ log q_θ(y)            (exact policy gradient)
  3. the REINFORCE estimate of `losses.reverse_kl_policy_gradient` converges to (2) like 1/sqrt(n)
Sequence level, on a tabular autoregressive model small enough to enumerate every sequence:
  4. KL_seq(p_T||q_θ) = Σ_t E_{s_t ~ d_t^T} KL(p_T||q_θ)(s_t),  KL_seq(q_θ||p_T) = Σ_t E_{s_t ~ d_t^S} KL(q_θ||p_T)(s_t);
     ∇ KL_seq(q_θ||p_T) = E_q[reward-to-go estimator, discount 1]; the discount-0 surrogate instead equals
     the gradient of the token-level reverse KLs at FROZEN student prefixes, missing the future terms.
  5. mixing is linear in gradients: ∇ mixed_kl(lam) = lam ∇ reverse_kl + (1 - lam) ∇ forward_kl.
Every check returns an `IdentityCheck` (left side, right side, errors); notebooks and `run.py` print them.
"""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kldistill_jax import losses
from kldistill_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class IdentityCheck:
  """Both sides of one identity as float64 NumPy arrays."""
  name: str
  lhs_label: str
  rhs_label: str
  lhs: np.ndarray
  rhs: np.ndarray

  @property
  def max_abs_error(self) -> float:
    return float(np.max(np.abs(self.lhs - self.rhs)))

  @property
  def relative_error(self) -> float:
    """max |lhs - rhs| / max |rhs|: scale-free, the number tolerances are stated in."""
    return self.max_abs_error / max(float(np.max(np.abs(self.rhs))), 1e-30)


def _check(name, lhs_label, rhs_label, lhs, rhs):
  return IdentityCheck(name, lhs_label, rhs_label, np.asarray(lhs, np.float64), np.asarray(rhs, np.float64))


def random_logits(rng, shape, scale=2.0):
  """Logits with spread `scale`, so the distributions are neither uniform nor one-hot."""
  return scale * jax.random.normal(rng, shape, jnp.float32)


# ---------------------------------------------------------------- token level

def forward_kl_gradient(student_logits, teacher_logits):
  """(1): grad of `forward_kl` vs grad of the cross-entropy against the teacher's soft targets."""
  lhs = jax.grad(lambda s: losses.forward_kl(s, teacher_logits, reduction="sum"))(student_logits)
  p = jax.nn.softmax(teacher_logits)
  rhs = jax.grad(lambda s: -jnp.sum(p * jax.nn.log_softmax(s)))(student_logits)
  return _check("forward-KL gradient = soft-target cross-entropy gradient", "∇ KL(p_T||q)",
                "∇ CE(p_T, q)", lhs, rhs)


def exact_policy_gradient(student_logits, teacher_logits):
  """Σ_y q(y) (log q(y) - log p(y)) ∇_s log q(y) per position, through the explicit [V, V] Jacobian."""
  def one_position(s, t):
    log_q, log_p = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
    jacobian_yv = jax.jacobian(jax.nn.log_softmax)(s)  # row y: ∇_s log q(y)
    return (jnp.exp(log_q) * (log_q - log_p)) @ jacobian_yv

  flat_s = student_logits.reshape(-1, student_logits.shape[-1])
  flat_t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
  return jax.vmap(one_position)(flat_s, flat_t).reshape(student_logits.shape)


def reverse_kl_gradient(student_logits, teacher_logits):
  """(2): grad of `reverse_kl` vs the exact policy-gradient expectation."""
  lhs = jax.grad(lambda s: losses.reverse_kl(s, teacher_logits, reduction="sum"))(student_logits)
  return _check("reverse-KL gradient = exact policy gradient", "∇ KL(q||p_T)",
                "Σ_y q(y)(log q - log p_T)∇log q(y)", lhs, exact_policy_gradient(student_logits,
                                                                                 teacher_logits))


def mixing_linearity(student_logits, teacher_logits, lam):
  """(5): grad of `mixed_kl` vs the lam-weighted sum of the two directions' gradients."""
  grad = lambda f, **kw: jax.grad(lambda s: f(s, teacher_logits, **kw))(student_logits)
  lhs = grad(losses.mixed_kl, lam=lam)
  rhs = lam * grad(losses.reverse_kl) + (1 - lam) * grad(losses.forward_kl)
  return _check(f"mixing is linear in gradients (lam={lam})", "∇ mixed_kl(lam)",
                "lam ∇RKL + (1-lam) ∇FKL", lhs, rhs)


def monte_carlo_policy_gradient(rng, student_logits_V, teacher_logits_V, num_samples):
  """The REINFORCE estimate of ∇ KL(q||p_T) at one position from `num_samples` tokens y ~ q."""
  tokens = jax.random.categorical(rng, student_logits_V, shape=(1, num_samples))
  teacher_lp = jax.nn.log_softmax(teacher_logits_V)[tokens]

  def surrogate(s):
    return losses.reverse_kl_policy_gradient(jax.nn.log_softmax(s)[tokens], teacher_lp)

  return jax.grad(surrogate)(student_logits_V)


def monte_carlo_convergence(rng, student_logits_V, teacher_logits_V, sample_sizes, repeats):
  """(3): RMS error of the REINFORCE estimate vs the exact gradient, per sample size.

  Returns (errors [len(sample_sizes)], fitted slope of log error vs log n: -0.5 means 1/sqrt(n)).
  """
  exact = exact_policy_gradient(student_logits_V[None], teacher_logits_V[None])[0]
  errors = []
  for i, n in enumerate(sample_sizes):
    keys = jax.random.split(jax.random.fold_in(rng, i), repeats)
    estimates = jax.vmap(lambda k: monte_carlo_policy_gradient(k, student_logits_V, teacher_logits_V,
                                                               n))(keys)
    errors.append(float(jnp.sqrt(jnp.mean(jnp.sum((estimates - exact) ** 2, axis=-1)))))
  slope = float(np.polyfit(np.log(sample_sizes), np.log(errors), 1)[0])
  return np.asarray(errors), slope


# ---------------------------------------------------------------- sequence level

@dataclasses.dataclass(frozen=True)
class TabularModel:
  """An autoregressive model with one free logit vector per prefix: every sequence can be enumerated.

  `sequences` [S, L] lists all V^L sequences; `prefix_ids` [S, L] gives, for each sequence and step t,
  the row of the table holding the logits of token t given the prefix y_<t.
  """
  vocab_size: int
  length: int
  sequences: np.ndarray
  prefix_ids: np.ndarray

  @classmethod
  def build(cls, vocab_size, length):
    if vocab_size ** length > 4096:
      raise UserError(f"vocab_size**length = {vocab_size ** length} sequences is too many to enumerate")
    sequences = np.array(list(itertools.product(range(vocab_size), repeat=length)), np.int32)
    offsets = np.cumsum([0] + [vocab_size ** t for t in range(length)])  # rows before prefixes of length t
    prefix_ids = np.zeros_like(sequences)
    for t in range(length):
      code = sequences[:, :t] @ (vocab_size ** np.arange(t - 1, -1, -1)) if t else 0
      prefix_ids[:, t] = offsets[t] + code
    return cls(vocab_size, length, sequences, prefix_ids)

  @property
  def num_prefixes(self):
    return sum(self.vocab_size ** t for t in range(self.length))

  def init(self, rng, scale=1.5):
    return random_logits(rng, (self.num_prefixes, self.vocab_size), scale)

  def step_logits(self, table):
    """[S, L, V]: the logits of every step of every sequence."""
    return table[self.prefix_ids]

  def token_logprobs(self, table):
    """[S, L]: log-prob of each sequence's token t given its prefix."""
    log_probs = jax.nn.log_softmax(self.step_logits(table))
    return jnp.take_along_axis(log_probs, self.sequences[..., None], axis=-1)[..., 0]

  def sequence_logprobs(self, table):
    return jnp.sum(self.token_logprobs(table), axis=-1)


def sequence_kl(model, table_p, table_q):
  """Exact KL(P||Q) between two tabular models, from whole-sequence probabilities."""
  log_p, log_q = model.sequence_logprobs(table_p), model.sequence_logprobs(table_q)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


def token_kl_sum(model, table_p, table_q, prefix_table):
  """Σ_t E_{s_t ~ prefix model} KL(P(·|s_t) || Q(·|s_t)) from token-level full-vocabulary KLs."""
  per_step = losses.forward_kl(model.step_logits(table_q), model.step_logits(table_p), reduction="none")
  prefix_weight = jnp.exp(model.sequence_logprobs(prefix_table))[:, None]  # marginal of s_t under it
  return jnp.sum(prefix_weight * per_step)


def sequence_decomposition(model, table_teacher, table_student):
  """(4a): exact sequence-level KLs vs the sums of token-level KLs over each side's prefixes."""
  forward = _check("sequence forward KL = Σ_t E_{teacher prefixes} token forward KL", "KL_seq(p_T||q)",
                   "Σ_t E_dT KL_t(p_T||q)", sequence_kl(model, table_teacher, table_student),
                   token_kl_sum(model, table_teacher, table_student, table_teacher))
  reverse = _check("sequence reverse KL = Σ_t E_{student prefixes} token reverse KL", "KL_seq(q||p_T)",
                   "Σ_t E_dS KL_t(q||p_T)", sequence_kl(model, table_student, table_teacher),
                   token_kl_sum(model, table_student, table_teacher, table_student))
  return forward, reverse


def expected_policy_gradient(model, table_teacher, table_student, discount):
  """E_{y ~ q}[gradient of `reverse_kl_policy_gradient`] w.r.t. the student table, exactly.

  Every sequence is one row; the stop-gradient sequence probability is the row's mask weight and the
  token-mean denominator is 1, so the estimator's token mean becomes an exact expectation of the
  per-sequence sum.
  """
  teacher_lp = model.token_logprobs(table_teacher)
  seq_prob = jax.lax.stop_gradient(jnp.exp(model.sequence_logprobs(table_student)))
  weights = jnp.broadcast_to(seq_prob[:, None], teacher_lp.shape)

  def surrogate(table):
    return losses.reverse_kl_policy_gradient(model.token_logprobs(table), teacher_lp, weights,
                                             discount=discount, num_tokens=1.0)

  return jax.grad(surrogate)(table_student)


def sequence_gradients(model, table_teacher, table_student):
  """(4b): gradient identities of the sequence-level KLs w.r.t. the student table.

  Returns checks for: forward sequence KL gradient = token forward KL gradients at teacher prefixes;
  reverse sequence KL gradient = E[discount-1 estimator]; E[discount-0 estimator] = gradient of token
  reverse KLs at frozen student prefixes; and the discount-0 vs true gradient gap (not an identity: its
  relative error is the size of the future terms that per-token rewards drop).
  """
  grad = lambda f: jax.grad(f)(table_student)
  fwd_true = grad(lambda q: sequence_kl(model, table_teacher, q))
  fwd_token = grad(lambda q: token_kl_sum(model, table_teacher, q, table_teacher))
  rev_true = grad(lambda q: sequence_kl(model, q, table_teacher))
  frozen_prefixes = jax.lax.stop_gradient(table_student)
  rev_token_frozen = grad(lambda q: jnp.sum(
      jnp.exp(model.sequence_logprobs(frozen_prefixes))[:, None]
      * losses.reverse_kl(model.step_logits(q), model.step_logits(table_teacher), reduction="none")))
  pg1 = expected_policy_gradient(model, table_teacher, table_student, discount=1.0)
  pg0 = expected_policy_gradient(model, table_teacher, table_student, discount=0.0)
  return (
      _check("∇ sequence forward KL = Σ_t ∇ token forward KL at teacher prefixes", "∇ KL_seq(p_T||q)",
             "Σ_t E_dT ∇KL_t", fwd_true, fwd_token),
      _check("∇ sequence reverse KL = E[reward-to-go estimator, discount 1]", "∇ KL_seq(q||p_T)",
             "E_q[Σ_t R_t ∇log q_t]", rev_true, pg1),
      _check("E[discount-0 estimator] = ∇ token reverse KLs at frozen student prefixes",
             "E_q[Σ_t r_t ∇log q_t]", "Σ_t E_sg(dS) ∇KL_t(q||p_T)", pg0, rev_token_frozen),
      _check("gap: discount-0 estimator vs true sequence gradient (future terms)",
             "E[discount-0 estimator]", "∇ KL_seq(q||p_T)", pg0, rev_true),
  )


def future_term_gap(rng, vocab_size, lengths, draws=32):
  """Relative size of what the discount-0 surrogate drops, ‖E[pg0] - ∇KL_seq‖ / ‖∇KL_seq‖, per length.

  The per-token reward ignores how a token changes the student's later prefixes; the longer the
  sequence, the more of the true sequence-level gradient that is. Averaged over `draws` random
  teacher/student pairs per length (returns [len(lengths)]).
  """
  gaps = []
  for length in lengths:
    model = TabularModel.build(vocab_size, length)

    def gap(key, model=model):
      k_teacher, k_student = jax.random.split(key)
      table_teacher, table_student = model.init(k_teacher), model.init(k_student)
      true = jax.grad(lambda q: sequence_kl(model, q, table_teacher))(table_student)
      pg0 = expected_policy_gradient(model, table_teacher, table_student, discount=0.0)
      return jnp.linalg.norm(pg0 - true) / jnp.linalg.norm(true)

    keys = jax.random.split(jax.random.fold_in(rng, length), draws)
    gaps.append(float(jnp.mean(jax.jit(jax.vmap(gap))(keys))))
  return np.asarray(gaps)


def all_checks(config):
  """Every identity on the random instance described by `config` (see configs/identities.py).

  Returns (checks, monte-carlo result dict with "sample_sizes", "errors", "slope").
  """
  keys = jax.random.split(jax.random.key(config.seed), 5)
  shape = (config.num_positions, config.vocab_size)
  student = random_logits(keys[0], shape, config.logit_scale)
  teacher = random_logits(keys[1], shape, config.logit_scale)
  model = TabularModel.build(config.sequence.vocab_size, config.sequence.length)
  table_teacher, table_student = model.init(keys[2]), model.init(keys[3])
  checks = [forward_kl_gradient(student, teacher), reverse_kl_gradient(student, teacher),
            mixing_linearity(student, teacher, config.lam),
            *sequence_decomposition(model, table_teacher, table_student),
            *sequence_gradients(model, table_teacher, table_student)]
  errors, slope = monte_carlo_convergence(keys[4], student[0], teacher[0], list(config.mc.sample_sizes),
                                          config.mc.repeats)
  return checks, {"sample_sizes": list(config.mc.sample_sizes), "errors": errors, "slope": slope}


def format_table(checks, monte_carlo=None):
  """A plain-text table: identity, |lhs|, |rhs|, max |lhs - rhs|, relative error."""
  rows = [("identity", "max|lhs|", "max|rhs|", "max|lhs-rhs|", "rel. error")]
  for c in checks:
    rows.append((c.name, f"{np.max(np.abs(c.lhs)):.6g}", f"{np.max(np.abs(c.rhs)):.6g}",
                 f"{c.max_abs_error:.3e}", f"{c.relative_error:.3e}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  if monte_carlo is not None:
    lines += ["", "REINFORCE estimate of ∇ KL(q||p_T) vs exact (RMS error over repeats):",
              "  n        RMS error    error * sqrt(n)"]
    for n, e in zip(monte_carlo["sample_sizes"], monte_carlo["errors"]):
      lines.append(f"  {n:<8d} {e:<12.4e} {e * math.sqrt(n):.4f}")
    lines.append(f"  fitted slope of log error vs log n: {monte_carlo['slope']:.3f} (1/sqrt(n) is -0.5)")
  return "\n".join(lines)
