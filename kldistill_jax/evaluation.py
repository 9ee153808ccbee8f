"""Evaluation of a model on held-out prompts: Avg@n, Pass@k, response length, entropy, truncation rate.

    results = evaluate(model, records, tokenizer, check=data.is_correct, template="raw", prompt_len=16,
                       max_new_tokens=40, temperature=1.0, batch_size=64, rng=key, mesh=mesh,
                       samples_per_prompt=8, pass_k=(1, 4, 8))
    pass_at_k(n=[10, 10], c=[0, 3], k=4)  -> [0., 0.8333]   (unbiased: 1 - C(n-c, k) / C(n, k))

A completion that did not end with EOS (or a stop string) within the budget counts as wrong
(truncated_is_wrong=False: as `check` says); the truncation rate is reported either way. Every process samples its share of the
prompts; the completions are gathered so every process returns the same numbers. Prompts padded onto the
last batch are excluded (`valid`), never double counted.
"""

import collections

import jax
import numpy as np

from kldistill_jax import data, progress, sampling
from kldistill_jax.errors import UserError
from kldistill_jax.train import distributed


def _pass_at_k_one(n: int, c: int, k: int) -> float:
  if n - c < k:  # every k-subset holds a correct sample
    return 1.0
  if k == 1:  # exact, so that Pass@1 equals Avg@n to the last bit
    return c / n
  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): factors in [0, 1], no huge binomials.
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k(n, c, k: int):
  """Unbiased Pass@k from n samples with c correct (arrays broadcast); a float for scalar n and c."""
  n, c = np.asarray(n), np.asarray(c)
  if not (np.issubdtype(n.dtype, np.integer) and np.issubdtype(c.dtype, np.integer)) or int(k) != k:
    raise ValueError(f"n, c and k must be integers, got dtypes {n.dtype}, {c.dtype} and k={k!r}")
  if np.any(n < 0) or np.any(c < 0) or k < 1:
    raise ValueError(f"n and c must be >= 0 and k >= 1 (k={k})")
  if np.any(c > n):
    raise ValueError("c (correct samples) must be <= n (samples)")
  if np.any(k > n):
    raise ValueError(f"k={k} needs at least k samples per problem, got n={n.min()}")
  n, c = np.broadcast_arrays(n, c)
  out = np.array([_pass_at_k_one(int(ni), int(ci), int(k)) for ni, ci in zip(n.ravel(), c.ravel())])
  out = out.reshape(n.shape)
  return float(out) if out.ndim == 0 else out


def avg_at_k(correct):
  """Avg@k: mean accuracy over all samples of all problems, from a [P, k] array of 0/1 (or bools)."""
  correct = np.asarray(correct, np.float64)
  if correct.ndim != 2 or correct.size == 0:
    raise ValueError(f"correct must be a non-empty [problems, samples] array, got shape {correct.shape}")
  return float(correct.mean())


class _Repeated:
  """Each record `times` times in a row (sample j of record i at i * times + j): random access."""

  def __init__(self, records, times):
    self.records, self.times = records, times

  def __len__(self):
    return len(self.records) * self.times

  def __getitem__(self, index):
    return self.records[index // self.times]


def _group_of(record):
  for key in ("benchmark", "difficulty"):
    if key in record:
      return str(record[key])
  return None


def summarise(correct, lengths, entropy_sums, finished, pass_k):
  """Metrics of per-sample arrays [P, n]: correct, lengths (tokens), entropy_sums (summed over tokens),
  finished (EOS within the budget)."""
  n = correct.shape[1]
  summary = {"accuracy": avg_at_k(correct), "avg_at_n": avg_at_k(correct),
             "mean_length": float(np.mean(lengths)),
             "entropy": float(entropy_sums.sum() / max(lengths.sum(), 1)),
             "truncation_rate": 1.0 - float(np.mean(finished)), "num_problems": int(correct.shape[0]),
             "samples_per_prompt": n}
  count = correct.sum(axis=1).astype(np.int64)
  for k in pass_k:
    summary[f"pass_at_{k}"] = float(np.mean(pass_at_k(np.full_like(count, n), count, k)))
  return summary


def evaluate(model, records, tokenizer, *, check, template, prompt_len, max_new_tokens, temperature,
             batch_size, rng, mesh, top_k=0, top_p=1.0, samples_per_prompt=1, pass_k=(1,),
             truncated_is_wrong=True, desc="eval", stop=(), stop_field="eval.stop"):
  """Samples `samples_per_prompt` (n) completions per record, scores each with `check(text, answer)`.

  truncated_is_wrong: a completion without EOS within max_new_tokens counts as wrong (`check` is not asked):
  the last number of a cut-off text is no answer. False: `check` alone decides. desc: what the progress
  bar (process 0, one unit per sampler batch) calls the evaluation, e.g. "eval: teacher".
  stop: stop strings that end a completion like EOS (kept in its text; `data.stop_sequences`, errors
  naming `stop_field`).

  Returns dict(accuracy (= avg_at_n, the mean over all n samples), pass_at_{k} for each k in pass_k
  (unbiased estimator, k <= n), mean_length (tokens, EOS included), entropy (mean per-token entropy of
  the untempered model along its completions), truncation_rate (no EOS within max_new_tokens),
  num_problems), `by_group` (the same metrics per record `benchmark`, else `difficulty`, when records
  carry one), `per_problem` (lists in record order: correct, tokens, entropy_sum, finished, each summed over
  the problem's n samples, and group) and `examples`: (prompt, completion, answer, correct) of the first few samples.
  The n samples of a prompt are n batch rows, so each gets its own key (the sampler splits `rng` per row).
  """
  n = int(samples_per_prompt)
  pass_k = tuple(int(k) for k in pass_k)
  if n < 1 or any(not 1 <= k <= n for k in pass_k):
    raise UserError(f"need samples_per_prompt >= 1 and 1 <= k <= samples_per_prompt for every k in "
                    f"pass_k, got samples_per_prompt={samples_per_prompt}, pass_k={pass_k}")
  stop_sequences = data.stop_sequences(tokenizer, tuple(stop), stop_field)
  num = len(records)
  batches = data.eval_batches(_Repeated(records, n), tokenizer, template=template, prompt_len=prompt_len,
                              batch_size=batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count())
  correct, lengths = np.zeros((num, n), bool), np.zeros((num, n), np.int64)
  entropy_sums, finished, examples = np.zeros((num, n)), np.zeros((num, n), bool), []
  decode_steps = []  # per sampler call: its decode loop's iterations (for FLOP counts)
  bar = progress.bar(len(batches), desc, leave=False)
  for i, local in enumerate(batches):
    batch = distributed.global_batch(local, mesh)
    out = sampling.sample(model, batch["prompt_tokens"], batch["prompt_mask"],
                          rng=jax.random.fold_in(rng, i), max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=tokenizer.eos_ids,
                          pad_id=tokenizer.pad_id, stop_sequences=stop_sequences)
    completions = distributed.to_host(out.tokens)[:, prompt_len:]
    mask = distributed.to_host(out.completion_mask)[:, prompt_len:]
    decode_steps.append(int(mask.sum(axis=1).max()))  # the longest completion, padding rows included
    entropy = distributed.to_host(out.entropy)[:, prompt_len:]
    done = distributed.to_host(out.finished)
    index, valid = distributed.to_host(batch["index"]), distributed.to_host(batch["valid"]).astype(bool)
    for row in np.flatnonzero(valid):
      problem, sample = divmod(int(index[row]), n)
      record = records[problem]
      text = tokenizer.decode(completions[row][mask[row] > 0])
      ok = (bool(done[row]) or not truncated_is_wrong) and bool(check(text, record["answer"]))
      correct[problem, sample] = ok
      lengths[problem, sample] = int(mask[row].sum())
      entropy_sums[problem, sample] = float(entropy[row][mask[row] > 0].sum())
      finished[problem, sample] = bool(done[row])
      if len(examples) < 4:
        examples.append((record["prompt"], text, record["answer"], ok))
    if bar is not None:
      bar.set_postfix_str(f"{correct.sum()}/{num * n} correct so far", refresh=False)
      bar.update(1)
      if i == 0:
        progress.compiled(bar)
  if bar is not None:
    bar.close()
  arrays = (correct, lengths, entropy_sums, finished)
  results = summarise(*arrays, pass_k)
  groups = collections.defaultdict(list)
  for problem in range(num):
    group = _group_of(records[problem])
    if group is not None:
      groups[group].append(problem)
  results["by_group"] = {name: summarise(*(a[rows] for a in arrays), pass_k)
                         for name, rows in sorted(groups.items())}
  # per problem, in record order: what a study's paired bootstrap resamples (`stats`): correct samples,
  # tokens, summed entropy and finished samples of each problem's n completions, and its group (or None)
  results["per_problem"] = {"correct": correct.sum(1).tolist(), "tokens": lengths.sum(1).tolist(),
                            "entropy_sum": entropy_sums.sum(1).tolist(), "finished": finished.sum(1).tolist(),
                            "group": [_group_of(records[problem]) for problem in range(num)]}
  results["examples"] = examples
  results["decode_steps"] = decode_steps
  return results
