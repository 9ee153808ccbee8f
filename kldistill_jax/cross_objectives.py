"""The cross-tokenizer objective: a teacher whose tokenizer differs from the student's, matched by text.

The teacher reads the same TEXT as the student (prompt and completion re-tokenized with its own
tokenizer, see `train.cross_tokenizer`), and the two token sequences are matched by character spans
(`data.alignment`): a group is text both tokenizations cut around, so both models predict it after the
same text. Per group (at the prediction of the group's first student token):

  objective.cross_tokenizer = "span": where the group is ONE token on each side and both are the same
      shared-vocabulary token, the token-level KL (objective.kl / lam) between the two next-token
      distributions over the shared vocabulary (`losses.cross_tokenizer.shared_vocab_kl`); elsewhere the
      same KL between the two models' probabilities of the group's text, each the product of its own
      tokens' probabilities (`bernoulli_kl`). With one tokenizer every group is one shared token and this
      is exactly the ordinary exact token-level loss (`objectives.compute`).
  objective.cross_tokenizer = "uld": the ULD distance between the two next-token distributions at the
      group's first token (both after the same text); the group's other student tokens are not trained.

Positions outside aligned groups are masked and counted ("cross_unaligned_fraction"). The loss is a sum
over groups divided by the number of trained STUDENT tokens (the global `num_tokens` under micro-batching),
so it reduces like the ordinary token mean.

Batch keys besides tokens / loss_mask (token coordinates: entry t describes token t; "key" of a group =
the student prediction index t0 - 1 of its first student token t0):
  teacher_tokens, teacher_attention_mask  int [B, Lt]   the teacher's row (prompt + completion [+ EOS]).
  cross_student_group   int [B, L]    the key of token t's group, -1 when t is in none.
  cross_teacher_group   int [B, Lt]   the key of teacher token u's group, -1 when u is in none.
  cross_teacher_start   int [B, L]    at a group's first student token t0: the teacher prediction index
                                      u0 - 1 of the group's first teacher token u0; -1 elsewhere.
  cross_exact           int [B, L]    1 at t0 when the group is one shared token on each side.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from kldistill_jax import losses
from kldistill_jax.losses import cross_tokenizer as xt
from kldistill_jax.losses.chunking import reduce_positions

TEACHER_KEYS = ("teacher_tokens", "teacher_attention_mask")
KEYS = TEACHER_KEYS + ("cross_student_group", "cross_teacher_group", "cross_teacher_start", "cross_exact")


@dataclasses.dataclass(frozen=True, eq=False)
class SharedVocab:
  """Tokens both vocabularies hold: student_ids[s] and teacher_ids[s] are the same text (int [S])."""
  student_ids: np.ndarray
  teacher_ids: np.ndarray
  identity: bool = False  # one tokenizer on both sides: every id is shared with itself

  def __post_init__(self):
    if len(self.student_ids) != len(self.teacher_ids) or not len(self.student_ids):
      raise ValueError(f"SharedVocab needs two non-empty id lists of one length, got "
                       f"{len(self.student_ids)} and {len(self.teacher_ids)}")


def _token_logprobs(logits, targets, temperature):
  lp = losses.log_probs(logits, temperature)
  return lp, jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


def compute(objective, student_logits, teacher_logits, batch, shared: SharedVocab):
  """(loss, metrics) of `objective` (cross_tokenizer "uld" or "span") from student logits [B, L, Vs] at
  batch["tokens"] and teacher logits [B, Lt, Vt] at batch["teacher_tokens"]."""
  tokens, loss_mask = batch["tokens"], batch["loss_mask"]
  n = tokens.shape[1] - 1
  targets, weights = tokens[:, 1:], loss_mask[:, 1:]
  group = batch["cross_student_group"][:, 1:]
  starts_at = batch["cross_teacher_start"][:, 1:]
  exact = batch["cross_exact"][:, 1:] > 0
  is_start = group == jnp.arange(n)[None]
  t_logits = lax.stop_gradient(teacher_logits)[:, :-1]
  s_logits = student_logits[:, :-1]
  s_lp, s_tok = _token_logprobs(s_logits, targets, objective.temperature)
  # The teacher's next-token logits where each group starts (after the same text as the student's).
  t_at = jnp.take_along_axis(t_logits, jnp.maximum(starts_at, 0)[..., None], axis=1)
  num_tokens = batch.get("num_tokens")
  if objective.cross_tokenizer == "uld":
    per_group = xt.uld_distance(s_logits, t_at, temperature=objective.temperature)
    name = "cross_uld"
  else:
    _, t_tok = _token_logprobs(t_logits, batch["teacher_tokens"][:, 1:], objective.temperature)
    # Entry i of a span array is the group whose first student prediction is i (0 where none starts).
    s_span = xt.span_log_probs(s_tok, group, n)
    t_span = lax.stop_gradient(xt.span_log_probs(t_tok, batch["cross_teacher_group"][:, 1:], n))
    lam = objective.reverse_weight
    if objective.estimator == "sampled":
      loss = _sampled_span_loss(s_span, t_span, group, is_start, weights, batch, num_tokens)
      return loss, _metrics(loss, "cross_span_kl_k1", s_lp, group, is_start, exact, weights, num_tokens)
    token_kl = xt.shared_vocab_kl(s_logits, t_at, shared.student_ids, shared.teacher_ids, lam=lam,
                                  temperature=objective.temperature)
    span_kl = xt.mixed_bernoulli_kl(s_span, t_span, lam=lam)
    per_group = jnp.where(exact, token_kl, span_kl)
    name = "cross_span_kl"
  per_position = jnp.where(is_start, per_group, 0.0)
  loss = reduce_positions(per_position, weights, "mean", num_tokens)
  return loss, _metrics(loss, name, s_lp, group, is_start, exact, weights, num_tokens)


def _sampled_span_loss(s_span, t_span, group, is_start, weights, batch, num_tokens):
  """The sampled reverse KL on span groups (student prefixes): REINFORCE on log Q(span) with the dense
  reward log P(span) - log Q(span), importance-weighted by Q / behaviour per span, as
  `losses.reverse_kl_policy_gradient` does per token (one-token groups: exactly that estimator)."""
  behavior = batch.get("behavior_logprobs")
  if behavior is not None:
    behavior = xt.span_log_probs(behavior[:, 1:], group, group.shape[1])
  starts = jnp.where(is_start, weights, 0).astype(jnp.float32)
  total = jnp.sum(weights.astype(jnp.float32)) if num_tokens is None else num_tokens
  return losses.reverse_kl_policy_gradient(s_span, t_span, starts, behavior_logprobs=behavior, num_tokens=total)


def _metrics(loss, name, s_lp, group, is_start, exact, weights, num_tokens):
  mean = lambda v: reduce_positions(lax.stop_gradient(v).astype(jnp.float32), weights, "mean", num_tokens)
  return {
      "loss": lax.stop_gradient(loss), name: lax.stop_gradient(loss),
      "num_tokens": jnp.sum(weights.astype(jnp.float32)),
      "student_entropy": mean(losses.entropy_from_log_probs(s_lp)),
      "cross_unaligned_fraction": mean(group < 0),  # trained student tokens in no aligned group
      "cross_exact_fraction": mean(is_start & exact),  # ... in one-token shared-vocabulary groups
      "cross_groups_per_token": mean(is_start),
  }
