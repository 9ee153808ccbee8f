"""Where training sequences come from: the dataset, the teacher's sampler, or the CURRENT student's.

Each function turns a data batch (left-padded prompts [B, P], right-padded references [B, R]) into the
step's batch (see `train.step`): tokens, attention_mask, loss_mask and, for sampled sequences, the
behaviour log-probs (the sampler's, temperature and truncation included) plus rollout statistics.
Prompts are left-padded, so prompt + completion is contiguous in every row, as `objectives.align` needs.
"""

import jax.numpy as jnp

from kldistill_jax import data, sampling


def from_dataset(data_batch):
  """Prompt + the data's own response (its EOS included); only the response is trained."""
  prompt_mask, response_mask = data_batch["prompt_mask"], data_batch["response_mask"]
  return {
      "tokens": jnp.concatenate([data_batch["prompt_tokens"], data_batch["response_tokens"]], axis=1),
      "attention_mask": jnp.concatenate([prompt_mask, response_mask], axis=1),
      "loss_mask": jnp.concatenate([jnp.zeros_like(prompt_mask), response_mask], axis=1),
  }


def from_sampler(model, data_batch, *, rng, settings, tokenizer, with_model_logprobs=False,
                 max_new_tokens=None):
  """Prompt + a completion sampled by `model` (the teacher, or the student at its current parameters).

  settings: the `sampling` ConfigDict (max_new_tokens = the training length, temperature, top_k, top_p,
  stop: stop strings that end a completion like EOS).
  with_model_logprobs: also return the sampler's untempered log-probs as "teacher_logprobs" (when the
  sampler IS the teacher: cached trajectories need no teacher forward later).
  max_new_tokens: overrides settings.max_new_tokens (the length curriculum's current length).
  Returns (step batch, rollout statistics: mean response length, truncation rate, sampler entropy).
  """
  prompt_tokens, prompt_mask = data_batch["prompt_tokens"], data_batch["prompt_mask"]
  out = sampling.sample(model, prompt_tokens, prompt_mask, rng=rng,
                        max_new_tokens=max_new_tokens or settings.max_new_tokens,
                        temperature=settings.temperature,
                        top_k=settings.top_k, top_p=settings.top_p, eos_ids=tokenizer.eos_ids,
                        pad_id=tokenizer.pad_id,
                        stop_sequences=data.stop_sequences(tokenizer, settings.get("stop", ())))
  completion = out.completion_mask
  batch = {
      "tokens": out.tokens,
      "attention_mask": jnp.concatenate([prompt_mask, completion[:, prompt_tokens.shape[1]:]], axis=1),
      "loss_mask": completion,
      "behavior_logprobs": out.sampling_logprobs,
  }
  if with_model_logprobs:
    batch["teacher_logprobs"] = out.model_logprobs
  count = jnp.maximum(jnp.sum(completion), 1)
  stats = {
      "response_length": jnp.mean(out.lengths.astype(jnp.float32)),
      "max_length": jnp.max(out.lengths).astype(jnp.float32),  # decode steps the sampler ran
      "truncation_rate": 1.0 - jnp.mean(out.finished.astype(jnp.float32)),
      "rollout_entropy": jnp.sum(out.entropy * completion) / count,
  }
  return batch, stats


def dataset_stats(data_batch):
  lengths = jnp.sum(data_batch["response_mask"], axis=1).astype(jnp.float32)
  return {"response_length": jnp.mean(lengths), "truncation_rate": jnp.zeros(())}


def cached_stats(batch, eos_ids, stop_sequences=()):
  """Rollout statistics of cached trajectories: a row is truncated when neither an EOS nor one of
  `stop_sequences` (token ids) ends its completion."""
  completion = batch["loss_mask"].astype(bool)
  eos = jnp.isin(batch["tokens"], jnp.asarray(eos_ids))
  finished = jnp.any(completion & eos, axis=1) | sampling.ends_with_stop(batch["tokens"], completion,
                                                                          stop_sequences)
  lengths = jnp.sum(completion, axis=1).astype(jnp.float32)
  return {"response_length": jnp.mean(lengths), "max_length": jnp.max(lengths),
          "truncation_rate": 1.0 - jnp.mean(finished.astype(jnp.float32))}
