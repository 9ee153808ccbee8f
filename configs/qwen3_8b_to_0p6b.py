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
distillation: reverse KL, sampled estimator); a preset because `objective.lam` cannot be reset to None from
the command line:
  python run.py --config configs/qwen3_8b_to_0p6b.py:opd --config.teacher.path=... (as above)

Memory plan, measured: `python bench/memory_plan.py` compiles every phase of this config (never runs it)
on simulated CPU meshes of each target's FSDP width and reads XLA's per-device bytes (GB = 1e9 B; prompt
512 + 4096 new tokens; resident = what does not grow with the batch; per row = each more row per device):

  phase                  8x H100-80GB / v4-64 (fsdp 8)     v5p-64 (fsdp 4)
                         resident   per row                resident   per row
  student generation      1.36      1.28                    1.73      1.28
  teacher generation     11.67      0.88                   17.37      0.95
  train step, exact      11.28      0.76                   18.15      0.71
  train step, :opd       12.71      0.34                   20.12      0.34

Rows per device that fit: H100 61 (generation caps it), v5p 73, v4 25. The whole batch is sampled at once,
so the sampler's ~1.28 GB per row (the KV cache of 4608 slots and its loop copies) bounds the batch; the
train step at 0.34-0.76 GB per row (flash attention, remat="block", the fused loss; the sampled estimator's
log-probs in position chunks) is no longer the limit, which is why `:opd` needs no micro-batches. The
defaults (8 rows per device on the H100 node, batch 64) use a fraction of the memory: raise batch_size to
fill it. XLA:CPU computes bf16 matmuls in f32, so its bf16 teacher phases hold f32 weight copies a device
never makes (the teacher's resident figures are upper bounds; see the bench's docstring).
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
  """On-policy distillation at the same scale: reverse KL, sampled estimator. Its token log-probs come
  from hidden states in chunks of objective.chunk_size positions, so a row costs less than the exact
  step's (0.34 against 0.76 GB per row per device: bench/memory_plan.py) and no micro-batches are needed."""
  presets.objective(c, "opd")
  c.objective.lam = None
  c.micro_batches = 1
