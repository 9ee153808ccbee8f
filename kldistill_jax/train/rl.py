"""GRPO after distillation: rollouts with a verifiable reward, the policy update, and the resumable stage.

Each step draws `batch_size` prompts, samples `grpo.group_size` (G) completions of each with the policy at
its current parameters, grades every completion with the task's answer check (reward 1 if correct, else 0;
a completion cut off by the budget gets 0 unless `grpo.truncated_is_wrong=False`),
turns the rewards into group-normalised advantages (`grpo.group_advantages`) and takes
`grpo.updates_per_batch` optimizer updates of the clipped loss (`grpo.grpo_loss`) on that batch. The first
update's importance ratio is 1 (the sampling policy IS the current one); later updates on the same batch
are where the clipping acts. With `grpo.kl_coef > 0` a frozen copy of the starting policy is the reference
of the k3 KL term.

The policy's log-probs are those of the distribution the tokens were drawn from: logits / sampling
temperature (so top-k / top-p truncation is refused, its log-probs would not match the sampler's).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kldistill_jax import data, losses, objectives, sampling
from kldistill_jax.errors import UserError
from kldistill_jax.train import buckets, distributed, flops, grpo, prefixes
from kldistill_jax.train.loop import check_batch_size, data_iterator, initial_state, run_loop
from kldistill_jax.train.state import Split, split
from kldistill_jax.train.step import apply_gradients
from kldistill_jax.models import lora, sequence, sharding

POLICY_KEYS = ("tokens", "attention_mask", "loss_mask", "old_logprobs", "ref_logprobs", "advantages")


def token_logprobs(model, batch, temperature, chunk_size=None):
  """[B, L] log-prob of each token under `model` at `temperature`, aligned with the tokens (0 at t = 0).
  From the final hidden states, about `chunk_size` positions at a time (`losses.token_logprobs`): never
  [B, L, V] logits unless chunk_size is None."""
  hidden = sequence.forward(model, batch["tokens"], batch["attention_mask"])
  targets, _, _, (shifted,) = objectives.align(batch, hidden)
  picked, _ = losses.token_logprobs(shifted, model.output_head(), targets, temperature=temperature,
                                    chunk_size=chunk_size, entropy=False)
  return jnp.pad(picked, ((0, 0), (1, 0)))


def policy_loss(params, batch, *, policy, temperature, clip_eps, kl_coef, chunk_size=None):
  """grpo_loss of the policy with `params` on one (micro-)batch, token mean over the whole batch."""
  lp = token_logprobs(policy.merge(params), batch, temperature, chunk_size)[:, 1:]
  ref = batch.get("ref_logprobs")
  loss, metrics = grpo.grpo_loss(lp, batch["old_logprobs"][:, 1:], batch["advantages"], batch["loss_mask"][:, 1:],
                                 clip_eps=clip_eps, ref_logprobs=None if ref is None else ref[:, 1:],
                                 kl_coef=kl_coef, num_tokens=batch["num_tokens"])
  metrics["loss"] = jax.lax.stop_gradient(loss)
  metrics["num_tokens"] = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
  return loss, metrics


def build_policy_step(*, policy, optimizer, micro_batches, settings, state_shardings=None):
  """jit((state, batch) -> (state, metrics)): one GRPO update; settings: dict(temperature, clip_eps, kl_coef,
  optional chunk_size: positions per chunk of the log-prob pass)."""
  def step(state, batch, frozen):
    batch = {k: batch[k] for k in POLICY_KEYS if k in batch}
    loss_fn = functools.partial(policy_loss, policy=Split(policy.graphdef, None, frozen),
                                temperature=settings["temperature"], clip_eps=settings["clip_eps"],
                                kl_coef=settings["kl_coef"], chunk_size=settings.get("chunk_size"))
    return apply_gradients(state, batch, loss_fn, optimizer=optimizer, micro_batches=micro_batches)

  if state_shardings is None:
    jitted = jax.jit(step, donate_argnums=(0,))
  else:
    # The batch arrives as global arrays already split over the batch axes (rank 1 and 2), as it is.
    jitted = jax.jit(step, donate_argnums=(0,), in_shardings=(state_shardings, None, None),
                     out_shardings=(state_shardings, None))
  # The frozen variables (a LoRA policy's base weights) are an argument: jit would bake a closed-over
  # array into the compiled program as a constant.
  return lambda state, batch: jitted(state, batch, policy.rest)


def repeat_prompts(data_batch, group_size):
  """Each prompt row G times in a row, so a prompt's G completions are contiguous (as group_advantages
  expects)."""
  return {k: jnp.repeat(data_batch[k], group_size, axis=0)
          for k in ("prompt_tokens", "prompt_mask", "index")}


def rewards_of(tokens, completion_mask, index, *, prompt_len, records, tokenizer, check,
               truncated_is_wrong=True, stop_sequences=()):
  """float32 [B]: 1.0 where `check(decoded completion, the record's answer)` holds, else 0.0 (host side).

  truncated_is_wrong: a completion with no EOS (one of tokenizer.eos_ids) under its mask and not ending
  with one of `stop_sequences` (token ids: sampling.stop), i.e. cut off by the budget, gets 0 without
  asking `check` (the last number of a cut-off text is no answer).
  """
  completions = distributed.to_host(tokens)[:, prompt_len:]
  masks = distributed.to_host(completion_mask)[:, prompt_len:] > 0
  rows = distributed.to_host(index)
  eos = np.asarray(tokenizer.eos_ids)
  stopped = np.asarray(sampling.ends_with_stop(completions, masks, stop_sequences))
  return np.array([float((not truncated_is_wrong or bool(np.isin(c[m], eos).any()) or bool(stop))
                         and bool(check(tokenizer.decode(c[m]), records[int(i)]["answer"])))
                   for c, m, i, stop in zip(completions, masks, rows, stopped)], np.float32)


def check_settings(config):
  g = config.grpo
  if g.group_size < 2:
    raise UserError(f"grpo.group_size must be >= 2 (advantages are relative to the group), got {g.group_size}")
  if g.updates_per_batch < 1:
    raise UserError(f"grpo.updates_per_batch must be >= 1, got {g.updates_per_batch}")
  if not 0.0 < g.clip_eps < 1.0:
    raise UserError(f"grpo.clip_eps must be in (0, 1), got {g.clip_eps}")
  if g.kl_coef < 0:
    raise UserError(f"grpo.kl_coef must be >= 0, got {g.kl_coef}")
  s = config.sampling
  if s.temperature <= 0:
    raise UserError(f"sampling.temperature must be > 0 for GRPO rollouts, got {s.temperature}")
  if s.top_k or s.top_p < 1.0:
    raise UserError(f"GRPO needs untruncated sampling (sampling.top_k=0, sampling.top_p=1.0), got top_k="
                    f"{s.top_k}, top_p={s.top_p}: the policy's log-probs would not be the sampler's")


def grpo_stage(config, workdir, *, policy, reference, tokenizer, source, mesh, check, desc="grpo"):
  """GRPO on `policy` (an nnx Transformer on `mesh`) for config.steps rollout batches; returns
  (policy, FLOP counters). reference: the frozen starting policy (used when grpo.kl_coef > 0)."""
  check_settings(config)
  g, s = config.grpo, config.sampling
  check_batch_size(config, mesh)
  rows = config.batch_size * g.group_size
  model = split(policy)
  adapters = lora.config_of(policy)  # for the FLOP count: only a LoRA policy's adapters get gradients
  optimizer, state, shardings = initial_state(config, model, mesh,
                                              total_steps=config.steps * g.updates_per_batch)
  settings = dict(temperature=float(s.temperature), clip_eps=float(g.clip_eps), kl_coef=float(g.kl_coef),
                  chunk_size=config.objective.chunk_size)
  step_fn = build_policy_step(policy=Split(model.graphdef, None, model.rest), optimizer=optimizer,
                              micro_batches=config.micro_batches, settings=settings,
                              state_shardings=shardings)
  iterator = data_iterator(config, source, tokenizer)
  bucket = s.length_bucket
  buckets.check_bucket(bucket)
  new_shape = buckets.ShapeLog(f"{desc}: policy step")
  stops = data.stop_sequences(tokenizer, s.stop)  # the sampler stops on them too (prefixes.from_sampler)
  reference_split = split(reference) if g.kl_coef > 0 else None
  score_reference = jax.jit(lambda ref, batch: token_logprobs(ref.merge(), batch, settings["temperature"],
                                                              settings["chunk_size"]))

  def one_step(state, step, data_batch, key, meta):
    del step
    data_batch = buckets.trim_prompts(data_batch, bucket)  # the sampler too runs on the shorter prompts
    prompt_len = data_batch["prompt_tokens"].shape[1]
    group = repeat_prompts(data_batch, g.group_size)
    current = model.merge(state.params)
    batch, rollout = prefixes.from_sampler(current, group, rng=key, settings=s, tokenizer=tokenizer)
    rewards = rewards_of(batch["tokens"], batch["loss_mask"], group["index"], prompt_len=prompt_len,
                         records=source, tokenizer=tokenizer, check=check,
                         truncated_is_wrong=g.truncated_is_wrong,
                         stop_sequences=stops)
    advantages = grpo.group_advantages(jnp.asarray(rewards), g.group_size, normalize_std=g.normalize_std)
    batch = dict(batch, old_logprobs=batch.pop("behavior_logprobs"),
                 advantages=jax.device_put(advantages, sharding.batch_sharding(mesh, 1)))
    batch = new_shape(buckets.trim_batch(batch, prompt_len, bucket))  # before reference scoring and updates
    if g.kl_coef > 0:
      batch["ref_logprobs"] = score_reference(reference_split, batch)
    update_metrics = []
    for _ in range(g.updates_per_batch):
      state, metrics = step_fn(state, batch)
      update_metrics.append(metrics)
    metrics = {k: float(v) for k, v in jax.device_get({**update_metrics[-1], **rollout}).items()}
    # the last update's metrics, except the clip fraction: the mean over the batch's updates (the first is 0)
    metrics["clip_fraction"] = float(np.mean([float(m["clip_fraction"]) for m in update_metrics]))
    r_PG = rewards.reshape(-1, g.group_size)
    metrics.update(reward=float(rewards.mean()), pass_at_group=float(np.mean(r_PG.max(axis=1))),
                   zero_signal_groups=float(np.mean(np.all(r_PG == r_PG[:, :1], axis=1))))
    length = batch["tokens"].shape[1]
    decode_steps = int(round(metrics["max_length"]))
    flops.accumulate(meta["flops"],
                     student_generation=flops.generation_flops(policy.config, rows, prompt_len, s.max_new_tokens,
                                                               decode_steps=decode_steps, lora=adapters),
                     student_train=g.updates_per_batch * flops.train_flops(policy.config, rows, length,
                                                                           lora=adapters),
                     teacher_scoring=flops.forward_flops(reference.config, rows, length) if g.kl_coef > 0 else 0)
    return state, metrics, set()

  state, meta = run_loop(config, workdir, mesh=mesh, state=state, iterator=iterator,
                         meta={"flops": flops.counters()}, one_step=one_step, desc=desc,
                         postfix=("reward", "response_length", "rollout_entropy"))
  nnx.update(policy, state.params)
  return policy, meta
