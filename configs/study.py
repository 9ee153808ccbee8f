"""The study in one command: the 2x2 at a short and a long training length, the paper's estimators beside
the exact one, KL mixing, the entropy-gated length curriculum (fixed and teacher-relative floor), GRPO from
the forward-KL and the reverse-KL students, every entry once per seed; writes report.md with plots.

  python run.py --config configs/study.py --workdir /tmp/study            # 3 seeds: 51 min on 2 CPU cores (measured)
  python run.py --config configs/study.py:smoke --workdir /tmp/study_smoke   # 2 seeds, every stage tiny: tests
  python run.py --config configs/study.py:paper --config.teacher.path=/ckpt/Qwen3-8B \\
    --config.student.path=/ckpt/Qwen3-0.6B --config.data.tokenizer=/ckpt/Qwen3-0.6B \\
    --config.data.train_path=/data/math_train.jsonl --config.data.eval_path=/data/math500.jsonl \\
    --config.eval.benchmarks='("math500=math:/data/math500.jsonl", "aime24=aime:/data/aime24.jsonl", \\
        "amc23=amc:/data/amc23.jsonl")' --workdir /ckpt/study           # a pod: see qwen3_8b_to_0p6b.py

Built-in task: the shipped teacher (assets/arithmetic_teacher); per seed one base student fitted briefly to
the data (runs/seed<s>/base), then every run from that base with the seed's init, data order and sampling,
and the same steps and learning rate. The main cells use the exact (full-vocabulary) estimator so that the KL
direction and the prefix source are the only differences; the estimator arm reruns the long-length cells
with each preset's own estimator (sampled reverse KL for opd / offline_rl), the paper's choice. The
evaluation samples 4 completions per held-out problem at temperature 1: Avg@4 and Pass@1/2/4; the report
gives every number as a mean over seeds with a 95% bootstrap interval over seeds x problems, and each
finding's verdict from its interval. The curriculum's floors were fixed before any seeded run: the library
default H_min = 0.1 nats/token (the shipped teacher's greedy entropy is 0.128), and, as a second arm,
H_min = 1.0 x the teacher's own entropy on the same probe (a student below its teacher's entropy has
collapsed; single-seed results were known when this was chosen, the seeded ones were not).
The `study` section's fields are in kldistill_jax/train/study.py (`defaults`).
"""

import importlib.util
import pathlib

from kldistill_jax.train import presets, study
from kldistill_jax.train.defaults import base_config


def _smoke(c):
  """Every stage at toy size (2 steps, 8 prompts, 2-term problems), two seeds: a few minutes on 2 cores."""
  presets.smoke(c)
  c.study.seeds = (0, 1)
  c.study.lengths = (6, 12)
  c.study.mixing_lams = (0.0, 0.25, 1.0)  # 0.25: forward-heavy, so every finding has its runs
  c.study.curriculum_lengths = (6, 12)
  c.study.grpo_steps = 2
  c.study.grpo_batch_size = 8
  c.grpo.group_size = 2
  c.eval.samples_per_prompt = 2
  c.eval.pass_k = (1, 2)
  c.eval.probe_every = 1
  c.eval.probe_problems = 8
  c.curriculum.eval_problems = 8
  return c


def _paper(c):
  """The real-scale study on a pod: Qwen3-8B teacher, Qwen3-0.6B student (paths on the command line)."""
  spec = importlib.util.spec_from_file_location("recipe", pathlib.Path(__file__).with_name("qwen3_8b_to_0p6b.py"))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  paper = recipe.get_config()
  paper.study = c.study
  paper.job = "study"
  paper.objective.lam = None  # every run sets its own objective
  paper.objective.kl = "reverse"
  paper.student.warmup_steps = 0  # the base is the given Qwen3-0.6B checkpoint itself
  paper.study.lengths = (1024, 4096)  # short and long training lengths (new tokens per prefix)
  paper.study.curriculum_lengths = (1024, 2048, 4096)
  paper.study.grpo_steps = 200
  paper.study.grpo_batch_size = 64
  paper.study.grpo_learning_rate = 1e-6
  paper.eval.max_new_tokens = 4096
  paper.eval.temperature = 0.6
  paper.eval.samples_per_prompt = 8
  paper.eval.pass_k = (1, 4, 8)
  paper.eval.probe_every = 100
  paper.curriculum.eval_problems = 128
  return paper


def get_config(arg=None):
  c = presets.arithmetic(base_config())
  c.job = "study"
  c.study = study.defaults()
  c.steps = 400  # per distillation run
  c.log_every = 20
  c.checkpoint_every = 100
  c.eval.num_problems = 128
  c.eval.samples_per_prompt = 4
  c.eval.temperature = 1.0
  c.eval.pass_k = (1, 2, 4)
  c.eval.probe_every = 40
  c.eval.probe_problems = 32
  c.curriculum.eval_problems = 64
  c.curriculum.h_min = 0.1
  if arg == "paper":
    return _paper(c)
  return presets.apply_arg(c, arg, {"smoke": _smoke})
