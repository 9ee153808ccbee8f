"""Every field a training config has, with its default and meaning; configs/*.py start from here.

The user-facing contract: `python run.py --config configs/<name>.py --config.objective.lam=0.25` etc.
Configs are locked (a mistyped override is an error); optional fields are typed placeholders.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def _model_section(**model):
  s = ml_collections.ConfigDict()
  s.path = ""  # Hugging Face checkpoint directory (config.json + safetensors); empty = the inline `model`
  s.model = ml_collections.ConfigDict(model)  # inline architecture (see models.ModelConfig), vocab from data
  s.param_dtype = "float32"  # storage dtype (float32 masters for the trained student)
  s.compute_dtype = "float32"  # activation/matmul dtype ("bfloat16" on accelerators)
  s.remat = "none"  # what backward recomputes: none | block (keeps block inputs) | save_dots (+ projections)
  s.attention = "auto"  # auto (splash TPU, cudnn GPU, blockwise CPU) | xla | blockwise | cudnn | splash
  s.fit_loaded = False  # a model loaded from `path` is used as is; True: fit it to the data first too
  return s


def base_config():
  c = ml_collections.ConfigDict()
  c.job = "distill"  # kldistill_jax.jobs entry: "distill", "grpo", "pretrain" (or "study", configs/study.py)
  c.seed = 0  # parameter init, sampling keys (step i uses fold_in(seed key, i))
  c.steps = 100  # optimizer updates of the distillation run
  c.batch_size = 32  # prompts per update, across all processes
  c.micro_batches = 1  # gradient accumulation: the batch is split into this many scanned micro-batches
  c.log_every = 10  # metrics.jsonl / TensorBoard interval (steps)
  c.checkpoint_every = 50  # orbax checkpoint interval (steps); the last step is always saved
  c.keep_checkpoints = 2  # newest checkpoints kept
  c.vocab_size = 0  # 0 = the tokenizer's; set to pad a model's vocabulary beyond the tokenizer's

  c.objective = ml_collections.ConfigDict()
  c.objective.prefix = "student"  # where prefixes come from: teacher | student | dataset
  c.objective.kl = "reverse"  # forward KL(p_T||q) | reverse KL(q||p_T) | mixed
  c.objective.lam = placeholder(float)  # reverse-KL weight in [0, 1]; only with kl="mixed"
  c.objective.estimator = "sampled"  # exact (full vocabulary) | sampled (sampled tokens only)
  c.objective.temperature = 1.0  # divides teacher and student logits in the loss
  c.objective.discount = 0.0  # reward-to-go discount of the sampled reverse estimator
  c.objective.clip = placeholder(float)  # importance-weight truncation (sampled, teacher prefixes)
  c.objective.chunk_size = placeholder(int)  # positions per chunk of the full-vocabulary loss (and GRPO log-probs)
  c.objective.fused = True  # loss from hidden states in chunks (exact KL fused, sampled log-probs), never [B, L, V] logits
  # a teacher with its own tokenizer (teacher.tokenizer) scores the same text, positions matched by character
  # spans: "off" (one tokenizer) | "uld" (sorted-probability distance) | "span" (KL of span probabilities,
  # token-level KL where both sides are one shared token); exact estimator, student or dataset prefixes
  c.objective.cross_tokenizer = "off"

  c.sampling = ml_collections.ConfigDict()  # how training prefixes are sampled (teacher/student)
  c.sampling.max_new_tokens = 48  # the training length (tokens generated per prefix)
  # > 0: the step batch drops columns that are padding in every row, keeping the longest completion and the
  # longest prompt each rounded up to a multiple of this (few shapes = few compiles); 0 = static P + N
  c.sampling.length_bucket = 256
  c.sampling.temperature = 1.0
  c.sampling.top_k = 0  # 0 = off
  c.sampling.top_p = 1.0  # 1 = off
  # stop strings besides EOS, e.g. ("</answer>",): a row ends once its generated tokens end with one's
  # tokens (data.tokenizer's encoding of the string alone); the stop tokens stay in the completion, as EOS
  c.sampling.stop = ()

  c.teacher_cache = ml_collections.ConfigDict()  # teacher prefixes only
  c.teacher_cache.enabled = False  # sample the teacher once into workdir/trajectories and reuse it
  c.teacher_cache.num_trajectories = 0  # 0 = steps x batch_size (one pass); fewer are reused per epoch
  # > 0: also store the teacher's top-k log-probs per token, so the exact forward KL (sft) runs no teacher
  # forward; the KL is coarsened to those k tokens + the rest (exact at k = vocab size). 0 = off.
  c.teacher_cache.top_k = 0
  # True: also store the teacher's final hidden states (bfloat16, 2 x hidden_size bytes per token) and its
  # output head once; every exact KL (forward / reverse / mixed) is then computed from them: no teacher forward.
  c.teacher_cache.hidden_states = False

  c.curriculum = ml_collections.ConfigDict()  # entropy-gated training length (sampled prefixes)
  c.curriculum.enabled = False  # on: sampling.max_new_tokens is replaced by the curriculum's length
  c.curriculum.lengths = (16, 32)  # L_0 < L_1 < ...: training lengths of the stages
  c.curriculum.stage_steps = 100  # steps per stage; H is measured at each stage end
  c.curriculum.h_min = 0.1  # advance only while the held-out entropy (nats/token) is >= h_min
  c.curriculum.h_min_relative = 0.0  # > 0: h_min = this x the teacher's entropy on the same probe (replaces h_min)
  c.curriculum.eval_problems = 64  # held-out prompts (eval split) the entropy is measured on

  c.grpo = ml_collections.ConfigDict()  # job "grpo": RL from the student (student.path) with accuracy rewards
  c.grpo.group_size = 8  # G completions per prompt; batch_size counts prompts, so a step samples batch_size x G
  c.grpo.updates_per_batch = 1  # optimizer updates per rollout batch (> 1: the ratio leaves 1, clipping acts)
  c.grpo.clip_eps = 0.2  # importance-ratio clipping range [1 - eps, 1 + eps]
  c.grpo.kl_coef = 0.0  # weight of the k3 KL to the frozen starting policy (0 = no reference)
  c.grpo.normalize_std = True  # advantages (r - mean) / std per group; False = mean baseline only (Dr. GRPO)
  c.grpo.truncated_is_wrong = True  # reward 0 for a rollout without EOS within sampling.max_new_tokens (False: check)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 10
  c.optimizer.schedule = "cosine"  # cosine (to 10%) | constant, after the linear warmup
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0  # global-norm clipping; 0 = off

  c.mesh = ml_collections.ConfigDict()  # ('data', 'fsdp', 'tensor'); the product is the device count
  c.mesh.data = -1  # -1 = every device the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.distributed = ml_collections.ConfigDict()
  c.distributed.mode = "off"  # off | auto (TPU pods, SLURM, Open MPI) | explicit (the fields below)
  c.distributed.coordinator_address = ""  # host:port of process 0
  c.distributed.num_processes = 1
  c.distributed.process_id = 0

  c.teacher = _model_section()
  c.teacher.train_steps = 0  # > 0: fit the inline teacher to the data first (cached in workdir/teacher)
  c.teacher.learning_rate = 3e-3
  c.teacher.tokenizer = ""  # objective.cross_tokenizer: "char" | "byte" | a tokenizer dir; "" = teacher.path's
  c.student = _model_section()
  c.student.warmup_steps = 0  # > 0: fit the student to the data briefly first (workdir/student_init)
  c.student.warmup_learning_rate = 3e-3
  c.student.lora = ml_collections.ConfigDict()  # LoRA: train low-rank adapters only, the base stays frozen
  c.student.lora.rank = 0  # adapter rank r; 0 = off (every weight trained)
  c.student.lora.alpha = 16.0  # the adapters' update is scaled by alpha / rank (PEFT's lora_alpha)
  # the projections that get an adapter (Hugging Face module names; PEFT's target_modules)
  c.student.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

  c.data = ml_collections.ConfigDict()
  c.data.source = "arithmetic"  # arithmetic (built in) | gsm8k | math | chat (`messages` JSONL files) | tfds
  c.data.tokenizer = "char"  # "char" (built-in task), "byte" (any UTF-8 text) or a local HF tokenizer directory
  c.data.template = "raw"  # raw | plain | chat
  c.data.system_prompt = ""  # chat template: a first system turn for conversations without their own
  c.data.enable_thinking = placeholder(bool)  # chat template: Qwen3's thinking switch; unset = its default
  c.data.prompt_len = 16  # prompt tokens (left-padded; longer prompts are an error, never truncated)
  c.data.response_len = 48  # reference response tokens incl. EOS (dataset prefixes, fitting)
  c.data.too_long = "error"  # records over prompt_len/response_len, checked before training: error | skip
  c.data.seed = 0  # shuffling (and the built-in task's problems)
  c.data.num_train = 100_000  # built-in task: training problems
  c.data.difficulties = (2, 3, 4, 5)  # built-in task: numbers of terms in training problems
  c.data.train_path = ""  # gsm8k / math: JSONL files
  c.data.eval_path = ""
  c.data.tfds_name = ""  # tfds: prepared array_record dataset name, its data_dir and keys
  c.data.tfds_data_dir = ""
  c.data.tfds_eval_split = "test"
  c.data.prompt_key = "question"
  c.data.response_key = "answer"
  c.data.answer_key = ""

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"  # built-in task: held-out split
  c.eval.num_problems = 256  # built-in task: held-out problems
  c.eval.difficulties = (2, 3, 4, 5)
  c.eval.batch_size = 128  # prompts per sampler call, across processes
  c.eval.max_new_tokens = 48
  c.eval.temperature = 0.0  # 0 = greedy
  c.eval.stop = ()  # stop strings of held-out sampling besides EOS (see sampling.stop); a stop ends a row as EOS does
  c.eval.samples_per_prompt = 1  # n completions per problem: accuracy is Avg@n
  c.eval.pass_k = (1,)  # Pass@k (unbiased estimator from the n samples) for each k <= n
  c.eval.truncated_is_wrong = True  # no EOS / stop string within max_new_tokens is wrong; False: the check decides
  c.eval.seed = 0
  c.eval.probe_every = 0  # > 0: every N distillation steps, log probe_accuracy / probe_entropy / probe_length
  c.eval.probe_problems = 64  # held-out prompts of that probe, sampled at the training temperature
  # ("name=format:path", ...), format gsm8k | math | aime | amc: when non-empty, the held-out evaluation is
  # these JSONL files (each its own group in results.json by_group) instead of the data source's eval split
  c.eval.benchmarks = ()

  # the final models (workdir/student, workdir/policy) as Hugging Face directories with tokenizer files and
  # generation_config.json (eval.temperature / eval.max_new_tokens); stage exports (*/model) stay lossless
  c.export = ml_collections.ConfigDict()
  c.export.dtype = "bfloat16"  # parameter dtype of those exports: bfloat16 | float32 (the exact masters)

  # Weights & Biases (pip install ".[wandb]"): one W&B run per metrics workdir with the same scalars as
  # TensorBoard and the resolved config (and the study report's plots); WANDB_MODE=offline works offline
  c.log = ml_collections.ConfigDict()
  c.log.wandb_project = ""  # "" = off (wandb is then never imported)
  c.log.wandb_entity = ""  # W&B team or user; "" = your default
  c.log.wandb_group = ""  # groups the runs (e.g. a study's); "" = none
  return c
