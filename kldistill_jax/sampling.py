"""The in-JAX sampler: one prefill, then one jitted `lax.while_loop` decode over the explicit KV cache.

    out = sample(model, prompt_tokens, prompt_mask, rng=key, max_new_tokens=256, temperature=1.0)

Prompts [B, P] may be left- or right-padded (prompt_mask marks real tokens). The completion of every row
starts at column P of `out.tokens`, so prompts stay where they were placed; RoPE positions continue from
each row's own prompt length and padding slots are masked in the cache, so a row's result does not depend
on the other rows (random rows use their own key: `rng` is split per row, or pass [B] keys).
Prompt lengths are padded up to a bucket, so the decode compiles once per (batch, bucket, settings).

A row ends at its first EOS (`eos_ids`) or at the first generated token that completes one of
`stop_sequences` (token-id sequences, e.g. a stop string's encoding: `data.stop_sequences`), matched inside
the loop on the last generated ids, never by decoding text. Either way the ending tokens stay in the
completion (completion_mask covers them) and the row counts as `finished`. Only generated tokens are
matched: a stop sequence never completes across the prompt.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kldistill_jax.errors import UserError
from kldistill_jax.losses.chunking import map_position_chunks
from kldistill_jax.losses.token_logprobs import head_log_probs, head_logits, token_logprobs
from kldistill_jax.losses.divergences import entropy_from_log_probs
from kldistill_jax.models import sharding
from kldistill_jax.models.cache import init_cache
from kldistill_jax.models.sequence import positions as prompt_positions, predictors


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Static sampling settings (each distinct value compiles its own decode loop)."""
  max_new_tokens: int
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = no top-k truncation
  top_p: float = 1.0  # 1 = no nucleus truncation
  eos_ids: tuple = ()
  pad_id: int = 0
  stop_sequences: tuple = ()  # ((id, ...), ...): a row also ends when its generated ids end with one

  def __post_init__(self):
    if any(not seq for seq in self.stop_sequences):
      raise UserError(f"stop sequences must be non-empty token-id sequences, got {self.stop_sequences}")
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """What `sample` returns; N = max_new_tokens, entries for completion step i sit at column P + i.

  tokens:            [B, P + N] prompts as given, then completions (pad_id after a row finished).
  completion_mask:   [B, P + N] 1 on generated tokens up to and including the first EOS or the last token
                     of the first stop sequence.
  sampling_logprobs: [B, P + N] log-prob of each generated token under the distribution it was drawn
                     from (temperature, top-k, top-p applied; 0 for greedy); 0 off the completion.
  model_logprobs:    [B, P + N] the same tokens under the untempered, untruncated model.
  entropy:           [B, P + N] entropy of the untempered model distribution at each generated token.
  lengths:           [B] generated tokens per row (EOS / stop sequence included).
  finished:          [B] whether the row produced an EOS or a stop sequence within the budget.
  """
  tokens: jax.Array
  completion_mask: jax.Array
  sampling_logprobs: jax.Array
  model_logprobs: jax.Array
  entropy: jax.Array
  lengths: jax.Array
  finished: jax.Array


def process_logits(logits_BV, settings):
  """float32 logits of the sampling distribution: / temperature, then top-k, then top-p (as HF)."""
  logits = logits_BV.astype(jnp.float32)
  if settings.temperature > 0:
    logits = logits / settings.temperature
  if settings.top_k > 0 and settings.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if settings.top_p < 1.0:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep the smallest prefix whose mass reaches top_p; the most likely token is always kept.
    keep = (mass_before < settings.top_p).at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def bucket_length(length, minimum=16):
  """Prompt lengths are padded up to the next power of two (at least `minimum`)."""
  return max(minimum, 1 << math.ceil(math.log2(max(length, 1))))


def _draw(logp_BV, keys_B, step):
  """int32 [B]: one token per row drawn from softmax(logp_BV) (row b with key fold_in(keys_B[b], step)).

  Two-level Gumbel-max (`jax.random.categorical`): the vocabulary is cut into blocks of S >= sqrt(V)
  tokens; a block is drawn from the block log-masses (logsumexp), then a token within it, so
  P(token) = p(block) * p(token | block) exactly, and -inf (truncated) tokens are never drawn. Each level
  uses the high-resolution Gumbel noise (mode="high": noise up to ~32 instead of ~16), so every token
  whose log-prob relative to its level is above about -30 can be drawn. Why not the alternatives:
  inverting a float32 cumsum over V can never draw the tail tokens below the sum's rounding step (at
  V = 151,936 on LM-like logits, thousands of tokens and ~1e-4 of the mass); one flat Gumbel-max draws
  V noise values per row and step, several times the cost of a small model's decode step on a CPU,
  where the two levels draw about 2 sqrt(V).
  """
  b, v = logp_BV.shape
  size = 1 << (max(v - 1, 1).bit_length() + 1) // 2
  blocks = -(-v // size)
  logp_BNS = jnp.pad(logp_BV, ((0, 0), (0, blocks * size - v)),
                     constant_values=-jnp.inf).reshape(b, blocks, size)

  def one(key, logp_NS):
    block_key, token_key = jax.random.split(jax.random.fold_in(key, step))
    block = jax.random.categorical(block_key, jax.nn.logsumexp(logp_NS, axis=-1), mode="high")
    return block * size + jax.random.categorical(token_key, logp_NS[block], mode="high")

  return jax.vmap(one)(keys_B, logp_BNS).astype(jnp.int32)


def _stop_table(stop_sequences):
  """(ids [S, M], used [S, M]): each sequence right-aligned in M = the longest length; None without any."""
  if not stop_sequences:
    return None
  width = max(map(len, stop_sequences))
  ids = [[-1] * (width - len(seq)) + [int(i) for i in seq] for seq in stop_sequences]
  used = [[False] * (width - len(seq)) + [True] * len(seq) for seq in stop_sequences]
  return jnp.asarray(ids, jnp.int32), jnp.asarray(used)


def _stop_hit(window_BM, table):
  """bool [B]: whether the last M ids of a row (-1 where no generated token is) end with a stop sequence."""
  ids_SM, used_SM = table
  equal = (window_BM[:, None, :] == ids_SM[None]) | ~used_SM[None]
  return jnp.any(jnp.all(equal, axis=-1), axis=-1)


def ends_with_stop(tokens, mask, stop_sequences):
  """bool [B]: whether the masked tokens of each row ([B, L], e.g. a stored completion) end with one of
  `stop_sequences`, within the mask (what the sampler's loop decided as it generated them)."""
  table = _stop_table(tuple(tuple(seq) for seq in stop_sequences))
  tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask).astype(bool)
  if table is None:
    return jnp.zeros(tokens.shape[:1], bool)
  width = table[0].shape[1]
  last = jnp.max(jnp.where(mask, jnp.arange(tokens.shape[1])[None], -1), axis=1)
  columns = last[:, None] - (width - 1) + jnp.arange(width)[None]
  inside = (columns >= 0) & jnp.take_along_axis(mask, jnp.maximum(columns, 0), axis=1)
  window = jnp.where(inside, jnp.take_along_axis(tokens, jnp.maximum(columns, 0), axis=1), -1)
  return _stop_hit(window, table)


def _argmax(x_BV):
  """int32 [B]: the first index of each row's maximum (jnp.argmax's answer on finite rows) as two plain
  reductions, a max and a min over the indices that reach it: XLA:CPU runs these vectorised, while
  argmax's (value, index) pair reduction is scalar code (~1.5 ms per decode step at V = 32k, batch 8)."""
  index = jnp.arange(x_BV.shape[-1], dtype=jnp.int32)
  top = jnp.max(x_BV, axis=-1, keepdims=True)
  return jnp.min(jnp.where(x_BV == top, index, x_BV.shape[-1] - 1), axis=-1)


def _step(logits_BV, keys_B, step, settings):
  """One token per row and its statistics: (token, sampling log-prob, model log-prob, model entropy).

  The sampling distribution (temperature, top-k, top-p: a full sort per step when top_p < 1) is built
  once per step and serves both the draw (`_draw`) and the token's sampling log-prob, so the reported
  log-prob is that of the distribution actually drawn from.
  """
  model_logp = jax.nn.log_softmax(logits_BV.astype(jnp.float32))
  picked = lambda lp, token: jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]
  if settings.temperature == 0:
    token = _argmax(logits_BV)
    sampling_logp = jnp.zeros(token.shape, jnp.float32)
  else:
    sampling_logp_BV = jax.nn.log_softmax(process_logits(logits_BV, settings))
    token = _draw(sampling_logp_BV, keys_B, step)
    sampling_logp = picked(sampling_logp_BV, token)
  return token, sampling_logp, picked(model_logp, token), entropy_from_log_probs(model_logp)


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "mesh"))
def _generate(graphdef, state, prompt_tokens, prompt_mask, keys, settings, mesh=None):
  model = nnx.merge(graphdef, state)
  b, p = prompt_tokens.shape
  n = settings.max_new_tokens
  cache = sharding.constrain_cache(init_cache(model.config, b, p + n), mesh)
  positions = prompt_positions(prompt_mask)
  hidden, cache = model(prompt_tokens, positions, cache, prompt_mask, return_hidden=True)
  prompt_len = jnp.sum(prompt_mask.astype(jnp.int32), axis=1)
  # The last REAL prompt token (wherever the padding is) predicts the first new one: the output head
  # runs on that one position only, never on [B, P, V].
  last = jnp.max(jnp.where(prompt_mask.astype(bool), jnp.arange(p)[None], 0), axis=1)
  last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  next_logits = head_logits(last_hidden, model.output_head())
  eos = jnp.asarray(settings.eos_ids or (-1,), jnp.int32)
  stops = _stop_table(settings.stop_sequences)

  zeros = jnp.zeros((b, n), jnp.float32)
  init = dict(step=jnp.zeros((), jnp.int32), logits=next_logits, cache=cache,
              tokens=jnp.full((b, n), settings.pad_id, jnp.int32), mask=jnp.zeros((b, n), jnp.int32),
              sampling_logp=zeros, model_logp=zeros, entropy=zeros, finished=jnp.zeros((b,), bool))
  if stops is not None:  # the last M generated ids of each row (-1 before the first): what stops match
    init["recent"] = jnp.full((b, stops[0].shape[1]), -1, jnp.int32)

  def cond(s):
    return (s["step"] < n) & ~jnp.all(s["finished"])

  def body(s):
    i, active = s["step"], ~s["finished"]
    token, sampling_logp, model_logp, entropy = _step(s["logits"], keys, i, settings)
    token = jnp.where(active, token, settings.pad_id)  # finished rows' statistics are masked by `write`
    write = lambda buf, value: jax.lax.dynamic_update_slice_in_dim(
        buf, jnp.where(active, value, 0).astype(buf.dtype)[:, None], i, axis=1)
    ended = jnp.any(token[:, None] == eos[None], axis=1)
    carry = {}
    if stops is not None:
      carry["recent"] = jnp.concatenate([s["recent"][:, 1:], token[:, None]], axis=1)
      ended |= _stop_hit(carry["recent"], stops)
    finished = s["finished"] | (active & ended)
    logits, cache = model(token[:, None], (prompt_len + i)[:, None], s["cache"], active[:, None])
    cache = sharding.constrain_cache(cache, mesh)
    return dict(carry, step=i + 1, logits=logits[:, 0], cache=cache,
                tokens=jax.lax.dynamic_update_slice_in_dim(s["tokens"], token[:, None], i, axis=1),
                mask=write(s["mask"], 1), sampling_logp=write(s["sampling_logp"], sampling_logp),
                model_logp=write(s["model_logp"], model_logp), entropy=write(s["entropy"], entropy),
                finished=finished)

  s = jax.lax.while_loop(cond, body, init)
  pad = lambda x, value=0: jnp.concatenate([jnp.full((b, p), value, x.dtype), x], axis=1)
  return SampleOutput(tokens=jnp.concatenate([prompt_tokens.astype(jnp.int32), s["tokens"]], axis=1),
                      completion_mask=pad(s["mask"]), sampling_logprobs=pad(s["sampling_logp"]),
                      model_logprobs=pad(s["model_logp"]), entropy=pad(s["entropy"]),
                      lengths=jnp.sum(s["mask"], axis=1), finished=s["finished"])


def _row_keys(rng, batch):
  keys = jnp.asarray(rng)
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.wrap_key_data(keys)
  if keys.ndim == 0:
    return jax.random.split(keys, batch)
  if keys.shape != (batch,):
    raise ValueError(f"rng must be one key or [B={batch}] keys, got shape {keys.shape}")
  return keys


def sample(model, prompt_tokens, prompt_mask, *, rng, max_new_tokens, temperature=1.0, top_k=0,
           top_p=1.0, eos_ids=(), pad_id=0, bucket=True, stop_sequences=()) -> SampleOutput:
  """Samples `max_new_tokens` (or until every row emitted one of `eos_ids` or `stop_sequences`) after each
  prompt.

  Args:
    model: a `models.Transformer` (possibly sharded; prompts may be sharded over the batch).
    prompt_tokens, prompt_mask: [B, P]; mask 1 on real prompt tokens (left/right padding both work).
    rng: a PRNG key (split per row) or [B] keys. temperature 0 is greedy.
    top_k, top_p: truncations of the sampling distribution (0 / 1.0 = off).
    bucket: pad P up to `bucket_length(P)` so that varying prompt lengths reuse one compiled loop.
    stop_sequences: token-id sequences that end a row like an EOS (kept in the completion), e.g. stop
      strings encoded by `data.stop_sequences`.
  """
  settings = SamplerSettings(max_new_tokens, float(temperature), int(top_k), float(top_p),
                             tuple(int(e) for e in eos_ids), int(pad_id),
                             tuple(tuple(int(i) for i in seq) for seq in stop_sequences))
  if prompt_tokens.shape != prompt_mask.shape or prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} must "
                     "both be [B, P]")
  b, p = prompt_tokens.shape
  width = bucket_length(p) if bucket else p
  tokens = jnp.pad(jnp.asarray(prompt_tokens, jnp.int32), ((0, 0), (0, width - p)),
                   constant_values=settings.pad_id)
  mask = jnp.pad(jnp.asarray(prompt_mask, jnp.int32), ((0, 0), (0, width - p)))
  graphdef, state = nnx.split(model)
  out = _generate(graphdef, state, tokens, mask, _row_keys(rng, b), settings,
                  sharding.model_mesh(model))
  if width == p:
    return out
  drop = lambda x: jnp.concatenate([x[:, :p], x[:, width:]], axis=1)  # the bucket's padding columns
  return dataclasses.replace(out, **{f: drop(getattr(out, f)) for f in
                                     ("tokens", "completion_mask", "sampling_logprobs", "model_logprobs",
                                      "entropy")})


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _score(graphdef, state, tokens, mask, temperature, chunk_size):
  predictor, keep, head = predictors(nnx.merge(graphdef, state), tokens, mask)
  logp, ent = token_logprobs(predictor, head, tokens, temperature=temperature, chunk_size=chunk_size)
  return jnp.where(keep, logp, 0.0), jnp.where(keep, ent, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "chunk_size"))
def _score_topk(graphdef, state, tokens, mask, k, chunk_size):
  predictor, keep, head = predictors(nnx.merge(graphdef, state), tokens, mask)

  def chunk_fn(hidden_BCD):
    logp, ids = jax.lax.top_k(head_log_probs(hidden_BCD, head), k)
    return ids.astype(jnp.int32), logp

  ids, logp = map_position_chunks(chunk_fn, (predictor,), chunk_size)
  return jnp.where(keep[..., None], ids, 0), jnp.where(keep[..., None], logp, 0.0)


def score(model, tokens, mask, *, temperature=1.0, chunk_size=None):
  """Per-token log-probs and predictive entropies of given sequences (e.g. teacher scoring).

  Args:
    tokens, mask: [B, L]; mask 1 on real tokens (any padding layout).
    chunk_size: about how many positions per chunk of the output-head pass, so [B, L, V] is never
      materialised.

  Returns:
    (logprobs, entropy), both [B, L] float32 and aligned with `tokens`: entry t is log p(token t | the
    real tokens before it) and the entropy of that predictive distribution; 0 at padding and at each
    row's first real token. Padding may sit anywhere (e.g. `sample`'s output for right-padded prompts).
  """
  if tokens.shape != mask.shape or tokens.ndim != 2:
    raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must both be [B, L]")
  graphdef, state = nnx.split(model)
  return _score(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32),
                jnp.float32(temperature), chunk_size)


def score_topk(model, tokens, mask, *, k, chunk_size=None):
  """The model's k most likely next tokens and their log-probs (temperature 1), aligned like `score`.

  Returns:
    (ids int32 [B, L, k], logprobs float32 [B, L, k]): entry t holds the top k of the distribution that
    predicts token t (from the real tokens before it), in decreasing order; 0 at padding and at each
    row's first real token. chunk_size as in `score`.
  """
  if tokens.shape != mask.shape or tokens.ndim != 2:
    raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must both be [B, L]")
  if not 1 <= k <= model.config.vocab_size:
    raise ValueError(f"k must be in [1, vocab_size={model.config.vocab_size}], got {k}")
  graphdef, state = nnx.split(model)
  return _score_topk(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32),
                     int(k), chunk_size)
