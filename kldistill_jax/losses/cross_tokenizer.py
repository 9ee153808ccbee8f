"""Losses between a student and a teacher whose tokenizers differ (plain jit/grad-safe array functions).

The two models' positions are matched by character spans (`data.alignment`): a span GROUP is text both
tokenizations cut around, so both models score it after the same text, each with its own tokens. Inputs
here are already gathered per group; float32 math whatever the input dtype.

  span_log_probs    log P(span) = Σ of a side's token log-probs inside each group (segment sum per row).
  bernoulli_kl      KL between the two models' probabilities of a span, as the two-outcome distributions
                    {this span, any other continuation}: P log(P/Q) + (1-P) log((1-P)/(1-Q)).
  shared_vocab_kl   token-level forward/reverse KL over the tokens both vocabularies share (each side's
                    distribution renormalised over its shared tokens); with the identity map (one
                    tokenizer) it is the ordinary full-vocabulary KL.
  uld_distance      Universal Logit Distillation (Boizard et al., 2024): L1 distance between the two
                    probability vectors sorted in decreasing order (the shorter padded with zeros), so no
                    vocabulary map is needed.
"""

import jax
import jax.numpy as jnp

from kldistill_jax.losses.divergences import kl_from_log_probs, log_probs

# A span of probability 1 in float32 leaves no "other" outcome (log(1 - P) = -inf): span log-probs are
# kept at or below log(1 - 1e-6), which moves the value by at most ~1e-6 nats per group.
_MAX_SPAN_LOGPROB = -1e-6


def span_log_probs(token_logprobs, groups, num_groups):
  """[B, num_groups] sums of token_logprobs [B, N] over the entries whose group id (int [B, N]) is each
  group; entries with a group id outside [0, num_groups) (e.g. -1) are left out."""
  groups = jnp.asarray(groups)
  inside = (groups >= 0) & (groups < num_groups)
  values = jnp.where(inside, token_logprobs.astype(jnp.float32), 0.0)
  ids = jnp.where(inside, groups, num_groups)  # the extra segment collects what is left out
  per_row = jax.vmap(lambda v, g: jax.ops.segment_sum(v, g, num_segments=num_groups + 1))
  return per_row(values, ids)[:, :num_groups]


def _log1mexp(x):
  """log(1 - e^x) for x < 0 (Mächler's switch at -log 2)."""
  return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def bernoulli_kl(log_p, log_q):
  """KL(Bern(P) || Bern(Q)) elementwise from log P, log Q (log-probs of one span under each model)."""
  log_p = jnp.minimum(log_p.astype(jnp.float32), _MAX_SPAN_LOGPROB)
  log_q = jnp.minimum(log_q.astype(jnp.float32), _MAX_SPAN_LOGPROB)
  p = jnp.exp(log_p)
  return p * (log_p - log_q) + (1.0 - p) * (_log1mexp(log_p) - _log1mexp(log_q))


def _mix(kl, student, teacher, lam):
  """lam * kl(student, teacher) + (1 - lam) * kl(teacher, student): lam = the weight of the REVERSE KL; a
  direction with weight 0 is not computed (so lam = 0 / 1 are exactly the pure directions)."""
  out = 0.0
  if lam < 1:
    out += (1.0 - lam) * kl(teacher, student)
  if lam > 0:
    out += lam * kl(student, teacher)
  return out


def mixed_bernoulli_kl(student_span_logprob, teacher_span_logprob, *, lam):
  """lam * KL(Bern(Q)||Bern(P)) + (1 - lam) * KL(Bern(P)||Bern(Q)); lam = weight of the REVERSE KL."""
  return _mix(bernoulli_kl, student_span_logprob, teacher_span_logprob, lam)


def shared_vocab_kl(student_logits, teacher_logits, student_ids, teacher_ids, *, lam, temperature=1.0):
  """Per-position lam * reverse + (1 - lam) * forward KL over the shared tokens.

  student_logits [..., Vs], teacher_logits [..., Vt]; student_ids / teacher_ids int [S]: entry s is one
  token both vocabularies hold (the same text), at id student_ids[s] and teacher_ids[s]. Each side's
  distribution is renormalised over those S tokens (a softmax of the selected logits), so the result is
  the KL between the two models' next-token distributions GIVEN that the next token is a shared one.
  """
  s_logp = log_probs(jnp.take(student_logits, student_ids, axis=-1), temperature)
  t_logp = log_probs(jnp.take(teacher_logits, teacher_ids, axis=-1), temperature)
  return _mix(kl_from_log_probs, s_logp, t_logp, lam)


def uld_distance(student_logits, teacher_logits, *, temperature=1.0):
  """Per-position Σ_k |q_(k) - p_(k)| of the probabilities sorted in decreasing order (ULD)."""
  def sorted_probs(logits, size):
    p = jnp.exp(log_probs(logits, temperature))
    p = -jnp.sort(-p, axis=-1)
    pad = [(0, 0)] * (p.ndim - 1) + [(0, size - p.shape[-1])]
    return jnp.pad(p, pad)
  size = max(student_logits.shape[-1], teacher_logits.shape[-1])
  return jnp.sum(jnp.abs(sorted_probs(student_logits, size) - sorted_probs(teacher_logits, size)), axis=-1)
