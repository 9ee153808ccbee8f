"""The 2x2 of distillation (prefix source x token-level KL direction), plus mixing, as data.

An `Objective` says where training prefixes come from and which token-level divergence is optimised
with which estimator. `compute` turns model outputs and a batch into `(loss, metrics)`; it is the ONE
place where positions are aligned: logits at position t predict token t + 1, so

    predictions = logits[:, :-1]      targets = tokens[:, 1:]      weights = loss_mask[:, 1:]

so each row must be contiguous where it is trained (prompts LEFT-padded, as the trainer builds them; a
right-padded prompt sampled by `sampling.sample` leaves a padding gap before its completion, which
`sampling.score` handles but this shift does not).

Batch (a dict of arrays, all aligned with `tokens`, entry t describing token t):
  tokens            int [B, L]   prompt + response.
  loss_mask         [B, L]       1 where token t's prediction is trained (response tokens), else 0.
  behavior_logprobs [B, L]       optional: log-prob of token t under the distribution that drew it (the
                                 sampler's, temperature included): the sampled reverse estimator weights
                                 token t by q_θ / behavior at EITHER prefix source (at student prefixes
                                 the sampler may run at another temperature than the one trained).
                                 Absent: the teacher's log-probs at teacher prefixes; at student
                                 prefixes the tokens are taken as draws of q_θ itself (weights 1).
  teacher_logprobs  [B, L]       optional: per-token teacher log-probs, used when `teacher_logits` is
                                 None (e.g. cached teacher trajectories) by the sampled estimator.
  teacher_topk_ids, teacher_topk_logprobs  int / float [B, L, k]   optional: the teacher's k most likely
                                 tokens for token t and their log-probs at objective.temperature (a
                                 cache stores temperature 1); with `teacher_logits` None they give the
                                 exact forward KL at teacher prefixes, coarsened to the k tokens + rest
                                 (`losses.topk_forward_kl`; exact when k = V).
  num_tokens        scalar       optional: global number of trained tokens when this batch is one
                                 micro-batch of a larger one; the loss and metrics are then this
                                 micro-batch's share of the global token means (sum them).
"""

import dataclasses
from typing import Optional

import jax.numpy as jnp
from jax import lax

from kldistill_jax import losses
from kldistill_jax.errors import UserError
from kldistill_jax.losses import _checks
from kldistill_jax.losses.chunking import map_position_chunks, reduce_positions

PREFIXES = ("teacher", "student", "dataset")
KLS = ("forward", "reverse", "mixed")
ESTIMATORS = ("exact", "sampled")
CROSS_TOKENIZER = ("off", "uld", "span")  # see `cross_objectives`
TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs")
TEACHER_HIDDEN = "teacher_hidden"  # cached final hidden states of the teacher (see `teacher_source`)
TEACHER_SOURCES = ("live", "hidden", "logprobs", "topk", "data")


@dataclasses.dataclass(frozen=True)
class Objective:
  """One cell of the design space. Invalid combinations raise ValueError naming the field.

  Attributes:
    prefix: where sequences come from: "teacher" (teacher samples), "student" (on-policy samples of the
      current student), "dataset" (the data's own responses).
    kl: token-level divergence: "forward" KL(p_T||q_θ), "reverse" KL(q_θ||p_T), "mixed" (see lam).
    lam: weight of the REVERSE KL when kl="mixed" (0 = forward, 1 = reverse); must be None otherwise.
    estimator: "exact" sums over the whole vocabulary at every prefix; "sampled" uses only the sampled
      tokens (reverse: REINFORCE with dense reward log p_T - log q_θ, importance-weighted by
      q_θ / behavior at either prefix source; forward: cross-entropy on teacher samples, so only at
      teacher prefixes). With discount 0 and no clip, the sampled reverse gradient is unbiased for the
      token-level reverse KL at each prefix the sampler visits (the prefix distribution is the
      sampler's, as for the exact estimator) when the behaviour distribution puts mass on every token
      q_θ does: no greedy, top-k or top-p sampler (`train.setup.make_objective` refuses those).
    temperature: divides student and teacher logits in the loss (sampling temperature is separate).
    discount: reward-to-go discount of the sampled reverse estimator (0 = per-token reward).
    clip: upper truncation of the importance weights of the sampled estimator (biased, lower variance).
    chunk_size: positions per chunk for the full-vocabulary computations (None = all at once).
    cross_tokenizer: "off" (one tokenizer), or the loss between a teacher and a student whose tokenizers
      differ, matched by character spans: "uld" or "span" (see `cross_objectives`).
  """
  prefix: str = "student"
  kl: str = "reverse"
  lam: Optional[float] = None
  estimator: str = "exact"
  temperature: float = 1.0
  discount: float = 0.0
  clip: Optional[float] = None
  chunk_size: Optional[int] = None
  cross_tokenizer: str = "off"

  def __post_init__(self):
    for field, allowed in (("prefix", PREFIXES), ("kl", KLS), ("estimator", ESTIMATORS),
                           ("cross_tokenizer", CROSS_TOKENIZER)):
      if getattr(self, field) not in allowed:
        raise UserError(f"objective.{field} must be one of {allowed}, got {getattr(self, field)!r}")
    if self.kl == "mixed":
      if self.lam is None:
        raise UserError("objective.lam is required when objective.kl='mixed' (weight of the reverse KL)")
      _checks.check_in_range("objective.lam", self.lam, 0.0, 1.0)
    elif self.lam is not None:
      raise UserError(f"objective.lam={self.lam} is set but objective.kl={self.kl!r}; lam is only "
                      "used with kl='mixed'")
    _checks.check_temperature(self.temperature)
    _checks.check_in_range("objective.discount", self.discount, 0.0, 1.0)
    _checks.check_chunk_size(self.chunk_size)
    if self.clip is not None:
      _checks.check_in_range("objective.clip", self.clip, 0.0, float("inf"), low_open=True)
    if self.cross_tokenizer != "off":
      self._check_cross_tokenizer()
    if self.estimator == "exact":
      if self.discount != 0.0 or self.clip is not None:
        raise UserError("objective.discount and objective.clip only apply to estimator='sampled'")
      return
    if self.prefix == "dataset":
      raise UserError("objective.estimator='sampled' needs tokens drawn by a known policy; with "
                      "prefix='dataset' use estimator='exact'")
    if self.prefix == "student" and self.kl != "reverse":
      raise UserError(f"objective.kl={self.kl!r} with estimator='sampled' needs teacher samples "
                      "(the forward KL is an expectation under p_T); use prefix='teacher' or "
                      "estimator='exact'")

  def _check_cross_tokenizer(self):
    field = f"objective.cross_tokenizer={self.cross_tokenizer!r}"
    if self.estimator != "exact" and self.cross_tokenizer != "span":
      raise UserError(f"{field} compares whole distributions: it needs objective.estimator='exact', got "
                      f"{self.estimator!r} (the sampled estimator exists for cross_tokenizer='span')")
    if self.discount != 0.0 or self.clip is not None:
      raise UserError(f"{field}: objective.discount and objective.clip are not supported (rewards are per "
                      "span group)")
    if self.prefix == "teacher":
      raise UserError(f"{field} scores the student's or the dataset's text with the teacher: "
                      "objective.prefix must be 'student' or 'dataset' (teacher samples in the teacher's "
                      "tokens are not supported)")
    if self.cross_tokenizer == "uld" and self.kl == "mixed":
      raise UserError(f"{field} optimises the sorted-probability distance, which has no direction: "
                      "objective.kl='mixed' (lam) does not apply; use kl='forward' or 'reverse'")

  @property
  def reverse_weight(self) -> float:
    """The weight of the reverse KL in the optimised divergence (lam, with forward=0, reverse=1)."""
    return {"forward": 0.0, "reverse": 1.0}.get(self.kl, self.lam)


sft = Objective(prefix="teacher", kl="forward", estimator="exact")
dagger = Objective(prefix="student", kl="forward", estimator="exact")
offline_rl = Objective(prefix="teacher", kl="reverse", estimator="sampled")
opd = Objective(prefix="student", kl="reverse", estimator="sampled")


def mixed(lam, prefix="student"):
  """lam * reverse + (1 - lam) * forward KL, exact over the vocabulary, at `prefix` prefixes."""
  return Objective(prefix=prefix, kl="mixed", lam=lam, estimator="exact")


PRESETS = {"sft": sft, "dagger": dagger, "offline_rl": offline_rl, "opd": opd}


def teacher_source(objective: Objective, batch, *, live_teacher: bool) -> str:
  """Where one step's teacher signal comes from: the ONE decision that the train step (what to run),
  `compute` / `compute_from_hidden` (what to read) and the loop's FLOP count (what ran) share.

    "logprobs"  batch["teacher_logprobs"]: the sampled estimator's per-token teacher log-probs (a cache,
                or the teacher's own sampler at teacher prefixes); no teacher forward.
    "hidden"    batch["teacher_hidden"]: the teacher's cached final hidden states; only its output head
                runs (the exact estimator).
    "topk"      the batch's top-k teacher log-probs (TOPK_KEYS): the exact forward KL, coarsened to k.
    "live"      the teacher's forward on the batch (live_teacher: a teacher was given); always with a
                cross-tokenizer objective (its batches carry no cached teacher outputs).
    "data"      no teacher: the data's tokens are the teacher (exact forward KL = the cross-entropy).

  Cached outputs win over a live teacher whenever they serve the objective: they are what its forward
  would compute, without running it.
  """
  def has(key):
    return batch.get(key) is not None

  if objective.cross_tokenizer != "off":
    return "live"
  if objective.estimator == "sampled":
    if has("teacher_logprobs"):
      return "logprobs"
    if has(TEACHER_HIDDEN):
      raise ValueError(f"batch[{TEACHER_HIDDEN!r}] serves objective.estimator='exact'; the sampled estimator "
                       "reads the cached batch['teacher_logprobs']")
    if live_teacher:
      return "live"
    hint = (" (top-k teacher log-probs serve only kl='forward', estimator='exact')"
            if any(has(key) for key in TOPK_KEYS) else "")
    raise ValueError(f"no teacher with estimator='sampled' needs batch['teacher_logprobs']{hint}")
  if has(TEACHER_HIDDEN):
    return "hidden"
  if objective.kl == "forward" and has(TOPK_KEYS[0]):
    return "topk"
  if live_teacher:
    return "live"
  # Top-k log-probs with another KL: `_topk_forward_kl` refuses them, naming what they serve.
  return "topk" if any(has(key) for key in TOPK_KEYS) else "data"


def align(batch, *logits):
  """(targets [B, L-1], weights [B, L-1], per-token extras shifted, logits[:, :-1] ...): the one shift."""
  tokens, loss_mask = batch["tokens"], batch["loss_mask"]
  _checks.check_same_shape("batch['loss_mask']", loss_mask, "batch['tokens']", tokens)
  for name, x in zip(("student", "teacher"), logits):
    if x is not None and tuple(x.shape[:2]) != tuple(tokens.shape):
      raise ValueError(f"{name} outputs have shape {x.shape} but batch['tokens'] has shape "
                       f"{tokens.shape}; outputs must cover every token position [B, L, ...]")
  extras = {}
  for key in ("behavior_logprobs", "teacher_logprobs"):
    if batch.get(key) is not None:
      _checks.check_same_shape(f"batch[{key!r}]", batch[key], "batch['tokens']", tokens)
      extras[key] = batch[key][:, 1:]
  for key in TOPK_KEYS:
    if batch.get(key) is not None:
      if batch[key].ndim != 3 or tuple(batch[key].shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}; expected [B, L, k] with "
                         f"[B, L] = batch['tokens'].shape = {tuple(tokens.shape)}")
      extras[key] = batch[key][:, 1:]
  shifted = tuple(None if x is None else x[:, :-1] for x in logits)
  return tokens[:, 1:], loss_mask[:, 1:], extras, shifted


def _sampled_loss(objective, student_lp, teacher_lp, weights, extras, num_tokens):
  # The tokens' own sampler, whatever the prefix source: at student prefixes it is q_θ at the sampling
  # temperature (weights 1 up to rounding when that equals objective.temperature).
  behavior = extras.get("behavior_logprobs", teacher_lp if objective.prefix == "teacher" else None)
  loss = 0.0
  if objective.reverse_weight > 0:
    loss += objective.reverse_weight * losses.reverse_kl_policy_gradient(
        student_lp, teacher_lp, weights, discount=objective.discount, behavior_logprobs=behavior,
        clip=objective.clip, num_tokens=num_tokens)
  if objective.reverse_weight < 1:
    loss += (1.0 - objective.reverse_weight) * losses.forward_kl_from_teacher_samples(
        student_lp, teacher_lp, weights, num_tokens=num_tokens)
  return loss


def _metrics(loss, stats, weights, num_tokens):
  mean = lambda v: reduce_positions(lax.stop_gradient(v), weights, "mean", num_tokens)
  metrics = {name: mean(value) for name, value in stats.items() if not name.endswith("_logprob")}
  if "student_logprob" in stats and "teacher_logprob" in stats:
    log_ratio = lax.stop_gradient(stats["teacher_logprob"] - stats["student_logprob"])
    metrics["sampled_reverse_kl_k3"] = mean(jnp.expm1(log_ratio) - log_ratio)
  metrics["loss"] = lax.stop_gradient(loss)
  metrics["num_tokens"] = jnp.sum(weights.astype(jnp.float32))
  return metrics


def _data_cross_entropy(objective, s_logits, targets, weights, num_tokens):
  """Forward KL to the data's one-hot "teacher" (zero entropy), i.e. the cross-entropy of the data."""
  if objective.prefix != "dataset" or objective.kl != "forward":
    raise ValueError("teacher_logits=None with estimator='exact' means the data is the teacher (one-hot "
                     "targets), which needs objective.prefix='dataset' and objective.kl='forward', got "
                     f"prefix={objective.prefix!r}, kl={objective.kl!r}")
  lp = losses.log_probs(s_logits, objective.temperature)
  nll = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
  loss = reduce_positions(nll, weights, "mean", num_tokens)
  stats = {"forward_kl": nll, "student_entropy": losses.entropy_from_log_probs(lp)}
  return loss, _metrics(loss, stats, weights, num_tokens)


def _topk_forward_kl(objective, s_logits, weights, extras, num_tokens):
  """Exact forward KL against the batch's teacher top-k log-probs (no teacher logits)."""
  if (objective.prefix, objective.kl, objective.estimator) != ("teacher", "forward", "exact"):
    raise ValueError("batch['teacher_topk_ids'/'teacher_topk_logprobs'] without teacher_logits give only "
                     "the forward KL at teacher prefixes: objective.prefix='teacher', kl='forward', "
                     f"estimator='exact' (sft); got prefix={objective.prefix!r}, kl={objective.kl!r}, "
                     f"estimator={objective.estimator!r}")
  if not all(key in extras for key in TOPK_KEYS):
    raise ValueError(f"the batch needs both {TOPK_KEYS}, got only {[k for k in TOPK_KEYS if k in extras]}")
  lp = losses.log_probs(s_logits, objective.temperature)
  per_position = losses.topk_kl_from_log_probs(lp, *(extras[k] for k in TOPK_KEYS))
  loss = reduce_positions(per_position, weights, "mean", num_tokens)
  stats = {"topk_forward_kl": per_position, "student_entropy": losses.entropy_from_log_probs(lp)}
  return loss, _metrics(loss, stats, weights, num_tokens)


def compute(objective: Objective, student_logits, teacher_logits, batch):
  """Loss and metrics of `objective` on one batch.

  Args:
    student_logits: [B, L, V] student logits at every position of batch["tokens"] (differentiable).
    teacher_logits: [B, L, V] teacher logits (constant), or None: with the sampled estimator when
      batch["teacher_logprobs"] holds the teacher's per-token log-probs; with the exact forward KL at
      teacher prefixes when the batch holds the teacher's top-k (metric "topk_forward_kl"); with the
      exact estimator at dataset prefixes and kl="forward", the data is the teacher and the loss is its
      cross-entropy.
    batch: see the module docstring.

  Returns:
    (loss, metrics). metrics: "loss", "num_tokens" and the token means of "student_entropy" and, when
    teacher logits are given, the EXACT "forward_kl", "reverse_kl" and "teacher_entropy" (whatever is
    optimised), plus "sampled_reverse_kl_k3" (Schulman's k3 on the sampled tokens).
  """
  targets, weights, extras, (s_logits, t_logits) = align(batch, student_logits, teacher_logits)
  num_tokens = batch.get("num_tokens")
  source = "live" if t_logits is not None else teacher_source(objective, batch, live_teacher=False)
  if source == "topk":
    return _topk_forward_kl(objective, s_logits, weights, extras, num_tokens)
  if source == "data":
    return _data_cross_entropy(objective, s_logits, targets, weights, num_tokens)
  if source == "hidden":
    raise ValueError(f"batch[{TEACHER_HIDDEN!r}] needs the teacher's head: `compute_from_hidden`, or pass "
                     "teacher_logits = hidden @ head")
  if source == "logprobs":
    lp = losses.log_probs(s_logits, objective.temperature)
    stats = {"student_entropy": losses.entropy_from_log_probs(lp),
             "student_logprob": jnp.take_along_axis(lp, targets[..., None], -1)[..., 0],
             "teacher_logprob": extras["teacher_logprobs"].astype(jnp.float32)}
  else:
    t_logits = lax.stop_gradient(t_logits)
    stats = losses.token_stats(s_logits, t_logits, targets, temperature=objective.temperature,
                               chunk_size=objective.chunk_size)
  if objective.estimator == "exact":
    lam = objective.reverse_weight
    per_position = lam * stats["reverse_kl"] + (1.0 - lam) * stats["forward_kl"]
    loss = reduce_positions(per_position, weights, "mean", num_tokens)
  else:
    loss = _sampled_loss(objective, stats["student_logprob"], lax.stop_gradient(stats["teacher_logprob"]),
                         weights, extras, num_tokens)
  return loss, _metrics(loss, stats, weights, num_tokens)


def compute_from_hidden(objective: Objective, student_hidden, student_head, teacher_hidden, teacher_head,
                        batch):
  """`compute` from final hidden states [B, L, D] and output heads [D, V], never materialising [B, L, V]
  logits: the same loss and metrics as `compute` on the logits `hidden @ head`.

  Exact estimator: the fused full-vocabulary KL (`losses.fused_token_kl_with_stats`; no
  "sampled_reverse_kl_k3", it has no token log-probs). Sampled estimator: the sampled tokens' log-probs and
  the student's entropies in position chunks (`losses.token_logprobs`); teacher_hidden / teacher_head may
  be None when batch["teacher_logprobs"] holds the teacher's per-token log-probs.
  """
  if objective.estimator == "sampled":
    return _sampled_from_hidden(objective, student_hidden, student_head, teacher_hidden, teacher_head, batch)
  _, weights, _, (s_hidden, t_hidden) = align(batch, student_hidden, teacher_hidden)
  num_tokens = batch.get("num_tokens")
  loss, stats = losses.fused_token_kl_with_stats(
      s_hidden, student_head, t_hidden, lax.stop_gradient(teacher_head), weights,
      lam=objective.reverse_weight, temperature=objective.temperature, chunk_size=objective.chunk_size,
      num_tokens=num_tokens)
  return loss, _metrics(loss, stats, weights, num_tokens)


def _sampled_from_hidden(objective, student_hidden, student_head, teacher_hidden, teacher_head, batch):
  targets, weights, extras, (s_hidden, t_hidden) = align(batch, student_hidden, teacher_hidden)
  num_tokens = batch.get("num_tokens")
  source = "live" if t_hidden is not None else teacher_source(objective, batch, live_teacher=False)
  if source == "live":  # `compute`'s token_stats, one chunk of positions at a time
    t_hidden, t_head = lax.stop_gradient(t_hidden), lax.stop_gradient(teacher_head)

    def chunk_stats(s_chunk, t_chunk, targets_chunk):
      return losses.token_stats(losses.head_logits(s_chunk, student_head), losses.head_logits(t_chunk, t_head),
                                targets_chunk, temperature=objective.temperature)

    stats = map_position_chunks(chunk_stats, (s_hidden, t_hidden, targets), objective.chunk_size)
  else:  # "logprobs" (teacher_source raised for anything else)
    student_lp, student_entropy = losses.token_logprobs(s_hidden, student_head, targets,
                                                        temperature=objective.temperature,
                                                        chunk_size=objective.chunk_size)
    stats = {"student_entropy": student_entropy, "student_logprob": student_lp,
             "teacher_logprob": extras["teacher_logprobs"].astype(jnp.float32)}
  loss = _sampled_loss(objective, stats["student_logprob"], lax.stop_gradient(stats["teacher_logprob"]),
                       weights, extras, num_tokens)
  return loss, _metrics(loss, stats, weights, num_tokens)
