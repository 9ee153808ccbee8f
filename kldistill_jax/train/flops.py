"""Matmul FLOPs of the decoder (`models.Transformer`), for throughput and MFU reports.

A multiply-add counts 2 FLOPs. Counted: the q/k/v/o projections, attention scores and the weighted sum of
values, the MLP's gate/up/down projections and the LM head (hidden x vocab, tied or not). Not counted:
the embedding lookup (a gather), biases, norms, RoPE, softmax and other elementwise work (about 0.5% of
XLA's own count for a 256-wide model, more for toy widths).
"""

from kldistill_jax.models.config import ModelConfig


def _dense_per_token(config: ModelConfig) -> int:
  """FLOPs per token of every matmul whose size does not depend on the number of keys."""
  d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  projections = 2 * d * (h + 2 * kv) * hd + 2 * h * hd * d  # q, k, v in; o out
  mlp = 3 * 2 * d * config.intermediate_size  # gate, up, down
  return config.num_layers * (projections + mlp) + 2 * d * config.vocab_size


def _attention_per_query_key(config: ModelConfig) -> int:
  """FLOPs per (query, key) pair over all layers: q.k scores plus the probability-weighted values."""
  return config.num_layers * 2 * 2 * config.num_heads * config.head_dim


def forward_flops(config: ModelConfig, batch: int, seq_len: int, *, context_len: int | None = None) -> int:
  """One forward pass over `seq_len` new tokens per row, each attending to `context_len` keys.

  The default context is the sequence itself. We count what is computed, not what the mask keeps: causal
  attention over T tokens costs the full T x T scores and values (a cache of S slots: T x S).
  """
  keys = seq_len if context_len is None else context_len
  return batch * seq_len * (_dense_per_token(config) + _attention_per_query_key(config) * keys)


def train_flops(config: ModelConfig, batch: int, seq_len: int) -> int:
  """Forward plus backward: the backward pass costs two forwards (gradients of inputs and of weights)."""
  return 3 * forward_flops(config, batch, seq_len)


def generation_flops(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> int:
  """A prefill over the prompt, then `new_tokens` one-token decode steps.

  Decode step i (from 0) attends to the prompt_len + i + 1 filled cache slots. A fixed-size cache computes
  over all its slots; for that count use `forward_flops(..., context_len=cache_len)` per step.
  """
  filled_slots = new_tokens * prompt_len + new_tokens * (new_tokens + 1) // 2  # sum over i of P + i + 1
  decode = batch * (new_tokens * _dense_per_token(config) + _attention_per_query_key(config) * filled_slots)
  return forward_flops(config, batch, prompt_len) + decode


PHASES = ("student_generation", "student_train", "teacher_generation", "teacher_scoring")


def counters(**initial) -> dict:
  """Per-phase FLOP counters of a run, plus the student / teacher totals: {"<phase>_flops": int, ...,
  "student_flops", "teacher_flops"}. Phases: the student's sampling (on-policy prefixes, GRPO rollouts),
  its forward + backward, the teacher's sampling (teacher prefixes, the trajectory cache) and its scoring
  forward (GRPO's frozen reference counts as the teacher here)."""
  unknown = set(initial) - set(PHASES)
  if unknown:
    raise ValueError(f"unknown FLOP phase(s) {sorted(unknown)}; phases: {PHASES}")
  return accumulate({}, **initial)


def accumulate(counts: dict, **phase_flops) -> dict:
  """Adds FLOPs to the named phases of `counts` (in place) and restates the two totals; returns counts."""
  for phase in PHASES:
    counts[f"{phase}_flops"] = counts.get(f"{phase}_flops", 0) + int(phase_flops.get(phase, 0))
  for side in ("student", "teacher"):
    counts[f"{side}_flops"] = sum(counts[f"{p}_flops"] for p in PHASES if p.startswith(side))
  return counts
