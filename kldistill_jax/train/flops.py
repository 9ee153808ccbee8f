"""Matmul FLOPs of what the compiled programs compute, for throughput, MFU and matched-compute reports.

A multiply-add counts 2 FLOPs. Counted: the q/k/v/o projections, attention scores and the weighted sum of
values, the MLP's gate/up/down projections and the LM head (hidden x vocab, tied or not). Not counted:
the embedding lookup (a gather), biases, norms, RoPE, softmax, the sampler's draw and other elementwise
work. XLA's own `cost_analysis()` of the compiled forward, train step, prefill and decode step is 0.5-1.1%
above these counts for a 256-wide model (tests/test_flops.py; the gap is that elementwise work, larger
for toy widths).

We count what is computed, not what a mask keeps, and that depends on the model's attention
implementation (`models.attention.resolve`): `xla` scores every (query, key slot) pair, causal or not,
padding or not; `blockwise` computes, for each block of BLOCK_Q queries, the key blocks of BLOCK_K slots
up to its last query (so causal attention over T tokens costs about T^2 / 2 beyond one block, and a decode
step reads the filled part of its cache, not all of it); `splash` the same with its 128-slot blocks on a
length padded to them; `cudnn` is counted as every pair (its tile skipping is not visible from here:
an upper bound on attention only). Backward passes: XLA's autodiff of the two attention matmuls runs four
(2x the forward); the flash backward of `blockwise` / `cudnn` recomputes the scores, five (2.5x); splash's
separate dq and dk/dv kernels recompute twice, seven (3.5x). The GPU/TPU counts follow the kernels'
structure and are not measured here.
"""

from kldistill_jax.models import attention
from kldistill_jax.models.config import ModelConfig
from kldistill_jax.sampling import bucket_length

_BACKWARD_PER_FORWARD = {"xla": 2.0, "blockwise": 2.5, "cudnn": 2.5, "splash": 3.5}


def _projections_per_token(config: ModelConfig) -> int:
  d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  return 2 * d * (h + 2 * kv) * hd + 2 * h * hd * d  # q, k, v in; o out


def head_flops(tokens: int, hidden_size: int, vocab_size: int) -> int:
  """The output head (hidden x vocab) on `tokens` positions: all a teacher costs per training step when
  its final hidden states are cached (`teacher_cache.hidden_states`)."""
  return 2 * tokens * hidden_size * vocab_size


def _adapters_per_token(config: ModelConfig, lora, skip=()) -> int:
  """FLOPs per token of the LoRA adapters' forward, x @ A [in, r] then @ B [r, out], on every targeted
  projection but `skip` (lora: a `models.lora.LoraConfig`, or None: no adapters, 0)."""
  if lora is None:
    return 0
  d, h, kv, hd, i = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                     config.intermediate_size)
  shapes = {"q_proj": (d, h * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (h * hd, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
  return config.num_layers * sum(2 * lora.rank * sum(shapes[t]) for t in lora.targets if t not in skip)


def _dense_per_token(config: ModelConfig, lm_head: bool = True, lora=None) -> int:
  """FLOPs per token of every matmul whose size does not depend on the number of keys (with `lora`, the
  adapters' too: they run beside the frozen kernels, never merged into them while training or sampling)."""
  mlp = 3 * 2 * config.hidden_size * config.intermediate_size  # gate, up, down
  head = head_flops(1, config.hidden_size, config.vocab_size) if lm_head else 0
  return config.num_layers * (_projections_per_token(config) + mlp) + head + _adapters_per_token(config, lora)


def _attention_per_query_key(config: ModelConfig) -> int:
  """FLOPs per (query, key) pair over all layers: q.k scores plus the probability-weighted values."""
  return config.num_layers * 2 * 2 * config.num_heads * config.head_dim


def _kernel(config: ModelConfig, queries: int, keys: int, offset: int) -> str:
  full = offset == 0 and queries == keys
  return attention.resolve(config.attention, full=full, dtype=config.compute_dtype,
                           head_dim=config.head_dim)[0]


def attention_pairs(config: ModelConfig, queries: int, keys: int, offset: int = 0) -> int:
  """(query, key slot) pairs the model's attention computes for `queries` queries at slots
  [offset, offset + queries) of a `keys`-slot key axis (per row and head, all layers alike)."""
  kernel = _kernel(config, queries, keys, offset)
  if kernel in ("xla", "cudnn"):
    return queries * keys
  if kernel == "splash":
    padded = -(-queries // attention.SPLASH_BLOCK) * attention.SPLASH_BLOCK
    bq = bk = attention.SPLASH_BLOCK
    queries, keys = padded, padded
  else:
    bq, bk = min(attention.BLOCK_Q, queries), min(attention.BLOCK_K, keys)
  nq, nk = -(-queries // bq), -(-keys // bk)
  # Query block i (padded rows included) against key blocks 0 .. needed - 1, each bk slots wide (the last
  # one clamped to end at `keys`): the trip counts of attention._forward's loops.
  return sum(bq * min((offset + (i + 1) * bq - 1) // bk + 1, nk) * bk for i in range(nq))


def forward_flops(config: ModelConfig, batch: int, seq_len: int, *, context_len: int | None = None,
                  offset: int = 0, lm_head: bool = True, lora=None) -> int:
  """One forward pass over `seq_len` new tokens per row at slots [offset, offset + seq_len) of a key axis
  of `context_len` slots (default: the sequence itself; a cache: its S slots), LM head on every position
  (lm_head=False: up to the final hidden states, as `model(..., return_hidden=True)` computes).
  lora: the model's `models.lora.LoraConfig` when it carries adapters (`models.lora.config_of`)."""
  keys = seq_len if context_len is None else context_len
  return batch * (seq_len * _dense_per_token(config, lm_head, lora)
                  + _attention_per_query_key(config) * attention_pairs(config, seq_len, keys, offset))


def _recomputed(config: ModelConfig, seq_len: int, lora=None) -> int:
  """What `config.remat` adds per row. "block": the backward pass reruns each block's forward up to its
  last matmul (the down projection's output only feeds the residual sum, which no gradient needs, so it
  is dropped from the recomputation, as is the LM head, outside the blocks). "save_dots": the projections'
  outputs are kept, only the attention's forward is rerun."""
  attention_forward = _attention_per_query_key(config) * attention_pairs(config, seq_len, seq_len)
  if config.remat == "none":
    return 0
  if config.remat == "save_dots":
    return attention_forward
  gate_up = 2 * 2 * config.hidden_size * config.intermediate_size
  # The down projection's adapter: x @ A is rerun (dB needs it), its @ B output only feeds the residual.
  down_a = 0 if lora is None or "down_proj" not in lora.targets else \
      config.num_layers * 2 * lora.rank * config.intermediate_size
  return (seq_len * (config.num_layers * (_projections_per_token(config) + gate_up)
                     + _adapters_per_token(config, lora, skip=("down_proj",)) + down_a) + attention_forward)


def train_flops(config: ModelConfig, batch: int, seq_len: int, *, lora=None) -> int:
  """Forward plus backward (gradients of inputs and of weights: two forwards), plus what `config.remat`
  recomputes (Qwen3-0.6B at 4k tokens, remat="block": about 0.7 of a forward more). That is what the
  hardware runs; MFU in its usual sense leaves the recomputation out (pass the config with
  remat="none").

  lora: the student's `models.lora.LoraConfig` when only its adapters train. The frozen kernels then get
  no weight gradients (their backward is the input gradient alone: one forward, not two) and the adapters
  cost three forwards of their own (forward, input and weight gradients)."""
  attention_forward = batch * _attention_per_query_key(config) * attention_pairs(config, seq_len, seq_len)
  backward = _BACKWARD_PER_FORWARD[_kernel(config, seq_len, seq_len, 0)]
  if lora is None:
    dense = 3 * batch * seq_len * _dense_per_token(config)
  else:
    dense = batch * seq_len * (2 * _dense_per_token(config) + 3 * _adapters_per_token(config, lora))
  recomputed = batch * _recomputed(config, seq_len, lora)
  return dense + int((1 + backward) * attention_forward) + recomputed


def generation_flops(config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, *,
                     decode_steps: int | None = None, bucket: bool = True, lora=None) -> int:
  """What one `sampling.sample(model, [batch, prompt_len] prompts, max_new_tokens=...)` call computes.

  The sampler pads the prompt width P up to `sampling.bucket_length` (unless bucket=False) and allocates
  a cache of P + max_new_tokens slots. The prefill runs P positions over that whole cache, the LM head on
  the last real prompt position only (one row of logits per row predicts the first token); then the
  decode loop runs `decode_steps` iterations (the longest completion in the batch, EOS included: rows
  that finished early keep computing until every row has; default: max_new_tokens),
  step i a one-token forward at slot P + i of that cache (attention over its blocks up to that slot,
  or over every slot for `xla`: see `attention_pairs`).
  """
  width = bucket_length(prompt_len) if bucket else prompt_len
  steps = max_new_tokens if decode_steps is None else decode_steps
  if not 0 <= steps <= max_new_tokens:
    raise ValueError(f"decode_steps must be in [0, max_new_tokens={max_new_tokens}], got {decode_steps}")
  cache_len = width + max_new_tokens
  return (forward_flops(config, batch, width, context_len=cache_len, lm_head=False, lora=lora)
          + head_flops(batch, config.hidden_size, config.vocab_size)
          + sum(forward_flops(config, batch, 1, context_len=cache_len, offset=width + i, lora=lora)
                for i in range(steps)))


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
