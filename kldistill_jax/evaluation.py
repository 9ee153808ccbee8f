"""Evaluation of a model on held-out prompts: accuracy, response length, entropy, truncation rate.

    results = evaluate(model, records, tokenizer, check=data.is_correct, template="raw", prompt_len=16,
                       max_new_tokens=40, temperature=0.0, batch_size=64, rng=key, mesh=mesh)

Every process samples its share of the prompts; the completions are gathered so every process returns
the same numbers. Prompts padded onto the last batch are excluded (`valid`), never double counted.
"""

import jax
import numpy as np

from kldistill_jax import data, sampling
from kldistill_jax.train import distributed


def evaluate(model, records, tokenizer, *, check, template, prompt_len, max_new_tokens, temperature,
             batch_size, rng, mesh, top_k=0, top_p=1.0):
  """Samples one completion per record and scores it with `check(text, answer) -> bool`.

  Returns dict(accuracy, mean_length (tokens, EOS included), entropy (mean per-token entropy of the
  untempered model along its completions), truncation_rate (no EOS within max_new_tokens),
  num_problems) and `examples`: (prompt, completion, answer, correct) of the first few records.
  """
  batches = data.eval_batches(records, tokenizer, template=template, prompt_len=prompt_len,
                              batch_size=batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count())
  correct, lengths, entropy_sum, finished, examples = [], [], 0.0, [], []
  for i, local in enumerate(batches):
    batch = distributed.global_batch(local, mesh)
    out = sampling.sample(model, batch["prompt_tokens"], batch["prompt_mask"],
                          rng=jax.random.fold_in(rng, i), max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=tokenizer.eos_ids,
                          pad_id=tokenizer.pad_id)
    completions = distributed.to_host(out.tokens)[:, prompt_len:]
    mask = distributed.to_host(out.completion_mask)[:, prompt_len:]
    entropy = distributed.to_host(out.entropy)[:, prompt_len:]
    done = distributed.to_host(out.finished)
    index, valid = distributed.to_host(batch["index"]), distributed.to_host(batch["valid"]).astype(bool)
    for row in np.flatnonzero(valid):
      record = records[int(index[row])]
      text = tokenizer.decode(completions[row][mask[row] > 0])
      ok = bool(check(text, record["answer"]))
      correct.append(ok)
      lengths.append(int(mask[row].sum()))
      entropy_sum += float(entropy[row][mask[row] > 0].sum())
      finished.append(bool(done[row]))
      if len(examples) < 4:
        examples.append((record["prompt"], text, record["answer"], ok))
  return {"accuracy": float(np.mean(correct)), "mean_length": float(np.mean(lengths)),
          "entropy": entropy_sum / max(sum(lengths), 1),
          "truncation_rate": 1.0 - float(np.mean(finished)), "num_problems": len(correct),
          "examples": examples}
