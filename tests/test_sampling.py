"""The sampler against naive full-forward loops, exact truncated distributions (chi-square), per-row
independence, EOS handling, prompt buckets, a simulated 8-device mesh; `score` against the full forward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kldistill_jax import models, sampling
from kldistill_jax.models import sharding

V = 61
CONFIG = models.qwen3(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
N = 6  # new tokens

# Three prompts in a [3, 6] batch: left-padded (3 real), right-padded (4 real), full (6 real). Padding
# slots hold arbitrary tokens, so a sampler that looked at them would be caught.
PROMPT_MASK = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
PROMPTS = np.random.default_rng(0).integers(1, V, PROMPT_MASK.shape).astype(np.int32)
REAL = [PROMPTS[b][PROMPT_MASK[b] > 0] for b in range(3)]


@pytest.fixture(scope="module")
def model():
  return models.Transformer(CONFIG, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens, positions):
  return model(tokens, positions)[0]


def full_logits(model, sequences, width):
  """float64 logits [len, V] of each contiguous sequence from the FULL forward (no cache, no mask).

  The sequences are placed at the start of one [n, width] buffer; causality makes the trailing filler
  irrelevant to the real positions (tested in test_models), and one compile serves every length.
  """
  buf = np.zeros((len(sequences), width), np.int32)
  for i, s in enumerate(sequences):
    buf[i, :len(s)] = s
  positions = jnp.broadcast_to(jnp.arange(width), buf.shape)
  logits = np.asarray(_forward(model, jnp.asarray(buf), positions), np.float64)
  return [logits[i, :len(s)] for i, s in enumerate(sequences)]


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def truncated_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
  """The sampling distribution from its definition: softmax(logits / T), keep the top_k largest, then the
  smallest set of most likely tokens whose mass reaches top_p, renormalised after each step."""
  p = np.exp(log_softmax(np.asarray(logits, np.float64) / temperature))
  order = sorted(range(len(p)), key=lambda v: -p[v])
  if top_k:
    p[order[top_k:]] = 0.0
    p /= p.sum()
  if top_p < 1.0:
    kept, mass = [], 0.0
    for v in order:
      if mass >= top_p:
        break
      kept.append(v)
      mass += p[v]
    p[[v for v in order if v not in kept]] = 0.0
    p /= p.sum()
  return p


def greedy_reference(model, prompts, steps):
  """Re-runs the full forward on the growing sequence and takes the argmax, one step at a time."""
  seqs = [list(p) for p in prompts]
  width = max(len(p) for p in prompts) + steps
  for _ in range(steps):
    logits = full_logits(model, seqs, width)
    for s, lg in zip(seqs, logits):
      s.append(int(np.argmax(lg[-1])))
  return np.array([s[len(p):] for s, p in zip(seqs, prompts)])


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


# ----------------------------------------------------------------------------- greedy

@pytest.fixture(scope="module")
def greedy(model):
  out = sampling.sample(model, PROMPTS, PROMPT_MASK, rng=jax.random.key(0), max_new_tokens=N,
                        temperature=0)
  return out, greedy_reference(model, REAL, N)


def test_greedy_equals_naive_full_forward_loop(greedy):
  out, expected = greedy
  tokens = np.asarray(out.tokens)
  assert tokens.shape == (3, 6 + N)
  np.testing.assert_array_equal(tokens[:, :6], PROMPTS)  # prompts stay where they were placed
  np.testing.assert_array_equal(tokens[:, 6:], expected)
  assert len(set(expected.ravel().tolist())) > 3  # not a degenerate constant path
  np.testing.assert_array_equal(np.asarray(out.completion_mask), np.pad(np.ones((3, N)), ((0, 0), (6, 0))))
  np.testing.assert_array_equal(np.asarray(out.lengths), [N] * 3)
  assert not np.any(np.asarray(out.finished))
  np.testing.assert_array_equal(np.asarray(out.sampling_logprobs), 0.0)  # greedy: documented as 0


def _completion_logits(model, out):
  """Full-forward logits over each row's real prompt + completion (row b, step i at len(REAL[b]) - 1 + i)."""
  tokens = np.asarray(out.tokens)
  return full_logits(model, [np.concatenate([REAL[b], tokens[b, 6:]]) for b in range(3)], 6 + N)


def _check_model_stats(model, out):
  """model_logprobs / entropy at completion step i == the full forward over prompt + completion."""
  tokens = np.asarray(out.tokens)
  for b, logits in enumerate(_completion_logits(model, out)):
    logp = log_softmax(logits)
    n = len(REAL[b])
    steps = np.arange(N)
    expected_lp = logp[n - 1 + steps, tokens[b, 6:]]
    expected_h = -np.sum(np.exp(logp) * logp, -1)[n - 1 + steps]
    np.testing.assert_allclose(np.asarray(out.model_logprobs)[b, 6:], expected_lp, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.entropy)[b, 6:], expected_h, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.model_logprobs)[b, :6], 0.0)
    np.testing.assert_array_equal(np.asarray(out.entropy)[b, :6], 0.0)


def test_greedy_model_logprobs_and_entropy(model, greedy):
  _check_model_stats(model, greedy[0])


# ----------------------------------------------------------------------------- random sampling

SAMPLED = dict(temperature=1.0, top_k=12, top_p=0.9)


@pytest.fixture(scope="module")
def sampled(model):
  keys = _keys(3, seed=1)
  return keys, sampling.sample(model, PROMPTS, PROMPT_MASK, rng=keys, max_new_tokens=N, **SAMPLED)


def test_sampled_model_logprobs_and_entropy(model, sampled):
  _check_model_stats(model, sampled[1])


def test_sampling_logprobs_are_the_truncated_distribution(model, sampled):
  _, out = sampled
  tokens = np.asarray(out.tokens)
  for b, logits in enumerate(_completion_logits(model, out)):
    for i in range(N):
      p = truncated_probs(logits[len(REAL[b]) - 1 + i], **SAMPLED)
      token = tokens[b, 6 + i]
      assert p[token] > 0, "a truncated token was drawn"
      assert np.asarray(out.sampling_logprobs)[b, 6 + i] == pytest.approx(np.log(p[token]), abs=1e-4)
  # truncation changed the distribution somewhere, so the check above is not the plain model log-prob
  assert np.abs(np.asarray(out.sampling_logprobs) - np.asarray(out.model_logprobs)).max() > 1e-2


def test_rows_are_independent_of_the_batch(model, sampled):
  keys, out = sampled
  for b in range(3):
    alone = sampling.sample(model, REAL[b][None], np.ones((1, len(REAL[b])), np.int32), rng=keys[b:b + 1],
                            max_new_tokens=N, **SAMPLED)
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0, len(REAL[b]):], np.asarray(out.tokens)[b, 6:])
    np.testing.assert_allclose(np.asarray(alone.sampling_logprobs)[0, len(REAL[b]):],
                               np.asarray(out.sampling_logprobs)[b, 6:], atol=1e-5)
  # Raw uint32 key data [B, 2] is accepted and means the same keys.
  raw = sampling.sample(model, PROMPTS, PROMPT_MASK, rng=jax.random.key_data(keys), max_new_tokens=N,
                        **SAMPLED)
  np.testing.assert_array_equal(np.asarray(raw.tokens), np.asarray(out.tokens))
  # The draws are random: different keys give a different completion.
  other = sampling.sample(model, PROMPTS, PROMPT_MASK, rng=_keys(3, seed=2), max_new_tokens=N, **SAMPLED)
  assert not np.array_equal(np.asarray(other.tokens), np.asarray(out.tokens))


# ----------------------------------------------------------------------------- EOS

def _first(path, eos):
  hits = [i for i, t in enumerate(path) if t in eos]
  return hits[0] if hits else None


def test_eos_stops_rows_and_pads_after(model, greedy):
  _, path = greedy
  # EOS = a token that row 0 first emits at a later step and row 2 never emits (from the greedy path).
  eos = next(int(t) for t in path[0] if _first(path[0], {t}) >= 1 and t not in path[2])
  pad_id = 59
  out = sampling.sample(model, PROMPTS, PROMPT_MASK, rng=jax.random.key(0), max_new_tokens=N,
                        temperature=0, eos_ids=(eos,), pad_id=pad_id)
  tokens, mask = np.asarray(out.tokens)[:, 6:], np.asarray(out.completion_mask)[:, 6:]
  finishes = [_first(path[b], {eos}) for b in range(3)]
  assert finishes[0] is not None and finishes[0] >= 1 and finishes[2] is None
  for b, stop in enumerate(finishes):
    length = N if stop is None else stop + 1
    np.testing.assert_array_equal(tokens[b, :length], path[b, :length])
    np.testing.assert_array_equal(tokens[b, length:], pad_id)
    np.testing.assert_array_equal(mask[b], np.arange(N) < length)
    for field in ("model_logprobs", "entropy", "sampling_logprobs"):
      np.testing.assert_array_equal(np.asarray(getattr(out, field))[b, 6 + length:], 0.0)
    assert int(out.lengths[b]) == length
    assert bool(out.finished[b]) == (stop is not None)


def test_loop_stops_when_every_row_finished(model, greedy, monkeypatch):
  _, path = greedy
  eos = {int(path[b, 1]) for b in range(3)}  # every row emits an EOS by step 1
  last = max(_first(path[b], eos) for b in range(3))
  assert last < N - 2
  steps = []
  decode_step = sampling._step

  def counting_step(logits, keys, step, settings):
    jax.debug.callback(lambda s: steps.append(int(s)), step)
    return decode_step(logits, keys, step, settings)

  monkeypatch.setattr(sampling, "_step", counting_step)
  sampling._generate.clear_cache()  # retrace with the counting step
  try:
    out = sampling.sample(model, PROMPTS, PROMPT_MASK, rng=jax.random.key(0), max_new_tokens=N,
                          temperature=0, eos_ids=tuple(sorted(eos)), pad_id=58)
    jax.block_until_ready(out)
    assert sorted(steps) == list(range(last + 1))  # stopped right after the last row's EOS
    assert np.all(np.asarray(out.finished))
    np.testing.assert_array_equal(np.asarray(out.lengths), [_first(path[b], eos) + 1 for b in range(3)])
  finally:
    sampling._generate.clear_cache()  # drop the traces holding the callback


# ----------------------------------------------------------------------------- sampling statistics

V_SMALL = 13
ROWS = 4000
ALPHA = 0.001  # significance level of every goodness-of-fit test below (fixed seeds: deterministic)


@pytest.fixture(scope="module")
def small():
  """A V = 13 model made context-free (no attention / MLP output, one embedding for every token), so every
  step of every row draws from the same distribution: steps can be tested for independence too."""
  model = models.Transformer(CONFIG.replace(vocab_size=V_SMALL), rngs=nnx.Rngs(3))
  layers = model.layers  # every layer at once: the variables are stacked [num_layers, ...]
  layers.self_attn.o_proj.kernel[...] = jnp.zeros_like(layers.self_attn.o_proj.kernel[...])
  layers.mlp.down_proj.kernel[...] = jnp.zeros_like(layers.mlp.down_proj.kernel[...])
  model.embed_tokens[...] = jnp.broadcast_to(model.embed_tokens[...][:1], model.embed_tokens[...].shape)
  prompt = np.array([[3, 7, 1, 11]], np.int32)
  logits = full_logits(model, [np.concatenate([prompt[0], [5, 9]])], 6)[0]
  np.testing.assert_allclose(logits, np.broadcast_to(logits[:1], logits.shape), atol=1e-5)
  return model, prompt, logits[0]


def _chisquare_pvalue(observed, expected):
  try:
    from scipy import stats
  except ImportError:  # scipy is not a declared test dependency
    stats = None
  if stats is not None:
    return stats.chisquare(observed, expected).pvalue
  # No scipy: the Wilson-Hilferty approximation of the chi-square tail (within ~12% of the exact p-value
  # near ALPHA for >= 4 degrees of freedom; the p-values here sit far from ALPHA on either side).
  stat = float(np.sum((observed - expected) ** 2 / expected))
  k = len(observed) - 1
  z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
  return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("settings,wrong_temperature", [
    (dict(temperature=1.0), 1.6),
    (dict(temperature=0.7, top_k=5), 1.0),
    (dict(temperature=1.3, top_p=0.8), 1.0),
], ids=["T1", "T0.7-top5", "T1.3-top0.8"])
def test_token_distribution_chisquare(small, settings, wrong_temperature):
  """ROWS rows of one prompt, per-row keys, 2 steps: each step's token counts fit the truncated tempered
  distribution, truncated tokens never appear, and (truncated settings) the pair of steps fits p x p, i.e.
  the steps are independent draws (reusing a row's key at every step would make them equal)."""
  model, prompt, logits = small
  expected_p = truncated_probs(logits, **settings)
  if "top_p" in settings:  # the nucleus is well defined in float32: no boundary within 1e-3 of top_p
    p = np.sort(truncated_probs(logits, settings["temperature"]))[::-1]
    assert np.min(np.abs(np.cumsum(p) - settings["top_p"])) > 1e-3
  if "top_k" in settings:  # no near-tie at the k-th largest logit
    top = np.sort(logits)[::-1]
    assert top[settings["top_k"] - 1] - top[settings["top_k"]] > 1e-3
  kept = expected_p > 0
  if len(settings) > 1:
    assert 2 < kept.sum() < V_SMALL  # the truncation is real and leaves a distribution to test
  out = sampling.sample(model, np.repeat(prompt, ROWS, 0), np.ones((ROWS, 4), np.int32),
                        rng=_keys(ROWS, seed=4), max_new_tokens=2, **settings)
  drawn = np.asarray(out.tokens)[:, 4:]
  for step in range(2):
    counts = np.bincount(drawn[:, step], minlength=V_SMALL)
    assert counts[~kept].sum() == 0, "a truncated token was drawn"
    assert _chisquare_pvalue(counts[kept], ROWS * expected_p[kept]) > ALPHA
    # Power check: the same counts reject the kept tokens' distribution at a wrong temperature.
    wrong = np.exp(log_softmax(logits / wrong_temperature))[kept]
    assert _chisquare_pvalue(counts[kept], ROWS * wrong / wrong.sum()) < ALPHA
  if len(settings) > 1:
    k = int(kept.sum())
    expected = ROWS * np.outer(expected_p[kept], expected_p[kept]).ravel()
    assert expected.min() > 5  # chi-square's approximation holds
    index = np.cumsum(kept) - 1  # token -> its rank among the kept tokens
    pairs = np.bincount(index[drawn[:, 0]] * k + index[drawn[:, 1]], minlength=k * k)
    assert _chisquare_pvalue(pairs, expected) > ALPHA
  # sampling_logprobs is log p(drawn) under the truncated distribution; model_logprobs under the model.
  np.testing.assert_allclose(np.asarray(out.sampling_logprobs)[:, 4:], np.log(expected_p[drawn]), atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.model_logprobs)[:, 4:], log_softmax(logits)[drawn], atol=1e-4)


# ----------------------------------------------------------------------------- score

def _score_case():
  """Contiguous row, left-padded row, and a right-padded prompt + gap + completion (the sampler layout)."""
  rng = np.random.default_rng(5)
  tokens = rng.integers(1, V, (3, 10)).astype(np.int32)
  mask = np.array([[1] * 10, [0, 0, 0] + [1] * 7, [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]], np.int32)
  return tokens, mask


# B = 3, L = 10: 6 divides B * L = 30 (and gives 6 // B = 2 time steps, dividing L); 9 divides neither
# (9 // B = 3 steps), so both the flattened-position and the time-axis chunking have a ragged last chunk.
@pytest.mark.parametrize("chunk_size", [None, 6, 9])
def test_score_equals_full_forward(model, chunk_size):
  tokens, mask = _score_case()
  real = [tokens[b][mask[b] > 0] for b in range(3)]
  logits = full_logits(model, real, 6 + N)  # the greedy loop's compiled width
  for temperature in (1.0, 0.7):
    logp, ent = sampling.score(model, tokens, mask, temperature=temperature, chunk_size=chunk_size)
    logp, ent = np.asarray(logp), np.asarray(ent)
    expected_lp, expected_h = np.zeros((3, 10)), np.zeros((3, 10))
    for b in range(3):
      columns = np.flatnonzero(mask[b])
      lsm = log_softmax(logits[b] / temperature)
      for k in range(1, len(columns)):  # the k-th real token is predicted by the (k-1)-th
        expected_lp[b, columns[k]] = lsm[k - 1, real[b][k]]
        expected_h[b, columns[k]] = -np.sum(np.exp(lsm[k - 1]) * lsm[k - 1])
    np.testing.assert_allclose(logp, expected_lp, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ent, expected_h, atol=1e-4, rtol=0)


def test_score_of_sampler_output_matches_its_model_logprobs(model, sampled):
  _, out = sampled
  mask = np.maximum(np.pad(PROMPT_MASK, ((0, 0), (0, N))), np.asarray(out.completion_mask))
  logp, ent = sampling.score(model, out.tokens, mask, chunk_size=15)  # [3, 12]: ragged either way
  completion = np.asarray(out.completion_mask) > 0
  np.testing.assert_allclose(np.asarray(logp)[completion], np.asarray(out.model_logprobs)[completion],
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(ent)[completion], np.asarray(out.entropy)[completion], atol=1e-4)


# ----------------------------------------------------------------------------- buckets, mesh, errors

def test_prompt_buckets_compile_once(model, monkeypatch):
  assert sampling.bucket_length(5) == sampling.bucket_length(7) == 16
  assert sampling.bucket_length(17) == 32
  rng = np.random.default_rng(6)
  prompts = {p: rng.integers(1, V, (2, p)).astype(np.int32) for p in (5, 7)}
  masks = {5: np.array([[0, 1, 1, 1, 1], [1] * 5]), 7: np.array([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])}
  kw = dict(rng=jax.random.key(0), max_new_tokens=3, temperature=0, pad_id=57)  # settings used only here
  if hasattr(sampling._generate, "_cache_size"):
    size = sampling._generate._cache_size
  else:  # count traces instead: `_generate` calls `init_cache` once per trace
    traces = []
    init_cache = sampling.init_cache
    monkeypatch.setattr(sampling, "init_cache", lambda *a: traces.append(1) or init_cache(*a))
    size = lambda: len(traces)
  outs = {}
  for bucket in (True, False):
    for p in (5, 7):
      before = size()
      outs[bucket, p] = sampling.sample(model, prompts[p], masks[p], bucket=bucket, **kw)
      compiled = size() - before
      assert compiled == (0 if bucket and p == 7 else 1), (bucket, p)
  for p in (5, 7):
    assert outs[True, p].tokens.shape == (2, p + 3)
    for field in ("tokens", "completion_mask"):
      np.testing.assert_array_equal(np.asarray(getattr(outs[True, p], field)),
                                    np.asarray(getattr(outs[False, p], field)))
    np.testing.assert_allclose(np.asarray(outs[True, p].model_logprobs),
                               np.asarray(outs[False, p].model_logprobs), atol=1e-5)


def test_sharded_model_and_prompts_give_the_single_device_tokens(greedy, sampled):
  """B = 4: the three test prompts plus row 0 again (same key), so the single-device expectations are the
  greedy / sampled fixtures' rows (rows do not depend on the batch, tested above)."""
  mesh = sharding.make_mesh(2, 2, 2)
  sharded = sharding.shard_model(models.Transformer(CONFIG, rngs=nnx.Rngs(0)), mesh)
  assert sharded.layers.mlp.up_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
  rows = [0, 1, 2, 0]
  put = lambda x: jax.device_put(jnp.asarray(x), sharding.batch_sharding(mesh))
  keys, sampled_out = sampled
  for settings, expected in ((dict(temperature=0), greedy[0]), (SAMPLED, sampled_out)):
    out = sampling.sample(sharded, put(PROMPTS[rows]), put(PROMPT_MASK[rows]), rng=keys[np.array(rows)],
                          max_new_tokens=N, **settings)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens)[rows])
    np.testing.assert_allclose(np.asarray(out.model_logprobs), np.asarray(expected.model_logprobs)[rows],
                               atol=1e-5)


def test_argument_errors(model):
  ok = dict(rng=jax.random.key(0), max_new_tokens=2)
  mask = np.ones_like(PROMPTS)
  for bad, match in [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-0.5), "temp"),
                     (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-1), "top_k"),
                     (dict(rng=_keys(2)), "rng"), (dict(rng=_keys(6).reshape(3, 2)), "rng")]:
    with pytest.raises(ValueError, match=match):
      sampling.sample(model, PROMPTS, mask, **{**ok, **bad})
  with pytest.raises(ValueError, match="prompt_mask"):
    sampling.sample(model, PROMPTS, mask[:, :5], **ok)
  with pytest.raises(ValueError, match="prompt_mask"):
    sampling.sample(model, PROMPTS[0], mask[0], **ok)
  with pytest.raises(ValueError, match="mask"):
    sampling.score(model, PROMPTS, mask[:2])


# ----------------------------------------------------------------------------- a Qwen-sized vocabulary

V_QWEN = 151_936


def _lm_like_logits():
  """Next-token logits shaped like a trained LM's: four strong tokens (among the first ids, where BPE puts
  frequent tokens) holding ~99.75% of the mass, and a Gaussian tail of 151,932 tokens."""
  logits = np.random.default_rng(0).normal(0.0, 1.0, V_QWEN).astype(np.float32)
  logits[[13, 198, 220, 271]] = [18.0, 17.0, 16.0, 15.0]
  return logits


def test_qwen_sized_vocabulary_draws_the_whole_tail():
  """The decode step's draw at V = 151,936 fits softmax(logits) over bins of tokens grouped by
  probability, including the ~113k tail tokens (mass ~1.2e-3) that inverting a float32 cumsum of the
  probabilities (the former draw) could never return; the reported sampling log-prob is the token's."""
  logits = _lm_like_logits()
  logp = log_softmax(logits)
  p = np.exp(logp)
  cdf = np.asarray(jnp.cumsum(jnp.exp(jnp.asarray(logp, jnp.float32))))
  cumsum_never = cdf <= np.concatenate([[0.0], cdf[:-1]])  # CDF step 0: no uniform lands on the token
  assert cumsum_never.sum() > 100_000 and p[cumsum_never].sum() > 1e-3
  strong = np.argsort(p)[-4:]
  bins = np.full(V_QWEN, -1)
  bins[strong] = np.arange(4)
  never = np.flatnonzero(cumsum_never)
  never = never[np.argsort(p[never])]
  half = np.searchsorted(np.cumsum(p[never]), p[never].sum() / 2)
  bins[never[:half]] = 4  # the many smallest, then the fewer larger, each half of the cumsum-lost mass
  bins[never[half:]] = 5
  bins[bins == -1] = 6  # the rest of the tail
  expected_p = np.bincount(bins, weights=p, minlength=7)

  rows, steps = 250, 60  # 15,000 draws, one compile
  settings = sampling.SamplerSettings(max_new_tokens=1)
  step_fn = jax.jit(lambda keys, i: sampling._step(jnp.broadcast_to(jnp.asarray(logits), (rows, V_QWEN)),
                                                   keys, i, settings)[:2])
  keys = _keys(rows, seed=6)
  drawn, sampling_logp = zip(*(map(np.asarray, step_fn(keys, i)) for i in range(steps)))
  drawn, sampling_logp = np.concatenate(drawn), np.concatenate(sampling_logp)
  np.testing.assert_allclose(sampling_logp, logp[drawn], atol=1e-4)
  counts = np.bincount(bins[drawn], minlength=7)
  n = rows * steps
  assert (n * expected_p).min() > 5  # chi-square's approximation holds
  assert _chisquare_pvalue(counts, n * expected_p) > ALPHA
  never_expected = n * p[cumsum_never].sum()  # ~17 draws: the cumsum would give 0, 4.2 sigma below
  assert abs(counts[4] + counts[5] - never_expected) < 3 * math.sqrt(never_expected), (counts, never_expected)


def test_argmax_is_the_first_maximum():
  """The greedy pick (two plain reductions) against numpy's argmax, ties included (first index wins)."""
  rng = np.random.default_rng(3)
  x = rng.integers(-3, 4, (64, 97)).astype(np.float32)  # few distinct values: many ties
  x[5] = 1.0  # a row that is all one tie
  x[6, [10, 40, 96]] = 9.0
  np.testing.assert_array_equal(np.asarray(sampling._argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
