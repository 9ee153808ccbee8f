"""The paper's real-scale recipe: Qwen3-8B teacher -> Qwen3-0.6B student on math prompts.

Student prefixes, forward-heavy mixed KL (lam=0.25 = the REVERSE-KL weight), exact estimator, 4096-token
training length. The exact estimator runs fused (`objective.fused`): the loss is computed from hidden
states in chunks of `objective.chunk_size` positions and never materialises [B, L, V] logits, which at
L=4608 and V=151936 would cost 2.8 GB per sequence per model. Checkpoints, JSONL files and tokenizer are
the user's: set the paths (nothing is checked until the job runs).

Launch, one 8x H100-80GB node (one process, mesh (data, fsdp, tensor) = (1, 8, 1)):
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python run.py --config configs/qwen3_8b_to_0p6b.py \\
    --config.teacher.path=/ckpt/Qwen3-8B --config.student.path=/ckpt/Qwen3-0.6B \\
    --config.data.tokenizer=/ckpt/Qwen3-0.6B \\
    --config.data.train_path=/data/math_train.jsonl --config.data.eval_path=/data/math500.jsonl \\
    --workdir /ckpt/runs/8b_to_0p6b
TPU v5p-64 slice (32 chips, 95 GB HBM each), the same command on every host, mesh (8, 4, 1):
  ... --config.distributed.mode=auto --config.mesh.fsdp=4 --config.batch_size=256
TPU v4-64 (32 chips, 32 GiB each), mesh (4, 8, 1):
  ... --config.distributed.mode=auto --config.batch_size=128
Overrides: GSM8K `--config.data.source=gsm8k`; training length `--config.sampling.max_new_tokens=128`
(the paper's 128 -> 4096 axis); the mixture `--config.objective.lam=0.5`. Preset `:opd` (on-policy
distillation: reverse KL, sampled estimator, micro_batches=4, since the sampled estimator needs full
logits: see the plan below); a preset because `objective.lam` cannot be reset to None from the command line:
  python run.py --config configs/qwen3_8b_to_0p6b.py:opd --config.teacher.path=... (as above)

Memory plan (numbers from models.config: QWEN3_8B.num_params() = 8,190,735,360 (N_T),
QWEN3_0P6B.num_params() = 596,049,920 (N_S); GB = 1e9 bytes; L = prompt 512 + 4096 new = 4608 tokens).
Sharding (models.sharding.RULES): "embed" -> fsdp, "heads"/"kv_heads"/"mlp"/"vocab" -> tensor, "batch" ->
(data, fsdp). Every weight matrix has an embed dimension, so parameters, gradients and both AdamW moments
are split fsdp x tensor ways and replicated over data; batches (and KV caches) are split data x fsdp ways.
Totals:
  teacher weights, bf16                 2 N_T  = 16.38 GB
  student fp32 masters                  4 N_S  =  2.38 GB
  AdamW mu + nu (fp32)                  8 N_S  =  4.77 GB
  gradients (+ scan accumulator), fp32  4+4 N_S = 4.77 GB   -> student state 20 N_S = 11.92 GB
  KV cache (bf16) per token: layers x 2 x kv_heads(8) x head_dim(128) x 2 B
    teacher 36 layers: 147,456 B/token -> 0.68 GB per sequence of 4608
    student 28 layers: 114,688 B/token -> 0.53 GB per sequence
  sampler prefill scores (fp32, 512 queries x 4608 slots x heads): teacher 0.30, student 0.15 GB/seq
  train step, per sequence (remat="block"): saved block inputs 28 x L x 1024 x 2 B = 0.26 GB; one layer's
    attention recomputed in the backward, fp32 scores + bf16 probs and their cotangents (the attention
    materialises heads x L x L): student ~4.1 GB, teacher forward ~4.1 GB  -> ~4.5 GB/seq (rough)
  fused loss scratch: 5 x V x 4 B = 3.0 MB per position in a chunk (chunk_size=4096 global positions =
    512 per device on 8 batch shards: 1.56 GB) + the [1024, V] fp32 head-gradient accumulator 0.62 GB
  FSDP gathers: the teacher's embedding and head (bf16 [V, 4096] each, 1.24 GB) are gathered whole
    for their matmuls, transiently: ~3 GB headroom
  sampled estimator (opd) only: [L, V] fp32 logits of both models, their log-softmax and the logit
    gradient: ~5 x 2.8 GB = ~14 GB per sequence more.
Per device:
                                  H100 node (1, 8, 1)   v5p-64 (8, 4, 1)    v4-64 (4, 8, 1)
  HBM                             80 GB                 95 GB               32 GiB = 34.4 GB
  teacher bf16 (/fsdp)            2.05                  4.10                2.05
  student state 20 N_S (/fsdp)    1.49                  2.98                1.49
  loss scratch + gathers          ~5.2                  ~4.0                ~4.0
  train step, exact, m rows       4.5 m                 4.5 m               4.5 m
  -> exact rows per device        m = 8: ~45 GB         m = 8: ~47 GB       m = 4: ~26 GB
  -> batch_size, micro_batches    64, 1                 256, 1              128, 1 (256, 2)
  sampling, batch/shards rows     8 x 0.98 (teacher) = 7.9 GB, 8 x 0.68 (student) = 5.4 GB at those sizes
  opd (sampled), ~18.5 GB/row     m = 2: ~46 GB         m = 2: ~48 GB       m = 1: ~26 GB
                                  64, micro_batches 4   256, micro_batches 4  128, micro_batches 4
The whole batch is sampled at once (micro_batches split only the update), so sampling caps batch_size at
about (HBM - resident) / 0.98 GB x batch shards: ~70 rows per device for teacher prefixes on an H100.
Scale batch_size with micro_batches at a fixed rows-per-device. These numbers are analytic: no accelerator
measured them, and XLA:CPU's compile-time memory_analysis cannot (it reports the same temp bytes with and
without jax.checkpoint). The attention's heads x L x L scores dominate the per-row term at 4096 tokens;
a fused attention kernel would shrink it several-fold. Without remat every layer keeps its
attention (~2 GB per layer per row): remat is required (tests/test_configs.py::test_student_remat_runs
runs it through the runner). On v4 use (4, 8, 1):
(8, 4, 1) would double the resident weights to 7.1 GB of 34. A (1, 1, 8) tensor-parallel mesh also divides every dimension (16/32
heads, 8 kv heads, 3072/12288 mlp, V = 8 x 18992) and avoids per-decode-step weight gathers, but then
every device holds the whole batch's activations.
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config


def get_config(arg=None):
  c = base_config()
  c.steps = 1000
  c.batch_size = 64  # 8 prompts per device on the H100 node; 256 on a v5p-64 (see the plan)
  c.micro_batches = 1
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 3

  c.objective.prefix = "student"
  c.objective.kl = "mixed"
  c.objective.lam = 0.25  # reverse-KL weight: forward-heavy holds entropy and length over long runs
  c.objective.estimator = "exact"
  c.objective.chunk_size = 4096  # global positions per fused-loss chunk: 512 per device on 8 shards

  c.sampling.max_new_tokens = 4096  # the training length
  c.sampling.temperature = 1.0  # on-policy means samples of q itself

  c.optimizer.learning_rate = 1e-5  # full fine-tuning of a 0.6B model
  c.optimizer.warmup_steps = 50

  c.mesh.data = -1  # (1, 8, 1) on 8 GPUs; (4, 8, 1) on 32 chips, or --config.mesh.fsdp=4 for (8, 4, 1)
  c.mesh.fsdp = 8
  c.mesh.tensor = 1

  c.teacher.path = ""  # REQUIRED: Qwen3-8B Hugging Face checkpoint directory
  c.teacher.param_dtype = "bfloat16"  # frozen: no fp32 masters needed
  c.teacher.compute_dtype = "bfloat16"
  c.student.path = ""  # REQUIRED: Qwen3-0.6B Hugging Face checkpoint directory
  c.student.param_dtype = "float32"  # masters for AdamW
  c.student.compute_dtype = "bfloat16"
  c.student.remat = "block"  # keep only each block's input for the backward: activations O(1) blocks

  c.data.source = "math"  # math (problem/solution[/answer]) | gsm8k (question/answer '#### N') JSONL
  c.data.tokenizer = ""  # REQUIRED: a local tokenizer directory (the student checkpoint's)
  c.data.template = "chat"  # Qwen3's chat template with the generation prompt
  c.data.prompt_len = 512  # longer prompts are an error, never truncated: raise it if one fails
  c.data.response_len = 2048  # references are encoded (never truncated) even though unused here
  c.data.train_path = ""  # REQUIRED: JSONL files
  c.data.eval_path = ""

  c.eval.batch_size = 64
  c.eval.max_new_tokens = 4096
  c.eval.temperature = 0.6  # Qwen3's thinking-mode temperature; one sample per problem (Avg@1)
  return presets.apply_arg(c, arg, {"opd": _opd})


def _opd(c):
  """On-policy distillation at the same scale: 2 rows per device per micro-batch on an H100."""
  presets.objective(c, "opd")
  c.objective.lam = None
  c.micro_batches = 4
