"""Matmul FLOPs of what the compiled programs compute, for throughput, MFU and matched-compute reports.

A multiply-add counts 2 FLOPs. Counted: the q/k/v/o projections, attention scores and the weighted sum of
values, the MLP's gate/up/down projections and the LM head (hidden x vocab, tied or not). Not counted:
the embedding lookup (a gather), biases, norms, RoPE, softmax, the sampler's draw and other elementwise
work. XLA's own `cost_analysis()` of the compiled forward, train step, prefill and decode step is 0.5-1.1%
above these counts for a 256-wide model (tests/test_flops.py; the gap is that elementwise work, larger
for toy widths).

We count what is computed, not what a mask keeps: causal attention over T tokens costs the full T x T
scores, a forward over a cache of S slots T x S, and the sampler's cache has prompt + max_new_tokens
slots from its first step on.
"""

from kldistill_jax.models.config import ModelConfig
from kldistill_jax.sampling import bucket_length


def _projections_per_token(config: ModelConfig) -> int:
  d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  return 2 * d * (h + 2 * kv) * hd + 2 * h * hd * d  # q, k, v in; o out


def _dense_per_token(config: ModelConfig) -> int:
  """FLOPs per token of every matmul whose size does not depend on the number of keys."""
  mlp = 3 * 2 * config.hidden_size * config.intermediate_size  # gate, up, down
  return config.num_layers * (_projections_per_token(config) + mlp) + 2 * config.hidden_size * config.vocab_size


def _attention_per_query_key(config: ModelConfig) -> int:
  """FLOPs per (query, key) pair over all layers: q.k scores plus the probability-weighted values."""
  return config.num_layers * 2 * 2 * config.num_heads * config.head_dim


def forward_flops(config: ModelConfig, batch: int, seq_len: int, *, context_len: int | None = None) -> int:
  """One forward pass over `seq_len` new tokens per row, each attending to `context_len` keys (default:
  the sequence itself; a cache of S slots: S), LM head on every position."""
  keys = seq_len if context_len is None else context_len
  return batch * seq_len * (_dense_per_token(config) + _attention_per_query_key(config) * keys)


def _recomputed_per_token(config: ModelConfig, keys: int) -> int:
  """What `config.remat` adds per token: the backward pass reruns each block's forward up to its last
  matmul. The down projection's output only feeds the residual sum, which no gradient needs, so it is
  dropped from the recomputation (as is the LM head, which is outside the blocks)."""
  gate_up = 2 * 2 * config.hidden_size * config.intermediate_size
  return (config.num_layers * (_projections_per_token(config) + gate_up)
          + _attention_per_query_key(config) * keys)


def train_flops(config: ModelConfig, batch: int, seq_len: int) -> int:
  """Forward plus backward (gradients of inputs and of weights: two forwards), plus, when `config.remat`
  is on, the blocks' recomputed forwards (Qwen3-0.6B at 4k tokens: about 0.7 of a forward more). That is
  what the hardware runs; MFU in its usual sense leaves the recomputation out (pass the config with
  remat=False)."""
  recomputed = batch * seq_len * _recomputed_per_token(config, seq_len) if config.remat else 0
  return 3 * forward_flops(config, batch, seq_len) + recomputed


def generation_flops(config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, *,
                     decode_steps: int | None = None, bucket: bool = True) -> int:
  """What one `sampling.sample(model, [batch, prompt_len] prompts, max_new_tokens=...)` call computes.

  The sampler pads the prompt width P up to `sampling.bucket_length` (unless bucket=False) and allocates
  a cache of P + max_new_tokens slots. The prefill runs P positions over that whole cache, LM head on every
  position; then the decode loop runs `decode_steps` iterations (the longest completion in the batch,
  EOS included: rows that finished early keep computing until every row has; default: max_new_tokens),
  each a one-token forward over all P + max_new_tokens slots.
  """
  width = bucket_length(prompt_len) if bucket else prompt_len
  steps = max_new_tokens if decode_steps is None else decode_steps
  if not 0 <= steps <= max_new_tokens:
    raise ValueError(f"decode_steps must be in [0, max_new_tokens={max_new_tokens}], got {decode_steps}")
  cache_len = width + max_new_tokens
  return (forward_flops(config, batch, width, context_len=cache_len)
          + steps * forward_flops(config, batch, 1, context_len=cache_len))


PHASES = ("student_generation", "student_train", "teacher_generation", "teacher_scoring", "eval")


def counters(**initial) -> dict:
  """Per-phase FLOP counters of a run, plus the student / teacher totals: {"<phase>_flops": int, ...,
  "student_flops", "teacher_flops"}. Phases: the student's sampling (on-policy prefixes, GRPO rollouts),
  its forward + backward, the teacher's sampling (teacher prefixes, the trajectory cache), its scoring
  forward (GRPO's frozen reference counts as the teacher here), and `eval`: sampling on held-out prompts
  (the evaluations before and after training, `eval.probe_every` probes, the curriculum's entropy
  checks). The totals are the training compute, so `eval` is in neither."""
  unknown = set(initial) - set(PHASES)
  if unknown:
    raise ValueError(f"unknown FLOP phase(s) {sorted(unknown)}; phases: {PHASES}")
  return accumulate({}, **initial)


def accumulate(counts: dict, **phase_flops) -> dict:
  """Adds FLOPs to the named phases of `counts` (in place) and restates the two totals; returns counts.
  Counters restored from a run that predates a phase start that phase at 0."""
  unknown = set(phase_flops) - set(PHASES)
  if unknown:
    raise ValueError(f"unknown FLOP phase(s) {sorted(unknown)}; phases: {PHASES}")
  for phase in PHASES:
    counts[f"{phase}_flops"] = counts.get(f"{phase}_flops", 0) + int(phase_flops.get(phase, 0))
  for side in ("student", "teacher"):
    counts[f"{side}_flops"] = sum(counts[f"{p}_flops"] for p in PHASES if p.startswith(side))
  return counts
